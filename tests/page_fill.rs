//! A small read of a file no one writes hands the kernel the whole plaintext of each block it
//! decrypted (`fuse::PageFill`), so the reads of the block's other pages never reach the
//! daemon; a file open for writing is not filled (a store could race a write), a store never
//! lands over newer data, and a lock drops what was filled.
//!
//! How a test sees it: after one 4 KiB read of a block, the block's ciphertext is altered in
//! the backing file. A page the kernel was given still reads back (from the page cache); a
//! page that has to come from the daemon reads as EIO.

mod common;

use common::*;
use std::os::unix::fs::FileExt;

/// Backing layout of a default volume: header, then records of nonce ‖ 64 KiB ‖ tag.
const HEADER: u64 = 4096;
const BLOCK: u64 = 65536;
const RECORD: u64 = BLOCK + 28;

/// A file of four blocks, the backing file behind it, and its content.
fn file_of_four_blocks(v: &mut Volume) -> (std::path::PathBuf, Vec<u8>) {
    v.mount(&[]);
    let data = pseudo_random(4 * BLOCK as usize, 11);
    let backing = v.backing_of_new(|| std::fs::write(v.m("video"), &data).unwrap());
    v.unmount();
    (backing, data)
}

/// Opens `path` with readahead off (POSIX_FADV_RANDOM), so a read asks for its own pages only.
fn open_random(path: &std::path::Path) -> std::fs::File {
    let f = std::fs::File::open(path).unwrap();
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::Random).unwrap();
    f
}

/// Bytes of `path` in the page cache (util-linux `fincore`, which asks `mincore`).
fn resident(path: &std::path::Path) -> u64 {
    let out = std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(path)
        .output()
        .expect("fincore (Debian: util-linux-extra; scripts/ensure-deps installs it)");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
}

/// Waits (up to `secs`) until the page cache holds at least `want` bytes of `path`; returns
/// what it holds then. The fill runs on a thread of its own, after the reply.
fn wait_resident(path: &std::path::Path, want: u64, secs: u64) -> u64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while resident(path) < want && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    resident(path)
}

/// Reads 4 KiB of block 1, waits until the page cache holds the whole block (`filled`) or
/// checks that it holds only that page, then alters block 1's ciphertext in the backing file;
/// returns what reading another page of block 1 then gives.
fn page_after_tamper(
    f: &std::fs::File,
    path: &std::path::Path,
    backing: &std::path::Path,
    data: &[u8],
    filled: bool,
) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, BLOCK + 4096).unwrap();
    assert_eq!(buf, data[(BLOCK + 4096) as usize..][..4096]);
    let res = wait_resident(path, BLOCK, if filled { 10 } else { 1 });
    if filled {
        assert!(res >= BLOCK, "{res} bytes in the page cache after a 4 KiB read");
    } else {
        assert_eq!(res, 4096, "only the page read is in the page cache");
    }
    let b = std::fs::OpenOptions::new().write(true).open(backing).unwrap();
    let at = HEADER + RECORD + 12 + 40_000;
    b.write_all_at(&[0x5a; 16], at).unwrap();
    let mut other = vec![0u8; 4096];
    f.read_exact_at(&mut other, BLOCK + 8 * 4096).map(|()| other)
}

#[test]
fn a_read_only_mount_fills_the_page_cache_with_the_whole_block() {
    let mut v = Volume::new();
    let (backing, data) = file_of_four_blocks(&mut v);
    v.mount(&["ro"]);
    let f = open_random(&v.m("video"));
    let got = page_after_tamper(&f, &v.m("video"), &backing, &data, true)
        .expect("the page came from the page cache");
    assert_eq!(got, data[(BLOCK + 8 * 4096) as usize..][..4096]);
    // A block no read touched still comes from the daemon, and the tamper shows there.
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 3 * BLOCK).unwrap();
    assert_eq!(buf, data[3 * BLOCK as usize..][..4096]);

    // The lock drops the filled pages with everything else: nothing of the block reads back.
    let mnt = v.mnt.to_str().unwrap().to_owned();
    run_ok(&["lock", &mnt]);
    let err = f.read_exact_at(&mut buf, BLOCK + 12 * 4096).unwrap_err();
    assert!(
        matches!(errno_of(&err), libc::ENOKEY | libc::ENOTCONN | libc::EIO),
        "after the lock: {err}"
    );
    drop(f);
    assert!(v.wait_daemon_gone(10));
}

