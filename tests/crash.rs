//! Crash consistency: a writer process runs a seeded sequence of operations on a mount, each
//! made durable (fsync of the file or of the parent directory) and then acknowledged in a
//! journal outside the mount. The test kills the daemon — or, separately, the writer — with
//! SIGKILL at a random moment, remounts, and checks the volume against the journal:
//!
//! - every operation acknowledged before the kill is there, byte for byte;
//! - the one operation in flight (begun, not acknowledged) is either absent or present, and a
//!   partial write shows only old or new bytes in its range;
//! - every file opens and no other file is damaged.
//!
//! The one documented exception (docs/format.md, "Crash behaviour"): a block being rewritten in
//! place by the operation in flight may read EIO. The test counts those.
//!
//! `KMSFS_CRASH_ITERS` (default 12 per test) sets the number of kills.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BLOCK: u64 = 64 * 1024;
const FILES: [&str; 5] = ["f0", "f1", "f2", "sub/f3", "LONG"];

fn file_name(i: usize) -> String {
    if FILES[i] == "LONG" {
        format!("sub/long-{}", "n".repeat(200))
    } else {
        FILES[i].to_string()
    }
}

#[derive(Clone, Debug)]
enum Op {
    Create {
        f: usize,
    },
    Write {
        f: usize,
        off: u64,
        len: usize,
        seed: u64,
    },
    Truncate {
        f: usize,
        len: u64,
    },
    Rename {
        from: usize,
        to: usize,
    },
    Mkdir {
        n: usize,
    },
    Unlink {
        f: usize,
    },
}

/// What the volume must hold: file contents and the directories made so far.
#[derive(Clone, Default)]
struct Model {
    files: BTreeMap<usize, Vec<u8>>,
    dirs: usize,
}

impl Model {
    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Create { f } => {
                self.files.entry(f).or_default();
            }
            Op::Write { f, off, len, seed } => {
                let data = pseudo_random(len, seed);
                let c = self.files.get_mut(&f).unwrap();
                let end = off as usize + len;
                if c.len() < end {
                    c.resize(end, 0);
                }
                c[off as usize..end].copy_from_slice(&data);
            }
            Op::Truncate { f, len } => self.files.get_mut(&f).unwrap().resize(len as usize, 0),
            Op::Rename { from, to } => {
                let c = self.files.remove(&from).unwrap();
                self.files.insert(to, c);
            }
            Op::Mkdir { .. } => self.dirs += 1,
            Op::Unlink { f } => {
                self.files.remove(&f);
            }
        }
    }
}

/// Offsets of the crash workload: block edges and anywhere in 8 blocks.
trait Offsets {
    fn offset(&mut self) -> u64;
}

impl Offsets for Rng {
    fn offset(&mut self) -> u64 {
        let b = self.below(8) * BLOCK;
        match self.below(3) {
            0 => b,
            1 => (b + self.below(9)).saturating_sub(4),
            _ => self.below(8 * BLOCK),
        }
    }
}

/// A sequence valid for the state it runs on (the writer must never fail but by the crash).
fn generate(seed: u64, count: usize) -> Vec<Op> {
    let mut r = Rng(seed);
    // Which files exist and how many directories were made: all the generator needs (the
    // contents are the checker's business, and computing them here would slow the writer).
    let mut exists = [false; FILES.len()];
    let mut dirs = 0;
    let mut ops = Vec::new();
    while ops.len() < count {
        let f = r.below(FILES.len() as u64) as usize;
        let op = match r.below(10) {
            _ if !exists[f] => Op::Create { f },
            0..=4 => {
                let max = if r.below(2) == 0 { 4096 } else { 3 * BLOCK };
                Op::Write {
                    f,
                    off: r.offset(),
                    len: 1 + r.below(max) as usize,
                    seed: r.next(),
                }
            }
            5 | 6 => Op::Truncate { f, len: r.offset() },
            7 => {
                let to = r.below(FILES.len() as u64) as usize;
                if to == f {
                    continue;
                }
                Op::Rename { from: f, to }
            }
            8 => Op::Mkdir { n: dirs },
            _ => Op::Unlink { f },
        };
        match op {
            Op::Create { f } => exists[f] = true,
            Op::Rename { from, to } => (exists[from], exists[to]) = (false, true),
            Op::Mkdir { .. } => dirs += 1,
            Op::Unlink { f } => exists[f] = false,
            _ => {}
        }
        ops.push(op);
    }
    ops
}

