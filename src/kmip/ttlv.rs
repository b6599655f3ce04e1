//! TTLV, KMIP's binary encoding: every item is a 3-byte tag, a 1-byte type, a 4-byte big-endian
//! length and the value, padded with zeros to a multiple of 8 bytes. A structure's value is its
//! items one after another.
//!
//! Pure: bytes in, items out, no I/O. The decoder checks every length against the type (fixed
//! sizes exact, a structure exactly filled by its items), padding (zeros only), booleans (0 or
//! 1), text (UTF-8), nesting ([`MAX_DEPTH`]) and size ([`MAX_MESSAGE_LEN`]), so what it accepts
//! is exactly what [`encode`] writes back, byte for byte. Byte strings are held in
//! [`Zeroizing`] buffers: Encrypt requests and Decrypt answers carry DEKs in them.

use zeroize::Zeroizing;

/// A message larger than this is refused before it is read (KMIP servers answer our requests
/// in a few KiB; a batch of 64 unwraps is about 12 KiB).
pub const MAX_MESSAGE_LEN: usize = 1 << 20;
/// Structures nested deeper than this are refused (KMIP 1.4 messages nest 5 deep).
pub const MAX_DEPTH: usize = 16;
/// Tag, type and length.
pub const ITEM_HEADER_LEN: usize = 8;

/// A KMIP tag (24 bits; the ones the standard defines start with 0x42).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(pub u32);

/// The largest tag: three bytes.
pub const MAX_TAG: u32 = 0x00ff_ffff;

/// One TTLV item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub tag: Tag,
    pub value: Value,
}

/// An item's value, one variant per TTLV type.
#[derive(Clone, PartialEq, Eq)]
pub enum Value {
    Structure(Vec<Item>),
    Integer(i32),
    LongInteger(i64),
    /// Big-endian two's complement, a multiple of 8 bytes long.
    BigInteger(Vec<u8>),
    Enumeration(u32),
    Boolean(bool),
    TextString(String),
    ByteString(Zeroizing<Vec<u8>>),
    /// Seconds since the Unix epoch.
    DateTime(i64),
    /// Seconds.
    Interval(u32),
    /// KMIP 2.0: microseconds since the Unix epoch.
    DateTimeExtended(i64),
}

impl std::fmt::Debug for Value {
    /// Byte strings print as their length only: they may be keys.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Structure(items) => f.debug_list().entries(items).finish(),
            Value::Integer(v) => write!(f, "Integer({v})"),
            Value::LongInteger(v) => write!(f, "LongInteger({v})"),
            Value::BigInteger(v) => write!(f, "BigInteger({} bytes)", v.len()),
            Value::Enumeration(v) => write!(f, "Enumeration({v:#x})"),
            Value::Boolean(v) => write!(f, "Boolean({v})"),
            Value::TextString(s) => write!(f, "TextString({s:?})"),
            Value::ByteString(b) => write!(f, "ByteString({} bytes)", b.len()),
            Value::DateTime(v) => write!(f, "DateTime({v})"),
            Value::Interval(v) => write!(f, "Interval({v})"),
            Value::DateTimeExtended(v) => write!(f, "DateTimeExtended({v})"),
        }
    }
}

/// Type bytes, as the standard numbers them.
mod ty {
    pub const STRUCTURE: u8 = 0x01;
    pub const INTEGER: u8 = 0x02;
    pub const LONG_INTEGER: u8 = 0x03;
    pub const BIG_INTEGER: u8 = 0x04;
    pub const ENUMERATION: u8 = 0x05;
    pub const BOOLEAN: u8 = 0x06;
    pub const TEXT_STRING: u8 = 0x07;
    pub const BYTE_STRING: u8 = 0x08;
    pub const DATE_TIME: u8 = 0x09;
    pub const INTERVAL: u8 = 0x0A;
    pub const DATE_TIME_EXTENDED: u8 = 0x0B;
}

