//! Thin, safe wrappers over the few Linux system calls std does not offer (the *at family on
//! O_PATH descriptors, xattrs, fallocate, flock, prctl), built on rustix's safe API. This module
//! and the key cache are the only places with `unsafe`. It remains here only where rustix has no
//! safe call that keeps this module's behaviour:
//! - `fstatat` and `fstatvfs`: callers take the libc structs, which have private padding
//!   fields, so only libc (or an unsafe zeroed value) can produce one;
//! - `dup2` onto a non-standard descriptor: it takes a raw descriptor number, which cannot be
//!   borrowed safely;
//! - SO_PEERCRED: rustix's `UCred::pid` may not be 0, but the kernel reports pid 0 for a peer
//!   outside our pid namespace;
//! - `std::env::set_var`.
//!
//! Every such block only passes valid pointers and lengths (or plain integers) to libc.
//! Errors stay `io::Error` with the kernel's errno, since the filesystem passes them on.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use rustix::fs::{AtFlags, CWD, FileType, Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;
use rustix::process::{Resource, Rlimit};

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

/// open(2) flags from the libc constants callers pass, always with O_CLOEXEC.
fn open_flags(flags: i32) -> OFlags {
    OFlags::from_bits_retain(flags as u32) | OFlags::CLOEXEC
}

/// The path under /proc that reopens a descriptor (works for O_PATH descriptors).
pub fn proc_fd_path(fd: BorrowedFd<'_>) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL in a number")
}

/// openat(2) relative to `dir`; the returned descriptor is close-on-exec.
pub fn openat(dir: BorrowedFd<'_>, name: &OsStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        dir,
        name,
        open_flags(flags),
        Mode::from_bits_retain(mode),
    )?)
}

/// Reopens an O_PATH descriptor with real access `flags` (through /proc/self/fd).
pub fn reopen(fd: BorrowedFd<'_>, flags: i32) -> io::Result<OwnedFd> {
    let p = proc_fd_path(fd);
    Ok(rustix::fs::open(p.as_c_str(), open_flags(flags), Mode::empty())?)
}

/// fstatat(2); an empty `name` stats `dir` itself.
pub fn fstatat(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<libc::stat> {
    // Still libc: callers take a `libc::stat`, which only libc can fill without an unsafe
    // zeroed value.
    let n = cstr(name)?;
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    let flags = libc::AT_SYMLINK_NOFOLLOW | if name.is_empty() { libc::AT_EMPTY_PATH } else { 0 };
    // SAFETY: `st` points to writable memory of the right size; `n` is NUL-terminated.
    check(unsafe { libc::fstatat(dir.as_raw_fd(), n.as_ptr(), st.as_mut_ptr(), flags) })?;
    // SAFETY: fstatat succeeded, so it filled `st`.
    Ok(unsafe { st.assume_init() })
}

/// fstat(2) of an open (or O_PATH) descriptor; a symlink's own status for an O_PATH|O_NOFOLLOW
/// one.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    fstatat(fd, OsStr::new(""))
}

/// What a `st_mode` describes, for messages: "a FIFO", "a symbolic link".
pub fn kind_name(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "a regular file",
        libc::S_IFDIR => "a directory",
        libc::S_IFLNK => "a symbolic link",
        libc::S_IFIFO => "a FIFO",
        libc::S_IFSOCK => "a socket",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        _ => "of an unknown type",
    }
}

/// The error for an object that is not what kmsfs expects there (`InvalidData`: "it is a
/// FIFO, not a regular file").
pub fn wrong_type(mode: u32, expected: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("it is {}, not {expected}", kind_name(mode)),
    )
}

