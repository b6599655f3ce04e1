//! Coalescing of concurrent unwraps, for network backends: callers queue their request, and
//! one background task sends whatever is queued (up to the backend's batch size) as one batch
//! request.
//!
//! Several batches may be in flight, as many as the round trip calls for ([`in_flight_limit`]):
//! with one, concurrent openers split into two groups that alternate, each open waiting for the
//! other group's batch and then its own (two round trips). Near the KMS a second batch in
//! flight saves less than a millisecond and costs a request, so the limit is then one. Before a
//! batch goes, it gathers what arrives within a small part of the round trip ([`linger`]):
//! readers whose keys came back in one answer come back for their next keys together.

use crate::crypto::SecretKey;
use crate::kms::rtt::RecentRtt;
use crate::kms::{Binding, KeyProvider, KmsError, WrappedDek};
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// Batches in flight at most, however far the KMS.
const MAX_IN_FLIGHT: usize = 8;
/// One more batch in flight per this much round trip.
const RTT_PER_BATCH: Duration = Duration::from_millis(2);
/// Round trips shorter than this send at once: gathering would cost more than it saves.
const LINGER_FROM: Duration = Duration::from_millis(4);
/// The longest a batch waits for more requests.
const MAX_LINGER: Duration = Duration::from_millis(2);

/// How many batches may be in flight when round trips take `rtt` (one before any was measured).
fn in_flight_limit(rtt: Option<Duration>) -> usize {
    let rtt = rtt.unwrap_or_default();
    let n = rtt.as_micros() / RTT_PER_BATCH.as_micros();
    usize::try_from(n)
        .unwrap_or(MAX_IN_FLIGHT)
        .clamp(1, MAX_IN_FLIGHT)
}

/// How long a batch waits for more requests before it goes, when round trips take `rtt`.
fn linger(rtt: Option<Duration>) -> Duration {
    match rtt {
        Some(rtt) if rtt >= LINGER_FROM => (rtt / 10).min(MAX_LINGER),
        _ => Duration::ZERO,
    }
}

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

/// Takes whatever is queued (up to a batch) and sends it as one request, with up to
/// [`in_flight_limit`] requests out at once, until the queue or `kms` is gone.
async fn run<K: KeyProvider + 'static>(
    kms: Weak<K>,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    max_batch: usize,
) {
    let rtt = Arc::new(RecentRtt::default());
    // Batches in flight: raised here when one goes, lowered by its task when it is answered.
    let (flying, mut landed) = watch::channel(0usize);
    let flying = Arc::new(flying);
    while let Some(first) = rx.recv().await {
        let limit = in_flight_limit(rtt.p50());
        if landed.wait_for(|n| *n < limit).await.is_err() {
            return;
        }
        let mut batch = vec![first];
        take_queued(&mut rx, &mut batch, max_batch);
        let wait = linger(rtt.p50());
        if !wait.is_zero() {
            let until = tokio::time::Instant::now() + wait;
            while batch.len() < max_batch {
                match tokio::time::timeout_at(until, rx.recv()).await {
                    Ok(Some(p)) => batch.push(p),
                    Ok(None) | Err(_) => break,
                }
            }
        }
        let Some(kms) = kms.upgrade() else { return };
        flying.send_modify(|n| *n += 1);
        let (rtt, flying) = (rtt.clone(), flying.clone());
        tokio::spawn(async move {
            let items: Vec<(WrappedDek, Binding)> = batch.iter().map(|(w, b, _)| (w.clone(), *b)).collect();
            let sent = Instant::now();
            let results = kms.unwrap_many(&items).await;
            if !results.iter().any(|r| matches!(r, Err(KmsError::Unreachable(_)))) {
                rtt.record(sent.elapsed());
            }
            for ((_, _, reply), r) in batch.into_iter().zip(results) {
                let _ = reply.send(r);
            }
            flying.send_modify(|n| *n = n.saturating_sub(1));
        });
    }
}

/// Moves what is queued into `batch`, up to `max_batch` items, without waiting.
fn take_queued(rx: &mut mpsc::UnboundedReceiver<Pending>, batch: &mut Vec<Pending>, max_batch: usize) {
    while batch.len() < max_batch {
        match rx.try_recv() {
            Ok(p) => batch.push(p),
            Err(_) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{FileId, VolumeId};
    use crate::kms::distant::Distant;
    use std::sync::atomic::Ordering;

    fn started(rtt: Duration) -> (Arc<Distant>, Arc<Batcher>) {
        let kms = Arc::new(Distant::new(rtt));
        let batcher = Arc::new(Batcher::new());
        batcher.start(Arc::downgrade(&kms), 249);
        (kms, batcher)
    }

    async fn unwrap(batcher: &Batcher) {
        let w = WrappedDek {
            key_ref: "k".into(),
            blob: vec![1],
        };
        let b = Binding::file(VolumeId::generate(), FileId::generate());
        let direct = || async { Err(KmsError::Unreachable("the batcher is not running".into())) };
        assert!(batcher.unwrap_or(true, &w, &b, direct).await.is_ok());
    }

    #[tokio::test]
    async fn far_from_the_kms_a_request_does_not_wait_for_the_batch_in_flight() {
        let (kms, batcher) = started(Duration::from_millis(30));
        for _ in 0..3 {
            unwrap(&batcher).await; // the batcher learns the round trip
        }
        let first = tokio::spawn({
            let batcher = batcher.clone();
            async move { unwrap(&batcher).await }
        });
        while kms.unwraps_in_flight.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        unwrap(&batcher).await;
        first.await.expect("first unwrap");
        assert_eq!(kms.most_unwraps_in_flight.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn near_the_kms_one_batch_is_in_flight_and_concurrent_requests_share_it() {
        let (kms, batcher) = started(Duration::ZERO);
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let batcher = batcher.clone();
                tokio::spawn(async move {
                    for _ in 0..10 {
                        unwrap(&batcher).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("unwraps");
        }
        assert_eq!(kms.most_unwraps_in_flight.load(Ordering::SeqCst), 1);
        let requests = kms.unwrap_requests.load(Ordering::SeqCst);
        assert!(requests <= 40, "160 unwraps took {requests} requests");
    }

    #[test]
    fn far_kms_more_batches_in_flight_and_a_short_gathering() {
        let ms = |n| Some(Duration::from_millis(n));
        assert_eq!(in_flight_limit(None), 1);
        assert_eq!(in_flight_limit(ms(1)), 1);
        assert_eq!(in_flight_limit(ms(10)), 5);
        assert_eq!(in_flight_limit(ms(25)), MAX_IN_FLIGHT);
        assert_eq!(in_flight_limit(Some(Duration::from_secs(100_000))), MAX_IN_FLIGHT);
        assert_eq!(linger(None), Duration::ZERO);
        assert_eq!(linger(ms(2)), Duration::ZERO);
        assert_eq!(linger(ms(10)), Duration::from_millis(1));
        assert_eq!(linger(ms(250)), MAX_LINGER);
    }
}
