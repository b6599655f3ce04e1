//! Coalescing of concurrent unwraps, for network backends: callers queue their request, and
//! one background task sends whatever is queued (up to the backend's batch size) as one batch
//! request; while a batch is in flight, new requests queue up and go together in the next one.

use crate::crypto::SecretKey;
use crate::kms::{Binding, KeyProvider, KmsError, WrappedDek};
use std::future::Future;
use std::sync::{Mutex, Weak};
use tokio::sync::{mpsc, oneshot};

type Reply = oneshot::Receiver<Result<SecretKey, KmsError>>;
type Pending = (WrappedDek, Binding, oneshot::Sender<Result<SecretKey, KmsError>>);

pub(crate) struct Batcher {
    /// Unwraps waiting to be sent as one batch.
    queue: mpsc::UnboundedSender<Pending>,
    /// The queue's receiving end, until the task starts and takes it.
    rx: Mutex<Option<mpsc::UnboundedReceiver<Pending>>>,
}

impl Batcher {
    pub(crate) fn new() -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        Batcher {
            queue,
            rx: Mutex::new(Some(rx)),
        }
    }

    /// Starts the task that sends what is queued with `kms.unwrap_many`, at most `max_batch`
    /// at a time. Call once, from inside the runtime; the task ends when `kms` is gone.
    pub(crate) fn start<K: KeyProvider + 'static>(&self, kms: Weak<K>, max_batch: usize) {
        let rx = self.rx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(rx) = rx {
            tokio::spawn(run(kms, rx, max_batch));
        }
    }

    /// Queues one unwrap for the task; `None` when the task has not started (the caller then
    /// asks directly). The reply fails if the task stops first.
    pub(crate) fn submit(&self, wrapped: &WrappedDek, binding: &Binding) -> Option<Reply> {
        let (tx, rx) = oneshot::channel();
        let running = self.rx.lock().unwrap_or_else(|p| p.into_inner()).is_none();
        if !running || self.queue.send((wrapped.clone(), *binding, tx)).is_err() {
            return None;
        }
        Some(rx)
    }

    /// `wrapped` unwrapped by the batch task when `enabled` and running, else (or should the
    /// task stop first) by `direct`.
    pub(crate) async fn unwrap_or<F: Future<Output = Result<SecretKey, KmsError>>>(
        &self,
        enabled: bool,
        wrapped: &WrappedDek,
        binding: &Binding,
        direct: impl FnOnce() -> F,
    ) -> Result<SecretKey, KmsError> {
        let Some(reply) = enabled.then(|| self.submit(wrapped, binding)).flatten() else {
            return direct().await;
        };
        match reply.await {
            Ok(r) => r,
            // The batcher is not running (shutting down): ask directly.
            Err(_) => direct().await,
        }
    }
}

/// Takes whatever is queued (up to a batch) and sends it as one request, until the queue or
/// `kms` is gone.
async fn run<K: KeyProvider>(kms: Weak<K>, mut rx: mpsc::UnboundedReceiver<Pending>, max_batch: usize) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let Some(kms) = kms.upgrade() else { return };
        let items: Vec<(WrappedDek, Binding)> = batch.iter().map(|(w, b, _)| (w.clone(), *b)).collect();
        let results = kms.unwrap_many(&items).await;
        for ((_, _, reply), r) in batch.into_iter().zip(results) {
            let _ = reply.send(r);
        }
    }
}
