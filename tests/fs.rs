//! The filesystem core tested in process, without FUSE (the way mountpoint-s3's `tests/fs.rs`
//! tests its core): a real volume made by `kmsfs init`, opened as the daemon opens it, with the
//! real local keystore provider and encrypted names, driven through `kmsfs::fs::Fs`'s
//! inode-number operations. Failures are checked by errno (`FsError::errno`), which is what the
//! FUSE adapter hands the kernel and so what an application sees.

mod common;

use common::inprocess::{InProcess, caller, ino, lookup_path, parent_of};
use common::pseudo_random;
use kmsfs::format::block::{BlockLayout, DEFAULT_BLOCK_SIZE};
use kmsfs::fs::error::{FsError, FsResult};
use kmsfs::fs::inode::{Kind, ROOT_INO};
use kmsfs::fs::{Fs, Options, SetAttr};
use kmsfs::kms::KmsError;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;

/// The volumes here have the default block size.
const BLOCK_SIZE: u64 = DEFAULT_BLOCK_SIZE;
const LAYOUT: BlockLayout = BlockLayout::DEFAULT;
const BLOCK: usize = BLOCK_SIZE as usize;
const FILE: u32 = libc::S_IFREG | 0o644;

/// The errno of a call that must fail.
#[track_caller]
fn errno<T>(r: FsResult<T>) -> i32 {
    match r {
        Ok(_) => panic!("expected an error, got success"),
        Err(e) => e.errno(),
    }
}

/// Unwraps, or fails with the errno (not the Debug text) of the error.
#[track_caller]
fn ok<T>(r: FsResult<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("errno {} ({e})", e.errno()),
    }
}

/// Creates `path` (its directory must exist) and returns its inode and a read-write handle.
fn create(fs: &Fs, path: &str) -> (u64, u64) {
    let (dir, name) = parent_of(fs, path);
    let (attr, fh) = ok(fs.create(dir, name, FILE, libc::O_RDWR | libc::O_CREAT, caller()));
    assert_eq!(attr.kind, Kind::File);
    assert_eq!(attr.size, 0);
    (attr.ino, fh)
}

/// Creates `path` holding `data` (written in one request) and closes it.
fn write_file(fs: &Fs, path: &str, data: &[u8]) -> u64 {
    let (ino, fh) = create(fs, path);
    assert_eq!(ok(fs.write(fh, 0, data)), data.len());
    fs.release(fh);
    ino
}

/// `len` bytes at `off` through `fh`, read as the kernel does: requests until a short one.
fn read_at(fs: &Fs, fh: u64, off: u64, len: usize) -> FsResult<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    while out.len() < len {
        let want = (len - out.len()).min(kmsfs::fuse::MAX_IO as usize) as u32;
        let n = fs.read(fh, off + out.len() as u64, want, &mut buf)?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    Ok(out)
}

/// The whole content of the file at `path`, through a new read-only handle.
fn read_path(fs: &Fs, path: &str) -> FsResult<Vec<u8>> {
    let fh = fs.open(ino(fs, path), libc::O_RDONLY)?;
    let r = read_at(fs, fh, 0, usize::MAX >> 1);
    fs.release(fh);
    r
}

fn size(fs: &Fs, ino: u64) -> u64 {
    ok(fs.getattr(ino)).size
}

fn set_size(fs: &Fs, ino: u64, fh: Option<u64>, size: u64) -> FsResult<()> {
    let set = SetAttr {
        size: Some(size),
        ..SetAttr::default()
    };
    fs.setattr(ino, fh, set).map(|a| assert_eq!(a.size, size))
}

/// Names in a directory as readdir lists them (without `.` and `..`), sorted.
fn list(fs: &Fs, dir: u64) -> Vec<Vec<u8>> {
    let fh = ok(fs.opendir(dir));
    let mut names: Vec<Vec<u8>> = ok(fs.readdir(dir, fh, 0, caller()))
        .into_iter()
        .map(|(_, e)| e.name.as_bytes().to_vec())
        .filter(|n| n != b"." && n != b"..")
        .collect();
    fs.releasedir(fh);
    names.sort();
    names
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

#[test]
fn round_trips_at_block_edges() {
    let mut h = InProcess::new();
    let sizes = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1];
    for (i, &n) in sizes.iter().enumerate() {
        let data = pseudo_random(n, i as u64 + 1);
        let path = format!("f{n}");
        let (ino, fh) = create(h.fs(), &path);
        assert_eq!(ok(h.fs().write(fh, 0, &data)), n);
        assert_eq!(size(h.fs(), ino), n as u64, "size while open");
        assert_eq!(ok(read_at(h.fs(), fh, 0, n + 10)), data, "same handle");
        h.fs().release(fh);
        assert_eq!(size(h.fs(), ino), n as u64, "size from the backing length");
        assert_eq!(ok(read_path(h.fs(), &path)), data, "reopened");
    }
    // Every backing file is header + records, nothing more.
    let mut lens: Vec<u64> = h
        .vol
        .backing_files()
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .collect();
    lens.sort();
    let mut want: Vec<u64> = sizes.iter().map(|&n| LAYOUT.backing_len(n as u64)).collect();
    want.sort();
    assert_eq!(lens, want);

    // A new Fs has no key cached: every open unwraps through the keystore.
    h.remount();
    for (i, &n) in sizes.iter().enumerate() {
        let data = pseudo_random(n, i as u64 + 1);
        assert_eq!(ok(read_path(h.fs(), &format!("f{n}"))), data, "after remount");
    }
    assert_eq!(
        h.fs().stats.kms_calls.load(std::sync::atomic::Ordering::Relaxed),
        sizes.len() as u64
    );
}

