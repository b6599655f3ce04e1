//! Content layout: where each sealed 64 KiB block lives, what it is bound to, and how the
//! plaintext size follows from the backing file's size.
//!
//! ```text
//! backing file = header (HEADER_LEN) ‖ record 0 ‖ record 1 ‖ … ‖ record n-1
//! record i     = nonce (12) ‖ AES-256-GCM-SIV(content key, plaintext block i) ‖ tag (16)
//! ```
//! Every record but the last holds exactly [`BLOCK_SIZE`] plaintext bytes; the last holds 1 to
//! `BLOCK_SIZE`. A record of all zero bytes that is not the last one is a hole (reads as zeros).

use super::header::HEADER_LEN;
use super::{FILE_ID_LEN, FileId, RECORD_VERSION};
use crate::crypto::{Aead, AuthError, NONCE_LEN, SecretKey, TAG_LEN};

/// Plaintext bytes per block.
pub const BLOCK_SIZE: u64 = 64 * 1024;
/// Bytes a record adds to its plaintext: nonce and tag.
pub const RECORD_OVERHEAD: u64 = (NONCE_LEN + TAG_LEN) as u64;
/// Length of a full record on disk.
pub const RECORD_LEN: u64 = BLOCK_SIZE + RECORD_OVERHEAD;
/// HKDF info for the per-file content key; salt is the file id.
pub const CONTENT_KEY_INFO: &[u8] = b"kmsfs v1 content key";
/// Length of a block's associated data.
pub const BLOCK_AAD_LEN: usize = 2 + FILE_ID_LEN + 8 + 1;

/// Byte offset of record `block` in the backing file.
///
/// Saturates at `u64::MAX`, an offset no read or write accepts, for a block no file can reach
/// (the fs caps files far below): never a wrapped offset back inside the file.
pub const fn record_offset(block: u64) -> u64 {
    HEADER_LEN.saturating_add(block.saturating_mul(RECORD_LEN))
}

/// The block holding plaintext offset `off`.
pub const fn block_of(off: u64) -> u64 {
    off / BLOCK_SIZE
}

/// Number of blocks a file of `size` plaintext bytes has.
pub const fn block_count(size: u64) -> u64 {
    size.div_ceil(BLOCK_SIZE)
}

/// Plaintext length of block `block` in a file of `size` bytes (0 if past the end).
pub const fn block_plain_len(size: u64, block: u64) -> u64 {
    // Saturated, a start past u64::MAX is past any size.
    let start = block.saturating_mul(BLOCK_SIZE);
    if size <= start {
        0
    } else if size - start > BLOCK_SIZE {
        BLOCK_SIZE
    } else {
        size - start
    }
}

/// Backing file length for a file of `size` plaintext bytes; saturates at `u64::MAX` like
/// [`record_offset`] for sizes whose backing file would be longer.
pub const fn backing_len(size: u64) -> u64 {
    let full = size / BLOCK_SIZE;
    let rem = size % BLOCK_SIZE;
    let tail = if rem == 0 { 0 } else { rem + RECORD_OVERHEAD };
    HEADER_LEN
        .saturating_add(full.saturating_mul(RECORD_LEN))
        .saturating_add(tail)
}

/// Why a backing length cannot be the length of a v1 file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeError {
    /// Shorter than a header.
    NoHeader,
    /// The last record is too short to hold a nonce, a tag and at least one byte.
    TornRecord,
}

/// What a backing file's length says about its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Plaintext size of the records that can be whole: the file as it reads.
    pub size: u64,
    /// Bytes after the last whole record too few to be a record (an append torn by a crash):
    /// not part of the file; a writer cuts them off.
    pub torn: u64,
}

/// The file a backing file of `len` bytes holds: its intact size, and any torn tail. The one
/// rule for mount, stat and fsck alike; only a length shorter than a header is an error.
pub const fn extent(len: u64) -> Result<Extent, SizeError> {
    match plaintext_size(len) {
        Ok(size) => Ok(Extent { size, torn: 0 }),
        Err(SizeError::NoHeader) => Err(SizeError::NoHeader),
        Err(SizeError::TornRecord) => {
            let size = (len - HEADER_LEN) / RECORD_LEN * BLOCK_SIZE;
            Ok(Extent {
                size,
                torn: len - backing_len(size),
            })
        }
    }
}

