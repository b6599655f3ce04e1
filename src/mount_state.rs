//! A live mount as `kmsfs status` and `kmsfs lock` see it, and the lock itself: every key
//! dropped and wiped, ENOKEY from then on, the kernel's cached plaintext invalidated, the
//! mount detached so the daemon exits.

use crate::fs::Fs;
use crate::kms::KeyProvider;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Everything about a live mount that status and lock need.
pub struct MountState {
    pub fs: Arc<Fs>,
    pub kms: Arc<dyn KeyProvider>,
    pub mountpoint: PathBuf,
    pub backing: PathBuf,
    pub volume_id: String,
    pub key_ref: String,
    pub key_version: Mutex<u32>,
    /// Set once the FUSE session exists: tells the kernel to drop cached pages.
    pub notifier: OnceLock<fuser::Notifier>,
    /// The page-cache fill: closed before the lock invalidates the cache.
    pub page_fill: Arc<crate::fuse::PageFill>,
    pub started: Instant,
    /// The outcome of the last KMS call, whoever made it (an open, a create, the watcher).
    pub health: Arc<Health>,
    /// Why the mount was locked, once it is.
    pub locked: Mutex<Option<String>>,
    /// Set when the FUSE session has ended.
    pub session_ended: Arc<std::sync::atomic::AtomicBool>,
    /// Inodes whose cached pages the kernel must drop: set by `drop_keys`, taken by `detach`.
    pub to_invalidate: Mutex<Option<Vec<u64>>>,
    /// Set by a stop (SIGTERM/SIGINT) that had to drop the keys and detach because files were
    /// open: the daemon then exits 0, as for any stop, not with the lock's status.
    pub stopping: std::sync::atomic::AtomicBool,
}

impl MountState {
    /// Locks the mount (idempotent): keys dropped and wiped, ENOKEY from now on, kernel caches
    /// invalidated (mapped pages included), the mount detached so the daemon can exit.
    pub fn lock(&self, why: &str) {
        self.drop_keys(why);
        self.detach();
    }

    /// SIGHUP and `kmsfs reload`: the audit log reopened (after logrotate), the policy read
    /// again (a bad file keeps the one in force).
    pub fn reload(&self) -> Value {
        crate::logging::reopen_logs();
        if let Err(e) = crate::audit::reopen() {
            log::error!("cannot reopen the audit log ({e}); still writing to the old file");
        }
        match self.fs.access().reload() {
            Ok(summary) if self.fs.access().enabled() => json!({ "policy": summary }),
            Ok(_) => json!({ "policy": null }),
            Err(e) => json!({ "error": e }),
        }
    }

    /// The first half of `lock`: every key dropped and wiped, ENOKEY from now on. Fast in any
    /// KMS state (opens waiting on the KMS fail at once); idempotent.
    pub fn drop_keys(&self, why: &str) {
        {
            let mut l = self.locked.lock().unwrap_or_else(|p| p.into_inner());
            if l.is_some() {
                return;
            }
            *l = Some(why.to_owned());
        }
        log::warn!("locking {}: {why}", self.mountpoint.display());
        crate::notify::notify(&format!("STATUS=locked: {why}"));
        let inodes = self.fs.lock();
        self.kms.forget_secrets();
        crate::audit::event("locked", json!({"reason": why}));
        *self.to_invalidate.lock().unwrap_or_else(|p| p.into_inner()) = Some(inodes);
    }

    /// The second half of `lock`, once: the kernel's cached plaintext invalidated, the mount
    /// detached.
    pub fn detach(&self) {
        let Some(inodes) = self
            .to_invalidate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        // No store may land after the invalidation below (this waits for one in flight).
        self.page_fill.close();
        if let Some(n) = self.notifier.get() {
            for ino in inodes {
                // Offset 0, length -1: the whole file's cached pages, mapped ones too.
                let _ = n.inval_inode(fuser::INodeNo(ino), 0, -1);
            }
        }
        // Lazily: open files may be busy; the session ends when the kernel lets go.
        if let Err(e) = crate::sys::umount(self.mountpoint.as_os_str(), true) {
            log::error!("cannot detach {} after locking: {e}", self.mountpoint.display());
        }
    }

    /// A stop asked for while files are open (a plain unmount is refused with EBUSY): what
    /// `kmsfs lock` does, keys dropped and the mount detached, but the daemon exits 0 since
    /// systemd (or the admin) asked for exactly this.
    pub fn stop(&self, why: &str) {
        self.stopping.store(true, Ordering::Release);
        self.drop_keys(why);
        self.detach();
        self.exit_if_held_open(Duration::from_secs(2), crate::exit::OK);
    }

