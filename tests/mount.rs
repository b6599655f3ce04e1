//! Mounted integration tests: real FUSE mounts of real volumes through the kmsfs binary.

mod common;

use common::*;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};

const BLOCK: u64 = 65536;

#[test]
fn files_of_boundary_sizes_round_trip_and_survive_remount() {
    let mut v = Volume::mounted();
    let sizes = [0usize, 1, 65535, 65536, 65537, 10 * 1024 * 1024 + 3];
    let mut originals = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        let data = pseudo_random(size, i as u64 + 1);
        let src = v.dir.path().join(format!("src{i}"));
        std::fs::write(&src, &data).unwrap();
        // Copy in with cp, as a user would, and read back.
        let st = std::process::Command::new("cp")
            .arg(&src)
            .arg(v.m(&format!("f{i}")))
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(
            std::fs::metadata(v.m(&format!("f{i}"))).unwrap().len(),
            size as u64
        );
        assert!(
            std::fs::read(v.m(&format!("f{i}"))).unwrap() == data,
            "size {size}"
        );
        originals.push(data);
    }
    v.remount();
    for (i, data) in originals.iter().enumerate() {
        let out = v.dir.path().join(format!("out{i}"));
        std::fs::copy(v.m(&format!("f{i}")), &out).unwrap();
        assert!(
            std::fs::read(&out).unwrap() == *data,
            "after remount, size {}",
            data.len()
        );
    }
}

#[test]
fn backing_holds_only_ciphertext() {
    let v = Volume::mounted();
    let marker = b"PLAINTEXT-MARKER-4f1c9a";
    let mut content = Vec::new();
    for _ in 0..5000 {
        content.extend_from_slice(marker);
    }
    let doc = v.backing_of_new(|| std::fs::write(v.m("doc"), &content).unwrap());
    std::fs::create_dir(v.m("sub")).unwrap();
    std::fs::write(v.m("sub/small"), marker).unwrap();
    assert_eq!(std::fs::read(v.m("sub/small")).unwrap(), marker);
    assert!(!tree_contains(&v.backing, marker));
    assert!(!tree_contains(&v.backing, &marker[..12]));
    // Sizes translate: header + records.
    let b = std::fs::metadata(&doc).unwrap().len();
    assert_eq!(std::fs::metadata(v.m("doc")).unwrap().len(), content.len() as u64);
    assert!(b > content.len() as u64);
}

#[test]
fn random_offset_writes_match_a_reference_file() {
    let mut v = Volume::mounted();
    let reference_path = v.dir.path().join("reference");
    let mut reference = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&reference_path)
        .unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(v.m("video.bin"))
        .unwrap();
    let mut rng = 0x9e3779b97f4a7c15u64;
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    for i in 0..400u64 {
        let off = match next(4) {
            0 => next(8) * BLOCK + next(3),
            1 => (1 + next(8)) * BLOCK - 1,
            _ => next(8 * BLOCK),
        };
        let len = match next(3) {
            0 => 1 + next(100),
            1 => 1 + next(3 * BLOCK),
            _ => BLOCK,
        } as usize;
        if next(10) == 0 {
            let size = next(9 * BLOCK);
            f.set_len(size).unwrap();
            reference.set_len(size).unwrap();
            continue;
        }
        let data = pseudo_random(len, i + 7);
        f.write_all_at(&data, off).unwrap();
        reference.write_all_at(&data, off).unwrap();
        if i % 50 == 0 {
            // Read back a random window through the mount.
            let (ro, rl) = (next(9 * BLOCK), 1 + next(2 * BLOCK) as usize);
            let mut a = vec![0u8; rl];
            let mut b = vec![0u8; rl];
            let na = read_full_at(&f, &mut a, ro);
            let nb = read_full_at(&reference, &mut b, ro);
            assert_eq!(na, nb);
            assert!(a[..na] == b[..nb], "window at {ro}+{rl} differs after op {i}");
        }
    }
    drop(f);
    let mut expected = Vec::new();
    reference.seek(SeekFrom::Start(0)).unwrap();
    reference.read_to_end(&mut expected).unwrap();
    assert!(std::fs::read(v.m("video.bin")).unwrap() == expected);
    v.remount();
    assert!(
        std::fs::read(v.m("video.bin")).unwrap() == expected,
        "after remount"
    );
}

