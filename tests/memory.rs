//! Key material in memory, found by scanning it (issue 13, item 7).
//!
//! - A mounted daemon (the real binary) whose file key was evicted by its TTL holds no copy of
//!   that file's DEK or content key anywhere in its writable memory: heap, every thread's
//!   stack, anonymous maps.
//! - After `Fs::lock`, the filesystem core (in this process) holds no file key and no name key.
//!
//! The test learns each key without the daemon's help (the keystore, the file's header, the
//! volume config), and keeps it only XORed with a mask, so this process never holds a plain
//! copy of what it looks for. Each scan is also run while the key must be present (a file
//! open, a mount unlocked), so a scan that cannot see keys fails rather than passes.
//!
//! Reading another process's memory needs root (the daemon makes itself non-dumpable).

mod common;

use common::inprocess::{InProcess, caller};
use common::*;
use kmsfs::crypto::{KEY_LEN, SecretKey};
use kmsfs::format::block::CONTENT_KEY_INFO;
use kmsfs::format::config::{KmsConfig, NamesConfig};
use kmsfs::format::header::{self, HEADER_LEN};
use kmsfs::format::name::{NAME_KEY_INFO, SYMLINK_KEY_INFO, XATTR_NAME_KEY_INFO, XATTR_VALUE_KEY_INFO};
use kmsfs::fs::inode::ROOT_INO;
use kmsfs::kms::local::LocalKms;
use kmsfs::kms::{Binding, KeyProvider, WrappedDek};
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// What every needle is XORed with while the test holds it.
const MASK: [u8; KEY_LEN] = {
    let mut m = [0u8; KEY_LEN];
    let mut i = 0;
    while i < KEY_LEN {
        m[i] = 0xA5 ^ (i as u8).wrapping_mul(59);
        i += 1;
    }
    m
};

/// A 32-byte key to look for, held masked.
struct Needle {
    what: String,
    masked: [u8; KEY_LEN],
    /// Hits must be zero (an assertion), or are only reported.
    must_be_gone: bool,
}

impl Needle {
    fn of(what: &str, key: &SecretKey, must_be_gone: bool) -> Needle {
        let mut masked = [0u8; KEY_LEN];
        for ((m, k), x) in masked.iter_mut().zip(key.expose()).zip(MASK) {
            *m = k ^ x;
        }
        Needle {
            what: what.to_owned(),
            masked,
            must_be_gone,
        }
    }

    fn first_byte(&self) -> u8 {
        self.masked[0] ^ MASK[0]
    }

    fn matches(&self, window: &[u8]) -> bool {
        window
            .iter()
            .zip(self.masked.iter().zip(MASK))
            .all(|(b, (m, x))| b ^ x == *m)
    }
}

/// One place a needle was found.
struct Hit {
    needle: usize,
    addr: u64,
    region: String,
}

/// Bytes read from the target's memory at a time (plus KEY_LEN - 1 of overlap).
const CHUNK: usize = 1 << 20;

