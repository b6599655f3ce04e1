//! The per-mount control socket: `kmsfs status` and `kmsfs lock` talk to the daemon here.
//!
//! One JSON request line, one JSON answer line. The socket lives in /run/kmsfs (mode 0700),
//! is mode 0600, and the server also checks the caller's uid (SO_PEERCRED): only the
//! daemon's own user (root, normally) may ask. The server reaches the mount through the
//! `Control` trait, so it knows nothing of the filesystem.

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where control sockets live.
pub const SOCKET_DIR: &str = "/run/kmsfs";

/// What the control socket can ask of a mount.
pub trait Control: Send + Sync {
    fn status(&self) -> Value;
    /// Locks the mount: every key dropped, all I/O refused from now on; `who` says who asked
    /// (for the log). Waits for nothing: not the KMS, not the kernel.
    fn lock(&self, who: &str);
    /// After `lock` has been answered: invalidates the kernel's caches and detaches the mount,
    /// so that the daemon exits.
    fn detach(&self);
    /// Reloads the access policy and reopens the audit log: `{"policy": summary or null}`,
    /// or `{"error": why}` (the policy in force stays).
    fn reload(&self) -> Value;
}

/// A mountpoint's name in file names, escaped as systemd does: '/' becomes '-', and '-' and
/// anything but ASCII letters, digits, '_' and '.' become `\xNN`, so two paths never share
/// a name.
pub fn escape(mountpoint: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let bytes = mountpoint.as_os_str().as_bytes();
    let trimmed = bytes.strip_prefix(b"/").unwrap_or(bytes);
    let mut out = String::with_capacity(trimmed.len());
    for &b in trimmed {
        match b {
            b'/' => out.push('-'),
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out
}

pub fn socket_path(mountpoint: &Path) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{}.sock", escape(mountpoint)))
}

/// Binds the control socket and serves it on a thread until the process exits.
pub fn serve(mountpoint: &Path, control: Arc<dyn Control>) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(SOCKET_DIR)?;
    let path = socket_path(mountpoint);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let me = crate::sys::geteuid();
    std::thread::Builder::new()
        .name("kmsfs-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                // A client that connects and says nothing must not block `kmsfs lock`.
                let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(2)));
                let _ = conn.set_write_timeout(Some(std::time::Duration::from_secs(2)));
                if let Err(e) = answer(conn, &*control, me) {
                    log::warn!("control socket: {e}");
                }
            }
        })?;
    Ok(path)
}

fn answer(mut conn: UnixStream, control: &dyn Control, me: u32) -> std::io::Result<()> {
    let (pid, uid) = crate::sys::peer_credentials(&conn)?;
    let mut line = String::new();
    BufReader::new(&conn).take(4096).read_line(&mut line)?;
    let req: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
    let reply = if uid != me && uid != 0 {
        json!({"error": "permission denied"})
    } else {
        match req.get("cmd").and_then(Value::as_str) {
            Some("status") => control.status(),
            Some("reload") => control.reload(),
            Some("lock") => {
                // The keys go first, then the answer: once the client hears "locked", every
                // key is gone and all I/O fails with ENOKEY. Only then is the mount detached
                // (the daemon may exit as soon as it is, and may take a while to).
                control.lock(&format!("uid {uid} pid {pid} (kmsfs lock)"));
                let answered = writeln!(conn, "{}", json!({"locked": true}));
                control.detach();
                return answered;
            }
            _ => json!({"error": "unknown request"}),
        }
    };
    writeln!(conn, "{reply}")
}

use std::io::Read;

/// How long a client waits for the daemon's answer.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Sends one request to the mount at `mountpoint`.
pub fn request(mountpoint: &Path, cmd: &str) -> std::io::Result<Value> {
    let path = socket_path(mountpoint);
    let mut s = UnixStream::connect(&path)?;
    // The server answers from its own thread and waits for nothing; a daemon that says
    // nothing for this long is stopped or wedged, and the caller must not hang with it.
    s.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    s.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    writeln!(s, "{}", json!({ "cmd": cmd }))?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
