//! systemd's watchdog (`WatchdogSec=`): `WATCHDOG=1` is sent only while the FUSE loop answers.
//! A timer alone would keep a wedged daemon alive; instead each ping follows a getattr of the
//! mount's root forced through to the daemon (statx with AT_STATX_FORCE_SYNC skips the
//! kernel's attribute cache), answered within half the watchdog period. FUSE workers never
//! wait on the KMS, so a slow or dead KMS does not stop the pings; a stuck worker pool does.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The watchdog period systemd asks for, if it asks this process (`WATCHDOG_USEC`, and
/// `WATCHDOG_PID` naming us when set, as sd_watchdog_enabled(3) checks).
fn period() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// True if the FUSE loop answered a getattr of the root (an error such as ENOKEY from a
/// locked mount is an answer too; a dead connection is not).
fn fuse_answers(mountpoint: &std::path::Path) -> bool {
    use rustix::fs::{AtFlags, CWD, StatxFlags, statx};
    match statx(
        CWD,
        mountpoint,
        AtFlags::STATX_FORCE_SYNC,
        StatxFlags::BASIC_STATS,
    ) {
        Ok(_) => true,
        Err(e) => e != rustix::io::Errno::NOTCONN && e != rustix::io::Errno::NOENT,
    }
}

/// Starts the pinger if systemd asked for a watchdog; it stops once `ended` is set.
pub fn start(mountpoint: PathBuf, ended: Arc<AtomicBool>) {
    let Some(period) = period() else { return };
    // Half the period between pings, as systemd advises; a probe slower than that is late.
    let every = period / 2;
    let spawned = std::thread::Builder::new()
        .name("kmsfs-watchdog".into())
        .spawn(move || {
            while !ended.load(Ordering::Acquire) {
                let t = Instant::now();
                let answered = fuse_answers(&mountpoint);
                let took = t.elapsed();
                if answered && took < every {
                    crate::notify::notify("WATCHDOG=1");
                } else {
                    log::warn!(
                        "watchdog: the mount's root did not answer within {} ms: not pinging systemd",
                        every.as_millis()
                    );
                }
                std::thread::sleep(every.saturating_sub(took));
            }
        });
    if let Err(e) = spawned {
        log::warn!("cannot start the watchdog thread ({e}): systemd will restart the mount at WatchdogSec");
    }
}