/// Why bytes are not a TTLV item we accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The input ends inside an item.
    Truncated,
    /// Bytes follow the item.
    TrailingBytes,
    /// More than [`MAX_MESSAGE_LEN`] bytes.
    TooLarge(usize),
    /// Structures nested deeper than [`MAX_DEPTH`].
    TooDeep,
    UnknownType(u8),
    /// A length that does not fit the type.
    BadLength {
        ty: u8,
        len: u32,
    },
    NonZeroPadding,
    /// A boolean other than 0 or 1.
    BadBoolean,
    BadUtf8,
    /// The outer item of a message is not a structure.
    NotAStructure,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Truncated => write!(f, "message truncated"),
            DecodeError::TrailingBytes => write!(f, "bytes after the message"),
            DecodeError::TooLarge(n) => write!(f, "message of {n} bytes, more than {MAX_MESSAGE_LEN}"),
            DecodeError::TooDeep => write!(f, "structures nested more than {MAX_DEPTH} deep"),
            DecodeError::UnknownType(t) => write!(f, "unknown item type {t:#04x}"),
            DecodeError::BadLength { ty, len } => write!(f, "length {len} for an item of type {ty:#04x}"),
            DecodeError::NonZeroPadding => write!(f, "padding is not zero"),
            DecodeError::BadBoolean => write!(f, "a boolean other than 0 or 1"),
            DecodeError::BadUtf8 => write!(f, "text that is not UTF-8"),
            DecodeError::NotAStructure => write!(f, "the message is not a structure"),
        }
    }
}

/// Why an item cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncodeError {
    /// A tag over 24 bits.
    BadTag(u32),
    /// A big integer whose length is not a multiple of 8.
    BadBigInteger(usize),
    TooLarge(usize),
    TooDeep,
}

impl std::fmt::Display for EncodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EncodeError::BadTag(t) => write!(f, "tag {t:#x} is over 24 bits"),
            EncodeError::BadBigInteger(n) => write!(f, "big integer of {n} bytes (not a multiple of 8)"),
            EncodeError::TooLarge(n) => write!(f, "message of {n} bytes, more than {MAX_MESSAGE_LEN}"),
            EncodeError::TooDeep => write!(f, "structures nested more than {MAX_DEPTH} deep"),
        }
    }
}

/// `n` rounded up to a multiple of 8.
pub const fn padded(n: usize) -> usize {
    n.div_ceil(8) * 8
}

impl Item {
    pub fn new(tag: Tag, value: Value) -> Item {
        Item { tag, value }
    }

    /// A structure of `items`.
    pub fn structure(tag: Tag, items: Vec<Item>) -> Item {
        Item::new(tag, Value::Structure(items))
    }

    /// The first child with `tag`, if this is a structure that has one.
    pub fn child(&self, tag: Tag) -> Option<&Item> {
        self.children(tag).next()
    }

    /// Every child with `tag` (none if this is not a structure).
    pub fn children(&self, tag: Tag) -> impl Iterator<Item = &Item> {
        let items: &[Item] = match &self.value {
            Value::Structure(items) => items,
            _ => &[],
        };
        items.iter().filter(move |i| i.tag == tag)
    }

    /// The length of the value, without its padding.
    fn value_len(&self) -> usize {
        match &self.value {
            Value::Structure(items) => items.iter().map(Item::encoded_len).sum(),
            Value::Integer(_) | Value::Enumeration(_) | Value::Interval(_) => 4,
            Value::LongInteger(_) | Value::Boolean(_) | Value::DateTime(_) | Value::DateTimeExtended(_) => 8,
            Value::BigInteger(b) => b.len(),
            Value::TextString(s) => s.len(),
            Value::ByteString(b) => b.len(),
        }
    }

    /// The bytes [`encode`] writes for this item.
    pub fn encoded_len(&self) -> usize {
        ITEM_HEADER_LEN + padded(self.value_len())
    }
}

/// The TTLV bytes of `item`, in a buffer allocated once at its final size (no outgrown copies
/// of a DEK are left behind) and wiped when dropped.
pub fn encode(item: &Item) -> Result<Zeroizing<Vec<u8>>, EncodeError> {
    check(item, 1)?;
    let len = item.encoded_len();
    if len > MAX_MESSAGE_LEN {
        return Err(EncodeError::TooLarge(len));
    }
    let mut out = Zeroizing::new(Vec::with_capacity(len));
    write(item, &mut out);
    debug_assert_eq!(out.len(), len);
    Ok(out)
}

/// What [`encode`] refuses, checked before a byte is written.
fn check(item: &Item, depth: usize) -> Result<(), EncodeError> {
    if item.tag.0 > MAX_TAG {
        return Err(EncodeError::BadTag(item.tag.0));
    }
    match &item.value {
        Value::Structure(items) => {
            if depth > MAX_DEPTH {
                return Err(EncodeError::TooDeep);
            }
            items.iter().try_for_each(|i| check(i, depth + 1))
        }
        Value::BigInteger(b) if !b.len().is_multiple_of(8) => Err(EncodeError::BadBigInteger(b.len())),
        _ => Ok(()),
    }
}