fn read_full_at(f: &File, buf: &mut [u8], off: u64) -> usize {
    let mut done = 0;
    while done < buf.len() {
        let n = f.read_at(&mut buf[done..], off + done as u64).unwrap();
        if n == 0 {
            break;
        }
        done += n;
    }
    done
}

#[test]
fn two_processes_write_disjoint_ranges_concurrently() {
    let v = Volume::mounted();
    let half = 3 * 1024 * 1024 + 12345; // not block aligned: both writers touch one block
    let a = pseudo_random(half, 1);
    let b = pseudo_random(half, 2);
    std::fs::write(v.dir.path().join("a"), &a).unwrap();
    std::fs::write(v.dir.path().join("b"), &b).unwrap();
    File::create(v.m("shared")).unwrap();
    // dd with an odd block size, notrunc: each process does many small read-modify-writes.
    let spawn = |src: &str, seek: usize| {
        std::process::Command::new("dd")
            .arg(format!("if={}", v.dir.path().join(src).display()))
            .arg(format!("of={}", v.m("shared").display()))
            .args(["bs=10000", "conv=notrunc", "oflag=seek_bytes", "status=none"])
            .arg(format!("seek={seek}"))
            .spawn()
            .unwrap()
    };
    let mut p1 = spawn("a", 0);
    let mut p2 = spawn("b", half);
    assert!(p1.wait().unwrap().success());
    assert!(p2.wait().unwrap().success());
    let got = std::fs::read(v.m("shared")).unwrap();
    assert_eq!(got.len(), 2 * half);
    assert!(got[..half] == a[..], "first half");
    assert!(got[half..] == b[..], "second half");
}

