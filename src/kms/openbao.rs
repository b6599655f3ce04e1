//! OpenBao / HashiCorp Vault Transit: the KEK lives in a Transit key on the server.
//!
//! Binding: the Transit key must be **derived** (`derived=true`), and every wrap carries the
//! file id as its `context`. We chose `context` over `associated_data` because Transit's
//! `rewrap` honours `context` but ignores `associated_data` (OpenBao 2.7): with `context`,
//! `kmsfs rewrap` re-keys every header server-side and no DEK leaves the KMS during rotation.
//! A non-derived key would silently ignore the context, so `check_access` proves the binding
//! with a probe (wrap under one context, fail to unwrap under another) before any file is made.
//!
//! DEKs come from the OS RNG and are then encrypted by Transit (`encrypt` with `batch_input`),
//! not from `datakey`: `datakey` has no batch form, and batches are what make a pool of
//! pre-wrapped DEKs cheap. The mount's token needs `update` on encrypt, decrypt and rewrap of
//! its key, nothing else (with `create`, a typo'd key name would silently create a key).
//!
//! This file holds [`OpenBaoKms`]: its construction and the [`KeyProvider`] impl, wiring the
//! parts below together. Each part uses only those listed before it:
//! - `errors`: how an answer maps to denied / unreachable / corrupt / misconfigured;
//! - `credentials`: [`Settings`] and [`Credentials`] from the mount's environment;
//! - `transport`: the HTTP client and one request retried across the HA addresses;
//! - `auth`: the token (lookup, renewal, AppRole login) and a request that logs in again on 403;
//! - `transit`: batched encrypt / decrypt / rewrap on the key;
//! - `kms::pool` and `kms::batcher` (shared with the other network backends): new-file keys
//!   made ahead, and concurrent unwraps sent as one batch.

mod auth;
mod credentials;
mod errors;
mod transit;
mod transport;

pub use credentials::{Credentials, Settings};
pub use transit::MAX_BATCH;

use super::batcher::Batcher;
use super::pool::KeyPool;
use super::{Binding, BoxFuture, Description, KeyProvider, KeyStatus, KmsError, NewFileKey, WrappedDek};
use crate::crypto::SecretKey;
use crate::format::{FileId, VolumeId};
use auth::Auth;
use std::sync::{Arc, OnceLock, Weak};
use transit::Transit;
use transport::Transport;

pub struct OpenBaoKms {
    /// The Transit key, and the server and token to reach it.
    transit: Transit,
    /// Ourselves, for background tasks (set by `connect`).
    me: OnceLock<Weak<OpenBaoKms>>,
    /// Unwraps waiting to be sent as one batch.
    batcher: Batcher,
    /// Pre-wrapped keys for new files of one volume, each used once.
    pool: KeyPool,
    /// Coalescing and pooling can be turned off to measure what they save.
    batching: bool,
}

impl OpenBaoKms {
    /// A provider for `s` with its unwrap batcher running on `runtime`.
    pub fn connect(s: Settings, runtime: &tokio::runtime::Handle) -> Result<Arc<Self>, KmsError> {
        let kms = Arc::new(Self::new(s)?);
        let _in_runtime = runtime.enter();
        kms.start_batcher();
        Ok(kms)
    }

    fn new(s: Settings) -> Result<Self, KmsError> {
        let client_cert = s.client_cert.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
        let transport = Transport::new(s.addrs, s.namespace, s.ca_cert.as_deref(), client_cert)?;
        Ok(OpenBaoKms {
            transit: Transit::new(transport, Auth::new(s.credentials), &s.mount, s.key),
            me: OnceLock::new(),
            batcher: Batcher::new(),
            pool: KeyPool::default(),
            batching: std::env::var_os("KMSFS_NO_BATCHING").is_none(),
        })
    }

    /// Starts the task that coalesces concurrent unwraps into batch requests. Call once,
    /// from inside the runtime, with the backend in an `Arc`.
    fn start_batcher(self: &Arc<Self>) {
        let _ = self.me.set(Arc::downgrade(self));
        if !self.batching {
            log::warn!("KMSFS_NO_BATCHING is set: one KMS request per unwrap and per new file");
            return;
        }
        self.batcher.start(Arc::downgrade(self), MAX_BATCH);
    }

    /// A fresh file id, DEK and wrapped DEK for a new file, from the pool when it has one.
    /// The pool is refilled in the background with one batch request; no key is handed out
    /// twice.
    async fn pooled_file_key(&self, volume_id: VolumeId) -> Result<NewFileKey, KmsError> {
        let me = self.me.get().and_then(Weak::upgrade).filter(|_| self.batching);
        self.pool.take_or_make(me, |k| &k.pool, self, volume_id).await
    }