/// Opens `name` in `dir` with `flags` (O_RDONLY, O_RDWR|O_CREAT, O_WRONLY|O_APPEND|O_CREAT, …)
/// only if it is a regular file, for objects whoever writes the backing directory may have
/// planted. It is first opened O_PATH|O_NOFOLLOW, which neither follows a symlink nor opens
/// anything (a FIFO cannot block it, a device's driver is not called), its type checked with
/// fstat on that descriptor, and only a regular file is then opened for real through that same
/// descriptor (`reopen`), so nothing swapped in after the check is read or written. With
/// O_CREAT a missing file is created with O_EXCL|O_NOFOLLOW, so the new descriptor is a new
/// regular file. Anything but a regular file is an `InvalidData` error that says what it is
/// ("it is a FIFO, not a regular file"). Returns the descriptor (close-on-exec, O_NONBLOCK,
/// which changes nothing for a regular file) and its status.
pub fn open_regular_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    flags: i32,
    mode: u32,
) -> io::Result<(OwnedFd, libc::stat)> {
    let create = flags & libc::O_CREAT != 0;
    let access =
        (flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW)) | libc::O_NONBLOCK | libc::O_NOCTTY;
    // Twice at most: a file created by someone else between our look and our create is looked
    // at again (and one that keeps appearing and vanishing is an error, not a loop).
    for _ in 0..2 {
        match openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0) {
            Ok(path_fd) => {
                let st = fstat(path_fd.as_fd())?;
                if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                    return Err(wrong_type(st.st_mode, "a regular file"));
                }
                if create && flags & libc::O_EXCL != 0 {
                    return Err(io::Error::from_raw_os_error(libc::EEXIST));
                }
                return Ok((reopen(path_fd.as_fd(), access)?, st));
            }
            Err(e) if create && e.raw_os_error() == Some(libc::ENOENT) => {
                let excl = access | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
                match openat(dir, name, excl, mode) {
                    Ok(fd) => {
                        let st = fstat(fd.as_fd())?;
                        return Ok((fd, st));
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) && flags & libc::O_EXCL == 0 => {}
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::from_raw_os_error(libc::EAGAIN))
}

/// [`open_regular_at`] for a path: symlinks before its last component are followed (they are
/// the admin's: a backing directory, a keystore's directory), the last one never is.
pub fn open_regular(path: &Path, flags: i32, mode: u32) -> io::Result<(OwnedFd, libc::stat)> {
    open_regular_at(CWD, path.as_os_str(), flags, mode)
}

/// An O_PATH descriptor of the directory `rel` below `root`, entered one component at a time
/// with O_DIRECTORY|O_NOFOLLOW: a symlink anywhere on the way (even one swapped in after a
/// walk saw a directory there) fails with ENOTDIR instead of leading out of `root`. `rel` is
/// relative without `..` (else EINVAL); empty, it names `root` itself.
pub fn open_dir_beneath(root: BorrowedFd<'_>, rel: &Path) -> io::Result<OwnedFd> {
    let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW;
    let mut cur = openat(root, OsStr::new("."), flags, 0)?;
    for c in rel.components() {
        match c {
            Component::Normal(name) => cur = openat(cur.as_fd(), name, flags, 0)?,
            Component::CurDir => {}
            _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }
    Ok(cur)
}

/// The directory holding `rel`'s last component (see [`open_dir_beneath`]), and that component.
pub fn parent_beneath<'p>(root: BorrowedFd<'_>, rel: &'p Path) -> io::Result<(OwnedFd, &'p OsStr)> {
    let name = rel
        .file_name()
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let parent = rel.parent().unwrap_or(Path::new(""));
    Ok((open_dir_beneath(root, parent)?, name))
}

/// [`open_regular_at`] of `rel` below `root`, following no symlink on the way.
pub fn open_regular_beneath(
    root: BorrowedFd<'_>,
    rel: &Path,
    flags: i32,
    mode: u32,
) -> io::Result<(OwnedFd, libc::stat)> {
    let (dir, name) = parent_beneath(root, rel)?;
    open_regular_at(dir.as_fd(), name, flags, mode)
}

/// lstat of `rel` below `root`, following no symlink on the way (`root` itself if empty).
pub fn stat_beneath(root: BorrowedFd<'_>, rel: &Path) -> io::Result<libc::stat> {
    if rel.file_name().is_none() {
        return fstat(open_dir_beneath(root, rel)?.as_fd());
    }
    let (dir, name) = parent_beneath(root, rel)?;
    fstatat(dir.as_fd(), name)
}