fn write(item: &Item, out: &mut Vec<u8>) {
    let (ty, len) = (type_of(&item.value), item.value_len());
    out.extend_from_slice(&item.tag.0.to_be_bytes()[1..]);
    out.push(ty);
    // Checked by `encode`: no item is over MAX_MESSAGE_LEN.
    out.extend_from_slice(&(len as u32).to_be_bytes());
    match &item.value {
        Value::Structure(items) => items.iter().for_each(|i| write(i, out)),
        Value::Integer(v) => out.extend_from_slice(&v.to_be_bytes()),
        Value::LongInteger(v) | Value::DateTime(v) | Value::DateTimeExtended(v) => {
            out.extend_from_slice(&v.to_be_bytes())
        }
        Value::Enumeration(v) | Value::Interval(v) => out.extend_from_slice(&v.to_be_bytes()),
        Value::Boolean(b) => out.extend_from_slice(&u64::from(*b).to_be_bytes()),
        Value::BigInteger(b) => out.extend_from_slice(b),
        Value::TextString(s) => out.extend_from_slice(s.as_bytes()),
        Value::ByteString(b) => out.extend_from_slice(b),
    }
    out.resize(out.len() + padded(len) - len, 0);
}

fn type_of(v: &Value) -> u8 {
    match v {
        Value::Structure(_) => ty::STRUCTURE,
        Value::Integer(_) => ty::INTEGER,
        Value::LongInteger(_) => ty::LONG_INTEGER,
        Value::BigInteger(_) => ty::BIG_INTEGER,
        Value::Enumeration(_) => ty::ENUMERATION,
        Value::Boolean(_) => ty::BOOLEAN,
        Value::TextString(_) => ty::TEXT_STRING,
        Value::ByteString(_) => ty::BYTE_STRING,
        Value::DateTime(_) => ty::DATE_TIME,
        Value::Interval(_) => ty::INTERVAL,
        Value::DateTimeExtended(_) => ty::DATE_TIME_EXTENDED,
    }
}

/// The length of a whole message from its first [`ITEM_HEADER_LEN`] bytes, so that a reader
/// knows how much to read: refused unless it is a structure of at most [`MAX_MESSAGE_LEN`].
pub fn message_len(header: &[u8; ITEM_HEADER_LEN]) -> Result<usize, DecodeError> {
    if header[3] != ty::STRUCTURE {
        return Err(DecodeError::NotAStructure);
    }
    let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    if !len.is_multiple_of(8) {
        return Err(DecodeError::BadLength {
            ty: ty::STRUCTURE,
            len,
        });
    }
    let total = ITEM_HEADER_LEN + len as usize;
    if total > MAX_MESSAGE_LEN {
        return Err(DecodeError::TooLarge(total));
    }
    Ok(total)
}

/// The one item that `bytes` hold, all of them.
pub fn decode(bytes: &[u8]) -> Result<Item, DecodeError> {
    if bytes.len() > MAX_MESSAGE_LEN {
        return Err(DecodeError::TooLarge(bytes.len()));
    }
    let (item, used) = read(bytes, 1)?;
    if used != bytes.len() {
        return Err(DecodeError::TrailingBytes);
    }
    Ok(item)
}

