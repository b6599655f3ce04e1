//! The per-file header: a fixed part written once at creation, then two key slots.
//!
//! ```text
//! 0     8  magic "kmsfsHDR"
//! 8     2  format version (u16 LE) = 1
//! 10    2  reserved, zero
//! 12   16  file id
//! 28    4  reserved, zero
//! 32 2032  slot A
//! 2064 2032 slot B                                   total HEADER_LEN = 4096
//!
//! slot: 0 8 sequence (u64 LE, 0 = never written) · 8 2 key-ref length · 10 2 wrapped length
//!       12 … key ref ‖ wrapped DEK ‖ zero padding · last 32: SHA-256(fixed part ‖ slot[..2000])
//! ```
//! A re-wrap writes the *other* slot with the next sequence number: a torn or lost write leaves
//! that slot failing its checksum and the previous slot still valid, so the DEK is never lost.

use super::{FILE_ID_LEN, FileId, RECORD_VERSION};
use sha2::{Digest, Sha256};

/// Header magic: identifies a kmsfs content file.
pub const MAGIC: [u8; 8] = *b"kmsfsHDR";
/// Length of the whole header; content records start here, at a 4 KiB boundary.
pub const HEADER_LEN: u64 = 4096;
/// Length of the fixed part (magic, version, file id, reserved).
pub const FIXED_LEN: usize = 32;
/// Length of one key slot.
pub const SLOT_LEN: usize = (HEADER_LEN as usize - FIXED_LEN) / 2;
/// Length of a slot's checksum (SHA-256).
pub const SLOT_CHECKSUM_LEN: usize = 32;
/// Bytes before a slot's variable part: sequence, key-ref length, wrapped length.
pub const SLOT_PREFIX_LEN: usize = 12;
/// Longest KMS key reference a slot accepts.
pub const MAX_KEY_REF_LEN: usize = 256;
/// Longest wrapped DEK a slot accepts (a Vault/OpenBao ciphertext string is about 90 bytes).
pub const MAX_WRAPPED_LEN: usize = 1024;

const _: () = assert!(SLOT_PREFIX_LEN + MAX_KEY_REF_LEN + MAX_WRAPPED_LEN <= SLOT_LEN - SLOT_CHECKSUM_LEN);

/// Byte offset of slot `index` (0 or 1) in the header.
pub const fn slot_offset(index: usize) -> u64 {
    (FIXED_LEN + index * SLOT_LEN) as u64
}

/// The contents of one key slot: which KMS key wrapped the DEK, and the wrapped DEK.
#[derive(Clone, PartialEq, Eq)]
pub struct KeySlot {
    pub sequence: u64,
    pub key_ref: String,
    pub wrapped: Vec<u8>,
}

impl std::fmt::Debug for KeySlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "KeySlot(seq {}, key {:?}, {} wrapped bytes)",
            self.sequence,
            self.key_ref,
            self.wrapped.len()
        )
    }
}

/// A parsed header: the file id and the newest valid slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub file_id: FileId,
    pub slot: KeySlot,
    /// Which slot (0 or 1) `slot` came from; a rewrite goes to the other one.
    pub slot_index: usize,
}

/// What is wrong with a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// Fewer than [`HEADER_LEN`] bytes.
    Short(usize),
    /// Not a kmsfs file (wrong magic).
    BadMagic,
    /// Written by a format version this build does not read.
    UnsupportedVersion(u16),
    /// Reserved bytes are not zero.
    Reserved,
    /// Neither slot holds a valid key (both empty, torn, or failing their checksum).
    NoValidSlot,
    /// A field is too long for its slot.
    TooLong(&'static str),
    /// The slot's sequence number is `u64::MAX`: there is no next one to re-wrap with.
    SequenceExhausted,
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::Short(n) => write!(f, "header truncated ({n} of {HEADER_LEN} bytes)"),
            HeaderError::BadMagic => f.write_str("not a kmsfs file (bad header magic)"),
            HeaderError::UnsupportedVersion(v) => {
                write!(f, "header format version {v} is not supported by this kmsfs")
            }
            HeaderError::Reserved => f.write_str("header reserved bytes are not zero"),
            HeaderError::NoValidSlot => f.write_str("no intact key slot in header"),
            HeaderError::TooLong(what) => write!(f, "{what} too long for a header slot"),
            HeaderError::SequenceExhausted => f.write_str("key slot sequence number at its maximum"),
        }
    }
}