pub fn mkdirat(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> io::Result<()> {
    Ok(rustix::fs::mkdirat(dir, name, Mode::from_bits_retain(mode))?)
}

pub fn mknodat(dir: BorrowedFd<'_>, name: &OsStr, mode: u32, rdev: u64) -> io::Result<()> {
    // rustix passes the file type separately. A type of 0 makes the kernel create a regular
    // file, as S_IFREG does; any other type goes through unchanged (an invalid one still
    // fails with EINVAL).
    let file_type = if mode & libc::S_IFMT == 0 {
        FileType::RegularFile
    } else {
        FileType::from_raw_mode(mode)
    };
    let perm = Mode::from_bits_retain(mode & !libc::S_IFMT);
    Ok(rustix::fs::mknodat(dir, name, file_type, perm, rdev)?)
}

pub fn unlinkat(dir: BorrowedFd<'_>, name: &OsStr, remove_dir: bool) -> io::Result<()> {
    let flags = if remove_dir {
        AtFlags::REMOVEDIR
    } else {
        AtFlags::empty()
    };
    Ok(rustix::fs::unlinkat(dir, name, flags)?)
}

pub fn symlinkat(target: &OsStr, dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    Ok(rustix::fs::symlinkat(target, dir, name)?)
}

/// readlink of the symlink an O_PATH|O_NOFOLLOW descriptor refers to.
pub fn readlink_fd(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    // The empty path names `fd` itself.
    Ok(rustix::fs::readlinkat(fd, EMPTY, Vec::new())?.into_bytes())
}

pub fn renameat2(
    olddir: BorrowedFd<'_>,
    oldname: &OsStr,
    newdir: BorrowedFd<'_>,
    newname: &OsStr,
    flags: u32,
) -> io::Result<()> {
    let flags = rustix::fs::RenameFlags::from_bits_retain(flags);
    Ok(rustix::fs::renameat_with(
        olddir, oldname, newdir, newname, flags,
    )?)
}

/// Creates a hard link `newdir/newname` to the object a descriptor (O_PATH or open, or an
/// O_TMPFILE file not yet linked) refers to.
pub fn link_fd(fd: BorrowedFd<'_>, newdir: BorrowedFd<'_>, newname: &OsStr) -> io::Result<()> {
    // The descriptor itself, with no walk through /proc: allowed with CAP_DAC_READ_SEARCH (a
    // root daemon has it), and since Linux 6.10 for a file opened with the caller's own
    // credentials; otherwise the kernel answers ENOENT.
    match rustix::fs::linkat(fd, EMPTY, newdir, newname, AtFlags::EMPTY_PATH) {
        Err(e) if e == Errno::NOENT => {}
        r => return Ok(r?),
    }
    let p = proc_fd_path(fd);
    Ok(rustix::fs::linkat(
        CWD,
        p.as_c_str(),
        newdir,
        newname,
        AtFlags::SYMLINK_FOLLOW,
    )?)
}

/// fchmod(2) of an open descriptor (not O_PATH): no walk through /proc (a quarter of a
/// create's own CPU when its chmod went that way).
pub fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    Ok(rustix::fs::fchmod(fd, Mode::from_bits_retain(mode))?)
}

/// chmod of the object an O_PATH descriptor refers to.
pub fn chmod_fd(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    let p = proc_fd_path(fd);
    Ok(rustix::fs::chmod(p.as_c_str(), Mode::from_bits_retain(mode))?)
}

/// chown of the object an O_PATH descriptor refers to (not following symlinks).
pub fn chown_fd(fd: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    let uid = uid.map(rustix::fs::Uid::from_raw);
    let gid = gid.map(rustix::fs::Gid::from_raw);
    // The empty path with AT_EMPTY_PATH names `fd` itself; `None` leaves an id (-1).
    let flags = AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW;
    Ok(rustix::fs::chownat(fd, EMPTY, uid, gid, flags)?)
}

/// A timestamp to set: `None` leaves it, `Some(None)` sets it to now.
pub type TimeSpec = Option<Option<(i64, i64)>>;

fn timespec(t: TimeSpec) -> Timespec {
    match t {
        None => Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        Some(None) => Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_NOW,
        },
        Some(Some((s, ns))) => Timespec {
            tv_sec: s,
            tv_nsec: ns,
        },
    }
}