#[test]
fn a_writable_mount_fills_a_file_no_one_writes() {
    let mut v = Volume::new();
    let (backing, data) = file_of_four_blocks(&mut v);
    v.mount(&[]);
    let f = open_random(&v.m("video"));
    let got = page_after_tamper(&f, &v.m("video"), &backing, &data, true)
        .expect("the page came from the page cache");
    assert_eq!(got, data[(BLOCK + 8 * 4096) as usize..][..4096]);
    drop(f);
    v.unmount();
}

/// The fill runs after the reply: a reader that closes at once still leaves the block filled.
#[test]
fn a_read_then_close_still_fills() {
    let mut v = Volume::new();
    let (_, data) = file_of_four_blocks(&mut v);
    v.mount(&[]);
    let mut buf = vec![0u8; 4096];
    open_random(&v.m("video"))
        .read_exact_at(&mut buf, 2 * BLOCK)
        .unwrap();
    assert_eq!(buf, data[2 * BLOCK as usize..][..4096]);
    assert_eq!(wait_resident(&v.m("video"), BLOCK, 10), BLOCK);
    v.unmount();
}

#[test]
fn a_file_open_for_writing_is_not_filled() {
    let mut v = Volume::new();
    let (backing, data) = file_of_four_blocks(&mut v);
    v.mount(&[]);
    let writer = std::fs::OpenOptions::new()
        .write(true)
        .open(v.m("video"))
        .unwrap();
    let f = open_random(&v.m("video"));
    let err = page_after_tamper(&f, &v.m("video"), &backing, &data, false)
        .expect_err("the page came from the daemon");
    assert_eq!(errno_of(&err), libc::EIO);
    drop((f, writer));
    v.unmount();
}

/// The page fill's counts from `kmsfs status`: stored, voided, dropped.
fn fill_counts(v: &Volume) -> [u64; 3] {
    let mnt = v.mnt.to_str().unwrap();
    let st: serde_json::Value = serde_json::from_slice(&run_ok(&["status", mnt, "--json"]).stdout).unwrap();
    let f = &st[0]["counters"]["page_fill"];
    ["stored", "voided", "dropped"].map(|k| f[k].as_u64().expect("page_fill counts in status"))
}