    /// True once a stop (not a revocation or `kmsfs lock`) has locked the mount.
    pub fn stopped(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// After a lock: if files held open keep the detached mount alive, the daemon does not
    /// wait for them. It exits with `status`, which aborts the FUSE connection (their next
    /// access fails).
    pub fn exit_if_held_open(&self, wait: Duration, status: i32) {
        let ended = self.session_ended.clone();
        let volume_id = self.volume_id.clone();
        let _ = std::thread::Builder::new()
            .name("kmsfs-lock-exit".into())
            .spawn(move || {
                std::thread::sleep(wait);
                if !ended.load(Ordering::Acquire) {
                    log::warn!("files are still open on the locked mount: aborting the FUSE connection");
                    crate::audit::event(
                        "unmounted",
                        json!({"volume_id": volume_id, "outcome": "locked, connection aborted"}),
                    );
                    crate::notify::notify("STOPPING=1");
                    std::process::exit(status);
                }
            });
    }

    pub fn locked_reason(&self) -> Option<String> {
        self.locked.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_health(&self, h: String) {
        self.health.set(h);
    }

    /// The KMS's health as status and metrics show it: the last call's outcome, unless that
    /// was "ok" and a call has gone unanswered for [`UNANSWERED_AFTER`] since. A KMS that
    /// hangs (a stopped process, a partition that drops packets) answers nothing, so without
    /// this it would read "ok" for as long as it hangs.
    pub fn health_now(&self) -> String {
        let last = self.health.get();
        match self.fs.stats.kms_unanswered.oldest() {
            Some((n, age)) if last == "ok" && age >= UNANSWERED_AFTER => format!(
                "waiting: {n} call{} unanswered, the oldest for {:.1} s",
                if n == 1 { "" } else { "s" },
                age.as_secs_f64()
            ),
            _ => last,
        }
    }
}

/// A call unanswered this long makes the health "waiting": forty times the farthest KMS we
/// plan for (25 ms), and shorter than the retry budget of one that refuses.
pub const UNANSWERED_AFTER: Duration = Duration::from_secs(1);

/// The outcome of the last call to the KMS, set as each call ends: "ok", "denied: …" or
/// "unreachable: …" (`kmsfs status` shows [`MountState::health_now`]).
pub struct Health(Mutex<String>);

impl Default for Health {
    fn default() -> Self {
        Health(Mutex::new("ok".into()))
    }
}

impl Health {
    /// Records an outcome; true if it differs from the last one.
    pub fn set(&self, h: String) -> bool {
        let mut cur = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if *cur == h {
            return false;
        }
        crate::notify::notify(&format!("STATUS=KMS {h}"));
        *cur = h;
        true
    }

    pub fn get(&self) -> String {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl crate::control::Control for MountState {
    fn status(&self) -> Value {
        let st = &self.fs.stats;
        let (prefetch_used, prefetch_unused) = self.fs.prefetch_outcomes();
        json!({
            "mountpoint": self.mountpoint,
            "backing": self.backing,
            "volume_id": self.volume_id,
            "block_size": self.fs.layout().block_size(),
            "backend": self.kms.describe().backend,
            "key": self.key_ref,
            "key_version": *self.key_version.lock().unwrap_or_else(|p| p.into_inner()),
            "kms_health": self.health_now(),
            "kms_unanswered": self.fs.stats.kms_unanswered.oldest().map(|(n, age)| json!({
                "calls": n, "oldest_secs": (age.as_secs_f64() * 1000.0).round() / 1000.0,
            })),
            // KMS nodes that hung lately and are not asked meanwhile (HA clusters).
            "kms_set_aside": self.kms.set_aside().iter().map(|n| json!({
                "addr": n.addr, "why": n.why, "secs_left": n.secs_left,
            })).collect::<Vec<_>>(),
            "locked": self.locked_reason(),
            "uptime_secs": self.started.elapsed().as_secs(),
            "cached_keys": self.fs.cached_keys(),
            "counters": {
                "kms_calls": st.kms_calls.load(Ordering::Relaxed),
                "kms_requests": self.kms.request_count(),
                "cache_hits": st.cache_hits.load(Ordering::Relaxed),
                "cache_misses": st.cache_misses.load(Ordering::Relaxed),
                "kms_joined": st.kms_joined.load(Ordering::Relaxed),
                "bytes_read": st.bytes_read.load(Ordering::Relaxed),
                "bytes_written": st.bytes_written.load(Ordering::Relaxed),
                "auth_failures": st.auth_failures.load(Ordering::Relaxed),
                "prefetched": st.prefetched.load(Ordering::Relaxed),
                "prefetch_used": prefetch_used,
                "prefetch_evicted_unused": prefetch_unused,
                // Blocks a small read decrypted, handed to the page cache whole or not.
                "page_fill": {
                    "stored": self.page_fill.counts.stored.load(Ordering::Relaxed),
                    "voided": self.page_fill.counts.voided.load(Ordering::Relaxed),
                    "dropped": self.page_fill.counts.dropped.load(Ordering::Relaxed),
                },
            },
            "policy": self.fs.access().status(),
        })
    }

    fn lock(&self, who: &str) {
        self.drop_keys(&format!("locked by {who}"));
    }

    fn reload(&self) -> Value {
        MountState::reload(self)
    }

    fn detach(&self) {
        MountState::detach(self);
        self.exit_if_held_open(Duration::from_secs(2), crate::exit::LOCKED);
    }
}
