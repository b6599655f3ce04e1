//! The bodies of the fuzz targets, as plain functions over arbitrary bytes.
//!
//! `fuzz/fuzz_targets/*.rs` (cargo-fuzz, nightly) and `tests/fuzz_smoke.rs` (stable, in CI) both
//! call these, so the invariants are checked even where no nightly toolchain is installed. Each
//! function panics only when an invariant of the pure format layer breaks; none does I/O.
//! Not part of kmsfs's interface: hidden from the docs, free to change with the targets.

use crate::crypto::{Aead, NONCE_LEN, SecretKey, TAG_LEN};
use crate::format::FileId;
use crate::format::block::{self, BlockLayout, CONTENT_KEY_INFO, ContentCipher, RECORD_OVERHEAD, SizeError};
use crate::format::config::{KmsConfig, NamesConfig, VolumeConfig};
use crate::format::header::{
    self, HEADER_LEN, Header, HeaderError, KeySlot, MAX_KEY_REF_LEN, MAX_WRAPPED_LEN, SLOT_LEN,
};
use crate::format::name::{self, BackingEntry, DirId, NameCipher, XattrOwner};
use crate::kmip::messages::{self, Request};
use crate::kmip::ttlv::{self, ITEM_HEADER_LEN, Item, Tag, Value};
use crate::kmip::wrapped::Wrapped;
use std::sync::OnceLock;

/// The targets, named as in `fuzz/fuzz_targets/<name>.rs` and `fuzz/corpus/<name>/`.
pub const TARGETS: [&str; 5] = ["header", "config", "name", "block", "kmip"];

/// Runs target `target` on `data`.
pub fn run(target: &str, data: &[u8]) {
    match target {
        "header" => header(data),
        "config" => config(data),
        "name" => name(data),
        "block" => block(data),
        "kmip" => kmip(data),
        _ => panic!("no fuzz target {target:?}"),
    }
}

/// Fixed keys and ids: the targets must be reproducible, and the seeds are sealed under them.
const NAME_KEY: [u8; 32] = [0x4b; 32];
const VOLUME_ID: [u8; 16] = *b"fuzz volume id!!";
const DIR_ID: DirId = [0x5a; 16];
const XATTR_STORED_NAME: &str = "user.fuzz";
const XATTR_OWNER: XattrOwner = XattrOwner::File(FILE_ID);
const DEK: [u8; 32] = [0x24; 32];
const FILE_ID: FileId = FileId([0x11; 16]);

/// Reads fields off the front of the input; past its end every field is zero.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.0.split_at(n.min(self.0.len()));
        self.0 = tail;
        head
    }
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let t = self.take(N);
        a[..t.len()].copy_from_slice(t);
        a
    }
    fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

/// `header`: [`header::decode`] on arbitrary bytes, then on headers built from fields taken
/// from the input (random bytes almost never carry a valid SHA-256, so this is how the
/// fuzzer reaches the slot logic behind the checksum).
pub fn header(data: &[u8]) {
    if let Ok(h) = header::decode(data) {
        // The checksum covers every byte of a slot, so a slot that decodes is exactly what
        // encode_slot writes for it.
        let off = header::slot_offset(h.slot_index) as usize;
        let slot = header::encode_slot(&h.file_id, &h.slot).expect("a decoded slot re-encodes");
        assert_eq!(slot, data[off..off + SLOT_LEN], "re-encoded slot differs");
        let fresh = header::decode(&header::encode(&h.file_id, &h.slot).unwrap()).unwrap();
        assert_eq!(
            (fresh.file_id, &fresh.slot, fresh.slot_index),
            (h.file_id, &h.slot, 0)
        );
        check_rewrap(&data[..HEADER_LEN as usize], &h, data.len() as u16);
    }

    let mut input = Input(data);
    let file_id = FileId(input.array());
    let sequence = input.u64();
    let key_len = input.u16() as usize % (MAX_KEY_REF_LEN + 40);
    let wrapped_len = input.u16() as usize % (MAX_WRAPPED_LEN + 40);
    let torn_at = input.u16();
    let slot = KeySlot {
        sequence,
        key_ref: String::from_utf8_lossy(input.take(key_len)).into_owned(),
        wrapped: input.take(wrapped_len).to_vec(),
    };
    let too_long = slot.key_ref.len() > MAX_KEY_REF_LEN || slot.wrapped.len() > MAX_WRAPPED_LEN;
    let bytes = match header::encode(&file_id, &slot) {
        Ok(bytes) => bytes,
        Err(e) => {
            assert!(too_long && matches!(e, HeaderError::TooLong(_)), "encode: {e}");
            return;
        }
    };
    assert!(!too_long, "an oversized slot encoded");
    assert_eq!(bytes.len() as u64, HEADER_LEN);
    match header::decode(&bytes) {
        Ok(h) => {
            assert_ne!(sequence, 0, "a slot with sequence 0 decoded");
            let expected = Header {
                file_id,
                slot,
                slot_index: 0,
            };
            assert_eq!(h, expected);
            check_rewrap(&bytes, &h, torn_at);
        }
        Err(e) => assert_eq!((e, sequence), (HeaderError::NoValidSlot, 0)),
    }
}

