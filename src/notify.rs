//! The systemd notification protocol (sd_notify), written with std: one datagram per state
//! change to $NOTIFY_SOCKET (a path, or an abstract name starting with '@'). A no-op when the
//! daemon is not run by systemd with `Type=notify`.

use std::os::unix::net::{SocketAddr, UnixDatagram};

fn socket_addr(path: &str) -> std::io::Result<SocketAddr> {
    match path.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes())
        }
        None => SocketAddr::from_pathname(path),
    }
}

/// Sends `state` ("READY=1", "STOPPING=1", "STATUS=…") to systemd, if it is listening.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Some(path) = path.to_str() else { return };
    let sent = socket_addr(path).and_then(|addr| {
        let sock = UnixDatagram::unbound()?;
        sock.send_to_addr(state.as_bytes(), &addr)
    });
    if let Err(e) = sent {
        log::warn!("cannot notify systemd ({state}): {e}");
    }
}
