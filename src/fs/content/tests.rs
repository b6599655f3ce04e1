//! Unit tests of `fs::content`, kept apart so the module reads as what it does.
use super::*;
use crate::crypto::SecretKey;
use crate::format::FileId;
use crate::format::block::is_hole;
use proptest::prelude::*;
use std::os::unix::fs::MetadataExt;

/// A content file on a temp file with a zeroed header area (content does not read it).
fn fresh(dek: &SecretKey, id: FileId) -> (tempfile::NamedTempFile, ContentFile) {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    tmp.as_file().set_len(HEADER_LEN).unwrap();
    let c = reopen(&tmp, dek, id);
    (tmp, c)
}

fn reopen(tmp: &tempfile::NamedTempFile, dek: &SecretKey, id: FileId) -> ContentFile {
    let f = tmp.reopen().unwrap();
    ContentFile::new(f, Arc::new(ContentCipher::new(dek, id)), true).unwrap()
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, usize, u8),
    Truncate(u64),
    Read(u64, u32),
    Reopen,
}

/// Offsets cluster around block boundaries, where the bugs live.
fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..4 * BLOCK_SIZE,
        (0u64..5, -3i64..4).prop_map(|(b, d)| (b * BLOCK_SIZE).saturating_add_signed(d)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (offset(), prop_oneof![1usize..100, 1usize..3 * BLOCK_SIZE as usize], any::<u8>())
            .prop_map(|(o, l, s)| Op::Write(o, l, s)),
        1 => offset().prop_map(Op::Truncate),
        2 => (offset(), 1u32..3 * BLOCK_SIZE as u32).prop_map(|(o, l)| Op::Read(o, l)),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn matches_an_in_memory_model(ops in proptest::collection::vec(op(), 1..24)) {
        let dek = SecretKey::generate();
        let id = FileId::generate();
        let (tmp, mut c) = fresh(&dek, id);
        let mut model: Vec<u8> = Vec::new();
        for op in ops {
            match op {
                Op::Write(off, len, seed) => {
                    let data: Vec<u8> = (0..len).map(|i| seed.wrapping_add(i as u8) | 1).collect();
                    c.write(off, &data).unwrap();
                    let end = off as usize + len;
                    if model.len() < end { model.resize(end, 0); }
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
                Op::Reopen => c = reopen(&tmp, &dek, id),
            }
            prop_assert_eq!(c.size(), model.len() as u64);
        }
        let c = reopen(&tmp, &dek, id);
        let all = c.read(0, model.len() as u32 + 1).unwrap();
        prop_assert!(all == model, "final contents differ");
        prop_assert_eq!(tmp.as_file().metadata().unwrap().len(), backing_len(model.len() as u64));
    }
}

#[test]
fn cut_at_a_block_boundary_is_detected() {
    let dek = SecretKey::generate();
    let id = FileId::generate();
    let (tmp, c) = fresh(&dek, id);
    c.write(0, &vec![5u8; 3 * BLOCK_SIZE as usize]).unwrap();
    tmp.as_file().set_len(backing_len(2 * BLOCK_SIZE)).unwrap();
    let c = reopen(&tmp, &dek, id);
    assert_eq!(c.size(), 2 * BLOCK_SIZE);
    assert!(c.read(0, 10).is_ok(), "interior block still reads");
    assert!(matches!(c.read(BLOCK_SIZE, 10), Err(FsError::Corrupt)));
}

#[test]
fn interrupted_extension_still_reads() {
    // The state after the new final block is written but before the old one is resealed
    // as non-final: both sealed as final.
    let dek = SecretKey::generate();
    let id = FileId::generate();
    let (tmp, c) = fresh(&dek, id);
    c.write(0, &vec![1u8; BLOCK_SIZE as usize]).unwrap();
    let old_final = c.read(0, BLOCK_SIZE as u32).unwrap();
    let mut saved = vec![0u8; RECORD_LEN_USIZE];
    tmp.as_file().read_exact_at(&mut saved, record_offset(0)).unwrap();
    c.write(BLOCK_SIZE, &[2u8; 10]).unwrap();
    tmp.as_file().write_all_at(&saved, record_offset(0)).unwrap();
    let c = reopen(&tmp, &dek, id);
    assert_eq!(c.read(0, BLOCK_SIZE as u32).unwrap(), old_final);
    assert_eq!(c.read(BLOCK_SIZE, 10).unwrap(), vec![2u8; 10]);
}

#[test]
fn holes_read_as_zeros_and_last_block_must_be_sealed() {
    let dek = SecretKey::generate();
    let id = FileId::generate();
    let (tmp, c) = fresh(&dek, id);
    c.truncate(5 * BLOCK_SIZE + 7).unwrap();
    assert_eq!(
        c.read(0, 3 * BLOCK_SIZE as u32).unwrap(),
        vec![0u8; 3 * BLOCK_SIZE as usize]
    );
    // Blocks 0..5 are holes: the backing file is sparse there.
    let mut rec = vec![0u8; 64];
    tmp.as_file().read_exact_at(&mut rec, record_offset(1)).unwrap();
    assert!(is_hole(&rec));
    // Zeroing the final record is not a hole: it is damage.
    let fin = record_offset(5);
    tmp.as_file()
        .write_all_at(&[0u8; 7 + RECORD_OVERHEAD as usize], fin)
        .unwrap();
    let c = reopen(&tmp, &dek, id);
    assert!(matches!(c.read(5 * BLOCK_SIZE, 7), Err(FsError::Corrupt)));
}

#[test]
fn allocate_grows_but_never_shrinks() {
    let dek = SecretKey::generate();
    let (tmp, c) = fresh(&dek, FileId::generate());
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
        blocks >= backing_len(350_000) - 8192,
        "only {blocks} bytes allocated"
    );
}

#[test]
fn a_torn_tail_is_ignored_and_cut_on_writable_open() {
    let dek = SecretKey::generate();
    let id = FileId::generate();
    let (tmp, c) = fresh(&dek, id);
    c.write(0, &[9u8; 2 * BLOCK_SIZE as usize]).unwrap();
    let good = tmp.as_file().metadata().unwrap().len();
    tmp.as_file().write_all_at(&[0xAA; 20], good).unwrap();
    let ro = ContentFile::new(
        tmp.reopen().unwrap(),
        Arc::new(ContentCipher::new(&dek, id)),
        false,
    )
    .unwrap();
    assert_eq!(ro.size(), 2 * BLOCK_SIZE);
    assert_eq!(ro.read(BLOCK_SIZE, 10).unwrap(), vec![9u8; 10]);
    assert_eq!(
        tmp.as_file().metadata().unwrap().len(),
        good + 20,
        "read-only open changes nothing"
    );
    let rw = reopen(&tmp, &dek, id);
    assert_eq!(rw.size(), 2 * BLOCK_SIZE);
    assert_eq!(tmp.as_file().metadata().unwrap().len(), good);
}

const RECORD_LEN_USIZE: usize = (BLOCK_SIZE + RECORD_OVERHEAD) as usize;
