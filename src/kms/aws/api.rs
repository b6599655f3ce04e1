//! The AWS KMS API on the mount's key: one signed JSON 1.1 request ([`Api::call`]), retried
//! with backoff and jitter on throttling, 5xx and network failures, with at most
//! [`MAX_IN_FLIGHT`] requests on the wire at once; and the operations kmsfs uses on top of it:
//! GenerateDataKey, Decrypt and ReEncrypt, each under the [`Binding`]'s encryption context
//! ([`encryption_context`]), and DescribeKey.
//!
//! **DEKs in transit.** GenerateDataKey and Decrypt answers carry a DEK in base64. The answer's
//! bytes are read into a buffer that is wiped once parsed, every string of the parsed answer
//! is wiped once the DEK is out, and the DEK goes straight into its `SecretKey`
//! (`kms::wire`). What hyper and rustls buffered on the way is out of reach, as for OpenBao
//! (see `openbao/transit.rs`). Requests carry no DEK: ReEncrypt re-wraps on the server.

use super::credentials::Provider;
use super::errors::{AwsError, Triage, triage};
use super::settings::Settings;
use super::signing::sign_post;
use crate::crypto::SecretKey;
use crate::kms::http::{describe, is_certificate_error};
use crate::kms::wire::{dek_from_base64, wipe};
use crate::kms::{Binding, KmsError, WrappedDek};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

/// Requests on the wire at once (AWS KMS has no batch API: many unwraps are many requests).
pub const MAX_IN_FLIGHT: usize = 16;
/// Attempts per request before it counts as unreachable.
const ATTEMPTS: u32 = 6;
/// Per-request timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONTENT_TYPE: &str = "application/x-amz-json-1.1";

/// The encryption context key naming the volume (hex of its id).
pub const CONTEXT_VOLUME: &str = "kmsfs:volume";
/// The encryption context key naming the file (hex of its id); absent for volume keys.
pub const CONTEXT_FILE: &str = "kmsfs:file";

/// The encryption context a DEK is wrapped under: both ids for a file key, the volume id
/// alone for the volume's own keys. KMS binds it as associated data, and it is what the
/// `kms:EncryptionContext:kmsfs:volume` condition key of an IAM policy sees.
pub fn encryption_context(b: &Binding) -> Value {
    let mut ctx = serde_json::Map::new();
    ctx.insert(
        CONTEXT_VOLUME.into(),
        Value::String(crate::hex::encode(&b.volume_id.0)),
    );
    if let Some(f) = &b.file_id {
        ctx.insert(CONTEXT_FILE.into(), Value::String(crate::hex::encode(&f.0)));
    }
    Value::Object(ctx)
}

/// A successful answer and its request id.
pub(super) struct Reply {
    pub body: Value,
    pub request_id: Option<String>,
}

/// What DescribeKey says about the key.
pub(super) struct KeyInfo {
    pub arn: String,
    pub state: String,
    pub usage: String,
    pub request_id: Option<String>,
}

/// The key, and the endpoint and credentials to reach it.
pub(super) struct Api {
    http: reqwest::Client,
    endpoint: String,
    region: String,
    credentials: Provider,
    /// The key as configured (id, ARN or alias).
    key: String,
    /// The key's ARN, once DescribeKey has said it: Decrypt and ReEncrypt name it, so a
    /// header can make KMS use no other key.
    arn: OnceLock<String>,
    /// Bounds the requests on the wire; taken per attempt, not across a backoff.
    in_flight: Semaphore,
    /// HTTP requests sent (for status and tests).
    requests: AtomicU64,
}

impl Api {
    pub(super) fn new(s: Settings) -> Result<Self, KmsError> {
        let http = crate::kms::http::client_builder(REQUEST_TIMEOUT, s.ca_bundle.as_deref())?
            .build()
            .map_err(|e| KmsError::Misconfigured(format!("HTTP client: {e}")))?;
        Ok(Api {
            http,
            endpoint: s.endpoint,
            region: s.region,
            credentials: Provider::new(s.credentials)?,
            key: s.key,
            arn: OnceLock::new(),
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
            requests: AtomicU64::new(0),
        })
    }

    /// The key as configured.
    pub(super) fn key(&self) -> &str {
        &self.key
    }

    /// The key's ARN, if DescribeKey has answered.
    pub(super) fn arn(&self) -> Option<&str> {
        self.arn.get().map(String::as_str)
    }

