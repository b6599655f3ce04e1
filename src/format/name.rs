//! Encrypted names: how an entry name, a symlink target and an xattr are stored in the
//! backing directory. Pure: encodings, lengths, and the names kmsfs keeps for itself.
//!
//! ```text
//! backing name  = base64url(AES-256-GCM-SIV_det(name key, AAD = version ‖ "kmsfs v1 name" ‖ parent dir id, name))
//!                 if that is at most MAX_BACKING_NAME_LEN bytes, else
//!                 LONG_NAME_PREFIX ‖ base64url(SHA-256(full encoded name)), with the full encoded name
//!                 in the sidecar file <that> ‖ LONG_NAME_SIDECAR_SUFFIX
//! symlink       = base64url(nonce ‖ AES-256-GCM-SIV(symlink key, AAD = version ‖ "kmsfs v1 symlink" [‖ dir id], target) ‖ tag)
//! xattr value   = nonce ‖ AES-256-GCM-SIV(xattr value key, AAD = version ‖ "kmsfs v1 xattr value" [‖ owner] ‖ stored name, value) ‖ tag
//! ```
//!
//! The bracketed parts are volume format 2: a symlink target is bound to the directory that
//! holds the link and an xattr value to its file or directory, so neither reads as valid once
//! copied elsewhere by whoever controls the storage. (Format 1 bound them to the volume only.)

use super::{FILE_ID_LEN, FileId, RECORD_VERSION, VOLUME_FORMAT_V2};
use crate::crypto::{Aead, NONCE_LEN, SecretKey, TAG_LEN};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use sha2::{Digest, Sha256};

/// Length of a directory id.
pub use super::DIR_ID_LEN;
/// File holding a directory's id, inside that directory.
pub const DIR_ID_FILE: &str = ".kmsfs.dirid";
/// Prefix of a directory being created (made, given its id, then renamed into place).
pub const TEMP_PREFIX: &str = ".kmsfs.tmp.";
/// Prefix of an entry whose encrypted name is too long to be a backing name.
pub const LONG_NAME_PREFIX: &str = "kmsfs.long.";
/// Suffix of the sidecar file that holds a long entry's full encrypted name.
pub const LONG_NAME_SIDECAR_SUFFIX: &str = ".name";
/// Longest plaintext name (Linux NAME_MAX).
pub const MAX_NAME_LEN: usize = 255;
/// Longest backing name most filesystems accept.
pub const MAX_BACKING_NAME_LEN: usize = 255;
/// Longest name that still fits a short backing name: base64url(name + 16) <= 255.
pub const MAX_SHORT_NAME_LEN: usize = MAX_BACKING_NAME_LEN * 3 / 4 - TAG_LEN;
/// Largest sidecar we read: the encoding of a 255-byte name.
pub const MAX_SIDECAR_LEN: usize = (MAX_NAME_LEN + TAG_LEN).div_ceil(3) * 4;

/// HKDF info strings for the subkeys of the volume name key (salt: the volume id).
pub const NAME_KEY_INFO: &[u8] = b"kmsfs v1 name key";
pub const SYMLINK_KEY_INFO: &[u8] = b"kmsfs v1 symlink key";
pub const XATTR_NAME_KEY_INFO: &[u8] = b"kmsfs v1 xattr name key";
pub const XATTR_VALUE_KEY_INFO: &[u8] = b"kmsfs v1 xattr value key";

/// Associated-data labels.
const NAME_AAD: &[u8] = b"kmsfs v1 name";
const SYMLINK_AAD: &[u8] = b"kmsfs v1 symlink";
const XATTR_NAME_AAD: &[u8] = b"kmsfs v1 xattr name";
const XATTR_VALUE_AAD: &[u8] = b"kmsfs v1 xattr value";

/// The `user.` xattr namespace, the only one whose names and values are stored (encrypted).
pub const XATTR_USER_PREFIX: &str = "user.";

