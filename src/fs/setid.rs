//! Clearing a file's set-user-id and set-group-id bits when an unprivileged caller changes its
//! content, as the kernel does for a local filesystem.
//!
//! The mount asks the kernel to leave this to us (FUSE_HANDLE_KILLPRIV_V2). In return the
//! kernel stops asking, before every write(2), whether the file carries a
//! `security.capability` attribute: without it each write cost a GETXATTR round trip on top
//! of its WRITE (we keep no such attribute: only `user.` ones). The kernel still asks before
//! the first write after each refresh of a file's attributes, so a file written once saves
//! nothing; a file written many times saves a request per write.
//!
//! On a WRITE the kernel says whether the caller may keep the bits (it holds CAP_FSETID). For
//! a truncate (ftruncate, `O_TRUNC`) fuser does not pass that flag on, so the caller's
//! capabilities are read from `/proc`, and only when the file has bits to clear. A chown that
//! names an owner or group needs nothing here: the backing filesystem clears the bits itself
//! when we change them. The kernel's other clearings (before a fallocate by a caller without
//! CAP_FSETID; `chown(f, -1, -1)`, which clears them on a local filesystem) reach us as a
//! SETATTR that sets nothing: the kernel sends one only when it means to clear privileges,
//! so one is taken as that.

use super::error::{FsError, FsResult};
use super::inode::{Inode, Kind};
use super::{Fs, Handle, SetAttr, SetIdRule as Rule};
use crate::sys;
use std::sync::atomic::Ordering;

/// capability(7)'s number for CAP_FSETID.
const CAP_FSETID: u32 = 4;

/// The bits a change of content clears: set-user-id, and set-group-id where group execute is
/// set too (without it the bit grants nothing on exec). This is the rule FUSE applied before
/// the daemon took it on; since Linux 6.2 a local filesystem also clears a set-group-id bit
/// without group execute when the caller is outside the file's group, which FUSE never did.
fn bits_to_clear(mode: u32) -> u32 {
    let mut clear = mode & libc::S_ISUID;
    if mode & (libc::S_ISGID | libc::S_IXGRP) == libc::S_ISGID | libc::S_IXGRP {
        clear |= libc::S_ISGID;
    }
    clear
}

/// Whether thread `pid` (FUSE names the calling thread) holds CAP_FSETID as the kernel
/// counts it: in its effective set, in our user namespace (root in a container's namespace
/// shows every capability in `/proc` but holds none over our files), and not as a kernel
/// thread (nfsd shows every capability while it drops CAP_FSETID for its clients). Anything
/// we cannot read counts as not holding it: the bits are then cleared, the safe side. The
/// caller waits for our reply, so its id cannot be reused meanwhile.
fn holds_cap_fsetid(pid: u32) -> bool {
    let ours = |path: &str| std::fs::read_link(path).ok();
    pid != 0
        && std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| cap_fsetid_in_status(&s))
        && ours(&format!("/proc/{pid}/ns/user"))
            .is_some_and(|theirs| Some(theirs) == ours("/proc/self/ns/user"))
}

/// CAP_FSETID in the `CapEff:` line of a `/proc/PID/status`, for a thread that is not a
/// kernel thread.
fn cap_fsetid_in_status(status: &str) -> bool {
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
    field("Kthread:") != Some("1")
        && field("CapEff:")
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            .is_some_and(|caps| caps & (1 << CAP_FSETID) != 0)
}

impl Fs {
    /// Called once the kernel has agreed to leave the clearing to us.
    pub fn set_clears_setid(&self) {
        self.clears_setid.store(true, Ordering::Relaxed);
    }

    pub(super) fn clears_setid(&self) -> bool {
        self.clears_setid.load(Ordering::Relaxed)
    }

    /// What a SETATTR `set` from thread `pid` does to the set-id bits.
    pub(super) fn setid_rule(&self, set: &SetAttr, pid: u32) -> Rule {
        let sets_nothing = set.mode.is_none()
            && set.uid.is_none()
            && set.gid.is_none()
            && set.size.is_none()
            && set.atime.is_none()
            && set.mtime.is_none();
        if !self.clears_setid() {
            Rule::Keep
        } else if set.size.is_some() {
            Rule::UnlessPrivileged(pid)
        } else if sets_nothing {
            Rule::Clear
        } else {
            Rule::Keep
        }
    }

    /// Before a write the kernel flagged (its caller lacks CAP_FSETID): clears the bits of the
    /// file behind `fh`. True if any were set, so the kernel's cached mode is now stale.
    pub fn clear_setid_for_write(&self, fh: u64) -> FsResult<bool> {
        let handle = self.handle(fh)?;
        let Handle::File { inode, .. } = &*handle else {
            return Err(FsError::BadHandle);
        };
        self.clear_setid(inode, None)
    }

    /// Clears the bits [`bits_to_clear`] picks from a regular file's mode; with `pid`, only if
    /// that process lacks CAP_FSETID. True if any were cleared.
    pub(super) fn clear_setid(&self, inode: &Inode, pid: Option<u32>) -> FsResult<bool> {
        if inode.kind != Kind::File {
            return Ok(false);
        }
        let st = sys::fstat(inode.fd())?;
        let clear = bits_to_clear(st.st_mode);
        if clear == 0 || pid.is_some_and(holds_cap_fsetid) {
            return Ok(false);
        }
        sys::chmod_fd(inode.fd(), st.st_mode & 0o7777 & !clear)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_group_id_goes_only_with_group_execute() {
        assert_eq!(bits_to_clear(0o6755), 0o6000);
        assert_eq!(bits_to_clear(0o4755), 0o4000);
        assert_eq!(bits_to_clear(0o2775), 0o2000);
        // Set-group-id without group execute marks mandatory locking: kept.
        assert_eq!(bits_to_clear(0o2664), 0);
        assert_eq!(bits_to_clear(0o6745), 0o4000);
        assert_eq!(bits_to_clear(0o0777), 0);
    }

    #[test]
    fn cap_fsetid_is_read_from_the_effective_set() {
        let root =
            "Name:\tsh\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\n";
        assert!(cap_fsetid_in_status(root));
        let user = "Name:\tsh\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\n";
        assert!(!cap_fsetid_in_status(user));
        // Permitted but not effective: the kernel checks the effective set.
        let dropped = "CapPrm:\t0000000000000010\nCapEff:\t0000000000000000\n";
        assert!(!cap_fsetid_in_status(dropped));
        assert!(cap_fsetid_in_status("CapEff:\t0000000000000010\n"));
        assert!(!cap_fsetid_in_status("Name:\tx\n"));
        assert!(!cap_fsetid_in_status("CapEff:\tzz\n"));
        // A kernel thread acting for a client (nfsd) shows them all.
        let nfsd = "Name:\tnfsd\nKthread:\t1\nCapEff:\t000001ffffffffff\n";
        assert!(!cap_fsetid_in_status(nfsd));
        assert!(cap_fsetid_in_status("Kthread:\t0\nCapEff:\t000001ffffffffff\n"));
    }

    #[test]
    fn this_process_is_read() {
        // The test runner runs as root here (CI and the dev machine); elsewhere it holds no
        // capabilities. Either way the answer must match our own status.
        let me = std::fs::read_to_string("/proc/self/status").unwrap();
        assert_eq!(holds_cap_fsetid(std::process::id()), cap_fsetid_in_status(&me));
        assert!(!holds_cap_fsetid(0));
    }
}