/// A re-wrap into the other slot wins; the same write torn leaves the old slot in force.
fn check_rewrap(bytes: &[u8], h: &Header, torn_at: u16) {
    let Ok((index, next)) = h.next_slot("rewrapped".into(), vec![0xA5; 60]) else {
        assert_eq!(
            h.slot.sequence,
            u64::MAX,
            "no next slot before the last sequence number"
        );
        return;
    };
    assert_eq!(index, 1 - h.slot_index);
    let mut b = bytes.to_vec();
    let off = header::slot_offset(index) as usize;
    b[off..off + SLOT_LEN].copy_from_slice(&header::encode_slot(&h.file_id, &next).unwrap());
    let after = header::decode(&b).expect("a re-wrapped header decodes");
    assert_eq!((after.slot_index, &after.slot), (index, &next));
    b[off + torn_at as usize % SLOT_LEN] ^= 0x80;
    let torn = header::decode(&b).expect("a torn re-wrap keeps the old slot");
    assert_eq!((torn.slot_index, &torn.slot), (h.slot_index, &h.slot));
}

/// `config`: [`VolumeConfig::decode`] on arbitrary bytes; what it accepts, `encode` writes
/// back to an equal config.
pub fn config(data: &[u8]) {
    if let Ok(c) = VolumeConfig::decode(data) {
        let again =
            VolumeConfig::decode(&c.encode()).expect("an accepted config re-encodes to one that decodes");
        assert_eq!(again, c);
    }
}

fn name_cipher() -> &'static NameCipher {
    static CIPHER: OnceLock<NameCipher> = OnceLock::new();
    CIPHER.get_or_init(|| {
        NameCipher::new(
            &SecretKey::from_slice(&NAME_KEY).unwrap(),
            &VOLUME_ID,
            crate::format::VOLUME_FORMAT,
        )
    })
}

/// `name`: every decoder of stored names, symlinks and xattrs on arbitrary bytes (never a
/// panic; whatever opens is exactly what encrypting its plaintext gives), then
/// encrypt → decrypt round trips with the input as the plaintext.
pub fn name(data: &[u8]) {
    let c = name_cipher();
    let _ = name::classify(data);
    let text = String::from_utf8_lossy(data);
    if let Ok(n) = c.decrypt_name(&DIR_ID, &text) {
        assert_eq!(
            c.encrypt_name(&DIR_ID, &n).unwrap(),
            text,
            "a name opened that encryption did not produce"
        );
    }
    if let Ok(target) = c.decrypt_symlink(&DIR_ID, data) {
        assert_eq!(name::symlink_plain_len(data.len() as u64), target.len() as u64);
    }
    if let Ok(n) = c.decrypt_xattr_name(data) {
        assert_eq!(c.encrypt_xattr_name(&n).as_bytes(), data);
    }
    if let Ok(v) = c.decrypt_xattr_value(&XATTR_OWNER, XATTR_STORED_NAME, data) {
        assert_eq!(v.len() + NONCE_LEN + TAG_LEN, data.len());
    }
    let n = Input(data).u64();
    let exact = (n as u128 * 3 / 4).saturating_sub((NONCE_LEN + TAG_LEN) as u128);
    assert_eq!(name::symlink_plain_len(n) as u128, exact);

    if name::check_name(data).is_ok() {
        let enc = c.encrypt_name(&DIR_ID, data).unwrap();
        assert_eq!(c.decrypt_name(&DIR_ID, &enc).unwrap(), data);
        let (backing, long) = name::backing_name_for(&enc);
        assert_eq!(long, data.len() > name::MAX_SHORT_NAME_LEN);
        assert!(backing.len() <= name::MAX_BACKING_NAME_LEN);
        let expected = if long {
            assert!(enc.len() <= name::MAX_SIDECAR_LEN);
            let sidecar = name::sidecar_of(&backing);
            assert_eq!(name::classify(sidecar.as_bytes()), BackingEntry::Internal);
            BackingEntry::Long(&backing)
        } else {
            BackingEntry::Short(&backing)
        };
        assert_eq!(name::classify(backing.as_bytes()), expected);
    }
    let s = c.encrypt_symlink(&DIR_ID, data);
    assert_eq!(c.decrypt_symlink(&DIR_ID, s.as_bytes()).unwrap(), data);
    assert_eq!(name::symlink_plain_len(s.len() as u64), data.len() as u64);
    let xn = c.encrypt_xattr_name(data);
    assert_eq!(c.decrypt_xattr_name(xn.as_bytes()).unwrap(), data);
    let xv = c.encrypt_xattr_value(&XATTR_OWNER, &xn, data);
    assert_eq!(c.decrypt_xattr_value(&XATTR_OWNER, &xn, &xv).unwrap(), data);
    assert!(
        c.decrypt_xattr_value(&XATTR_OWNER, XATTR_STORED_NAME, &xv)
            .is_err(),
        "a value opened under another name"
    );
}

