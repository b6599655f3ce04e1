//! What the filesystem reports as it works: KMS outcomes (and lock requests) to the daemon,
//! counters to status.

use std::sync::atomic::AtomicU64;

/// What the filesystem tells the daemon about the KMS as it uses it.
pub trait KmsEvents: Send + Sync {
    /// The KMS refused a key: access has been revoked.
    fn denied(&self, why: &str);
    /// The KMS could not be reached for a key.
    fn unreachable(&self, why: &str);
    /// The KMS answered a call: reachable and willing.
    fn ok(&self) {}
    /// Something other than the KMS wants the mount locked (a usage guard with `lock`).
    fn lock(&self, _why: &str) {}
}

/// Counters for `kmsfs status`.
#[derive(Default)]
pub struct Stats {
    pub kms_calls: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub auth_failures: AtomicU64,
    /// Keys unwrapped ahead of their opens (`prefetch`).
    pub prefetched: AtomicU64,
}