#[test]
fn reads_across_block_boundaries() {
    let h = InProcess::new();
    let fs = h.fs();
    let n = 3 * BLOCK + 100;
    let data = pseudo_random(n, 7);
    let (ino, fh) = create(fs, "f");
    // Appended in odd-sized pieces, so blocks are finished by several writes each.
    for chunk in data.chunks(4096 + 7).enumerate() {
        let off = chunk.0 * (4096 + 7);
        assert_eq!(ok(fs.write(fh, off as u64, chunk.1)), chunk.1.len());
    }
    fs.release(fh);
    assert_eq!(size(fs, ino), n as u64);
    let fh = ok(fs.open(ino, libc::O_RDONLY));
    let b = BLOCK;
    for (off, len) in [
        (0, n),
        (b - 1, 2),
        (b - 10, 20),
        (b, b),
        (2 * b - 5, b + 10),
        (b / 2, 2 * b),
        (3 * b - 1, 101),
        (n - 1, 10),
        (n, 10),
        (10 * b, 1),
    ] {
        let got = ok(read_at(fs, fh, off as u64, len));
        let want = &data[off.min(n)..(off + len).min(n)];
        assert!(
            got == want,
            "read of {len} at {off}: {} bytes, differs",
            got.len()
        );
    }
    // One request covering four records (decrypted in parallel).
    let mut buf = Vec::new();
    assert_eq!(ok(fs.read(fh, 5, 4 * BLOCK_SIZE as u32, &mut buf)), n - 5);
    assert!(buf[..n - 5] == data[5..]);
    fs.release(fh);
}

#[test]
fn truncate_down_and_up() {
    let mut h = InProcess::new();
    let mut model = pseudo_random(3 * BLOCK + 500, 3);
    let f = write_file(h.fs(), "f", &model);
    let fh = ok(h.fs().open(f, libc::O_RDWR));
    let steps: [(u64, bool); 9] = [
        (2 * BLOCK_SIZE + 7, true), // down, inside a block
        (2 * BLOCK_SIZE, true),     // down, onto a block boundary
        (BLOCK_SIZE - 1, false),    // down, by path (no handle)
        (BLOCK_SIZE - 1, true),     // unchanged
        (BLOCK_SIZE + 10, true),    // up, past the final block
        (BLOCK_SIZE + 20, false),   // up, inside the final block
        (5 * BLOCK_SIZE + 3, true), // up, over holes
        (0, false),                 // to nothing
        (1, true),                  // and a byte
    ];
    for (new, with_handle) in steps {
        let handle = with_handle.then_some(fh);
        ok(set_size(h.fs(), f, handle, new));
        model.resize(new as usize, 0);
        assert_eq!(size(h.fs(), f), new);
        let got = read_at(h.fs(), fh, 0, model.len() + 1)
            .unwrap_or_else(|e| panic!("read after truncate to {new}: errno {}", e.errno()));
        assert!(got == model, "content after truncate to {new}");
    }
    h.fs().release(fh);

    // Straight from several blocks down to a block boundary, then read cold from disk.
    let data = pseudo_random(3 * BLOCK + 500, 4);
    let g = write_file(h.fs(), "g", &data);
    ok(set_size(h.fs(), g, None, 2 * BLOCK_SIZE));
    h.remount();
    assert!(ok(read_path(h.fs(), "g")) == data[..2 * BLOCK], "g after remount");
    assert_eq!(ok(read_path(h.fs(), "f")), model, "f after remount");

    // Truncate is for regular files only.
    ok(h.fs().mkdir(ROOT_INO, os("d"), 0o755, caller()));
    assert_eq!(errno(set_size(h.fs(), ino(h.fs(), "d"), None, 0)), libc::EINVAL);
}

