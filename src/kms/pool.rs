//! The pool of new-file keys, for any network backend: file ids with their DEKs, wrapped ahead
//! of time with one `generate_many` (one batch request, or parallel requests), all bound to one volume and each handed out once. Closed for good when the mount
//! locks or ends.

use crate::format::{FileId, VolumeId};
use crate::kms::{Binding, KeyProvider, KmsError, NewFileKey, fresh_file_key};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Refill the pool when it falls below this many keys …
const POOL_LOW: usize = 32;
/// … with one batch of this many.
const POOL_BATCH: usize = 128;

/// Keys made ahead for new files, all bound to one volume.
#[derive(Default)]
struct Stock {
    volume_id: Option<VolumeId>,
    keys: VecDeque<NewFileKey>,
}

#[derive(Default)]
pub(crate) struct KeyPool {
    stock: Mutex<Stock>,
    /// A refill is under way.
    refilling: AtomicBool,
    /// Set by `close` (on lock and unmount): nothing is pooled again.
    closed: AtomicBool,
}

impl KeyPool {
    /// The next pooled key for `volume_id`, if any, and whether the caller must now start a
    /// [`refill`](Self::refill): true for one caller at a time, when the pool runs low.
    pub(crate) fn take(&self, volume_id: VolumeId) -> (Option<NewFileKey>, bool) {
        let (taken, left) = {
            let mut stock = self.stock.lock().unwrap_or_else(|p| p.into_inner());
            if stock.volume_id != Some(volume_id) {
                // A provider serves one volume; should another ask, start over for it.
                stock.keys.clear();
                stock.volume_id = Some(volume_id);
            }
            (stock.keys.pop_front(), stock.keys.len())
        };
        let refill = left < POOL_LOW && !self.refilling.swap(true, Ordering::AcqRel);
        (taken, refill)
    }

    /// Makes a batch of keys for `volume_id` with `provider` and pools them, unless the pool
    /// was closed meanwhile (they are then dropped, and wiped as they drop).
    pub(crate) async fn refill<P: KeyProvider + ?Sized>(&self, provider: &P, volume_id: VolumeId) {
        let bindings: Vec<Binding> = (0..POOL_BATCH)
            .map(|_| Binding::file(volume_id, FileId::generate()))
            .collect();
        let made = provider.generate_many(&bindings).await;
        let mut stock = self.stock.lock().unwrap_or_else(|p| p.into_inner());
        if self.closed.load(Ordering::Acquire) {
            return; // locked while we were away: drop (and wipe) what we made
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
        self.refilling.store(false, Ordering::Release);
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
        let (taken, refill) = self.take(volume_id);
        if refill {
            tokio::spawn(async move { pool_of(&me).refill(&*me, volume_id).await });
        }
        match taken {
            Some(k) => Ok(k),
            None => fresh_file_key(provider, volume_id).await,
        }
    }

    /// Drops every pooled key (they are wiped as they drop) and pools nothing again.
    pub(crate) fn close(&self) {
        let mut stock = self.stock.lock().unwrap_or_else(|p| p.into_inner());
        self.closed.store(true, Ordering::Release);
        stock.keys.clear();
    }
}
