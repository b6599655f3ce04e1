//! `kmsfs fsck --repair`: moves the entries the mount cannot read into `kmsfs.lost+found/` in
//! the backing root, and appends a JSON line per move to its `report.jsonl` (original backing
//! path, new name, reasons, time). Nothing is ever deleted or overwritten (`RENAME_NOREPLACE`),
//! so a wrong verdict can be undone by moving the entry back.
//!
//! The daemon's lock is taken for the whole run: a mounted volume is refused, and a mount
//! attempted meanwhile is refused too.
//!
//! The backing directory is not ours: lost+found, its report and every directory an entry
//! moves from are opened relative to the root, following no symlink (a planted link makes the
//! run stop with one line before anything moves, or leaves that one entry where it is), and
//! the report is appended to only if it is a regular file with no other name.

use super::report::{Moved, Problem, REPORT_FILE, report_path};
use crate::exit::Fatal;
use crate::format::config::LOST_FOUND_NAME;
use crate::format::name::MAX_BACKING_NAME_LEN;
use crate::sys;
use crate::volume::{VolumeLock, lock_volume};
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
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
    let root_dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(root)
        .map_err(|e| Fatal::new(format!("cannot open {}: {e}", root.display())))?;
    let root_fd = root_dir.as_fd();
    let (lost_found, mut report) = open_lost_found(root, root_fd)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut moved = Vec::new();
    let mut parents = Vec::new();
    for (i, (from, why)) in targets.iter().enumerate() {
        let inode = sys::stat_beneath(root_fd, from).map(|st| st.st_ino).unwrap_or(0);
        // A name taken (by an earlier run in the same second) gets the next suffix.
        let mut result = Err(String::new());
        for dup in 0..100 {
            let name = new_name(now, i, dup, from, keep_names);
            result = move_one(root_fd, lost_found.as_fd(), from, &name);
            if !matches!(&result, Err(e) if e.starts_with(EXISTS)) {
                break;
            }
        }
        if let Ok((to, parent)) = &result {
            parents.push(parent.clone());
            let reasons: Vec<&str> = why.iter().map(|p| p.message.as_str()).collect();
            let line = serde_json::json!({
                "time": crate::time::utc_rfc3339(now),
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
        if let Ok(d) = sys::open_dir_beneath(root_fd, &p) {
            let _ = sys::fsync_dir(d.as_fd());
        }
    }
    Ok(moved)
}

/// Creates (or finds) lost+found in the root and opens its report for appending. Refuses, with
/// one line and before anything is moved, a lost+found that is not a directory of its own (a
/// symlink to a directory elsewhere) and a report that is not a regular file with one name (a
/// symlink, a FIFO, a hard link to another file).
fn open_lost_found(root: &Path, root_fd: BorrowedFd<'_>) -> Result<(OwnedFd, File), Fatal> {
    let lf_path = root.join(LOST_FOUND_NAME);
    let lf = OsStr::new(LOST_FOUND_NAME);
    let refuse = |path: &Path, what: &str| {
        Fatal::new(format!(
            "refusing {}: {what} (fsck --repair writes only into a directory and file of its own, \
             never through a link); nothing was moved: move it aside (`mv {} {}.suspect`) and run \
             `kmsfs fsck --repair` again",
            path.display(),
            path.display(),
            path.display()
        ))
    };
    match sys::mkdirat(root_fd, lf, 0o700) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Fatal::new(format!("cannot create {}: {e}", lf_path.display()))),
    }
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_NONBLOCK;
    let lost_found = sys::openat(root_fd, lf, flags, 0).map_err(|e| match sys::fstatat(root_fd, lf) {
        Ok(st) if st.st_mode & libc::S_IFMT != libc::S_IFDIR => refuse(
            &lf_path,
            &format!("it is {}, not a directory", sys::kind_name(st.st_mode)),
        ),
        _ => Fatal::new(format!("cannot use {}: {e}", lf_path.display())),
    })?;
    let report_file = lf_path.join(REPORT_FILE);
    let flags = libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT;
    let (fd, st) = sys::open_regular_at(lost_found.as_fd(), OsStr::new(REPORT_FILE), flags, 0o600).map_err(
        |e| match e.kind() {
            std::io::ErrorKind::InvalidData => refuse(&report_file, &e.to_string()),
            _ => Fatal::new(format!("cannot write {}: {e}", report_path().display())),
        },
    )?;
    if st.st_nlink != 1 {
        return Err(refuse(
            &report_file,
            &format!("it has {} hard links", st.st_nlink),
        ));
    }
    Ok((lost_found, File::from(fd)))
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
    root: BorrowedFd<'_>,
    lost_found: BorrowedFd<'_>,
    from: &Path,
    name: &OsString,
) -> Result<(PathBuf, PathBuf), String> {
    let parent = from.parent().unwrap_or(Path::new("")).to_path_buf();
    let base = from.file_name().ok_or("no file name")?;
    // Entered from the root, following no symlink: a directory swapped for a link since the
    // walk must not make us move something from outside the volume.
    let dir = sys::open_dir_beneath(root, &parent).map_err(|e| e.to_string())?;
    sys::renameat2(dir.as_fd(), base, lost_found, name, libc::RENAME_NOREPLACE).map_err(|e| {
        match e.raw_os_error() {
            Some(libc::EEXIST) => format!("{EXISTS}: {e}"),
            _ => e.to_string(),
        }
    })?;
    Ok((Path::new(LOST_FOUND_NAME).join(name), parent))
}

#[cfg(test)]
mod tests {
    use super::super::report::Kind;
    use super::*;

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