#[test]
fn rename_over_an_existing_file() {
    let h = InProcess::new();
    let fs = h.fs();
    write_file(fs, "a", b"alpha");
    let b = write_file(fs, "b", b"beta");
    let old_b = ok(fs.open(b, libc::O_RDONLY));

    assert_eq!(
        errno(fs.rename(ROOT_INO, os("a"), ROOT_INO, os("b"), libc::RENAME_NOREPLACE)),
        libc::EEXIST
    );
    ok(fs.rename(ROOT_INO, os("a"), ROOT_INO, os("b"), 0));
    assert_eq!(errno(lookup_path(fs, "a")), libc::ENOENT);
    assert_eq!(ok(read_path(fs, "b")), b"alpha");
    assert_eq!(list(fs, ROOT_INO), vec![b"b".to_vec()]);
    // The replaced file is gone from the tree, not from its open handle.
    assert_eq!(ok(read_at(fs, old_b, 0, 100)), b"beta");
    fs.release(old_b);

    // Into another directory: the name is encrypted again under that directory's id.
    ok(fs.mkdir(ROOT_INO, os("d"), 0o755, caller()));
    let d = ino(fs, "d");
    ok(fs.rename(ROOT_INO, os("b"), d, os("c"), 0));
    assert_eq!(ok(read_path(fs, "d/c")), b"alpha");
    assert_eq!(list(fs, d), vec![b"c".to_vec()]);
    assert!(list(fs, ROOT_INO) == vec![b"d".to_vec()]);

    // Exchange swaps two entries.
    write_file(fs, "e", b"epsilon");
    ok(fs.rename(ROOT_INO, os("e"), d, os("c"), libc::RENAME_EXCHANGE));
    assert_eq!(ok(read_path(fs, "e")), b"alpha");
    assert_eq!(ok(read_path(fs, "d/c")), b"epsilon");
}

#[test]
fn unlinked_open_file_keeps_its_handle() {
    let h = InProcess::new();
    let fs = h.fs();
    let data = pseudo_random(BLOCK + 10, 5);
    let (ino, fh) = create(fs, "f");
    ok(fs.write(fh, 0, &data));
    ok(fs.unlink(ROOT_INO, os("f")));
    assert_eq!(errno(lookup_path(fs, "f")), libc::ENOENT);
    assert!(list(fs, ROOT_INO).is_empty());
    // The handle reads, writes and stats on (the kernel keeps its reference until close).
    assert!(ok(read_at(fs, fh, 0, 2 * BLOCK)) == data);
    ok(fs.write(fh, BLOCK as u64, b"more"));
    assert_eq!(ok(read_at(fs, fh, BLOCK as u64, 4)), b"more");
    let attr = ok(fs.getattr(ino));
    assert_eq!((attr.nlink, attr.size), (0, BLOCK as u64 + 10));
    fs.release(fh);
    // A new file of the same name is a new file.
    write_file(fs, "f", b"new");
    assert_eq!(ok(read_path(fs, "f")), b"new");
}

#[test]
fn rmdir_of_a_non_empty_directory_is_enotempty() {
    let h = InProcess::new();
    let fs = h.fs();
    let long = "n".repeat(200);
    let d = ok(fs.mkdir(ROOT_INO, os("d"), 0o755, caller())).ino;
    write_file(fs, "d/f", b"x");
    assert_eq!(errno(fs.rmdir(ROOT_INO, os("d"))), libc::ENOTEMPTY);
    ok(fs.unlink(d, os("f")));
    // A long name is an entry and a sidecar: still not empty.
    write_file(fs, &format!("d/{long}"), b"y");
    assert_eq!(errno(fs.rmdir(ROOT_INO, os("d"))), libc::ENOTEMPTY);
    ok(fs.unlink(d, os(&long)));
    // A directory over a non-empty one: ENOTEMPTY; over an empty one: replaced.
    ok(fs.mkdir(ROOT_INO, os("e"), 0o755, caller()));
    write_file(fs, "e/g", b"z");
    let e = ino(fs, "e");
    ok(fs.mkdir(ROOT_INO, os("full"), 0o755, caller()));
    write_file(fs, "full/h", b"w");
    assert_eq!(
        errno(fs.rename(ROOT_INO, os("e"), ROOT_INO, os("full"), 0)),
        libc::ENOTEMPTY
    );
    ok(fs.rename(ROOT_INO, os("e"), ROOT_INO, os("d"), 0));
    assert_eq!(
        ok(read_path(fs, "d/g")),
        b"z",
        "a moved directory keeps its names"
    );
    assert_eq!(ino(fs, "d"), e);
    ok(fs.unlink(e, os("g")));
    ok(fs.rmdir(ROOT_INO, os("d")));
    assert_eq!(errno(lookup_path(fs, "d")), libc::ENOENT);
    assert_eq!(errno(fs.rmdir(ROOT_INO, os("d"))), libc::ENOENT);
    assert_eq!(errno(fs.rmdir(ino(fs, "full"), os("h"))), libc::ENOTDIR);
    assert_eq!(list(fs, ROOT_INO), vec![b"full".to_vec()]);
}

