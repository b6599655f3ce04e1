//! What the filesystem reports as it works: KMS outcomes (and lock requests) to the daemon,
//! counters to status.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

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
    /// Opens whose key another caller (a prefetch pass, another open) was already asking the
    /// KMS for, and that waited for its answer instead of asking again.
    pub kms_joined: AtomicU64,
    /// Opens asked for through the mount.
    pub opens: AtomicU64,
    /// How long each KMS call for a key took (unwraps and new file keys), however it ended.
    pub kms_latency: Histogram,
    /// KMS calls that failed, by [`crate::kms::KmsError::kind`]: denied, unreachable, corrupt,
    /// misconfigured.
    pub kms_errors: [AtomicU64; 4],
    /// KMS calls for keys not answered yet: a KMS that hangs answers nothing, so the last
    /// outcome stays "ok" while every cold open waits; status shows these instead.
    pub kms_unanswered: InFlight,
    /// FUSE requests by operation, counted by the frontend as they arrive.
    pub requests: Requests,
}

/// Declares [`FuseOp`] and [`FUSE_OPS`] from one list, so names and variants cannot drift.
macro_rules! fuse_ops {
    ($($op:ident => $name:literal,)*) => {
        /// The FUSE operations the daemon answers; the kernel's other requests (ioctl,
        /// lseek, ...) are refused by fuser without reaching us.
        #[derive(Clone, Copy, Debug)]
        pub enum FuseOp {
            $($op,)*
        }

        /// [`FuseOp`]'s names, in its order, as metrics label them.
        pub const FUSE_OPS: [&str; [$($name),*].len()] = [$($name),*];
    };
}

fuse_ops! {
    Init => "init",
    Lookup => "lookup",
    Forget => "forget",
    Getattr => "getattr",
    Setattr => "setattr",
    Readlink => "readlink",
    Mknod => "mknod",
    Mkdir => "mkdir",
    Unlink => "unlink",
    Rmdir => "rmdir",
    Symlink => "symlink",
    Rename => "rename",
    Link => "link",
    Open => "open",
    Read => "read",
    Write => "write",
    Flush => "flush",
    Release => "release",
    Fsync => "fsync",
    Opendir => "opendir",
    Readdir => "readdir",
    Releasedir => "releasedir",
    Fsyncdir => "fsyncdir",
    Getxattr => "getxattr",
    Listxattr => "listxattr",
    Setxattr => "setxattr",
    Removexattr => "removexattr",
    Statfs => "statfs",
    Access => "access",
    Create => "create",
    Fallocate => "fallocate",
}

/// A count per FUSE operation: where a workload's round trips go (a small file's create, read
/// and delete are a handful of requests each, and each is a trip through the kernel).
#[derive(Default)]
pub struct Requests([AtomicU64; FUSE_OPS.len()]);

impl Requests {
    pub fn count(&self, op: FuseOp) {
        self.0[op as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Each operation's name and count, in [`FUSE_OPS`]' order.
    pub fn snapshot(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        FUSE_OPS
            .iter()
            .zip(&self.0)
            .map(|(op, n)| (*op, n.load(Ordering::Relaxed)))
    }
}

/// Calls in flight by when they started (keyed by a sequence number: starts may tie).
#[derive(Default)]
pub struct InFlight(Mutex<(u64, BTreeMap<u64, Instant>)>);

/// One call in flight; it leaves the set when dropped, however the call ended.
pub struct Unanswered<'a>(&'a InFlight, u64);

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, BTreeMap<u64, Instant>)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A call starts now.
    pub fn start(&self) -> Unanswered<'_> {
        let mut g = self.lock();
        g.0 += 1;
        let seq = g.0;
        g.1.insert(seq, Instant::now());
        Unanswered(self, seq)
    }

    /// How many calls are unanswered, and how long the oldest has waited.
    pub fn oldest(&self) -> Option<(usize, Duration)> {
        let g = self.lock();
        let (_, started) = g.1.first_key_value()?;
        Some((g.1.len(), started.elapsed()))
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        self.0.lock().1.remove(&self.1);
    }
}

/// The kinds `kms_errors` counts, in its order.
pub const KMS_ERROR_KINDS: [&str; 4] = ["denied", "unreachable", "corrupt", "misconfigured"];

impl Stats {
    /// Records one KMS call's duration and, if it failed, its kind.
    pub fn kms_call_ended<T>(&self, took: Duration, result: &Result<T, crate::kms::KmsError>) {
        use crate::kms::KmsError as E;
        self.kms_latency.observe(took);
        let kind = match result {
            Ok(_) => return,
            Err(E::Denied(_)) => 0,
            Err(E::Unreachable(_)) => 1,
            Err(E::Corrupt(_)) => 2,
            Err(E::Misconfigured(_)) => 3,
        };
        self.kms_errors[kind].fetch_add(1, Ordering::Relaxed);
    }
}

/// Upper bounds (seconds) of the KMS latency buckets: a local keystore answers in
/// microseconds, a server across a network in milliseconds, a failing one after its retries.
pub const LATENCY_BUCKETS: [f64; 10] = [0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0];

/// A Prometheus-style histogram: a count per bucket (not cumulative here), a total count and
/// a sum, all lock-free.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros().try_into().unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Cumulative counts per bucket (as Prometheus's `le` buckets), the total, the sum in seconds.
    pub fn snapshot(&self) -> (Vec<u64>, u64, f64) {
        let mut total = 0;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                total += b.load(Ordering::Relaxed);
                total
            })
            .collect();
        let micros = self.sum_micros.load(Ordering::Relaxed);
        (
            cumulative,
            self.count.load(Ordering::Relaxed),
            micros as f64 / 1e6,
        )
    }
}