    pub(super) fn request_count(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// One KMS operation: signed, sent, and retried while the answer says so.
    pub(super) async fn call(&self, op: &str, body: &Value) -> Result<Reply, KmsError> {
        let payload = serde_json::to_vec(body).expect("JSON serialises");
        let url = format!("{}/", self.endpoint);
        let target = format!("TrentService.{op}");
        let headers = [("content-type", CONTENT_TYPE), ("x-amz-target", target.as_str())];
        let mut last = String::new();
        let mut fresh_credentials = false;
        let mut attempt = 0;
        while attempt < ATTEMPTS {
            if attempt > 0 {
                crate::kms::retry::backoff(attempt - 1).await;
            }
            attempt += 1;
            let creds = self.credentials.get().await?;
            let signed = sign_post(&creds, &self.region, &url, &headers, &payload, SystemTime::now())?;
            drop(creds);
            let mut req = self.http.post(&url).body(payload.clone());
            for (k, v) in headers.iter().copied() {
                req = req.header(k, v);
            }
            for (k, v) in &signed {
                req = req.header(k.as_str(), v.as_str());
            }
            let permit = self.in_flight.acquire().await.expect("never closed");
            self.requests.fetch_add(1, Ordering::Relaxed);
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) if is_certificate_error(&e) => {
                    return Err(KmsError::Misconfigured(format!(
                        "{}: the server's TLS certificate is not trusted ({}); set AWS_CA_BUNDLE to its CA bundle",
                        self.endpoint,
                        describe(&e)
                    )));
                }
                Err(e) => {
                    last = describe(&e);
                    continue;
                }
            };
            let status = resp.status().as_u16();
            let header = |n: &str| {
                resp.headers()
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let (request_id, error_type) = (header("x-amzn-requestid"), header("x-amzn-errortype"));
            let bytes = match resp.bytes().await {
                Ok(b) => Zeroizing::new(b.to_vec()),
                Err(e) => {
                    last = describe(&e);
                    continue;
                }
            };
            drop(permit);
            if (200..300).contains(&status) {
                let body = serde_json::from_slice(&bytes).map_err(|_| {
                    KmsError::Misconfigured(format!("{}: the answer to {op} is not JSON", self.endpoint))
                })?;
                return Ok(Reply { body, request_id });
            }
            let e = AwsError::parse(status, error_type.as_deref(), request_id.as_deref(), &bytes);
            match triage(&e) {
                Triage::Retry(why) => last = why,
                // Temporary credentials that expired early: fetch new ones, once.
                Triage::Refused(KmsError::Denied(_))
                    if !fresh_credentials && e.code.starts_with("ExpiredToken") =>
                {
                    fresh_credentials = true;
                    self.credentials.invalidate().await;
                    attempt -= 1;
                }
                Triage::Refused(k) => {
                    log::debug!("AWS KMS {op}: {}", e.describe());
                    return Err(k);
                }
            }
        }
        Err(KmsError::Unreachable(format!("{}: {last}", self.endpoint)))
    }

    /// The key to name in Decrypt and ReEncrypt: its ARN once known.
    fn pinned(&self) -> Option<&str> {
        self.arn()
    }

    /// A fresh DEK from KMS, wrapped under the key and `binding`'s context.
    pub(super) async fn generate_data_key(
        &self,
        binding: &Binding,
    ) -> Result<(SecretKey, WrappedDek), KmsError> {
        let body = json!({
            "KeyId": self.pinned().unwrap_or(&self.key),
            "KeySpec": "AES_256",
            "EncryptionContext": encryption_context(binding),
        });
        let mut reply = self.call("GenerateDataKey", &body).await?;
        let out = (|| {
            let pt = reply
                .body
                .get("Plaintext")
                .and_then(Value::as_str)
                .ok_or_else(|| missing("GenerateDataKey", "Plaintext"))?;
            let dek = dek_from_base64(pt)?;
            Ok((dek, self.wrapped_from("GenerateDataKey", &reply.body)?))
        })();
        wipe(&mut reply.body);
        out
    }

    /// The DEK inside `wrapped`, if it was wrapped under the key and `binding`'s context.
    pub(super) async fn decrypt(
        &self,
        wrapped: &WrappedDek,
        binding: &Binding,
    ) -> Result<SecretKey, KmsError> {
        let mut body = json!({
            "CiphertextBlob": B64.encode(&wrapped.blob),
            "EncryptionContext": encryption_context(binding),
        });
        if let Some(arn) = self.pinned() {
            body["KeyId"] = Value::String(arn.to_owned());
        }
        let mut reply = self.call("Decrypt", &body).await?;
        let out = reply
            .body
            .get("Plaintext")
            .and_then(Value::as_str)
            .ok_or_else(|| missing("Decrypt", "Plaintext"))
            .and_then(dek_from_base64);
        wipe(&mut reply.body);
        out
    }

