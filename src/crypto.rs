//! The only module that touches the cipher and the key derivation.
//!
//! Everything here is pure computation over byte slices: which bytes are authenticated (the
//! associated data) and where records live is decided by `format`, not here. Key material lives
//! in types that wipe themselves on drop and never print their contents.

use aes_gcm_siv::Aes256GcmSiv;
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

/// A 256-bit secret: a data key (DEK), a key-encryption key, or a derived subkey.
///
/// Wiped on drop; `Debug` shows only that it is a key.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SecretKey([u8; KEY_LEN]);

impl SecretKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut k = SecretKey([0u8; KEY_LEN]);
        fill_random(&mut k.0);
        k
    }

    /// Copies key bytes from a slice; `None` unless it is exactly [`KEY_LEN`] long.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != KEY_LEN {
            return None;
        }
        // Copied straight into the wiping type: no stray copy of the key on the stack.
        let mut k = SecretKey([0u8; KEY_LEN]);
        k.0.copy_from_slice(bytes);
        Some(k)
    }

    /// The raw key bytes, for wrapping and for the keystore file only.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// HKDF-SHA256 (RFC 5869): a subkey for one purpose, bound to `salt`.
    pub fn derive(&self, salt: &[u8], info: &[u8]) -> SecretKey {
        let hk = Hkdf::<Sha256>::new(Some(salt), &self.0);
        let mut out = SecretKey([0u8; KEY_LEN]);
        // 32 bytes is far below HKDF-SHA256's 255 * 32 byte limit: this cannot fail.
        hk.expand(info, &mut out.0)
            .expect("HKDF output of 32 bytes is always valid");
        out
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

/// An AES-256-GCM-SIV instance with its expanded key schedule (wiped on drop by the cipher crate).
pub struct Aead {
    cipher: Aes256GcmSiv,
}

impl std::fmt::Debug for Aead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Aead(..)")
    }
}

impl Aead {
    pub fn new(key: &SecretKey) -> Self {
        let cipher = Aes256GcmSiv::new_from_slice(key.expose()).expect("AES-256-GCM-SIV takes a 32-byte key");
        Aead { cipher }
    }

    /// Seals `record[NONCE_LEN .. len - TAG_LEN]` in place with a fresh random nonce.
    ///
    /// `record` is laid out `nonce ‖ plaintext ‖ tag`: the caller copies the plaintext into the
    /// middle, and this fills in the nonce and the tag. One buffer, no extra copy.
    pub fn seal_record(&self, aad: &[u8], record: &mut [u8]) {
        assert!(record.len() >= NONCE_LEN + TAG_LEN, "record too short");
        let (nonce, rest) = record.split_at_mut(NONCE_LEN);
        fill_random(nonce);
        let body_len = rest.len() - TAG_LEN;
        let (body, tag) = rest.split_at_mut(body_len);
        let nonce: [u8; NONCE_LEN] = (&*nonce).try_into().expect("split at NONCE_LEN");
        let t = self
            .cipher
            .encrypt_inout_detached((&nonce).into(), aad, body.into())
            // GCM-SIV only refuses messages longer than 2^36 bytes; ours are at most 64 KiB.
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
        self.cipher
            .decrypt_inout_detached((&nonce).into(), aad, body.into(), tag.into())
            .map_err(|_| AuthError)
    }

    /// Allocating convenience: `nonce ‖ ciphertext ‖ tag` of `plaintext`.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut rec = vec![0u8; NONCE_LEN + plaintext.len() + TAG_LEN];
        rec[NONCE_LEN..NONCE_LEN + plaintext.len()].copy_from_slice(plaintext);
        self.seal_record(aad, &mut rec);
        rec
    }

    /// Allocating convenience: the plaintext of a sealed record, in a zeroizing buffer.
    pub fn open(&self, aad: &[u8], record: &[u8]) -> Result<zeroize::Zeroizing<Vec<u8>>, AuthError> {
        let mut buf = zeroize::Zeroizing::new(record.to_vec());
        self.open_record(aad, &mut buf)?;
        let end = buf.len() - TAG_LEN;
        Ok(zeroize::Zeroizing::new(buf[NONCE_LEN..end].to_vec()))
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
        let tag = self
            .cipher
            .encrypt_inout_detached((&nonce).into(), aad, out.as_mut_slice().into())
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
        self.cipher
            .decrypt_inout_detached((&nonce).into(), aad, out.as_mut_slice().into(), tag.into())
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
    fn debug_never_prints_key_bytes() {
        let k = SecretKey::from_slice(&[0xAB; 32]).unwrap();
        assert_eq!(format!("{k:?}"), "SecretKey(..)");
    }
}
