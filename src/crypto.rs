//! The only module that touches the cipher and the key derivation.
//!
//! Everything here is pure computation over byte slices: which bytes are authenticated (the
//! associated data) and where records live is decided by `format`, not here. Key material lives
//! in types that wipe themselves on drop and never print their contents.
//!
//! **Where key bytes may be.** A key's bytes live in one heap allocation, made when the key is
//! made and wiped when it is dropped ([`SecretKey`]); an expanded key schedule (which for
//! AES-256 with AES instructions begins with the key itself) lives in one heap allocation too,
//! wiped on drop by the cipher crate ([`Aead`]). Moving either moves a pointer, never the key:
//! a Rust move is a copy, and a key returned by value would leave its bytes in the stack slot
//! it came from. What the cipher and KDF crates put in their own locals while they work (the
//! HKDF PRK and HMAC states, the IKM block, AES round keys broadcast for VAES, per-record
//! subkeys) they do not wipe: every call that handles key material runs through [`scrubbed`],
//! which overwrites the stack those calls used once they return.

use aes_gcm_siv::Aes256GcmSiv;
use aes_gcm_siv::aead::inout::InOutBuf;
use aes_gcm_siv::aead::{AeadInOut, KeyInit};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Length of every symmetric key we handle (AES-256).
pub const KEY_LEN: usize = 32;
/// AES-GCM-SIV nonce length.
pub const NONCE_LEN: usize = 12;
/// AES-GCM-SIV tag length.
pub const TAG_LEN: usize = 16;

/// Bytes of stack [`scrubbed`] overwrites below its caller: at least twice the deepest call
/// tree it wraps (HKDF, an AES key expansion, one AES-GCM-SIV record). Sealing a record takes
/// 11 KiB of stack where the `aes` crate picks its VAES-512 backend (AVX-512 machines), a few
/// KiB elsewhere: `scrub_len_covers_every_call_it_wraps` measures it on the machine it runs on.
const SCRUB_LEN: usize = 32 * 1024;

/// The ciphertext did not authenticate: wrong key, wrong context, or altered bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthError;

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("authentication failed")
    }
}

/// Fills `buf` from the operating system's CSPRNG.
///
/// A failing RNG is not something we can work around or continue past: every nonce and every
/// key would be suspect. The kernel's getrandom(2) does not fail once the pool is initialised.
pub fn fill_random(buf: &mut [u8]) {
    getrandom::fill(buf).expect("the OS random number generator failed");
}

/// Runs `f`, then overwrites with zeros the stack that `f` and everything it called used.
///
/// For calls into code that leaves key material in its locals and does not wipe it (the
/// cipher, HKDF, a base64 decoder handed a key). `f` runs in a frame of its own just below
/// the caller's; once it returns, [`SCRUB_LEN`] bytes from there down are zeroed (stores the
/// compiler keeps: an assembly barrier reads them). The caller's own frame is not touched, so
/// `f` must hand back nothing secret by value: key bytes go to the heap (a [`SecretKey`], a
/// `Zeroizing` buffer) through a reference or a pointer.
///
/// Nested calls do not scrub: the outermost one does, once, after all of them. A request that
/// opens or seals many records wraps its loop in one `scrubbed` (the stack its records' calls
/// used is the same few KiB each time), so a 1 MiB request on a volume of 4 KiB blocks zeroes
/// 32 KiB of stack once rather than 256 times. What the outer call wraps must then fit in
/// [`SCRUB_LEN`] too: a loop over records and the calls down to the cipher, a few hundred
/// bytes above a single record's call.
pub fn scrubbed<R>(f: impl FnOnce() -> R) -> R {
    if SCRUBBING.with(|s| s.replace(true)) {
        // In a frame of its own all the same: the depth `scrub_len_covers_every_call_it_wraps`
        // measures is the depth each call has here too.
        return run_below(f);
    }
    // Reset however `f` ends, so that a panic caught further up cannot leave this thread
    // believing an outer call will scrub for it.
    struct Outermost;
    impl Drop for Outermost {
        fn drop(&mut self) {
            SCRUBBING.with(|s| s.set(false));
        }
    }
    let outermost = Outermost;
    let r = run_below(f);
    // In a frame of its own (never inlined) that starts where `run_below`'s did: one memset
    // of SCRUB_LEN bytes, kept by an assembly barrier that reads them. `Zeroize` on an array
    // stores word by word, volatile: 1.2 µs per 32 KiB here, against 0.24.
    zeroize::zeroize_stack::<SCRUB_LEN>();
    drop(outermost);
    r
}

