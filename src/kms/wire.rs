//! What the network backends do with JSON that carries DEKs: decode a base64 plaintext into a
//! [`SecretKey`] without leaving copies of ours behind, and wipe every string of a request or
//! an answer once the exchange is over. (What the HTTP and TLS libraries copy is out of reach:
//! see `openbao/transit.rs`.)

use crate::crypto::{SecretKey, scrubbed};
use crate::kms::KmsError;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::Value;
use zeroize::{Zeroize, Zeroizing};

/// Zeroizes every string in a JSON value in place (requests and answers that carried DEKs).
pub(in crate::kms) fn wipe(v: &mut Value) {
    match v {
        Value::String(s) => s.zeroize(),
        Value::Array(items) => items.iter_mut().for_each(wipe),
        Value::Object(map) => map.values_mut().for_each(wipe),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// A DEK from the base64 plaintext of a decrypt answer. Decoded into a buffer of ours (wiped
/// even when the text does not decode), through [`scrubbed`]: the decoder works on the key in
/// its locals.
pub(in crate::kms) fn dek_from_base64(plaintext: &str) -> Result<SecretKey, KmsError> {
    scrubbed(|| {
        let mut raw = Zeroizing::new(Vec::new());
        B64.decode_vec(plaintext, &mut raw).ok()?;
        SecretKey::from_slice(&raw)
    })
    .ok_or_else(|| KmsError::Corrupt("unwrapped key has the wrong length".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decrypt_answers_decode_to_keys_or_corrupt() {
        let k = dek_from_base64(&B64.encode([7u8; 32])).unwrap();
        assert_eq!(k.expose(), &[7u8; 32]);
        for bad in [B64.encode([7u8; 31]), "not base64!".to_owned()] {
            assert!(matches!(dek_from_base64(&bad), Err(KmsError::Corrupt(_))));
        }
    }
}
