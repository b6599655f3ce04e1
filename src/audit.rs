//! The audit log of key events: JSON lines, to a file and to the daemon's log (stderr, so
//! journald under systemd). It records what happened to which key, never a key, a file name
//! or content: files appear by their random file id.

use serde_json::{Map, Value, json};
use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

/// The audit file, if one was configured. Taken briefly per event.
static FILE: OnceLock<Mutex<std::fs::File>> = OnceLock::new();

/// Opens (appends to) the audit file, mode 0600.
pub fn open(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    let _ = FILE.set(Mutex::new(f));
    Ok(())
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Records one event. `fields` must hold only ids, versions, outcomes and timings.
pub fn event(kind: &str, fields: Value) {
    let mut m = Map::new();
    m.insert("time".into(), json!((now() * 1000.0).round() / 1000.0));
    m.insert("event".into(), json!(kind));
    if let Value::Object(extra) = fields {
        m.extend(extra);
    }
    let line = Value::Object(m).to_string();
    log::info!(target: "kmsfs::audit", "{line}");
    if let Some(f) = FILE.get() {
        let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(f, "{line}");
    }
}
