//! The fuzz targets' bodies (`kmsfs::fuzzing`) on the stable toolchain, for CI, where cargo-fuzz
//! and nightly may be missing: the committed seed corpus, then pseudo-random and mutated inputs
//! from a fixed seed. Not a fuzzer (no coverage feedback): `fuzz/run` runs the real one.
//!
//! A failing input is saved under the system temp directory; replay it with
//! `cargo +nightly fuzz run <target> <file>` in `fuzz/`.

use kmsfs::fuzzing::{TARGETS, run, seeds};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

/// Generated inputs per target, after the seeds. Fewer for the targets that encrypt: in the
/// debug test profile the cipher's generic code is compiled unoptimised into kmsfs (only
/// dependencies get opt-level 3), at tens of microseconds per seal or open.
fn cases(target: &str) -> usize {
    match target {
        "name" => 5_000,
        "block" => 6_000,
        "header" => 15_000,
        _ => 20_000,
    }
}

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// The committed seeds (`seed-*`); other files there are a local fuzzer's corpus growth.
fn committed_seeds(target: &str) -> Vec<Vec<u8>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(corpus_dir(target))
        .unwrap_or_else(|e| panic!("fuzz/corpus/{target}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("seed-"))
        .collect();
    paths.sort();
    paths.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// splitmix64: deterministic and dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

const INTERESTING_BYTES: &[u8] = b"\x00\x01\x7f\x80\xff\"{}[]:,\\./-_=0aAz ";
const INTERESTING_U64: &[u64] = &[
    0,
    1,
    27,
    28,
    4095,
    4096,
    65535,
    65536,
    65537,
    65564,
    4124,
    4125,
    1 << 20,
    (1 << 20) + 1,
    1_048_604,
    1 << 48,
    1 << 60,
    i64::MAX as u64,
    u64::MAX - 1,
    u64::MAX,
];

/// A few libFuzzer-style mutations: bit flips, special bytes and integers, inserts, deletes,
/// truncation and duplicated chunks.
fn mutate(rng: &mut Rng, v: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(8) {
        let pos = rng.below(v.len());
        match rng.below(7) {
            0 if !v.is_empty() => v[pos] ^= 1 << rng.below(8),
            1 if !v.is_empty() => v[pos] = INTERESTING_BYTES[rng.below(INTERESTING_BYTES.len())],
            2 => {
                let n = 1 + rng.below(16);
                let ins = rng.bytes(n);
                v.splice(pos..pos, ins);
            }
            3 => {
                let end = (pos + 1 + rng.below(32)).min(v.len());
                v.drain(pos..end);
            }
            4 => v.truncate(pos),
            5 if v.len() >= 8 => {
                let at = rng.below(v.len() - 7);
                let x = INTERESTING_U64[rng.below(INTERESTING_U64.len())];
                v[at..at + 8].copy_from_slice(&x.to_le_bytes());
            }
            6 if !v.is_empty() => {
                let end = (pos + 1 + rng.below(64)).min(v.len());
                let chunk = v[pos..end].to_vec();
                let at = rng.below(v.len() + 1);
                v.splice(at..at, chunk);
            }
            _ => {}
        }
    }
}

fn check(target: &str, input: &[u8], what: &str) {
    if catch_unwind(AssertUnwindSafe(|| run(target, input))).is_err() {
        let path = std::env::temp_dir().join(format!("kmsfs-fuzz-smoke-{target}-{what}"));
        std::fs::write(&path, input).unwrap();
        panic!(
            "fuzz target {target} failed on {what}; input saved to {}",
            path.display()
        );
    }
}

fn smoke(target: &str) {
    let seeds = committed_seeds(target);
    assert!(
        !seeds.is_empty(),
        "no seeds in fuzz/corpus/{target}: cargo test --test fuzz_smoke -- --ignored write_seed_corpus"
    );
    for (i, s) in seeds.iter().enumerate() {
        check(target, s, &format!("seed-{i}"));
    }
    let mut rng = Rng(target
        .bytes()
        .fold(0x6b6d_7366, |h, b| h.wrapping_mul(31) ^ b as u64));
    for case in 0..cases(target) {
        let input = if case % 4 == 0 {
            let n = rng.below(600);
            rng.bytes(n)
        } else {
            let mut v = seeds[rng.below(seeds.len())].clone();
            mutate(&mut rng, &mut v);
            v
        };
        check(target, &input, &format!("case-{case}"));
    }
}

#[test]
fn header() {
    smoke("header");
}

#[test]
fn config() {
    smoke("config");
}

#[test]
fn name() {
    smoke("name");
}

#[test]
fn block() {
    smoke("block");
}

#[test]
fn kmip() {
    smoke("kmip");
}

#[test]
fn block_math_extremes() {
    for flags in 0..16u8 {
        let layout = kmsfs::fuzzing::fuzz_layout(flags << 1);
        for &a in INTERESTING_U64 {
            for &b in INTERESTING_U64 {
                kmsfs::fuzzing::block_math(layout, a, b);
            }
        }
    }
}

/// Rewrites the committed seeds from `kmsfs::fuzzing::seeds`. Records and symlinks get fresh
/// random nonces, so only run it when the seeds must change.
#[test]
#[ignore]
fn write_seed_corpus() {
    for target in TARGETS {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.file_name().unwrap().to_string_lossy().starts_with("seed-") {
                std::fs::remove_file(p).unwrap();
            }
        }
        for (name, bytes) in seeds(target) {
            std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
        }
    }
}