fn fixed_part(file_id: &FileId) -> [u8; FIXED_LEN] {
    let mut b = [0u8; FIXED_LEN];
    b[..8].copy_from_slice(&MAGIC);
    b[8..10].copy_from_slice(&RECORD_VERSION.to_le_bytes());
    b[12..12 + FILE_ID_LEN].copy_from_slice(&file_id.0);
    b
}

fn slot_checksum(fixed: &[u8], slot_body: &[u8]) -> [u8; SLOT_CHECKSUM_LEN] {
    let mut h = Sha256::new();
    h.update(fixed);
    h.update(slot_body);
    h.finalize().into()
}

/// Encodes one slot for `file_id`: `SLOT_LEN` bytes to write at [`slot_offset`].
pub fn encode_slot(file_id: &FileId, slot: &KeySlot) -> Result<Vec<u8>, HeaderError> {
    if slot.key_ref.len() > MAX_KEY_REF_LEN {
        return Err(HeaderError::TooLong("key reference"));
    }
    if slot.wrapped.len() > MAX_WRAPPED_LEN {
        return Err(HeaderError::TooLong("wrapped key"));
    }
    let mut b = vec![0u8; SLOT_LEN];
    b[..8].copy_from_slice(&slot.sequence.to_le_bytes());
    b[8..10].copy_from_slice(&(slot.key_ref.len() as u16).to_le_bytes());
    b[10..12].copy_from_slice(&(slot.wrapped.len() as u16).to_le_bytes());
    let k_end = SLOT_PREFIX_LEN + slot.key_ref.len();
    b[SLOT_PREFIX_LEN..k_end].copy_from_slice(slot.key_ref.as_bytes());
    b[k_end..k_end + slot.wrapped.len()].copy_from_slice(&slot.wrapped);
    let body_end = SLOT_LEN - SLOT_CHECKSUM_LEN;
    let sum = slot_checksum(&fixed_part(file_id), &b[..body_end]);
    b[body_end..].copy_from_slice(&sum);
    Ok(b)
}

/// Encodes a whole new header: the fixed part, `slot` in slot A, slot B empty.
pub fn encode(file_id: &FileId, slot: &KeySlot) -> Result<Vec<u8>, HeaderError> {
    let mut b = Vec::with_capacity(HEADER_LEN as usize);
    b.extend_from_slice(&fixed_part(file_id));
    b.extend_from_slice(&encode_slot(file_id, slot)?);
    b.resize(HEADER_LEN as usize, 0);
    Ok(b)
}

/// What one key slot holds. `decode` needs only the newest valid slot; a checker
/// (`kmsfs fsck`) also wants to know whether the other one is empty or damaged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotState {
    /// All zero: never written.
    Empty,
    Valid(KeySlot),
    /// Written, but torn or altered: checksum, lengths, padding or key reference wrong.
    Damaged,
}

fn slot_state(fixed: &[u8], s: &[u8]) -> SlotState {
    let body_end = SLOT_LEN - SLOT_CHECKSUM_LEN;
    if s[..body_end].iter().all(|&b| b == 0) {
        return SlotState::Empty;
    }
    match decode_slot(fixed, s) {
        Some(slot) => SlotState::Valid(slot),
        None => SlotState::Damaged,
    }
}