    async fn unwrap_one(&self, wrapped: &WrappedDek, binding: &Binding) -> Result<SecretKey, KmsError> {
        // The batcher takes its receiver when it starts; until then (or with batching off)
        // ask directly.
        let direct =
            || async { super::single(self.transit.unwrap_batch(&[(wrapped.clone(), *binding)]).await) };
        self.batcher
            .unwrap_or(self.batching, wrapped, binding, direct)
            .await
    }

    async fn probe_binding(&self) -> Result<KeyStatus, KmsError> {
        // Prove the binding: a wrap under one context must not unwrap under another. This also
        // proves we may encrypt and decrypt, and tells us the key's current version.
        let volume = VolumeId::generate();
        let a = Binding::file(volume, FileId::generate());
        let b = Binding::file(volume, FileId::generate());
        let (_, w) = self.generate(&a).await?;
        super::single(self.transit.unwrap_batch(&[(w.clone(), a)]).await)?;
        match super::single(self.transit.unwrap_batch(&[(w.clone(), b)]).await) {
            Err(KmsError::Corrupt(_)) => {}
            Ok(_) => {
                return Err(KmsError::Misconfigured(format!(
                    "Transit key {:?} is not derived, so it would not bind keys to their files; create it with \
                     `bao write {}/keys/NAME type=aes256-gcm96 derived=true`",
                    self.transit.key(),
                    self.transit.mount()
                )));
            }
            Err(e) => return Err(e),
        }
        Ok(KeyStatus {
            key_ref: self.transit.key().to_owned(),
            current_version: self.version_of(&w).unwrap_or(0),
        })
    }
}

impl KeyProvider for OpenBaoKms {
    fn describe(&self) -> Description {
        Description {
            backend: "openbao",
            key_ref: self.transit.key().to_owned(),
        }
    }

    fn generate<'a>(
        &'a self,
        binding: &'a Binding,
    ) -> BoxFuture<'a, Result<(SecretKey, WrappedDek), KmsError>> {
        Box::pin(async move {
            let dek = SecretKey::generate();
            let w = super::single(self.transit.wrap_many(&[(dek.clone(), *binding)]).await)?;
            Ok((dek, w))
        })
    }

    fn generate_many<'a>(
        &'a self,
        bindings: &'a [Binding],
    ) -> BoxFuture<'a, Vec<Result<(SecretKey, WrappedDek), KmsError>>> {
        Box::pin(async move {
            let items = super::fresh_deks(bindings);
            let wrapped = self.transit.wrap_many(&items).await;
            super::with_wraps(items, wrapped)
        })
    }

    fn unwrap<'a>(
        &'a self,
        wrapped: &'a WrappedDek,
        binding: &'a Binding,
    ) -> BoxFuture<'a, Result<SecretKey, KmsError>> {
        Box::pin(self.unwrap_one(wrapped, binding))
    }

    fn unwrap_many<'a>(
        &'a self,
        items: &'a [(WrappedDek, Binding)],
    ) -> BoxFuture<'a, Vec<Result<SecretKey, KmsError>>> {
        Box::pin(self.transit.unwrap_batch(items))
    }

    fn rewrap<'a>(
        &'a self,
        wrapped: &'a WrappedDek,
        binding: &'a Binding,
    ) -> BoxFuture<'a, Result<WrappedDek, KmsError>> {
        Box::pin(async move {
            super::single(
                self.rewrap_many(std::slice::from_ref(&(wrapped.clone(), *binding)))
                    .await,
            )
        })
    }

    fn rewrap_many<'a>(
        &'a self,
        items: &'a [(WrappedDek, Binding)],
    ) -> BoxFuture<'a, Vec<Result<WrappedDek, KmsError>>> {
        Box::pin(self.transit.rewrap_batch(items))
    }

    fn version_of(&self, wrapped: &WrappedDek) -> Option<u32> {
        transit::version_of(&wrapped.blob)
    }

    fn check_access(&self) -> BoxFuture<'_, Result<KeyStatus, KmsError>> {
        Box::pin(self.probe_binding())
    }

    fn new_file_key(&self, volume_id: VolumeId) -> BoxFuture<'_, Result<NewFileKey, KmsError>> {
        Box::pin(self.pooled_file_key(volume_id))
    }

    /// Drops every pooled key (they are wiped as they drop) and pools nothing again.
    fn forget_secrets(&self) {
        self.pool.close();
    }

    fn request_count(&self) -> u64 {
        self.transit.request_count()
    }

    fn set_aside(&self) -> Vec<super::SetAside> {
        self.transit.set_aside()
    }
}
