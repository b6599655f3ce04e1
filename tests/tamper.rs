//! Tamper matrix: one byte of the backing directory changed at a time — in every class of
//! position (header fields, both key slots, nonces, ciphertext, tags, lengths, names, directory
//! ids, long-name sidecars, symlink targets, the config) — and the mounted volume read in full.
//! Every case must end cleanly: the right plaintext, EIO, a skipped entry, or a mount refused
//! with a message. Never different plaintext, never a dead daemon, never a name in the log.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const HEADER: u64 = 4096;
const SLOT: u64 = 2032;
/// Bytes a record adds to its block: nonce and tag.
const OVERHEAD: u64 = 28;

/// What one plaintext path reads as after a tamper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Seen {
    Intact,
    /// Some blocks read EIO, the rest read right.
    Eio,
    /// Refused with another errno (e.g. EACCES from the KMS).
    Refused,
    /// The entry is not listed (its name does not decrypt).
    Skipped,
    /// Reads as an empty file: a file cut back to its header (plus at most a torn tail) has
    /// no record left to carry the final-block flag. Documented in docs/design.md.
    Emptied,
    /// Different plaintext: the one outcome that must never happen.
    Wrong,
}

/// The volume's plaintext, per path: file contents, symlink targets.
struct Expect {
    files: BTreeMap<String, Vec<u8>>,
    links: BTreeMap<String, String>,
}

/// A volume of `BLOCK`-byte blocks with a few files (a small one, one of three blocks, one
/// just over a block), a long name and a symlink.
fn setup<const BLOCK: u64>() -> (Volume, Expect) {
    let block_size = BLOCK.to_string();
    let mut v = Volume::init_in(Path::new("/dev/shm"), &["--block-size", &block_size], &[]);
    v.mount(&[]);
    let mut files = BTreeMap::new();
    files.insert("small.txt".to_string(), b"licence plate XY-99-ZZ".to_vec());
    files.insert(
        "three-blocks.bin".to_string(),
        pseudo_random(3 * BLOCK as usize - 1000, 1),
    );
    files.insert(
        "faces/frame-0001.raw".to_string(),
        pseudo_random(BLOCK as usize + 7, 2),
    );
    files.insert(
        format!("faces/{}", "long-name-".repeat(20)),
        pseudo_random(100, 3),
    );
    std::fs::create_dir(v.m("faces")).unwrap();
    for (p, data) in &files {
        std::fs::write(v.m(p), data).unwrap();
    }
    let mut links = BTreeMap::new();
    links.insert("latest".to_string(), "faces/frame-0001.raw".to_string());
    std::os::unix::fs::symlink("faces/frame-0001.raw", v.m("latest")).unwrap();
    v.unmount();
    (v, Expect { files, links })
}

/// Reads every expected path through the mount, block by block.
fn observe<const BLOCK: u64>(v: &Volume, e: &Expect) -> BTreeMap<String, Seen> {
    let mut out = BTreeMap::new();
    for (p, want) in &e.files {
        let seen = match File::open(v.m(p)) {
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Seen::Skipped,
            Err(err) if err.raw_os_error() == Some(libc::EIO) => Seen::Eio,
            Err(_) => Seen::Refused,
            Ok(f) if f.metadata().map(|m| m.len()).unwrap_or(0) == 0 && !want.is_empty() => Seen::Emptied,
            Ok(f) => {
                let size = f.metadata().map(|m| m.len()).unwrap_or(0);
                let mut worst = Seen::Intact;
                let mut short = false;
                let mut off = 0;
                // Blocks past the real end (a grown backing file) must not read at all.
                let end = size.max(want.len() as u64);
                while off < end {
                    let mut buf = vec![0u8; BLOCK as usize];
                    let seen = match f.read_at(&mut buf, off) {
                        Ok(n) => {
                            let lo = off as usize;
                            let hi = (lo + BLOCK as usize).min(want.len());
                            let expect = want.get(lo..hi).unwrap_or(&[]);
                            // Fewer bytes than written is only acceptable next to an error.
                            short |= n < expect.len();
                            if expect.starts_with(&buf[..n]) {
                                Seen::Intact
                            } else {
                                Seen::Wrong
                            }
                        }
                        Err(err) if err.raw_os_error() == Some(libc::EIO) => Seen::Eio,
                        Err(_) => Seen::Refused,
                    };
                    worst = worst.max(seen);
                    off += BLOCK;
                }
                if short && worst == Seen::Intact {
                    Seen::Wrong
                } else {
                    worst
                }
            }
        };
        out.insert(p.clone(), seen);
    }
    for (p, target) in &e.links {
        let seen = match std::fs::read_link(v.m(p)) {
            Ok(t) if t == Path::new(target) => Seen::Intact,
            Ok(_) => Seen::Wrong,
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Seen::Skipped,
            Err(err) if err.raw_os_error() == Some(libc::EIO) => Seen::Eio,
            Err(_) => Seen::Refused,
        };
        out.insert(p.clone(), seen);
    }
    out
}

