//! Coalescing of concurrent unwraps: callers queue their request, and one background task sends
//! whatever is queued (up to [`MAX_BATCH`]) as one batch request; while a batch is in flight,
//! new requests queue up and go together in the next one.

use super::transit::MAX_BATCH;
use crate::crypto::SecretKey;
use crate::kms::{Binding, KeyProvider, KmsError, WrappedDek};
use std::sync::{Mutex, Weak};
use tokio::sync::{mpsc, oneshot};

type Reply = oneshot::Receiver<Result<SecretKey, KmsError>>;
type Pending = (WrappedDek, Binding, oneshot::Sender<Result<SecretKey, KmsError>>);

pub(super) struct Batcher {
    /// Unwraps waiting to be sent as one batch.
    queue: mpsc::UnboundedSender<Pending>,
    /// The queue's receiving end, until the task starts and takes it.
    rx: Mutex<Option<mpsc::UnboundedReceiver<Pending>>>,
}

impl Batcher {
    pub(super) fn new() -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        Batcher {
            queue,
            rx: Mutex::new(Some(rx)),
        }
    }

    /// Starts the task that sends what is queued with `kms.unwrap_many`. Call once, from
    /// inside the runtime; the task ends when `kms` is gone.
    pub(super) fn start<K: KeyProvider + 'static>(&self, kms: Weak<K>) {
        let rx = self.rx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(rx) = rx {
            tokio::spawn(run(kms, rx));
        }
    }

    /// Queues one unwrap for the task; `None` when the task has not started (the caller then
    /// asks directly). The reply fails if the task stops first.
    pub(super) fn submit(&self, wrapped: &WrappedDek, binding: &Binding) -> Option<Reply> {
        let (tx, rx) = oneshot::channel();
        let running = self.rx.lock().unwrap_or_else(|p| p.into_inner()).is_none();
        if !running || self.queue.send((wrapped.clone(), *binding, tx)).is_err() {
            return None;
        }
        Some(rx)
    }
}

/// Takes whatever is queued (up to a batch) and sends it as one request, until the queue or
/// `kms` is gone.
async fn run<K: KeyProvider>(kms: Weak<K>, mut rx: mpsc::UnboundedReceiver<Pending>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
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