/// Plaintext size of a file whose backing file is `len` bytes long, if that length is exactly
/// that of a valid file.
pub const fn plaintext_size(len: u64) -> Result<u64, SizeError> {
    if len < HEADER_LEN {
        return Err(SizeError::NoHeader);
    }
    let body = len - HEADER_LEN;
    let full = body / RECORD_LEN;
    let rem = body % RECORD_LEN;
    if rem == 0 {
        Ok(full * BLOCK_SIZE)
    } else if rem <= RECORD_OVERHEAD {
        Err(SizeError::TornRecord)
    } else {
        Ok(full * BLOCK_SIZE + rem - RECORD_OVERHEAD)
    }
}

/// Associated data of a block: format version ‖ file id ‖ block index ‖ final-block flag.
///
/// The file id stops records moving between files, the index stops them moving within one,
/// and the final flag makes a file cut at a record boundary fail to authenticate (its new last
/// record was sealed as "not final").
pub fn block_aad(file_id: &FileId, block: u64, is_final: bool) -> [u8; BLOCK_AAD_LEN] {
    let mut aad = [0u8; BLOCK_AAD_LEN];
    aad[..2].copy_from_slice(&RECORD_VERSION.to_be_bytes());
    aad[2..2 + FILE_ID_LEN].copy_from_slice(&file_id.0);
    aad[2 + FILE_ID_LEN..2 + FILE_ID_LEN + 8].copy_from_slice(&block.to_be_bytes());
    aad[BLOCK_AAD_LEN - 1] = is_final as u8;
    aad
}

/// True when a record region is all zero bytes: a hole left by a sparse write or truncate.
pub fn is_hole(record: &[u8]) -> bool {
    record.iter().all(|&b| b == 0)
}

/// How a record that opened reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    /// Sealed data; the plaintext is in the record's body.
    Data,
    /// A hole: a middle record of all zero bytes (a sparse write or truncate); reads as zeros,
    /// which the body already is.
    Hole,
}

/// Why a record does not open: each is a different story for fsck's report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockError {
    /// A middle block fails authentication.
    Auth,
    /// The last block fails authentication.
    FinalAuth,
    /// The last block opens only as a middle block: the file was cut at a block boundary.
    Cut,
    /// The last block is all zeros (only a middle block can be a hole).
    FinalZero,
}

impl BlockError {
    /// One phrase for logs and reports.
    pub fn message(self) -> &'static str {
        match self {
            BlockError::Auth => "fails authentication (altered, torn, or moved from another place)",
            BlockError::FinalAuth => "the last block fails authentication (altered or torn)",
            BlockError::Cut => "the last block was sealed as a middle block: the file was cut short",
            BlockError::FinalZero => "the last block is all zeros (only a middle block can be a hole)",
        }
    }
}

/// The cipher for one file's content, derived from its DEK and bound to its id.
pub struct ContentCipher {
    file_id: FileId,
    aead: Aead,
}

impl ContentCipher {
    /// Derives the file's content key (HKDF, salted with the file id) and keeps only its
    /// cipher. The derived key sits in its heap `SecretKey` only while the key schedule is
    /// built, and is wiped when this returns; the DEK is the caller's to drop.
    pub fn new(dek: &SecretKey, file_id: FileId) -> Self {
        let key = dek.derive(&file_id.0, CONTENT_KEY_INFO);
        let aead = Aead::new(&key);
        drop(key);
        ContentCipher { file_id, aead }
    }

    pub fn file_id(&self) -> &FileId {
        &self.file_id
    }

    /// Seals block `block` in place: `record` is `nonce ‖ plaintext ‖ tag` with the plaintext
    /// already in the middle.
    pub fn seal(&self, block: u64, is_final: bool, record: &mut [u8]) {
        let aad = block_aad(&self.file_id, block, is_final);
        self.aead.seal_record(&aad, record);
    }

