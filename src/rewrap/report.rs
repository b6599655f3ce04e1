//! What `kmsfs rewrap` tells: the key versions found and what was re-wrapped, as lines for
//! people or one JSON document (`--json`) for scripts. Built from counts only: no names, no keys.

use std::collections::BTreeMap;

/// The outcome of one run (of the count alone under `--dry-run`).
#[derive(Default)]
pub struct Outcome {
    /// The key's reference as the KMS names it.
    pub key: String,
    pub latest_version: u32,
    /// Files per key version their key is wrapped with (`None`: a version the KMS cannot tell).
    pub by_version: BTreeMap<Option<u32>, usize>,
    pub dry_run: bool,
    /// Files older than `latest_version`: what a run re-wraps.
    pub todo: usize,
    pub rewrapped: usize,
    pub failed: usize,
    /// Files skipped because their header could not be read or decoded.
    pub unreadable: usize,
    pub name_key_rewrapped: bool,
    /// Set when older keystore backups can no longer open what this run wrote.
    pub backup_needed: Option<String>,
}

impl Outcome {
    /// Before any file is re-wrapped: the versions found.
    pub fn head_lines(&self) -> Vec<String> {
        let mut out = vec![format!(
            "key {:?} is at version {}",
            self.key, self.latest_version
        )];
        for (v, n) in &self.by_version {
            out.push(match v {
                Some(v) => format!("  {n} files wrapped with version {v}"),
                None => format!("  {n} files with an unknown version"),
            });
        }
        out
    }

    /// After the run: what was done, and what to do next.
    pub fn tail_lines(&self) -> Vec<String> {
        let mut line = format!(
            "re-wrapped {} of {} files to version {}",
            self.rewrapped, self.todo, self.latest_version
        );
        if self.failed > 0 {
            line += &format!("; {} failed", self.failed);
        }
        if self.unreadable > 0 {
            line += &format!("; {} unreadable headers skipped", self.unreadable);
        }
        if self.name_key_rewrapped {
            line += "; name key re-wrapped";
        }
        let mut out = vec![line];
        out.extend(self.backup_needed.clone());
        out
    }

    /// One JSON object; `files_by_version` keys are version numbers, or "unknown".
    pub fn to_json(&self) -> serde_json::Value {
        let by_version: serde_json::Map<String, serde_json::Value> = self
            .by_version
            .iter()
            .map(|(v, n)| (v.map_or("unknown".into(), |v| v.to_string()), (*n).into()))
            .collect();
        serde_json::json!({
            "key": self.key,
            "latest_version": self.latest_version,
            "files_by_version": by_version,
            "dry_run": self.dry_run,
            "to_rewrap": self.todo,
            "rewrapped": self.rewrapped,
            "failed": self.failed,
            "unreadable_headers": self.unreadable,
            "name_key_rewrapped": self.name_key_rewrapped,
            "backup_needed": self.backup_needed,
        })
    }
}