/// utimensat of the object an O_PATH descriptor refers to. A symlink's own times are set
/// (AT_EMPTY_PATH on the descriptor), not its target's.
pub fn utimens_fd(fd: BorrowedFd<'_>, atime: TimeSpec, mtime: TimeSpec) -> io::Result<()> {
    let ts = Timestamps {
        last_access: timespec(atime),
        last_modification: timespec(mtime),
    };
    match rustix::fs::utimensat(fd, EMPTY, &ts, AtFlags::EMPTY_PATH) {
        Err(e) if e == Errno::INVAL => {}
        r => return Ok(r?),
    }
    // Older kernels refuse AT_EMPTY_PATH here: go through /proc (follows to the object).
    let p = proc_fd_path(fd);
    Ok(rustix::fs::utimensat(CWD, p.as_c_str(), &ts, AtFlags::empty())?)
}

/// fsync of a directory (or any object) given by an O_PATH or ordinary descriptor.
pub fn fsync_dir(fd: BorrowedFd<'_>) -> io::Result<()> {
    let dir = reopen(fd, libc::O_RDONLY | libc::O_DIRECTORY)?;
    Ok(rustix::fs::fsync(&dir)?)
}

/// getxattr on the object an O_PATH descriptor refers to; an empty `buf` asks for the size.
pub fn getxattr_fd(fd: BorrowedFd<'_>, name: &OsStr, buf: &mut [u8]) -> io::Result<usize> {
    let p = proc_fd_path(fd);
    // rustix's getxattr does not treat an empty buffer as a size query; getxattr_query does.
    Ok(if buf.is_empty() {
        rustix::fs::getxattr_query(p.as_c_str(), name)?
    } else {
        rustix::fs::getxattr(p.as_c_str(), name, buf)?
    })
}

/// listxattr on the object an O_PATH descriptor refers to; an empty `buf` asks for the size.
pub fn listxattr_fd(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    let p = proc_fd_path(fd);
    // As for getxattr: an empty buffer needs the _query call.
    Ok(if buf.is_empty() {
        rustix::fs::listxattr_query(p.as_c_str())?
    } else {
        rustix::fs::listxattr(p.as_c_str(), buf)?
    })
}

pub fn setxattr_fd(fd: BorrowedFd<'_>, name: &OsStr, value: &[u8], flags: i32) -> io::Result<()> {
    let p = proc_fd_path(fd);
    let flags = rustix::fs::XattrFlags::from_bits_retain(flags as u32);
    Ok(rustix::fs::setxattr(p.as_c_str(), name, value, flags)?)
}

pub fn removexattr_fd(fd: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let p = proc_fd_path(fd);
    Ok(rustix::fs::removexattr(p.as_c_str(), name)?)
}

/// fallocate(2). `Ok(false)` when the backing filesystem does not support it.
pub fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> io::Result<bool> {
    if len == 0 {
        return Ok(true);
    }
    let mode = rustix::fs::FallocateFlags::from_bits_retain(mode as u32);
    match rustix::fs::fallocate(fd, mode, offset, len) {
        Ok(()) => Ok(true),
        Err(e) if e == rustix::io::Errno::OPNOTSUPP => Ok(false),
        Err(e) => Err(e.into()),
    }
}

pub const FALLOC_KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;