#[test]
fn reserved_backing_names_look_absent() {
    // Encrypted names: the config's backing name is not any plaintext name's, so a file of
    // that name is just a file and the config is out of reach.
    let mut h = InProcess::new();
    let config = h.vol.backing.join("kmsfs.json");
    let before = std::fs::read(&config).unwrap();
    assert_eq!(errno(lookup_path(h.fs(), "kmsfs.json")), libc::ENOENT);
    assert!(list(h.fs(), ROOT_INO).is_empty());
    write_file(h.fs(), "kmsfs.json", b"mine");
    assert_eq!(ok(read_path(h.fs(), "kmsfs.json")), b"mine");
    assert_eq!(std::fs::read(&config).unwrap(), before);
    h.remount();
    assert_eq!(ok(read_path(h.fs(), "kmsfs.json")), b"mine");

    // Plaintext names: the root's kmsfs files look absent and cannot be made.
    let h = InProcess::create(&std::env::temp_dir(), &["--plaintext-names"], Options::default());
    let fs = h.fs();
    assert_eq!(errno(lookup_path(fs, "kmsfs.json")), libc::ENOENT);
    assert_eq!(errno(lookup_path(fs, ".kmsfs.lock")), libc::ENOENT);
    assert!(list(fs, ROOT_INO).is_empty(), "{:?}", list(fs, ROOT_INO));
    let flags = libc::O_RDWR | libc::O_CREAT;
    assert_eq!(
        errno(fs.create(ROOT_INO, os("kmsfs.json"), FILE, flags, caller())),
        libc::EPERM
    );
    assert_eq!(
        errno(fs.mkdir(ROOT_INO, os("kmsfs.json"), 0o755, caller())),
        libc::EPERM
    );
    write_file(fs, "x", b"x");
    assert_eq!(
        errno(fs.rename(ROOT_INO, os("x"), ROOT_INO, os("kmsfs.json"), 0)),
        libc::EPERM
    );
    // Only in the root: elsewhere the name is an ordinary one.
    let d = ok(fs.mkdir(ROOT_INO, os("d"), 0o755, caller())).ino;
    ok(fs.rename(ROOT_INO, os("x"), d, os("kmsfs.json"), 0));
    assert_eq!(ok(read_path(fs, "d/kmsfs.json")), b"x");
}

#[test]
fn long_names_round_trip() {
    let mut h = InProcess::new();
    let long = format!("long-{}", "é".repeat(100)); // 205 bytes
    assert!(long.len() > 175);
    let data = pseudo_random(1000, 9);
    write_file(h.fs(), &long, &data);
    assert_eq!(list(h.fs(), ROOT_INO), vec![long.as_bytes().to_vec()]);
    // The backing entry needs a sidecar for its name.
    let backing: Vec<String> = std::fs::read_dir(&h.vol.backing)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        backing
            .iter()
            .any(|n| n.starts_with("kmsfs.long.") && n.ends_with(".name")),
        "{backing:?}"
    );
    h.remount();
    assert_eq!(ok(read_path(h.fs(), &long)), data);

    let fs = h.fs();
    let d = ok(fs.mkdir(ROOT_INO, os("d"), 0o755, caller())).ino;
    let other = "z".repeat(255);
    ok(fs.rename(ROOT_INO, os(&long), d, os(&other), 0));
    assert_eq!(ok(read_path(fs, &format!("d/{other}"))), data);
    assert_eq!(list(fs, d), vec![other.as_bytes().to_vec()]);
    assert!(list(fs, ROOT_INO) == vec![b"d".to_vec()]);
    let too_long = "z".repeat(256);
    assert_eq!(errno(fs.lookup(d, os(&too_long))), libc::ENAMETOOLONG);
    let flags = libc::O_RDWR | libc::O_CREAT;
    assert_eq!(
        errno(fs.create(d, os(&too_long), FILE, flags, caller())),
        libc::ENAMETOOLONG
    );
    ok(fs.unlink(d, os(&other)));
    // No sidecar is left behind anywhere.
    let left: Vec<_> = walkdir(&h.vol.backing)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("kmsfs.long."))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