/// The file's content cipher, and the same key as a bare [`Aead`] whose deterministic
/// sealing is `seal` with an all-zero nonce.
fn content() -> &'static (ContentCipher, Aead) {
    static CONTENT: OnceLock<(ContentCipher, Aead)> = OnceLock::new();
    CONTENT.get_or_init(|| {
        let dek = SecretKey::from_slice(&DEK).unwrap();
        let key = dek.derive(&FILE_ID.0, CONTENT_KEY_INFO);
        (ContentCipher::new(&dek, FILE_ID), Aead::new(&key))
    })
}

/// A record as `seal` writes it when its random nonce comes out all zero.
fn zero_nonce_record(index: u64, is_final: bool, plain: &[u8]) -> Vec<u8> {
    let (cipher, aead) = content();
    let mut record = vec![0u8; NONCE_LEN];
    record.extend(aead.seal_deterministic(&block::block_aad(cipher.file_id(), index, is_final), plain));
    record
}

/// The block sizes the `block` target tries, chosen by bits 1 to 4 of its flags byte (0, as in
/// the older seeds: 64 KiB).
pub const FUZZ_BLOCK_SIZES: [u64; 9] = [65536, 4096, 8192, 16384, 32768, 131072, 262144, 524288, 1 << 20];

/// The layout a `block` input's flags byte chooses.
pub fn fuzz_layout(flags: u8) -> BlockLayout {
    let bs = FUZZ_BLOCK_SIZES[((flags >> 1) & 0xF) as usize % FUZZ_BLOCK_SIZES.len()];
    BlockLayout::new(bs).expect("a valid block size")
}

/// `block`: input = flags (u8; bit 0 = final block, bits 1-4 the block size) ‖ block index
/// (u64 LE) ‖ a size or backing length (u64 LE) ‖ record. Checks the block and size arithmetic
/// on the two u64s, opens the record (only seal's output may open: the seeds were sealed with
/// an all-zero nonce, so anything that opens must be exactly that), and seals the record's
/// bytes (up to a block) as plaintext.
pub fn block(data: &[u8]) {
    let mut input = Input(data);
    let flags = input.u8();
    let index = input.u64();
    let size = input.u64();
    let record = input.0;
    let is_final = flags & 1 == 1;
    let layout = fuzz_layout(flags);
    block_math(layout, size, index);

    let (cipher, _) = content();
    let mut rec = record.to_vec();
    if cipher.open(index, is_final, &mut rec).is_ok() {
        let plain = &rec[block::record_body(rec.len())];
        assert_eq!(
            zero_nonce_record(index, is_final, plain),
            record,
            "a record opened that seal did not produce"
        );
        assert!(cipher.open(index ^ 1, is_final, &mut record.to_vec()).is_err());
        assert!(cipher.open(index, !is_final, &mut record.to_vec()).is_err());
    }

    let plain = &record[..record.len().min(layout.block_size() as usize)];
    let mut sealed = vec![0u8; plain.len() + RECORD_OVERHEAD as usize];
    let body = block::record_body(sealed.len());
    sealed[body.clone()].copy_from_slice(plain);
    cipher.seal(index, is_final, &mut sealed);
    let mut bad = sealed.clone();
    cipher
        .open(index, is_final, &mut sealed)
        .expect("a sealed record opens");
    assert_eq!(&sealed[body], plain);
    let pos = size as usize % bad.len();
    bad[pos] ^= 1 << (flags >> 5);
    assert!(
        cipher.open(index, is_final, &mut bad).is_err(),
        "a changed record opened"
    );
}

