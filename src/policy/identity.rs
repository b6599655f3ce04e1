//! Who is asking: the process behind a FUSE request, as the policy matches it and the audit
//! log names it. The kernel gives uid, gid and pid with every request; the program and the
//! supplementary groups come from `/proc/PID`, read once per request and only when needed.
//!
//! The calling process is blocked in its open(2) while we look, so its `/proc` entry cannot
//! be reused under us; a request whose caller is gone (killed meanwhile, or pid 0 for
//! requests the kernel makes itself) has no program, and matches no program rule.

use serde_json::{Value, json};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The running program, as the kernel knows it: the file it was executed from (device and
/// inode, which a copy or a replacement of the binary does not share). Its path is only for
/// the log (`Identity::exe`), never matched: a path can be re-pointed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Program {
    pub dev: u64,
    pub ino: u64,
}

/// The caller of one request.
#[derive(Debug)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    program: OnceLock<Option<Program>>,
    exe: OnceLock<Option<String>>,
    groups: OnceLock<Vec<u32>>,
    /// Programs run from inside the mount are named by this, not by their path: a path in
    /// the mount is a plaintext file name, which the audit log never holds.
    mountpoint: Option<PathBuf>,
}

/// What the usage guard counts by: a user running a program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UsageKey {
    pub uid: u32,
    pub dev: u64,
    pub ino: u64,
}

impl Identity {
    pub fn new(uid: u32, gid: u32, pid: u32, mountpoint: Option<&Path>) -> Identity {
        Identity {
            uid,
            gid,
            pid,
            program: OnceLock::new(),
            exe: OnceLock::new(),
            groups: OnceLock::new(),
            mountpoint: mountpoint.map(Path::to_path_buf),
        }
    }

    /// The daemon itself (work no caller asked for).
    pub fn daemon() -> Identity {
        Identity::new(crate::sys::geteuid(), 0, std::process::id(), None)
    }

    /// The program the caller runs, or `None` if it cannot be known (the caller is gone).
    pub fn program(&self) -> Option<Program> {
        *self.program.get_or_init(|| program_of(self.pid))
    }

    /// The program's path, for the log; `None` if the caller is gone.
    pub fn exe(&self) -> Option<&str> {
        self.exe
            .get_or_init(|| exe_of(self.pid, self.mountpoint.as_deref()))
            .as_deref()
    }

    /// The caller's supplementary groups (its primary gid is `gid`).
    pub fn groups(&self) -> &[u32] {
        self.groups.get_or_init(|| groups_of(self.pid))
    }

    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups().contains(&gid)
    }

    pub fn usage_key(&self) -> UsageKey {
        let (dev, ino) = self.program().map_or((0, 0), |p| (p.dev, p.ino));
        UsageKey {
            uid: self.uid,
            dev,
            ino,
        }
    }

    /// The audit log's identity fields.
    pub fn audit_fields(&self) -> Value {
        json!({
            "uid": self.uid,
            "gid": self.gid,
            "pid": self.pid,
            "exe": self.exe(),
        })
    }
}

fn program_of(pid: u32) -> Option<Program> {
    if pid == 0 {
        return None;
    }
    // stat follows the magic link to the very file the process runs, even when its path has
    // since been replaced or deleted.
    let meta = std::fs::metadata(format!("/proc/{pid}/exe")).ok()?;
    Some(Program {
        dev: meta.dev(),
        ino: meta.ino(),
    })
}

fn exe_of(pid: u32, mountpoint: Option<&Path>) -> Option<String> {
    if pid == 0 {
        return None;
    }
    let path = std::fs::read_link(PathBuf::from(format!("/proc/{pid}/exe"))).ok()?;
    Some(match mountpoint {
        Some(mp) if path.starts_with(mp) => "(a program in the mount)".to_owned(),
        _ => path.to_string_lossy().into_owned(),
    })
}

fn groups_of(pid: u32) -> Vec<u32> {
    if pid == 0 {
        return Vec::new();
    }
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| parse_groups(&s))
        .unwrap_or_default()
}

/// The `Groups:` line of `/proc/PID/status`.
fn parse_groups(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| g.split_whitespace().filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_come_from_the_status_line() {
        let status = "Name:\tcat\nUid:\t0\t0\t0\t0\nGroups:\t4 24 27 \nVmPeak:\t1 kB\n";
        assert_eq!(parse_groups(status), vec![4, 24, 27]);
        assert_eq!(parse_groups("Groups:\t\n"), Vec::<u32>::new());
        assert_eq!(parse_groups("Name:\tx\n"), Vec::<u32>::new());
    }

    #[test]
    fn this_process_is_known_by_its_binary() {
        let me = Identity::new(0, 0, std::process::id(), None);
        let p = me.program().expect("our own program");
        let exe = std::env::current_exe().unwrap();
        assert_eq!(std::fs::metadata(&exe).unwrap().ino(), p.ino);
        assert_eq!(Identity::new(0, 0, 0, None).program(), None);
    }

    #[test]
    fn a_program_in_the_mount_is_not_named() {
        let exe = std::env::current_exe().unwrap();
        let me = Identity::new(0, 0, std::process::id(), exe.parent());
        assert_eq!(me.exe().unwrap(), "(a program in the mount)");
    }
}