fn walkdir(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walkdir(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn symlink_and_readlink() {
    let mut h = InProcess::new();
    let target = "some/target/../with spaces/ünïcode";
    let attr = ok(h.fs().symlink(ROOT_INO, os("l"), os(target), caller()));
    assert_eq!(attr.kind, Kind::Symlink);
    assert_eq!(attr.size, target.len() as u64, "size is the plaintext target's");
    assert_eq!(ok(h.fs().readlink(attr.ino)), target.as_bytes());
    let long = "t".repeat(1000);
    let l2 = ok(h.fs().symlink(ROOT_INO, os("l2"), os(&long), caller())).ino;
    assert_eq!(ok(h.fs().readlink(l2)), long.as_bytes());
    h.remount();
    let fs = h.fs();
    let attr = ok(lookup_path(fs, "l"));
    assert_eq!((attr.kind, attr.size), (Kind::Symlink, target.len() as u64));
    assert_eq!(ok(fs.readlink(attr.ino)), target.as_bytes());
    // A target that no longer fits PATH_MAX once encrypted.
    let huge = "t".repeat(4000);
    assert_eq!(
        errno(fs.symlink(ROOT_INO, os("l3"), os(&huge), caller())),
        libc::ENAMETOOLONG
    );
    assert_eq!(errno(lookup_path(fs, "l3")), libc::ENOENT);
    // The backing symlinks hold no plaintext.
    for p in walkdir(&h.vol.backing) {
        if let Ok(t) = std::fs::read_link(&p) {
            let t = t.as_os_str().as_bytes();
            assert!(!t.windows(11).any(|w| w == b"with spaces") && !t.starts_with(b"ttt"));
        }
    }
}

#[test]
fn xattrs_set_get_list_remove() {
    let h = InProcess::new();
    let fs = h.fs();
    let f = write_file(fs, "f", b"x");
    let d = ok(fs.mkdir(ROOT_INO, os("d"), 0o755, caller())).ino;
    for ino in [f, d] {
        let big = pseudo_random(1000, 11);
        ok(fs.setxattr(ino, os("user.a"), b"1", 0));
        ok(fs.setxattr(ino, os("user.plate"), &big, 0));
        assert_eq!(ok(fs.getxattr(ino, os("user.a"))), b"1");
        assert_eq!(ok(fs.getxattr(ino, os("user.plate"))), big);
        let mut names: Vec<&[u8]> = Vec::new();
        let listed = ok(fs.listxattr(ino));
        names.extend(listed.split(|&b| b == 0).filter(|n| !n.is_empty()));
        names.sort();
        assert_eq!(names, vec![&b"user.a"[..], b"user.plate"]);
        assert_eq!(
            errno(fs.setxattr(ino, os("user.a"), b"2", libc::XATTR_CREATE)),
            libc::EEXIST
        );
        assert_eq!(
            errno(fs.setxattr(ino, os("user.b"), b"2", libc::XATTR_REPLACE)),
            libc::ENODATA
        );
        ok(fs.setxattr(ino, os("user.a"), b"22", libc::XATTR_REPLACE));
        assert_eq!(ok(fs.getxattr(ino, os("user.a"))), b"22");
        ok(fs.removexattr(ino, os("user.a")));
        assert_eq!(errno(fs.getxattr(ino, os("user.a"))), libc::ENODATA);
        assert_eq!(errno(fs.removexattr(ino, os("user.a"))), libc::ENODATA);
        assert_eq!(errno(fs.getxattr(ino, os("user.never"))), libc::ENODATA);
        // Other namespaces are not stored.
        assert_eq!(errno(fs.getxattr(ino, os("security.selinux"))), libc::ENODATA);
        assert_eq!(
            errno(fs.setxattr(ino, os("trusted.x"), b"v", 0)),
            libc::EOPNOTSUPP
        );
        // Names too long for the backing store once encrypted (or at all).
        let name = format!("user.{}", "n".repeat(250));
        assert_eq!(errno(fs.setxattr(ino, os(&name), b"v", 0)), libc::ERANGE);
        let name = format!("user.{}", "n".repeat(251));
        assert_eq!(errno(fs.setxattr(ino, os(&name), b"v", 0)), libc::ERANGE);
        let name = format!("user.{}", "n".repeat(100));
        ok(fs.setxattr(ino, os(&name), b"v", 0));
        assert_eq!(ok(fs.getxattr(ino, os(&name))), b"v");
    }
    // The backing objects carry encrypted attribute names only.
    for p in h
        .vol
        .backing_files()
        .iter()
        .chain([&h.vol.backing.join(backing_name_of_dir(&h))])
    {
        let names = backing_xattr_names(p);
        assert!(!names.is_empty(), "{p:?} has its attributes");
        assert!(!names.windows(5).any(|w| w == b"plate"), "{p:?}: {names:?}");
    }
}

/// The backing name of the one directory in the backing root.
fn backing_name_of_dir(h: &InProcess) -> std::path::PathBuf {
    std::fs::read_dir(&h.vol.backing)
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| e.file_type().unwrap().is_dir())
        .expect("a backing directory")
        .file_name()
        .into()
}

/// listxattr(2) of a backing path, NUL-separated.
fn backing_xattr_names(p: &std::path::Path) -> Vec<u8> {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 65536];
    // SAFETY: a valid NUL-terminated path and a buffer of the length passed.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0, "listxattr {p:?}: {}", std::io::Error::last_os_error());
    buf.truncate(n as usize);
    buf
}

