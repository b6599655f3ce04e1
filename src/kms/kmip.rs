//! KMIP: the KEK is a symmetric key object on a KMIP key manager (an HSM-backed one in
//! production), reached over mutual TLS.
//!
//! **Wrapping.** A DEK is generated here (OS RNG) and wrapped with the server's Encrypt under
//! the KEK in AES-GCM, with an IV we choose at random and associated data = volume id ‖ file id
//! (the volume id alone for the volume's own keys): a wrapped DEK copied to another file or
//! volume does not unwrap. The server returns ciphertext and tag; the blob in the header
//! carries the key object's identifier, the IV, the tag and the ciphertext
//! (`kmip::wrapped`). Unwrapping is the server's Decrypt; concurrent unwraps go as batch items
//! of one message, and new-file keys are wrapped ahead in batches (`kms::pool`). The DEK
//! crosses the TLS session in memory only: no key manager stores what it encrypts.
//!
//! **Which key object.** The config names the key by its Name (or Unique Identifier). At
//! mount, and on the watcher's schedule, [`KmipKms::check_access`] locates every object of
//! that name and reads their states: the newest Active one wraps new DEKs; if none is Active
//! (Deactivated, Compromised, Destroyed, or invisible to our certificate) access is *denied*
//! and the mount locks. A header may only name an object of that name: whoever writes the
//! backing directory cannot make us decrypt under some other key we can use. Rotation is a
//! new key object of the same name (ReKey, where the server has it), then `kmsfs rewrap`,
//! and only then the old object is deactivated: Decrypt needs an Active key.
//!
//! The parts: `settings` (addresses and TLS files from the mount's environment), `tls` (the
//! rustls client configuration), `errors` (answers to outcomes), `transport` (one message,
//! retried across the HA addresses, over kept connections).

mod errors;
mod settings;
mod tls;
mod transport;

pub use settings::{ADDR_VAR, CA_VAR, CERT_VAR, KEY_VAR, Settings, parse_addrs};

use super::batcher::Batcher;
use super::pool::KeyPool;
use super::{Binding, BoxFuture, Description, KeyProvider, KeyStatus, KmsError, NewFileKey, WrappedDek};
use crate::crypto::{SecretKey, fill_random};
use crate::format::VolumeId;
use crate::kmip::messages::{self, Failure, Operation, Request, State};
use crate::kmip::ttlv::Item;
use crate::kmip::wrapped::{self, IV_LEN, Wrapped};
use errors::classify;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use transport::Transport;

/// The key objects of the configured key, as the server last listed them.
#[derive(Debug, Clone)]
struct KeySet {
    /// Their identifiers, oldest first: an object's version is its position + 1.
    ids: Vec<String>,
    /// The position of the newest Active one, which wraps new DEKs.
    current: usize,
}

impl KeySet {
    fn current(&self) -> &str {
        &self.ids[self.current]
    }
    fn version_of(&self, id: &str) -> Option<u32> {
        self.ids.iter().position(|i| i == id).map(|p| p as u32 + 1)
    }
}

pub struct KmipKms {
    transport: Transport,
    /// The key's Name or Unique Identifier, as the config gives it.
    key: String,
    /// The key objects, set by `check_access` and refreshed when a header names an object
    /// we have not seen; read by every wrap and unwrap.
    keys: Mutex<Option<Arc<KeySet>>>,
    /// Ourselves, for background tasks (set by `connect`).
    me: OnceLock<Weak<KmipKms>>,
    /// Unwraps waiting to be sent as one message.
    batcher: Batcher,
    /// Pre-wrapped keys for new files of one volume, each used once.
    pool: KeyPool,
    /// Coalescing and pooling can be turned off to measure what they save.
    batching: bool,
    /// Set when the server refused a message of several batch items: one item per message
    /// from then on.
    one_per_message: AtomicBool,
}

impl KmipKms {
    /// A provider for `s` with its unwrap batcher running on `runtime` (no request yet).
    pub fn connect(s: Settings, runtime: &tokio::runtime::Handle) -> Result<Arc<Self>, KmsError> {
        let tls = tls::client_config(&s.ca, &s.cert, &s.client_key)?;
        let kms = Arc::new(KmipKms {
            transport: Transport::new(s.addrs, tls),
            key: s.key,
            keys: Mutex::new(None),
            me: OnceLock::new(),
            batcher: Batcher::new(),
            pool: KeyPool::default(),
            batching: std::env::var_os("KMSFS_NO_BATCHING").is_none(),
            one_per_message: AtomicBool::new(false),
        });
        let _ = kms.me.set(Arc::downgrade(&kms));
        if kms.batching {
            let _in_runtime = runtime.enter();
            kms.batcher.start(Arc::downgrade(&kms), messages::MAX_BATCH);
        }
        Ok(kms)
    }

