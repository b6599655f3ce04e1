//! Unit tests of `sys`, kept apart so the module reads as what it does.
use super::*;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

fn errno(r: io::Result<impl std::fmt::Debug>) -> i32 {
    r.expect_err("call should fail").raw_os_error().expect("an errno")
}

fn open_dir(path: &std::path::Path) -> OwnedFd {
    std::fs::File::open(path).unwrap().into()
}

fn o_path(dir: BorrowedFd<'_>, name: &str) -> OwnedFd {
    openat(dir, OsStr::new(name), libc::O_PATH | libc::O_NOFOLLOW, 0).unwrap()
}

fn is_cloexec(fd: &OwnedFd) -> bool {
    rustix::io::fcntl_getfd(fd)
        .unwrap()
        .contains(rustix::io::FdFlags::CLOEXEC)
}

#[test]
fn opened_descriptors_are_cloexec_and_errors_keep_errno() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = open_dir(tmp.path());
    let name = OsStr::new("f");
    let fd = openat(
        dir.as_fd(),
        name,
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
        0o640,
    )
    .unwrap();
    assert!(is_cloexec(&fd));
    let st = fstatat(dir.as_fd(), name).unwrap();
    assert_eq!(st.st_mode & 0o7777, 0o640 & !current_umask());
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL;
    assert_eq!(errno(openat(dir.as_fd(), name, flags, 0o600)), libc::EEXIST);
    assert_eq!(
        errno(openat(dir.as_fd(), OsStr::new("missing"), libc::O_RDONLY, 0)),
        libc::ENOENT
    );
    assert_eq!(
        errno(openat(dir.as_fd(), OsStr::new("a\0b"), libc::O_RDONLY, 0)),
        libc::EINVAL
    );
    let path = o_path(dir.as_fd(), "f");
    assert!(is_cloexec(&path));
    let rw = reopen(path.as_fd(), libc::O_RDWR).unwrap();
    assert!(is_cloexec(&rw));
    assert_eq!(
        errno(reopen(path.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY)),
        libc::ENOTDIR
    );
}

fn current_umask() -> u32 {
    // /proc/self/status reads the umask without changing it (other tests run in parallel).
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
    u32::from_str_radix(line["Umask:".len()..].trim(), 8).unwrap()
}

#[test]
fn fstatat_matches_std_metadata_and_does_not_follow_symlinks() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("f"), b"hello").unwrap();
    std::os::unix::fs::symlink("f", tmp.path().join("l")).unwrap();
    let dir = open_dir(tmp.path());
    for name in ["f", "l"] {
        let m = std::fs::symlink_metadata(tmp.path().join(name)).unwrap();
        let by_name = fstatat(dir.as_fd(), OsStr::new(name)).unwrap();
        let by_fd = fstatat(o_path(dir.as_fd(), name).as_fd(), OsStr::new("")).unwrap();
        for st in [by_name, by_fd] {
            assert_eq!((st.st_dev, st.st_ino, st.st_mode), (m.dev(), m.ino(), m.mode()));
            assert_eq!((st.st_nlink, st.st_uid, st.st_gid), (m.nlink(), m.uid(), m.gid()));
            assert_eq!((st.st_size, st.st_rdev), (m.size() as i64, m.rdev()));
            assert_eq!((st.st_mtime, st.st_mtime_nsec), (m.mtime(), m.mtime_nsec()));
        }
    }
    assert_eq!(errno(fstatat(dir.as_fd(), OsStr::new("missing"))), libc::ENOENT);
}

