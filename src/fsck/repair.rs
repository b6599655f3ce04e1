//! `kmsfs fsck --repair`: moves the entries the mount cannot read into `kmsfs.lost+found/` in
//! the backing root, and appends a JSON line per move to its `report.jsonl` (original backing
//! path, new name, reasons, time). Nothing is ever deleted or overwritten (`RENAME_NOREPLACE`),
//! so a wrong verdict can be undone by moving the entry back.
//!
//! The daemon's lock is taken for the whole run: a mounted volume is refused, and a mount
//! attempted meanwhile is refused too.

use super::report::{Moved, Problem, REPORT_FILE, report_path};
use crate::exit::Fatal;
use crate::format::config::LOST_FOUND_NAME;
use crate::format::name::MAX_BACKING_NAME_LEN;
use crate::sys;
use crate::volume::{VolumeLock, lock_volume};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// How `move_one` says the new name is taken.
const EXISTS: &str = "name taken";

/// Takes the daemon's lock file (as the daemon does), refusing a mounted volume. Held until
/// the returned file is dropped.
pub fn lock(root: &Path) -> Result<File, Fatal> {
    match lock_volume(root)? {
        VolumeLock::Held(f) => Ok(f),
        VolumeLock::Busy { pid } => Err(Fatal::new(format!(
            "{} is mounted (kmsfs pid {pid}): --repair needs it unmounted; unmount it first, or \
             check it read-only without --repair",
            root.display()
        ))),
    }
}

/// The paths to move and why: every problem's quarantine list, without entries that move
/// anyway inside a directory that moves.
fn targets(problems: &[Problem]) -> BTreeMap<PathBuf, Vec<&Problem>> {
    let mut all: BTreeMap<PathBuf, Vec<&Problem>> = BTreeMap::new();
    for p in problems {
        for q in &p.quarantine {
            all.entry(q.clone()).or_default().push(p);
        }
    }
    let keys: Vec<PathBuf> = all.keys().cloned().collect();
    all.retain(|path, _| {
        !path.as_os_str().is_empty() && !path.ancestors().skip(1).any(|a| keys.iter().any(|k| k == a))
    });
    all
}

/// Moves every quarantined entry into lost+found. `keep_names`: new names may end with the
/// old backing name (only when names are encrypted: a plaintext name stays out of our output).
pub fn quarantine(root: &Path, problems: &[Problem], keep_names: bool) -> Result<Vec<Moved>, Fatal> {
    let targets = targets(problems);
    if targets.is_empty() {
        return Ok(Vec::new());
    }
    let lf_path = root.join(LOST_FOUND_NAME);
    match std::fs::DirBuilder::new().mode(0o700).create(&lf_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Fatal::new(format!("cannot create {}: {e}", lf_path.display()))),
    }
    let lost_found = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(&lf_path)
        .map_err(|e| Fatal::new(format!("cannot use {}: {e}", lf_path.display())))?;
    let mut report = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(lf_path.join(REPORT_FILE))
        .map_err(|e| Fatal::new(format!("cannot write {}: {e}", report_path().display())))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut moved = Vec::new();
    let mut parents = Vec::new();
    for (i, (from, why)) in targets.iter().enumerate() {
        let inode = std::fs::symlink_metadata(root.join(from))
            .map(|m| m.ino())
            .unwrap_or(0);
        // A name taken (by an earlier run in the same second) gets the next suffix.
        let mut result = Err(String::new());
        for dup in 0..100 {
            result = move_one(root, &lost_found, from, &new_name(now, i, dup, from, keep_names));
            if !matches!(&result, Err(e) if e.starts_with(EXISTS)) {
                break;
            }
        }
        if let Ok((to, parent)) = &result {
            parents.push(parent.clone());
            let reasons: Vec<&str> = why.iter().map(|p| p.message.as_str()).collect();
            let line = serde_json::json!({
                "time": utc_rfc3339(now),
                "original": from.to_string_lossy(),
                "moved_to": to.to_string_lossy(),
                "reason": reasons.join("; "),
                "kind": why[0].kind.as_str(),
                "file_id": why.iter().find_map(|p| p.file_id).map(|id| id.to_string()),
                "inode": inode,
            });
            writeln!(report, "{line}")
                .map_err(|e| Fatal::new(format!("cannot write {}: {e}", report_path().display())))?;
        }
        moved.push(Moved {
            from: from.clone(),
            inode,
            to: result.map(|(to, _)| to),
        });
    }
    // Durable before we say so: the report, lost+found, and every directory we moved from.
    let _ = report.sync_all();
    let _ = sys::fsync_dir(lost_found.as_fd());
    parents.sort();
    parents.dedup();
    for p in parents {
        if let Ok(d) = File::open(root.join(&p)) {
            let _ = sys::fsync_dir(d.as_fd());
        }
    }
    Ok(moved)
}