/// The block and size arithmetic of `layout` against a 128-bit model: exact where the result
/// fits in a u64, saturated at `u64::MAX` (an offset no I/O accepts) where it does not, never
/// wrapped.
pub fn block_math(layout: BlockLayout, size: u64, index: u64) {
    let fit = |x: u128| u64::try_from(x).unwrap_or(u64::MAX);
    let (s, i, bs) = (size as u128, index as u128, layout.block_size() as u128);
    let record_len = layout.record_len() as u128;
    assert_eq!(record_len, bs + RECORD_OVERHEAD as u128);
    assert_eq!(layout.block_of(size) as u128, s / bs);
    assert_eq!(layout.block_count(size) as u128, s.div_ceil(bs));
    assert_eq!(layout.block_start(index), fit(i * bs));
    assert_eq!(
        layout.record_offset(index),
        fit(HEADER_LEN as u128 + i * record_len)
    );
    assert_eq!(
        layout.block_plain_len(size, index) as u128,
        s.saturating_sub(i * bs).min(bs)
    );
    let tail = if s % bs == 0 {
        0
    } else {
        s % bs + RECORD_OVERHEAD as u128
    };
    let backing = HEADER_LEN as u128 + s / bs * record_len + tail;
    assert_eq!(layout.backing_len(size), fit(backing));
    if backing <= u64::MAX as u128 {
        assert_eq!(layout.plaintext_size(backing as u64), Ok(size));
    }
    if size > 0 {
        let last = layout.block_count(size) - 1;
        assert!((1..=layout.block_size()).contains(&layout.block_plain_len(size, last)));
        assert_eq!(layout.block_plain_len(size, last + 1), 0);
    }
    // `size` as a backing length: the inverse of backing_len where it is accepted.
    match layout.plaintext_size(size) {
        Ok(p) => assert_eq!(layout.backing_len(p), size),
        Err(SizeError::NoHeader) => assert!(size < HEADER_LEN),
        Err(SizeError::TornRecord) => {
            let rem = (size - HEADER_LEN) % layout.record_len();
            assert!(rem > 0 && rem <= RECORD_OVERHEAD);
        }
    }
    match layout.extent(size) {
        Ok(e) => {
            assert!(e.torn <= RECORD_OVERHEAD);
            assert_eq!(layout.backing_len(e.size) + e.torn, size);
        }
        Err(SizeError::NoHeader) => assert!(size < HEADER_LEN),
        Err(SizeError::TornRecord) => panic!("extent keeps the whole records of a torn tail"),
    }
}

/// `kmip`: what a KMIP server or a header may hand the KMIP backend, on arbitrary bytes: the
/// TTLV decoder (what it accepts re-encodes to the same bytes), the response reader and the
/// payload readers behind it, the message-length check, and the wrapped-key layout.
pub fn kmip(data: &[u8]) {
    if let Some(header) = data.get(..ITEM_HEADER_LEN) {
        let header: &[u8; ITEM_HEADER_LEN] = header.try_into().expect("8 bytes");
        if let Ok(n) = ttlv::message_len(header) {
            assert!((ITEM_HEADER_LEN..=ttlv::MAX_MESSAGE_LEN).contains(&n));
        }
    }
    if let Ok(item) = ttlv::decode(data) {
        let again = ttlv::encode(&item).expect("a decoded item re-encodes");
        assert_eq!(&again[..], data, "TTLV decoding is not canonical");
        for count in [1, 2, messages::MAX_BATCH] {
            if let Ok(results) = messages::parse_response(&item, count) {
                assert_eq!(results.len(), count);
                for payload in results.iter().flatten() {
                    let _ = messages::key_state(payload);
                    let _ = messages::located_ids(payload);
                    let _ = messages::created_id(payload);
                    let _ = messages::encrypted(payload).is_ok();
                    let _ = messages::decrypted(payload).is_ok();
                }
            }
        }
    }
    if let Ok(w) = Wrapped::decode(data) {
        assert_eq!(
            w.encode().expect("a decoded key re-encodes"),
            data,
            "wrapped key not canonical"
        );
    }
}

