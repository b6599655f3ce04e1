//! Key management: the trait every KMS backend implements, its typed outcomes, and the enum
//! that picks a backend at run time.
//!
//! A backend wraps and unwraps data keys (DEKs) under a key-encryption key (KEK) that it keeps.
//! Every wrapped DEK is bound to a *context* (the file id): unwrapping it under any other context
//! fails, so a header copied onto another file does not open.

pub mod local;
pub mod openbao;

use crate::crypto::SecretKey;
use std::future::Future;

/// A DEK as the KMS returned it: opaque bytes plus the reference of the key that wrapped it.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedDek {
    /// Backend-specific key reference (a keystore key name, a Transit key name…).
    pub key_ref: String,
    /// The backend's ciphertext. Not secret, but meaningless without the KEK.
    pub blob: Vec<u8>,
}

impl std::fmt::Debug for WrappedDek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WrappedDek({:?}, {} bytes)", self.key_ref, self.blob.len())
    }
}

/// What a KMS says about the mount's key right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStatus {
    pub backend: &'static str,
    pub key_ref: String,
    /// The version new wraps use.
    pub current_version: u32,
}

/// The outcomes a caller must tell apart. They lead to different actions: *denied* locks the
/// mount, *unreachable* retries and serves cached keys, *corrupt* fails one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KmsError {
    /// The KMS answered and refused: key disabled or deleted, credentials revoked.
    Denied(String),
    /// The KMS could not be asked: network down, server sealed or overloaded, file unreadable.
    Unreachable(String),
    /// The KMS answered, but the wrapped key did not unwrap: altered header, wrong context,
    /// or a keystore that is not the one this volume was created with.
    Corrupt(String),
    /// The KMS setup is wrong in a way that needs an admin (missing keystore, bad permissions).
    Misconfigured(String),
}

impl std::fmt::Display for KmsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KmsError::Denied(m) => write!(f, "KMS denied access: {m}"),
            KmsError::Unreachable(m) => write!(f, "KMS unreachable: {m}"),
            KmsError::Corrupt(m) => write!(f, "wrapped key did not unwrap: {m}"),
            KmsError::Misconfigured(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for KmsError {}

/// A key management backend. Async because network backends are; `local` just answers.
pub trait KmsBackend: Send + Sync {
    /// A fresh DEK and its wrapped form, bound to `context`.
    fn generate_dek(
        &self,
        context: &[u8],
    ) -> impl Future<Output = Result<(SecretKey, WrappedDek), KmsError>> + Send;

    /// The DEK inside `wrapped`, if it was bound to `context`.
    fn unwrap_dek(
        &self,
        wrapped: &WrappedDek,
        context: &[u8],
    ) -> impl Future<Output = Result<SecretKey, KmsError>> + Send;

    /// Many unwraps at once; network backends send them as one batch request.
    fn unwrap_many(
        &self,
        items: &[(WrappedDek, Vec<u8>)],
    ) -> impl Future<Output = Vec<Result<SecretKey, KmsError>>> + Send {
        async move {
            let mut out = Vec::with_capacity(items.len());
            for (w, ctx) in items {
                out.push(self.unwrap_dek(w, ctx).await);
            }
            out
        }
    }

    /// Fresh DEKs for many contexts; network backends wrap them in batch requests.
    fn generate_many(
        &self,
        contexts: &[Vec<u8>],
    ) -> impl Future<Output = Vec<Result<(SecretKey, WrappedDek), KmsError>>> + Send {
        async move {
            let mut out = Vec::with_capacity(contexts.len());
            for c in contexts {
                out.push(self.generate_dek(c).await);
            }
            out
        }
    }

    /// Many rewraps at once.
    fn rewrap_many(
        &self,
        items: &[(WrappedDek, Vec<u8>)],
    ) -> impl Future<Output = Vec<Result<WrappedDek, KmsError>>> + Send {
        async move {
            let mut out = Vec::with_capacity(items.len());
            for (w, ctx) in items {
                out.push(self.rewrap(w, ctx).await);
            }
            out
        }
    }

    /// The KEK version a wrapped DEK was made with, if the backend records one.
    fn version_of(&self, wrapped: &WrappedDek) -> Option<u32>;

    /// Re-encrypts `wrapped` under the key's current version without revealing the DEK.
    fn rewrap(
        &self,
        wrapped: &WrappedDek,
        context: &[u8],
    ) -> impl Future<Output = Result<WrappedDek, KmsError>> + Send;

    /// Proves the mount may use its key; `Denied` when it may not.
    fn check_access(&self) -> impl Future<Output = Result<KeyStatus, KmsError>> + Send;
}

/// The backends this build knows, chosen by the volume config.
pub enum Kms {
    Local(local::LocalKms),
    OpenBao(std::sync::Arc<openbao::OpenBaoKms>),
}

impl Kms {
    /// Starts background work (OpenBao's unwrap batcher); call from inside the runtime.
    pub fn start(&self) {
        if let Kms::OpenBao(k) = self {
            k.start_batcher();
        }
    }

    /// A new file's id (the wrap context) with its fresh DEK, wrapped. Network backends hand
    /// these out from a pool refilled in batches.
    pub async fn new_file_key(&self, id_len: usize) -> Result<(Vec<u8>, SecretKey, WrappedDek), KmsError> {
        match self {
            Kms::OpenBao(k) if id_len == 16 => k.new_file_key().await,
            _ => {
                let mut ctx = vec![0u8; id_len];
                crate::crypto::fill_random(&mut ctx);
                let (dek, w) = self.generate_dek(&ctx).await?;
                Ok((ctx, dek, w))
            }
        }
    }

    /// Requests sent to a network KMS so far (0 for the local keystore).
    pub fn request_count(&self) -> u64 {
        match self {
            Kms::Local(_) => 0,
            Kms::OpenBao(k) => k.request_count(),
        }
    }
}

macro_rules! dispatch {
    ($self:ident, $k:ident => $e:expr) => {
        match $self {
            Kms::Local($k) => $e,
            Kms::OpenBao($k) => $e,
        }
    };
}

impl KmsBackend for Kms {
    async fn generate_dek(&self, context: &[u8]) -> Result<(SecretKey, WrappedDek), KmsError> {
        dispatch!(self, k => k.generate_dek(context).await)
    }

    async fn generate_many(&self, contexts: &[Vec<u8>]) -> Vec<Result<(SecretKey, WrappedDek), KmsError>> {
        dispatch!(self, k => k.generate_many(contexts).await)
    }

    async fn unwrap_dek(&self, wrapped: &WrappedDek, context: &[u8]) -> Result<SecretKey, KmsError> {
        dispatch!(self, k => k.unwrap_dek(wrapped, context).await)
    }

    async fn unwrap_many(&self, items: &[(WrappedDek, Vec<u8>)]) -> Vec<Result<SecretKey, KmsError>> {
        dispatch!(self, k => k.unwrap_many(items).await)
    }

    async fn rewrap(&self, wrapped: &WrappedDek, context: &[u8]) -> Result<WrappedDek, KmsError> {
        dispatch!(self, k => k.rewrap(wrapped, context).await)
    }

    async fn rewrap_many(&self, items: &[(WrappedDek, Vec<u8>)]) -> Vec<Result<WrappedDek, KmsError>> {
        dispatch!(self, k => k.rewrap_many(items).await)
    }

    fn version_of(&self, wrapped: &WrappedDek) -> Option<u32> {
        dispatch!(self, k => k.version_of(wrapped))
    }

    async fn check_access(&self) -> Result<KeyStatus, KmsError> {
        dispatch!(self, k => k.check_access().await)
    }
}