/// A directory's random id: the associated data of every name in it.
pub type DirId = [u8; DIR_ID_LEN];

/// What a backing directory entry is.
#[derive(Debug, PartialEq, Eq)]
pub enum BackingEntry<'a> {
    /// kmsfs's own (directory id, temporary directory, lock, config, sidecar, fsck's
    /// lost+found): never listed.
    Internal,
    /// A long-name entry; its full encrypted name is in the sidecar.
    Long(&'a str),
    /// A short encrypted name.
    Short(&'a str),
}

/// Sorts a backing name into internal, long or short.
pub fn classify(backing: &[u8]) -> BackingEntry<'_> {
    let Ok(s) = std::str::from_utf8(backing) else {
        return BackingEntry::Short("");
    };
    // base64url never contains '.', so no encrypted name can look like one of ours.
    if s.starts_with('.') || s == super::config::CONFIG_FILE_NAME || s == super::config::LOST_FOUND_NAME {
        return BackingEntry::Internal;
    }
    if let Some(rest) = s.strip_prefix(LONG_NAME_PREFIX) {
        if rest.ends_with(LONG_NAME_SIDECAR_SUFFIX) {
            return BackingEntry::Internal;
        }
        return BackingEntry::Long(s);
    }
    BackingEntry::Short(s)
}

/// The backing name for an encoded encrypted name, and whether it needs a sidecar.
pub fn backing_name_for(encoded: &str) -> (String, bool) {
    if encoded.len() <= MAX_BACKING_NAME_LEN {
        (encoded.to_owned(), false)
    } else {
        (long_name_of(encoded), true)
    }
}

/// The fixed-length name a long encoded name is stored under.
pub fn long_name_of(encoded: &str) -> String {
    let digest = Sha256::digest(encoded.as_bytes());
    format!("{LONG_NAME_PREFIX}{}", B64.encode(digest))
}

/// The sidecar of a long-name entry.
pub fn sidecar_of(long_name: &str) -> String {
    format!("{long_name}{LONG_NAME_SIDECAR_SUFFIX}")
}

/// Plaintext length of a symlink target stored as `encoded_len` base64url characters.
pub const fn symlink_plain_len(encoded_len: u64) -> u64 {
    // Unpadded base64: 3 bytes per 4 characters, k * 3 / 4 for a last group of k (written so
    // that it cannot overflow).
    let bytes = encoded_len / 4 * 3 + encoded_len % 4 * 3 / 4;
    bytes.saturating_sub((NONCE_LEN + TAG_LEN) as u64)
}

/// Why a stored name or value does not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameError {
    Encoding,
    Auth,
    TooLong,
    Invalid,
}

/// The per-purpose ciphers derived from the volume name key. It holds no key bytes of its
/// own: each subkey is derived into a heap `SecretKey`, expanded into its cipher's heap key
/// schedule and wiped; the name key is the caller's to drop. Dropping a `NameCipher` wipes
/// the four key schedules (the cipher crate's `Drop`).
pub struct NameCipher {
    names: Aead,
    symlinks: Aead,
    xattr_names: Aead,
    xattr_values: Aead,
    /// Volume format 2: symlink targets and xattr values bound to where they are.
    bound: bool,
}

/// What an xattr value is bound to in volume format 2: the file or directory that has it.
/// (Linux allows `user.` attributes on these two kinds only.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XattrOwner {
    File(FileId),
    Dir(DirId),
}

impl XattrOwner {
    /// A kind byte, so that a file id can never stand for an equal directory id.
    fn encode(&self, aad: &mut Vec<u8>) {
        match self {
            XattrOwner::File(id) => {
                aad.push(b'f');
                aad.extend_from_slice(&id.0);
            }
            XattrOwner::Dir(id) => {
                aad.push(b'd');
                aad.extend_from_slice(id);
            }
        }
    }
}

const _: () = assert!(FILE_ID_LEN == DIR_ID_LEN);

impl std::fmt::Debug for NameCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NameCipher(..)")
    }
}

