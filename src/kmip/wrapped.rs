//! The wrapped DEK as a KMIP backend stores it in a header slot (and the config): the KEK's
//! unique identifier, the IV we chose, the GCM tag and the ciphertext, in a small versioned
//! layout (docs/format.md, "KMIP wrapped keys"). Pure: bytes in, fields out.
//!
//! ```text
//! version (1 byte, = 1) | id length n (1 byte, 1..=MAX_ID_LEN) | id (n bytes, UTF-8)
//!   | IV (12 bytes) | tag (16 bytes) | ciphertext (32 bytes)
//! ```

/// The layout version this module writes and reads.
pub const VERSION: u8 = 1;
/// AES-GCM IV length, chosen by the client (random).
pub const IV_LEN: usize = 12;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;
/// A wrapped DEK is as long as the DEK (GCM adds no padding).
pub const CIPHERTEXT_LEN: usize = 32;
/// The longest key identifier we store.
pub const MAX_ID_LEN: usize = 200;

/// A DEK wrapped by KMIP Encrypt under key object `key_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wrapped {
    pub key_id: String,
    pub iv: [u8; IV_LEN],
    pub tag: [u8; TAG_LEN],
    pub ciphertext: [u8; CIPHERTEXT_LEN],
}

/// Why bytes are not a wrapped key of ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WrappedError {
    UnknownVersion(u8),
    BadLength(usize),
    BadKeyId,
}

impl std::fmt::Display for WrappedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WrappedError::UnknownVersion(v) => write!(f, "KMIP wrapped key of unknown version {v}"),
            WrappedError::BadLength(n) => write!(f, "KMIP wrapped key of {n} bytes does not fit its layout"),
            WrappedError::BadKeyId => write!(f, "KMIP wrapped key with an invalid key identifier"),
        }
    }
}

/// The associated data a DEK is wrapped with: volume id ‖ file id, or the volume id alone for
/// the volume's own keys (the lengths differ, so neither can pass for the other).
pub fn associated_data(volume_id: &[u8; 16], file_id: Option<&[u8; 16]>) -> Vec<u8> {
    let mut aad = volume_id.to_vec();
    if let Some(f) = file_id {
        aad.extend_from_slice(f);
    }
    aad
}

/// Whether `id` can be stored: 1 to [`MAX_ID_LEN`] bytes, printable, no spaces.
pub fn valid_key_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len()) && id.chars().all(|c| c.is_ascii_graphic() || !c.is_ascii())
}

impl Wrapped {
    pub fn encode(&self) -> Result<Vec<u8>, WrappedError> {
        if !valid_key_id(&self.key_id) {
            return Err(WrappedError::BadKeyId);
        }
        let mut out = Vec::with_capacity(2 + self.key_id.len() + IV_LEN + TAG_LEN + CIPHERTEXT_LEN);
        out.push(VERSION);
        out.push(self.key_id.len() as u8);
        out.extend_from_slice(self.key_id.as_bytes());
        out.extend_from_slice(&self.iv);
        out.extend_from_slice(&self.tag);
        out.extend_from_slice(&self.ciphertext);
        Ok(out)
    }

    pub fn decode(b: &[u8]) -> Result<Wrapped, WrappedError> {
        let (&version, rest) = b.split_first().ok_or(WrappedError::BadLength(0))?;
        if version != VERSION {
            return Err(WrappedError::UnknownVersion(version));
        }
        let (&n, rest) = rest.split_first().ok_or(WrappedError::BadLength(b.len()))?;
        let n = n as usize;
        if rest.len() != n + IV_LEN + TAG_LEN + CIPHERTEXT_LEN {
            return Err(WrappedError::BadLength(b.len()));
        }
        let (id, rest) = rest.split_at(n);
        let key_id = std::str::from_utf8(id).map_err(|_| WrappedError::BadKeyId)?;
        if !valid_key_id(key_id) {
            return Err(WrappedError::BadKeyId);
        }
        let (iv, rest) = rest.split_at(IV_LEN);
        let (tag, ciphertext) = rest.split_at(TAG_LEN);
        Ok(Wrapped {
            key_id: key_id.to_owned(),
            iv: iv.try_into().map_err(|_| WrappedError::BadLength(b.len()))?,
            tag: tag.try_into().map_err(|_| WrappedError::BadLength(b.len()))?,
            ciphertext: ciphertext
                .try_into()
                .map_err(|_| WrappedError::BadLength(b.len()))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout_is_as_documented() {
        let w = Wrapped {
            key_id: "42".into(),
            iv: [1; IV_LEN],
            tag: [2; TAG_LEN],
            ciphertext: [3; CIPHERTEXT_LEN],
        };
        let b = w.encode().unwrap();
        assert_eq!(&b[..4], &[1, 2, b'4', b'2']);
        assert_eq!(b.len(), 4 + 12 + 16 + 32);
        assert_eq!(Wrapped::decode(&b).unwrap(), w);
        let mut v2 = b.clone();
        v2[0] = 2;
        assert_eq!(Wrapped::decode(&v2), Err(WrappedError::UnknownVersion(2)));
        assert!(Wrapped::decode(&b[..b.len() - 1]).is_err());
        let mut spaced = b.clone();
        spaced[2] = b' ';
        assert_eq!(Wrapped::decode(&spaced), Err(WrappedError::BadKeyId));
        assert!(
            Wrapped {
                key_id: String::new(),
                ..w
            }
            .encode()
            .is_err()
        );
    }

    #[test]
    fn associated_data_is_volume_then_file() {
        assert_eq!(associated_data(&[1; 16], None), vec![1; 16]);
        let both = associated_data(&[1; 16], Some(&[2; 16]));
        assert_eq!((&both[..16], &both[16..]), (&[1u8; 16][..], &[2u8; 16][..]));
    }

    proptest! {
        #[test]
        fn round_trip(id in "[!-~]{1,200}", iv in any::<[u8; 12]>(), tag in any::<[u8; 16]>(),
                      ct in any::<[u8; 32]>()) {
            let w = Wrapped { key_id: id, iv, tag, ciphertext: ct };
            prop_assert_eq!(Wrapped::decode(&w.encode().unwrap()).unwrap(), w);
        }

        #[test]
        fn accepted_bytes_are_canonical(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(w) = Wrapped::decode(&b) {
                prop_assert_eq!(w.encode().unwrap(), b);
            }
        }
    }
}