/// Readers fill the page cache from a file that a writer changes round after round, opening
/// and closing it each time. Rounds, by `g % 4`: 0 truncates by path to half and writes that
/// half; 1 opens with O_TRUNC and writes the whole file; 2 writes it whole; 3 truncates by
/// path to nothing and writes it whole. A store of plaintext read before a write or truncate
/// must never land after it (a store past a truncate would also bring back the cut part): no
/// read that starts after round `g` ended may see an older round, zeros only while a round
/// that truncates has begun since, and at the end every page holds the last round (the
/// kernel keeps cached pages across opens).
#[test]
fn a_fill_never_puts_older_data_over_a_finished_write() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    const BLOCKS: u64 = 8;
    const ROUNDS: u64 = 302; // a whole write last
    let len = (BLOCKS * BLOCK) as usize;
    // Every 8-byte word of round `g`'s content is `g` with a mark (bit 40).
    const MARK: u64 = 1 << 40;
    let round = |g: u64| -> Vec<u8> { (g | MARK).to_le_bytes().repeat(len / 8) };
    let truncates = |g: u64| g % 4 != 2;
    // The oldest round in a page, and whether it holds zeros (a truncated part, read while
    // it was cut).
    let oldest = |page: &[u8]| -> (Option<u64>, bool) {
        let words: Vec<u64> = page
            .chunks(8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
            .collect();
        assert!(
            words.iter().all(|w| *w == 0 || w & MARK != 0),
            "a word of no round"
        );
        let rounds = words.iter().filter(|w| **w != 0).map(|w| w & !MARK).min();
        (rounds, words.contains(&0))
    };
    let mut v = Volume::new();
    v.mount(&[]);
    std::fs::write(v.m("clip"), round(0)).unwrap();
    // The last round begun, and the last one ended.
    let begun = std::sync::Arc::new(AtomicU64::new(0));
    let done = std::sync::Arc::new(AtomicU64::new(0));
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..3u64)
        .map(|t| {
            let (path, begun, done, stop) = (v.m("clip"), begun.clone(), done.clone(), stop.clone());
            std::thread::spawn(move || {
                let f = open_random(&path);
                let mut rng = Rng(t + 7);
                let mut page = vec![0u8; 4096];
                let mut reads = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let finished = done.load(Ordering::SeqCst);
                    let at = rng.below(BLOCKS * BLOCK / 4096) * 4096;
                    // Drop the cached pages first: the read goes to the daemon and fills.
                    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
                    // Short past the end of a file truncated (for now, or to half).
                    if f.read_at(&mut page, at).unwrap() < page.len() {
                        continue;
                    }
                    let (seen, zeros) = oldest(&page);
                    if let Some(seen) = seen {
                        assert!(
                            seen >= finished,
                            "read at {at} after round {finished} ended saw round {seen}"
                        );
                    }
                    // The kernel zero-fills a page whose READ came while a truncate had cut
                    // it: only a read that overlaps a round that truncates sees that.
                    let now = begun.load(Ordering::SeqCst);
                    assert!(
                        !zeros || (finished + 1..=now).any(truncates),
                        "read at {at} saw zeros, with no truncate since round {finished} ended"
                    );
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    let c_path = std::ffi::CString::new(v.m("clip").into_os_string().into_encoded_bytes()).unwrap();
    for g in 1..=ROUNDS {
        begun.store(g, Ordering::SeqCst);
        let mut content = round(g);
        match g % 4 {
            0 => {
                content.truncate(len / 2);
                assert_eq!(unsafe { libc::truncate(c_path.as_ptr(), len as i64 / 2) }, 0);
            }
            3 => assert_eq!(unsafe { libc::truncate(c_path.as_ptr(), 0) }, 0),
            _ => {}
        }
        let w = std::fs::OpenOptions::new()
            .write(true)
            .truncate(g % 4 == 1)
            .open(v.m("clip"))
            .unwrap();
        w.write_all_at(&content, 0).unwrap();
        drop(w);
        done.store(g, Ordering::SeqCst);
    }
    stop.store(true, Ordering::SeqCst);
    let reads: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(reads > 1000, "the readers read only {reads} pages");
    // Every block offered has been dealt with (the counts hold still), so a late store
    // would be in the page cache by now.
    let mut counts = fill_counts(&v);
    loop {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let again = fill_counts(&v);
        if again == counts {
            break;
        }
        counts = again;
    }
    // The race was there to lose: blocks were stored between the rounds.
    assert!(counts[0] > 0, "no block stored: {counts:?}");
    eprintln!("{reads} reads; page fill stored, voided, dropped: {counts:?}");
    let f = std::fs::File::open(v.m("clip")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), len as u64);
    let mut page = vec![0u8; 4096];
    for at in (0..BLOCKS * BLOCK).step_by(4096) {
        f.read_exact_at(&mut page, at).unwrap();
        assert_eq!(
            oldest(&page),
            (Some(ROUNDS), false),
            "page at {at} after the last round"
        );
    }
    drop(f);
    v.unmount();
}

/// A lock while readers fill the page cache through a single FUSE worker: the lock must not
/// wait on a worker that waits on the lock (a store in flight can hold the lock's close while
/// it waits for a page that only the worker can read). The daemon is gone soon after.
#[test]
fn a_lock_during_random_reads_through_one_worker_completes() {
    let mut v = Volume::new();
    v.mount(&[]);
    let size = 64 * BLOCK as usize;
    std::fs::write(v.m("big"), pseudo_random(size, 5)).unwrap();
    v.unmount();
    v.mount_full(&["ro"], &["--threads", "1"], &[]);
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let reads = std::sync::Arc::new(AtomicUsize::new(0));
    let readers: Vec<_> = (0..4u64)
        .map(|t| {
            let (path, stop, reads) = (v.m("big"), stop.clone(), reads.clone());
            std::thread::spawn(move || {
                let f = open_random(&path);
                let mut rng = Rng(t + 1);
                let mut buf = vec![0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let at = rng.below(64 * BLOCK / 4096) * 4096;
                    if f.read_exact_at(&mut buf, at).is_err() {
                        break;
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // The lock comes while the readers are well under way (and the fill busy).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while reads.load(Ordering::Relaxed) < 400 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(
        reads.load(Ordering::Relaxed) >= 400,
        "the readers did not get going"
    );
    let mnt = v.mnt.to_str().unwrap().to_owned();
    let t = std::time::Instant::now();
    run_ok(&["lock", &mnt]);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(1),
        "kmsfs lock took {:?}",
        t.elapsed()
    );
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    assert!(v.wait_daemon_gone(10), "the daemon did not exit after the lock");
}