/// Scans every readable, writable, private mapping of process `pid` ("self" for this one):
/// heap, stacks (the main one and every thread's), anonymous maps, the binary's data.
fn scan(pid: &str, needles: &[Needle]) -> Vec<Hit> {
    assert!(needles.len() <= 16);
    let mut by_first = [0u16; 256];
    for (i, n) in needles.iter().enumerate() {
        by_first[n.first_byte() as usize] |= 1 << i;
    }
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("read maps");
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("open mem (root needed)");
    let mut buf = zeroize::Zeroizing::new(vec![0u8; CHUNK + KEY_LEN - 1]);
    let mut hits = Vec::new();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        let region = f.nth(3).unwrap_or("anon").to_owned();
        let p = perms.as_bytes();
        if p.len() < 4 || p[0] != b'r' || p[1] != b'w' || p[3] != b'p' {
            continue;
        }
        let (start, end) = range.split_once('-').unwrap();
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        let mut off = start;
        'region: while off + KEY_LEN as u64 <= end {
            let want = ((end - off) as usize).min(buf.len());
            // Zeroed before each read: a chunk of this very buffer (this process's own scan)
            // then reads as zeros, never as what it held before.
            buf.fill(0);
            let mut got = 0;
            while got < want {
                match mem.read_at(&mut buf[got..want], off + got as u64) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
            if got < KEY_LEN {
                break 'region;
            }
            // Positions this chunk owns: the next chunk starts at off + CHUNK.
            let owned = (got - (KEY_LEN - 1)).min(CHUNK);
            for i in 0..owned {
                let mut cands = by_first[buf[i] as usize];
                while cands != 0 {
                    let n = cands.trailing_zeros() as usize;
                    cands &= cands - 1;
                    if needles[n].matches(&buf[i..i + KEY_LEN]) {
                        hits.push(Hit {
                            needle: n,
                            addr: off + i as u64,
                            region: region.clone(),
                        });
                    }
                }
            }
            if got < want {
                break 'region;
            }
            off += CHUNK as u64;
        }
    }
    buf.fill(0);
    hits
}

/// Hits per needle, and one line per hit for the failure message.
fn report(needles: &[Needle], hits: &[Hit]) -> (Vec<usize>, String) {
    let mut counts = vec![0; needles.len()];
    let mut text = String::new();
    for h in hits {
        counts[h.needle] += 1;
        text.push_str(&format!(
            "  {} at {:#x} ({})\n",
            needles[h.needle].what, h.addr, h.region
        ));
    }
    for (n, c) in needles.iter().zip(&counts) {
        text.push_str(&format!("  {}: {c} hits\n", n.what));
    }
    (counts, text)
}

/// Asserts that no needle marked `must_be_gone` is found.
fn assert_gone(pid: &str, needles: &[Needle], when: &str) {
    let hits = scan(pid, needles);
    let (counts, text) = report(needles, &hits);
    eprintln!("{when}:\n{text}");
    let left: Vec<_> = needles
        .iter()
        .zip(&counts)
        .filter(|(n, c)| n.must_be_gone && **c > 0)
        .map(|(n, c)| format!("{} ({c})", n.what))
        .collect();
    assert!(left.is_empty(), "{when}: keys still in memory: {left:?}\n{text}");
}

/// Asserts that each needle in `present` is found (the scan can see keys).
fn assert_found(pid: &str, needles: &[Needle], present: &[usize], when: &str) {
    let hits = scan(pid, needles);
    let (counts, text) = report(needles, &hits);
    eprintln!("{when}:\n{text}");
    if !aes_keeps_round_keys_plain() {
        eprintln!(
            "no AES instructions: the key schedule does not hold the key verbatim; positive check skipped"
        );
        return;
    }
    for &i in present {
        assert!(
            counts[i] > 0,
            "{when}: the scan did not find {}\n{text}",
            needles[i].what
        );
    }
}

/// With AES-NI (x86_64) or the ARMv8 AES extension the expanded key starts with the key
/// itself, so a live cipher is visible to the scan; the portable backend bitslices it.
fn aes_keeps_round_keys_plain() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// The volume's keys as the test computes them from the keystore, the config and a file's
/// header, without the daemon.
struct Keys {
    rt: tokio::runtime::Runtime,
    kms: LocalKms,
    volume_id: kmsfs::format::VolumeId,
    names: NamesConfig,
}

impl Keys {
    fn of(backing: &Path) -> Keys {
        let config = kmsfs::volume::load_config(backing).unwrap_or_else(|e| panic!("{}", e.message));
        let KmsConfig::Local { keystore, key } = &config.kms else {
            panic!("the tests make local volumes");
        };
        Keys {
            rt: kmsfs::volume::cli_runtime().unwrap(),
            kms: LocalKms::new(keystore.clone(), key.clone()),
            volume_id: config.volume_id(),
            names: config.names.clone(),
        }
    }