/// One item from the front of `bytes`, and how many bytes it took with its padding.
fn read(bytes: &[u8], depth: usize) -> Result<(Item, usize), DecodeError> {
    let header: &[u8; ITEM_HEADER_LEN] = bytes
        .get(..ITEM_HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(DecodeError::Truncated)?;
    let tag = Tag(u32::from_be_bytes([0, header[0], header[1], header[2]]));
    let t = header[3];
    let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    let bad_len = DecodeError::BadLength { ty: t, len };
    let n = len as usize;
    let total = ITEM_HEADER_LEN
        .checked_add(padded(n))
        .ok_or(DecodeError::Truncated)?;
    let body = bytes.get(ITEM_HEADER_LEN..total).ok_or(DecodeError::Truncated)?;
    let (v, pad) = body.split_at(n);
    if pad.iter().any(|&b| b != 0) {
        return Err(DecodeError::NonZeroPadding);
    }
    let fixed = |want: usize| if n == want { Ok(()) } else { Err(bad_len.clone()) };
    let b4 = || -> [u8; 4] { v.try_into().unwrap_or_default() };
    let b8 = || -> [u8; 8] { v.try_into().unwrap_or_default() };
    let value = match t {
        ty::STRUCTURE => {
            if depth > MAX_DEPTH {
                return Err(DecodeError::TooDeep);
            }
            let mut items = Vec::new();
            let mut rest = v;
            while !rest.is_empty() {
                let (item, used) = read(rest, depth + 1)?;
                items.push(item);
                rest = &rest[used..];
            }
            Value::Structure(items)
        }
        ty::INTEGER => fixed(4).map(|()| Value::Integer(i32::from_be_bytes(b4())))?,
        ty::ENUMERATION => fixed(4).map(|()| Value::Enumeration(u32::from_be_bytes(b4())))?,
        ty::INTERVAL => fixed(4).map(|()| Value::Interval(u32::from_be_bytes(b4())))?,
        ty::LONG_INTEGER => fixed(8).map(|()| Value::LongInteger(i64::from_be_bytes(b8())))?,
        ty::DATE_TIME => fixed(8).map(|()| Value::DateTime(i64::from_be_bytes(b8())))?,
        ty::DATE_TIME_EXTENDED => fixed(8).map(|()| Value::DateTimeExtended(i64::from_be_bytes(b8())))?,
        ty::BOOLEAN => {
            fixed(8)?;
            match u64::from_be_bytes(b8()) {
                0 => Value::Boolean(false),
                1 => Value::Boolean(true),
                _ => return Err(DecodeError::BadBoolean),
            }
        }
        ty::BIG_INTEGER if n.is_multiple_of(8) => Value::BigInteger(v.to_vec()),
        ty::BIG_INTEGER => return Err(bad_len),
        ty::TEXT_STRING => Value::TextString(
            std::str::from_utf8(v)
                .map_err(|_| DecodeError::BadUtf8)?
                .to_owned(),
        ),
        ty::BYTE_STRING => Value::ByteString(Zeroizing::new(v.to_vec())),
        other => return Err(DecodeError::UnknownType(other)),
    };
    Ok((Item { tag, value }, total))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// From the KMIP 1.4 specification, section 9.1.2 (examples).
    #[test]
    fn spec_examples() {
        let cases: Vec<(Value, &str)> = vec![
            (Value::Integer(8), "42002002000000040000000800000000"),
            (
                Value::LongInteger(123456789000000000),
                "420020030000000801B69B4BA5749200",
            ),
            (
                Value::BigInteger(hex("0000000003FD35EB6BC2DF4618080000")),
                "42002004000000100000000003FD35EB6BC2DF4618080000",
            ),
            (Value::Enumeration(255), "4200200500000004000000FF00000000"),
            (Value::Boolean(true), "42002006000000080000000000000001"),
            (
                Value::TextString("Hello World".into()),
                "420020070000000B48656C6C6F20576F726C640000000000",
            ),
            (
                Value::ByteString(Zeroizing::new(vec![1, 2, 3])),
                "42002008000000030102030000000000",
            ),
            (Value::DateTime(0x47DA67F8), "42002009000000080000000047DA67F8"),
            (Value::Interval(864000), "4200200A00000004000D2F0000000000"),
        ];
        for (value, want) in cases {
            let item = Item::new(Tag(0x420020), value);
            let bytes = encode(&item).unwrap();
            assert_eq!(to_hex(&bytes), want, "{item:?}");
            assert_eq!(decode(&bytes).unwrap(), item);
        }
        let s = Item::structure(
            Tag(0x420020),
            vec![
                Item::new(Tag(0x420004), Value::Enumeration(254)),
                Item::new(Tag(0x420005), Value::Integer(255)),
            ],
        );
        let want = "42002001000000204200040500000004000000FE000000004200050200000004000000FF00000000";
        assert_eq!(to_hex(&encode(&s).unwrap()), want);
        assert_eq!(decode(&hex(want)).unwrap(), s);
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn to_hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02X}")).collect()
    }

    #[test]
    fn what_is_refused() {
        let int = hex("42002002000000040000000800000000");
        let mut bad_pad = int.clone();
        bad_pad[15] = 1;
        assert_eq!(decode(&bad_pad), Err(DecodeError::NonZeroPadding));
        let mut bad_len = int.clone();
        bad_len[7] = 8;
        assert!(matches!(decode(&bad_len), Err(DecodeError::BadLength { .. })));
        assert_eq!(decode(&int[..12]), Err(DecodeError::Truncated));
        let mut trailing = int.clone();
        trailing.extend([0; 8]);
        assert_eq!(decode(&trailing), Err(DecodeError::TrailingBytes));
        let mut bool2 = hex("42002006000000080000000000000002");
        assert_eq!(decode(&bool2), Err(DecodeError::BadBoolean));
        bool2[3] = 0x0C;
        assert_eq!(decode(&bool2), Err(DecodeError::UnknownType(0x0C)));
        let bad_text = hex("4200200700000002FFFE000000000000");
        assert_eq!(decode(&bad_text), Err(DecodeError::BadUtf8));
        // A structure whose length cuts its last item short.
        let short = hex("42002001000000084200050200000004");
        assert_eq!(decode(&short), Err(DecodeError::Truncated));
        // A length near u32::MAX does not overflow or allocate.
        assert_eq!(
            decode(&hex("42002008FFFFFFFF0000000000000000")),
            Err(DecodeError::Truncated)
        );
        // Nesting.
        let mut deep = Item::new(Tag(0x420001), Value::Integer(1));
        for _ in 0..MAX_DEPTH {
            deep = Item::structure(Tag(0x420001), vec![deep]);
        }
        let ok = encode(&deep).unwrap();
        assert!(decode(&ok).is_ok());
        let deeper = Item::structure(Tag(0x420001), vec![deep]);
        assert_eq!(encode(&deeper), Err(EncodeError::TooDeep));
        let mut bytes = vec![0x42, 0, 1, 1];
        bytes.extend(((ok.len()) as u32).to_be_bytes());
        bytes.extend_from_slice(&ok);
        assert_eq!(decode(&bytes), Err(DecodeError::TooDeep));
        // Encoder refusals.
        assert_eq!(
            encode(&Item::new(Tag(0x0100_0000), Value::Integer(0))),
            Err(EncodeError::BadTag(0x0100_0000))
        );
        assert_eq!(
            encode(&Item::new(Tag(1), Value::BigInteger(vec![1; 3]))),
            Err(EncodeError::BadBigInteger(3))
        );
    }

    #[test]
    fn message_len_reads_the_outer_header() {
        assert_eq!(message_len(&[0x42, 0, 0x78, 1, 0, 0, 0, 16]), Ok(24));
        assert_eq!(
            message_len(&[0x42, 0, 0x78, 2, 0, 0, 0, 4]),
            Err(DecodeError::NotAStructure)
        );
        assert!(matches!(
            message_len(&[0x42, 0, 0x78, 1, 0, 0, 0, 5]),
            Err(DecodeError::BadLength { .. })
        ));
        assert!(matches!(
            message_len(&[0x42, 0, 0x78, 1, 0x7f, 0xff, 0xff, 0xf8]),
            Err(DecodeError::TooLarge(_))
        ));
    }

    #[test]
    fn byte_strings_do_not_print() {
        let item = Item::new(Tag(0x4200C2), Value::ByteString(Zeroizing::new(vec![0xAB; 32])));
        assert_eq!(
            format!("{item:?}"),
            "Item { tag: Tag(4325570), value: ByteString(32 bytes) }"
        );
    }

    pub(crate) fn arb_item() -> impl Strategy<Value = Item> {
        let tag = (0u32..=MAX_TAG).prop_map(Tag);
        let leaf = prop_oneof![
            any::<i32>().prop_map(Value::Integer),
            any::<i64>().prop_map(Value::LongInteger),
            (0usize..4)
                .prop_flat_map(|n| proptest::collection::vec(any::<u8>(), n * 8))
                .prop_map(Value::BigInteger),
            any::<u32>().prop_map(Value::Enumeration),
            any::<bool>().prop_map(Value::Boolean),
            ".{0,20}".prop_map(Value::TextString),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(|b| Value::ByteString(Zeroizing::new(b))),
            any::<i64>().prop_map(Value::DateTime),
            any::<u32>().prop_map(Value::Interval),
            any::<i64>().prop_map(Value::DateTimeExtended),
        ];
        let value = leaf.prop_recursive(6, 64, 6, move |inner| {
            proptest::collection::vec(((0u32..=MAX_TAG).prop_map(Tag), inner), 0..6).prop_map(|items| {
                Value::Structure(
                    items
                        .into_iter()
                        .map(|(tag, value)| Item { tag, value })
                        .collect(),
                )
            })
        });
        (tag, value).prop_map(|(tag, value)| Item { tag, value })
    }

    proptest! {
        #[test]
        fn round_trip(item in arb_item()) {
            let bytes = encode(&item).unwrap();
            prop_assert_eq!(bytes.len(), item.encoded_len());
            prop_assert_eq!(bytes.len() % 8, 0);
            prop_assert_eq!(decode(&bytes).unwrap(), item);
        }

        /// Whatever decodes re-encodes to the same bytes; nothing panics.
        #[test]
        fn accepted_bytes_are_canonical(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(item) = decode(&bytes) {
                prop_assert_eq!(&encode(&item).unwrap()[..], &bytes[..]);
            }
        }

        /// Every truncation of a valid message is refused.
        #[test]
        fn truncations_are_refused(item in arb_item(), cut in any::<prop::sample::Index>()) {
            let bytes = encode(&item).unwrap();
            let at = cut.index(bytes.len());
            prop_assert!(decode(&bytes[..at]).is_err());
        }
    }
}