thread_local! {
    /// Whether this thread is inside a [`scrubbed`] call, which will scrub when it returns.
    static SCRUBBING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A frame of its own, so that whatever `f` leaves on the stack is below [`scrubbed`]'s
/// caller, where the scrub reaches.
#[inline(never)]
fn run_below<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// A 256-bit secret: a data key (DEK), a key-encryption key, or a derived subkey.
///
/// Its bytes live in one heap allocation for its whole life, filled in place and wiped on
/// drop, so that moving a key (returning it, sending it, storing it) never copies it. `Debug`
/// shows only that it is a key.
pub struct SecretKey(Box<[u8; KEY_LEN]>);

impl SecretKey {
    /// All zeros, on the heap: the constructors fill it in place.
    fn zeroed() -> Self {
        SecretKey(Box::new([0u8; KEY_LEN]))
    }

    /// A fresh random key.
    pub fn generate() -> Self {
        let mut k = Self::zeroed();
        fill_random(k.0.as_mut_slice());
        k
    }

    /// Copies key bytes from a slice; `None` unless it is exactly [`KEY_LEN`] long.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != KEY_LEN {
            return None;
        }
        let mut k = Self::zeroed();
        k.0.copy_from_slice(bytes);
        Some(k)
    }

    /// The raw key bytes, for wrapping and for the keystore file only.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// HKDF-SHA256 (RFC 5869): a subkey for one purpose, bound to `salt`.
    pub fn derive(&self, salt: &[u8], info: &[u8]) -> SecretKey {
        let mut out = Self::zeroed();
        scrubbed(|| hkdf_sha256(&self.0, salt, info, &mut out.0));
        out
    }
}

/// One HKDF-SHA256 output block, written straight into `okm`. Call it through [`scrubbed`]:
/// the IKM block hkdf buffers, the PRK it returns by value and the HMAC states keyed with the
/// PRK are all locals of this call and of hkdf's (the `Hkdf` type does not wipe them, and
/// sha2 is built without its `zeroize` feature); the PRK is also wiped here explicitly.
fn hkdf_sha256(ikm: &[u8; KEY_LEN], salt: &[u8], info: &[u8], okm: &mut [u8; KEY_LEN]) {
    let (mut prk, hk) = Hkdf::<Sha256>::extract(Some(salt), ikm);
    prk.as_mut_slice().zeroize();
    // 32 bytes is far below HKDF-SHA256's 255 * 32 byte limit: this cannot fail.
    hk.expand(info, okm)
        .expect("HKDF output of 32 bytes is always valid");
}

impl Clone for SecretKey {
    /// Heap to heap: the copy never passes through the stack.
    fn clone(&self) -> Self {
        let mut k = Self::zeroed();
        k.0.copy_from_slice(self.0.as_slice());
        k
    }
}

impl Zeroize for SecretKey {
    fn zeroize(&mut self) {
        self.0.as_mut_slice().zeroize();
    }
}

impl Drop for SecretKey {
    fn drop(&mut self) {
        self.zeroize();
    }
}

impl ZeroizeOnDrop for SecretKey {}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

/// An AES-256-GCM-SIV instance with its expanded key schedule, on the heap (so a move never
/// copies it) and wiped on drop by the cipher crate (`aes`, feature `zeroize`).
///
/// Every operation runs through [`scrubbed`]: with AES instructions the crate copies the
/// round keys (which begin with the key) into its locals for each call (broadcast to both
/// lanes for VAES), and derives per-record subkeys there, none of which it wipes.
pub struct Aead {
    cipher: Box<Aes256GcmSiv>,
}

impl std::fmt::Debug for Aead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Aead(..)")
    }
}