#[test]
fn threads_writing_interleaved_bytes_of_the_same_blocks_lose_nothing() {
    let v = Volume::mounted();
    let f = std::sync::Arc::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(v.m("interleaved"))
            .unwrap(),
    );
    let blocks = 16u64;
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let f = f.clone();
            std::thread::spawn(move || {
                for round in 0..blocks * 4 {
                    let b = round % blocks;
                    let off = b * BLOCK + t as u64 * 1000 + (round / blocks) * 100;
                    f.write_all_at(&[t + 1; 100], off).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let data = std::fs::read(v.m("interleaved")).unwrap();
    for b in 0..blocks {
        for t in 0..4u64 {
            for r in 0..4u64 {
                let off = (b * BLOCK + t * 1000 + r * 100) as usize;
                assert!(
                    data[off..off + 100].iter().all(|&x| x == t as u8 + 1),
                    "block {b} thread {t} round {r}"
                );
            }
        }
    }
}

#[test]
fn namespace_operations() {
    let v = Volume::mounted();
    std::fs::create_dir(v.m("d")).unwrap();
    std::fs::create_dir(v.m("d/e")).unwrap();
    std::fs::write(v.m("d/e/f"), b"one").unwrap();
    std::fs::write(v.m("g"), b"two").unwrap();
    // rename across directories and over an existing file
    std::fs::rename(v.m("d/e/f"), v.m("f2")).unwrap();
    assert_eq!(std::fs::read(v.m("f2")).unwrap(), b"one");
    std::fs::rename(v.m("g"), v.m("f2")).unwrap();
    assert_eq!(std::fs::read(v.m("f2")).unwrap(), b"two");
    assert!(!v.m("g").exists());
    // rename a directory with contents; an open file inside keeps working
    std::fs::write(v.m("d/e/inner"), b"inner").unwrap();
    let mut held = OpenOptions::new()
        .read(true)
        .write(true)
        .open(v.m("d/e/inner"))
        .unwrap();
    std::fs::rename(v.m("d"), v.m("d2")).unwrap();
    held.write_all(b"INNER").unwrap();
    drop(held);
    assert_eq!(std::fs::read(v.m("d2/e/inner")).unwrap(), b"INNER");
    // hard links share content (and the header)
    std::fs::hard_link(v.m("f2"), v.m("d2/link")).unwrap();
    assert_eq!(std::fs::metadata(v.m("f2")).unwrap().nlink(), 2);
    std::fs::write(v.m("d2/link"), b"changed via link").unwrap();
    assert_eq!(std::fs::read(v.m("f2")).unwrap(), b"changed via link");
    std::fs::remove_file(v.m("f2")).unwrap();
    assert_eq!(std::fs::read(v.m("d2/link")).unwrap(), b"changed via link");
    // symlinks
    std::os::unix::fs::symlink("d2/link", v.m("sym")).unwrap();
    assert_eq!(std::fs::read_link(v.m("sym")).unwrap().to_str(), Some("d2/link"));
    assert_eq!(std::fs::read(v.m("sym")).unwrap(), b"changed via link");
    // listing
    let mut names: Vec<_> = std::fs::read_dir(v.m("d2"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["e", "link"]);
    let root: Vec<_> = std::fs::read_dir(&v.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        !root.iter().any(|n| n.contains("kmsfs")),
        "volume files leak into the listing: {root:?}"
    );
    // rmdir only when empty
    assert_eq!(
        errno_of(&std::fs::remove_dir(v.m("d2")).unwrap_err()),
        libc::ENOTEMPTY
    );
    std::fs::remove_file(v.m("d2/e/inner")).unwrap();
    std::fs::remove_dir(v.m("d2/e")).unwrap();
    // chmod / utimens
    std::fs::set_permissions(v.m("d2/link"), std::fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(std::fs::metadata(v.m("d2/link")).unwrap().mode() & 0o777, 0o640);
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
    File::options()
        .write(true)
        .open(v.m("d2/link"))
        .unwrap()
        .set_modified(t)
        .unwrap();
    assert_eq!(std::fs::metadata(v.m("d2/link")).unwrap().modified().unwrap(), t);
    // the volume's own files cannot be reached or replaced through the mount: a file of the
    // same name is just a file (its backing name is encrypted)
    assert!(std::fs::read(v.m("kmsfs.json")).is_err());
    std::fs::write(v.m("kmsfs.json"), b"x").unwrap();
    assert_eq!(std::fs::read(v.m("kmsfs.json")).unwrap(), b"x");
    assert!(
        std::fs::read_to_string(v.backing.join("kmsfs.json"))
            .unwrap()
            .contains("format_version")
    );
}

#[test]
fn sparse_files_and_truncate() {
    let mut v = Volume::mounted();
    let mut opened = None;
    let sparse = v.backing_of_new(|| {
        opened = Some(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(v.m("sparse"))
                .unwrap(),
        )
    });
    let f = opened.unwrap();
    f.write_all_at(b"end", 10 * BLOCK + 5).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 10 * BLOCK + 8);
    let data = std::fs::read(v.m("sparse")).unwrap();
    assert!(data[..(10 * BLOCK + 5) as usize].iter().all(|&b| b == 0));
    assert_eq!(&data[(10 * BLOCK + 5) as usize..], b"end");
    // the hole is not allocated in the backing file
    let backing = std::fs::metadata(&sparse).unwrap();
    assert!(
        backing.blocks() * 512 < 4 * BLOCK,
        "backing file is not sparse: {} blocks",
        backing.blocks()
    );
    // truncate down into a block, then up again: the cut bytes read as zeros
    f.set_len(BLOCK + 10).unwrap();
    f.set_len(3 * BLOCK).unwrap();
    let data = std::fs::read(v.m("sparse")).unwrap();
    assert_eq!(data.len() as u64, 3 * BLOCK);
    assert!(data.iter().all(|&b| b == 0));
    f.write_all_at(b"abc", BLOCK + 7).unwrap();
    f.set_len(BLOCK + 9).unwrap();
    drop(f);
    v.remount();
    let data = std::fs::read(v.m("sparse")).unwrap();
    assert_eq!(data.len() as u64, BLOCK + 9);
    assert_eq!(&data[(BLOCK + 7) as usize..], b"ab");
    // O_TRUNC
    std::fs::write(v.m("sparse"), b"short").unwrap();
    assert_eq!(std::fs::read(v.m("sparse")).unwrap(), b"short");
    // fallocate mode 0 extends
    let st = std::process::Command::new("fallocate")
        .args(["-o", "0", "-l", &(3 * BLOCK).to_string()])
        .arg(v.m("sparse"))
        .status()
        .unwrap();
    assert!(st.success(), "fallocate failed");
    assert_eq!(std::fs::metadata(v.m("sparse")).unwrap().len(), 3 * BLOCK);
}

#[test]
fn mmap_write_then_read_after_remount() {
    let mut v = Volume::mounted();
    let size = 3 * BLOCK as usize + 100;
    std::fs::write(v.m("mapped"), vec![0u8; size]).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(v.m("mapped"))
        .unwrap();
    mmap_fill(&f, size, 0x5a);
    drop(f);
    v.remount();
    let data = std::fs::read(v.m("mapped")).unwrap();
    assert_eq!(data.len(), size);
    assert!(data.iter().all(|&b| b == 0x5a));
}

#[allow(unsafe_code)]
fn mmap_fill(f: &File, len: usize, byte: u8) {
    use std::os::fd::AsRawFd;
    // SAFETY: a fresh shared mapping of `len` bytes of an open file, written within bounds,
    // synced and unmapped before return.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "mmap failed");
        std::ptr::write_bytes(p as *mut u8, byte, len);
        assert_eq!(libc::msync(p, len, libc::MS_SYNC), 0);
        libc::munmap(p, len);
    }
}

#[test]
fn a_flipped_byte_fails_exactly_its_block() {
    let mut v = Volume::mounted();
    let data = pseudo_random(3 * BLOCK as usize, 9);
    let victim = v.backing_of_new(|| std::fs::write(v.m("victim"), &data).unwrap());
    v.unmount();
    // Flip one ciphertext byte in block 1: header 4096 + record 0 (65564) + nonce + 100.
    let f = OpenOptions::new().read(true).write(true).open(&victim).unwrap();
    let pos = 4096 + 65564 + 12 + 100;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, pos).unwrap();
    f.write_all_at(&[b[0] ^ 0x01], pos).unwrap();
    drop(f);
    v.mount(&[]);
    let f = File::open(v.m("victim")).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf[..] == data[..4096], "block 0 still reads");
    f.read_exact_at(&mut buf, 2 * BLOCK + 4096).unwrap();
    assert!(
        buf[..] == data[(2 * BLOCK + 4096) as usize..(2 * BLOCK + 8192) as usize],
        "block 2 still reads"
    );
    let err = f.read_exact_at(&mut buf, BLOCK + 10).unwrap_err();
    assert_eq!(errno_of(&err), libc::EIO);
    let log = v.log_text();
    assert!(log.contains("block 1 failed authentication"), "log: {log}");
    assert!(
        !log.contains("victim"),
        "the log names the file by id, not by name"
    );
}