    /// Opens block `block` in place; the plaintext is then `record[NONCE_LEN..len - TAG_LEN]`.
    /// On failure the record is left as it was.
    pub fn open(&self, block: u64, is_final: bool, record: &mut [u8]) -> Result<(), AuthError> {
        let aad = block_aad(&self.file_id, block, is_final);
        self.aead.open_record(&aad, record)
    }

    /// Opens record `block` of a file by the format's rules, in place; `is_final` says
    /// whether it is the file's last record. The one place these rules live:
    ///
    /// - a middle record of all zero bytes is a hole;
    /// - a middle record sealed as final is accepted: it is the old final block of an
    ///   extension interrupted before its last step (this gives an attacker nothing that
    ///   replaying an old record would not);
    /// - the last record must be sealed as final: that is what exposes a file cut at a
    ///   block boundary.
    ///
    /// Every retry works on the same bytes: a failed open leaves the record unchanged (the
    /// cipher re-encrypts on failure; pinned by a test in `crypto`), so nothing is read twice.
    pub fn open_block(&self, block: u64, is_final: bool, record: &mut [u8]) -> Result<Block, BlockError> {
        if !is_final && looks_like_hole(record) {
            return Ok(Block::Hole);
        }
        if self.open(block, is_final, record).is_ok() {
            return Ok(Block::Data);
        }
        if !is_final {
            return match self.open(block, true, record) {
                Ok(()) => Ok(Block::Data),
                Err(_) => Err(BlockError::Auth),
            };
        }
        if is_hole(record) {
            Err(BlockError::FinalZero)
        } else if self.open(block, false, record).is_ok() {
            // Opened, but it is not data the file may show: put nothing in its place.
            let body = record_body(record.len());
            record[body].fill(0);
            Err(BlockError::Cut)
        } else {
            Err(BlockError::FinalAuth)
        }
    }
}

/// Cheap test first (nonce and tag both zero, which a sealed record has with probability
/// 2^-224), then the full scan.
fn looks_like_hole(record: &[u8]) -> bool {
    let tag_start = record.len().saturating_sub(TAG_LEN);
    is_hole(&record[..NONCE_LEN.min(record.len())]) && is_hole(&record[tag_start..]) && is_hole(record)
}

