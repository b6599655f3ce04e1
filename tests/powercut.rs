//! The power-cut layer (tests/common/powercut.rs) validated on a plain directory, no kmsfs:
//! a program that skips the directory fsync loses names, one that skips the file fsync loses
//! data, a correct one loses nothing, and random writeback never undoes what was synced.

mod common;

use common::errno_of;
use common::powercut::{Cut, PowerCut, View};
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A layer mounted in a temp directory; the mount goes before the directory.
struct Fixture {
    pc: PowerCut,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        Fixture {
            pc: PowerCut::mount(&mnt),
            _dir: dir,
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.pc.path().join(rel)
    }
}

fn fsync_dir(p: &Path) {
    File::open(p).unwrap().sync_all().unwrap();
}

/// Writes a file and fsyncs it (not its directory).
fn write_synced(p: &Path, data: &[u8]) {
    let mut f = File::create(p).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// Writes a file without any sync.
fn write_unsynced(p: &Path, data: &[u8]) {
    File::create(p).unwrap().write_all(data).unwrap();
}

fn read(p: &Path) -> Option<Vec<u8>> {
    match fs::read(p) {
        Ok(d) => Some(d),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("read {}: {e}", p.display()),
    }
}

#[test]
fn skipping_the_directory_fsync_loses_the_name() {
    let mut f = Fixture::new();
    fs::create_dir(f.p("d")).unwrap();
    fsync_dir(f.pc.path());
    write_synced(&f.p("top"), b"top data");
    write_synced(&f.p("d/inner"), b"inner data");
    assert_eq!(f.pc.syncs("/d/inner").fsync, 1);
    assert_eq!(f.pc.syncs(f.pc.path()).fsyncdir, 1);

    f.pc.cut(Cut::DropAll);
    assert!(f.p("d").is_dir(), "{}", f.pc.dump());
    assert_eq!(read(&f.p("top")), None, "{}", f.pc.dump());
    assert_eq!(read(&f.p("d/inner")), None, "{}", f.pc.dump());
    assert_eq!(fs::read_dir(f.p("d")).unwrap().count(), 0);
}

#[test]
fn skipping_the_file_fsync_loses_the_data() {
    let mut f = Fixture::new();
    write_unsynced(&f.p("new"), b"never synced");
    write_synced(&f.p("old"), b"version 1");
    fsync_dir(f.pc.path());
    // Overwritten in place, not synced.
    OpenOptions::new()
        .write(true)
        .open(f.p("old"))
        .unwrap()
        .write_all(b"VERSION 2")
        .unwrap();
    assert_eq!(read(&f.p("old")).unwrap(), b"VERSION 2");

    f.pc.cut(Cut::DropAll);
    assert_eq!(read(&f.p("new")).unwrap(), b"", "{}", f.pc.dump());
    assert_eq!(read(&f.p("old")).unwrap(), b"version 1", "{}", f.pc.dump());
}

/// A careful program: every change followed by the fsyncs that make it durable.
fn correct_program(f: &Fixture) {
    let root = f.pc.path();
    write_synced(&f.p("a"), b"file a");
    write_synced(&f.p("gone"), b"to be unlinked");
    write_synced(&f.p("target"), b"old target");
    fs::create_dir(f.p("d")).unwrap();
    fsync_dir(root);
    // Atomic replace.
    write_synced(&f.p("target.tmp"), b"new target");
    fs::rename(f.p("target.tmp"), f.p("target")).unwrap();
    fsync_dir(root);
    // A file in the new directory.
    write_synced(&f.p("d/inner"), b"inner");
    fsync_dir(&f.p("d"));
    // Unlink.
    fs::remove_file(f.p("gone")).unwrap();
    fsync_dir(root);
    // Metadata: mode, xattr, size through truncate.
    fs::set_permissions(f.p("a"), fs::Permissions::from_mode(0o600)).unwrap();
    setxattr(&f.p("a"), "user.k", b"v");
    OpenOptions::new()
        .write(true)
        .open(f.p("a"))
        .unwrap()
        .set_len(4)
        .unwrap();
    File::open(f.p("a")).unwrap().sync_all().unwrap();
    // Cross-directory rename, both directories synced.
    write_synced(&f.p("d/moved"), b"moved");
    fsync_dir(&f.p("d"));
    fs::rename(f.p("d/moved"), f.p("moved")).unwrap();
    fsync_dir(&f.p("d"));
    fsync_dir(root);
}

fn setxattr(p: &Path, name: &str, value: &[u8]) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings and buffer.
    let r = unsafe { libc::setxattr(c.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    assert_eq!(r, 0, "setxattr: {}", std::io::Error::last_os_error());
}

#[test]
fn a_correct_program_loses_nothing() {
    let mut f = Fixture::new();
    correct_program(&f);
    assert_eq!(f.pc.pending(), 0, "{}", f.pc.dump());
    let before = f.pc.tree(View::Current);
    assert_eq!(before, f.pc.tree(View::Durable));

    f.pc.cut(Cut::DropAll);
    assert_eq!(f.pc.tree(View::Current), before, "{}", f.pc.dump());
    // And through the kernel, on the fresh mount.
    assert_eq!(read(&f.p("a")).unwrap(), b"file");
    assert_eq!(fs::metadata(f.p("a")).unwrap().mode() & 0o7777, 0o600);
    assert_eq!(read(&f.p("target")).unwrap(), b"new target");
    assert_eq!(read(&f.p("target.tmp")), None);
    assert_eq!(read(&f.p("gone")), None);
    assert_eq!(read(&f.p("d/inner")).unwrap(), b"inner");
    assert_eq!(read(&f.p("moved")).unwrap(), b"moved");
    assert_eq!(read(&f.p("d/moved")), None);
}

/// The layer can fail the test above: with fsyncdir broken, the same program loses names.
#[test]
fn a_broken_fsyncdir_is_caught() {
    let mut f = Fixture::new();
    f.pc.break_fsyncdir(true);
    correct_program(&f);
    let before = f.pc.tree(View::Current);
    f.pc.cut(Cut::DropAll);
    assert_ne!(f.pc.tree(View::Current), before);
    assert_eq!(read(&f.p("a")), None);
}

#[test]
fn rename_over_without_directory_fsync_keeps_the_old_file() {
    let mut f = Fixture::new();
    write_synced(&f.p("config"), b"old");
    fsync_dir(f.pc.path());
    write_synced(&f.p("config.tmp"), b"new");
    fs::rename(f.p("config.tmp"), f.p("config")).unwrap();
    assert_eq!(read(&f.p("config")).unwrap(), b"new");

    f.pc.cut(Cut::DropAll);
    assert_eq!(read(&f.p("config")).unwrap(), b"old", "{}", f.pc.dump());
    assert_eq!(read(&f.p("config.tmp")), None);
}

#[test]
fn random_cuts_keep_everything_synced_and_some_of_the_rest() {
    #[derive(Default, Debug)]
    struct Seen {
        u1: [u32; 2],
        gone: [u32; 2],
        renamed: [u32; 2],
        new_data: [u32; 2],
        moved_src: [u32; 2],
        moved_dst: [u32; 2],
        tail: [u32; 2],
    }
    let mut seen = Seen::default();
    let count = |c: &mut [u32; 2], b: bool| c[usize::from(b)] += 1;
    for seed in 0..48 {
        let mut f = Fixture::new();
        // Durable part.
        fs::create_dir(f.p("d")).unwrap();
        write_synced(&f.p("keep"), b"keep");
        write_synced(&f.p("gone"), b"gone");
        write_synced(&f.p("r1"), b"renamed");
        write_synced(&f.p("d/inner"), b"inner");
        write_synced(&f.p("d/mv"), b"mv");
        write_synced(&f.p("log"), b"0123");
        fsync_dir(&f.p("d"));
        fsync_dir(f.pc.path());
        let durable = f.pc.tree(View::Current);
        // Unsynced part, in this order per directory.
        write_synced(&f.p("u1"), b"u1 data"); // file synced, name not
        fs::remove_file(f.p("gone")).unwrap();
        fs::rename(f.p("r1"), f.p("r2")).unwrap();
        write_unsynced(&f.p("d/new"), b"new data");
        fs::rename(f.p("d/mv"), f.p("mv")).unwrap();
        let mut log = OpenOptions::new().append(true).open(f.p("log")).unwrap();
        for chunk in [b"4567", b"89ab"] {
            log.write_all(chunk).unwrap();
        }
        drop(log);

        f.pc.cut(Cut::Random(seed));
        let dump = f.pc.dump();
        let now = f.pc.tree(View::Current);
        for path in ["/keep", "/d/inner"] {
            assert_eq!(now.get(path), durable.get(path), "seed {seed}\n{dump}");
        }
        assert_eq!(read(&f.p("keep")).unwrap(), b"keep", "seed {seed}\n{dump}");
        assert_eq!(read(&f.p("d/inner")).unwrap(), b"inner", "seed {seed}\n{dump}");
        // A synced file whose name survives is complete.
        let u1 = read(&f.p("u1"));
        assert!(
            u1.is_none() || u1.as_deref() == Some(b"u1 data"),
            "seed {seed}\n{dump}"
        );
        count(&mut seen.u1, u1.is_some());
        let gone = read(&f.p("gone"));
        assert!(
            gone.is_none() || gone.as_deref() == Some(b"gone"),
            "seed {seed}\n{dump}"
        );
        count(&mut seen.gone, gone.is_none());
        // A same-directory rename is atomic: exactly one of the names.
        let (r1, r2) = (read(&f.p("r1")), read(&f.p("r2")));
        assert!(r1.is_some() != r2.is_some(), "seed {seed}\n{dump}");
        let renamed = r2.is_some();
        assert_eq!(r1.or(r2).unwrap(), b"renamed");
        count(&mut seen.renamed, renamed);
        // Per directory, changes survive in order: the rename implies the changes before it.
        if renamed {
            assert!(gone.is_none() && u1.is_some(), "seed {seed}\n{dump}");
        }
        // An unsynced write either happened or not.
        let new = read(&f.p("d/new"));
        assert!(
            matches!(new.as_deref(), None | Some(b"") | Some(b"new data")),
            "seed {seed}\n{dump}"
        );
        count(&mut seen.new_data, new.as_deref() == Some(b"new data"));
        // A cross-directory rename is two changes: any of the four outcomes, content intact.
        let (src, dst) = (read(&f.p("d/mv")), read(&f.p("mv")));
        for x in [&src, &dst].into_iter().flatten() {
            assert_eq!(x, b"mv", "seed {seed}\n{dump}");
        }
        count(&mut seen.moved_src, src.is_some());
        count(&mut seen.moved_dst, dst.is_some());
        // Appends survive as a prefix of the writes.
        let log = read(&f.p("log")).unwrap();
        assert!(
            [&b"0123"[..], b"01234567", b"0123456789ab"].contains(&log.as_slice()),
            "seed {seed}: {:?}\n{dump}",
            String::from_utf8_lossy(&log)
        );
        count(&mut seen.tail, log.len() > 4);
    }
    // Both outcomes of every unsynced change occur across the seeds.
    for (what, c) in [
        ("u1", seen.u1),
        ("gone", seen.gone),
        ("renamed", seen.renamed),
        ("new data", seen.new_data),
        ("moved src", seen.moved_src),
        ("moved dst", seen.moved_dst),
        ("tail", seen.tail),
    ] {
        assert!(c[0] > 0 && c[1] > 0, "{what}: only one outcome in {seen:?}");
    }
}

#[test]
fn hard_links_and_symlinks_survive_when_synced() {
    let mut f = Fixture::new();
    write_synced(&f.p("f"), b"linked");
    fs::hard_link(f.p("f"), f.p("g")).unwrap();
    std::os::unix::fs::symlink("f", f.p("s")).unwrap();
    fsync_dir(f.pc.path());
    // Not synced: another link and another symlink.
    fs::hard_link(f.p("f"), f.p("h")).unwrap();
    std::os::unix::fs::symlink("nowhere", f.p("t")).unwrap();
    assert_eq!(fs::metadata(f.p("f")).unwrap().nlink(), 3);

    f.pc.cut(Cut::DropAll);
    let (mf, mg) = (fs::metadata(f.p("f")).unwrap(), fs::metadata(f.p("g")).unwrap());
    assert_eq!(mf.ino(), mg.ino(), "{}", f.pc.dump());
    assert_eq!(mf.nlink(), 2, "{}", f.pc.dump());
    assert_eq!(read(&f.p("g")).unwrap(), b"linked");
    assert_eq!(fs::read_link(f.p("s")).unwrap(), Path::new("f"));
    assert_eq!(read(&f.p("s")).unwrap(), b"linked");
    assert!(fs::symlink_metadata(f.p("h")).is_err());
    assert!(fs::symlink_metadata(f.p("t")).is_err());
}

#[test]
fn a_descriptor_open_across_the_cut_is_dead() {
    let mut f = Fixture::new();
    write_synced(&f.p("f"), b"data");
    fsync_dir(f.pc.path());
    let mut open = OpenOptions::new().read(true).write(true).open(f.p("f")).unwrap();
    // The mount is busy: the cut unmounts lazily and must not hang.
    f.pc.cut(Cut::DropAll);
    let e = open.write_all(b"late").and_then(|_| open.sync_all()).unwrap_err();
    assert_eq!(errno_of(&e), libc::EIO, "{e}");
    drop(open);
    assert_eq!(read(&f.p("f")).unwrap(), b"data");
    // The new mount works.
    write_synced(&f.p("g"), b"after");
    assert_eq!(read(&f.p("g")).unwrap(), b"after");
}

#[test]
fn namespace_errors_and_attributes() {
    let f = Fixture::new();
    let e = |r: std::io::Result<()>| errno_of(&r.unwrap_err());
    fs::create_dir(f.p("d")).unwrap();
    write_unsynced(&f.p("d/x"), b"12345");
    assert_eq!(e(fs::create_dir(f.p("d"))), libc::EEXIST);
    assert_eq!(e(fs::remove_dir(f.p("d"))), libc::ENOTEMPTY);
    assert_eq!(e(fs::remove_file(f.p("d"))), libc::EISDIR);
    assert_eq!(e(fs::remove_file(f.p("nope"))), libc::ENOENT);
    assert_eq!(e(fs::create_dir(f.p("d/x/y"))), libc::ENOTDIR);
    assert_eq!(e(fs::remove_dir(f.p("d/x"))), libc::ENOTDIR);
    let excl = OpenOptions::new().write(true).create_new(true).open(f.p("d/x"));
    assert_eq!(errno_of(&excl.unwrap_err()), libc::EEXIST);
    let nofollow = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(f.p("d/x"));
    assert!(nofollow.is_ok());
    // RENAME_NOREPLACE.
    write_unsynced(&f.p("y"), b"y");
    let e = renameat2(&f.p("y"), &f.p("d/x"), libc::RENAME_NOREPLACE).unwrap_err();
    assert_eq!(errno_of(&e), libc::EEXIST);
    // flock is the kernel's own (the daemon's lock file).
    let (l1, l2) = (File::open(f.p("y")).unwrap(), File::open(f.p("y")).unwrap());
    l1.try_lock().unwrap();
    assert!(l2.try_lock().is_err());
    // Sizes, blocks, link counts, stable inode numbers.
    let m = fs::metadata(f.p("d/x")).unwrap();
    assert_eq!((m.len(), m.blocks(), m.nlink()), (5, 8, 1));
    fs::create_dir(f.p("d/sub")).unwrap();
    assert_eq!(fs::metadata(f.p("d")).unwrap().nlink(), 3);
    assert_eq!(fs::metadata(f.p("d/x")).unwrap().ino(), m.ino());
    let names: Vec<_> = fs::read_dir(f.p("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2);

    // fallocate: mode 0 extends, KEEP_SIZE does not, PUNCH_HOLE zeroes.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(f.p("d/x"))
        .unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    // SAFETY: a valid descriptor.
    unsafe {
        assert_eq!(libc::fallocate(fd, 0, 0, 8), 0);
        assert_eq!(libc::fallocate(fd, libc::FALLOC_FL_KEEP_SIZE, 0, 100), 0);
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        assert_eq!(libc::fallocate(fd, punch, 1, 2), 0);
    }
    assert_eq!(read(&f.p("d/x")).unwrap(), [b'1', 0, 0, b'4', b'5', 0, 0, 0]);
    // Extended attributes.
    setxattr(&f.p("d/x"), "user.a", b"1");
    let c = CString::new(f.p("d/x").as_os_str().as_bytes()).unwrap();
    let mut buf = [0u8; 64];
    // SAFETY: valid C string and buffer.
    let n = unsafe { libc::listxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert_eq!(&buf[..n as usize], b"user.a\0");
}

fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> std::io::Result<()> {
    let (a, b) = (
        CString::new(from.as_os_str().as_bytes()).unwrap(),
        CString::new(to.as_os_str().as_bytes()).unwrap(),
    );
    // SAFETY: valid C strings.
    let r = unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), flags) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[test]
fn rename_exchange_is_durable_after_the_directory_fsync() {
    let mut f = Fixture::new();
    write_synced(&f.p("x"), b"X");
    write_synced(&f.p("y"), b"Y");
    fsync_dir(f.pc.path());
    renameat2(&f.p("x"), &f.p("y"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(read(&f.p("x")).unwrap(), b"Y");
    f.pc.cut(Cut::DropAll);
    assert_eq!(
        (read(&f.p("x")).unwrap(), read(&f.p("y")).unwrap()),
        (b"X".to_vec(), b"Y".to_vec())
    );

    renameat2(&f.p("x"), &f.p("y"), libc::RENAME_EXCHANGE).unwrap();
    fsync_dir(f.pc.path());
    f.pc.cut(Cut::DropAll);
    assert_eq!(
        (read(&f.p("x")).unwrap(), read(&f.p("y")).unwrap()),
        (b"Y".to_vec(), b"X".to_vec())
    );
    assert_eq!(
        errno_of(&renameat2(&f.p("x"), &f.p("nope"), libc::RENAME_EXCHANGE).unwrap_err()),
        libc::ENOENT
    );
}

#[test]
fn a_half_durable_directory_move_leaves_one_name() {
    let mut f = Fixture::new();
    for d in ["a", "b", "a/sub"] {
        fs::create_dir(f.p(d)).unwrap();
    }
    write_synced(&f.p("a/sub/f"), b"f");
    fsync_dir(&f.p("a/sub"));
    fsync_dir(&f.p("a"));
    fsync_dir(f.pc.path());
    fs::rename(f.p("a/sub"), f.p("b/sub")).unwrap();
    // Only the destination is synced: both parents durably name the directory.
    fsync_dir(&f.p("b"));
    let dump = f.pc.dump();
    assert!(dump.contains("/b/sub/f") && dump.contains("pending:"), "{dump}");

    f.pc.cut(Cut::DropAll);
    let (a, b) = (f.p("a/sub").exists(), f.p("b/sub").exists());
    assert!(a != b, "{}", f.pc.dump());
    let sub = if a { "a/sub/f" } else { "b/sub/f" };
    assert_eq!(read(&f.p(sub)).unwrap(), b"f");
    assert_eq!(fs::metadata(f.pc.path()).unwrap().nlink(), 4);
}
