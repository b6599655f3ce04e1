//! `kmsfs unmount`, and waiting for a daemon to let go of its volume.

use crate::exit::Fatal;
use crate::fatal;
use crate::format::config::LOCK_FILE_NAME;
use crate::sys;
use std::os::fd::AsFd;
use std::path::Path;

/// Unmounts a kmsfs mount and waits for its daemon to finish (it drops its keys on exit).
pub fn unmount(mountpoint: &Path, lazy: bool) -> Result<(), Fatal> {
    let mp = std::fs::canonicalize(mountpoint).map_err(|e| fatal!("{}: {e}", mountpoint.display()))?;
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
    // The lock file sits in the backing directory: never through a link, never a FIFO.
    let Ok((f, _)) = sys::open_regular(&backing.join(LOCK_FILE_NAME), libc::O_RDONLY, 0) else {
        return true;
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if let Ok(true) = sys::try_lock_exclusive(f.as_fd()) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    log::warn!("the daemon for {} has not exited after 30 s", backing.display());
    false
}