#[test]
fn a_file_cut_at_a_block_boundary_reads_eio_at_its_end() {
    let mut v = Volume::mounted();
    let long =
        v.backing_of_new(|| std::fs::write(v.m("long"), pseudo_random(4 * BLOCK as usize, 3)).unwrap());
    v.unmount();
    let f = OpenOptions::new().write(true).open(&long).unwrap();
    f.set_len(4096 + 2 * 65564).unwrap();
    drop(f);
    v.mount(&[]);
    assert_eq!(std::fs::metadata(v.m("long")).unwrap().len(), 2 * BLOCK);
    let f = File::open(v.m("long")).unwrap();
    let mut buf = vec![0u8; 100];
    let err = f.read_exact_at(&mut buf, BLOCK + 5).unwrap_err();
    assert_eq!(errno_of(&err), libc::EIO);
}

#[test]
fn a_header_copied_from_another_file_does_not_open() {
    let mut v = Volume::mounted();
    let a = v.backing_of_new(|| std::fs::write(v.m("a"), b"secret a").unwrap());
    let b = v.backing_of_new(|| std::fs::write(v.m("b"), b"secret b").unwrap());
    v.unmount();
    let header_a = std::fs::read(&a).unwrap()[..4096].to_vec();
    let f = OpenOptions::new().write(true).open(&b).unwrap();
    f.write_all_at(&header_a, 0).unwrap();
    drop(f);
    v.mount(&[]);
    // b now claims a's id and key: its records were bound to b's id, so they fail.
    let err = std::fs::read(v.m("b")).unwrap_err();
    assert_eq!(errno_of(&err), libc::EIO);
    assert_eq!(std::fs::read(v.m("a")).unwrap(), b"secret a");
    // A garbled header is a clean EIO at open.
    let f = OpenOptions::new().write(true).open(&a).unwrap();
    f.write_all_at(b"garbage!", 0).unwrap();
    let err = File::open(v.m("a")).unwrap_err();
    assert_eq!(errno_of(&err), libc::EIO);
}

