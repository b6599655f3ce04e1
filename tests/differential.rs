//! Differential testing: one seeded sequence of filesystem operations runs on a kmsfs mount and
//! on a plain directory, and every result — bytes read, sizes, directory listings, errno — must
//! be the same. Operations are generated without looking at state, so any subsequence of a
//! sequence is itself a valid sequence: that is what lets a failure shrink.
//!
//! - CI budget: `differential_short_budget` (fixed seeds, 40,000 operations).
//! - Long run: `KMSFS_DIFF_OPS=1000000 cargo test --test differential -- --ignored`
//!   (random seed, printed).
//! - Replay: `KMSFS_DIFF_SEED=<seed> KMSFS_DIFF_OPS=<n> cargo test --test differential replay_seed -- --ignored`.
//!
//! A failure prints the seed, the failing operation and a shrunk sequence written as Rust, ready
//! to become a named test under `regressions` below.

mod common;

use common::*;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

const KIB: u64 = 1024;
const BLOCK: u64 = 64 * KIB;
/// Open-file slots the generator juggles (several handles on one file included).
const SLOTS: usize = 4;
/// Files stay below this size, so a long run exercises many blocks without filling the disk.
const MAX_OFFSET: u64 = 400 * KIB;

/// A long name (> 175 bytes) takes the sidecar path in the backing directory.
fn long_name() -> String {
    format!("long-{}", "x".repeat(200))
}

/// The fixed pool of paths operations pick from: nested directories, short and long names.
fn path_pool() -> Vec<String> {
    let long = long_name();
    let mut pool = Vec::new();
    for dir in ["", "a/", "a/b/", "c/"] {
        for name in ["f0", "f1", "f2", "a", "b", "c", long.as_str()] {
            pool.push(format!("{dir}{name}"));
        }
    }
    pool
}

/// Indices into `path_pool()`: `f0`, `f1`, the long name, `a/f0`.
const HOT: [usize; 4] = [0, 1, 6, 7];

#[derive(Clone, Debug)]
#[allow(dead_code)] // variants are also built by hand in regression tests
enum Op {
    Open {
        slot: usize,
        path: usize,
        create: bool,
        trunc: bool,
        append: bool,
    },
    Close {
        slot: usize,
    },
    Write {
        slot: usize,
        off: u64,
        len: usize,
        seed: u64,
    },
    Read {
        slot: usize,
        off: u64,
        len: usize,
    },
    Fsync {
        slot: usize,
    },
    Ftruncate {
        slot: usize,
        len: u64,
    },
    Fstat {
        slot: usize,
    },
    Truncate {
        path: usize,
        len: u64,
    },
    Rename {
        from: usize,
        to: usize,
    },
    Link {
        from: usize,
        to: usize,
    },
    Unlink {
        path: usize,
    },
    Mkdir {
        path: usize,
    },
    Rmdir {
        path: usize,
    },
    Symlink {
        target: usize,
        path: usize,
    },
    Readlink {
        path: usize,
    },
    Lstat {
        path: usize,
    },
    ReadDir {
        dir: usize,
    },
    ReadFile {
        path: usize,
    },
    /// Drops the file's pages from the kernel's cache, so the next read reaches the daemon.
    Evict {
        path: usize,
    },
    /// Threads write interleaved stripes of one file at once (sharing blocks), then it is read.
    Concurrent {
        path: usize,
        threads: usize,
        stripe: usize,
        seed: u64,
    },
    /// Closes every slot, unmounts and mounts again (the reference only closes its slots).
    Remount,
}

/// What an operation returned, in a form both sides can be compared by.
#[derive(Debug, PartialEq)]
enum Outcome {
    Ok,
    Bytes(Vec<u8>),
    Stat {
        kind: &'static str,
        size: Option<u64>,
        nlink: u64,
        perm: u32,
    },
    Names(Vec<Vec<u8>>),
    Err(i32),
}

/// Offsets and lengths of the generated operations.
trait Sizes {
    fn offset(&mut self) -> u64;
    fn len(&mut self) -> usize;
}