    /// The DEK and content key of the file whose backing file is `backing_file`, and its id.
    fn file(&self, backing_file: &Path, must_be_gone: bool) -> (Vec<Needle>, String) {
        let mut hdr = vec![0u8; HEADER_LEN as usize];
        let n = std::fs::File::open(backing_file).unwrap().read(&mut hdr).unwrap();
        let h = header::decode(&hdr[..n]).expect("a header");
        let wrapped = WrappedDek {
            key_ref: h.slot.key_ref.clone(),
            blob: h.slot.wrapped.clone(),
        };
        let dek = self
            .rt
            .block_on(
                self.kms
                    .unwrap(&wrapped, &Binding::file(self.volume_id, h.file_id)),
            )
            .expect("the keystore unwraps the file's key");
        let content = dek.derive(&h.file_id.0, CONTENT_KEY_INFO);
        (
            vec![
                Needle::of("file DEK", &dek, must_be_gone),
                Needle::of("file content key", &content, must_be_gone),
            ],
            h.file_id.to_string(),
        )
    }

    /// The volume name key and the four subkeys derived from it (which the name ciphers
    /// hold: they stay while the volume is mounted and unlocked).
    fn names(&self, key_gone: bool, subkeys_gone: bool) -> Vec<Needle> {
        let NamesConfig::Encrypted {
            key_ref, wrapped_key, ..
        } = &self.names
        else {
            panic!("the tests make volumes with encrypted names");
        };
        let wrapped = WrappedDek {
            key_ref: key_ref.clone(),
            blob: kmsfs::hex::decode(wrapped_key).unwrap(),
        };
        let key = self
            .rt
            .block_on(self.kms.unwrap(&wrapped, &Binding::volume(self.volume_id)))
            .expect("the keystore unwraps the name key");
        let mut out = vec![Needle::of("name key", &key, key_gone)];
        for (what, info) in [
            ("name subkey (names)", NAME_KEY_INFO),
            ("name subkey (symlinks)", SYMLINK_KEY_INFO),
            ("name subkey (xattr names)", XATTR_NAME_KEY_INFO),
            ("name subkey (xattr values)", XATTR_VALUE_KEY_INFO),
        ] {
            out.push(Needle::of(
                what,
                &key.derive(&self.volume_id.0, info),
                subkeys_gone,
            ));
        }
        out
    }
}

/// Drops the kernel's cached pages of `f`, so the next read goes to the daemon (and its
/// cipher), not the page cache.
fn drop_page_cache(f: &std::fs::File) {
    use std::os::fd::AsRawFd;
    f.sync_all().unwrap();
    // SAFETY: a plain system call on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0);
}