/// Runs in the child: performs the operations, journaling "B i" before and "A i" after each
/// durable operation; exits at the first error (the crash).
fn writer(mnt: &Path, journal: &Path, seed: u64, count: usize) {
    let mut j = File::create(journal).unwrap();
    for (i, op) in generate(seed, count).iter().enumerate() {
        // One write(2) per line, so a killed writer never leaves half a line.
        j.write_all(format!("B {i}\n").as_bytes()).unwrap();
        if perform(mnt, op).is_err() {
            return;
        }
        j.write_all(format!("A {i}\n").as_bytes()).unwrap();
    }
}

fn sync_dir(p: &Path) -> std::io::Result<()> {
    File::open(p)?.sync_all()
}

fn perform(mnt: &Path, op: &Op) -> std::io::Result<()> {
    let p = |f: usize| mnt.join(file_name(f));
    match *op {
        Op::Create { f } => {
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(p(f))?
                .sync_all()?;
            sync_dir(p(f).parent().unwrap())
        }
        Op::Write { f, off, len, seed } => {
            let file = OpenOptions::new().write(true).open(p(f))?;
            file.write_all_at(&pseudo_random(len, seed), off)?;
            file.sync_all()
        }
        Op::Truncate { f, len } => {
            let file = OpenOptions::new().write(true).open(p(f))?;
            file.set_len(len)?;
            file.sync_all()
        }
        Op::Rename { from, to } => {
            std::fs::rename(p(from), p(to))?;
            sync_dir(p(from).parent().unwrap())?;
            sync_dir(p(to).parent().unwrap())
        }
        Op::Mkdir { n } => {
            std::fs::create_dir(mnt.join(format!("d{n}")))?;
            sync_dir(mnt)
        }
        Op::Unlink { f } => {
            std::fs::remove_file(p(f))?;
            sync_dir(p(f).parent().unwrap())
        }
    }
}

/// The writer process: this test binary again, told by the environment to run `writer`.
#[test]
#[ignore = "the writer half of the crash tests; started by them"]
fn crash_writer_child() {
    let Ok(args) = std::env::var("KMSFS_CRASH_WRITER") else {
        return;
    };
    let v: Vec<&str> = args.split('|').collect();
    writer(
        Path::new(v[0]),
        Path::new(v[1]),
        v[2].parse().unwrap(),
        v[3].parse().unwrap(),
    );
}

