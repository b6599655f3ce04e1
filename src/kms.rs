//! Key management: the one trait every KMS backend implements ([`KeyProvider`]) and its typed
//! outcomes. One submodule per backend; `volume::key_provider` is the one place a backend is
//! chosen.
//!
//! A backend wraps and unwraps data keys (DEKs) under a key-encryption key (KEK) that it keeps.
//! Every wrapped DEK is bound to a [`Binding`] (the volume, and the file for a file key):
//! unwrapping it under any other binding fails, so a header copied onto another file does not
//! open. Everything above this module (the filesystem core, fsck, rewrap, revocation) holds an
//! `Arc<dyn KeyProvider>` and knows no backend by name; a new backend is one new module here
//! plus one arm in `volume::key_provider`.

pub mod aws;
mod batcher;
pub mod env;
mod http;
mod nodes;
pub use nodes::SetAside;
pub mod kmip;
pub mod local;
pub mod openbao;
mod pool;
mod retry;
mod rtt;
mod wire;

use crate::crypto::SecretKey;
use crate::format::{FileId, VolumeId};
use std::future::Future;
use std::pin::Pin;

/// A boxed future, so that the trait can be used through `dyn`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A DEK as the KMS returned it: opaque bytes plus the reference of the key that wrapped it.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedDek {
    /// Backend-specific key reference (a keystore key name, a Transit key name…).
    pub key_ref: String,
    /// The backend's ciphertext. Not secret, but meaningless without the KEK. A backend that
    /// needs more than the KMS's own ciphertext (a client-chosen IV, say) carries it in here.
    pub blob: Vec<u8>,
}

impl std::fmt::Debug for WrappedDek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WrappedDek({:?}, {} bytes)", self.key_ref, self.blob.len())
    }
}

/// What a wrapped key is bound to: the KMS's associated data or encryption context.
///
/// Structured, not bytes, so each backend can say it in its own terms: an AWS KMS encryption
/// context names both ids as key-value pairs, KMIP's associated data concatenates them, and
/// the v1 backends (local keystore, Transit) bind to [`Binding::v1_context`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Binding {
    pub volume_id: VolumeId,
    /// The file whose DEK this is; `None` for the volume's own keys (the name key).
    pub file_id: Option<FileId>,
}

impl Binding {
    /// The binding of a volume-wide key (the name key).
    pub fn volume(volume_id: VolumeId) -> Self {
        Binding {
            volume_id,
            file_id: None,
        }
    }

    /// The binding of one file's DEK.
    pub fn file(volume_id: VolumeId, file_id: FileId) -> Self {
        Binding {
            volume_id,
            file_id: Some(file_id),
        }
    }

    /// The context bytes format v1 binds to: the file id for a file key, the volume id for a
    /// volume key. Frozen: every v1 volume's wrapped keys were made with exactly these bytes.
    pub fn v1_context(&self) -> Vec<u8> {
        match &self.file_id {
            Some(f) => f.0.to_vec(),
            None => self.volume_id.0.to_vec(),
        }
    }
}

/// A new file's identity and key, as a provider hands it out for `create`.
pub struct NewFileKey {
    pub file_id: FileId,
    pub dek: SecretKey,
    pub wrapped: WrappedDek,
}

/// What a KMS says about the mount's key right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStatus {
    pub key_ref: String,
    /// The version new wraps use.
    pub current_version: u32,
}

/// How a provider names itself in `kmsfs status` and in audit events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Description {
    /// Short backend name: "local", "openbao", …
    pub backend: &'static str,
    /// The key new wraps use, as the KMS names it.
    pub key_ref: String,
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

impl KmsError {
    /// The variant's name, for tests and logs that sort outcomes.
    pub fn kind(&self) -> &'static str {
        match self {
            KmsError::Denied(_) => "Denied",
            KmsError::Unreachable(_) => "Unreachable",
            KmsError::Corrupt(_) => "Corrupt",
            KmsError::Misconfigured(_) => "Misconfigured",
        }
    }
}

impl std::error::Error for KmsError {}

/// A key management backend, used through `Arc<dyn KeyProvider>`.
///
/// Methods return boxed futures because network backends are asynchronous; the local
/// keystore answers at once. Batch methods exist because network backends send them as one
/// request (Transit `batch_input`, KMIP batch items) or as parallel requests under a limit
/// (AWS KMS); their defaults call the single-item methods one after another.
pub trait KeyProvider: Send + Sync {
    /// Backend and key, for status and audit.
    fn describe(&self) -> Description;

