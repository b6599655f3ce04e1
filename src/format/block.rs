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
use super::{FILE_ID_LEN, FORMAT_VERSION, FileId};
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

/// Plaintext size of a file whose backing file is `len` bytes long.
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
    aad[..2].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
    aad[2..2 + FILE_ID_LEN].copy_from_slice(&file_id.0);
    aad[2 + FILE_ID_LEN..2 + FILE_ID_LEN + 8].copy_from_slice(&block.to_be_bytes());
    aad[BLOCK_AAD_LEN - 1] = is_final as u8;
    aad
}

/// True when a record region is all zero bytes: a hole left by a sparse write or truncate.
pub fn is_hole(record: &[u8]) -> bool {
    record.iter().all(|&b| b == 0)
}

/// The cipher for one file's content, derived from its DEK and bound to its id.
pub struct ContentCipher {
    file_id: FileId,
    aead: Aead,
}

impl ContentCipher {
    pub fn new(dek: &SecretKey, file_id: FileId) -> Self {
        let key = dek.derive(&file_id.0, CONTENT_KEY_INFO);
        ContentCipher {
            file_id,
            aead: Aead::new(&key),
        }
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
    pub fn open(&self, block: u64, is_final: bool, record: &mut [u8]) -> Result<(), AuthError> {
        let aad = block_aad(&self.file_id, block, is_final);
        self.aead.open_record(&aad, record)
    }
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
    fn holes() {
        assert!(is_hole(&[0u8; 64]));
        assert!(!is_hole(&[0, 0, 1]));
    }
}
