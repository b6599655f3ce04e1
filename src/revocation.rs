//! Revocation: the watcher that checks the mount's access to the KMS, and the lock that
//! follows when access is gone (or an admin runs `kmsfs lock`): every key is dropped and
//! wiped, every further operation fails with ENOKEY, the kernel's cached plaintext is
//! invalidated, and the mount is detached so the daemon exits.
//!
//! A *denied* answer locks at once. An *unreachable* KMS keeps serving files whose keys are
//! cached (new opens fail with EIO) and locks only when it has been unreachable for longer
//! than the grace period.

use crate::fs::KmsEvents;
use crate::kms::KmsError;
use crate::mount_state::{Health, MountState};
use serde_json::json;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the watcher hears about.
pub enum Signal {
    Denied(String),
    Unreachable(String),
    /// A call succeeded after one had failed: the KMS is back.
    Reachable,
    /// The session ended: stop watching.
    Stop,
    /// Lock the mount now, for this reason (a usage guard's `lock` action).
    Lock(String),
}

/// The filesystem's KMS events: the health as each call ends, and the watcher told.
pub struct Signals {
    pub tx: Mutex<Sender<Signal>>,
    pub health: Arc<Health>,
}

impl Signals {
    fn send(&self, s: Signal) {
        let _ = self.tx.lock().unwrap_or_else(|p| p.into_inner()).send(s);
    }
}

impl KmsEvents for Signals {
    fn denied(&self, why: &str) {
        self.health.set(format!("denied: {why}"));
        self.send(Signal::Denied(why.into()));
    }

    fn unreachable(&self, why: &str) {
        self.health.set(format!("unreachable: {why}"));
        self.send(Signal::Unreachable(why.into()));
    }

    fn lock(&self, why: &str) {
        self.send(Signal::Lock(why.into()));
    }

    fn ok(&self) {
        // Only a change is news to the watcher: most calls succeed.
        if self.health.set("ok".into()) {
            self.send(Signal::Reachable);
        }
    }
}

pub struct WatchSettings {
    /// How often to prove access to the KMS.
    pub interval: Duration,
    /// How long an unreachable KMS is tolerated before the mount locks.
    pub grace: Duration,
}

/// Locks and makes sure the daemon exits soon after.
fn lock_and_exit(state: &MountState, why: &str) {
    state.lock(why);
    state.exit_if_held_open(Duration::from_secs(2), crate::exit::LOCKED);
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
            Ok(Signal::Lock(why)) => {
                lock_and_exit(&state, &why);
                return;
            }
            // One refused unwrap might concern one file only (a retired key version): confirm
            // with an access check before locking the whole mount.
            Ok(Signal::Denied(_)) => true,
            Ok(Signal::Unreachable(why)) => {
                note_unreachable(&state, &mut unreachable_since, &why);
                false
            }
            Ok(Signal::Reachable) => {
                if unreachable_since.take().is_some() {
                    log::info!("KMS reachable again: service resumes, nothing was locked");
                    crate::audit::event("kms_reachable", json!({"outcome": "resumed"}));
                }
                false
            }
            Err(RecvTimeoutError::Timeout) => true,
        };
        if check_now {
            next_check = Instant::now() + s.interval;
            state.fs.sweep_keys();
            // A check against a hung KMS ends with the lock (the session's end included).
            let mut locked = state.fs.lock_signal();
            let checked = runtime.block_on(async {
                tokio::select! {
                    r = state.kms.check_access() => Some(r),
                    _ = locked.wait_for(|l| *l) => None,
                }
            });
            let Some(checked) = checked else { return };
            match checked {
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
