//! Content layout: where each sealed block lives, what it is bound to, and how the plaintext
//! size follows from the backing file's size.
//!
//! ```text
//! backing file = header (HEADER_LEN) ‖ record 0 ‖ record 1 ‖ … ‖ record n-1
//! record i     = nonce (12) ‖ AES-256-GCM-SIV(content key, plaintext block i) ‖ tag (16)
//! ```
//! Every record but the last holds exactly one block of plaintext (the volume's block size,
//! [`BlockLayout`]); the last holds 1 byte to a block. A record of all zero bytes that is not
//! the last one is a hole (reads as zeros).

use super::header::HEADER_LEN;
use super::{FILE_ID_LEN, FileId, RECORD_VERSION};
use crate::crypto::{self, Aead, AuthError, NONCE_LEN, SecretKey, TAG_LEN};

/// Plaintext bytes per block of a volume made without `--block-size`, and of every format 1
/// volume. Best for large sequential reads (video): few records per request, little overhead.
pub const DEFAULT_BLOCK_SIZE: u64 = 64 * 1024;
/// The smallest block size a format 2 volume may have (small random I/O, such as SQLite's).
pub const MIN_BLOCK_SIZE: u64 = 4 * 1024;
/// The largest block size a format 2 volume may have.
pub const MAX_BLOCK_SIZE: u64 = 1024 * 1024;
/// Bytes a record adds to its plaintext: nonce and tag.
pub const RECORD_OVERHEAD: u64 = (NONCE_LEN + TAG_LEN) as u64;
/// HKDF info for the per-file content key; salt is the file id.
pub const CONTENT_KEY_INFO: &[u8] = b"kmsfs v1 content key";
/// Length of a block's associated data.
pub const BLOCK_AAD_LEN: usize = 2 + FILE_ID_LEN + 8 + 1;

/// A volume's block size and the arithmetic that follows from it: where records live, how
/// many a file has, and what size a backing length means. Only valid sizes can be held (a
/// power of two from [`MIN_BLOCK_SIZE`] to [`MAX_BLOCK_SIZE`]), so none of the arithmetic
/// divides by zero or by a size no volume may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockLayout {
    block_size: u64,
}

impl Default for BlockLayout {
    fn default() -> Self {
        BlockLayout::DEFAULT
    }
}

impl BlockLayout {
    /// The layout of every format 1 volume, and of a format 2 volume made without
    /// `--block-size`.
    pub const DEFAULT: BlockLayout = BlockLayout {
        block_size: DEFAULT_BLOCK_SIZE,
    };

    /// The layout for `block_size` plaintext bytes per block, if that is a valid size.
    pub const fn new(block_size: u64) -> Option<BlockLayout> {
        if block_size.is_power_of_two() && block_size >= MIN_BLOCK_SIZE && block_size <= MAX_BLOCK_SIZE {
            Some(BlockLayout { block_size })
        } else {
            None
        }
    }

    /// Plaintext bytes per block.
    pub const fn block_size(self) -> u64 {
        self.block_size
    }

    /// Length of a full record on disk.
    pub const fn record_len(self) -> u64 {
        self.block_size + RECORD_OVERHEAD
    }

    /// Byte offset of record `block` in the backing file.
    ///
    /// Saturates at `u64::MAX`, an offset no read or write accepts, for a block no file can
    /// reach (the fs caps files far below): never a wrapped offset back inside the file.
    pub const fn record_offset(self, block: u64) -> u64 {
        HEADER_LEN.saturating_add(block.saturating_mul(self.record_len()))
    }

    /// The block holding plaintext offset `off`.
    pub const fn block_of(self, off: u64) -> u64 {
        off / self.block_size
    }

    /// Plaintext offset where block `block` starts (saturated, like [`Self::record_offset`]).
    pub const fn block_start(self, block: u64) -> u64 {
        block.saturating_mul(self.block_size)
    }

    /// Number of blocks a file of `size` plaintext bytes has.
    pub const fn block_count(self, size: u64) -> u64 {
        size.div_ceil(self.block_size)
    }