    /// Sends `batch` in messages of at most `messages::MAX_BATCH` items (one, for a server
    /// that refuses batches); one result per item.
    async fn call(&self, batch: Vec<Request>) -> Result<Vec<Result<Vec<Item>, Failure>>, KmsError> {
        let mut out = Vec::with_capacity(batch.len());
        let mut rest = batch;
        while !rest.is_empty() {
            let size = if self.one_per_message.load(Ordering::Relaxed) {
                1
            } else {
                messages::MAX_BATCH
            };
            let tail = rest.split_off(rest.len().min(size));
            if rest.len() == 1 {
                out.extend(self.transport.send(rest).await?);
                rest = tail;
                continue;
            }
            let results = self.transport.send(rest.clone()).await?;
            if results.iter().all(|r| r.as_ref().is_err_and(refuses_batches)) {
                log::warn!("the KMIP server refuses messages of several batch items: one item per message");
                self.one_per_message.store(true, Ordering::Relaxed);
                rest.extend(tail);
                continue;
            }
            out.extend(results);
            rest = tail;
        }
        Ok(out)
    }

    /// One operation, its payload or its refusal classified.
    async fn call_one(&self, request: Request) -> Result<Vec<Item>, KmsError> {
        let op = request.operation;
        let result = self.call(vec![request]).await?.pop();
        match result {
            Some(Ok(payload)) => Ok(payload),
            Some(Err(f)) => Err(classify(op, &f)),
            None => Err(KmsError::Misconfigured(format!(
                "the KMIP server did not answer {op:?}"
            ))),
        }
    }

    /// Lists the key's objects and their states; refused unless one is Active.
    async fn resolve(&self) -> Result<Arc<KeySet>, KmsError> {
        let malformed = |e: messages::MalformedResponse| KmsError::Misconfigured(e.to_string());
        let located = self.call_one(messages::locate_by_name(&self.key)).await?;
        let mut ids = messages::located_ids(&located).map_err(malformed)?;
        if ids.is_empty() {
            // No object of that name: the config may give a Unique Identifier.
            ids.push(self.key.clone());
        }
        let states = self
            .call(ids.iter().map(|i| messages::get_state(i)).collect())
            .await?;
        let mut objects = Vec::new();
        for (id, r) in ids.into_iter().zip(states) {
            match r {
                Ok(payload) => objects.push((id, messages::key_state(&payload).map_err(malformed)?)),
                // Destroyed since the Locate, or (for an identifier) never ours to see.
                Err(f) if f.reason == Some(messages::reason::ITEM_NOT_FOUND) => {}
                Err(f) => return Err(classify(Operation::GetAttributes, &f)),
            }
        }
        if objects.is_empty() {
            return Err(KmsError::Denied(format!(
                "no KMIP key object named or identified {:?} is visible to this client certificate \
                 (destroyed, or owned by another identity)",
                self.key
            )));
        }
        // Oldest first; the sort is stable, so objects of one date keep the server's order.
        objects.sort_by_key(|(_, s)| s.initial_date);
        let Some(current) = objects.iter().rposition(|(_, s)| s.state == State::Active) else {
            let (id, newest) = objects.last().expect("not empty");
            return Err(KmsError::Denied(format!(
                "KMIP key {:?} has no Active object (the newest, {id:?}, is {:?})",
                self.key, newest.state
            )));
        };
        let set = Arc::new(KeySet {
            ids: objects.into_iter().map(|(id, _)| id).collect(),
            current,
        });
        if !wrapped::valid_key_id(set.current()) {
            return Err(KmsError::Misconfigured(format!(
                "KMIP key object identifier {:?} is too long or has spaces: kmsfs stores it in every header",
                set.current()
            )));
        }
        *self.keys.lock().unwrap_or_else(|p| p.into_inner()) = Some(set.clone());
        Ok(set)
    }

    /// The key objects as last listed, or listed now.
    async fn key_set(&self) -> Result<Arc<KeySet>, KmsError> {
        let known = self.keys.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match known {
            Some(k) => Ok(k),
            None => self.resolve().await,
        }
    }