#[test]
fn a_disabled_key_fails_open_with_eacces_and_locks_the_mount() {
    let mut v = Volume::mounted();
    std::fs::write(v.m("f"), b"data").unwrap();
    v.remount(); // no cached key
    v.key("disable");
    let err = File::open(v.m("f")).unwrap_err();
    assert_eq!(errno_of(&err), libc::EACCES);
    // A denied key is a revocation: the daemon locks and goes away.
    assert!(
        v.wait_daemon_gone(10),
        "the daemon did not exit after the KMS denied a key"
    );
    assert!(!v.is_mounted());
}

#[test]
fn data_survives_key_rotation() {
    let mut v = Volume::mounted();
    std::fs::write(v.m("old"), b"before rotation").unwrap();
    v.key("rotate");
    std::fs::write(v.m("new"), b"after rotation").unwrap();
    v.remount();
    assert_eq!(std::fs::read(v.m("old")).unwrap(), b"before rotation");
    assert_eq!(std::fs::read(v.m("new")).unwrap(), b"after rotation");
}

/// A tmpfs mounted at `at` with `-o options`, unmounted (lazily) when the guard drops.
fn mount_tmpfs(at: &std::path::Path, options: &str) -> impl Drop {
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", options, "tmpfs"])
        .arg(at)
        .status()
        .unwrap();
    assert!(st.success(), "cannot mount a tmpfs");
    struct Umount(std::path::PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    Umount(at.to_path_buf())
}

#[test]
fn a_full_disk_fails_the_write_and_loses_nothing() {
    // A 3 MiB tmpfs as the backing filesystem.
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&small).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let _tmpfs = mount_tmpfs(&small, "size=3m");
    let backing = small.join("vol");
    let keystore = dir.path().join("ks");
    run_ok(&[
        "init",
        backing.to_str().unwrap(),
        "--keystore",
        keystore.to_str().unwrap(),
    ]);
    let log = dir.path().join("log");
    run_ok(&[
        "mount",
        backing.to_str().unwrap(),
        mnt.to_str().unwrap(),
        "--log-file",
        log.to_str().unwrap(),
    ]);
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = kmsfs()
                .args(["unmount", "--lazy", self.0.to_str().unwrap()])
                .output();
        }
    }
    let _m = Unmount(mnt.clone());

    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(mnt.join("big"))
        .unwrap();
    let chunk = pseudo_random(100_000, 5); // not block aligned: the last block is partial
    let mut written = 0u64;
    let err = loop {
        match f.write_all_at(&chunk, written) {
            Ok(()) => written += chunk.len() as u64,
            Err(e) => break e,
        }
        assert!(written < 10 << 20, "the 3 MiB filesystem never filled up");
    };
    assert_eq!(errno_of(&err), libc::ENOSPC, "{err}");
    assert!(written > 1 << 20);
    // Everything acknowledged reads back, and nothing past it appeared.
    let len = f.metadata().unwrap().len();
    assert!(
        len >= written && len < written + chunk.len() as u64,
        "size {len}, acknowledged {written}"
    );
    drop(f);
    let data = std::fs::read(mnt.join("big")).unwrap();
    for (i, c) in data[..written as usize].chunks(chunk.len()).enumerate() {
        assert!(c == &chunk[..c.len()], "chunk {i} damaged");
    }
    // Freeing space makes writes work again.
    std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("big"))
        .unwrap()
        .set_len(written / 2)
        .unwrap();
    std::fs::write(mnt.join("after"), b"room again").unwrap();
    assert_eq!(std::fs::read(mnt.join("after")).unwrap(), b"room again");

    // Block-aligned appends take the path that reserves nothing (the records overwrite
    // nothing): the disk filling during one must still lose nothing.
    std::fs::remove_file(mnt.join("big")).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(mnt.join("aligned"))
        .unwrap();
    let chunk = pseudo_random(4 * BLOCK as usize, 6);
    let mut written = 0u64;
    let err = loop {
        match f.write_all_at(&chunk, written) {
            Ok(()) => written += chunk.len() as u64,
            Err(e) => break e,
        }
        assert!(written < 10 << 20, "the 3 MiB filesystem never filled up");
    };
    assert_eq!(errno_of(&err), libc::ENOSPC, "{err}");
    let len = f.metadata().unwrap().len();
    assert!(
        len >= written && len < written + chunk.len() as u64,
        "size {len}, acknowledged {written}"
    );
    drop(f);
    let data = std::fs::read(mnt.join("aligned")).unwrap();
    assert!(data.len() as u64 >= written);
    for (i, c) in data[..written as usize].chunks(chunk.len()).enumerate() {
        assert!(c == &chunk[..c.len()], "aligned chunk {i} damaged");
    }
}