#[test]
fn create_link_rename_and_remove() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = open_dir(tmp.path());
    let d = dir.as_fd();
    mkdirat(d, OsStr::new("sub"), 0o700).unwrap();
    assert_eq!(errno(mkdirat(d, OsStr::new("sub"), 0o700)), libc::EEXIST);
    // A file type of 0 makes a regular file, as mknod(2) does.
    mknodat(d, OsStr::new("plain"), 0o600, 0).unwrap();
    mknodat(d, OsStr::new("reg"), libc::S_IFREG | 0o600, 0).unwrap();
    mknodat(d, OsStr::new("fifo"), libc::S_IFIFO | 0o600, 0).unwrap();
    assert_eq!(
        errno(mknodat(d, OsStr::new("bad"), libc::S_IFMT | 0o600, 0)),
        libc::EINVAL
    );
    for (name, kind) in [
        ("plain", libc::S_IFREG),
        ("reg", libc::S_IFREG),
        ("fifo", libc::S_IFIFO),
    ] {
        let st = fstatat(d, OsStr::new(name)).unwrap();
        assert_eq!(st.st_mode & libc::S_IFMT, kind, "{name}");
        assert_eq!(st.st_mode & 0o7777, 0o600 & !current_umask(), "{name}");
    }
    symlinkat(OsStr::new("some/target"), d, OsStr::new("link")).unwrap();
    assert_eq!(readlink_fd(o_path(d, "link").as_fd()).unwrap(), b"some/target");
    assert_eq!(errno(readlink_fd(o_path(d, "reg").as_fd())), libc::ENOENT);

    link_fd(o_path(d, "reg").as_fd(), d, OsStr::new("hard")).unwrap();
    assert_eq!(fstatat(d, OsStr::new("reg")).unwrap().st_nlink, 2);
    let noreplace = libc::RENAME_NOREPLACE;
    let (reg, hard) = (OsStr::new("reg"), OsStr::new("hard"));
    assert_eq!(
        errno(renameat2(d, reg, d, OsStr::new("plain"), noreplace)),
        libc::EEXIST
    );
    renameat2(d, reg, d, OsStr::new("moved"), noreplace).unwrap();
    // Without flags, rename replaces the target.
    let plain = OsStr::new("plain");
    renameat2(d, OsStr::new("moved"), d, plain, 0).unwrap();
    assert_eq!(
        fstatat(d, plain).unwrap().st_ino,
        fstatat(d, hard).unwrap().st_ino
    );

    assert_eq!(errno(unlinkat(d, OsStr::new("sub"), false)), libc::EISDIR);
    unlinkat(d, OsStr::new("sub"), true).unwrap();
    unlinkat(d, hard, false).unwrap();
    assert_eq!(errno(unlinkat(d, hard, false)), libc::ENOENT);
    fsync_dir(d).unwrap();
}

#[test]
fn attributes_through_o_path_descriptors() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("f"), b"x").unwrap();
    std::os::unix::fs::symlink("f", tmp.path().join("l")).unwrap();
    let dir = open_dir(tmp.path());
    let f = o_path(dir.as_fd(), "f");
    chmod_fd(f.as_fd(), 0o604).unwrap();
    assert_eq!(
        fstatat(f.as_fd(), OsStr::new("")).unwrap().st_mode & 0o7777,
        0o604
    );
    let me = geteuid();
    chown_fd(f.as_fd(), Some(me), None).unwrap();
    assert_eq!(fstatat(f.as_fd(), OsStr::new("")).unwrap().st_uid, me);

    utimens_fd(f.as_fd(), Some(Some((1_000_000, 5))), Some(Some((2_000_000, 7)))).unwrap();
    let st = fstatat(f.as_fd(), OsStr::new("")).unwrap();
    assert_eq!((st.st_atime, st.st_atime_nsec), (1_000_000, 5));
    assert_eq!((st.st_mtime, st.st_mtime_nsec), (2_000_000, 7));
    // `None` leaves a time, `Some(None)` sets it to now.
    utimens_fd(f.as_fd(), None, Some(None)).unwrap();
    let st = fstatat(f.as_fd(), OsStr::new("")).unwrap();
    assert_eq!((st.st_atime, st.st_atime_nsec), (1_000_000, 5));
    assert!(st.st_mtime > 2_000_000);
    assert_eq!(
        errno(utimens_fd(f.as_fd(), Some(Some((0, 1_000_000_000))), None)),
        libc::EINVAL
    );

    // A symlink's own times are set, not its target's.
    let l = o_path(dir.as_fd(), "l");
    utimens_fd(l.as_fd(), None, Some(Some((3_000_000, 0)))).unwrap();
    assert_eq!(fstatat(l.as_fd(), OsStr::new("")).unwrap().st_mtime, 3_000_000);
    assert!(fstatat(f.as_fd(), OsStr::new("")).unwrap().st_mtime > 3_000_000);
}