    /// `wrapped` re-encrypted by KMS under the key's current backing key, same context. The
    /// DEK never leaves KMS.
    pub(super) async fn re_encrypt(
        &self,
        wrapped: &WrappedDek,
        binding: &Binding,
    ) -> Result<WrappedDek, KmsError> {
        let ctx = encryption_context(binding);
        let mut body = json!({
            "CiphertextBlob": B64.encode(&wrapped.blob),
            "SourceEncryptionContext": ctx,
            "DestinationKeyId": self.pinned().unwrap_or(&self.key),
            "DestinationEncryptionContext": ctx,
        });
        if let Some(arn) = self.pinned() {
            body["SourceKeyId"] = Value::String(arn.to_owned());
        }
        let reply = self.call("ReEncrypt", &body).await?;
        self.wrapped_from("ReEncrypt", &reply.body)
    }

    /// The key's ARN and state; remembers the ARN for Decrypt and ReEncrypt.
    pub(super) async fn describe_key(&self) -> Result<KeyInfo, KmsError> {
        let reply = self.call("DescribeKey", &json!({"KeyId": self.key})).await?;
        let meta = reply.body.get("KeyMetadata");
        let text = |k: &str| {
            meta.and_then(|m| m.get(k))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        let info = KeyInfo {
            arn: text("Arn"),
            state: text("KeyState"),
            usage: text("KeyUsage"),
            request_id: reply.request_id,
        };
        if info.arn.is_empty() {
            return Err(missing("DescribeKey", "KeyMetadata.Arn"));
        }
        if let Some(old) = self.arn.get()
            && *old != info.arn
        {
            return Err(KmsError::Denied(format!(
                "{} now names key {}, not {old}: the key was replaced",
                self.key, info.arn
            )));
        }
        let _ = self.arn.set(info.arn.clone());
        Ok(info)
    }

    /// The wrapped DEK of an answer: its CiphertextBlob, and the ARN of the key that made it.
    fn wrapped_from(&self, op: &str, body: &Value) -> Result<WrappedDek, KmsError> {
        let blob = body
            .get("CiphertextBlob")
            .and_then(Value::as_str)
            .and_then(|b| B64.decode(b).ok())
            .filter(|b| !b.is_empty() && b.len() <= crate::format::header::MAX_WRAPPED_LEN)
            .ok_or_else(|| missing(op, "CiphertextBlob"))?;
        let key_ref = body
            .get("KeyId")
            .and_then(Value::as_str)
            .filter(|k| !k.is_empty() && k.len() <= crate::format::header::MAX_KEY_REF_LEN)
            .ok_or_else(|| missing(op, "KeyId"))?
            .to_owned();
        Ok(WrappedDek { key_ref, blob })
    }
}

fn missing(op: &str, field: &str) -> KmsError {
    KmsError::Misconfigured(format!("AWS KMS answered {op} without a usable {field}"))
}

#[cfg(test)]
mod tests {
    use super::super::credentials::Source;
    use super::super::identity::Credentials;
    use super::*;
    use crate::format::{FileId, VolumeId};
    use crate::kms::stub;

    fn api(endpoint: &str) -> Api {
        Api::new(Settings {
            key: "alias/kmsfs".into(),
            region: "eu-west-1".into(),
            endpoint: endpoint.into(),
            ca_bundle: None,
            credentials: Source::Static {
                creds: Credentials {
                    access_key_id: "AKIATEST".into(),
                    secret_access_key: Zeroizing::new("secret".into()),
                    session_token: None,
                    expires: None,
                },
                from: "test".into(),
            },
        })
        .unwrap()
    }

    #[test]
    fn the_context_names_the_volume_and_the_file() {
        let v = VolumeId([0xAB; 16]);
        let f = FileId([0x01; 16]);
        assert_eq!(
            encryption_context(&Binding::file(v, f)),
            json!({"kmsfs:volume": "ab".repeat(16), "kmsfs:file": "01".repeat(16)})
        );
        assert_eq!(
            encryption_context(&Binding::volume(v)),
            json!({"kmsfs:volume": "ab".repeat(16)})
        );
    }