    /// Plaintext length of block `block` in a file of `size` bytes (0 if past the end).
    pub const fn block_plain_len(self, size: u64, block: u64) -> u64 {
        // Saturated, a start past u64::MAX is past any size.
        let start = self.block_start(block);
        if size <= start {
            0
        } else if size - start > self.block_size {
            self.block_size
        } else {
            size - start
        }
    }

    /// Backing file length for a file of `size` plaintext bytes; saturates at `u64::MAX` like
    /// [`Self::record_offset`] for sizes whose backing file would be longer.
    pub const fn backing_len(self, size: u64) -> u64 {
        let full = size / self.block_size;
        let rem = size % self.block_size;
        let tail = if rem == 0 { 0 } else { rem + RECORD_OVERHEAD };
        HEADER_LEN
            .saturating_add(full.saturating_mul(self.record_len()))
            .saturating_add(tail)
    }

    /// The file a backing file of `len` bytes holds: its intact size, and any torn tail. The
    /// one rule for mount, stat and fsck alike; only a length shorter than a header is an
    /// error.
    pub const fn extent(self, len: u64) -> Result<Extent, SizeError> {
        match self.plaintext_size(len) {
            Ok(size) => Ok(Extent { size, torn: 0 }),
            Err(SizeError::NoHeader) => Err(SizeError::NoHeader),
            Err(SizeError::TornRecord) => {
                let size = (len - HEADER_LEN) / self.record_len() * self.block_size;
                Ok(Extent {
                    size,
                    torn: len - self.backing_len(size),
                })
            }
        }
    }

    /// Plaintext size of a file whose backing file is `len` bytes long, if that length is
    /// exactly that of a valid file.
    pub const fn plaintext_size(self, len: u64) -> Result<u64, SizeError> {
        if len < HEADER_LEN {
            return Err(SizeError::NoHeader);
        }
        let body = len - HEADER_LEN;
        let full = body / self.record_len();
        let rem = body % self.record_len();
        if rem == 0 {
            Ok(full * self.block_size)
        } else if rem <= RECORD_OVERHEAD {
            Err(SizeError::TornRecord)
        } else {
            Ok(full * self.block_size + rem - RECORD_OVERHEAD)
        }
    }

    /// Whole blocks in `bytes` of plaintext, at least one: how many records to read at once
    /// to read about `bytes`.
    pub const fn blocks_in(self, bytes: u64) -> u64 {
        let n = bytes / self.block_size;
        if n == 0 { 1 } else { n }
    }
}

/// A block size as people write it: "4 KiB", "64 KiB", "1 MiB" (bytes if not whole KiB).
pub fn human_block_size(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes.is_multiple_of(1 << 10) {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} B")
    }
}

/// Parses a block size as `kmsfs init --block-size` takes it: bytes (`4096`), or a number with
/// a K or M suffix, any case, optionally followed by `iB` or `B` (`4K`, `64k`, `1M`, `1MiB`),
/// and checks that it is a size a volume may have. The error is one line naming the range.
pub fn parse_block_size(s: &str) -> Result<BlockLayout, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => Some(0),
        "k" | "kb" | "kib" => Some(10),
        "m" | "mb" | "mib" => Some(20),
        _ => None,
    };
    n.parse::<u64>()
        .ok()
        .zip(shift)
        .and_then(|(n, shift)| n.checked_mul(1 << shift))
        .and_then(BlockLayout::new)
        .ok_or_else(|| {
            format!(
                "block size {s:?} is not one kmsfs supports: give a power of two from {} to {} (4K, 8K, 16K, 32K, 64K, 128K, 256K, 512K or 1M)",
                human_block_size(MIN_BLOCK_SIZE),
                human_block_size(MAX_BLOCK_SIZE)
            )
        })
}

