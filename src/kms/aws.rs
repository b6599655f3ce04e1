//! AWS KMS: the KEK is a symmetric KMS key (`SYMMETRIC_DEFAULT`, `ENCRYPT_DECRYPT`), named in
//! the volume by key id, key ARN, `alias/NAME` or alias ARN.
//!
//! Binding: every DEK comes from GenerateDataKey under an encryption context naming the volume
//! and the file (`{"kmsfs:volume": hex, "kmsfs:file": hex}`; the volume's own keys carry only
//! the volume entry), which KMS binds as associated data: a header moved to another file does
//! not decrypt (InvalidCiphertextException, *corrupt*). The context also lets an IAM or key
//! policy restrict a mount to its own volume (`kms:EncryptionContext:kmsfs:volume`). Rewrap is
//! ReEncrypt, so no DEK leaves KMS during a rotation.
//!
//! Key versions: AWS rotation (automatic or on demand) keeps the key id and ARN and changes the
//! backing key inside KMS; Decrypt picks the right backing key itself, and a ciphertext does
//! not say which one made it. So kmsfs reports the key as version 1 and `version_of` knows no
//! version: `kmsfs rewrap` re-encrypts every header with ReEncrypt (under the current backing
//! key) each time it runs, which is what a rotation calls for.
//!
//! No batch API exists: concurrent unwraps (and `unwrap_many`, `rewrap_many`,
//! `generate_many`) go out as parallel requests, at most `api::MAX_IN_FLIGHT` at once; a
//! pool of pre-wrapped new-file keys (`kms::pool`) is filled the same way.
//!
//! This file holds [`AwsKms`] and its [`KeyProvider`] impl; each part below uses only those
//! listed before it:
//! - `errors`: how an answer maps to denied / unreachable / corrupt / misconfigured;
//! - `identity`: [`Credentials`], what signing needs;
//! - `profile`: the shared config and credentials files;
//! - `sources`: STS web identity, container credentials and IMDSv2;
//! - `credentials`: the default credential chain and the refreshing provider;
//! - `settings`: region, endpoint and credentials from the mount's environment;
//! - `signing`: SigV4 with `aws-sigv4`;
//! - `api`: signed requests with retries and a concurrency limit, and the KMS operations.

mod api;
mod credentials;
mod errors;
mod identity;
mod profile;
mod settings;
mod signing;
mod sources;

pub use api::{CONTEXT_FILE, CONTEXT_VOLUME, MAX_IN_FLIGHT, encryption_context};
pub use credentials::{Credentials, Source};
pub use settings::{Settings, init_region, region_of_arn};

use super::pool::KeyPool;
use super::{Binding, BoxFuture, Description, KeyProvider, KeyStatus, KmsError, NewFileKey, WrappedDek};
use crate::crypto::SecretKey;
use crate::format::VolumeId;
use api::Api;
use std::future::Future;
use std::sync::{Arc, OnceLock, Weak};

/// The backend's name in status and audit.
pub const BACKEND: &str = "aws-kms";

pub struct AwsKms {
    /// The key, and the endpoint and credentials to reach it; shared with the tasks of
    /// parallel requests.
    api: Arc<Api>,
    /// Ourselves, for background tasks (set by `connect`).
    me: OnceLock<Weak<AwsKms>>,
    /// Pre-wrapped keys for new files of one volume, each used once.
    pool: KeyPool,
    /// Pooling can be turned off to measure what it saves.
    pooling: bool,
}

impl AwsKms {
    /// A provider for `s`; background work (the pool's refills) runs on the runtime the calls
    /// come from.
    pub fn connect(s: Settings) -> Result<Arc<Self>, KmsError> {
        log::info!("AWS KMS key {} in {} at {}", s.key, s.region, s.endpoint);
        let kms = Arc::new(AwsKms {
            api: Arc::new(Api::new(s)?),
            me: OnceLock::new(),
            pool: KeyPool::default(),
            pooling: std::env::var_os("KMSFS_NO_BATCHING").is_none(),
        });
        let _ = kms.me.set(Arc::downgrade(&kms));
        Ok(kms)
    }

    /// A new file's key from the pool when it has one; the pool refills in the background.
    async fn pooled_file_key(&self, volume_id: VolumeId) -> Result<NewFileKey, KmsError> {
        let me = self.me.get().and_then(Weak::upgrade).filter(|_| self.pooling);
        self.pool.take_or_make(me, |k| &k.pool, self, volume_id).await
    }

