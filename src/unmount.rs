//! `kmsfs unmount`, and waiting for a daemon to let go of its volume.

use crate::exit::Fatal;
use crate::fatal;
use crate::format::config::LOCK_FILE_NAME;
use crate::sys;
use std::os::fd::AsFd;
use std::path::Path;

/// Unmounts a kmsfs mount and waits for its daemon to finish (it drops its keys on exit).
pub fn unmount(mountpoint: &Path, lazy: bool) -> Result<(), Fatal> {
    let mp = crate::mountinfo::resolve_mountpoint(mountpoint)
        .map_err(|e| fatal!("{}: {e}", mountpoint.display()))?;
    let backing = crate::mountinfo::backing_of_mount(&mp)
        .ok_or_else(|| fatal!("{} is not a kmsfs mount", mp.display()))?;
    let result = if sys::geteuid() == 0 {
        sys::umount(mp.as_os_str(), lazy)
    } else {
        let mut cmd = std::process::Command::new("fusermount3");
        cmd.arg("-u");
        if lazy {
            cmd.arg("-z");
        }
        match cmd.arg(&mp).status() {
            Ok(s) if s.success() => Ok(()),
            Ok(_) => Err(std::io::Error::from_raw_os_error(libc::EBUSY)),
            Err(e) => Err(e),
        }
    };
    result.map_err(|e| {
        if e.raw_os_error() == Some(libc::EBUSY) {
            fatal!(
                "{} is busy: close the files open in it, or use `kmsfs unmount --lazy`",
                mp.display()
            )
        } else {
            fatal!("cannot unmount {}: {e}", mp.display())
        }
    })?;
    if !wait_for_daemon_exit(&backing) {
        return Err(fatal!(
            "{} is unmounted but its daemon has not exited after 30 s",
            mp.display()
        ));
    }
    Ok(())
}

/// Waits (up to 30 s) until no daemon holds the backing directory's lock; false on timeout.
pub fn wait_for_daemon_exit(backing: &Path) -> bool {
    let gone = wait_for_daemon_exit_within(backing, std::time::Duration::from_secs(30));
    if !gone {
        log::warn!("the daemon for {} has not exited after 30 s", backing.display());
    }
    gone
}

/// Waits up to `limit` until no daemon holds the backing directory's lock; false on timeout.
pub fn wait_for_daemon_exit_within(backing: &Path, limit: std::time::Duration) -> bool {
    // The lock file sits in the backing directory: never through a link, never a FIFO.
    let Ok((f, _)) = sys::open_regular(&backing.join(LOCK_FILE_NAME), libc::O_RDONLY, 0) else {
        return true;
    };
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Ok(true) = sys::try_lock_exclusive(f.as_fd()) {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