impl Aead {
    pub fn new(key: &SecretKey) -> Self {
        // The key schedule is built on the stack and moved to the heap: scrubbed.
        let cipher = scrubbed(|| Box::new(<Aes256GcmSiv as KeyInit>::new(key.expose().into())));
        Aead { cipher }
    }

    /// Seals `record[NONCE_LEN .. len - TAG_LEN]` in place with a fresh random nonce.
    ///
    /// `record` is laid out `nonce ‖ plaintext ‖ tag`: the caller copies the plaintext into the
    /// middle, and this fills in the nonce and the tag. One buffer, no extra copy.
    pub fn seal_record(&self, aad: &[u8], record: &mut [u8]) {
        self.seal_into(aad, None, record);
    }

    /// [`Aead::seal_record`] with the plaintext read from `plain` rather than from the
    /// record's middle, which it is encrypted into (whatever the middle held is overwritten):
    /// one pass over the data instead of a copy and then the cipher. `record` must be
    /// `NONCE_LEN + plain.len() + TAG_LEN` long.
    pub fn seal_record_from(&self, aad: &[u8], plain: &[u8], record: &mut [u8]) {
        self.seal_into(aad, Some(plain), record);
    }

    fn seal_into(&self, aad: &[u8], plain: Option<&[u8]>, record: &mut [u8]) {
        assert!(record.len() >= NONCE_LEN + TAG_LEN, "record too short");
        let (nonce, rest) = record.split_at_mut(NONCE_LEN);
        fill_random(nonce);
        let body_len = rest.len() - TAG_LEN;
        let (body, tag) = rest.split_at_mut(body_len);
        let nonce: [u8; NONCE_LEN] = (&*nonce).try_into().expect("split at NONCE_LEN");
        let buffer = match plain {
            None => body.into(),
            Some(p) => InOutBuf::new(p, body).expect("record sized for its plaintext"),
        };
        let t = scrubbed(|| self.cipher.encrypt_inout_detached((&nonce).into(), aad, buffer))
            // GCM-SIV only refuses messages longer than 2^36 bytes; ours are at most 1 MiB.
            .expect("AES-GCM-SIV input within limits");
        tag.copy_from_slice(&t);
    }

    /// Opens a `nonce ‖ ciphertext ‖ tag` record in place; on success the plaintext is
    /// `record[NONCE_LEN .. len - TAG_LEN]`. On failure the record is as it was: aes-gcm-siv
    /// re-encrypts the buffer when the tag does not match (so no unauthenticated plaintext is
    /// left behind), and the format's record rules rely on that to try a record twice
    /// without reading it again (`failed_open_leaves_the_record_intact` pins it).
    pub fn open_record(&self, aad: &[u8], record: &mut [u8]) -> Result<(), AuthError> {
        if record.len() < NONCE_LEN + TAG_LEN {
            return Err(AuthError);
        }
        let (nonce, rest) = record.split_at_mut(NONCE_LEN);
        let body_len = rest.len() - TAG_LEN;
        let (body, tag) = rest.split_at_mut(body_len);
        let tag: &[u8; TAG_LEN] = (&*tag).try_into().map_err(|_| AuthError)?;
        let nonce: [u8; NONCE_LEN] = (&*nonce).try_into().map_err(|_| AuthError)?;
        scrubbed(|| {
            self.cipher
                .decrypt_inout_detached((&nonce).into(), aad, body.into(), tag.into())
        })
        .map_err(|_| AuthError)
    }

    /// Allocating convenience: `nonce ‖ ciphertext ‖ tag` of `plaintext`.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut rec = vec![0u8; NONCE_LEN + plaintext.len() + TAG_LEN];
        rec[NONCE_LEN..NONCE_LEN + plaintext.len()].copy_from_slice(plaintext);
        self.seal_record(aad, &mut rec);
        rec
    }

    /// Allocating convenience: the plaintext of a sealed record, in a zeroizing buffer (one
    /// buffer: opened in place, then the nonce cut off the front; the bytes that leaves in the
    /// spare capacity are wiped with it).
    pub fn open(&self, aad: &[u8], record: &[u8]) -> Result<zeroize::Zeroizing<Vec<u8>>, AuthError> {
        let mut buf = zeroize::Zeroizing::new(record.to_vec());
        self.open_record(aad, &mut buf)?;
        let end = buf.len() - TAG_LEN;
        buf.truncate(end);
        buf.drain(..NONCE_LEN);
        Ok(buf)
    }
}