    /// Proves the key is usable: it exists, is enabled and is for encryption, and we may ask
    /// (DescribeKey; a deleted access key or a refused signature is *denied* here too).
    ///
    /// Unlike Transit, which ignores the context of a non-derived key, AWS KMS always binds
    /// the encryption context (it is authenticated data of KMS's own encryption), so no
    /// wrap-and-unwrap probe is needed; one would also need a volume id the mount's IAM policy
    /// allows (see the README's policy). The first real Decrypt (the volume key) proves the
    /// rest.
    async fn probe(&self) -> Result<KeyStatus, KmsError> {
        let info = self.api.describe_key().await?;
        log::info!(
            "AWS KMS key {} is {} (DescribeKey request id {})",
            info.arn,
            info.state,
            info.request_id.as_deref().unwrap_or("none")
        );
        if info.state != "Enabled" {
            return Err(KmsError::Denied(format!("key {} is {}", info.arn, info.state)));
        }
        if !info.usage.is_empty() && info.usage != "ENCRYPT_DECRYPT" {
            return Err(KmsError::Misconfigured(format!(
                "key {} is for {}, not ENCRYPT_DECRYPT: create a symmetric encryption key",
                info.arn, info.usage
            )));
        }
        Ok(KeyStatus {
            key_ref: info.arn,
            current_version: 1,
        })
    }

    /// `op` on every item as parallel requests (bounded by the API's concurrency limit), the
    /// results in order.
    async fn parallel<T, R, F, Fut>(&self, items: Vec<T>, op: F) -> Vec<Result<R, KmsError>>
    where
        T: Send + 'static,
        R: Send + 'static,
        F: Fn(Arc<Api>, T) -> Fut,
        Fut: Future<Output = Result<R, KmsError>> + Send + 'static,
    {
        let n = items.len();
        let mut tasks = tokio::task::JoinSet::new();
        for (i, item) in items.into_iter().enumerate() {
            let call = op(self.api.clone(), item);
            tasks.spawn(async move { (i, call.await) });
        }
        let mut out: Vec<Option<Result<R, KmsError>>> = (0..n).map(|_| None).collect();
        while let Some(done) = tasks.join_next().await {
            if let Ok((i, r)) = done {
                out[i] = Some(r);
            }
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(KmsError::Unreachable("the request task failed".into()))))
            .collect()
    }
}

impl KeyProvider for AwsKms {
    fn describe(&self) -> Description {
        Description {
            backend: BACKEND,
            key_ref: self.api.arn().unwrap_or(self.api.key()).to_owned(),
        }
    }

    fn generate<'a>(
        &'a self,
        binding: &'a Binding,
    ) -> BoxFuture<'a, Result<(SecretKey, WrappedDek), KmsError>> {
        Box::pin(self.api.generate_data_key(binding))
    }

    fn generate_many<'a>(
        &'a self,
        bindings: &'a [Binding],
    ) -> BoxFuture<'a, Vec<Result<(SecretKey, WrappedDek), KmsError>>> {
        Box::pin(self.parallel(bindings.to_vec(), |api, b| async move {
            api.generate_data_key(&b).await
        }))
    }

    fn unwrap<'a>(
        &'a self,
        wrapped: &'a WrappedDek,
        binding: &'a Binding,
    ) -> BoxFuture<'a, Result<SecretKey, KmsError>> {
        Box::pin(self.api.decrypt(wrapped, binding))
    }

    fn unwrap_many<'a>(
        &'a self,
        items: &'a [(WrappedDek, Binding)],
    ) -> BoxFuture<'a, Vec<Result<SecretKey, KmsError>>> {
        Box::pin(self.parallel(
            items.to_vec(),
            |api, (w, b)| async move { api.decrypt(&w, &b).await },
        ))
    }

    fn rewrap<'a>(
        &'a self,
        wrapped: &'a WrappedDek,
        binding: &'a Binding,
    ) -> BoxFuture<'a, Result<WrappedDek, KmsError>> {
        Box::pin(self.api.re_encrypt(wrapped, binding))
    }

    fn rewrap_many<'a>(
        &'a self,
        items: &'a [(WrappedDek, Binding)],
    ) -> BoxFuture<'a, Vec<Result<WrappedDek, KmsError>>> {
        Box::pin(self.parallel(items.to_vec(), |api, (w, b)| async move {
            api.re_encrypt(&w, &b).await
        }))
    }

    fn check_access(&self) -> BoxFuture<'_, Result<KeyStatus, KmsError>> {
        Box::pin(self.probe())
    }

    /// An AWS ciphertext does not say which backing key made it (see the module docs).
    fn version_of(&self, _wrapped: &WrappedDek) -> Option<u32> {
        None
    }

    fn new_file_key(&self, volume_id: VolumeId) -> BoxFuture<'_, Result<NewFileKey, KmsError>> {
        Box::pin(self.pooled_file_key(volume_id))
    }

    /// Drops every pooled key (they are wiped as they drop) and pools nothing again.
    fn forget_secrets(&self) {
        self.pool.close();
    }

    fn request_count(&self) -> u64 {
        self.api.request_count()
    }
}