fn spawn_writer(mnt: &Path, journal: &Path, seed: u64, count: usize) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["crash_writer_child", "--exact", "--ignored", "--quiet"])
        .env(
            "KMSFS_CRASH_WRITER",
            format!("{}|{}|{seed}|{count}", mnt.display(), journal.display()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// (acknowledged operations, the operation in flight if any)
fn read_journal(journal: &Path) -> (usize, Option<usize>) {
    let text = std::fs::read_to_string(journal).unwrap_or_default();
    let (mut acked, mut begun) = (0, None);
    for line in text.lines() {
        match line.split_once(' ') {
            Some(("B", i)) => begun = Some(i.parse::<usize>().unwrap()),
            Some(("A", i)) => acked = i.parse::<usize>().unwrap() + 1,
            _ => {}
        }
    }
    (acked, begun.filter(|&b| b >= acked))
}

/// What one check found: hard failures, and blocks that read EIO where that is allowed.
#[derive(Default)]
struct Findings {
    failures: Vec<String>,
    torn_blocks: usize,
}

/// Reads a file block by block; `None` for a block that reads EIO.
fn read_blocks(path: &Path) -> std::io::Result<(u64, Vec<Option<Vec<u8>>>)> {
    let f = File::open(path)?;
    let size = f.metadata()?.len();
    let mut blocks = Vec::new();
    let mut off = 0;
    while off < size {
        let mut buf = vec![0u8; (size - off).min(BLOCK) as usize];
        match f.read_exact_at(&mut buf, off) {
            Ok(()) => blocks.push(Some(buf)),
            Err(e) if e.raw_os_error() == Some(libc::EIO) => blocks.push(None),
            Err(e) => return Err(e),
        }
        off += BLOCK;
    }
    Ok((size, blocks))
}

fn check(mnt: &Path, ops: &[Op], acked: usize, in_flight: Option<usize>) -> Findings {
    let mut before = Model::default();
    ops[..acked].iter().for_each(|op| before.apply(op));
    let mut after = before.clone();
    let flight = in_flight.map(|i| &ops[i]);
    if let Some(op) = flight {
        after.apply(op);
    }
    let mut out = Findings::default();
    let mut fail = |s: String| out.failures.push(s);
    for (f, name) in FILES.iter().enumerate() {
        let path = mnt.join(file_name(f));
        let (old, new) = (before.files.get(&f), after.files.get(&f));
        let actual = match read_blocks(&path) {
            Ok(a) => Some(a),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                fail(format!("{}: cannot read: {e}", name));
                continue;
            }
        };
        let Some((size, blocks)) = actual else {
            if old.is_some() && new.is_some() {
                fail(format!("{}: acknowledged file is missing", name));
            }
            continue;
        };
        // Which of the two states may this file be in?
        let candidates: Vec<&Vec<u8>> = [old, new].into_iter().flatten().collect();
        if candidates.is_empty() {
            fail(format!("{}: exists but was never acknowledged", name));
            continue;
        }
        let write = match flight {
            Some(Op::Write { f: wf, off, len, .. }) if *wf == f => Some((*off, *off + *len as u64)),
            _ => None,
        };
        let truncate = matches!(flight, Some(Op::Truncate { f: tf, .. }) if *tf == f);
        let (lo, hi) = candidates.iter().fold((u64::MAX, 0), |(lo, hi), c| {
            (lo.min(c.len() as u64), hi.max(c.len() as u64))
        });
        if size < lo || size > hi {
            fail(format!("{}: size {size} outside [{lo}, {hi}]", name));
            continue;
        }
        for (b, block) in blocks.iter().enumerate() {
            let start = b as u64 * BLOCK;
            let end = (start + BLOCK).min(size);
            // A block the operation in flight rewrites in place may be torn (documented).
            let rewritten = match (write, old) {
                (Some((ws, we)), Some(o)) => ws < end && we > start && start < o.len() as u64,
                _ => truncate && old.is_some_and(|o| start < o.len() as u64),
            };
            let Some(data) = block else {
                if rewritten {
                    out.torn_blocks += 1;
                } else {
                    fail(format!("{}: block {b} reads EIO", name));
                }
                continue;
            };
            for (i, &byte) in data.iter().enumerate() {
                let at = (start as usize) + i;
                let ok = candidates.iter().any(|c| c.get(at).copied().unwrap_or(0) == byte);
                if !ok {
                    fail(format!(
                        "{}: byte {at} is neither the old nor the new value",
                        name
                    ));
                    break;
                }
            }
            // Bytes outside the write in flight must all come from one consistent state.
            if let (Some((ws, we)), Some(o)) = (write, old) {
                let wrong = (start..end)
                    .filter(|&at| at < ws || at >= we)
                    .any(|at| o.get(at as usize).copied().unwrap_or(0) != data[(at - start) as usize]);
                if wrong {
                    fail(format!("{}: block {b} changed outside the write in flight", name));
                }
            }
        }
        if flight.is_none() {
            let want = old.unwrap();
            if size != want.len() as u64 {
                fail(format!("{}: size {size}, acknowledged {}", name, want.len()));
            }
        }
    }
    if let Some(Op::Rename { from, to }) = flight
        && !mnt.join(file_name(*from)).exists()
        && !mnt.join(file_name(*to)).exists()
    {
        fail(format!(
            "rename {} -> {} in flight lost both names",
            FILES[*from], FILES[*to]
        ));
    }
    for n in 0..after.dirs {
        let d = mnt.join(format!("d{n}"));
        match std::fs::read_dir(&d) {
            Ok(_) => {}
            Err(_) if n >= before.dirs => {} // the mkdir in flight may not have happened
            Err(e) => fail(format!("d{n}: acknowledged directory unreadable: {e}")),
        }
    }
    // No entry the operations did not make, and every directory lists.
    let sub = std::fs::read_dir(mnt.join("sub"))
        .map(|d| d.count())
        .unwrap_or(usize::MAX);
    if sub == usize::MAX {
        fail("sub: cannot list".into());
    }
    out
}

fn lazy_unmount(mnt: &Path) {
    let c = std::ffi::CString::new(mnt.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

fn kill(pid: u32) {
    // SAFETY: sending a signal has no memory-safety preconditions.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

fn iterations() -> usize {
    std::env::var("KMSFS_CRASH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12)
}

/// One volume, many crashes: each iteration starts a writer with a new seed on the surviving
/// volume, kills something, checks, and goes on from what is there.
fn crash_loop(kill_daemon: bool) {
    let scratch = PathBuf::from("/dev/shm");
    let mut vol = Volume::init_in(&scratch, &[], &[]);
    vol.mount(&[]);
    std::fs::create_dir(vol.m("sub")).unwrap();
    let journal = vol.dir.path().join("journal");
    let mut r = Rng(0x5eed ^ kill_daemon as u64);
    let (mut total_torn, mut acked_total) = (0, 0);
    for iter in 0..iterations() {
        // Start each iteration from a clean slate the model knows: an empty root but `sub`.
        for e in std::fs::read_dir(&vol.mnt).unwrap() {
            let p = e.unwrap().path();
            if p.file_name().unwrap() == "sub" {
                for e in std::fs::read_dir(&p).unwrap() {
                    std::fs::remove_file(e.unwrap().path()).unwrap();
                }
            } else if p.is_dir() {
                std::fs::remove_dir_all(&p).unwrap();
            } else {
                std::fs::remove_file(&p).unwrap();
            }
        }
        let seed = r.next();
        let ops = generate(seed, 400);
        let mut child = spawn_writer(&vol.mnt, &journal, seed, ops.len());
        std::thread::sleep(Duration::from_millis(50 + r.below(1500)));
        if kill_daemon {
            kill(vol.daemon_pid());
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            child.wait().unwrap();
            lazy_unmount(&vol.mnt);
            assert!(vol.wait_daemon_gone(10), "killed daemon still holds the volume");
            vol.mount(&[]);
        } else {
            let _ = child.kill();
            child.wait().unwrap();
        }
        let (acked, in_flight) = read_journal(&journal);
        let found = check(&vol.mnt, &ops, acked, in_flight);
        assert!(
            found.failures.is_empty(),
            "iteration {iter} (seed {seed}, {acked} acknowledged, in flight {:?}):\n{}",
            in_flight.map(|i| &ops[i]),
            found.failures.join("\n")
        );
        total_torn += found.torn_blocks;
        acked_total += acked;
        if !kill_daemon {
            // The writer's death must not matter to the daemon: same answer after a remount.
            vol.remount();
            let again = check(&vol.mnt, &ops, acked, in_flight);
            assert!(
                again.failures.is_empty(),
                "after remount: {}",
                again.failures.join("\n")
            );
        }
    }
    eprintln!(
        "{} kills of the {}: {acked_total} acknowledged operations checked, {total_torn} torn blocks (in-flight rewrites)",
        iterations(),
        if kill_daemon { "daemon" } else { "writer" }
    );
}

#[test]
fn sigkill_of_the_daemon_loses_no_acknowledged_byte() {
    crash_loop(true);
}

#[test]
fn sigkill_of_the_writer_loses_nothing() {
    crash_loop(false);
}

/// `kmsfs rewrap` killed at random moments: every file still opens with its data, and the next
/// run finishes the job.
#[test]
fn sigkill_of_rewrap_leaves_every_file_readable() {
    let scratch = PathBuf::from("/dev/shm");
    let mut vol = Volume::init_in(&scratch, &[], &[]);
    vol.mount(&[]);
    let n = 150;
    for i in 0..n {
        std::fs::write(vol.m(&format!("f{i}")), pseudo_random(1000 + i * 37, i as u64)).unwrap();
    }
    vol.unmount();
    let mut r = Rng(7);
    for _ in 0..iterations().min(8) {
        vol.key("rotate");
        let mut child = kmsfs()
            .args(["rewrap", vol.backing.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(5 + r.below(120)));
        let _ = child.kill();
        child.wait().unwrap();
        vol.mount(&[]);
        for i in 0..n {
            let got = std::fs::read(vol.m(&format!("f{i}"))).unwrap();
            assert_eq!(got, pseudo_random(1000 + i * 37, i as u64), "file f{i}");
        }
        vol.unmount();
    }
    let out = vol.run(&["rewrap", vol.backing.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("failed"), "{text}");
    let dry = vol.run(&["rewrap", vol.backing.to_str().unwrap(), "--dry-run"]);
    let dry = String::from_utf8_lossy(&dry.stdout);
    assert_eq!(
        dry.lines()
            .filter(|l| l.contains("files wrapped with version"))
            .count(),
        1,
        "all files on the newest version: {dry}"
    );
}