/// A response message of `items` (result status, id, payload) as a server would send it.
fn kmip_response(items: Vec<(u32, u32, Vec<Item>)>) -> Vec<u8> {
    use messages::tag;
    let mut all = vec![Item::structure(
        tag::RESPONSE_HEADER,
        vec![Item::new(tag::BATCH_COUNT, Value::Integer(items.len() as i32))],
    )];
    for (status, id, payload) in items {
        all.push(Item::structure(
            tag::BATCH_ITEM,
            vec![
                Item::new(
                    tag::OPERATION,
                    Value::Enumeration(messages::Operation::Decrypt as u32),
                ),
                Item::new(
                    tag::UNIQUE_BATCH_ITEM_ID,
                    Value::ByteString(id.to_be_bytes().to_vec().into()),
                ),
                Item::new(tag::RESULT_STATUS, Value::Enumeration(status)),
                Item::structure(tag::RESPONSE_PAYLOAD, payload),
            ],
        ));
    }
    ttlv::encode(&Item::structure(tag::RESPONSE_MESSAGE, all))
        .expect("seed encodes")
        .to_vec()
}

/// Seed inputs for `target`: valid headers, configs, names and records, sealed under the
/// targets' fixed keys (`tests/fuzz_smoke.rs` writes them to `fuzz/corpus/<target>/`).
pub fn seeds(target: &str) -> Vec<(&'static str, Vec<u8>)> {
    match target {
        "header" => {
            let slot = KeySlot {
                sequence: 1,
                key_ref: "default".into(),
                wrapped: (0..60).collect(),
            };
            let first = header::encode(&FILE_ID, &slot).unwrap();
            let h = header::decode(&first).unwrap();
            let (index, next) = h.next_slot("default".into(), vec![7; 90]).unwrap();
            let mut rewrapped = first.clone();
            let off = header::slot_offset(index) as usize;
            rewrapped[off..off + SLOT_LEN].copy_from_slice(&header::encode_slot(&FILE_ID, &next).unwrap());
            let mut fields = FILE_ID.0.to_vec();
            fields.extend(5u64.to_le_bytes());
            fields.extend(7u16.to_le_bytes());
            fields.extend(4u16.to_le_bytes());
            fields.extend(100u16.to_le_bytes());
            fields.extend(b"default");
            fields.extend([1, 2, 3, 4]);
            vec![("new", first), ("rewrapped", rewrapped), ("fields", fields)]
        }
        "config" => {
            let mut local = VolumeConfig::new(KmsConfig::Local {
                keystore: "/srv/vol.keystore".into(),
                key: "default".into(),
            });
            local.names = NamesConfig::Encrypted {
                root_dir_id: crate::hex::encode(&DIR_ID),
                key_ref: "default".into(),
                wrapped_key: crate::hex::encode(&[0xab; 60]),
            };
            let bao = VolumeConfig::new(KmsConfig::Openbao {
                addrs: vec!["https://bao1:8200".into(), "http://127.0.0.1:8200".into()],
                mount: "transit".into(),
                key: "kmsfs".into(),
            });
            let kmip = VolumeConfig::new(KmsConfig::Kmip {
                addrs: vec!["kms1.example:5696".into(), "[::1]:5696".into()],
                key: "kmsfs-kek".into(),
            });
            // Seeds the decoder accepts without a MAC: format 1 (format 2 requires one).
            let v1 = |mut c: VolumeConfig| {
                c.format_version = crate::format::VOLUME_FORMAT_V1;
                c.encode()
            };
            vec![("local", v1(local)), ("openbao", v1(bao)), ("kmip", v1(kmip))]
        }
        "name" => {
            let c = name_cipher();
            let long: Vec<u8> = (0..200).map(|i| b'a' + i % 26).collect();
            let xattr = c.encrypt_xattr_name(b"comment");
            vec![
                ("plain", b"report 2024.pdf".to_vec()),
                (
                    "short",
                    c.encrypt_name(&DIR_ID, b"report 2024.pdf").unwrap().into_bytes(),
                ),
                ("long", c.encrypt_name(&DIR_ID, &long).unwrap().into_bytes()),
                (
                    "symlink",
                    c.encrypt_symlink(&DIR_ID, b"../plates/AB-123-CD.jpg")
                        .into_bytes(),
                ),
                ("xattr-name", xattr.into_bytes()),
                (
                    "xattr-value",
                    c.encrypt_xattr_value(&XATTR_OWNER, XATTR_STORED_NAME, b"face at 00:13"),
                ),
                (
                    "internal",
                    name::sidecar_of(&name::long_name_of("x")).into_bytes(),
                ),
            ]
        }
        "block" => {
            let seed = |flags: u8, index: u64, size: u64, record: Vec<u8>| {
                let mut v = vec![flags];
                v.extend(index.to_le_bytes());
                v.extend(size.to_le_bytes());
                v.extend(record);
                v
            };
            let text: Vec<u8> = b"kmsfs block seed ".iter().cycle().take(300).copied().collect();
            vec![
                ("final", seed(1, 0, 1, zero_nonce_record(0, true, b"x"))),
                (
                    "final-300",
                    seed(1, 7, 7 * 65536 + 300, zero_nonce_record(7, true, &text)),
                ),
                (
                    "middle",
                    seed(0, 2, 3 * 65536, zero_nonce_record(2, false, &text[..200])),
                ),
                (
                    "hole",
                    seed(0, 1, HEADER_LEN + 2 * (65536 + RECORD_OVERHEAD), vec![0; 64]),
                ),
                // Flags 0b10 and 0b1_0000: 4 KiB and 1 MiB blocks.
                (
                    "final-4k",
                    seed(3, 9, 9 * 4096 + 300, zero_nonce_record(9, true, &text)),
                ),
                (
                    "middle-1m",
                    seed(16, 2, 3 << 20, zero_nonce_record(2, false, &text[..200])),
                ),
                ("extremes", seed(0, u64::MAX, u64::MAX, Vec::new())),
            ]
        }
        "kmip" => {
            use messages::tag;
            let data = |b: &[u8]| Item::new(tag::DATA, Value::ByteString(b.to_vec().into()));
            let state = Item::structure(
                tag::ATTRIBUTE,
                vec![
                    Item::new(tag::ATTRIBUTE_NAME, Value::TextString("State".into())),
                    Item::new(tag::ATTRIBUTE_VALUE, Value::Enumeration(2)),
                ],
            );
            let encrypted = vec![
                Item::new(tag::UNIQUE_IDENTIFIER, Value::TextString("1".into())),
                data(&[0x33; 32]),
                Item::new(tag::AEAD_TAG, Value::ByteString(vec![0x44; 16].into())),
            ];
            let request = |r: Request| {
                ttlv::encode(&messages::request_message(vec![r]))
                    .unwrap()
                    .to_vec()
            };
            let wrapped = Wrapped {
                key_id: "1".into(),
                iv: [1; 12],
                tag: [2; 16],
                ciphertext: [3; 32],
            };
            let mut all_types = vec![
                Item::new(Tag(0x420001), Value::LongInteger(-1)),
                Item::new(Tag(0x420002), Value::BigInteger(vec![0xff; 16])),
                Item::new(Tag(0x420003), Value::Boolean(true)),
                Item::new(Tag(0x420004), Value::DateTime(1_700_000_000)),
                Item::new(Tag(0x420005), Value::Interval(86400)),
                Item::new(Tag(0x420006), Value::DateTimeExtended(1)),
            ];
            all_types.push(Item::structure(Tag(0x420007), vec![]));
            vec![
                (
                    "decrypted",
                    kmip_response(vec![(0, 0, vec![data(&[0x24; 32])]), (1, 1, vec![])]),
                ),
                ("encrypted", kmip_response(vec![(0, 0, encrypted)])),
                ("state", kmip_response(vec![(0, 0, vec![state])])),
                (
                    "decrypt-request",
                    request(messages::decrypt("1", &[3; 32], &[1; 12], &[9; 32], &[2; 16])),
                ),
                ("wrapped", wrapped.encode().unwrap()),
                (
                    "all-types",
                    ttlv::encode(&Item::structure(Tag(0x420000), all_types))
                        .unwrap()
                        .to_vec(),
                ),
            ]
        }
        _ => panic!("no fuzz target {target:?}"),
    }
}
