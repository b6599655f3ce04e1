//! The pool of new-file keys, for any network backend: file ids with their DEKs, wrapped ahead
//! of time with one `generate_many` (one batch request, or parallel requests), all bound to one
//! volume and each handed out once. Closed for good when the mount locks or ends.
//!
//! The pool sizes itself to the round trip: it counts the keys taken while a refill was in
//! flight (the demand over one refill's round trip, which grows with the KMS's distance) and
//! starts the next refill while at least twice that is left, with a batch of four times that.
//! A create that finds the pool empty while a refill is in flight waits for that refill (about
//! the round trip a request of its own would take) rather than send a request for one key.

use crate::format::{FileId, VolumeId};
use crate::kms::{Binding, KeyProvider, KmsError, NewFileKey, fresh_file_key};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Refill the pool when it falls below this many keys, or twice the demand over a refill …
const POOL_LOW: usize = 32;
/// … with one batch of this many, or four times that demand …
const POOL_BATCH: usize = 128;
/// … but never more than this many (two or three batch requests).
const POOL_MAX_BATCH: usize = 512;

/// How many refills a create waits for before it asks for a key of its own.
const WAITS_FOR_REFILL: usize = 8;

/// When to refill and how many to make, given the keys taken during the last refills.
fn refill_plan(demand: usize) -> (usize, usize) {
    let low = POOL_LOW.max(demand.saturating_mul(2)).min(POOL_MAX_BATCH / 2);
    let batch = POOL_BATCH.max(demand.saturating_mul(4)).min(POOL_MAX_BATCH);
    (low, batch)
}

/// Keys made ahead for new files, all bound to one volume.
#[derive(Default)]
struct Stock {
    volume_id: Option<VolumeId>,
    keys: VecDeque<NewFileKey>,
    /// Keys asked for since the refill in flight was started.
    taken_during_refill: usize,
    /// The most keys asked for during one refill lately (decays by a quarter per refill).
    demand: usize,
}

#[derive(Default)]
pub(crate) struct KeyPool {
    stock: Mutex<Stock>,
    /// A refill is under way.
    refilling: AtomicBool,
    /// Set by `close` (on lock and unmount): nothing is pooled again.
    closed: AtomicBool,
    /// Wakes the creates that wait for a refill in flight, when it lands (or the pool closes).
    refilled: Notify,
}

impl KeyPool {
    /// The next pooled key for `volume_id`, if any, and whether the caller must now start a
    /// [`refill`](Self::refill): true for one caller at a time, when the pool runs low.
    fn take(&self, volume_id: VolumeId) -> (Option<NewFileKey>, bool) {
        let mut stock = self.stock.lock().unwrap_or_else(|p| p.into_inner());
        if stock.volume_id != Some(volume_id) {
            // A provider serves one volume; should another ask, start over for it.
            stock.keys.clear();
            stock.volume_id = Some(volume_id);
        }
        let taken = stock.keys.pop_front();
        let (low, _) = refill_plan(stock.demand);
        let refill = stock.keys.len() < low && !self.refilling.swap(true, Ordering::AcqRel);
        if refill {
            stock.taken_during_refill = 0;
        }
        stock.taken_during_refill += 1;
        (taken, refill)
    }