    /// Wraps each DEK under the current key object, bound to its binding.
    async fn wrap_batch(&self, items: &[(SecretKey, Binding)]) -> Vec<Result<WrappedDek, KmsError>> {
        let keys = match self.key_set().await {
            Ok(k) => k,
            Err(e) => return items.iter().map(|_| Err(e.clone())).collect(),
        };
        let id = keys.current();
        let ivs: Vec<[u8; IV_LEN]> = items
            .iter()
            .map(|_| {
                let mut iv = [0u8; IV_LEN];
                fill_random(&mut iv);
                iv
            })
            .collect();
        let requests = items
            .iter()
            .zip(&ivs)
            .map(|((dek, b), iv)| messages::encrypt(id, dek.expose(), iv, &aad(b)))
            .collect();
        let results = match self.call(requests).await {
            Ok(r) => r,
            Err(e) => return items.iter().map(|_| Err(e.clone())).collect(),
        };
        results
            .into_iter()
            .zip(ivs)
            .map(|(r, iv)| {
                let payload = r.map_err(|f| classify(Operation::Encrypt, &f))?;
                let e = messages::encrypted(&payload).map_err(|e| KmsError::Misconfigured(e.to_string()))?;
                let (Ok(tag), Ok(ciphertext)) =
                    (e.tag.as_slice().try_into(), e.ciphertext.as_slice().try_into())
                else {
                    return Err(KmsError::Misconfigured(format!(
                        "the KMIP server's Encrypt returned {} bytes and a {}-byte tag for a 32-byte key",
                        e.ciphertext.len(),
                        e.tag.len()
                    )));
                };
                let w = Wrapped {
                    key_id: id.to_owned(),
                    iv,
                    tag,
                    ciphertext,
                };
                Ok(WrappedDek {
                    key_ref: self.key.clone(),
                    blob: w.encode().map_err(|e| KmsError::Misconfigured(e.to_string()))?,
                })
            })
            .collect()
    }

    /// Unwraps each item with one Decrypt batch item, after checking the header names one of
    /// our key's objects (listing them again once if it names one we have not seen).
    async fn unwrap_batch(&self, items: &[(WrappedDek, Binding)]) -> Vec<Result<SecretKey, KmsError>> {
        let decoded: Vec<Result<Wrapped, KmsError>> = items
            .iter()
            .map(|(w, _)| Wrapped::decode(&w.blob).map_err(|e| KmsError::Corrupt(e.to_string())))
            .collect();
        let mut keys = match self.key_set().await {
            Ok(k) => k,
            Err(e) => return items.iter().map(|_| Err(e.clone())).collect(),
        };
        let unknown = |k: &KeySet| {
            decoded
                .iter()
                .flatten()
                .any(|w| k.version_of(&w.key_id).is_none())
        };
        if unknown(&keys) {
            match self.resolve().await {
                Ok(k) => keys = k,
                Err(e) => return items.iter().map(|_| Err(e.clone())).collect(),
            }
        }
        let mut out: Vec<Option<Result<SecretKey, KmsError>>> = Vec::with_capacity(items.len());
        let mut requests = Vec::new();
        for ((_, b), w) in items.iter().zip(decoded) {
            match w {
                Ok(w) if keys.version_of(&w.key_id).is_some() => {
                    requests.push(messages::decrypt(
                        &w.key_id,
                        &w.ciphertext,
                        &w.iv,
                        &aad(b),
                        &w.tag,
                    ));
                    out.push(None);
                }
                Ok(w) => out.push(Some(Err(KmsError::Corrupt(format!(
                    "the header names KMIP key object {:?}, which is not one of {:?}'s",
                    w.key_id, self.key
                ))))),
                Err(e) => out.push(Some(Err(e))),
            }
        }
        let mut answers = match self.call(requests).await {
            Ok(r) => r.into_iter(),
            Err(e) => {
                return out
                    .into_iter()
                    .map(|o| o.unwrap_or_else(|| Err(e.clone())))
                    .collect();
            }
        };
        out.into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    let payload = answers
                        .next()
                        .unwrap_or_else(|| {
                            Err(Failure {
                                reason: None,
                                message: "no answer".into(),
                            })
                        })
                        .map_err(|f| classify(Operation::Decrypt, &f))?;
                    let plain =
                        messages::decrypted(&payload).map_err(|e| KmsError::Misconfigured(e.to_string()))?;
                    SecretKey::from_slice(&plain)
                        .ok_or_else(|| KmsError::Corrupt("unwrapped key has the wrong length".into()))
                })
            })
            .collect()
    }

    // Key management, for tests and tooling: kmsfs itself never creates or retires keys.

    /// Creates an AES-256 key object named `name` for Encrypt and Decrypt; its identifier.
    pub async fn create_key(&self, name: &str) -> Result<String, KmsError> {
        let payload = self.call_one(messages::create_aes_key(name)).await?;
        messages::created_id(&payload).map_err(|e| KmsError::Misconfigured(e.to_string()))
    }

    pub async fn activate(&self, id: &str) -> Result<(), KmsError> {
        self.call_one(messages::activate(id)).await.map(drop)
    }

    /// Revokes `id`: Compromised if `compromised`, else Deactivated.
    pub async fn revoke(&self, id: &str, compromised: bool) -> Result<(), KmsError> {
        let code = if compromised {
            messages::revocation::KEY_COMPROMISE
        } else {
            messages::revocation::CESSATION_OF_OPERATION
        };
        self.call_one(messages::revoke(id, code)).await.map(drop)
    }

    pub async fn destroy(&self, id: &str) -> Result<(), KmsError> {
        self.call_one(messages::destroy(id)).await.map(drop)
    }

    async fn pooled_file_key(&self, volume_id: VolumeId) -> Result<NewFileKey, KmsError> {
        let me = self.me.get().and_then(Weak::upgrade).filter(|_| self.batching);
        self.pool.take_or_make(me, |k| &k.pool, self, volume_id).await
    }

    async fn unwrap_one(&self, wrapped: &WrappedDek, binding: &Binding) -> Result<SecretKey, KmsError> {
        let direct = || async { super::single(self.unwrap_batch(&[(wrapped.clone(), *binding)]).await) };
        self.batcher
            .unwrap_or(self.batching, wrapped, binding, direct)
            .await
    }

    async fn status(&self) -> Result<KeyStatus, KmsError> {
        let keys = self.resolve().await?;
        Ok(KeyStatus {
            key_ref: self.key.clone(),
            current_version: keys.current as u32 + 1,
        })
    }
}