fn decode_slot(fixed: &[u8], s: &[u8]) -> Option<KeySlot> {
    let body_end = SLOT_LEN - SLOT_CHECKSUM_LEN;
    if s[..body_end].iter().all(|&b| b == 0) {
        return None; // never written
    }
    if slot_checksum(fixed, &s[..body_end])[..] != s[body_end..] {
        return None; // torn or altered
    }
    let sequence = u64::from_le_bytes(s[..8].try_into().ok()?);
    let key_len = u16::from_le_bytes([s[8], s[9]]) as usize;
    let wrapped_len = u16::from_le_bytes([s[10], s[11]]) as usize;
    if sequence == 0 || key_len > MAX_KEY_REF_LEN || wrapped_len > MAX_WRAPPED_LEN {
        return None;
    }
    let k_end = SLOT_PREFIX_LEN + key_len;
    let w_end = k_end + wrapped_len;
    if s[w_end..body_end].iter().any(|&b| b != 0) {
        return None;
    }
    let key_ref = std::str::from_utf8(&s[SLOT_PREFIX_LEN..k_end]).ok()?.to_owned();
    Some(KeySlot {
        sequence,
        key_ref,
        wrapped: s[k_end..w_end].to_vec(),
    })
}

/// Checks the fixed part (length, magic, version, reserved bytes) and returns it.
fn check_fixed(bytes: &[u8]) -> Result<&[u8], HeaderError> {
    if bytes.len() < HEADER_LEN as usize {
        return Err(HeaderError::Short(bytes.len()));
    }
    let fixed = &bytes[..FIXED_LEN];
    if fixed[..8] != MAGIC {
        return Err(HeaderError::BadMagic);
    }
    let version = u16::from_le_bytes([fixed[8], fixed[9]]);
    if version != RECORD_VERSION {
        return Err(HeaderError::UnsupportedVersion(version));
    }
    if fixed[10..12] != [0, 0] || fixed[28..32] != [0; 4] {
        return Err(HeaderError::Reserved);
    }
    Ok(fixed)
}

/// The state of both slots of a header whose fixed part is sound.
pub fn slot_states(bytes: &[u8]) -> Result<[SlotState; 2], HeaderError> {
    let fixed = check_fixed(bytes)?;
    Ok([0, 1].map(|i| {
        let off = slot_offset(i) as usize;
        slot_state(fixed, &bytes[off..off + SLOT_LEN])
    }))
}

/// Parses a header from the first bytes of a backing file.
pub fn decode(bytes: &[u8]) -> Result<Header, HeaderError> {
    let fixed = check_fixed(bytes)?;
    let mut id = [0u8; FILE_ID_LEN];
    id.copy_from_slice(&fixed[12..12 + FILE_ID_LEN]);
    let slots = [0, 1].map(|i| {
        let off = slot_offset(i) as usize;
        decode_slot(fixed, &bytes[off..off + SLOT_LEN])
    });
    let (slot_index, slot) = match slots {
        [Some(a), Some(b)] if b.sequence > a.sequence => (1, b),
        [Some(a), _] => (0, a),
        [None, Some(b)] => (1, b),
        [None, None] => return Err(HeaderError::NoValidSlot),
    };
    Ok(Header {
        file_id: FileId(id),
        slot,
        slot_index,
    })
}

