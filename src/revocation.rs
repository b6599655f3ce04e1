//! Revocation: the watcher that checks the mount's access to the KMS, and the lock that
//! follows when access is gone (or an admin runs `kmsfs lock`): every key is dropped and
//! wiped, every further operation fails with ENOKEY, the kernel's cached plaintext is
//! invalidated, and the mount is detached so the daemon exits.
//!
//! A *denied* answer locks at once. An *unreachable* KMS keeps serving files whose keys are
//! cached (new opens fail with EIO) and locks only when it has been unreachable for longer
//! than the grace period.

use crate::fs::{Fs, KmsEvents};
use crate::kms::{Kms, KmsBackend, KmsError};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// What the watcher hears about.
pub enum Signal {
    Denied(String),
    Unreachable(String),
    /// The session ended: stop watching.
    Stop,
}

/// The filesystem's KMS events, passed on to the watcher.
pub struct Signals(pub Mutex<Sender<Signal>>);

impl KmsEvents for Signals {
    fn denied(&self, why: &str) {
        let _ = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Signal::Denied(why.into()));
    }

    fn unreachable(&self, why: &str) {
        let _ = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Signal::Unreachable(why.into()));
    }
}

pub struct WatchSettings {
    /// How often to prove access to the KMS.
    pub interval: Duration,
    /// How long an unreachable KMS is tolerated before the mount locks.
    pub grace: Duration,
}

/// Everything about a live mount that status and lock need.
pub struct MountState {
    pub fs: Arc<Fs>,
    pub kms: Arc<Kms>,
    pub mountpoint: PathBuf,
    pub backing: PathBuf,
    pub volume_id: String,
    pub key_ref: String,
    pub key_version: Mutex<u32>,
    /// Set once the FUSE session exists: tells the kernel to drop cached pages.
    pub notifier: OnceLock<fuser::Notifier>,
    pub started: Instant,
    /// The last access check: "ok", "denied: …", "unreachable since … : …".
    pub health: Mutex<String>,
    /// Why the mount was locked, once it is.
    pub locked: Mutex<Option<String>>,
    /// Set when the FUSE session has ended.
    pub session_ended: Arc<std::sync::atomic::AtomicBool>,
}

impl MountState {
    /// Locks the mount (idempotent): keys dropped and wiped, ENOKEY from now on, kernel caches
    /// invalidated (mapped pages included), the mount detached so the daemon can exit.
    pub fn lock(&self, why: &str) {
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
        if let Kms::OpenBao(k) = &*self.kms {
            k.clear_pool();
        }
        if let Some(n) = self.notifier.get() {
            for ino in inodes {
                // Offset 0, length -1: the whole file's cached pages, mapped ones too.
                let _ = n.inval_inode(fuser::INodeNo(ino), 0, -1);
            }
        }
        crate::audit::event("locked", json!({"reason": why}));
        // Lazily: open files may be busy; the session ends when the kernel lets go.
        if let Err(e) = crate::sys::umount(self.mountpoint.as_os_str(), true) {
            log::error!("cannot detach {} after locking: {e}", self.mountpoint.display());
        }
    }

    /// After a lock: if files held open keep the detached mount alive, the daemon does not
    /// wait for them. It exits, which aborts the FUSE connection (their next access fails).
    pub fn exit_if_held_open(&self, wait: Duration) {
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
                    std::process::exit(crate::daemon::EXIT_LOCKED);
                }
            });
    }

    pub fn locked_reason(&self) -> Option<String> {
        self.locked.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_health(&self, h: String) {
        let mut cur = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if *cur != h {
            crate::notify::notify(&format!("STATUS=KMS {h}"));
            *cur = h;
        }
    }
}