/// Why a backing length cannot be the length of a file.
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
        // One stack scrub for both steps, not one each: this runs for every file made ahead
        // of a create and for every open that builds a cipher.
        let aead = crypto::scrubbed(|| {
            let key = dek.derive(&file_id.0, CONTENT_KEY_INFO);
            Aead::new(&key)
        });
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

    /// Seals block `block` from `plain` into `record` (`nonce ‖ ciphertext ‖ tag`, sized for
    /// it): the plaintext is read once, with no copy into the record first.
    pub fn seal_from(&self, block: u64, is_final: bool, plain: &[u8], record: &mut [u8]) {
        let aad = block_aad(&self.file_id, block, is_final);
        self.aead.seal_record_from(&aad, plain, record);
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

    const K4: BlockLayout = BlockLayout { block_size: 4096 };
    const K64: BlockLayout = BlockLayout::DEFAULT;
    const M1: BlockLayout = BlockLayout { block_size: 1 << 20 };
    /// The smallest, the default and the largest block size: every test runs on each.
    const LAYOUTS: [BlockLayout; 3] = [K4, K64, M1];

    #[test]
    fn only_powers_of_two_from_4_kib_to_1_mib_are_layouts() {
        for bs in [4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1 << 20] {
            assert_eq!(BlockLayout::new(bs).map(BlockLayout::block_size), Some(bs));
        }
        for bs in [
            0,
            1,
            2048,
            3000,
            4095,
            4097,
            65535,
            65537,
            100_000,
            2 << 20,
            1 << 40,
            u64::MAX,
        ] {
            assert_eq!(BlockLayout::new(bs), None, "{bs}");
        }
        assert_eq!(BlockLayout::new(DEFAULT_BLOCK_SIZE), Some(BlockLayout::default()));
    }

    #[test]
    fn block_sizes_parse_as_people_write_them() {
        for (text, bs) in [
            ("4K", 4096),
            ("4k", 4096),
            ("4096", 4096),
            ("8KiB", 8192),
            ("64K", 65536),
            ("64kb", 65536),
            (" 256K ", 262144),
            ("1M", 1 << 20),
            ("1m", 1 << 20),
            ("1MiB", 1 << 20),
            ("1024K", 1 << 20),
        ] {
            assert_eq!(
                parse_block_size(text).map(BlockLayout::block_size),
                Ok(bs),
                "{text}"
            );
        }
        for bad in [
            "",
            "K",
            "3000",
            "2K",
            "2M",
            "4G",
            "4 K",
            "-4K",
            "4.5K",
            "64KB2",
            "99999999999999999999K",
        ] {
            let e = parse_block_size(bad).unwrap_err();
            assert!(
                e.contains("from 4 KiB to 1 MiB") && !e.contains('\n'),
                "{bad}: {e}"
            );
        }
        assert_eq!(human_block_size(4096), "4 KiB");
        assert_eq!(human_block_size(1 << 20), "1 MiB");
        assert_eq!(human_block_size(3000), "3000 B");
    }

    #[test]
    fn size_math_round_trips() {
        for l in LAYOUTS {
            let bs = l.block_size();
            for size in [
                0,
                1,
                bs - 1,
                bs,
                bs + 1,
                2 * bs - 1,
                2 * bs,
                2 * bs + 1,
                65535,
                65536,
                65537,
                10 * 1024 * 1024 + 3,
                u32::MAX as u64,
            ] {
                assert_eq!(
                    l.plaintext_size(l.backing_len(size)),
                    Ok(size),
                    "{bs}: size {size}"
                );
                assert_eq!(l.block_count(size), size.div_ceil(bs));
                assert_eq!(l.extent(l.backing_len(size)), Ok(Extent { size, torn: 0 }));
            }
            assert_eq!(l.record_len(), bs + 28);
            assert_eq!(l.backing_len(0), HEADER_LEN);
            assert_eq!(l.backing_len(bs), HEADER_LEN + l.record_len());
            assert_eq!(
                l.backing_len(bs + 1),
                HEADER_LEN + l.record_len() + 1 + RECORD_OVERHEAD
            );
            assert_eq!(l.backing_len(1), HEADER_LEN + 1 + RECORD_OVERHEAD);
        }
        assert_eq!(K4.backing_len(3 * 4096 + 5), HEADER_LEN + 3 * 4124 + 33);
        assert_eq!(M1.backing_len(3 << 20), HEADER_LEN + 3 * 1_048_604);
    }

    #[test]
    fn impossible_lengths_are_errors() {
        for l in LAYOUTS {
            assert_eq!(l.plaintext_size(0), Err(SizeError::NoHeader));
            assert_eq!(l.plaintext_size(HEADER_LEN - 1), Err(SizeError::NoHeader));
            assert_eq!(l.extent(HEADER_LEN - 1), Err(SizeError::NoHeader));
            for whole in [0, 1, 7] {
                let base = HEADER_LEN + whole * l.record_len();
                for tail in 1..=RECORD_OVERHEAD {
                    assert_eq!(l.plaintext_size(base + tail), Err(SizeError::TornRecord));
                }
                // One byte more is a one-byte last block; none less is whole records.
                assert_eq!(
                    l.plaintext_size(base + RECORD_OVERHEAD + 1),
                    Ok(whole * l.block_size() + 1)
                );
                assert_eq!(l.plaintext_size(base), Ok(whole * l.block_size()));
            }
        }
        // A length valid in one layout is not one in another: what a wrong block size reads.
        let len = K64.backing_len(65536);
        assert_eq!(K4.plaintext_size(len), Ok(15 * 4096 + (65564 - 15 * 4124) - 28));
        assert_eq!(M1.plaintext_size(len), Ok(65536));
        assert_eq!(
            K4.plaintext_size(HEADER_LEN + 16 * 4124 + 28),
            Err(SizeError::TornRecord)
        );
    }

    #[test]
    fn block_lengths() {
        for l in LAYOUTS {
            let bs = l.block_size();
            assert_eq!(l.block_plain_len(bs + 1, 0), bs);
            assert_eq!(l.block_plain_len(bs + 1, 1), 1);
            assert_eq!(l.block_plain_len(bs + 1, 2), 0);
            assert_eq!(l.block_plain_len(bs, 0), bs);
            assert_eq!(l.block_plain_len(bs, 1), 0);
            assert_eq!(l.block_plain_len(0, 0), 0);
            assert_eq!(l.record_offset(2), HEADER_LEN + 2 * l.record_len());
            assert_eq!(
                (l.block_of(bs - 1), l.block_of(bs), l.block_of(bs + 1)),
                (0, 1, 1)
            );
            assert_eq!(l.block_start(3), 3 * bs);
            assert_eq!(l.blocks_in(1 << 20), (1 << 20) / bs);
            assert_eq!(l.blocks_in(1), 1);
        }
        assert_eq!(K4.block_of(65536), 16);
        assert_eq!(M1.block_of(65536), 0);
        assert_eq!(K4.blocks_in(1 << 20), 256);
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
        for l in LAYOUTS {
            let bs = l.block_size();
            assert_eq!(l.record_offset(u64::MAX), u64::MAX);
            assert_eq!(l.record_offset(u64::MAX / l.record_len() + 1), u64::MAX);
            assert_eq!(l.block_start(u64::MAX), u64::MAX);
            assert_eq!(l.block_plain_len(u64::MAX, u64::MAX), 0);
            assert_eq!(l.block_plain_len(u64::MAX, u64::MAX / bs), u64::MAX % bs);
            assert_eq!(l.backing_len(u64::MAX), u64::MAX);
            // The longest backing length that is a valid file, and the size it holds.
            let longest = (u64::MAX - RECORD_OVERHEAD - 1..=u64::MAX)
                .rev()
                .find(|&len| l.plaintext_size(len).is_ok())
                .unwrap();
            let largest = l.plaintext_size(longest).unwrap();
            assert_eq!(l.backing_len(largest), longest);
            // One byte more needs a backing file longer than any: saturated.
            assert_eq!(l.backing_len(largest + 1), u64::MAX);
        }
    }

    #[test]
    fn extent_keeps_the_intact_records_of_a_torn_tail() {
        for l in LAYOUTS {
            assert_eq!(l.extent(l.backing_len(5)), Ok(Extent { size: 5, torn: 0 }));
            let torn = HEADER_LEN + 3 * l.record_len() + RECORD_OVERHEAD;
            assert_eq!(
                l.extent(torn),
                Ok(Extent {
                    size: 3 * l.block_size(),
                    torn: RECORD_OVERHEAD
                })
            );
            assert_eq!(l.extent(HEADER_LEN + 1), Ok(Extent { size: 0, torn: 1 }));
        }
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