/// Waits until the audit log shows `n` TTL evictions of file `id` and status shows no cached
/// key.
fn wait_evicted(v: &Volume, audit: &Path, id: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(audit).unwrap_or_default();
        let evictions = text
            .lines()
            .filter(|l| l.contains("\"cache_evicted\"") && l.contains(id))
            .count();
        let out = run_ok(&["status", v.mnt.to_str().unwrap(), "--json"]);
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if evictions >= n && s[0]["cached_keys"] == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "file key not evicted ({evictions} evictions, status {s})\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_file_key_evicted_by_its_ttl_leaves_no_copy_in_the_daemon() {
    if !is_root() {
        eprintln!("skipped: reading the daemon's memory needs root");
        return;
    }
    let mut v = Volume::new();
    let audit = v.dir.path().join("audit.jsonl");
    v.mount_with_args(&[
        "--key-ttl",
        "2",
        "--check-interval",
        "1",
        "--audit-log",
        audit.to_str().unwrap(),
    ]);
    let pid = v.daemon_pid().to_string();
    let data = pseudo_random(300_000, 13);
    // Created (a fresh DEK from the KMS), written, read back.
    let backing = v.backing_of_new(|| std::fs::write(v.m("evidence.bin"), &data).unwrap());
    assert_eq!(std::fs::read(v.m("evidence.bin")).unwrap(), data);
    let keys = Keys::of(&v.backing);
    let (mut needles, id) = keys.file(&backing, true);
    // The name key is needed only to derive the name ciphers' subkeys, which the mount keeps
    // while it is mounted: the subkeys are reported, not asserted.
    needles.extend(keys.names(true, false));
    wait_evicted(&v, &audit, &id, 1);

    // Opened again after eviction: the DEK comes from the KMS (an unwrap on a FUSE worker),
    // and the content is decrypted by the daemon (page cache dropped).
    let mut held = std::fs::File::open(v.m("evidence.bin")).unwrap();
    drop_page_cache(&held);
    let mut back = Vec::new();
    held.read_to_end(&mut back).unwrap();
    assert!(back == data, "content differs");
    assert_found(&pid, &needles, &[1, 3, 4, 5, 6], "daemon, file open");
    drop(held);

    wait_evicted(&v, &audit, &id, 2);
    assert_gone(&pid, &needles, "daemon, file closed and its key evicted");
}

#[test]
fn a_lock_leaves_no_key_in_the_filesystem_core() {
    let h = InProcess::new();
    let fs = h.fs();
    let (_, fh) = fs
        .create(
            ROOT_INO,
            OsStr::new("evidence.bin"),
            0o600,
            libc::O_RDWR,
            caller(),
        )
        .unwrap();
    let data = pseudo_random(200_000, 29);
    assert_eq!(fs.write(fh, 0, &data).unwrap(), data.len());
    let mut buf = Vec::new();
    let n = fs.read(fh, 0, data.len() as u32, &mut buf).unwrap();
    assert!(buf[..n] == data[..], "content differs");

    let files = h.vol.backing_files();
    assert_eq!(files.len(), 1, "{files:?}");
    let keys = Keys::of(&h.vol.backing);
    let (mut needles, _) = keys.file(&files[0], true);
    needles.extend(keys.names(true, true));
    // The open file's content key and every name subkey are live now.
    assert_found("self", &needles, &[1, 3, 4, 5, 6], "in process, file open");

    fs.lock();
    assert_gone("self", &needles, "in process, after Fs::lock");
    fs.release(fh);
}

/// After a lock, opening, creating or truncating by path fails with ENOKEY before the KMS is
/// asked for anything (a locked mount must not fetch keys it would then drop).
#[test]
fn a_locked_core_asks_the_kms_for_nothing() {
    use std::sync::atomic::Ordering;
    let h = InProcess::new();
    let fs = h.fs();
    let (attr, fh) = fs
        .create(ROOT_INO, OsStr::new("f"), 0o600, libc::O_RDWR, caller())
        .unwrap();
    fs.write(fh, 0, b"data").unwrap();
    fs.release(fh);
    fs.lock();
    let calls = fs.stats.kms_calls.load(Ordering::SeqCst);
    assert_eq!(
        fs.open(attr.ino, libc::O_RDONLY).map(|_| ()).unwrap_err().errno(),
        libc::ENOKEY
    );
    let truncate = kmsfs::fs::SetAttr {
        size: Some(1),
        ..Default::default()
    };
    assert_eq!(
        fs.setattr(attr.ino, None, truncate)
            .map(|_| ())
            .unwrap_err()
            .errno(),
        libc::ENOKEY
    );
    assert_eq!(
        fs.create(ROOT_INO, OsStr::new("g"), 0o600, libc::O_RDWR, caller())
            .map(|_| ())
            .unwrap_err()
            .errno(),
        libc::ENOKEY
    );
    assert_eq!(
        fs.stats.kms_calls.load(Ordering::SeqCst),
        calls,
        "the KMS was asked after the lock"
    );
}