fn flip(path: &Path, pos: u64) {
    let f = OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, pos).unwrap();
    f.write_all_at(&[b[0] ^ 0x20], pos).unwrap();
}

fn set_len(path: &Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

fn restore(pristine: &Path, backing: &Path) {
    std::fs::remove_dir_all(backing).unwrap();
    // cp -a keeps xattrs and symlinks as they are.
    let ok = Command::new("cp")
        .arg("-a")
        .arg(pristine)
        .arg(backing)
        .status()
        .unwrap();
    assert!(ok.success());
}

/// The backing content file whose plaintext is `len` bytes long.
fn content_file<const BLOCK: u64>(v: &Volume, len: u64) -> PathBuf {
    let want = HEADER
        + len / BLOCK * (BLOCK + OVERHEAD)
        + if !len.is_multiple_of(BLOCK) {
            len % BLOCK + OVERHEAD
        } else {
            0
        };
    v.backing_files()
        .into_iter()
        .find(|p| std::fs::metadata(p).unwrap().len() == want)
        .unwrap_or_else(|| panic!("no backing file of {want} bytes"))
}

/// Backing entries by kind: (directories, symlinks, sidecars).
fn backing_entries(root: &Path) -> (Vec<PathBuf>, Vec<PathBuf>, Vec<PathBuf>) {
    let (mut dirs, mut links, mut sidecars) = (Vec::new(), Vec::new(), Vec::new());
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            if ft.is_dir() {
                dirs.push(e.path());
                stack.push(e.path());
            } else if ft.is_symlink() {
                links.push(e.path());
            } else if name.ends_with(".name") {
                sidecars.push(e.path());
            }
        }
    }
    (dirs, links, sidecars)
}

type Tamper = Box<dyn Fn(&Path)>;

#[test]
fn every_tampered_byte_class_fails_cleanly() {
    tamper_matrix::<{ 64 * 1024 }>();
}

#[test]
fn every_tampered_byte_class_fails_cleanly_4k() {
    tamper_matrix::<4096>();
}

#[test]
fn every_tampered_byte_class_fails_cleanly_1m() {
    tamper_matrix::<{ 1024 * 1024 }>();
}