impl Aead {
    /// Deterministic sealing (no nonce stored): `ciphertext ‖ tag` under an all-zero nonce.
    ///
    /// Only for small values that must encrypt the same way every time (file names, so a
    /// lookup can compute the backing name). AES-GCM-SIV is built for this: with a repeated
    /// nonce it reveals only whether two plaintexts under the same associated data are equal.
    pub fn seal_deterministic(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(plaintext.len() + TAG_LEN);
        out.extend_from_slice(plaintext);
        let nonce = [0u8; NONCE_LEN];
        let tag = scrubbed(|| {
            self.cipher
                .encrypt_inout_detached((&nonce).into(), aad, out.as_mut_slice().into())
        })
        .expect("AES-GCM-SIV input within limits");
        out.extend_from_slice(&tag);
        out
    }

    /// Opens a value sealed by [`Aead::seal_deterministic`].
    pub fn open_deterministic(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, AuthError> {
        if sealed.len() < TAG_LEN {
            return Err(AuthError);
        }
        let (ct, tag) = sealed.split_at(sealed.len() - TAG_LEN);
        let tag: &[u8; TAG_LEN] = tag.try_into().map_err(|_| AuthError)?;
        let mut out = ct.to_vec();
        let nonce = [0u8; NONCE_LEN];
        scrubbed(|| {
            self.cipher
                .decrypt_inout_detached((&nonce).into(), aad, out.as_mut_slice().into(), tag.into())
        })
        .map_err(|_| AuthError)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_tamper() {
        let key = SecretKey::generate();
        let a = Aead::new(&key);
        for len in [0usize, 1, 100, 65536] {
            let pt: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let rec = a.seal(b"aad", &pt);
            assert_eq!(rec.len(), len + NONCE_LEN + TAG_LEN);
            assert_eq!(&a.open(b"aad", &rec).unwrap()[..], &pt[..]);
            assert!(a.open(b"aae", &rec).is_err());
            for pos in [0, NONCE_LEN, rec.len() - 1] {
                let mut bad = rec.clone();
                bad[pos] ^= 1;
                assert!(a.open(b"aad", &bad).is_err());
            }
        }
    }

    /// RFC 8452, appendix C.2 (AEAD_AES_256_GCM_SIV), through our record layout.
    #[test]
    fn rfc8452_known_answers() {
        let mut key = [0u8; 32];
        key[0] = 1;
        let a = Aead::new(&SecretKey::from_slice(&key).unwrap());
        let mut nonce = [0u8; NONCE_LEN];
        nonce[0] = 3;
        let vectors: [(&[u8], &[u8]); 2] = [
            (
                b"",
                &crate::hex::decode("07f5f4169bbf55a8400cd47ea6fd400f").unwrap(),
            ),
            (
                &[1, 0, 0, 0, 0, 0, 0, 0],
                &crate::hex::decode("c2ef328e5c71c83b843122130f7364b761e0b97427e3df28").unwrap(),
            ),
        ];
        for (plaintext, expected) in vectors {
            let mut record = nonce.to_vec();
            record.extend_from_slice(expected);
            a.open_record(b"", &mut record).expect("known answer opens");
            assert_eq!(&record[NONCE_LEN..record.len() - TAG_LEN], plaintext);
        }
    }

    #[test]
    fn deterministic_sealing_is_deterministic_and_bound() {
        let a = Aead::new(&SecretKey::generate());
        let x = a.seal_deterministic(b"dir1", b"name");
        assert_eq!(x, a.seal_deterministic(b"dir1", b"name"));
        assert_ne!(x, a.seal_deterministic(b"dir2", b"name"));
        assert_eq!(a.open_deterministic(b"dir1", &x).unwrap(), b"name");
        assert!(a.open_deterministic(b"dir2", &x).is_err());
        assert!(a.open_deterministic(b"dir1", &x[..10]).is_err());
    }

    /// `format::block::ContentCipher::open_block` retries a record under another
    /// associated data without reading it again: this holds only while a failed open leaves
    /// the buffer as it was. A cipher update that changes that must fail here.
    #[test]
    fn failed_open_leaves_the_record_intact() {
        let a = Aead::new(&SecretKey::generate());
        for len in [0usize, 1, 15, 16, 17, 4096, 65536] {
            let pt: Vec<u8> = (0..len).map(|i| (i * 7 + 1) as u8).collect();
            let rec = a.seal(b"right", &pt);
            let mut buf = rec.clone();
            assert!(a.open_record(b"wrong", &mut buf).is_err());
            assert_eq!(buf, rec, "len {len}: a failed open changed the record");
            let mut tampered = rec.clone();
            *tampered.last_mut().unwrap() ^= 1;
            let before = tampered.clone();
            assert!(a.open_record(b"right", &mut tampered).is_err());
            assert_eq!(tampered, before, "len {len}: a failed open changed the record");
            a.open_record(b"right", &mut buf)
                .expect("the untouched record still opens");
            assert_eq!(&buf[NONCE_LEN..buf.len() - TAG_LEN], &pt[..]);
        }
    }

    /// Sealing from a separate plaintext buffer gives a record that opens like one sealed in
    /// place, whatever the record's middle held before.
    #[test]
    fn sealing_from_a_buffer_matches_sealing_in_place() {
        let a = Aead::new(&SecretKey::generate());
        for len in [0usize, 1, 15, 16, 17, 4096, 65536] {
            let pt: Vec<u8> = (0..len).map(|i| (i * 7 + 1) as u8).collect();
            let mut rec = vec![0xa5u8; NONCE_LEN + len + TAG_LEN];
            a.seal_record_from(b"ad", &pt, &mut rec);
            if len > 0 {
                assert_ne!(
                    &rec[NONCE_LEN..NONCE_LEN + len],
                    &pt[..],
                    "len {len}: not encrypted"
                );
            }
            let opened = a.open(b"ad", &rec).expect("opens");
            assert_eq!(&opened[..], &pt[..], "len {len}");
            assert!(a.open(b"other", &rec).is_err());
        }
    }

    #[test]
    fn nonces_are_fresh() {
        let a = Aead::new(&SecretKey::generate());
        assert_ne!(a.seal(b"", b"same"), a.seal(b"", b"same"));
    }

    #[test]
    fn derive_separates_purposes_and_salts() {
        let k = SecretKey::generate();
        let a = k.derive(b"salt", b"one");
        assert_eq!(a.expose(), k.derive(b"salt", b"one").expose());
        assert_ne!(a.expose(), k.derive(b"salt", b"two").expose());
        assert_ne!(a.expose(), k.derive(b"tlas", b"one").expose());
    }

    #[test]
    fn clones_and_derived_keys_are_independent_heap_copies() {
        let k = SecretKey::generate();
        let c = k.clone();
        assert_eq!(k.expose(), c.expose());
        assert_ne!(k.expose().as_ptr(), c.expose().as_ptr());
        let mut z = c.clone();
        z.zeroize();
        assert_eq!(z.expose(), &[0u8; KEY_LEN]);
        assert_eq!(k.expose(), c.expose(), "zeroizing a clone leaves the original");
    }

    /// `derive` is HKDF-SHA256 extract-then-expand (RFC 5869; appendix A.1's salt and info),
    /// whatever the PRK wiping and the scrub do around it.
    #[test]
    fn derive_matches_rfc5869() {
        let ikm = [0x0bu8; 22];
        // `derive` takes a 32-byte key: the RFC's IKM padded with zeros.
        let salt = crate::hex::decode("000102030405060708090a0b0c").unwrap();
        let info = crate::hex::decode("f0f1f2f3f4f5f6f7f8f9").unwrap();
        let mut okm = [0u8; KEY_LEN];
        let mut ikm32 = [0u8; KEY_LEN];
        ikm32[..22].copy_from_slice(&ikm);
        hkdf_sha256(&ikm32, &salt, &info, &mut okm);
        let expected = {
            let mut out = [0u8; KEY_LEN];
            Hkdf::<Sha256>::new(Some(&salt), &ikm32)
                .expand(&info, &mut out)
                .unwrap();
            out
        };
        assert_eq!(okm, expected);
        let k = SecretKey::from_slice(&ikm32).unwrap();
        assert_eq!(k.derive(&salt, &info).expose(), &expected);
        // And the RFC's own 22-byte IKM, to pin that hkdf itself is RFC 5869.
        let mut rfc = [0u8; 42];
        Hkdf::<Sha256>::new(Some(&salt), &ikm)
            .expand(&info, &mut rfc)
            .unwrap();
        assert_eq!(
            crate::hex::encode(&rfc),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
        );
    }

    #[test]
    fn open_returns_exactly_the_plaintext() {
        let a = Aead::new(&SecretKey::generate());
        for len in [0usize, 1, 32, 1000] {
            let pt: Vec<u8> = (0..len).map(|i| (i * 3) as u8).collect();
            let out = a.open(b"x", &a.seal(b"x", &pt)).unwrap();
            assert_eq!(&out[..], &pt[..]);
        }
    }

    /// The pattern [`stack_below`] paints the stack with.
    const PAINT: u64 = 0xA55A_3CC3_5AA5_C33C;
    /// How far below its caller [`stack_below`] looks.
    const SPAN: usize = 64 * 1024;

    #[inline(never)]
    fn paint() {
        let mut area = [PAINT; SPAN / 8 + 64];
        let _ = std::hint::black_box(&mut area);
    }

    /// Runs `f` where [`scrubbed`] runs its closure, on a stack painted beforehand, and
    /// returns the `SPAN` bytes below the caller as they are afterwards (`None` where
    /// /proc/self/mem cannot show them).
    #[inline(never)]
    fn stack_below(f: impl FnOnce()) -> Option<Vec<u8>> {
        let mut marker = 0u8;
        // Word-aligned, as the paint is.
        let top = (std::hint::black_box(&mut marker) as *mut u8 as u64) & !7;
        paint();
        run_below(f);
        let mut below = vec![0u8; SPAN];
        let mem = std::fs::File::open("/proc/self/mem").ok()?;
        std::os::unix::fs::FileExt::read_exact_at(&mem, &mut below, top - SPAN as u64).ok()?;
        Some(below)
    }

    /// Whether either 16-byte half of `key` is in `mem`. Not the 32 bytes whole: an AES-256
    /// schedule's first two round keys are the key's halves, and the VAES-512 backend stores
    /// each one repeated across a 64-byte register, so the whole key never sits contiguous
    /// (a search for it passed with no scrubbing at all).
    fn holds_key_half(mem: &[u8], key: &SecretKey) -> bool {
        let (a, b) = key.expose().split_at(KEY_LEN / 2);
        mem.windows(KEY_LEN / 2).any(|w| w == a || w == b)
    }

    /// How deep below its caller `f` used the stack: the deepest word no longer painted.
    fn depth_of(f: impl FnOnce()) -> Option<usize> {
        let below = stack_below(f)?;
        let untouched = below.chunks(8).take_while(|w| *w == PAINT.to_ne_bytes()).count();
        Some(SPAN - untouched * 8)
    }

    /// `SCRUB_LEN` is measured, not guessed: every call `scrubbed` wraps stays well inside it
    /// (the measure includes reading /proc/self/mem, an upper bound). A crate update that
    /// makes them deeper fails here.
    #[test]
    fn scrub_len_covers_every_call_it_wraps() {
        let key = SecretKey::generate();
        let aead = Aead::new(&key);
        let mut record = vec![7u8; NONCE_LEN + 65536 + TAG_LEN];
        let mut okm = [0u8; KEY_LEN];
        let depths = [
            (
                "key schedule",
                depth_of(|| {
                    let _ =
                        std::hint::black_box(Box::new(<Aes256GcmSiv as KeyInit>::new(key.expose().into())));
                }),
            ),
            (
                "hkdf",
                depth_of(|| hkdf_sha256(key.expose(), b"salt", b"info", &mut okm)),
            ),
            (
                "seal 64 KiB",
                depth_of(|| {
                    let (_, body) = record.split_at_mut(NONCE_LEN);
                    let body = &mut body[..65536];
                    std::hint::black_box(aead.cipher.encrypt_inout_detached(
                        (&[1u8; NONCE_LEN]).into(),
                        b"aad",
                        body.into(),
                    ))
                    .unwrap();
                }),
            ),
            (
                "open 64 KiB",
                depth_of(|| {
                    let (_, body) = record.split_at_mut(NONCE_LEN);
                    let body = &mut body[..65536];
                    let _ = std::hint::black_box(aead.cipher.decrypt_inout_detached(
                        (&[1u8; NONCE_LEN]).into(),
                        b"aad",
                        body.into(),
                        (&[0u8; TAG_LEN]).into(),
                    ));
                }),
            ),
        ];
        for (what, depth) in depths {
            let Some(depth) = depth else {
                eprintln!("/proc/self/mem cannot show this thread's stack: skipped");
                return;
            };
            eprintln!("{what}: {depth} bytes of stack");
            assert!(depth * 2 <= SCRUB_LEN, "{what} uses {depth} bytes of stack");
        }
    }

    /// After the calls that build and use a key schedule, no copy of the key is left on the
    /// stack below (with AES instructions the schedule, and each call's copy of it, begins
    /// with the key itself).
    #[test]
    fn scrubbed_calls_leave_no_key_on_the_stack() {
        let key = SecretKey::generate();
        let mut sealed = Vec::new();
        let below = stack_below(|| {
            let aead = Aead::new(&key);
            let mut record = vec![7u8; NONCE_LEN + 1000 + TAG_LEN];
            aead.seal_record(b"aad", &mut record);
            aead.open_record(b"aad", &mut record).unwrap();
            sealed = aead.seal_deterministic(b"aad", b"name");
            aead.open_deterministic(b"aad", &sealed).unwrap();
            let _ = key.derive(b"salt", b"info");
        });
        let Some(below) = below else {
            eprintln!("/proc/self/mem cannot show this thread's stack: skipped");
            return;
        };
        assert!(!holds_key_half(&below, &key), "the key was left on the stack");
    }

    /// Calls nested in one `scrubbed` leave nothing either: they do not scrub, the outer call
    /// does, once, after all of them (as a request's run of records does).
    #[test]
    fn nested_scrubbed_calls_leave_no_key_on_the_stack() {
        let key = SecretKey::generate();
        let mut records = vec![vec![7u8; NONCE_LEN + 4096 + TAG_LEN]; 16];
        let below = stack_below(|| {
            scrubbed(|| {
                let aead = Aead::new(&key);
                for r in records.iter_mut() {
                    aead.seal_record(b"aad", r);
                    aead.open_record(b"aad", r).unwrap();
                }
                // Last, a call that leaves a copy of the key's schedule where the calls
                // above would overwrite it (so the test fails without the outer scrub).
                let _ = Aead::new(&key);
            })
        });
        let Some(below) = below else {
            eprintln!("/proc/self/mem cannot show this thread's stack: skipped");
            return;
        };
        assert!(!holds_key_half(&below, &key), "the key was left on the stack");
        assert!(!SCRUBBING.with(|s| s.get()), "the outer call ended its scope");
    }

    /// The scope ends with a panic too: later calls on the thread scrub again.
    #[test]
    fn a_panic_inside_scrubbed_ends_its_scope() {
        let r = std::panic::catch_unwind(|| scrubbed(|| panic!("inside")));
        assert!(r.is_err());
        assert!(!SCRUBBING.with(|s| s.get()));
    }

    #[test]
    fn debug_never_prints_key_bytes() {
        let k = SecretKey::from_slice(&[0xAB; 32]).unwrap();
        assert_eq!(format!("{k:?}"), "SecretKey(..)");
    }
}
