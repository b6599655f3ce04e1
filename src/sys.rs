//! Thin, safe wrappers over the few Linux system calls std does not offer (the *at family on
//! O_PATH descriptors, fallocate, flock, prctl). This module and the key cache are the only
//! places with `unsafe`; every block here only passes valid pointers and lengths to libc.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

const EMPTY: &CStr = c"";

/// The path under /proc that reopens a descriptor (works for O_PATH descriptors).
pub fn proc_fd_path(fd: BorrowedFd<'_>) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL in a number")
}

/// openat(2) relative to `dir`; the returned descriptor is close-on-exec.
pub fn openat(dir: BorrowedFd<'_>, name: &OsStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let n = cstr(name)?;
    // SAFETY: `n` is a valid NUL-terminated string that outlives the call.
    let fd = check(unsafe { libc::openat(dir.as_raw_fd(), n.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    // SAFETY: openat returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reopens an O_PATH descriptor with real access `flags` (through /proc/self/fd).
pub fn reopen(fd: BorrowedFd<'_>, flags: i32) -> io::Result<OwnedFd> {
    let p = proc_fd_path(fd);
    // SAFETY: `p` is a valid NUL-terminated string.
    let nfd = check(unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC) })?;
    // SAFETY: open returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(nfd) })
}

/// fstatat(2); an empty `name` stats `dir` itself.
pub fn fstatat(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<libc::stat> {
    let n = cstr(name)?;
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    let flags = libc::AT_SYMLINK_NOFOLLOW | if name.is_empty() { libc::AT_EMPTY_PATH } else { 0 };
    // SAFETY: `st` points to writable memory of the right size; `n` is NUL-terminated.
    check(unsafe { libc::fstatat(dir.as_raw_fd(), n.as_ptr(), st.as_mut_ptr(), flags) })?;
    // SAFETY: fstatat succeeded, so it filled `st`.
    Ok(unsafe { st.assume_init() })
}

pub fn mkdirat(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> io::Result<()> {
    let n = cstr(name)?;
    // SAFETY: `n` is NUL-terminated.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), n.as_ptr(), mode) }).map(drop)
}

pub fn mknodat(dir: BorrowedFd<'_>, name: &OsStr, mode: u32, rdev: u64) -> io::Result<()> {
    let n = cstr(name)?;
    // SAFETY: `n` is NUL-terminated.
    check(unsafe { libc::mknodat(dir.as_raw_fd(), n.as_ptr(), mode, rdev) }).map(drop)
}

pub fn unlinkat(dir: BorrowedFd<'_>, name: &OsStr, remove_dir: bool) -> io::Result<()> {
    let n = cstr(name)?;
    let flags = if remove_dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: `n` is NUL-terminated.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), n.as_ptr(), flags) }).map(drop)
}

pub fn symlinkat(target: &OsStr, dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let t = cstr(target)?;
    let n = cstr(name)?;
    // SAFETY: both strings are NUL-terminated.
    check(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), n.as_ptr()) }).map(drop)
}

/// readlink of the symlink an O_PATH|O_NOFOLLOW descriptor refers to.
pub fn readlink_fd(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: `buf` is writable for `buf.len()` bytes; the empty path names `fd` itself.
    let n = unsafe { libc::readlinkat(fd.as_raw_fd(), EMPTY.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

pub fn renameat2(
    olddir: BorrowedFd<'_>,
    oldname: &OsStr,
    newdir: BorrowedFd<'_>,
    newname: &OsStr,
    flags: u32,
) -> io::Result<()> {
    let o = cstr(oldname)?;
    let n = cstr(newname)?;
    // SAFETY: both strings are NUL-terminated.
    check(unsafe {
        libc::renameat2(
            olddir.as_raw_fd(),
            o.as_ptr(),
            newdir.as_raw_fd(),
            n.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

/// Creates a hard link `newdir/newname` to the object an O_PATH descriptor refers to.
pub fn link_fd(fd: BorrowedFd<'_>, newdir: BorrowedFd<'_>, newname: &OsStr) -> io::Result<()> {
    let p = proc_fd_path(fd);
    let n = cstr(newname)?;
    // SAFETY: both strings are NUL-terminated.
    check(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            p.as_ptr(),
            newdir.as_raw_fd(),
            n.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })
    .map(drop)
}

/// chmod of the object an O_PATH descriptor refers to.
pub fn chmod_fd(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    let p = proc_fd_path(fd);
    // SAFETY: `p` is NUL-terminated.
    check(unsafe { libc::chmod(p.as_ptr(), mode) }).map(drop)
}

/// chown of the object an O_PATH descriptor refers to (not following symlinks).
pub fn chown_fd(fd: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    let u = uid.unwrap_or(u32::MAX);
    let g = gid.unwrap_or(u32::MAX);
    // SAFETY: the empty path with AT_EMPTY_PATH names `fd` itself.
    check(unsafe {
        libc::fchownat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            u,
            g,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// A timestamp to set: `None` leaves it, `Some(None)` sets it to now.
pub type TimeSpec = Option<Option<(i64, i64)>>;

fn timespec(t: TimeSpec) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(None) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(Some((s, ns))) => libc::timespec {
            tv_sec: s,
            tv_nsec: ns,
        },
    }
}

/// utimensat of the object an O_PATH descriptor refers to. A symlink's own times are set
/// (AT_EMPTY_PATH on the descriptor), not its target's.
pub fn utimens_fd(fd: BorrowedFd<'_>, atime: TimeSpec, mtime: TimeSpec) -> io::Result<()> {
    let ts = [timespec(atime), timespec(mtime)];
    // SAFETY: the empty path with AT_EMPTY_PATH names `fd` itself; `ts` holds two timespecs.
    let r = unsafe { libc::utimensat(fd.as_raw_fd(), EMPTY.as_ptr(), ts.as_ptr(), libc::AT_EMPTY_PATH) };
    if r == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EINVAL) {
        return Err(err);
    }
    // Older kernels refuse AT_EMPTY_PATH here: go through /proc (follows to the object).
    let p = proc_fd_path(fd);
    // SAFETY: `p` is NUL-terminated and `ts` holds the two timespecs utimensat reads.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), ts.as_ptr(), 0) }).map(drop)
}

/// fsync of a directory (or any object) given by an O_PATH or ordinary descriptor.
pub fn fsync_dir(fd: BorrowedFd<'_>) -> io::Result<()> {
    let f = std::fs::File::from(reopen(fd, libc::O_RDONLY | libc::O_DIRECTORY)?);
    f.sync_all()
}

fn path_xattr(fd: BorrowedFd<'_>, f: impl FnOnce(&CStr) -> isize) -> io::Result<usize> {
    let p = proc_fd_path(fd);
    let r = f(&p);
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// getxattr on the object an O_PATH descriptor refers to; an empty `buf` asks for the size.
pub fn getxattr_fd(fd: BorrowedFd<'_>, name: &OsStr, buf: &mut [u8]) -> io::Result<usize> {
    let n = cstr(name)?;
    path_xattr(fd, |p| {
        // SAFETY: both strings are NUL-terminated; `buf` is writable for its length.
        unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) }
    })
}

/// listxattr on the object an O_PATH descriptor refers to; an empty `buf` asks for the size.
pub fn listxattr_fd(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    path_xattr(fd, |p| {
        // SAFETY: `p` is NUL-terminated; `buf` is writable for its length.
        unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) }
    })
}

pub fn setxattr_fd(fd: BorrowedFd<'_>, name: &OsStr, value: &[u8], flags: i32) -> io::Result<()> {
    let n = cstr(name)?;
    path_xattr(fd, |p| {
        // SAFETY: both strings are NUL-terminated; `value` is readable for its length.
        unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), flags) as isize }
    })
    .map(drop)
}

