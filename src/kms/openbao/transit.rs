//! Transit operations on the mount's key: encrypt, decrypt and rewrap of many DEKs in batch
//! requests of at most [`MAX_BATCH`] items, each bound to its [`Binding`]'s context, and the
//! key version a Transit ciphertext names ([`version_of`]).
//!
//! **DEKs in transit.** Encrypt requests and decrypt answers carry DEKs in base64. What this
//! module holds it wipes: each base64 plaintext is made straight into the request's JSON
//! value (no `json!`, which would copy it) and every string of a request and of an answer is
//! zeroized once the exchange is over; a decoded DEK goes from a `Zeroizing` buffer to its
//! heap `SecretKey`, with the decoder's stack scrubbed. What it cannot reach, because
//! `Transport::send` takes a `serde_json::Value` and returns one: reqwest serialises the
//! request into a growing `Vec` and sends it as `Bytes` (the buffers it outgrew and the body
//! are freed unwiped), hyper and rustls copy the bytes into their write and TLS record
//! buffers, and the answer is read into hyper's read buffer, decrypted in rustls's, and
//! collected into `Bytes` before `serde_json` parses it. Those copies of the base64 DEKs
//! stay in freed heap memory until reused (locked in RAM by the daemon's `mlockall`, never
//! swapped). Removing them needs a transport that takes and returns `Zeroizing` bytes, and
//! even then the TLS and HTTP libraries keep their own buffers.

use super::auth::Auth;
use super::errors::classify;
use super::transport::Transport;
use crate::crypto::SecretKey;
use crate::kms::wire::{dek_from_base64, wipe};
use crate::kms::{Binding, KmsError, WrappedDek};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Map, Value};

/// Items per batch request. The default listener refuses requests with more than 1000 JSON
/// strings; an item with ciphertext and context is 4 strings (plus the key), so 249 fit.
pub const MAX_BATCH: usize = 249;

fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// A JSON object of string fields, each string moved in (where `json!` would copy it).
fn object<const N: usize>(fields: [(&str, String); N]) -> Value {
    Value::Object(
        fields
            .into_iter()
            .map(|(k, v)| (k.to_owned(), Value::String(v)))
            .collect::<Map<String, Value>>(),
    )
}

/// The key version of a Transit ciphertext, "vault:v<N>:…".
pub(super) fn version_of(blob: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(blob).ok()?;
    s.strip_prefix("vault:v")?.split(':').next()?.parse().ok()
}

/// One Transit key on one mount, and how to reach it.
pub(super) struct Transit {
    transport: Transport,
    auth: Auth,
    mount: String,
    key: String,
}

impl Transit {
    /// `mount` without its leading and trailing slashes.
    pub(super) fn new(transport: Transport, auth: Auth, mount: &str, key: String) -> Self {
        Transit {
            transport,
            auth,
            mount: mount.trim_matches('/').to_owned(),
            key,
        }
    }

    /// The Transit key's name.
    pub(super) fn key(&self) -> &str {
        &self.key
    }

    /// Where the Transit engine is mounted.
    pub(super) fn mount(&self) -> &str {
        &self.mount
    }

    /// HTTP requests sent so far.
    pub(super) fn request_count(&self) -> u64 {
        self.transport.request_count()
    }

    /// The servers set aside now.
    pub(super) fn set_aside(&self) -> Vec<crate::kms::SetAside> {
        self.transport.set_aside()
    }

    async fn call(&self, op: &str, body: &Value) -> Result<Value, KmsError> {
        let path = format!("{}/{op}/{}", self.mount, self.key);
        self.auth.call(&self.transport, &path, op, &self.key, body).await
    }

    /// Sends `items` to Transit `op` in batch requests (at most [`MAX_BATCH`] each): `input`
    /// makes one batch item, `output` reads one result (`None` for a failed item, whose error
    /// text is then classified). Every string of each request and each answer is wiped once
    /// the batch is done with it.
    async fn batched<T: Sync, R: Send>(
        &self,
        op: &str,
        items: &[T],
        input: impl Fn(&T) -> Value + Send + Sync,
        output: impl Fn(&Value) -> Option<Result<R, KmsError>> + Send + Sync,
    ) -> Vec<Result<R, KmsError>> {
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(MAX_BATCH) {
            let batch: Vec<Value> = chunk.iter().map(&input).collect();
            let mut body = Value::Object(Map::from_iter([("batch_input".to_owned(), Value::Array(batch))]));
            let answer = self.call(op, &body).await;
            wipe(&mut body);
            match answer {
                Err(e) => out.extend(chunk.iter().map(|_| Err(e.clone()))),
                Ok(mut v) => {
                    let results = v.pointer("/data/batch_results").and_then(Value::as_array);
                    for i in 0..chunk.len() {
                        let item = results.and_then(|r| r.get(i));
                        out.push(item.and_then(&output).unwrap_or_else(|| {
                            let why = item.and_then(|i| i.get("error")).and_then(Value::as_str);
                            Err(classify(400, why.unwrap_or("no result")))
                        }));
                    }
                    wipe(&mut v);
                }
            }
        }
        out
    }

