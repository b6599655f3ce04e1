//! Stopping a mount the way service managers do it: SIGTERM (or SIGINT) ends the daemon with
//! status 0 within seconds, files open or not; and starting again over what a killed daemon
//! left behind (a stale mountpoint, "Transport endpoint is not connected").

use crate::exit::Fatal;
use crate::fatal;
use crate::mount_state::MountState;
use std::path::Path;
use std::sync::Arc;

/// Waits for SIGTERM or SIGINT, then unmounts. If files are open (EBUSY), a plain unmount
/// cannot succeed until they close, and systemd would SIGKILL us at TimeoutStopSec and leave a
/// stale mount: so the daemon does what `kmsfs lock` does (keys dropped, I/O refused, mount
/// detached) and exits 0, since a stop is what was asked for.
pub async fn on_signals(state: Arc<MountState>, mut unmount: impl FnMut() -> std::io::Result<()>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        log::warn!("cannot install signal handlers; stop with `kmsfs unmount`");
        return;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    log::info!("{name}: unmounting");
    match unmount() {
        Ok(()) => {}
        Err(e) => {
            log::warn!("{name}: unmount refused ({e}): files are open; dropping the keys and detaching");
            state.stop(&format!("stopped by {name} with files open"));
        }
    }
    // Later signals change nothing: the stop is under way and ends within seconds.
    loop {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        log::info!("already stopping");
    }
}

/// A mountpoint left by a daemon that was killed answers every call with ENOTCONN. If it is a
/// kmsfs mount (by mountinfo's text; nothing on it can be called), it is detached first so the
/// new mount can go there.
pub fn clear_stale_mount(mp: &Path) -> Result<(), Fatal> {
    let stale = match std::fs::symlink_metadata(mp) {
        Err(e) => e.raw_os_error() == Some(libc::ENOTCONN),
        Ok(_) => false,
    };
    if !stale {
        return Ok(());
    }
    let found =
        crate::mountinfo::resolve_mountpoint(mp).map_err(|e| fatal!("mountpoint {}: {e}", mp.display()))?;
    let Some(backing) = crate::mountinfo::backing_of_mount(&found) else {
        return Err(fatal!(
            "mountpoint {} is a dead mount of another filesystem; detach it with `umount -l {}`",
            mp.display(),
            mp.display()
        ));
    };
    log::warn!(
        "mountpoint {} is a stale kmsfs mount of {} (its daemon was killed): detaching it",
        found.display(),
        backing.display()
    );
    crate::sys::umount(found.as_os_str(), true).map_err(|e| {
        fatal!(
            "cannot detach the stale mount at {}: {e}; try `umount -l {}`",
            found.display(),
            found.display()
        )
    })
}