fn name_aad(label: &[u8], dir_id: &DirId) -> Vec<u8> {
    let mut aad = Vec::with_capacity(2 + label.len() + DIR_ID_LEN);
    aad.extend_from_slice(&RECORD_VERSION.to_be_bytes());
    aad.extend_from_slice(label);
    aad.extend_from_slice(dir_id);
    aad
}

fn label_aad(label: &[u8]) -> Vec<u8> {
    let mut aad = RECORD_VERSION.to_be_bytes().to_vec();
    aad.extend_from_slice(label);
    aad
}

/// A valid entry name: 1 to 255 bytes, no NUL, no '/', not "." or "..".
pub fn check_name(name: &[u8]) -> Result<(), NameError> {
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    if name.is_empty() || name == b"." || name == b".." || name.iter().any(|&b| b == 0 || b == b'/') {
        return Err(NameError::Invalid);
    }
    Ok(())
}

impl NameCipher {
    /// The name ciphers of a volume of format `format`.
    pub fn new(volume_name_key: &SecretKey, volume_id: &[u8], format: u16) -> Self {
        let sub = |info| {
            let key = volume_name_key.derive(volume_id, info);
            Aead::new(&key)
        };
        NameCipher {
            names: sub(NAME_KEY_INFO),
            symlinks: sub(SYMLINK_KEY_INFO),
            xattr_names: sub(XATTR_NAME_KEY_INFO),
            xattr_values: sub(XATTR_VALUE_KEY_INFO),
            bound: format >= VOLUME_FORMAT_V2,
        }
    }

    /// Whether symlink targets and xattr values are bound to where they are (format 2).
    pub fn binds_placement(&self) -> bool {
        self.bound
    }

    fn symlink_aad(&self, dir_id: &DirId) -> Vec<u8> {
        let mut aad = label_aad(SYMLINK_AAD);
        if self.bound {
            aad.extend_from_slice(dir_id);
        }
        aad
    }

    fn xattr_value_aad(&self, owner: &XattrOwner, stored_name: &str) -> Vec<u8> {
        let mut aad = label_aad(XATTR_VALUE_AAD);
        if self.bound {
            owner.encode(&mut aad);
        }
        aad.extend_from_slice(stored_name.as_bytes());
        aad
    }

    /// The encoded encrypted form of entry `name` in the directory `dir_id`.
    pub fn encrypt_name(&self, dir_id: &DirId, name: &[u8]) -> Result<String, NameError> {
        check_name(name)?;
        Ok(B64.encode(self.names.seal_deterministic(&name_aad(NAME_AAD, dir_id), name)))
    }

    /// The plaintext of an encoded encrypted name from directory `dir_id`.
    pub fn decrypt_name(&self, dir_id: &DirId, encoded: &str) -> Result<Vec<u8>, NameError> {
        if encoded.len() > MAX_SIDECAR_LEN {
            return Err(NameError::TooLong);
        }
        let sealed = B64.decode(encoded).map_err(|_| NameError::Encoding)?;
        let name = self
            .names
            .open_deterministic(&name_aad(NAME_AAD, dir_id), &sealed)
            .map_err(|_| NameError::Auth)?;
        check_name(&name)?;
        Ok(name)
    }

    /// The stored form of a symlink target, for a link in the directory `dir_id`.
    pub fn encrypt_symlink(&self, dir_id: &DirId, target: &[u8]) -> String {
        B64.encode(self.symlinks.seal(&self.symlink_aad(dir_id), target))
    }

    pub fn decrypt_symlink(&self, dir_id: &DirId, stored: &[u8]) -> Result<Vec<u8>, NameError> {
        let sealed = B64.decode(stored).map_err(|_| NameError::Encoding)?;
        let target = self
            .symlinks
            .open(&self.symlink_aad(dir_id), &sealed)
            .map_err(|_| NameError::Auth)?;
        Ok(target.to_vec())
    }