#[test]
fn lock_refuses_everything_and_drops_keys() {
    let mut h = InProcess::new();
    let fs = h.fs();
    let data = pseudo_random(BLOCK + 1, 12);
    let f = write_file(fs, "f", &data);
    let g = write_file(fs, "g", b"g");
    let fh = ok(fs.open(f, libc::O_RDWR));
    ok(fs.mkdir(ROOT_INO, os("d"), 0o755, caller()));
    let dh = ok(fs.opendir(ROOT_INO));
    assert!(fs.cached_keys() >= 2);
    assert!(!fs.is_locked());

    let invalidated = fs.lock();
    assert!(invalidated.contains(&f) && invalidated.contains(&g));
    assert!(fs.is_locked());
    assert_eq!(errno(fs.guard()), libc::ENOKEY);
    assert_eq!(fs.cached_keys(), 0, "cached keys dropped");
    // Everything that needs a key or hands out a handle refuses.
    assert_eq!(errno(fs.open(f, libc::O_RDONLY)), libc::ENOKEY);
    assert_eq!(errno(fs.open(g, libc::O_RDONLY)), libc::ENOKEY);
    assert_eq!(errno(fs.opendir(ROOT_INO)), libc::ENOKEY);
    assert_eq!(
        errno(fs.create(ROOT_INO, os("new"), FILE, libc::O_RDWR | libc::O_CREAT, caller())),
        libc::ENOKEY
    );
    // Handles opened before the lock are gone with their keys. (The adapter answers ENOKEY
    // before it reaches them: every request starts with `guard`.)
    assert_eq!(errno(read_at(fs, fh, 0, 10)), libc::EBADF);
    assert_eq!(errno(fs.write(fh, 0, b"x")), libc::EBADF);
    assert_eq!(errno(fs.readdir(ROOT_INO, dh, 0, caller())), libc::EBADF);
    assert_eq!(fs.cached_keys(), 0, "nothing cached after the lock");
    fs.release(fh);

    // The lock is the mount's, not the volume's: a new mount reads again.
    h.remount();
    assert!(ok(read_path(h.fs(), "f")) == data);
}

#[test]
fn tampered_ciphertext_fails_only_its_block() {
    let h = InProcess::new();
    let fs = h.fs();
    let n = 3 * BLOCK + 100;
    let data = pseudo_random(n, 13);
    let f = write_file(fs, "f", &data);
    let files = h.vol.backing_files();
    assert_eq!(files.len(), 1);
    let backing = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&files[0])
        .unwrap();
    let flip = |block: u64, at: u64| {
        let off = LAYOUT.record_offset(block) + 12 + at; // past the nonce: ciphertext
        let mut b = [0u8];
        backing.read_exact_at(&mut b, off).unwrap();
        backing.write_all_at(&[b[0] ^ 0x20], off).unwrap();
    };
    flip(1, 100);
    let fh = ok(fs.open(f, libc::O_RDONLY));
    let b = BLOCK as u64;
    assert!(ok(read_at(fs, fh, 0, BLOCK)) == data[..BLOCK], "block 0");
    assert_eq!(errno(read_at(fs, fh, b, 10)), libc::EIO, "block 1");
    assert_eq!(
        errno(read_at(fs, fh, b - 1, 2)),
        libc::EIO,
        "a read touching block 1"
    );
    assert!(
        ok(read_at(fs, fh, 2 * b, BLOCK)) == data[2 * BLOCK..3 * BLOCK],
        "block 2"
    );
    assert!(
        ok(read_at(fs, fh, 3 * b, 1000)) == data[3 * BLOCK..],
        "final block"
    );
    assert!(fs.stats.auth_failures.load(std::sync::atomic::Ordering::Relaxed) >= 2);
    // Damage in the final block fails that block alone too.
    flip(3, 50);
    assert_eq!(errno(read_at(fs, fh, 3 * b, 10)), libc::EIO);
    assert!(ok(read_at(fs, fh, 2 * b, BLOCK)) == data[2 * BLOCK..3 * BLOCK]);
    // A write into the damaged block that needs its old bytes fails; the rest stays intact.
    fs.release(fh);
    let fh = ok(fs.open(f, libc::O_RDWR));
    assert_eq!(errno(fs.write(fh, b + 5, b"x")), libc::EIO);
    assert!(ok(read_at(fs, fh, 0, BLOCK)) == data[..BLOCK]);
    // Overwriting the whole block replaces the damage.
    ok(fs.write(fh, b, &data[BLOCK..2 * BLOCK]));
    assert!(ok(read_at(fs, fh, 0, 3 * BLOCK)) == data[..3 * BLOCK]);
    fs.release(fh);
}