/// `<unix time>.<n>[.<dup>]` and, when allowed and short enough, `-<old backing name>`.
fn new_name(now: u64, i: usize, dup: u32, from: &Path, keep_names: bool) -> OsString {
    let mut name = OsString::from(format!("{now}.{i:04}"));
    if dup > 0 {
        name.push(format!(".{dup}"));
    }
    if let Some(base) = from.file_name()
        && keep_names
        && name.len() + 1 + base.len() <= MAX_BACKING_NAME_LEN
    {
        name.push("-");
        name.push(base);
    }
    name
}

/// Renames `root/from` into lost+found as `name`, never over an existing entry. Returns the
/// new path and the parent directory it left (both relative to the root).
fn move_one(
    root: &Path,
    lost_found: &File,
    from: &Path,
    name: &OsString,
) -> Result<(PathBuf, PathBuf), String> {
    let parent = from.parent().unwrap_or(Path::new("")).to_path_buf();
    let base = from.file_name().ok_or("no file name")?;
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(root.join(&parent))
        .map_err(|e| e.to_string())?;
    sys::renameat2(
        dir.as_fd(),
        base,
        lost_found.as_fd(),
        name,
        libc::RENAME_NOREPLACE,
    )
    .map_err(|e| match e.raw_os_error() {
        Some(libc::EEXIST) => format!("{EXISTS}: {e}"),
        _ => e.to_string(),
    })?;
    Ok((Path::new(LOST_FOUND_NAME).join(name), parent))
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the epoch (civil-from-days, proleptic Gregorian).
fn utc_rfc3339(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::super::report::Kind;
    use super::*;

    #[test]
    fn utc_times() {
        assert_eq!(utc_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_rfc3339(1_790_000_000), "2026-09-21T14:13:20Z");
    }

    #[test]
    fn entries_inside_a_moved_directory_move_with_it() {
        let p = |path: &str, also: &[&str]| {
            Problem::new(Path::new(path), 1, Kind::Name, "x")
                .quarantine(&also.iter().map(PathBuf::from).collect::<Vec<_>>())
        };
        let problems = vec![p("d", &[]), p("d/e/f", &[]), p("g", &["g.name"]), p("g", &[])];
        let t = targets(&problems);
        let keys: Vec<_> = t.keys().map(|k| k.to_string_lossy().into_owned()).collect();
        assert_eq!(keys, ["d", "g", "g.name"]);
        assert_eq!(t[Path::new("g")].len(), 2);
    }

    #[test]
    fn quarantine_moves_and_never_overwrites() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/bad"), b"1").unwrap();
        let problems =
            vec![Problem::new(Path::new("sub/bad"), 1, Kind::Header, "bad header").quarantine(&[])];
        let moved = quarantine(root, &problems, true).unwrap();
        let to = moved[0].to.clone().unwrap();
        assert!(to.to_string_lossy().ends_with("-bad"));
        assert_eq!(std::fs::read(root.join(&to)).unwrap(), b"1");
        assert!(!root.join("sub/bad").exists());
        // The same target again (likely within the same second): nothing is replaced.
        std::fs::write(root.join("sub/bad"), b"2").unwrap();
        let again = quarantine(root, &problems, true).unwrap();
        let to2 = again[0].to.clone().unwrap();
        assert_ne!(to, to2);
        assert_eq!(std::fs::read(root.join(&to)).unwrap(), b"1");
        let report = std::fs::read_to_string(root.join(report_path())).unwrap();
        assert_eq!(report.lines().count(), 2);
        let line: serde_json::Value = serde_json::from_str(report.lines().next().unwrap()).unwrap();
        assert_eq!(line["original"], "sub/bad");
        assert_eq!(line["reason"], "bad header");
    }
}