    /// `user.NAME` → `user.<encoded encrypted NAME>`.
    pub fn encrypt_xattr_name(&self, name: &[u8]) -> String {
        let sealed = self
            .xattr_names
            .seal_deterministic(&label_aad(XATTR_NAME_AAD), name);
        format!("{XATTR_USER_PREFIX}{}", B64.encode(sealed))
    }

    /// The plaintext name (without `user.`) of a stored `user.<encoded>` xattr name.
    pub fn decrypt_xattr_name(&self, stored: &[u8]) -> Result<Vec<u8>, NameError> {
        let enc = stored
            .strip_prefix(XATTR_USER_PREFIX.as_bytes())
            .ok_or(NameError::Invalid)?;
        let sealed = B64.decode(enc).map_err(|_| NameError::Encoding)?;
        self.xattr_names
            .open_deterministic(&label_aad(XATTR_NAME_AAD), &sealed)
            .map_err(|_| NameError::Auth)
    }

    /// A value, bound to the (encrypted) attribute name it is stored under and, in format 2,
    /// to its owner.
    pub fn encrypt_xattr_value(&self, owner: &XattrOwner, stored_name: &str, value: &[u8]) -> Vec<u8> {
        self.xattr_values
            .seal(&self.xattr_value_aad(owner, stored_name), value)
    }

