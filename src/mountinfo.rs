//! Reading /proc/self/mountinfo: which mounts are kmsfs's, and their backing directories.

use crate::format::config::CONFIG_FILE_NAME;
use std::path::{Path, PathBuf};

/// One line of mountinfo: device, mountpoint, filesystem type, source (all unescaped).
struct MountLine {
    /// `major:minor`, which also names the mount's backing device info in /sys/class/bdi.
    device: String,
    mountpoint: String,
    fstype: String,
    source: String,
}

fn parse_line(line: &str) -> Option<MountLine> {
    let (left, right) = line.split_once(" - ")?;
    let mut l = left.split(' ');
    let device = l.nth(2)?;
    let mp = l.nth(1)?;
    let mut r = right.split(' ');
    let fstype = r.next()?;
    let source = r.next()?;
    Some(MountLine {
        device: device.to_owned(),
        mountpoint: unescape(mp),
        fstype: fstype.to_owned(),
        source: unescape(source),
    })
}

fn lines() -> Vec<MountLine> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(parse_line)
        .collect()
}

/// Finds the backing directory of a kmsfs mount from /proc/self/mountinfo.
pub fn backing_of_mount(mountpoint: &Path) -> Option<PathBuf> {
    let target = mountpoint.to_str()?;
    lines().into_iter().rev().find_map(|m| {
        // fuser mounts with type "fuse"; a kmsfs source is a directory with a volume config.
        let source = PathBuf::from(&m.source);
        (m.fstype.starts_with("fuse") && m.mountpoint == target && source.join(CONFIG_FILE_NAME).is_file())
            .then_some(source)
    })
}

/// The mountpoint `path` names, found without any system call on the path itself: a call on
/// a mountpoint goes to its filesystem, and a daemon whose workers all wait (on a hung KMS,
/// say) must still answer `kmsfs status` and `kmsfs lock`. Only the parent is resolved
/// (symlinks, `..`); the last component is compared as text with /proc/self/mountinfo. A path
/// that matches no mount that way (its last component a symlink, or `..`) is resolved in full.
pub fn resolve_mountpoint(path: &Path) -> std::io::Result<PathBuf> {
    let abs = std::path::absolute(path)?;
    let mounts: Vec<String> = lines().into_iter().map(|m| m.mountpoint).collect();
    if let (Some(parent), Some(name)) = (abs.parent(), abs.file_name())
        && let Ok(parent) = std::fs::canonicalize(parent)
        && let Some(found) = match_mount(&parent.join(name), &mounts)
    {
        return Ok(found);
    }
    if abs.parent().is_none() {
        return Ok(abs);
    }
    std::fs::canonicalize(&abs)
}

/// `candidate` if it is one of `mounts`, exactly as text.
fn match_mount(candidate: &Path, mounts: &[String]) -> Option<PathBuf> {
    let c = candidate.to_str()?;
    mounts.iter().any(|m| m == c).then(|| candidate.to_path_buf())
}

/// The `major:minor` device of the newest FUSE mount at `mountpoint`, read without any system
/// call on the mountpoint itself (its daemon may not be answering yet).
pub fn fuse_device(mountpoint: &Path) -> Option<String> {
    let target = mountpoint.to_str()?;
    lines()
        .into_iter()
        .rev()
        .find(|m| m.fstype.starts_with("fuse") && m.mountpoint == target)
        .map(|m| m.device)
}

/// Mountpoints of FUSE mounts, newest last (the caller checks which are kmsfs's).
pub fn fuse_mountpoints() -> Vec<PathBuf> {
    lines()
        .into_iter()
        .filter(|m| m.fstype == "fuse" || m.fstype.starts_with("fuse."))
        .map(|m| PathBuf::from(m.mountpoint))
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_unescapes_a_line() {
        let line = "36 35 0:42 / /mnt/my\\040media rw,nosuid - fuse /srv/back\\040ing rw,user_id=0";
        let m = parse_line(line).unwrap();
        assert_eq!(m.device, "0:42");
        assert_eq!(m.mountpoint, "/mnt/my media");
        assert_eq!(m.fstype, "fuse");
        assert_eq!(m.source, "/srv/back ing");
        assert!(parse_line("garbage").is_none());
        assert_eq!(unescape("a\\134b"), "a\\b");
    }

    #[test]
    fn a_mountpoint_is_found_as_text() {
        let mounts = vec!["/".to_owned(), "/mnt/my media".to_owned()];
        assert_eq!(
            match_mount(Path::new("/mnt/my media"), &mounts),
            Some(PathBuf::from("/mnt/my media"))
        );
        assert_eq!(match_mount(Path::new("/mnt/my"), &mounts), None);
        // The root is a mount here, and resolving it touches nothing.
        assert_eq!(resolve_mountpoint(Path::new("/")).unwrap(), PathBuf::from("/"));
        // A path under a symlinked parent resolves through it.
        let d = tempfile::tempdir().unwrap();
        let real = d.path().canonicalize().unwrap();
        std::os::unix::fs::symlink(&real, real.join("link")).unwrap();
        std::fs::create_dir(real.join("m")).unwrap();
        assert_eq!(resolve_mountpoint(&real.join("link/m")).unwrap(), real.join("m"));
    }
}
