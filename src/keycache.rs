//! Unwrapped file keys, kept briefly so that a file reopened soon needs no KMS call.
//!
//! Bounded by count (LRU) and by age (TTL). An entry is the file's content cipher (the
//! HKDF-derived key schedule; the DEK itself is dropped as soon as the cipher is made); the
//! cipher wipes itself when the last reference goes, so eviction, `clear` (on lock) and exit
//! zeroize. An open file holds its own reference and keeps its key while open, whatever the
//! cache does. The memory is locked against swapping by the daemon (see `sys::lock_memory`).

use crate::format::FileId;
use crate::format::block::ContentCipher;
use lru::LruCache;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Entry {
    cipher: Arc<ContentCipher>,
    /// When the KMS unwrapped this key: the TTL counts from here, not from last use, so a key
    /// is asked for again at least every TTL while the KMS still agrees.
    unwrapped: Instant,
    /// Unwrapped ahead of any open (prefetch) and not used yet: its first `get` is a prefetch
    /// hit, its eviction before one is prefetch work wasted.
    unused_prefetch: bool,
}

/// How prefetched keys fared, for `kmsfs status`.
#[derive(Default)]
pub struct PrefetchOutcomes {
    /// Prefetched keys an open then used.
    pub used: AtomicU64,
    /// Prefetched keys dropped (LRU or TTL) before any open used them.
    pub evicted_unused: AtomicU64,
}

pub struct KeyCache {
    /// The cached keys, and whether the cache is closed (after a lock nothing is cached
    /// again, even by an open that was already waiting on the KMS). Taken briefly by every
    /// open and by the periodic sweep.
    entries: Mutex<(LruCache<FileId, Entry>, bool)>,
    ttl: Duration,
    pub prefetch: PrefetchOutcomes,
    /// Keys being asked of the KMS right now, by whom ([`Fetch`]). Taken briefly as a fetch
    /// starts and ends; never held across the KMS call.
    fetching: Mutex<HashMap<FileId, tokio::sync::watch::Receiver<()>>>,
}

/// Whether the caller asks the KMS for a key or waits for another asker's answer. Without
/// this, an open that a prefetch pass is just fetching for (or two opens of one file at once)
/// sends its own unwrap: with 16 readers ahead of the pass, a third of a directory's keys were
/// asked for twice.
pub enum Fetch<'a> {
    /// Nobody is asking: this caller does; waiters are released when the claim drops
    /// (after the key is cached, or the call failed).
    Mine(Claim<'a>),
    /// Somebody is: wait for `changed()` to end (it returns an error when the other asker
    /// is done, however it ended), then look in the cache again.
    Theirs(tokio::sync::watch::Receiver<()>),
}