pub fn statvfs_fd(fd: BorrowedFd<'_>) -> io::Result<libc::statvfs> {
    // Still libc: callers take a `libc::statvfs` (private padding, as for `fstatat`), and
    // glibc's translation from statfs is the one they have always had.
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `st` is writable memory of the right size.
    check(unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstatvfs succeeded, so it filled `st`.
    Ok(unsafe { st.assume_init() })
}

/// Non-blocking exclusive flock; `Ok(false)` if another process holds it.
pub fn try_lock_exclusive(fd: BorrowedFd<'_>) -> io::Result<bool> {
    match rustix::fs::flock(fd, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(e) if e == Errno::WOULDBLOCK => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Sets how far the kernel reads ahead on the filesystem whose backing device info is
/// `device` (`major:minor`, as in /proc/self/mountinfo), in KiB. Root only.
pub fn set_read_ahead_kb(device: &str, kib: u32) -> io::Result<()> {
    std::fs::write(
        format!("/sys/class/bdi/{device}/read_ahead_kb"),
        format!("{kib}\n"),
    )
}

/// Makes this process non-dumpable and forbids core files: a crash must not write keys to disk.
pub fn disable_core_dumps() -> io::Result<()> {
    let zero = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    rustix::process::setrlimit(Resource::Core, zero)?;
    Ok(rustix::process::set_dumpable_behavior(
        rustix::process::DumpableBehavior::NotDumpable,
    )?)
}

/// Sets the calling thread's nice value (Linux keeps it per thread, and `who = 0` is the
/// calling thread). A negative value needs CAP_SYS_NICE; without it this fails with EACCES.
pub fn nice_this_thread(nice: i32) -> io::Result<()> {
    Ok(rustix::process::setpriority_process(None, nice)?)
}

/// Sets the process umask, returning the old one.
pub fn set_umask(mask: u32) -> u32 {
    rustix::process::umask(Mode::from_bits_retain(mask)).bits()
}

pub fn geteuid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Starts a new session so the daemon outlives the terminal that started it.
pub fn setsid() -> io::Result<()> {
    rustix::process::setsid()?;
    Ok(())
}

/// Points `target` at the same open file as `src` (dup2).
pub fn dup2(src: BorrowedFd<'_>, target: RawFd) -> io::Result<()> {
    match target {
        0 => rustix::stdio::dup2_stdin(src)?,
        1 => rustix::stdio::dup2_stdout(src)?,
        2 => rustix::stdio::dup2_stderr(src)?,
        // Still libc: rustix's dup2 needs the target as an `OwnedFd`; of raw numbers only the
        // standard streams (above) can be replaced safely.
        // SAFETY: plain integer arguments.
        _ => drop(check(unsafe { libc::dup2(src.as_raw_fd(), target) })?),
    }
    Ok(())
}

/// umount2(2): `lazy` detaches a busy mount.
pub fn umount(path: &OsStr, lazy: bool) -> io::Result<()> {
    let flags = if lazy {
        rustix::mount::UnmountFlags::DETACH
    } else {
        rustix::mount::UnmountFlags::empty()
    };
    Ok(rustix::mount::unmount(path, flags)?)
}

/// Locks every page of this process, now and later, into RAM (pages are locked as they are
/// first touched: MCL_ONFAULT), so unwrapped keys are never written to swap.
pub fn lock_memory() -> io::Result<()> {
    use rustix::mm::MlockAllFlags;
    Ok(rustix::mm::mlockall(
        MlockAllFlags::CURRENT | MlockAllFlags::FUTURE | MlockAllFlags::ONFAULT,
    )?)
}

/// The pid and uid of the process at the other end of a Unix socket.
pub fn peer_credentials(sock: &impl AsRawFd) -> io::Result<(i32, u32)> {
    // Still libc: rustix's `socket_peercred` returns a non-zero `Pid`, but the kernel reports
    // pid 0 for a peer outside our pid namespace (a client in a container).
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
    // `None` is RLIM_INFINITY.
    let rl = rustix::process::getrlimit(Resource::Nofile);
    if rl.current.unwrap_or(u64::MAX) < rl.maximum.unwrap_or(u64::MAX) {
        let raised = Rlimit {
            current: rl.maximum,
            maximum: rl.maximum,
        };
        let _ = rustix::process::setrlimit(Resource::Nofile, raised);
    }
}

/// Tests of the helpers that open what the backing directory holds without trusting it.
#[cfg(test)]
mod tests;

/// The uid of user `name` (through NSS: /etc/passwd, LDAP, …), `None` if there is none.
pub fn user_id(name: &str) -> io::Result<Option<u32>> {
    let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: `pwd`, `buf` and `result` outlive the call, which writes only within them.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(cname.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
        match rc {
            0 if result.is_null() => Ok(None),
            0 => Ok(Some(pwd.pw_uid)),
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }
}

/// The gid of group `name` (through NSS), `None` if there is none.
pub fn group_id(name: &str) -> io::Result<Option<u32>> {
    let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut buf = vec![0 as libc::c_char; 64 * 1024];
    // SAFETY: as in `user_id`.
    unsafe {
        let mut grp: libc::group = std::mem::zeroed();
        let mut result: *mut libc::group = std::ptr::null_mut();
        let rc = libc::getgrnam_r(cname.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut result);
        match rc {
            0 if result.is_null() => Ok(None),
            0 => Ok(Some(grp.gr_gid)),
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }
}

#[cfg(test)]
mod untrusted_tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, symlink};

    fn dir(path: &Path) -> OwnedFd {
        std::fs::File::open(path).unwrap().into()
    }

    fn mkfifo(path: &Path) {
        rustix::fs::mknodat(CWD, path, FileType::Fifo, Mode::from_bits_retain(0o600), 0).unwrap();
    }

    #[test]
    fn regular_files_open_and_nothing_else_does_nor_blocks() {
        let tmp = tempfile::tempdir().unwrap();
        let d = dir(tmp.path());
        std::fs::write(tmp.path().join("reg"), b"x").unwrap();
        symlink(tmp.path().join("reg"), tmp.path().join("link")).unwrap();
        symlink("nowhere", tmp.path().join("dangling")).unwrap();
        mkfifo(&tmp.path().join("fifo"));
        std::fs::create_dir(tmp.path().join("sub")).unwrap();
        let (_, st) = open_regular_at(d.as_fd(), OsStr::new("reg"), libc::O_RDONLY, 0).unwrap();
        assert_eq!(st.st_size, 1);
        for (name, flags, what) in [
            ("link", libc::O_RDONLY, "a symbolic link"),
            ("dangling", libc::O_WRONLY | libc::O_CREAT, "a symbolic link"),
            ("fifo", libc::O_RDONLY, "a FIFO"),
            ("fifo", libc::O_RDWR | libc::O_CREAT, "a FIFO"),
            ("sub", libc::O_RDONLY, "a directory"),
        ] {
            let e = open_regular_at(d.as_fd(), OsStr::new(name), flags, 0o600).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{name}: {e}");
            assert_eq!(
                e.to_string(),
                format!("it is {what}, not a regular file"),
                "{name}"
            );
        }
        // The dangling link was not followed to create its target.
        assert!(!tmp.path().join("nowhere").exists());
        // A missing file is created, as a new regular file with the mode asked for.
        let flags = libc::O_RDWR | libc::O_CREAT;
        let (_, st) = open_regular_at(d.as_fd(), OsStr::new("new"), flags, 0o600).unwrap();
        assert_eq!(st.st_mode & (libc::S_IFMT | 0o077), libc::S_IFREG);
        let (_, again) = open_regular_at(d.as_fd(), OsStr::new("new"), flags, 0o600).unwrap();
        assert_eq!(again.st_ino, st.st_ino);
        let excl = flags | libc::O_EXCL;
        let e = open_regular_at(d.as_fd(), OsStr::new("new"), excl, 0o600).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        let e = open_regular(&tmp.path().join("link"), libc::O_RDONLY, 0).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
    }

    #[test]
    fn beneath_follows_no_link_on_the_way() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(root.join("a/b/f"), b"in").unwrap();
        std::fs::write(outside.join("f"), b"out").unwrap();
        symlink(&outside, root.join("a/l")).unwrap();
        let r = dir(&root);
        let (fd, _) = open_regular_beneath(r.as_fd(), Path::new("a/b/f"), libc::O_RDONLY, 0).unwrap();
        let mut s = String::new();
        io::Read::read_to_string(&mut std::fs::File::from(fd), &mut s).unwrap();
        assert_eq!(s, "in");
        for bad in ["a/l/f", "a/l"] {
            let e = open_regular_beneath(r.as_fd(), Path::new(bad), libc::O_RDONLY, 0).unwrap_err();
            assert!(
                matches!(e.raw_os_error(), Some(libc::ENOTDIR)) || e.kind() == io::ErrorKind::InvalidData,
                "{bad}: {e}"
            );
        }
        assert_eq!(
            open_dir_beneath(r.as_fd(), Path::new("a/l"))
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ENOTDIR)
        );
        for bad in ["../outside/f", "/etc/passwd", "a/../../outside/f"] {
            let e = open_regular_beneath(r.as_fd(), Path::new(bad), libc::O_RDONLY, 0).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{bad}");
        }
        let st = stat_beneath(r.as_fd(), Path::new("a/l")).unwrap();
        assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFLNK);
        assert_eq!(
            stat_beneath(r.as_fd(), Path::new("")).unwrap().st_ino,
            std::fs::metadata(&root).unwrap().ino()
        );
    }
}
