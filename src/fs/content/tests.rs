//! Unit tests of `fs::content`, kept apart so the module reads as what it does.
use super::*;
use crate::crypto::SecretKey;
use crate::format::FileId;
use crate::format::block::{BlockLayout, is_hole};
use proptest::prelude::*;
use std::os::unix::fs::MetadataExt;

/// The smallest, the default and the largest block size: the tests run on each.
fn layouts() -> [BlockLayout; 3] {
    [4096, 65536, 1 << 20].map(|bs| BlockLayout::new(bs).unwrap())
}

/// A content file on a temp file with a zeroed header area (content does not read it).
fn fresh(l: BlockLayout, dek: &SecretKey, id: FileId) -> (tempfile::NamedTempFile, ContentFile) {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    tmp.as_file().set_len(HEADER_LEN).unwrap();
    let c = reopen(l, &tmp, dek, id);
    (tmp, c)
}

fn reopen(l: BlockLayout, tmp: &tempfile::NamedTempFile, dek: &SecretKey, id: FileId) -> ContentFile {
    let f = tmp.reopen().unwrap();
    ContentFile::new(f, Arc::new(ContentCipher::new(dek, id)), l, true).unwrap()
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, usize, u8),
    Truncate(u64),
    Read(u64, u32),
    Reopen,
}

/// Offsets cluster around block boundaries, where the bugs live.
fn offset(bs: u64) -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..4 * bs,
        (0u64..5, -3i64..4).prop_map(move |(b, d)| (b * bs).saturating_add_signed(d)),
    ]
}

fn op(bs: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (offset(bs), prop_oneof![1usize..100, 1usize..3 * bs as usize], any::<u8>())
            .prop_map(|(o, l, s)| Op::Write(o, l, s)),
        1 => offset(bs).prop_map(Op::Truncate),
        2 => (offset(bs), 1u32..3 * bs as u32).prop_map(|(o, l)| Op::Read(o, l)),
        1 => Just(Op::Reopen),
    ]
}

fn ops(bs: u64) -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(op(bs), 1..24)
}