#[test]
fn xattrs_and_size_queries() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("f"), b"x").unwrap();
    let dir = open_dir(tmp.path());
    let f = o_path(dir.as_fd(), "f");
    let name = OsStr::new("user.kmsfs_test");
    match setxattr_fd(f.as_fd(), name, b"value", 0) {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return, // no user xattrs here
        r => r.unwrap(),
    }
    let create = libc::XATTR_CREATE;
    assert_eq!(errno(setxattr_fd(f.as_fd(), name, b"v", create)), libc::EEXIST);
    // An empty buffer asks for the size.
    assert_eq!(getxattr_fd(f.as_fd(), name, &mut []).unwrap(), 5);
    let mut buf = [0u8; 16];
    assert_eq!(getxattr_fd(f.as_fd(), name, &mut buf).unwrap(), 5);
    assert_eq!(&buf[..5], b"value");
    assert_eq!(errno(getxattr_fd(f.as_fd(), name, &mut buf[..2])), libc::ERANGE);
    let list_len = listxattr_fd(f.as_fd(), &mut []).unwrap();
    assert!(list_len >= b"user.kmsfs_test\0".len());
    let mut list = vec![0u8; list_len];
    assert_eq!(listxattr_fd(f.as_fd(), &mut list).unwrap(), list_len);
    assert!(list.split(|&b| b == 0).any(|n| n == name.as_bytes()));
    removexattr_fd(f.as_fd(), name).unwrap();
    assert_eq!(errno(getxattr_fd(f.as_fd(), name, &mut [])), libc::ENODATA);
    assert_eq!(errno(removexattr_fd(f.as_fd(), name)), libc::ENODATA);
}

#[test]
fn flock_is_exclusive_between_open_files() {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    let a = std::fs::File::open(tmp.path()).unwrap();
    let b = std::fs::File::open(tmp.path()).unwrap();
    assert!(try_lock_exclusive(a.as_fd()).unwrap());
    assert!(!try_lock_exclusive(b.as_fd()).unwrap());
    drop(a);
    assert!(try_lock_exclusive(b.as_fd()).unwrap());
}

#[test]
fn fallocate_and_statvfs() {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    let f = tmp.as_file();
    if fallocate(f.as_fd(), FALLOC_KEEP_SIZE, 0, 8192).unwrap() {
        assert_eq!(f.metadata().unwrap().len(), 0);
    }
    if fallocate(f.as_fd(), 0, 0, 100).unwrap() {
        assert_eq!(f.metadata().unwrap().len(), 100);
    }
    // A descriptor not open for writing: the kernel's errno comes back unchanged.
    let read_only = std::fs::File::open(tmp.path()).unwrap();
    assert_eq!(errno(fallocate(read_only.as_fd(), 0, 0, 1)), libc::EBADF);
    let st = statvfs_fd(f.as_fd()).unwrap();
    assert!(st.f_bsize > 0 && st.f_blocks > 0 && st.f_namemax > 0);
}

#[test]
fn peer_credentials_of_a_socket_pair() {
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let (pid, uid) = peer_credentials(&a).unwrap();
    assert_eq!(pid, std::process::id() as i32);
    assert_eq!(uid, geteuid());
}

#[test]
fn dup2_onto_a_descriptor() {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    let target: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
    dup2(tmp.as_file().as_fd(), target.as_raw_fd()).unwrap();
    let st = fstatat(target.as_fd(), OsStr::new("")).unwrap();
    assert_eq!(st.st_ino, tmp.as_file().metadata().unwrap().ino());
}

#[test]
fn nofile_limit_is_raised_to_the_hard_limit() {
    raise_nofile_limit();
    let rl = rustix::process::getrlimit(Resource::Nofile);
    assert_eq!(rl.current, rl.maximum);
}