#[test]
fn the_kernel_sends_one_mebibyte_requests() {
    let mut v = Volume::new();
    v.mount_with_env(&[], &[("KMSFS_LOG", "info,kmsfs::fuse=trace")]);
    let data = pseudo_random(4 << 20, 11);
    let mut f = File::create(v.m("big")).unwrap();
    f.write_all(&data).unwrap();
    drop(f);
    v.unmount();
    let log = v.log_text();
    let big_writes = log.matches("write 1048576 bytes").count();
    assert_eq!(big_writes, 4, "expected four 1 MiB write requests; log:\n{log}");
}

/// A directory of the backing tree that is another filesystem (a tmpfs mounted there): a
/// create in it cannot take a file made ahead in the backing root (EXDEV), and makes its own.
#[test]
fn creates_work_in_a_directory_on_another_filesystem() {
    let mut v = Volume::mounted();
    let entries = |v: &Volume| -> std::collections::BTreeSet<std::path::PathBuf> {
        std::fs::read_dir(&v.backing)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    };
    let before = entries(&v);
    std::fs::create_dir(v.m("sub")).unwrap();
    let sub: Vec<_> = entries(&v).difference(&before).cloned().collect();
    assert_eq!(sub.len(), 1, "{sub:?}");
    let sub = sub[0].clone();
    v.unmount();
    // The directory's own entries (its id file) move onto a tmpfs mounted over it.
    let saved = tempfile::tempdir().unwrap();
    let own: Vec<_> = std::fs::read_dir(&sub)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    for p in &own {
        std::fs::copy(p, saved.path().join(p.file_name().unwrap())).unwrap();
    }
    let _tmpfs = mount_tmpfs(&sub, "size=4m,mode=0755");
    for p in &own {
        std::fs::copy(saved.path().join(p.file_name().unwrap()), p).unwrap();
    }
    v.mount(&[]);
    // Files are ready once a create in the root took one.
    create_until_one_is_made_ahead(&v, "");
    for i in 0..5 {
        let p = v.m(&format!("sub/f{i}"));
        std::fs::write(&p, i.to_string()).unwrap_or_else(|e| panic!("create in sub: {e}"));
        assert_eq!(std::fs::read_to_string(&p).unwrap(), i.to_string());
    }
    std::fs::write(v.m("second"), b"second").unwrap();
    v.unmount();
}

/// Sequential reads reach the daemon as 1 MiB requests: the mount's read-ahead is raised from
/// the kernel's 128 KiB default, which caps FUSE read requests whatever the daemon offers.
#[test]
fn the_mount_reads_ahead_a_whole_request() {
    let v = Volume::mounted();
    let dev = std::fs::metadata(v.m("")).unwrap().dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let ra = std::fs::read_to_string(format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb")).unwrap();
    assert_eq!(ra.trim(), "1024");
}