/// Whether a failure says the server does not take several batch items in one message.
fn refuses_batches(f: &Failure) -> bool {
    const INVALID_MESSAGE: u32 = 0x04;
    const OPERATION_NOT_SUPPORTED: u32 = 0x05;
    const FEATURE_NOT_SUPPORTED: u32 = 0x08;
    matches!(
        f.reason,
        Some(INVALID_MESSAGE | OPERATION_NOT_SUPPORTED | FEATURE_NOT_SUPPORTED)
    )
}

/// The associated data of a binding: volume id ‖ file id.
fn aad(b: &Binding) -> Vec<u8> {
    wrapped::associated_data(&b.volume_id.0, b.file_id.as_ref().map(|f| &f.0))
}

impl KeyProvider for KmipKms {
    fn describe(&self) -> Description {
        Description {
            backend: "kmip",
            key_ref: self.key.clone(),
        }
    }

    fn generate<'a>(
        &'a self,
        binding: &'a Binding,
    ) -> BoxFuture<'a, Result<(SecretKey, WrappedDek), KmsError>> {
        Box::pin(async move { super::single(self.generate_many(std::slice::from_ref(binding)).await) })
    }

    fn generate_many<'a>(
        &'a self,
        bindings: &'a [Binding],
    ) -> BoxFuture<'a, Vec<Result<(SecretKey, WrappedDek), KmsError>>> {
        Box::pin(async move {
            let items = super::fresh_deks(bindings);
            let wrapped = self.wrap_batch(&items).await;
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
        Box::pin(self.unwrap_batch(items))
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

    /// KMIP has no rewrap: each DEK is decrypted (one batch) and encrypted under the current
    /// key object (another), passing through our memory, wiped as it drops.
    fn rewrap_many<'a>(
        &'a self,
        items: &'a [(WrappedDek, Binding)],
    ) -> BoxFuture<'a, Vec<Result<WrappedDek, KmsError>>> {
        Box::pin(async move {
            let deks = self.unwrap_batch(items).await;
            let mut out: Vec<Option<Result<WrappedDek, KmsError>>> = Vec::with_capacity(items.len());
            let mut todo = Vec::new();
            for ((_, b), d) in items.iter().zip(deks) {
                match d {
                    Ok(dek) => {
                        todo.push((dek, *b));
                        out.push(None);
                    }
                    Err(e) => out.push(Some(Err(e))),
                }
            }
            let mut wrapped = self.wrap_batch(&todo).await.into_iter();
            out.into_iter()
                .map(|o| {
                    o.unwrap_or_else(|| {
                        wrapped
                            .next()
                            .unwrap_or_else(|| Err(KmsError::Misconfigured("no answer".into())))
                    })
                })
                .collect()
        })
    }

    fn check_access(&self) -> BoxFuture<'_, Result<KeyStatus, KmsError>> {
        Box::pin(self.status())
    }

    /// The position of the wrapping key object among the key's, oldest first, as last listed.
    fn version_of(&self, w: &WrappedDek) -> Option<u32> {
        let id = Wrapped::decode(&w.blob).ok()?.key_id;
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner()).clone()?;
        keys.version_of(&id)
    }

    fn new_file_key(&self, volume_id: VolumeId) -> BoxFuture<'_, Result<NewFileKey, KmsError>> {
        Box::pin(self.pooled_file_key(volume_id))
    }

    fn forget_secrets(&self) {
        self.pool.close();
    }

    fn request_count(&self) -> u64 {
        self.transport.request_count()
    }
}