    /// GenerateDataKey as the API reference documents it; the request is signed JSON 1.1.
    #[tokio::test]
    async fn a_data_key_is_generated_under_the_context() {
        let kms = stub::serve(|r| {
            assert_eq!(r.header("x-amz-target"), Some("TrentService.GenerateDataKey"));
            assert_eq!(r.header("content-type"), Some(CONTENT_TYPE));
            assert!(
                r.header("authorization")
                    .is_some_and(|a| a.contains("/eu-west-1/kms/aws4_request"))
            );
            (
                200,
                format!(
                    r#"{{"CiphertextBlob":"{}","KeyId":"arn:aws:kms:eu-west-1:111122223333:key/k1","Plaintext":"{}","KeyMaterialId":"m1"}}"#,
                    B64.encode([9u8; 184]),
                    B64.encode([7u8; 32])
                ),
            )
        });
        let b = Binding::file(VolumeId([1; 16]), FileId([2; 16]));
        let (dek, w) = api(&kms.url).generate_data_key(&b).await.unwrap();
        assert_eq!(dek.expose(), &[7u8; 32]);
        assert_eq!(
            (w.key_ref.as_str(), w.blob.len()),
            ("arn:aws:kms:eu-west-1:111122223333:key/k1", 184)
        );
        let sent: Value = serde_json::from_str(&kms.seen()[0].body).unwrap();
        assert_eq!(
            sent,
            json!({"KeyId": "alias/kmsfs", "KeySpec": "AES_256", "EncryptionContext": encryption_context(&b)})
        );
    }

    /// Throttling is retried with backoff and then succeeds; a refusal is final.
    #[tokio::test]
    async fn throttling_is_retried_and_refusals_are_not() {
        let n = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let count = n.clone();
        let kms = stub::serve(move |_| match count.fetch_add(1, Ordering::SeqCst) {
            0 => (
                400,
                r#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#.into(),
            ),
            1 => (503, String::new()),
            2 => (
                200,
                format!(r#"{{"KeyId":"arn:k","Plaintext":"{}"}}"#, B64.encode([5u8; 32])),
            ),
            _ => (400, r#"{"__type":"InvalidCiphertextException"}"#.into()),
        });
        let a = api(&kms.url);
        let w = WrappedDek {
            key_ref: "arn:k".into(),
            blob: vec![1, 2, 3],
        };
        let b = Binding::volume(VolumeId([3; 16]));
        assert_eq!(a.decrypt(&w, &b).await.unwrap().expose(), &[5u8; 32]);
        assert_eq!(a.request_count(), 3);
        assert!(matches!(a.decrypt(&w, &b).await, Err(KmsError::Corrupt(_))));
        assert_eq!(a.request_count(), 4, "a refusal is not retried");
    }

    #[tokio::test]
    async fn a_server_that_keeps_throttling_is_unreachable() {
        let kms = stub::serve(|_| {
            (
                400,
                r#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#.into(),
            )
        });
        let a = api(&kms.url);
        let e = a.describe_key().await.err();
        assert!(
            matches!(&e, Some(KmsError::Unreachable(m)) if m.contains("ThrottlingException")),
            "{e:?}"
        );
        assert_eq!(a.request_count(), u64::from(ATTEMPTS));
    }

    /// Once DescribeKey named the ARN, Decrypt and ReEncrypt name it, and ReEncrypt keeps the
    /// context on both sides.
    #[tokio::test]
    async fn decrypt_and_re_encrypt_are_pinned_to_the_key() {
        let kms = stub::serve(|r| {
            match r.header("x-amz-target") {
            Some("TrentService.DescribeKey") => (200, r#"{"KeyMetadata":{"Arn":"arn:aws:kms:eu-west-1:1:key/k","KeyState":"Enabled","KeyUsage":"ENCRYPT_DECRYPT"}}"#.into()),
            _ => (200, format!(r#"{{"CiphertextBlob":"{}","KeyId":"arn:aws:kms:eu-west-1:1:key/k","SourceKeyId":"arn:aws:kms:eu-west-1:1:key/k"}}"#, B64.encode([4u8; 100]))),
        }
        });
        let a = api(&kms.url);
        let info = a.describe_key().await.unwrap();
        assert_eq!(
            (info.state.as_str(), a.arn()),
            ("Enabled", Some("arn:aws:kms:eu-west-1:1:key/k"))
        );
        let b = Binding::file(VolumeId([1; 16]), FileId([2; 16]));
        let w = WrappedDek {
            key_ref: "x".into(),
            blob: vec![1],
        };
        let new = a.re_encrypt(&w, &b).await.unwrap();
        assert_eq!(new.blob, vec![4u8; 100]);
        let sent: Value = serde_json::from_str(&kms.seen()[1].body).unwrap();
        let ctx = encryption_context(&b);
        assert_eq!(sent["SourceEncryptionContext"], ctx);
        assert_eq!(sent["DestinationEncryptionContext"], ctx);
        assert_eq!(sent["SourceKeyId"], "arn:aws:kms:eu-west-1:1:key/k");
        assert_eq!(sent["DestinationKeyId"], "arn:aws:kms:eu-west-1:1:key/k");
    }
}