/// Where a record's plaintext sits inside it.
pub const fn record_body(record_len: usize) -> std::ops::Range<usize> {
    NONCE_LEN..record_len - TAG_LEN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_math_round_trips() {
        for size in [
            0,
            1,
            65535,
            65536,
            65537,
            2 * 65536,
            10 * 1024 * 1024 + 3,
            u32::MAX as u64,
        ] {
            assert_eq!(plaintext_size(backing_len(size)), Ok(size), "size {size}");
            assert_eq!(block_count(size), size.div_ceil(BLOCK_SIZE));
        }
        assert_eq!(backing_len(0), HEADER_LEN);
        assert_eq!(backing_len(65536), HEADER_LEN + RECORD_LEN);
        assert_eq!(backing_len(1), HEADER_LEN + 1 + RECORD_OVERHEAD);
    }

    #[test]
    fn impossible_lengths_are_errors() {
        assert_eq!(plaintext_size(0), Err(SizeError::NoHeader));
        assert_eq!(plaintext_size(HEADER_LEN - 1), Err(SizeError::NoHeader));
        for tail in 1..=RECORD_OVERHEAD {
            assert_eq!(
                plaintext_size(HEADER_LEN + RECORD_LEN + tail),
                Err(SizeError::TornRecord)
            );
        }
    }

    #[test]
    fn block_lengths() {
        assert_eq!(block_plain_len(65537, 0), 65536);
        assert_eq!(block_plain_len(65537, 1), 1);
        assert_eq!(block_plain_len(65537, 2), 0);
        assert_eq!(block_plain_len(65536, 0), 65536);
        assert_eq!(record_offset(2), HEADER_LEN + 2 * RECORD_LEN);
    }

    #[test]
    fn records_are_bound_to_file_index_and_finality() {
        let dek = SecretKey::generate();
        let id = FileId::generate();
        let c = ContentCipher::new(&dek, id);
        let mut rec = vec![0u8; 100 + RECORD_OVERHEAD as usize];
        let body = record_body(rec.len());
        rec[body].fill(7);
        c.seal(3, false, &mut rec);
        let sealed = rec.clone();
        assert!(c.open(3, false, &mut rec).is_ok());
        assert!(rec[record_body(rec.len())].iter().all(|&b| b == 7));
        assert!(c.open(4, false, &mut sealed.clone()).is_err());
        assert!(c.open(3, true, &mut sealed.clone()).is_err());
        let other = ContentCipher::new(&dek, FileId::generate());
        assert!(other.open(3, false, &mut sealed.clone()).is_err());
    }

    /// Found by the `block` fuzz target: these overflowed (a panic in debug builds, a wrapped
    /// offset inside the file in release builds) for block indexes and sizes near `u64::MAX`.
    #[test]
    fn arithmetic_saturates_instead_of_wrapping() {
        assert_eq!(record_offset(u64::MAX), u64::MAX);
        assert_eq!(record_offset(u64::MAX / RECORD_LEN + 1), u64::MAX);
        assert_eq!(block_plain_len(u64::MAX, u64::MAX), 0);
        assert_eq!(
            block_plain_len(u64::MAX, u64::MAX / BLOCK_SIZE),
            u64::MAX % BLOCK_SIZE
        );
        assert_eq!(backing_len(u64::MAX), u64::MAX);
        let largest = plaintext_size(u64::MAX).unwrap();
        assert_eq!(backing_len(largest), u64::MAX);
        assert_eq!(backing_len(largest - 1), u64::MAX - 1);
    }

    #[test]
    fn extent_keeps_the_intact_records_of_a_torn_tail() {
        assert_eq!(extent(backing_len(5)), Ok(Extent { size: 5, torn: 0 }));
        assert_eq!(extent(HEADER_LEN - 1), Err(SizeError::NoHeader));
        let torn = HEADER_LEN + RECORD_LEN + RECORD_OVERHEAD;
        assert_eq!(
            extent(torn),
            Ok(Extent {
                size: BLOCK_SIZE,
                torn: RECORD_OVERHEAD
            })
        );
    }

    /// The record rules, one case each: what reads, and why what does not read fails.
    #[test]
    fn open_block_rules() {
        let c = ContentCipher::new(&SecretKey::generate(), FileId::generate());
        let sealed = |b: u64, is_final: bool| {
            let mut rec = vec![0u8; 10 + RECORD_OVERHEAD as usize];
            let body = record_body(rec.len());
            rec[body].fill(7);
            c.seal(b, is_final, &mut rec);
            rec
        };
        let zeros = vec![0u8; 10 + RECORD_OVERHEAD as usize];
        assert_eq!(c.open_block(1, false, &mut sealed(1, false)), Ok(Block::Data));
        assert_eq!(c.open_block(1, true, &mut sealed(1, true)), Ok(Block::Data));
        assert_eq!(c.open_block(1, false, &mut zeros.clone()), Ok(Block::Hole));
        // An interrupted extension: a middle block still sealed as final reads.
        let mut rec = sealed(1, true);
        assert_eq!(c.open_block(1, false, &mut rec), Ok(Block::Data));
        assert!(rec[record_body(rec.len())].iter().all(|&b| b == 7));
        assert_eq!(
            c.open_block(1, true, &mut zeros.clone()),
            Err(BlockError::FinalZero)
        );
        let mut cut = sealed(1, false);
        assert_eq!(c.open_block(1, true, &mut cut), Err(BlockError::Cut));
        assert!(
            cut[record_body(cut.len())].iter().all(|&b| b == 0),
            "no plaintext left"
        );
        assert_eq!(
            c.open_block(2, true, &mut sealed(1, true)),
            Err(BlockError::FinalAuth)
        );
        assert_eq!(
            c.open_block(2, false, &mut sealed(1, false)),
            Err(BlockError::Auth)
        );
        let mut flipped = sealed(1, false);
        flipped[NONCE_LEN] ^= 1;
        assert_eq!(c.open_block(1, false, &mut flipped), Err(BlockError::Auth));
    }

    #[test]
    fn holes() {
        assert!(is_hole(&[0u8; 64]));
        assert!(!is_hole(&[0, 0, 1]));
    }
}