impl crate::control::Control for MountState {
    fn status(&self) -> Value {
        let st = &self.fs.stats;
        json!({
            "mountpoint": self.mountpoint,
            "backing": self.backing,
            "volume_id": self.volume_id,
            "backend": match &*self.kms { Kms::Local(_) => "local", Kms::OpenBao(_) => "openbao" },
            "key": self.key_ref,
            "key_version": *self.key_version.lock().unwrap_or_else(|p| p.into_inner()),
            "kms_health": *self.health.lock().unwrap_or_else(|p| p.into_inner()),
            "locked": self.locked_reason(),
            "uptime_secs": self.started.elapsed().as_secs(),
            "cached_keys": self.fs.cached_keys(),
            "counters": {
                "kms_calls": st.kms_calls.load(Ordering::Relaxed),
                "kms_requests": self.kms.request_count(),
                "cache_hits": st.cache_hits.load(Ordering::Relaxed),
                "cache_misses": st.cache_misses.load(Ordering::Relaxed),
                "bytes_read": st.bytes_read.load(Ordering::Relaxed),
                "bytes_written": st.bytes_written.load(Ordering::Relaxed),
                "auth_failures": st.auth_failures.load(Ordering::Relaxed),
            },
        })
    }

    fn lock(&self, who: &str) {
        MountState::lock(self, &format!("locked by {who}"));
        self.exit_if_held_open(Duration::from_secs(2));
    }
}

/// Locks and makes sure the daemon exits soon after.
fn lock_and_exit(state: &MountState, why: &str) {
    state.lock(why);
    state.exit_if_held_open(Duration::from_secs(2));
}

/// The watcher loop: runs until the session stops or the mount locks.
pub fn watch(
    state: Arc<MountState>,
    rx: Receiver<Signal>,
    runtime: tokio::runtime::Handle,
    s: WatchSettings,
) {
    let mut unreachable_since: Option<Instant> = None;
    let note_unreachable = |state: &MountState, since: &mut Option<Instant>, why: &str| {
        if since.is_none() {
            log::warn!(
                "KMS unreachable ({why}): files whose keys are cached keep working, new opens fail; \
                 the mount locks if this lasts {} s",
                s.grace.as_secs()
            );
            crate::audit::event("kms_unreachable", json!({"outcome": "grace period started"}));
            *since = Some(Instant::now());
        }
        state.set_health(format!("unreachable: {why}"));
    };
    // Checks run on a fixed schedule, whatever signals arrive in between.
    let mut next_check = Instant::now() + s.interval;
    loop {
        let wait = next_check.saturating_duration_since(Instant::now());
        let check_now = match rx.recv_timeout(wait) {
            Ok(Signal::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            // One refused unwrap might concern one file only (a retired key version): confirm
            // with an access check before locking the whole mount.
            Ok(Signal::Denied(_)) => true,
            Ok(Signal::Unreachable(why)) => {
                note_unreachable(&state, &mut unreachable_since, &why);
                false
            }
            Err(RecvTimeoutError::Timeout) => true,
        };
        if check_now {
            next_check = Instant::now() + s.interval;
            state.fs.sweep_keys();
            match runtime.block_on(state.kms.check_access()) {
                Ok(st) => {
                    *state.key_version.lock().unwrap_or_else(|p| p.into_inner()) = st.current_version;
                    if unreachable_since.take().is_some() {
                        log::info!("KMS reachable again: service resumes, nothing was locked");
                        crate::audit::event("kms_reachable", json!({"outcome": "resumed"}));
                    }
                    state.set_health("ok".into());
                }
                Err(KmsError::Denied(why)) => {
                    state.set_health(format!("denied: {why}"));
                    crate::audit::event("kms_denied", json!({"outcome": "locking"}));
                    lock_and_exit(&state, &format!("the KMS denied access ({why})"));
                    return;
                }
                // Unreachable, or answering in a way that makes the key unusable (transit
                // mount gone, server misconfigured): both run out the grace period.
                Err(e) => note_unreachable(&state, &mut unreachable_since, &e.to_string()),
            }
        }
        if let Some(since) = unreachable_since
            && since.elapsed() >= s.grace
        {
            lock_and_exit(
                &state,
                &format!(
                    "the KMS has been unreachable for {} s (grace period over)",
                    since.elapsed().as_secs()
                ),
            );
            return;
        }
        if state.fs.is_locked() {
            return;
        }
    }
}