impl Sizes for Rng {
    /// Offsets cluster around block boundaries, where the bugs are.
    fn offset(&mut self) -> u64 {
        match self.below(4) {
            0 => 0,
            1 => {
                let b = self.below(MAX_OFFSET / BLOCK + 1) * BLOCK;
                if self.chance(50) {
                    b
                } else {
                    (b + self.below(9)).saturating_sub(4)
                }
            }
            _ => self.below(MAX_OFFSET),
        }
    }
    fn len(&mut self) -> usize {
        (match self.below(5) {
            0 => 1 + self.below(16),
            1 => 1 + self.below(4 * KIB),
            2 => BLOCK,
            3 => 1 + self.below(BLOCK),
            _ => 1 + self.below(3 * BLOCK),
        }) as usize
    }
}

fn generate(seed: u64, count: usize, paths: usize) -> Vec<Op> {
    let mut r = Rng(seed);
    let mut ops = Vec::with_capacity(count);
    for _ in 0..count {
        let slot = r.below(SLOTS as u64) as usize;
        // Most operations land on a few hot paths, so they meet each other's results.
        let pick = |r: &mut Rng| {
            if r.chance(60) {
                HOT[r.below(HOT.len() as u64) as usize]
            } else {
                r.below(paths as u64) as usize
            }
        };
        let path = pick(&mut r);
        let other = pick(&mut r);
        let op = match r.below(100) {
            0..=11 => Op::Open {
                slot,
                path,
                create: r.chance(70),
                trunc: r.chance(10),
                append: r.chance(10),
            },
            12..=16 => Op::Close { slot },
            17..=38 => Op::Write {
                slot,
                off: r.offset(),
                len: r.len(),
                seed: r.next(),
            },
            39..=52 => Op::Read {
                slot,
                off: r.offset(),
                len: r.len(),
            },
            53..=55 => Op::Fsync { slot },
            56..=59 => Op::Ftruncate {
                slot,
                len: r.offset(),
            },
            60..=62 => Op::Fstat { slot },
            63..=64 => Op::Truncate {
                path,
                len: r.offset(),
            },
            65..=68 => Op::Rename {
                from: path,
                to: other,
            },
            69..=70 => Op::Link {
                from: path,
                to: other,
            },
            71..=74 => Op::Unlink { path },
            75..=78 => Op::Mkdir { path },
            79..=80 => Op::Rmdir { path },
            81..=82 => Op::Symlink { target: other, path },
            83 => Op::Readlink { path },
            84..=88 => Op::Lstat { path },
            89..=92 => Op::ReadDir { dir: path },
            93..=95 => Op::ReadFile { path },
            96..=97 => Op::Evict { path },
            98 => Op::Concurrent {
                path,
                threads: 2 + r.below(3) as usize,
                stripe: 1 + r.below(20 * KIB) as usize,
                seed: r.next(),
            },
            _ => {
                if r.chance(20) {
                    Op::Remount
                } else {
                    Op::Fstat { slot }
                }
            }
        };
        ops.push(op);
    }
    ops
}

fn errno(e: &std::io::Error) -> Outcome {
    Outcome::Err(e.raw_os_error().unwrap_or(-1))
}

fn outcome<T>(r: std::io::Result<T>, f: impl FnOnce(T) -> Outcome) -> Outcome {
    match r {
        Ok(v) => f(v),
        Err(e) => errno(&e),
    }
}