    /// A wrapped DEK from an encrypt or rewrap result item.
    fn wrapped_from(&self, item: &Value) -> Option<Result<WrappedDek, KmsError>> {
        let ct = item
            .get("ciphertext")
            .and_then(Value::as_str)
            .filter(|c| !c.is_empty())?;
        Some(Ok(WrappedDek {
            key_ref: self.key.clone(),
            blob: ct.as_bytes().to_vec(),
        }))
    }

    /// Encrypts many DEKs at once, each bound to its context.
    pub(super) async fn wrap_many(
        &self,
        items: &[(SecretKey, Binding)],
    ) -> Vec<Result<WrappedDek, KmsError>> {
        self.batched(
            "encrypt",
            items,
            |(dek, b)| {
                object([
                    ("plaintext", b64(dek.expose())),
                    ("context", b64(&b.v1_context())),
                ])
            },
            |item| self.wrapped_from(item),
        )
        .await
    }

    /// Decrypts many wrapped DEKs in batch requests.
    pub(super) async fn unwrap_batch(
        &self,
        items: &[(WrappedDek, Binding)],
    ) -> Vec<Result<SecretKey, KmsError>> {
        self.batched(
            "decrypt",
            items,
            |(w, b)| {
                object([
                    ("ciphertext", String::from_utf8_lossy(&w.blob).into_owned()),
                    ("context", b64(&b.v1_context())),
                ])
            },
            |item| {
                let pt = item
                    .get("plaintext")
                    .and_then(Value::as_str)
                    .filter(|p| !p.is_empty())?;
                Some(dek_from_base64(pt))
            },
        )
        .await
    }

    /// Re-encrypts many wrapped DEKs under the key's current version, server-side.
    pub(super) async fn rewrap_batch(
        &self,
        items: &[(WrappedDek, Binding)],
    ) -> Vec<Result<WrappedDek, KmsError>> {
        self.batched(
            "rewrap",
            items,
            |(w, b)| {
                object([
                    ("ciphertext", String::from_utf8_lossy(&w.blob).into_owned()),
                    ("context", b64(&b.v1_context())),
                ])
            },
            |item| self.wrapped_from(item),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_the_json_they_were_and_wipe_to_nothing_readable() {
        let dek = SecretKey::from_slice(&[0xAB; 32]).unwrap();
        let item = object([("plaintext", b64(dek.expose())), ("context", b64(b"ctx"))]);
        assert_eq!(
            item,
            serde_json::json!({"plaintext": B64.encode([0xAB; 32]), "context": B64.encode(b"ctx")})
        );
        let mut body = Value::Object(Map::from_iter([(
            "batch_input".to_owned(),
            Value::Array(vec![item]),
        )]));
        wipe(&mut body);
        let text = body.to_string();
        assert!(!text.contains(&B64.encode([0xAB; 32])), "{text}");
        assert_eq!(body["batch_input"][0]["plaintext"], "");
    }

    #[test]
    fn version_of_reads_the_transit_prefix() {
        assert_eq!(version_of(b"vault:v1:gUL9ik9P"), Some(1));
        assert_eq!(version_of(b"vault:v3:jvVNH+aP/x=="), Some(3));
        assert_eq!(version_of(b"vault:v4294967295:x"), Some(u32::MAX));
        // Garbage: another prefix, no number, a number that does not fit, not text.
        for blob in [
            &b""[..],
            b"vault:",
            b"vault:v:abc",
            b"vault:vx:abc",
            b"vault:v-1:abc",
            b"vault:v4294967296:abc",
            b"bao:v1:abc",
            b"VAULT:V1:abc",
            b" vault:v1:abc",
            b"\xff\xfevault:v1:abc",
        ] {
            assert_eq!(version_of(blob), None, "{}", String::from_utf8_lossy(blob));
        }
    }
}