    /// Makes a batch of keys for `volume_id` with `provider` and pools them, unless the pool
    /// was closed meanwhile (they are then dropped, and wiped as they drop).
    pub(crate) async fn refill<P: KeyProvider + ?Sized>(&self, provider: &P, volume_id: VolumeId) {
        let batch = {
            let stock = self.stock.lock().unwrap_or_else(|p| p.into_inner());
            refill_plan(stock.demand).1
        };
        let bindings: Vec<Binding> = (0..batch)
            .map(|_| Binding::file(volume_id, FileId::generate()))
            .collect();
        let made = provider.generate_many(&bindings).await;
        let mut stock = self.stock.lock().unwrap_or_else(|p| p.into_inner());
        if self.closed.load(Ordering::Acquire) {
            // Locked while we were away: drop (and wipe) what we made. `refilling` stays set:
            // a closed pool starts no refill again.
            drop(stock);
            self.refilled.notify_waiters();
            return;
        }
        for (b, r) in bindings.into_iter().zip(made) {
            match (r, b.file_id) {
                (Ok((dek, wrapped)), Some(file_id)) if stock.volume_id == Some(volume_id) => {
                    stock.keys.push_back(NewFileKey {
                        file_id,
                        dek,
                        wrapped,
                    })
                }
                (Err(e), _) => {
                    log::warn!("could not refill the pool of new-file keys: {e}");
                    break;
                }
                _ => break,
            }
        }
        stock.demand = stock.taken_during_refill.max(stock.demand - stock.demand / 4);
        self.refilling.store(false, Ordering::Release);
        drop(stock);
        self.refilled.notify_waiters();
    }

    /// A new-file key for `volume_id` from the pool, which `me` (the provider that owns the
    /// pool, reached with `pool_of`) refills in the background with one batch when it runs
    /// low; made at once by `provider` when the pool is empty, or with no `me` (pooling off).
    pub(crate) async fn take_or_make<P: KeyProvider + 'static>(
        &self,
        me: Option<Arc<P>>,
        pool_of: fn(&P) -> &KeyPool,
        provider: &P,
        volume_id: VolumeId,
    ) -> Result<NewFileKey, KmsError> {
        let Some(me) = me else {
            return fresh_file_key(provider, volume_id).await;
        };
        // Empty, but keys on their way: wait for them instead of asking for one (again, when
        // others took the whole refill first; a refill that fails ends the waiting).
        for _ in 0..WAITS_FOR_REFILL {
            // Registered before looking, so that a refill landing in between still wakes us.
            let landed = self.refilled.notified();
            tokio::pin!(landed);
            landed.as_mut().enable();
            let (taken, refill) = self.take(volume_id);
            if refill {
                let me = me.clone();
                tokio::spawn(async move { pool_of(&me).refill(&*me, volume_id).await });
            }
            if let Some(k) = taken {
                return Ok(k);
            }
            if !self.refilling.load(Ordering::Acquire) || self.closed.load(Ordering::Acquire) {
                break;
            }
            landed.await;
        }
        fresh_file_key(provider, volume_id).await
    }

    /// Drops every pooled key (they are wiped as they drop) and pools nothing again.
    pub(crate) fn close(&self) {
        let mut stock = self.stock.lock().unwrap_or_else(|p| p.into_inner());
        self.closed.store(true, Ordering::Release);
        stock.keys.clear();
        drop(stock);
        self.refilled.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kms::distant::Distant;
    use std::time::Duration;

    #[tokio::test]
    async fn creates_far_from_the_kms_take_pooled_keys_and_never_ask_for_one() {
        let kms = Arc::new(Distant::new(Duration::from_millis(25)));
        let volume = VolumeId::generate();
        let writers: Vec<_> = (0..16)
            .map(|_| {
                let kms = kms.clone();
                tokio::spawn(async move {
                    for _ in 0..50 {
                        let me = Some(kms.clone());
                        let key = kms.pool.take_or_make(me, |k| &k.pool, &*kms, volume).await;
                        assert!(key.is_ok());
                        // A create writes its header before the next one.
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.expect("a writer");
        }
        let single = kms.single_generates.load(Ordering::SeqCst);
        let batches = kms.batch_generates.load(Ordering::SeqCst);
        assert_eq!(
            single, 0,
            "800 creates asked for {single} single keys ({batches} batches)"
        );
    }

    #[test]
    fn a_pool_that_empties_during_its_refills_refills_earlier_with_more() {
        assert_eq!(refill_plan(0), (POOL_LOW, POOL_BATCH));
        assert_eq!(refill_plan(10), (POOL_LOW, POOL_BATCH));
        assert_eq!(refill_plan(60), (120, 240));
        assert_eq!(refill_plan(10_000), (POOL_MAX_BATCH / 2, POOL_MAX_BATCH));
    }
}