    /// A fresh DEK and its wrapped form, bound to `binding`.
    fn generate<'a>(
        &'a self,
        binding: &'a Binding,
    ) -> BoxFuture<'a, Result<(SecretKey, WrappedDek), KmsError>>;

    /// The DEK inside `wrapped`, if it was bound to `binding`. Concurrent calls may be
    /// coalesced into one request.
    fn unwrap<'a>(
        &'a self,
        wrapped: &'a WrappedDek,
        binding: &'a Binding,
    ) -> BoxFuture<'a, Result<SecretKey, KmsError>>;

    /// Re-encrypts `wrapped` under the key's current version without revealing the DEK.
    fn rewrap<'a>(
        &'a self,
        wrapped: &'a WrappedDek,
        binding: &'a Binding,
    ) -> BoxFuture<'a, Result<WrappedDek, KmsError>>;

    /// Proves the mount may use its key (and that the KMS binds keys to their context);
    /// `Denied` when it may not.
    fn check_access(&self) -> BoxFuture<'_, Result<KeyStatus, KmsError>>;

    /// The KEK version a wrapped DEK was made with, if the backend records one.
    fn version_of(&self, wrapped: &WrappedDek) -> Option<u32>;

    /// Many unwraps at once, one result per item in order.
    fn unwrap_many<'a>(
        &'a self,
        items: &'a [(WrappedDek, Binding)],
    ) -> BoxFuture<'a, Vec<Result<SecretKey, KmsError>>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(items.len());
            for (w, b) in items {
                out.push(self.unwrap(w, b).await);
            }
            out
        })
    }

    /// Fresh DEKs for many bindings, one result per item in order.
    fn generate_many<'a>(
        &'a self,
        bindings: &'a [Binding],
    ) -> BoxFuture<'a, Vec<Result<(SecretKey, WrappedDek), KmsError>>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(bindings.len());
            for b in bindings {
                out.push(self.generate(b).await);
            }
            out
        })
    }

    /// Many rewraps at once, one result per item in order.
    fn rewrap_many<'a>(
        &'a self,
        items: &'a [(WrappedDek, Binding)],
    ) -> BoxFuture<'a, Vec<Result<WrappedDek, KmsError>>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(items.len());
            for (w, b) in items {
                out.push(self.rewrap(w, b).await);
            }
            out
        })
    }

    /// A new file's id with its fresh DEK, wrapped and bound to both. Network backends hand
    /// these out from a pool they refill in batches.
    fn new_file_key(&self, volume_id: VolumeId) -> BoxFuture<'_, Result<NewFileKey, KmsError>> {
        Box::pin(fresh_file_key(self, volume_id))
    }

    /// Drops every secret the provider holds beyond the call in flight (pooled new-file keys,
    /// say) and holds none again: called when the mount locks or ends.
    fn forget_secrets(&self) {}

    /// Requests sent to a network KMS so far (0 for one that is not on the network).
    fn request_count(&self) -> u64 {
        0
    }

    /// The KMS nodes this provider stopped asking for a while because they hung (none for a
    /// provider with one node).
    fn set_aside(&self) -> Vec<SetAside> {
        Vec::new()
    }
}

/// A fresh DEK for each binding, to be wrapped in one batch (see [`with_wraps`]).
pub(crate) fn fresh_deks(bindings: &[Binding]) -> Vec<(SecretKey, Binding)> {
    bindings.iter().map(|b| (SecretKey::generate(), *b)).collect()
}

/// Each DEK of `items` with its wrap, or the error of its wrap: a batch `generate_many`.
pub(crate) fn with_wraps(
    items: Vec<(SecretKey, Binding)>,
    wrapped: Vec<Result<WrappedDek, KmsError>>,
) -> Vec<Result<(SecretKey, WrappedDek), KmsError>> {
    items
        .into_iter()
        .zip(wrapped)
        .map(|((dek, _), w)| w.map(|w| (dek, w)))
        .collect()
}

/// The result of a batch of one. A backend that answered with another number of results is
/// reported as unreachable (a server misbehaving), never a panic in the daemon.
pub(crate) fn single<T>(mut results: Vec<Result<T, KmsError>>) -> Result<T, KmsError> {
    match (results.pop(), results.is_empty()) {
        (Some(r), true) => r,
        _ => Err(KmsError::Unreachable(
            "the KMS answered a request for one key with another number of results".into(),
        )),
    }
}

/// A new file id and a DEK generated for it, one request: what [`KeyProvider::new_file_key`]
/// does unless a backend keeps a pool (and what a pool does when it is empty).
pub async fn fresh_file_key<P: KeyProvider + ?Sized>(
    provider: &P,
    volume_id: VolumeId,
) -> Result<NewFileKey, KmsError> {
    let file_id = FileId::generate();
    let (dek, wrapped) = provider.generate(&Binding::file(volume_id, file_id)).await?;
    Ok(NewFileKey {
        file_id,
        dek,
        wrapped,
    })
}

#[cfg(test)]
mod distant;
#[cfg(test)]
mod stub;

#[cfg(test)]
mod single_tests {
    use super::{KmsError, single};

    #[test]
    fn a_batch_of_one_must_answer_one_result() {
        assert_eq!(single(vec![Ok::<u8, KmsError>(7)]).unwrap(), 7);
        let none: Vec<Result<u8, KmsError>> = Vec::new();
        assert!(matches!(single(none), Err(KmsError::Unreachable(_))));
        assert!(matches!(
            single(vec![Ok(1u8), Ok(2)]),
            Err(KmsError::Unreachable(_))
        ));
    }
}