/// Every case on a volume of `BLOCK`-byte blocks.
fn tamper_matrix<const BLOCK: u64>() {
    let record = BLOCK + OVERHEAD;
    let (mut v, expect) = setup::<BLOCK>();
    let pristine = v.dir.path().join("pristine");
    let ok = Command::new("cp")
        .arg("-a")
        .arg(&v.backing)
        .arg(&pristine)
        .status()
        .unwrap();
    assert!(ok.success());
    let small = content_file::<BLOCK>(&v, 22);
    let three = content_file::<BLOCK>(&v, 3 * BLOCK - 1000);
    let rel = |p: &Path| p.strip_prefix(&v.backing).unwrap().to_path_buf();
    let (small, three) = (rel(&small), rel(&three));
    let (dirs, links, sidecars) = backing_entries(&v.backing);
    let (subdir, link, sidecar) = (rel(&dirs[0]), rel(&links[0]), rel(&sidecars[0]));

    let mut cases: Vec<(String, Tamper)> = Vec::new();
    let mut add = |name: &str, f: Tamper| cases.push((name.to_string(), f));
    for (label, file, len) in [
        ("small", small.clone(), 22u64),
        ("3-block", three.clone(), 3 * BLOCK - 1000),
    ] {
        let header_fields: [(&str, u64); 13] = [
            ("magic", 0),
            ("version", 8),
            ("reserved", 10),
            ("file id", 12),
            ("file id end", 27),
            ("reserved tail", 28),
            ("slot 0 sequence", 32),
            ("slot 0 key-ref length", 32 + 8),
            ("slot 0 wrapped length", 32 + 10),
            ("slot 0 key ref", 32 + 12),
            ("slot 0 wrapped DEK", 32 + 40),
            ("slot 0 checksum", 32 + SLOT - 1),
            ("slot 1 (inactive)", 32 + SLOT + 100),
        ];
        for (field, pos) in header_fields {
            let f = file.clone();
            add(
                &format!("{label}: header {field}"),
                Box::new(move |b: &Path| flip(&b.join(&f), pos)),
            );
        }
        let blocks = len.div_ceil(BLOCK);
        for blk in std::collections::BTreeSet::from([0, blocks / 2, blocks - 1]) {
            let plain = (len - blk * BLOCK).min(BLOCK);
            for (part, at) in [
                ("nonce", 0),
                ("ciphertext", 12 + plain / 2),
                ("tag", 12 + plain + 3),
            ] {
                let f = file.clone();
                let pos = HEADER + blk * record + at;
                add(
                    &format!("{label}: block {blk} {part}"),
                    Box::new(move |b: &Path| flip(&b.join(&f), pos)),
                );
            }
        }
        let full = HEADER + (blocks - 1) * record + (len - (blocks - 1) * BLOCK) + 28;
        for (what, new_len) in [
            ("cut by 1 byte", full - 1),
            ("cut by 28 bytes", full - 28),
            ("cut into the header", 100),
            ("grown by 1 byte", full + 1),
            ("grown by a zero record", full + record),
        ] {
            let f = file.clone();
            add(
                &format!("{label}: {what}"),
                Box::new(move |b: &Path| set_len(&b.join(&f), new_len)),
            );
        }
        if blocks > 1 {
            let f = file.clone();
            add(
                &format!("{label}: cut at a block boundary"),
                Box::new(move |b: &Path| set_len(&b.join(&f), HEADER + record)),
            );
            let f = file.clone();
            add(
                &format!("{label}: blocks 0 and 1 swapped"),
                Box::new(move |b: &Path| {
                    let file = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(b.join(&f))
                        .unwrap();
                    let (mut x, mut y) = (vec![0u8; record as usize], vec![0u8; record as usize]);
                    file.read_exact_at(&mut x, HEADER).unwrap();
                    file.read_exact_at(&mut y, HEADER + record).unwrap();
                    file.write_all_at(&y, HEADER).unwrap();
                    file.write_all_at(&x, HEADER + record).unwrap();
                }),
            );
        }
    }
    let (s, t) = (small.clone(), three.clone());
    add(
        "headers swapped between two files",
        Box::new(move |b: &Path| {
            let (x, y) = (
                std::fs::read(b.join(&s)).unwrap(),
                std::fs::read(b.join(&t)).unwrap(),
            );
            File::options()
                .write(true)
                .open(b.join(&s))
                .unwrap()
                .write_all_at(&y[..4096], 0)
                .unwrap();
            File::options()
                .write(true)
                .open(b.join(&t))
                .unwrap()
                .write_all_at(&x[..4096], 0)
                .unwrap();
        }),
    );
    let s = small.clone();
    add(
        "entry name: one character changed",
        Box::new(move |b: &Path| {
            let from = b.join(&s);
            let mut name = from.file_name().unwrap().to_string_lossy().into_owned();
            let c = if name.as_bytes()[3] == b'A' { "B" } else { "A" };
            name.replace_range(3..4, c);
            std::fs::rename(&from, from.with_file_name(name)).unwrap();
        }),
    );
    let s = small.clone();
    add(
        "entry name: not base64",
        Box::new(move |b: &Path| {
            let from = b.join(&s);
            std::fs::rename(&from, from.with_file_name("not*base64")).unwrap();
        }),
    );
    let d = subdir.clone();
    add(
        "directory id file: a byte flipped",
        Box::new(move |b: &Path| flip(&b.join(&d).join(".kmsfs.dirid"), 3)),
    );
    let d = subdir.clone();
    add(
        "directory id file: removed",
        Box::new(move |b: &Path| std::fs::remove_file(b.join(&d).join(".kmsfs.dirid")).unwrap()),
    );
    let sc = sidecar.clone();
    add(
        "long-name sidecar: a byte flipped",
        Box::new(move |b: &Path| flip(&b.join(&sc), 5)),
    );
    let sc = sidecar.clone();
    add(
        "long-name sidecar: removed",
        Box::new(move |b: &Path| std::fs::remove_file(b.join(&sc)).unwrap()),
    );
    let l = link.clone();
    add(
        "symlink target: a character changed",
        Box::new(move |b: &Path| {
            let p = b.join(&l);
            let mut t = std::fs::read_link(&p).unwrap().to_string_lossy().into_owned();
            let c = if t.as_bytes()[5] == b'A' { "B" } else { "A" };
            t.replace_range(5..6, c);
            std::fs::remove_file(&p).unwrap();
            std::os::unix::fs::symlink(t, &p).unwrap();
        }),
    );
    for field in ["volume_id", "root_dir_id", "wrapped_key"] {
        add(
            &format!("config: {field} changed"),
            Box::new(move |b: &Path| {
                let p = b.join("kmsfs.json");
                let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
                let slot = if field == "volume_id" {
                    &mut c[field]
                } else {
                    &mut c["names"][field]
                };
                let mut s = slot.as_str().unwrap().to_string();
                let ch = if s.ends_with('0') { "1" } else { "0" };
                s.replace_range(s.len() - 1.., ch);
                *slot = s.into();
                std::fs::write(&p, serde_json::to_vec(&c).unwrap()).unwrap();
            }),
        );
    }
    add(
        "config: block_size changed",
        Box::new(move |b: &Path| {
            let p = b.join("kmsfs.json");
            let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            c["block_size"] = if BLOCK == 4096 { 8192 } else { 4096 }.into();
            std::fs::write(&p, serde_json::to_vec(&c).unwrap()).unwrap();
        }),
    );
    add(
        "config: garbled",
        Box::new(|b: &Path| flip(&b.join("kmsfs.json"), 0)),
    );

    let fsck = |v: &Volume| {
        let out = kmsfs()
            .args(["fsck", v.backing.to_str().unwrap()])
            .output()
            .unwrap();
        out.status.code().unwrap_or(-1)
    };
    assert_eq!(fsck(&v), 0, "fsck of the untouched volume");
    let mut table = Vec::new();
    let mut refused_mounts = 0;
    for (name, tamper) in &cases {
        restore(&pristine, &v.backing);
        tamper(&v.backing);
        // `kmsfs fsck` must notice every case (1: problems found, 2: cannot check at all).
        let code = fsck(&v);
        assert!(code == 1 || code == 2, "{name}: fsck exited {code}");
        let name = &format!("{name} [fsck {code}]");
        if let Err(err) = v.try_mount() {
            assert!(
                name.starts_with("config") && err.trim().lines().count() == 1 && err.contains("kmsfs"),
                "{name}: mount refused: {err}"
            );
            refused_mounts += 1;
            table.push(format!("{name:45} mount refused: {}", err.trim()));
            continue;
        }
        let seen = observe::<BLOCK>(&v, &expect);
        let pid = v.daemon_pid();
        // SAFETY: signal 0 only checks that the process exists.
        assert_eq!(unsafe { libc::kill(pid as i32, 0) }, 0, "{name}: the daemon died");
        assert!(
            std::fs::metadata(&v.mnt).is_ok(),
            "{name}: the mount stopped answering"
        );
        let damaged: Vec<String> = seen
            .iter()
            .filter(|(_, s)| **s != Seen::Intact)
            .map(|(p, s)| format!("{}={s:?}", p.chars().take(24).collect::<String>()))
            .collect();
        assert!(
            !seen.values().any(|s| *s == Seen::Wrong),
            "{name}: WRONG PLAINTEXT {seen:?}"
        );
        v.unmount();
        table.push(format!(
            "{name:45} {}",
            if damaged.is_empty() {
                "all intact".to_string()
            } else {
                damaged.join(" ")
            }
        ));
    }
    let log = v.log_text();
    for plain in [
        "small.txt",
        "three-blocks",
        "frame-0001",
        "long-name-",
        "faces",
        "XY-99-ZZ",
    ] {
        assert!(
            !log.contains(plain),
            "the log holds a plaintext name or content: {plain}"
        );
    }
    eprintln!(
        "{} tamper cases, {refused_mounts} refused mounts:\n{}",
        cases.len(),
        table.join("\n")
    );
    // Cases whose outcome is fixed by the format, not just "clean".
    let row = |n: &str| table.iter().find(|r| r.starts_with(n)).unwrap().clone();
    assert!(row("small: header slot 1 (inactive)").ends_with("all intact"));
    assert!(row("3-block: block 1 ciphertext").contains("three-blocks.bin=Eio"));
    assert!(row("3-block: cut at a block boundary").contains("three-blocks.bin=Eio"));
    assert!(row("entry name: one character changed").contains("small.txt=Skipped"));
}