fn stat_outcome(m: &std::fs::Metadata) -> Outcome {
    let ft = m.file_type();
    let kind = if ft.is_dir() {
        "dir"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_file() {
        "file"
    } else {
        "other"
    };
    Outcome::Stat {
        kind,
        // A directory's size is the backing filesystem's business, not ours.
        size: (kind != "dir").then_some(m.len()),
        nlink: m.nlink(),
        perm: m.mode() & 0o7777,
    }
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn read_at_most(f: &File, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(done);
    Ok(buf)
}

/// One side of the comparison: a root directory and its open-file slots.
struct Side {
    root: PathBuf,
    slots: Vec<Option<File>>,
}

impl Side {
    fn new(root: PathBuf) -> Side {
        Side {
            root,
            slots: (0..SLOTS).map(|_| None).collect(),
        }
    }

    fn slot(&self, slot: usize) -> std::io::Result<&File> {
        self.slots[slot]
            .as_ref()
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EBADF))
    }

    fn apply(&mut self, op: &Op, paths: &[String]) -> Outcome {
        let p = |i: usize| self.root.join(&paths[i]);
        match *op {
            Op::Open {
                slot,
                path,
                create,
                trunc,
                append,
            } => {
                self.slots[slot] = None;
                let r = OpenOptions::new()
                    .read(true)
                    .write(!append)
                    .append(append)
                    .create(create)
                    .truncate(trunc && !append)
                    .mode(0o640)
                    .open(p(path));
                match r {
                    Ok(f) => {
                        self.slots[slot] = Some(f);
                        Outcome::Ok
                    }
                    Err(e) => errno(&e),
                }
            }
            Op::Close { slot } => match self.slots[slot].take() {
                Some(_) => Outcome::Ok,
                None => Outcome::Err(libc::EBADF),
            },
            Op::Write { slot, off, len, seed } => {
                let data = pseudo_random(len, seed);
                outcome(self.slot(slot).and_then(|f| f.write_all_at(&data, off)), |_| {
                    Outcome::Ok
                })
            }
            Op::Read { slot, off, len } => outcome(
                self.slot(slot).and_then(|f| read_at_most(f, off, len)),
                Outcome::Bytes,
            ),
            Op::Fsync { slot } => outcome(self.slot(slot).and_then(|f| f.sync_all()), |_| Outcome::Ok),
            Op::Ftruncate { slot, len } => {
                outcome(self.slot(slot).and_then(|f| f.set_len(len)), |_| Outcome::Ok)
            }
            Op::Fstat { slot } => outcome(self.slot(slot).and_then(|f| f.metadata()), |m| stat_outcome(&m)),
            Op::Truncate { path, len } => {
                let c = cpath(&p(path));
                // SAFETY: a valid NUL-terminated path.
                let rc = unsafe { libc::truncate(c.as_ptr(), len as libc::off_t) };
                if rc == 0 {
                    Outcome::Ok
                } else {
                    errno(&std::io::Error::last_os_error())
                }
            }
            Op::Rename { from, to } => outcome(std::fs::rename(p(from), p(to)), |_| Outcome::Ok),
            Op::Link { from, to } => outcome(std::fs::hard_link(p(from), p(to)), |_| Outcome::Ok),
            Op::Unlink { path } => outcome(std::fs::remove_file(p(path)), |_| Outcome::Ok),
            Op::Mkdir { path } => outcome(std::fs::create_dir(p(path)), |_| Outcome::Ok),
            Op::Rmdir { path } => outcome(std::fs::remove_dir(p(path)), |_| Outcome::Ok),
            Op::Symlink { target, path } => {
                // Relative targets, so both sides resolve them inside their own tree.
                outcome(std::os::unix::fs::symlink(&paths[target], p(path)), |_| {
                    Outcome::Ok
                })
            }
            Op::Readlink { path } => outcome(std::fs::read_link(p(path)), |t| {
                Outcome::Bytes(t.as_os_str().as_bytes().to_vec())
            }),
            Op::Lstat { path } => outcome(std::fs::symlink_metadata(p(path)), |m| stat_outcome(&m)),
            Op::ReadDir { dir } => outcome(list(&p(dir)), Outcome::Names),
            Op::ReadFile { path } => outcome(std::fs::read(p(path)), Outcome::Bytes),
            Op::Evict { path } => outcome(File::open(p(path)).and_then(|f| evict(&f)), |_| Outcome::Ok),
            Op::Concurrent {
                path,
                threads,
                stripe,
                seed,
            } => outcome(concurrent(&p(path), threads, stripe, seed), Outcome::Bytes),
            Op::Remount => {
                self.slots.iter_mut().for_each(|s| *s = None);
                Outcome::Ok
            }
        }
    }
}

/// Writes back and drops the file's cached pages (`POSIX_FADV_DONTNEED`).
fn evict(f: &File) -> std::io::Result<()> {
    f.sync_data()?;
    // SAFETY: a valid open descriptor; the call only affects the page cache.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}

fn list(dir: &Path) -> std::io::Result<Vec<Vec<u8>>> {
    let mut names = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name().as_bytes().to_vec()))
        .collect::<std::io::Result<Vec<_>>>()?;
    names.sort();
    Ok(names)
}