#[test]
fn a_disabled_key_fails_cold_opens_but_open_handles_keep_reading() {
    let mut h = InProcess::new();
    let a_data = pseudo_random(2 * BLOCK + 3, 14);
    write_file(h.fs(), "a", &a_data);
    write_file(h.fs(), "b", b"bee");
    // A new mount: no key cached yet.
    h.remount();
    let fs = h.fs();
    let a = ino(fs, "a");
    let b = ino(fs, "b");
    let fh = ok(fs.open(a, libc::O_RDWR));

    h.set_key_enabled(false);
    let fs = h.fs();
    let cold = fs.open(b, libc::O_RDONLY);
    assert!(
        matches!(cold, Err(FsError::Kms(KmsError::Denied(_)))),
        "cold open: {:?}",
        cold.as_ref().err()
    );
    assert_eq!(errno(cold), libc::EACCES);
    assert_eq!(h.events.denied.load(std::sync::atomic::Ordering::SeqCst), 1);
    // New files need the KMS too.
    let flags = libc::O_RDWR | libc::O_CREAT;
    assert_eq!(
        errno(fs.create(ROOT_INO, os("c"), FILE, flags, caller())),
        libc::EACCES
    );
    assert_eq!(errno(lookup_path(fs, "c")), libc::ENOENT, "no half-made file");
    // The open file keeps its key: reads, writes, and a second open share it.
    assert!(ok(read_at(fs, fh, 0, 3 * BLOCK)) == a_data);
    ok(fs.write(fh, 0, b"still"));
    let fh2 = ok(fs.open(a, libc::O_RDONLY));
    assert_eq!(ok(read_at(fs, fh2, 0, 5)), b"still");
    fs.release(fh2);
    fs.release(fh);

    // A mount is refused while the key is disabled; it works again once re-enabled.
    let refused = h.try_remount().expect_err("mount refused");
    assert_eq!(refused.cause, kmsfs::exit::Cause::Denied, "{}", refused.message);
    h.set_key_enabled(true);
    h.remount();
    assert_eq!(ok(read_path(h.fs(), "b")), b"bee");
    assert_eq!(ok(read_path(h.fs(), "a"))[..5], *b"still");
}

#[test]
fn hard_links_share_one_inode() {
    let h = InProcess::new();
    let fs = h.fs();
    let f = write_file(fs, "f", b"shared");
    let d = ok(fs.mkdir(ROOT_INO, os("d"), 0o755, caller())).ino;
    let attr = ok(fs.link(f, d, os("g")));
    assert_eq!((attr.ino, attr.nlink), (f, 2));
    assert_eq!(ino(fs, "d/g"), f);
    let fh = ok(fs.open(f, libc::O_RDWR));
    ok(fs.write(fh, 0, b"SH"));
    assert_eq!(ok(read_path(fs, "d/g")), b"SHared");
    fs.release(fh);
    ok(fs.unlink(ROOT_INO, os("f")));
    assert_eq!(ok(read_path(fs, "d/g")), b"SHared");
    assert_eq!(ok(fs.getattr(f)).nlink, 1);
    assert_eq!(errno(fs.link(f, d, os("g"))), libc::EEXIST);
    assert_eq!(errno(fs.link(d, ROOT_INO, os("dd"))), libc::EPERM);
}

#[test]
fn forget_drops_an_inode_after_its_last_lookup() {
    let h = InProcess::new();
    let fs = h.fs();
    write_file(fs, "f", b"x");
    // `create` counted one reference; two lookups make three.
    let f = ino(fs, "f");
    assert_eq!(ino(fs, "f"), f);
    let count = fs.inode_count();
    fs.forget(f, 2);
    assert_eq!(ok(fs.getattr(f)).size, 1, "one reference left");
    fs.forget(f, 1);
    assert_eq!(errno(fs.getattr(f)), libc::ESTALE);
    assert_eq!(fs.inode_count(), count - 1);
    // The root is never forgotten.
    fs.forget(ROOT_INO, 100);
    ok(fs.getattr(ROOT_INO));
    // Looked up again, the file is a new inode of the core with the same content.
    let f2 = ino(fs, "f");
    assert_ne!(f2, f);
    assert_eq!(ok(read_path(fs, "f")), b"x");
}