pub fn removexattr_fd(fd: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let n = cstr(name)?;
    path_xattr(fd, |p| {
        // SAFETY: both strings are NUL-terminated.
        unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) as isize }
    })
    .map(drop)
}

/// fallocate(2). `Ok(false)` when the backing filesystem does not support it.
pub fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> io::Result<bool> {
    if len == 0 {
        return Ok(true);
    }
    // SAFETY: plain integer arguments.
    match check(unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) }) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(false),
        Err(e) => Err(e),
    }
}

pub const FALLOC_KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;

pub fn statvfs_fd(fd: BorrowedFd<'_>) -> io::Result<libc::statvfs> {
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `st` is writable memory of the right size.
    check(unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstatvfs succeeded, so it filled `st`.
    Ok(unsafe { st.assume_init() })
}

/// Non-blocking exclusive flock; `Ok(false)` if another process holds it.
pub fn try_lock_exclusive(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: plain integer arguments.
    match check(unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Makes this process non-dumpable and forbids core files: a crash must not write keys to disk.
pub fn disable_core_dumps() -> io::Result<()> {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `zero` is a valid rlimit; prctl takes plain integers.
    check(unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) })?;
    // SAFETY: as above.
    check(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) }).map(drop)
}

/// Sets the process umask, returning the old one.
pub fn set_umask(mask: u32) -> u32 {
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(mask) }
}

pub fn geteuid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// Starts a new session so the daemon outlives the terminal that started it.
pub fn setsid() -> io::Result<()> {
    // SAFETY: setsid takes no arguments.
    check(unsafe { libc::setsid() }).map(drop)
}

/// Points `target` at the same open file as `src` (dup2).
pub fn dup2(src: BorrowedFd<'_>, target: RawFd) -> io::Result<()> {
    // SAFETY: plain integer arguments.
    check(unsafe { libc::dup2(src.as_raw_fd(), target) }).map(drop)
}

/// umount2(2): `lazy` detaches a busy mount.
pub fn umount(path: &OsStr, lazy: bool) -> io::Result<()> {
    let p = cstr(path)?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: `p` is NUL-terminated.
    check(unsafe { libc::umount2(p.as_ptr(), flags) }).map(drop)
}

/// Locks every page of this process, now and later, into RAM (pages are locked as they are
/// first touched: MCL_ONFAULT), so unwrapped keys are never written to swap.
pub fn lock_memory() -> io::Result<()> {
    // SAFETY: plain integer flags.
    check(unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) }).map(drop)
}

/// The pid and uid of the process at the other end of a Unix socket.
pub fn peer_credentials(sock: &impl AsRawFd) -> io::Result<(i32, u32)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is writable for `len` bytes, as getsockopt(SO_PEERCRED) expects.
    check(unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    })?;
    Ok((cred.pid, cred.uid))
}

/// Sets an environment variable. Only for the single-threaded start of a process (the mount
/// helper loading its env file): setenv is not safe while other threads read the environment.
pub fn set_env_single_threaded(key: &str, value: &str) {
    // SAFETY: callers run before any other thread exists.
    unsafe { std::env::set_var(key, value) };
}

/// Raises the soft open-file limit to the hard limit: each looked-up inode holds a descriptor.
pub fn raise_nofile_limit() {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `rl` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } == 0 && rl.rlim_cur < rl.rlim_max {
        rl.rlim_cur = rl.rlim_max;
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) };
    }
}
