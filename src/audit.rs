//! The audit log of key events: JSON lines, to a file and to the daemon's log (stderr, so
//! journald under systemd), and optionally to journald as structured fields. It records what
//! happened to which key and who asked, never a key, a file name or content: files appear by
//! their random file id. The schema is in docs/audit.md; `schema` versions it.

use serde_json::{Map, Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The version of the events' shape (docs/audit.md). Fields may be added within a version.
pub const SCHEMA: u32 = 1;

/// The audit file and where it is, if one was configured. Taken briefly per event.
static FILE: Mutex<Option<(PathBuf, std::fs::File)>> = Mutex::new(None);

/// Whether events also go to journald as structured fields.
static JOURNAL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn open_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Opens (appends to) the audit file, mode 0600.
pub fn open(path: &Path) -> std::io::Result<()> {
    let f = open_file(path)?;
    *FILE.lock().unwrap_or_else(|p| p.into_inner()) = Some((path.to_path_buf(), f));
    Ok(())
}

/// Opens the audit file again (after logrotate moved it: SIGHUP, `kmsfs reload`). On failure
/// the old file stays in use.
pub fn reopen() -> std::io::Result<()> {
    let mut file = FILE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((path, f)) = &mut *file {
        *f = open_file(path)?;
    }
    Ok(())
}

/// Sends every event to journald too, as `KMSFS_*` fields.
pub fn to_journal() {
    JOURNAL.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Records one event. `fields` must hold only ids, versions, outcomes, timings and the
/// caller's identity.
pub fn event(kind: &str, fields: Value) {
    let mut m = Map::new();
    m.insert("schema".into(), json!(SCHEMA));
    m.insert("event".into(), json!(kind));
    if let Value::Object(extra) = fields {
        m.extend(extra);
    }
    let mut m = Value::Object(m);
    // The daemon's log stamps its lines itself (or journald does): no second time there.
    log::info!(target: "kmsfs::audit", "{m}");
    m["time"] = json!(crate::time::now_rfc3339_ms());
    let line = m.to_string();
    if let Some((_, f)) = &mut *FILE.lock().unwrap_or_else(|p| p.into_inner()) {
        let _ = writeln!(f, "{line}");
    }
    if JOURNAL.load(std::sync::atomic::Ordering::Relaxed) {
        crate::journal::send(kind, &line);
    }
}