#[test]
fn handles_enforce_their_access_mode() {
    let h = InProcess::new();
    let fs = h.fs();
    let f = write_file(fs, "f", &[7u8; 100]);
    let ro = ok(fs.open(f, libc::O_RDONLY));
    assert_eq!(errno(fs.write(ro, 0, b"x")), libc::EBADF);
    assert_eq!(errno(fs.fallocate(ro, 0, 10, 0)), libc::EBADF);
    fs.release(ro);
    assert_eq!(errno(fs.read(ro, 0, 1, &mut Vec::new())), libc::EBADF, "released");
    let rw = ok(fs.open(f, libc::O_RDWR));
    assert_eq!(
        errno(fs.fallocate(rw, 0, 10, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)),
        libc::EOPNOTSUPP
    );
    ok(fs.fallocate(rw, 50, BLOCK_SIZE, 0));
    assert_eq!(size(fs, f), 50 + BLOCK_SIZE);
    let got = ok(read_at(fs, rw, 0, 2 * BLOCK));
    assert!(got[..100].iter().all(|&b| b == 7) && got[100..].iter().all(|&b| b == 0));
    ok(fs.fsync(rw, false));
    fs.release(rw);
    // A directory is not opened as a file.
    let d = ok(fs.mkdir(ROOT_INO, os("d"), 0o755, caller())).ino;
    assert_eq!(errno(fs.open(d, libc::O_RDONLY)), libc::EINVAL);
}

#[test]
fn readdir_lists_plaintext_names_and_resumes_at_an_offset() {
    let h = InProcess::new();
    let fs = h.fs();
    let long = "L".repeat(220);
    let d = ok(fs.mkdir(ROOT_INO, os("d"), 0o700, caller())).ino;
    write_file(fs, "d/file", b"");
    write_file(fs, &format!("d/{long}"), b"");
    ok(fs.mkdir(d, os("sub"), 0o700, caller()));
    ok(fs.symlink(d, os("link"), os("file"), caller()));
    let fh = ok(fs.opendir(d));
    let all = ok(fs.readdir(d, fh, 0, caller()));
    let mut seen: Vec<(Vec<u8>, Kind)> = all
        .iter()
        .map(|(_, e)| (e.name.as_bytes().to_vec(), e.kind))
        .collect();
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    let mut want = vec![
        (b".".to_vec(), Kind::Dir),
        (b"..".to_vec(), Kind::Dir),
        (b"file".to_vec(), Kind::File),
        (long.as_bytes().to_vec(), Kind::File),
        (b"link".to_vec(), Kind::Symlink),
        (b"sub".to_vec(), Kind::Dir),
    ];
    want.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(seen, want);
    // Offsets are the `next` values handed out: resuming after the third entry.
    let (third_next, _) = &all[2];
    let rest = ok(fs.readdir(d, fh, *third_next, caller()));
    let rest: Vec<_> = rest.iter().map(|(_, e)| e.name.clone()).collect();
    let want_rest: Vec<_> = all[3..].iter().map(|(_, e)| e.name.clone()).collect();
    assert_eq!(rest, want_rest);
    assert!(ok(fs.readdir(d, fh, all.last().unwrap().0, caller())).is_empty());
    fs.releasedir(fh);
    assert_eq!(errno(fs.readdir(d, fh, 0, caller())), libc::EBADF);
}

/// How `open_then` answered: on which thread, with what.
fn open_then(fs: &std::sync::Arc<Fs>, ino: u64) -> (Option<String>, Result<u64, i32>) {
    let (tx, rx) = std::sync::mpsc::channel();
    fs.open_then(ino, libc::O_RDONLY, common::inprocess::caller(), move |r| {
        let thread = std::thread::current().name().map(str::to_owned);
        let _ = tx.send((thread, r.map_err(|e| e.errno())));
    });
    rx.recv_timeout(std::time::Duration::from_secs(10))
        .expect("open_then answers")
}

#[test]
fn only_an_open_that_needs_the_kms_leaves_the_callers_thread() {
    let h = InProcess::new();
    let fs = h.shared();
    let f = write_file(&fs, "f", b"cached");
    let me = std::thread::current().name().map(str::to_owned);
    // The key of a file just written is cached: answered on the caller's thread.
    let (thread, r) = open_then(&fs, f);
    assert_eq!(thread, me);
    let fh = r.expect("opened");
    fs.release(fh);
    // A cold filesystem on the same volume needs the KMS: a KMS waiter answers.
    let cold = std::sync::Arc::new(h.open().unwrap_or_else(|e| panic!("{}", e.message)));
    let f = ino(&cold, "f");
    let (thread, r) = open_then(&cold, f);
    assert_eq!(thread.as_deref(), Some("kmsfs-kms-wait"));
    let fh = r.expect("opened");
    cold.release(fh);
    // Locked: refused at once, on the caller's thread.
    cold.lock();
    let (thread, r) = open_then(&cold, f);
    assert_eq!((thread, r), (me, Err(libc::ENOKEY)));
}