impl Header {
    /// The slot to write for a re-wrap: the other index, the next sequence number.
    ///
    /// Only a crafted header (the checksum is not keyed) can hold the last sequence number;
    /// wrapping it to 0 would write a slot that reads as never written, and lose the re-wrap.
    pub fn next_slot(&self, key_ref: String, wrapped: Vec<u8>) -> Result<(usize, KeySlot), HeaderError> {
        let sequence = self
            .slot
            .sequence
            .checked_add(1)
            .ok_or(HeaderError::SequenceExhausted)?;
        Ok((
            1 - self.slot_index,
            KeySlot {
                sequence,
                key_ref,
                wrapped,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> (FileId, KeySlot) {
        (
            FileId([9; 16]),
            KeySlot {
                sequence: 1,
                key_ref: "default".into(),
                wrapped: vec![1, 2, 3, 4, 5],
            },
        )
    }

    #[test]
    fn round_trip() {
        let (id, slot) = sample();
        let b = encode(&id, &slot).unwrap();
        assert_eq!(b.len() as u64, HEADER_LEN);
        let h = decode(&b).unwrap();
        assert_eq!(h.file_id, id);
        assert_eq!(h.slot, slot);
        assert_eq!(h.slot_index, 0);
    }

    #[test]
    fn rewrite_goes_to_other_slot_and_wins() {
        let (id, slot) = sample();
        let mut b = encode(&id, &slot).unwrap();
        let h = decode(&b).unwrap();
        let (idx, next) = h.next_slot("default".into(), vec![7; 90]).unwrap();
        assert_eq!(idx, 1);
        let off = slot_offset(idx) as usize;
        b[off..off + SLOT_LEN].copy_from_slice(&encode_slot(&id, &next).unwrap());
        let h2 = decode(&b).unwrap();
        assert_eq!(h2.slot, next);
        // A torn rewrite (half the new slot written) falls back to the old slot.
        let mut torn = b.clone();
        torn[off + 100..off + SLOT_LEN].fill(0xEE);
        assert_eq!(decode(&torn).unwrap().slot, slot);
        // The next rewrite goes back to slot A with sequence 3.
        let (idx3, s3) = h2.next_slot("k".into(), vec![1]).unwrap();
        assert_eq!((idx3, s3.sequence), (0, 3));
    }

    #[test]
    fn bad_headers_are_errors() {
        let (id, slot) = sample();
        let good = encode(&id, &slot).unwrap();
        assert_eq!(decode(&good[..100]), Err(HeaderError::Short(100)));
        let mut b = good.clone();
        b[0] ^= 1;
        assert_eq!(decode(&b), Err(HeaderError::BadMagic));
        let mut b = good.clone();
        b[8] = 2;
        assert_eq!(decode(&b), Err(HeaderError::UnsupportedVersion(2)));
        let mut b = good.clone();
        b[13] ^= 1; // the file id is covered by the slot checksum
        assert_eq!(decode(&b), Err(HeaderError::NoValidSlot));
        let mut b = good.clone();
        b[slot_offset(0) as usize + 13] ^= 1;
        assert_eq!(decode(&b), Err(HeaderError::NoValidSlot));
        assert!(matches!(
            encode(
                &id,
                &KeySlot {
                    sequence: 1,
                    key_ref: "x".repeat(MAX_KEY_REF_LEN + 1),
                    wrapped: vec![]
                }
            ),
            Err(HeaderError::TooLong(_))
        ));
    }

    #[test]
    fn slot_states_tell_empty_valid_and_damaged_apart() {
        let (id, slot) = sample();
        let mut b = encode(&id, &slot).unwrap();
        assert_eq!(
            slot_states(&b).unwrap(),
            [SlotState::Valid(slot.clone()), SlotState::Empty]
        );
        b[slot_offset(1) as usize + 5] = 1; // a torn rewrite of slot B
        assert_eq!(
            slot_states(&b).unwrap(),
            [SlotState::Valid(slot.clone()), SlotState::Damaged]
        );
        assert_eq!(decode(&b).unwrap().slot, slot);
        b[0] ^= 1;
        assert_eq!(slot_states(&b), Err(HeaderError::BadMagic));
    }

    /// Found by the `header` fuzz target: `sequence + 1` overflowed on a (crafted) slot whose
    /// sequence is `u64::MAX`.
    #[test]
    fn no_next_slot_after_the_last_sequence_number() {
        let (id, mut slot) = sample();
        slot.sequence = u64::MAX;
        let h = decode(&encode(&id, &slot).unwrap()).unwrap();
        assert_eq!(
            h.next_slot("k".into(), vec![1]),
            Err(HeaderError::SequenceExhausted)
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn any_single_flip_is_caught_or_harmless(pos in 0usize..HEADER_LEN as usize, bit in 0u8..8) {
            let (id, slot) = sample();
            let mut b = encode(&id, &slot).unwrap();
            b[pos] ^= 1 << bit;
            // Either an error, or (a flip in the unused slot B) the same header as before.
            if let Ok(h) = decode(&b) {
                prop_assert_eq!(h.file_id, id);
                prop_assert_eq!(h.slot, slot);
            }
        }
    }
}