/// `threads` writers, each through its own descriptor, fill interleaved `stripe`-byte stripes
/// of one file at the same time; returns the file's content afterwards.
fn concurrent(path: &Path, threads: usize, stripe: usize, seed: u64) -> std::io::Result<Vec<u8>> {
    let total = (MAX_OFFSET as usize / 2).min(stripe * threads * 8);
    let files = (0..threads)
        .map(|_| {
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o640)
                .open(path)
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    std::thread::scope(|s| {
        let handles: Vec<_> = files
            .iter()
            .enumerate()
            .map(|(t, f)| {
                s.spawn(move || -> std::io::Result<()> {
                    let data = pseudo_random(total, seed);
                    let mut off = t * stripe;
                    while off < total {
                        let end = (off + stripe).min(total);
                        f.write_all_at(&data[off..end], off as u64)?;
                        off += stripe * threads;
                    }
                    Ok(())
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| h.join().unwrap())
    })?;
    drop(files);
    std::fs::read(path)
}

/// Every entry of a tree: kind, permissions, and content or target (or the error reading it).
type Entry = (PathBuf, Outcome, Outcome);

fn snapshot(root: &Path) -> Vec<Entry> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<Entry>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            let content = if m.is_file() {
                // Read what the daemon decrypts, not what the kernel kept.
                let read = File::open(&p)
                    .and_then(|f| evict(&f))
                    .and_then(|()| std::fs::read(&p));
                outcome(read, Outcome::Bytes)
            } else if m.file_type().is_symlink() {
                outcome(std::fs::read_link(&p), |t| {
                    Outcome::Bytes(t.as_os_str().as_bytes().to_vec())
                })
            } else {
                Outcome::Ok
            };
            out.push((rel, stat_outcome(&m), content));
            if m.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out
}

fn scratch() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// A mismatch: where and what.
struct Mismatch {
    index: usize,
    detail: String,
}

/// Runs `ops` on a fresh mount and a fresh plain directory; the first difference, if any.
fn run(ops: &[Op]) -> Option<Mismatch> {
    let paths = path_pool();
    // Both trees on tmpfs: the test is about what kmsfs computes, and it syncs a lot.
    let mut vol = Volume::init_in(&scratch(), &[], &[]);
    vol.mount(&[]);
    let reference = tempfile::tempdir_in(scratch()).unwrap();
    let mut ours = Side::new(vol.mnt.clone());
    let mut theirs = Side::new(reference.path().to_path_buf());
    for (index, op) in ops.iter().enumerate() {
        let a = ours.apply(op, &paths);
        if matches!(op, Op::Remount) {
            vol.remount();
        }
        let b = theirs.apply(op, &paths);
        if a != b {
            return Some(Mismatch {
                index,
                detail: format!("kmsfs: {}\nplain: {}", brief(&a), brief(&b)),
            });
        }
        if (index + 1) % 1000 == 0 || index + 1 == ops.len() {
            let (sa, sb) = (snapshot(&vol.mnt), snapshot(reference.path()));
            if sa != sb {
                let first = sa
                    .iter()
                    .zip(&sb)
                    .find(|(x, y)| x != y)
                    .map(|(x, y)| {
                        format!(
                            "{:?} {} {} vs {:?} {} {}",
                            x.0,
                            brief(&x.1),
                            brief(&x.2),
                            y.0,
                            brief(&y.1),
                            brief(&y.2)
                        )
                    })
                    .unwrap_or_else(|| format!("{} vs {} entries", sa.len(), sb.len()));
                return Some(Mismatch {
                    index,
                    detail: format!("trees differ after the operation: {first}"),
                });
            }
        }
    }
    None
}

/// Outcomes can hold hundreds of KiB: print the shape and where bytes first differ.
fn brief(o: &Outcome) -> String {
    match o {
        Outcome::Bytes(b) => format!("{} bytes, hash {:016x}", b.len(), fnv(b)),
        other => format!("{other:?}"),
    }
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Delta debugging over the failing prefix: drops chunks while the sequence still fails.
/// Each attempt is a fresh mount, so the budget is bounded.
fn shrink(mut ops: Vec<Op>, mut budget: usize) -> Vec<Op> {
    let mut chunk = ops.len().div_ceil(2);
    while chunk >= 1 && budget > 0 {
        let mut start = 0;
        let mut removed = false;
        while start < ops.len() && budget > 0 {
            let mut candidate = ops.clone();
            candidate.drain(start..(start + chunk).min(ops.len()));
            budget -= 1;
            if let Some(m) = run(&candidate) {
                candidate.truncate(m.index + 1);
                ops = candidate;
                removed = true;
            } else {
                start += chunk;
            }
        }
        if !removed {
            chunk /= 2;
        }
    }
    ops
}

fn check(seed: u64, count: usize) {
    let ops = generate(seed, count, path_pool().len());
    let Some(m) = run(&ops) else {
        eprintln!("seed {seed}: {count} operations, 0 mismatches");
        return;
    };
    let failing = ops[..=m.index].to_vec();
    let budget = std::env::var("KMSFS_DIFF_SHRINK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    let shrunk = shrink(failing, budget);
    panic!(
        "mismatch at operation {} of seed {seed} ({:?}):\n{}\n\
         replay: KMSFS_DIFF_SEED={seed} KMSFS_DIFF_OPS={} cargo test --test differential replay_seed -- --ignored\n\
         shrunk to {} operations:\n{:#?}",
        m.index,
        ops[m.index],
        m.detail,
        m.index + 1,
        shrunk.len(),
        shrunk
    );
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn differential_short_budget() {
    // 8 seeds × 5,000 operations: CI's budget.
    for seed in 1..=8 {
        check(seed, 5_000);
    }
}

#[test]
#[ignore = "long run: KMSFS_DIFF_OPS (default 1,000,000) operations from a random seed"]
fn differential_long() {
    let total = env_u64("KMSFS_DIFF_OPS").unwrap_or(1_000_000) as usize;
    let seed = env_u64("KMSFS_DIFF_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    // Chunks of 50,000 keep each replay (and its shrinking) affordable.
    let mut done = 0;
    let mut chunk_seed = seed;
    while done < total {
        let n = (total - done).min(50_000);
        eprintln!("seed {chunk_seed}: {n} operations");
        check(chunk_seed, n);
        done += n;
        chunk_seed = chunk_seed.wrapping_add(1);
    }
    eprintln!("{done} operations from seed {seed}: 0 mismatches");
}

#[test]
#[ignore = "replays KMSFS_DIFF_SEED for KMSFS_DIFF_OPS operations"]
fn replay_seed() {
    let seed = env_u64("KMSFS_DIFF_SEED").expect("set KMSFS_DIFF_SEED");
    let count = env_u64("KMSFS_DIFF_OPS").unwrap_or(5_000) as usize;
    check(seed, count);
}

/// Shrunk failures, kept as named tests. Some were found by breaking the code on purpose to
/// check that the generator finds and shrinks the break (say so in the test's comment).
mod regressions {
    use super::*;

    fn replay(ops: &[Op]) {
        if let Some(m) = run(ops) {
            panic!(
                "mismatch at operation {} ({:?}):\n{}",
                m.index, ops[m.index], m.detail
            );
        }
    }

    /// The generator's path pool, for readable regression tests.
    #[allow(dead_code)]
    fn at(name: &str) -> usize {
        path_pool().iter().position(|p| p == name).unwrap()
    }

    /// Found by the generator (and shrunk from 970 operations to these 3) when the reseal of
    /// the block that becomes final was skipped for a cut at a block boundary (a deliberate
    /// break of `ContentFile::truncate`).
    #[test]
    fn a_cut_to_a_block_boundary_reseals_the_new_final_block() {
        replay(&[
            Op::Open {
                slot: 3,
                path: at("f0"),
                create: true,
                trunc: false,
                append: false,
            },
            Op::Write {
                slot: 3,
                off: 4 * BLOCK,
                len: 111_434,
                seed: 631_707_594_003_990_117,
            },
            Op::Ftruncate {
                slot: 3,
                len: 5 * BLOCK,
            },
        ]);
    }

    /// Appending through a second descriptor after a truncate that grew the file.
    #[test]
    fn append_after_extending_truncate() {
        replay(&[
            Op::Open {
                slot: 0,
                path: at("f0"),
                create: true,
                trunc: false,
                append: false,
            },
            Op::Write {
                slot: 0,
                off: 10,
                len: 100,
                seed: 7,
            },
            Op::Ftruncate {
                slot: 0,
                len: BLOCK + 5,
            },
            Op::Open {
                slot: 1,
                path: at("f0"),
                create: false,
                trunc: false,
                append: true,
            },
            Op::Write {
                slot: 1,
                off: 0,
                len: 70_000,
                seed: 8,
            },
            Op::Read {
                slot: 0,
                off: 0,
                len: 300_000,
            },
        ]);
    }
}
