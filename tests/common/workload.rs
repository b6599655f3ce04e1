//! The crash workload: a seeded sequence of operations, each made durable (fsync of the file
//! or of the parent directory) and acknowledged in a journal outside the mount, and the check
//! of a volume against the journal after a crash (tests/crash.rs kills processes,
//! tests/powerloss.rs cuts the power beneath the backing directory).
#![allow(dead_code)]

use super::{Rng, pseudo_random};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The default block size: the one the volumes of these tests have unless they say otherwise.
pub const BLOCK: u64 = 64 * 1024;
pub const FILES: [&str; 5] = ["f0", "f1", "f2", "sub/f3", "LONG"];

pub fn file_name(i: usize) -> String {
    if FILES[i] == "LONG" {
        format!("sub/long-{}", "n".repeat(200))
    } else {
        FILES[i].to_string()
    }
}

#[derive(Clone, Debug)]
pub enum Op {
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
pub struct Model {
    pub files: BTreeMap<usize, Vec<u8>>,
    pub dirs: usize,
}

impl Model {
    pub fn apply(&mut self, op: &Op) {
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

/// Offsets of the crash workload: block edges and anywhere in 8 blocks of `block` bytes.
pub trait Offsets {
    fn offset(&mut self, block: u64) -> u64;
}

impl Offsets for Rng {
    fn offset(&mut self, block: u64) -> u64 {
        let b = self.below(8) * block;
        match self.below(3) {
            0 => b,
            1 => (b + self.below(9)).saturating_sub(4),
            _ => self.below(8 * block),
        }
    }
}

/// A sequence valid for the state it runs on (the writer must never fail but by the crash),
/// for a volume of `block`-byte blocks.
pub fn generate(seed: u64, count: usize, block: u64) -> Vec<Op> {
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
                let max = if r.below(2) == 0 { 4096 } else { 3 * block };
                Op::Write {
                    f,
                    off: r.offset(block),
                    len: 1 + r.below(max) as usize,
                    seed: r.next(),
                }
            }
            5 | 6 => Op::Truncate {
                f,
                len: r.offset(block),
            },
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
pub fn writer(mnt: &Path, journal: &Path, seed: u64, count: usize, block: u64) {
    let mut j = File::create(journal).unwrap();
    for (i, op) in generate(seed, count, block).iter().enumerate() {
        // One write(2) per line, so a killed writer never leaves half a line.
        j.write_all(format!("B {i}\n").as_bytes()).unwrap();
        if perform(mnt, op).is_err() {
            return;
        }
        j.write_all(format!("A {i}\n").as_bytes()).unwrap();
    }
}

pub fn sync_dir(p: &Path) -> std::io::Result<()> {
    File::open(p)?.sync_all()
}

pub fn perform(mnt: &Path, op: &Op) -> std::io::Result<()> {
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

/// (acknowledged operations, the operation in flight if any)
pub fn read_journal(journal: &Path) -> (usize, Option<usize>) {
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
pub struct Findings {
    pub failures: Vec<String>,
    pub torn_blocks: usize,
}

/// Reads a file block by block (`block` bytes each); `None` for a block that reads EIO.
pub fn read_blocks(path: &Path, block: u64) -> std::io::Result<(u64, Vec<Option<Vec<u8>>>)> {
    let f = File::open(path)?;
    let size = f.metadata()?.len();
    let mut blocks = Vec::new();
    let mut off = 0;
    while off < size {
        let mut buf = vec![0u8; (size - off).min(block) as usize];
        match f.read_exact_at(&mut buf, off) {
            Ok(()) => blocks.push(Some(buf)),
            Err(e) if e.raw_os_error() == Some(libc::EIO) => blocks.push(None),
            Err(e) => return Err(e),
        }
        off += block;
    }
    Ok((size, blocks))
}

/// `power_cut`: the crash was a power cut, after which a write in flight may also leave blocks
/// past the old end unreadable (docs/format.md, "Crash behaviour"). `block_size`: the volume's.
pub fn check(
    mnt: &Path,
    ops: &[Op],
    acked: usize,
    in_flight: Option<usize>,
    power_cut: bool,
    block_size: u64,
) -> Findings {
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
        let actual = match read_blocks(&path, block_size) {
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
            let start = b as u64 * block_size;
            let end = (start + block_size).min(size);
            // A block the operation in flight rewrites in place may be torn, and so may every
            // block an extension in flight writes, from the old final block (resealed as a
            // full one first) on: after a power cut because its `pwrite`s reach the disk in
            // pieces, after a kill because the kernel stops a `pwrite` between pages when the
            // writer gets SIGKILL (documented in docs/format.md, "Crash behaviour").
            let rewritten = match (write, old) {
                (Some((ws, we)), Some(o)) => {
                    let old_final = (o.len() as u64).saturating_sub(1) / block_size * block_size;
                    let extends = we > o.len() as u64 && start >= old_final;
                    extends || ws < end && we > start && (power_cut || start < o.len() as u64)
                }
                _ => truncate && old.is_some_and(|o| start < o.len() as u64),
            };
            let Some(data) = block else {
                if rewritten {
                    out.torn_blocks += 1;
                } else {
                    fail(format!(
                        "{}: block {b} reads EIO (size {size}; acknowledged size {:?}, after the write in flight {:?})",
                        name,
                        old.map(Vec::len),
                        new.map(Vec::len)
                    ));
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

/// The body of a test binary's ignored writer test: runs `writer` with the arguments
/// `spawn_writer` passed, or does nothing when run as an ordinary test.
pub fn writer_child() {
    let Ok(args) = std::env::var("KMSFS_CRASH_WRITER") else {
        return;
    };
    let v: Vec<&str> = args.split('|').collect();
    writer(
        Path::new(v[0]),
        Path::new(v[1]),
        v[2].parse().unwrap(),
        v[3].parse().unwrap(),
        v[4].parse().unwrap(),
    );
}

/// Starts `writer` in a child process: this test binary again, running its ignored test
/// `child_test`, which reads its arguments from `KMSFS_CRASH_WRITER`. `block`: the volume's
/// block size, which the operations are generated for.
pub fn spawn_writer(
    child_test: &str,
    mnt: &Path,
    journal: &Path,
    seed: u64,
    count: usize,
    block: u64,
) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([child_test, "--exact", "--ignored", "--quiet"])
        .env(
            "KMSFS_CRASH_WRITER",
            format!("{}|{}|{seed}|{count}|{block}", mnt.display(), journal.display()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Detaches a mount whose daemon is gone.
pub fn lazy_unmount(mnt: &Path) {
    let c = std::ffi::CString::new(mnt.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

pub fn kill(pid: u32) {
    // SAFETY: sending a signal has no memory-safety preconditions.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}