/// Runs `ops` on a content file and on a `Vec`, comparing every read, size and the end state.
fn check_against_model(l: BlockLayout, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dek = SecretKey::generate();
    let id = FileId::generate();
    let (tmp, mut c) = fresh(l, &dek, id);
    let mut model: Vec<u8> = Vec::new();
    for op in ops {
        match op {
            Op::Write(off, len, seed) => {
                let data: Vec<u8> = (0..len).map(|i| seed.wrapping_add(i as u8) | 1).collect();
                c.write(off, &data).unwrap();
                let end = off as usize + len;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[off as usize..end].copy_from_slice(&data);
            }
            Op::Truncate(n) => {
                c.truncate(n).unwrap();
                model.resize(n as usize, 0);
            }
            Op::Read(off, len) => {
                let got = c.read(off, len).unwrap();
                let s = (off as usize).min(model.len());
                let e = (off as usize + len as usize).min(model.len());
                prop_assert_eq!(&got[..], &model[s..e]);
            }
            Op::Reopen => c = reopen(l, &tmp, &dek, id),
        }
        prop_assert_eq!(c.size(), model.len() as u64);
    }
    let c = reopen(l, &tmp, &dek, id);
    let all = c.read(0, model.len() as u32 + 1).unwrap();
    prop_assert!(all == model, "final contents differ");
    prop_assert_eq!(
        tmp.as_file().metadata().unwrap().len(),
        l.backing_len(model.len() as u64)
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn matches_an_in_memory_model(ops in ops(65536)) {
        check_against_model(BlockLayout::DEFAULT, ops)?;
    }

    #[test]
    fn matches_an_in_memory_model_4k(ops in ops(4096)) {
        check_against_model(BlockLayout::new(4096).unwrap(), ops)?;
    }
}

proptest! {
    // Writes of up to 3 MiB each: fewer cases.
    #![proptest_config(ProptestConfig::with_cases(16))]
    #[test]
    fn matches_an_in_memory_model_1m(ops in ops(1 << 20)) {
        check_against_model(BlockLayout::new(1 << 20).unwrap(), ops)?;
    }
}

#[test]
fn cut_at_a_block_boundary_is_detected() {
    for l in layouts() {
        let bs = l.block_size();
        let dek = SecretKey::generate();
        let id = FileId::generate();
        let (tmp, c) = fresh(l, &dek, id);
        c.write(0, &vec![5u8; 3 * bs as usize]).unwrap();
        tmp.as_file().set_len(l.backing_len(2 * bs)).unwrap();
        let c = reopen(l, &tmp, &dek, id);
        assert_eq!(c.size(), 2 * bs);
        assert!(c.read(0, 10).is_ok(), "interior block still reads");
        assert!(matches!(c.read(bs, 10), Err(FsError::Corrupt)));
    }
}

#[test]
fn interrupted_extension_still_reads() {
    for l in layouts() {
        let bs = l.block_size();
        // The state after the new final block is written but before the old one is resealed
        // as non-final: both sealed as final.
        let dek = SecretKey::generate();
        let id = FileId::generate();
        let (tmp, c) = fresh(l, &dek, id);
        c.write(0, &vec![1u8; bs as usize]).unwrap();
        let old_final = c.read(0, bs as u32).unwrap();
        let mut saved = vec![0u8; l.record_len() as usize];
        tmp.as_file()
            .read_exact_at(&mut saved, l.record_offset(0))
            .unwrap();
        c.write(bs, &[2u8; 10]).unwrap();
        tmp.as_file().write_all_at(&saved, l.record_offset(0)).unwrap();
        let c = reopen(l, &tmp, &dek, id);
        assert_eq!(c.read(0, bs as u32).unwrap(), old_final);
        assert_eq!(c.read(bs, 10).unwrap(), vec![2u8; 10]);
    }
}

#[test]
fn holes_read_as_zeros_and_last_block_must_be_sealed() {
    for l in layouts() {
        let bs = l.block_size();
        let dek = SecretKey::generate();
        let id = FileId::generate();
        let (tmp, c) = fresh(l, &dek, id);
        c.truncate(5 * bs + 7).unwrap();
        assert_eq!(c.read(0, 3 * bs as u32).unwrap(), vec![0u8; 3 * bs as usize]);
        // Blocks 0..5 are holes: the backing file is sparse there.
        let mut rec = vec![0u8; 64];
        tmp.as_file().read_exact_at(&mut rec, l.record_offset(1)).unwrap();
        assert!(is_hole(&rec));
        // Zeroing the final record is not a hole: it is damage.
        let fin = l.record_offset(5);
        tmp.as_file()
            .write_all_at(&[0u8; 7 + RECORD_OVERHEAD as usize], fin)
            .unwrap();
        let c = reopen(l, &tmp, &dek, id);
        assert!(matches!(c.read(5 * bs, 7), Err(FsError::Corrupt)));
    }
}

#[test]
fn allocate_grows_but_never_shrinks() {
    for l in layouts() {
        let dek = SecretKey::generate();
        let (tmp, c) = fresh(l, &dek, FileId::generate());
        c.write(0, &[3u8; 200_000]).unwrap();
        c.allocate(10, 100).unwrap();
        assert_eq!(c.size(), 200_000);
        c.allocate(150_000, 200_000).unwrap();
        assert_eq!(c.size(), 350_000);
        let data = c.read(0, 400_000).unwrap();
        assert!(data[..200_000].iter().all(|&b| b == 3) && data[200_000..].iter().all(|&b| b == 0));
        // The allocated range is backed by real blocks, not holes in the backing file.
        let blocks = tmp.as_file().metadata().unwrap().blocks() * 512;
        assert!(
            blocks >= l.backing_len(350_000) - 8192,
            "only {blocks} bytes allocated"
        );
    }
}

#[test]
fn a_torn_tail_is_ignored_and_cut_on_writable_open() {
    for l in layouts() {
        let bs = l.block_size();
        let dek = SecretKey::generate();
        let id = FileId::generate();
        let (tmp, c) = fresh(l, &dek, id);
        c.write(0, &vec![9u8; 2 * bs as usize]).unwrap();
        let good = tmp.as_file().metadata().unwrap().len();
        tmp.as_file().write_all_at(&[0xAA; 20], good).unwrap();
        let ro = ContentFile::new(
            tmp.reopen().unwrap(),
            Arc::new(ContentCipher::new(&dek, id)),
            l,
            false,
        )
        .unwrap();
        assert_eq!(ro.size(), 2 * bs);
        assert_eq!(ro.read(bs, 10).unwrap(), vec![9u8; 10]);
        assert_eq!(
            tmp.as_file().metadata().unwrap().len(),
            good + 20,
            "read-only open changes nothing"
        );
        let rw = reopen(l, &tmp, &dek, id);
        assert_eq!(rw.size(), 2 * bs);
        assert_eq!(tmp.as_file().metadata().unwrap().len(), good);
    }
}

/// Split across the pool's threads or not (a 2-core machine never splits), every record is
/// visited once with its own block index, and an error in one comes back.
#[test]
fn records_are_visited_alike_split_or_not() {
    for split in [false, true] {
        let mut buf: Vec<u8> = vec![0; 10 * 7 + 3];
        for_each_record(&mut buf, 7, 40, split, |b, rec| {
            rec.fill(b as u8);
            Ok(())
        })
        .unwrap();
        let want: Vec<u8> = (0..buf.len()).map(|i| 40 + (i / 7) as u8).collect();
        assert_eq!(buf, want, "split: {split}");
        let failed = for_each_record(&mut buf, 7, 40, split, |b, _| {
            if b == 45 { Err(FsError::Corrupt) } else { Ok(()) }
        });
        assert!(matches!(failed, Err(FsError::Corrupt)), "split: {split}");
    }
}