/// The right to ask the KMS for one key; dropping it releases those waiting for it.
pub struct Claim<'a> {
    cache: &'a KeyCache,
    id: FileId,
    _done: tokio::sync::watch::Sender<()>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        // Out of the map before the sender goes: a released waiter that finds no key claims
        // anew instead of waiting on this finished fetch again.
        self.cache
            .fetching
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl KeyCache {
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        let cap = NonZeroUsize::new(capacity.max(1)).expect("at least 1");
        KeyCache {
            entries: Mutex::new((LruCache::new(cap), false)),
            ttl,
            prefetch: PrefetchOutcomes::default(),
            fetching: Mutex::new(HashMap::new()),
        }
    }

    /// Claims the fetch of `id`'s key from the KMS, or gives what to wait on if another
    /// caller has it.
    pub fn claim(&self, id: FileId) -> Fetch<'_> {
        let mut f = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rx) = f.get(&id) {
            return Fetch::Theirs(rx.clone());
        }
        let (tx, rx) = tokio::sync::watch::channel(());
        f.insert(id, rx);
        Fetch::Mine(Claim {
            cache: self,
            id,
            _done: tx,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (LruCache<FileId, Entry>, bool)> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The cached key of `id`, if present and younger than the TTL (an expired one is dropped
    /// here).
    pub fn get(&self, id: &FileId) -> Option<Arc<ContentCipher>> {
        let mut g = self.lock();
        let c = &mut g.0;
        let e = c.get_mut(id)?;
        if e.unwrapped.elapsed() < self.ttl {
            if std::mem::take(&mut e.unused_prefetch) {
                self.prefetch.used.fetch_add(1, Ordering::Relaxed);
            }
            Some(e.cipher.clone())
        } else {
            if let Some(e) = c.pop(id) {
                self.note_gone(&e);
            }
            None
        }
    }

    /// Whether a fresh key of `id` is cached, without counting it as used or as recent.
    pub fn contains(&self, id: &FileId) -> bool {
        self.lock()
            .0
            .peek(id)
            .is_some_and(|e| e.unwrapped.elapsed() < self.ttl)
    }

    /// Most keys the cache holds.
    pub fn capacity(&self) -> usize {
        self.lock().0.cap().get()
    }

    /// Caches a key just unwrapped; returns the id of an entry the LRU bound pushed out.
    pub fn insert(&self, id: FileId, cipher: Arc<ContentCipher>) -> Option<FileId> {
        self.put(id, cipher, false)
    }

    /// Caches a key unwrapped ahead of any open (prefetch); as `insert`.
    pub fn insert_prefetched(&self, id: FileId, cipher: Arc<ContentCipher>) -> Option<FileId> {
        self.put(id, cipher, true)
    }

    fn put(&self, id: FileId, cipher: Arc<ContentCipher>, prefetched: bool) -> Option<FileId> {
        let mut g = self.lock();
        if g.1 {
            return None;
        }
        let evicted = g.0.push(
            id,
            Entry {
                cipher,
                unwrapped: Instant::now(),
                unused_prefetch: prefetched,
            },
        );
        let (old, e) = evicted.filter(|(old, _)| *old != id)?;
        self.note_gone(&e);
        Some(old)
    }

    /// Counts a prefetched key that leaves the cache unused.
    fn note_gone(&self, e: &Entry) {
        if e.unused_prefetch {
            self.prefetch.evicted_unused.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Drops entries older than the TTL; returns their ids. The cache's reference is the last
    /// one unless the file is open (its `ContentFile` holds one, dropped at its last
    /// release): whichever goes last wipes the key schedule.
    pub fn sweep(&self) -> Vec<FileId> {
        let mut g = self.lock();
        let c = &mut g.0;
        let old: Vec<FileId> = c
            .iter()
            .filter(|(_, e)| e.unwrapped.elapsed() >= self.ttl)
            .map(|(id, _)| *id)
            .collect();
        for id in &old {
            if let Some(e) = c.pop(id) {
                self.note_gone(&e);
            }
        }
        old
    }

    /// Drops every key and caches nothing from now on (on lock and at exit).
    pub fn close(&self) -> usize {
        let mut g = self.lock();
        g.1 = true;
        let n = g.0.len();
        g.0.clear();
        n
    }

    pub fn len(&self) -> usize {
        self.lock().0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SecretKey;

    fn cipher() -> (FileId, Arc<ContentCipher>) {
        let id = FileId::generate();
        (id, Arc::new(ContentCipher::new(&SecretKey::generate(), id)))
    }

    /// Nothing in the cache keeps a clone of an evicted cipher: the caller's reference is the
    /// last one, and the cipher goes with it.
    #[test]
    fn eviction_sweep_and_close_let_go_of_the_cipher() {
        let c = KeyCache::new(1, Duration::from_millis(50));
        let (a, ka) = cipher();
        let weak_a = Arc::downgrade(&ka);
        c.insert(a, ka);
        assert!(weak_a.upgrade().is_some(), "held by the cache");
        let (b, kb) = cipher();
        let weak_b = Arc::downgrade(&kb);
        assert_eq!(c.insert(b, kb), Some(a), "pushed out by the LRU bound");
        assert!(weak_a.upgrade().is_none(), "an LRU eviction drops the cipher");
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(c.sweep(), vec![b]);
        assert!(weak_b.upgrade().is_none(), "a TTL sweep drops the cipher");

        let (d, kd) = cipher();
        let weak_d = Arc::downgrade(&kd);
        c.insert(d, kd);
        let open = c.get(&d).expect("fresh");
        std::thread::sleep(Duration::from_millis(80));
        assert!(c.get(&d).is_none(), "expired");
        assert!(weak_d.upgrade().is_some(), "an open file keeps its own reference");
        drop(open);
        assert!(weak_d.upgrade().is_none(), "its last release drops the cipher");

        let (e, ke) = cipher();
        let weak_e = Arc::downgrade(&ke);
        let c = KeyCache::new(4, Duration::from_secs(60));
        c.insert(e, ke);
        assert_eq!(c.close(), 1);
        assert!(weak_e.upgrade().is_none(), "close drops every cipher");
    }

    #[test]
    fn prefetched_keys_count_as_used_once_or_as_evicted_unused() {
        let c = KeyCache::new(2, Duration::from_secs(60));
        let (a, ka) = cipher();
        let (b, kb) = cipher();
        let (d, kd) = cipher();
        c.insert_prefetched(a, ka);
        c.insert_prefetched(b, kb);
        assert!(c.contains(&b), "contains neither uses a key nor makes it recent");
        assert!(c.get(&a).is_some());
        assert!(c.get(&a).is_some());
        assert_eq!(
            c.prefetch.used.load(Ordering::Relaxed),
            1,
            "only the first use is a hit"
        );
        assert_eq!(c.insert(d, kd), Some(b));
        assert_eq!(c.prefetch.evicted_unused.load(Ordering::Relaxed), 1);
        assert_eq!(c.capacity(), 2);
    }

    #[test]
    fn one_fetch_per_key_and_its_end_releases_the_waiters() {
        let c = KeyCache::new(4, Duration::from_secs(60));
        let (a, ka) = cipher();
        let (b, _) = cipher();
        let Fetch::Mine(claim) = c.claim(a) else {
            panic!("nobody fetches a yet")
        };
        let Fetch::Theirs(mut rx) = c.claim(a) else {
            panic!("a second asker must wait for the first")
        };
        assert!(matches!(c.claim(b), Fetch::Mine(_)), "other keys are not held up");
        c.insert(a, ka);
        drop(claim);
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert!(
            rt.block_on(rx.changed()).is_err(),
            "the waiter is released when the fetch ends"
        );
        assert!(c.get(&a).is_some());
        assert!(
            matches!(c.claim(a), Fetch::Mine(_)),
            "a finished fetch leaves nothing to wait on"
        );
    }

    #[test]
    fn lru_bound_and_ttl() {
        let c = KeyCache::new(2, Duration::from_millis(200));
        let (a, ka) = cipher();
        let (b, kb) = cipher();
        let (d, kd) = cipher();
        assert_eq!(c.insert(a, ka), None);
        assert_eq!(c.insert(b, kb), None);
        assert!(c.get(&a).is_some()); // a is now the most recent
        assert_eq!(c.insert(d, kd), Some(b));
        assert!(c.get(&b).is_none());
        std::thread::sleep(Duration::from_millis(250));
        assert!(c.get(&a).is_none(), "expired");
        assert_eq!(c.sweep(), vec![d]);
        assert!(c.is_empty());
    }
}
