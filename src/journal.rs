//! journald's native protocol, written with std: one datagram per entry to journald's socket,
//! each field as `NAME\n`, its length (u64, little-endian), its bytes and `\n`, the form that
//! takes any value. Audit events go there as `KMSFS_*` fields, so that a SIEM reading the
//! journal gets them structured (`journalctl -o json SYSLOG_IDENTIFIER=kmsfs-audit`).

use serde_json::Value;
use std::os::unix::net::UnixDatagram;

/// journald's socket; `KMSFS_JOURNAL_SOCKET` overrides it (a journald in a namespace).
fn socket_path() -> std::path::PathBuf {
    std::env::var_os("KMSFS_JOURNAL_SOCKET")
        .map(Into::into)
        .unwrap_or_else(|| "/run/systemd/journal/socket".into())
}

/// One entry as journald reads it.
pub fn encode(fields: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.extend_from_slice(name.as_bytes());
        out.push(b'\n');
        out.extend_from_slice(&(value.len() as u64).to_le_bytes());
        out.extend_from_slice(value.as_bytes());
        out.push(b'\n');
    }
    out
}

/// A JSON key as a journal field name: upper case letters, digits and '_'.
fn field_name(key: &str) -> String {
    let name: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("KMSFS_{name}")
}

/// The fields of one audit event (`line` is its JSON).
pub fn audit_fields(kind: &str, line: &str) -> Vec<(String, String)> {
    // Alerts and denials are warnings (4), everything else a notice (5).
    let priority = if matches!(kind, "alert" | "denied" | "locked" | "kms_denied") {
        "4"
    } else {
        "5"
    };
    let mut fields = vec![
        ("MESSAGE".to_owned(), line.to_owned()),
        ("PRIORITY".to_owned(), priority.to_owned()),
        ("SYSLOG_IDENTIFIER".to_owned(), "kmsfs-audit".to_owned()),
    ];
    if let Ok(Value::Object(m)) = serde_json::from_str::<Value>(line) {
        for (k, v) in m {
            let v = match v {
                Value::String(s) => s,
                Value::Null => continue,
                other => other.to_string(),
            };
            fields.push((field_name(&k), v));
        }
    }
    fields
}

/// Sends one audit event; a journal that is not there is skipped quietly (the event is in
/// the file and the daemon's log anyway).
pub fn send(kind: &str, line: &str) {
    let entry = encode(&audit_fields(kind, line));
    if let Ok(sock) = UnixDatagram::unbound() {
        let _ = sock.send_to(&entry, socket_path());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_length_prefixed_and_named_in_capitals() {
        let f = audit_fields(
            "denied",
            r#"{"event":"denied","uid":7,"exe":"/bin/cat","rule":null}"#,
        );
        assert!(f.contains(&("KMSFS_UID".into(), "7".into())));
        assert!(f.contains(&("KMSFS_EXE".into(), "/bin/cat".into())));
        assert!(f.contains(&("PRIORITY".into(), "4".into())));
        assert!(!f.iter().any(|(k, _)| k == "KMSFS_RULE"), "nulls are left out");
        let e = encode(&[("A_B".into(), "x\ny".into())]);
        assert_eq!(e, b"A_B\n\x03\0\0\0\0\0\0\0x\ny\n");
    }
}