    pub fn decrypt_xattr_value(
        &self,
        owner: &XattrOwner,
        stored_name: &str,
        stored: &[u8],
    ) -> Result<Vec<u8>, NameError> {
        let v = self
            .xattr_values
            .open(&self.xattr_value_aad(owner, stored_name), stored)
            .map_err(|_| NameError::Auth)?;
        Ok(v.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher() -> NameCipher {
        NameCipher::new(&SecretKey::generate(), b"volume", VOLUME_FORMAT_V2)
    }

    const D1: DirId = [1; DIR_ID_LEN];
    const D2: DirId = [2; DIR_ID_LEN];

    #[test]
    fn names_round_trip_at_every_length_and_switch_to_long_at_176() {
        let c = cipher();
        let dir = [7u8; DIR_ID_LEN];
        for len in 1..=MAX_NAME_LEN {
            let name: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let enc = c.encrypt_name(&dir, &name).unwrap();
            let (backing, long) = backing_name_for(&enc);
            assert_eq!(long, len > MAX_SHORT_NAME_LEN, "len {len}");
            assert!(backing.len() <= MAX_BACKING_NAME_LEN);
            assert_eq!(c.decrypt_name(&dir, &enc).unwrap(), name);
            let expected = if long {
                BackingEntry::Long(&backing)
            } else {
                BackingEntry::Short(&backing)
            };
            assert_eq!(classify(backing.as_bytes()), expected);
        }
        assert_eq!(MAX_SHORT_NAME_LEN, 175);
    }

    #[test]
    fn a_name_is_bound_to_its_directory() {
        let c = cipher();
        let enc = c
            .encrypt_name(&[1; DIR_ID_LEN], b"interview_jane_doe.mp4")
            .unwrap();
        assert_ne!(
            enc,
            c.encrypt_name(&[2; DIR_ID_LEN], b"interview_jane_doe.mp4")
                .unwrap()
        );
        assert_eq!(c.decrypt_name(&[2; DIR_ID_LEN], &enc), Err(NameError::Auth));
        assert_eq!(c.decrypt_name(&[1; DIR_ID_LEN], "!!"), Err(NameError::Encoding));
    }

    #[test]
    fn invalid_names_are_refused() {
        let c = cipher();
        let d = [0; DIR_ID_LEN];
        assert_eq!(c.encrypt_name(&d, &[b'x'; 256]), Err(NameError::TooLong));
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b"] {
            assert_eq!(c.encrypt_name(&d, bad), Err(NameError::Invalid));
        }
    }

    #[test]
    fn internal_names_never_look_like_encrypted_ones() {
        for internal in [
            DIR_ID_FILE,
            ".kmsfs.lock",
            "kmsfs.json",
            ".kmsfs.tmp.abc",
            "kmsfs.long.xyz.name",
            "kmsfs.lost+found",
        ] {
            assert_eq!(
                classify(internal.as_bytes()),
                BackingEntry::Internal,
                "{internal}"
            );
        }
    }

    /// Found by the `name` fuzz target: `encoded_len * 3` overflowed for lengths over 2^62.
    #[test]
    fn symlink_plain_len_never_overflows() {
        assert_eq!(
            symlink_plain_len(u64::MAX),
            (u64::MAX as u128 * 3 / 4) as u64 - 28
        );
        for n in 0..100 {
            assert_eq!(symlink_plain_len(n), (n * 3 / 4).saturating_sub(28));
        }
    }

    #[test]
    fn symlinks_and_xattrs_round_trip() {
        let c = cipher();
        let s = c.encrypt_symlink(&D1, b"../plates/AB-123-CD.jpg");
        assert_eq!(symlink_plain_len(s.len() as u64), 23);
        assert_eq!(
            c.decrypt_symlink(&D1, s.as_bytes()).unwrap(),
            b"../plates/AB-123-CD.jpg"
        );
        assert_ne!(
            s,
            c.encrypt_symlink(&D1, b"../plates/AB-123-CD.jpg"),
            "random nonce per target"
        );
        let n = c.encrypt_xattr_name(b"comment");
        assert!(n.starts_with("user."));
        assert_eq!(c.decrypt_xattr_name(n.as_bytes()).unwrap(), b"comment");
        let owner = XattrOwner::File(FileId([9; FILE_ID_LEN]));
        let v = c.encrypt_xattr_value(&owner, &n, b"face at 00:13");
        assert_eq!(c.decrypt_xattr_value(&owner, &n, &v).unwrap(), b"face at 00:13");
        assert!(c.decrypt_xattr_value(&owner, "user.other", &v).is_err());
    }

    /// Format 2: what the storage copies elsewhere no longer reads as valid there.
    #[test]
    fn format_2_binds_a_target_to_its_directory_and_a_value_to_its_owner() {
        let c = cipher();
        let s = c.encrypt_symlink(&D1, b"../plates/AB-123-CD.jpg");
        assert_eq!(c.decrypt_symlink(&D2, s.as_bytes()), Err(NameError::Auth));
        let n = c.encrypt_xattr_name(b"comment");
        let (f1, f2) = (
            XattrOwner::File(FileId([1; FILE_ID_LEN])),
            XattrOwner::File(FileId([2; FILE_ID_LEN])),
        );
        let v = c.encrypt_xattr_value(&f1, &n, b"face at 00:13");
        assert!(c.decrypt_xattr_value(&f2, &n, &v).is_err(), "another file");
        assert!(
            c.decrypt_xattr_value(&XattrOwner::Dir(D1), &n, &v).is_err(),
            "a directory whose id equals the file's"
        );
    }

    /// Format 1 volumes keep reading as they were written: bound to the volume only.
    #[test]
    fn format_1_binds_to_the_volume_only() {
        let key = SecretKey::generate();
        let (v1, v2) = (
            NameCipher::new(&key, b"volume", crate::format::VOLUME_FORMAT_V1),
            NameCipher::new(&key, b"volume", VOLUME_FORMAT_V2),
        );
        let s = v1.encrypt_symlink(&D1, b"target");
        assert_eq!(v1.decrypt_symlink(&D2, s.as_bytes()).unwrap(), b"target");
        assert!(v2.decrypt_symlink(&D1, s.as_bytes()).is_err(), "no downgrade");
        let n = v1.encrypt_xattr_name(b"comment");
        let v = v1.encrypt_xattr_value(&XattrOwner::Dir(D1), &n, b"x");
        assert_eq!(
            v1.decrypt_xattr_value(&XattrOwner::Dir(D2), &n, &v).unwrap(),
            b"x"
        );
    }
}
