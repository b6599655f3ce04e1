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

use super::{Binding, BoxFuture, Description, KeyProvider, KeyStatus, KmsError, NewFileKey, WrappedDek};
use crate::crypto::{SecretKey, fill_random};
use crate::format::{FileId, VolumeId};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, mpsc, oneshot};
use zeroize::Zeroizing;

/// Items per batch request. The default listener refuses requests with more than 1000 JSON
/// strings; an item with ciphertext and context is 4 strings (plus the key), so 249 fit.
pub const MAX_BATCH: usize = 249;
/// Attempts per request across all servers before a request counts as unreachable.
const ATTEMPTS: u32 = 6;
/// Per-request timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How the daemon proves who it is to the server.
pub enum Credentials {
    Token(Zeroizing<String>),
    AppRole {
        role_id: String,
        secret_id: Zeroizing<String>,
    },
}

/// Everything needed to talk to one Transit key. Built from the volume config (non-secret)
/// and the mount's environment (secrets, CA).
pub struct Settings {
    pub addrs: Vec<String>,
    pub mount: String,
    pub key: String,
    pub namespace: Option<String>,
    pub ca_cert: Option<PathBuf>,
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub credentials: Credentials,
}

fn env_first(names: &[&str]) -> Option<String> {
    names
        .iter()
        .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
}

/// Reads a secret from a file that only its owner may read: opened without following a
/// symlink, then checked on the open descriptor (owner: us or root; no group/other access).
pub fn read_secret_file(path: &Path) -> Result<Zeroizing<String>, KmsError> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let bad = |e: &dyn std::fmt::Display| {
        KmsError::Misconfigured(format!("credential file {}: {e}", path.display()))
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| bad(&e))?;
    let meta = f.metadata().map_err(|e| bad(&e))?;
    if !meta.is_file() || (meta.uid() != 0 && meta.uid() != crate::sys::geteuid()) {
        return Err(bad(
            &"must be a regular file owned by root or by the user running kmsfs",
        ));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(KmsError::Misconfigured(format!(
            "credential file {} is readable by group or others; run `chmod 600 {}`",
            path.display(),
            path.display()
        )));
    }
    let mut bytes = Zeroizing::new(Vec::new());
    f.take(16 * 1024).read_to_end(&mut bytes).map_err(|e| bad(&e))?;
    let s = std::str::from_utf8(&bytes)
        .map_err(|_| KmsError::Misconfigured(format!("credential file {} is not text", path.display())))?;
    Ok(Zeroizing::new(s.trim().to_owned()))
}

impl Credentials {
    /// Credentials from the environment, systemd credentials or files, in that order:
    /// BAO_TOKEN/VAULT_TOKEN, BAO_TOKEN_FILE, $CREDENTIALS_DIRECTORY/bao-token, then AppRole
    /// (BAO_ROLE_ID + BAO_SECRET_ID / BAO_SECRET_ID_FILE / $CREDENTIALS_DIRECTORY/bao-secret-id).
    pub fn from_env() -> Result<Credentials, KmsError> {
        if let Some(t) = env_first(&["BAO_TOKEN", "VAULT_TOKEN"]) {
            return Ok(Credentials::Token(Zeroizing::new(t)));
        }
        let cred_dir = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        if let Some(f) = env_first(&["BAO_TOKEN_FILE", "VAULT_TOKEN_FILE"]) {
            return Ok(Credentials::Token(read_secret_file(Path::new(&f))?));
        }
        if let Some(d) = &cred_dir
            && d.join("bao-token").is_file()
        {
            return Ok(Credentials::Token(read_secret_file(&d.join("bao-token"))?));
        }
        if let Some(role_id) = env_first(&["BAO_ROLE_ID", "VAULT_ROLE_ID"]) {
            let secret_id = if let Some(s) = env_first(&["BAO_SECRET_ID", "VAULT_SECRET_ID"]) {
                Zeroizing::new(s)
            } else if let Some(f) = env_first(&["BAO_SECRET_ID_FILE"]) {
                read_secret_file(Path::new(&f))?
            } else if let Some(d) = cred_dir.as_ref().filter(|d| d.join("bao-secret-id").is_file()) {
                read_secret_file(&d.join("bao-secret-id"))?
            } else {
                return Err(KmsError::Misconfigured(
                    "BAO_ROLE_ID is set but no secret id: set BAO_SECRET_ID or BAO_SECRET_ID_FILE".into(),
                ));
            };
            return Ok(Credentials::AppRole { role_id, secret_id });
        }
        Err(KmsError::Misconfigured(
            "no OpenBao credentials: set BAO_TOKEN (or BAO_TOKEN_FILE, or BAO_ROLE_ID and BAO_SECRET_ID)"
                .into(),
        ))
    }
}

impl Settings {
    /// Settings for a volume: secrets from the environment, addresses from BAO_ADDR/VAULT_ADDR.
    /// The config's addresses are used only when `trust_config` (at `kmsfs init`, where the
    /// admin just typed them): the config lives with the data, and whoever can write it must
    /// not be able to send our token and new keys to a server of their choosing.
    pub fn from_env(
        config_addrs: &[String],
        mount: &str,
        key: &str,
        trust_config: bool,
    ) -> Result<Settings, KmsError> {
        let addrs: Vec<String> = match env_first(&["BAO_ADDR", "VAULT_ADDR"]) {
            Some(a) => a
                .split(',')
                .map(|s| s.trim().trim_end_matches('/').to_owned())
                .collect(),
            None if trust_config => config_addrs.to_vec(),
            None => {
                return Err(KmsError::Misconfigured(format!(
                    "set BAO_ADDR (the volume was made with {}): the server address is taken from the mount's \
                     environment, never from the volume config alone",
                    config_addrs.join(",")
                )));
            }
        };
        if !trust_config && config_addrs.iter().all(|c| !addrs.contains(c)) {
            log::warn!(
                "BAO_ADDR ({}) differs from the addresses the volume was made with ({})",
                addrs.join(","),
                config_addrs.join(",")
            );
        }
        if addrs.is_empty() {
            return Err(KmsError::Misconfigured("no OpenBao address: set BAO_ADDR".into()));
        }
        let client_cert = match (
            env_first(&["BAO_CLIENT_CERT", "VAULT_CLIENT_CERT"]),
            env_first(&["BAO_CLIENT_KEY", "VAULT_CLIENT_KEY"]),
        ) {
            (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
            _ => None,
        };
        Ok(Settings {
            addrs,
            mount: mount.to_owned(),
            key: key.to_owned(),
            namespace: env_first(&["BAO_NAMESPACE", "VAULT_NAMESPACE"]),
            ca_cert: env_first(&["BAO_CACERT", "VAULT_CACERT"]).map(PathBuf::from),
            client_cert,
            credentials: Credentials::from_env()?,
        })
    }
}

/// A token and when to renew it.
struct Session {
    token: Zeroizing<String>,
    /// Renew (or log in again) after this; `None` for tokens that do not expire.
    renew_at: Option<Instant>,
    renewable: bool,
}

type Pending = (WrappedDek, Binding, oneshot::Sender<Result<SecretKey, KmsError>>);

pub struct OpenBaoKms {
    http: reqwest::Client,
    addrs: Vec<String>,
    mount: String,
    key: String,
    namespace: Option<String>,
    credentials: Credentials,
    /// The current token. Taken by every request to read it; held across a login or renewal
    /// so concurrent requests wait for one new token instead of each logging in.
    session: Mutex<Option<Session>>,
    /// Index of the server that answered last: HA clients stick to the active node.
    preferred: AtomicU64,
    /// Ourselves, for background tasks (set by `connect`).
    me: std::sync::OnceLock<std::sync::Weak<OpenBaoKms>>,
    /// Unwraps waiting to be sent as one batch (see `run_batcher`).
    unwrap_queue: mpsc::UnboundedSender<Pending>,
    unwrap_rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<Pending>>>,
    /// HTTP requests sent to the server (for status and tests).
    requests: AtomicU64,
    /// Pre-wrapped keys for new files of one volume, each used once.
    pool: std::sync::Mutex<Pool>,
    /// A background refill of `pool` is under way.
    refilling: std::sync::atomic::AtomicBool,
    /// Set by `clear_pool` (on lock and unmount): nothing is pooled again.
    pool_closed: std::sync::atomic::AtomicBool,
    /// Coalescing and pooling can be turned off to measure what they save.
    batching: bool,
}

/// Refill the pool when it falls below this many keys …
const POOL_LOW: usize = 32;
/// … with one batch of this many.
const POOL_BATCH: usize = 128;
/// Keys made ahead for new files, all bound to one volume.
#[derive(Default)]
struct Pool {
    volume_id: Option<VolumeId>,
    keys: std::collections::VecDeque<NewFileKey>,
}

/// What an HTTP exchange came to.
enum Answer {
    Ok(Value),
    /// A 4xx with an error message.
    Refused(u16, String),
}

fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// Sorts a Transit error message into the trait's outcomes.
fn classify(status: u16, msg: &str) -> KmsError {
    let m = msg.to_owned();
    if status == 403 {
        return KmsError::Denied(format!("permission denied ({m})"));
    }
    if msg.contains("message authentication failed")
        || msg.contains("invalid ciphertext")
        || msg.contains("illegal base64")
        || msg.contains("version is too new")
    {
        return KmsError::Corrupt(m);
    }
    if msg.contains("encryption key not found")
        || msg.contains("soft-deleted")
        || msg.contains("disallowed by policy")
    {
        return KmsError::Denied(m);
    }
    KmsError::Misconfigured(format!("OpenBao refused the request: {m}"))
}

fn error_text(v: &Value) -> String {
    v.get("errors")
        .and_then(|e| e.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join("; "))
        .unwrap_or_default()
        .replace('\n', " ")
        .replace('\t', "")
}

impl OpenBaoKms {
    /// A provider for `s` with its unwrap batcher running on `runtime`.
    pub fn connect(s: Settings, runtime: &tokio::runtime::Handle) -> Result<std::sync::Arc<Self>, KmsError> {
        let kms = std::sync::Arc::new(Self::new(s)?);
        let _in_runtime = runtime.enter();
        kms.start_batcher();
        Ok(kms)
    }

    fn new(s: Settings) -> Result<Self, KmsError> {
        // reqwest is built without a default TLS crypto provider: use ring (installing twice
        // is harmless).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut b = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(3))
            .pool_idle_timeout(Duration::from_secs(60))
            // A redirect would carry the token (and DEKs in the body) to another host.
            .redirect(reqwest::redirect::Policy::none());
        if let Some(ca) = &s.ca_cert {
            let pem = std::fs::read(ca)
                .map_err(|e| KmsError::Misconfigured(format!("CA bundle {}: {e}", ca.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| KmsError::Misconfigured(format!("CA bundle {}: {e}", ca.display())))?;
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        if let Some((cert, key)) = &s.client_cert {
            let mut pem = std::fs::read(cert).map_err(|e| {
                KmsError::Misconfigured(format!("client certificate {}: {e}", cert.display()))
            })?;
            pem.extend_from_slice(
                &std::fs::read(key)
                    .map_err(|e| KmsError::Misconfigured(format!("client key {}: {e}", key.display())))?,
            );
            let id = reqwest::Identity::from_pem(&pem)
                .map_err(|e| KmsError::Misconfigured(format!("client certificate: {e}")))?;
            b = b.identity(id);
        }
        let http = b
            .build()
            .map_err(|e| KmsError::Misconfigured(format!("HTTP client: {e}")))?;
        let (tx, rx) = mpsc::unbounded_channel();
        Ok(OpenBaoKms {
            http,
            addrs: s.addrs,
            mount: s.mount.trim_matches('/').to_owned(),
            key: s.key,
            namespace: s.namespace,
            credentials: s.credentials,
            session: Mutex::new(None),
            preferred: AtomicU64::new(0),
            me: std::sync::OnceLock::new(),
            unwrap_queue: tx,
            unwrap_rx: std::sync::Mutex::new(Some(rx)),
            requests: AtomicU64::new(0),
            pool: std::sync::Mutex::new(Pool::default()),
            refilling: std::sync::atomic::AtomicBool::new(false),
            pool_closed: std::sync::atomic::AtomicBool::new(false),
            batching: std::env::var_os("KMSFS_NO_BATCHING").is_none(),
        })
    }

    /// Starts the task that coalesces concurrent unwraps into batch requests. Call once,
    /// from inside the runtime, with the backend in an `Arc`.
    fn start_batcher(self: &std::sync::Arc<Self>) {
        let _ = self.me.set(std::sync::Arc::downgrade(self));
        if !self.batching {
            log::warn!("KMSFS_NO_BATCHING is set: one KMS request per unwrap and per new file");
            return;
        }
        let rx = self.unwrap_rx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(rx) = rx {
            let me = std::sync::Arc::downgrade(self);
            tokio::spawn(run_batcher(me, rx));
        }
    }

    /// A fresh file id, DEK and wrapped DEK for a new file, from the pool when it has one.
    /// The pool is refilled in the background with one batch request; no key is handed out
    /// twice.
    async fn pooled_file_key(&self, volume_id: VolumeId) -> Result<NewFileKey, KmsError> {
        let Some(me) = self.me.get().and_then(std::sync::Weak::upgrade) else {
            return self.one_new_key(volume_id).await;
        };
        if !self.batching {
            return self.one_new_key(volume_id).await;
        }
        let (taken, left) = {
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            if pool.volume_id != Some(volume_id) {
                // A provider serves one volume; should another ask, start over for it.
                pool.keys.clear();
                pool.volume_id = Some(volume_id);
            }
            (pool.keys.pop_front(), pool.keys.len())
        };
        if left < POOL_LOW && !self.refilling.swap(true, Ordering::AcqRel) {
            tokio::spawn(async move {
                let bindings: Vec<Binding> = (0..POOL_BATCH)
                    .map(|_| Binding::file(volume_id, FileId::generate()))
                    .collect();
                let made = me.generate_many(&bindings).await;
                let mut pool = me.pool.lock().unwrap_or_else(|p| p.into_inner());
                if me.pool_closed.load(Ordering::Acquire) {
                    return; // locked while we were away: drop (and wipe) what we made
                }
                for (b, r) in bindings.into_iter().zip(made) {
                    match (r, b.file_id) {
                        (Ok((dek, wrapped)), Some(file_id)) if pool.volume_id == Some(volume_id) => {
                            pool.keys.push_back(NewFileKey {
                                file_id,
                                dek,
                                wrapped,
                            })
                        }
                        (Err(e), _) => {
                            log::warn!("could not refill the pool of new-file keys: {e}");
                            break;
                        }
                        _ => break,
                    }
                }
                me.refilling.store(false, Ordering::Release);
            });
        }
        match taken {
            Some(k) => Ok(k),
            None => self.one_new_key(volume_id).await,
        }
    }

    async fn one_new_key(&self, volume_id: VolumeId) -> Result<NewFileKey, KmsError> {
        let file_id = FileId::generate();
        let (dek, wrapped) = self.generate(&Binding::file(volume_id, file_id)).await?;
        Ok(NewFileKey {
            file_id,
            dek,
            wrapped,
        })
    }

    fn transit(&self, op: &str) -> String {
        format!("{}/{op}/{}", self.mount, self.key)
    }

    /// One HTTP exchange with retries: connection failures, timeouts, 429, 5xx and standby
    /// answers move on to the next server after a backoff with jitter; 4xx answers are final.
    async fn send(&self, path: &str, body: Option<&Value>, token: Option<&str>) -> Result<Answer, KmsError> {
        let n = self.addrs.len();
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            let idx = (self.preferred.load(Ordering::Relaxed) as usize + attempt as usize) % n;
            let url = format!("{}/v1/{path}", self.addrs[idx]);
            let mut req = match body {
                Some(b) => self.http.post(&url).json(b),
                None => self.http.get(&url),
            };
            if let Some(t) = token {
                req = req.header("X-Vault-Token", t);
            }
            if let Some(ns) = &self.namespace {
                req = req.header("X-Vault-Namespace", ns);
            }
            self.requests.fetch_add(1, Ordering::Relaxed);
            match req.send().await {
                Err(e) if is_certificate_error(&e) => {
                    return Err(KmsError::Misconfigured(format!(
                        "{}: the server's TLS certificate is not trusted ({}); set BAO_CACERT to its CA bundle",
                        self.addrs[idx],
                        describe(&e)
                    )));
                }
                Err(e) => last = format!("{}: {}", self.addrs[idx], describe(&e)),
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let v: Value = resp.json().await.unwrap_or(Value::Null);
                    match status {
                        200..=299 => {
                            self.preferred.store(idx as u64, Ordering::Relaxed);
                            return Ok(Answer::Ok(v));
                        }
                        // A batch with failed items: the per-item results are the answer.
                        400 if v.pointer("/data/batch_results").is_some() => {
                            self.preferred.store(idx as u64, Ordering::Relaxed);
                            return Ok(Answer::Ok(v));
                        }
                        // 3xx: a standby pointing at the active node (which may be the one
                        // that just died): we do not follow it, we try the next address.
                        300..=399 | 429 | 500..=599 => {
                            last = format!("{}: HTTP {status} {}", self.addrs[idx], error_text(&v));
                        }
                        _ => return Ok(Answer::Refused(status, error_text(&v))),
                    }
                }
            }
            // Backoff with jitter: 50 ms, 100 ms, 200 ms … ± 50 %.
            let base = 50u64 << attempt.min(5);
            let mut r = [0u8; 2];
            fill_random(&mut r);
            let jitter = u16::from_le_bytes(r) as u64 % base;
            tokio::time::sleep(Duration::from_millis(base / 2 + jitter)).await;
        }
        Err(KmsError::Unreachable(last))
    }

    /// A usable token: logs in (AppRole) or renews when due.
    async fn token(&self, force_new: bool) -> Result<Zeroizing<String>, KmsError> {
        let mut s = self.session.lock().await;
        let due = match &*s {
            None => true,
            Some(sess) => force_new || sess.renew_at.is_some_and(|t| Instant::now() >= t),
        };
        if !due {
            return Ok(s.as_ref().map(|x| x.token.clone()).expect("session present"));
        }
        // Renew first where we can; log in again where we cannot.
        if let (Some(sess), false) = (s.as_ref(), force_new)
            && sess.renewable
            && let Ok(Answer::Ok(v)) = self
                .send("auth/token/renew-self", Some(&json!({})), Some(&sess.token))
                .await
        {
            let lease = v
                .pointer("/auth/lease_duration")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            let token = sess.token.clone();
            *s = Some(session_from(token, lease, true));
            log::info!("OpenBao token renewed for {lease} s");
            return Ok(s.as_ref().expect("just set").token.clone());
        }
        let new = self.login().await?;
        let token = new.token.clone();
        *s = Some(new);
        Ok(token)
    }

    async fn login(&self) -> Result<Session, KmsError> {
        match &self.credentials {
            Credentials::Token(t) => {
                // A static token: learn its lease so we renew it in time.
                match self.send("auth/token/lookup-self", None, Some(t)).await? {
                    Answer::Ok(v) => {
                        let ttl = v.pointer("/data/ttl").and_then(Value::as_u64).unwrap_or(0);
                        let renewable = v
                            .pointer("/data/renewable")
                            .and_then(Value::as_bool)
                            .unwrap_or(false);
                        Ok(session_from(t.clone(), ttl, renewable))
                    }
                    Answer::Refused(403, _) => Err(KmsError::Denied(
                        "the OpenBao token is invalid, expired or revoked; give the mount a new token".into(),
                    )),
                    Answer::Refused(code, m) => {
                        Err(KmsError::Misconfigured(format!("token lookup: HTTP {code} {m}")))
                    }
                }
            }
            Credentials::AppRole { role_id, secret_id } => {
                let body = json!({"role_id": role_id, "secret_id": secret_id.as_str()});
                match self.send("auth/approle/login", Some(&body), None).await? {
                    Answer::Ok(v) => {
                        let token = v
                            .pointer("/auth/client_token")
                            .and_then(Value::as_str)
                            .ok_or_else(|| {
                                KmsError::Misconfigured("AppRole login returned no token".into())
                            })?;
                        let lease = v
                            .pointer("/auth/lease_duration")
                            .and_then(Value::as_u64)
                            .unwrap_or(0);
                        let renewable = v
                            .pointer("/auth/renewable")
                            .and_then(Value::as_bool)
                            .unwrap_or(false);
                        log::info!("logged in to OpenBao with AppRole (lease {lease} s)");
                        Ok(session_from(Zeroizing::new(token.to_owned()), lease, renewable))
                    }
                    Answer::Refused(_, m) => Err(KmsError::Denied(format!(
                        "AppRole login refused ({m}); check the role id and secret id"
                    ))),
                }
            }
        }
    }

    /// A Transit call with the current token. A 403 is checked with lookup-self: a dead token
    /// means log in again (once); a live one means the policy refuses, which is *denied*.
    async fn call(&self, op: &str, body: &Value) -> Result<Value, KmsError> {
        let path = self.transit(op);
        let mut token = self.token(false).await?;
        for retry in 0..2 {
            match self.send(&path, Some(body), Some(&token)).await? {
                Answer::Ok(v) => return Ok(v),
                Answer::Refused(403, m) => {
                    let alive = matches!(
                        self.send("auth/token/lookup-self", None, Some(&token)).await,
                        Ok(Answer::Ok(_))
                    );
                    if alive || retry == 1 {
                        return Err(KmsError::Denied(format!(
                            "the token may not {op} with key {:?} ({m})",
                            self.key
                        )));
                    }
                    log::warn!("OpenBao token is no longer valid; logging in again");
                    token = self.token(true).await?;
                }
                Answer::Refused(code, m) => return Err(classify(code, &m)),
            }
        }
        unreachable!("loop returns")
    }

    /// Sends `items` to Transit `op` in batch requests (at most [`MAX_BATCH`] each): `input`
    /// makes one batch item, `output` reads one result (`None` for a failed item, whose error
    /// text is then classified).
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
            match self.call(op, &json!({ "batch_input": batch })).await {
                Err(e) => out.extend(chunk.iter().map(|_| Err(e.clone()))),
                Ok(v) => {
                    let results = v.pointer("/data/batch_results").and_then(Value::as_array);
                    for i in 0..chunk.len() {
                        let item = results.and_then(|r| r.get(i));
                        out.push(item.and_then(&output).unwrap_or_else(|| {
                            let why = item.and_then(|i| i.get("error")).and_then(Value::as_str);
                            Err(classify(400, why.unwrap_or("no result")))
                        }));
                    }
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
    async fn wrap_many(&self, items: &[(SecretKey, Binding)]) -> Vec<Result<WrappedDek, KmsError>> {
        self.batched(
            "encrypt",
            items,
            |(dek, b)| {
                json!({"plaintext": Zeroizing::new(b64(dek.expose())).as_str(), "context": b64(&b.v1_context())})
            },
            |item| self.wrapped_from(item),
        )
        .await
    }

    /// Decrypts many wrapped DEKs in batch requests.
    async fn unwrap_batch(&self, items: &[(WrappedDek, Binding)]) -> Vec<Result<SecretKey, KmsError>> {
        self.batched(
            "decrypt",
            items,
            |(w, b)| json!({"ciphertext": String::from_utf8_lossy(&w.blob), "context": b64(&b.v1_context())}),
            |item| {
                let pt = item
                    .get("plaintext")
                    .and_then(Value::as_str)
                    .filter(|p| !p.is_empty())?;
                let raw = Zeroizing::new(B64.decode(pt).unwrap_or_default());
                Some(
                    SecretKey::from_slice(&raw)
                        .ok_or_else(|| KmsError::Corrupt("unwrapped key has the wrong length".into())),
                )
            },
        )
        .await
    }
}

fn session_from(token: Zeroizing<String>, lease_secs: u64, renewable: bool) -> Session {
    Session {
        token,
        // Renew at two thirds of the lease.
        renew_at: (lease_secs > 0).then(|| Instant::now() + Duration::from_secs(lease_secs * 2 / 3)),
        renewable,
    }
}

/// A TLS failure that retrying cannot fix.
fn is_certificate_error(e: &reqwest::Error) -> bool {
    let text = describe(e);
    text.contains("certificate") || text.contains("UnknownIssuer")
}

fn describe(e: &reqwest::Error) -> String {
    use std::error::Error;
    let mut s = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "cannot connect".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Coalesces unwraps: takes whatever is queued (up to a batch) and sends it as one request.
/// While a batch is in flight, new requests queue up and go together in the next one.
async fn run_batcher(kms: std::sync::Weak<OpenBaoKms>, mut rx: mpsc::UnboundedReceiver<Pending>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let Some(kms) = kms.upgrade() else { return };
        let items: Vec<(WrappedDek, Binding)> = batch.iter().map(|(w, b, _)| (w.clone(), *b)).collect();
        let results = kms.unwrap_batch(&items).await;
        for ((_, _, reply), r) in batch.into_iter().zip(results) {
            let _ = reply.send(r);
        }
    }
}

impl OpenBaoKms {
    async fn unwrap_one(&self, wrapped: &WrappedDek, binding: &Binding) -> Result<SecretKey, KmsError> {
        let direct = || async {
            self.unwrap_batch(&[(wrapped.clone(), *binding)])
                .await
                .pop()
                .expect("one result")
        };
        let (tx, rx) = oneshot::channel();
        // The batcher takes the receiver when it starts; until then (or with batching off)
        // ask directly.
        let batcher_running =
            self.batching && self.unwrap_rx.lock().unwrap_or_else(|p| p.into_inner()).is_none();
        if !batcher_running || self.unwrap_queue.send((wrapped.clone(), *binding, tx)).is_err() {
            return direct().await;
        }
        match rx.await {
            Ok(r) => r,
            // The batcher is not running (shutting down): ask directly.
            Err(_) => direct().await,
        }
    }

    async fn probe_binding(&self) -> Result<KeyStatus, KmsError> {
        // Prove the binding: a wrap under one context must not unwrap under another. This also
        // proves we may encrypt and decrypt, and tells us the key's current version.
        let volume = VolumeId::generate();
        let a = Binding::file(volume, FileId::generate());
        let b = Binding::file(volume, FileId::generate());
        let (_, w) = self.generate(&a).await?;
        self.unwrap_batch(&[(w.clone(), a)])
            .await
            .pop()
            .expect("one result")?;
        match self
            .unwrap_batch(&[(w.clone(), b)])
            .await
            .pop()
            .expect("one result")
        {
            Err(KmsError::Corrupt(_)) => {}
            Ok(_) => {
                return Err(KmsError::Misconfigured(format!(
                    "Transit key {:?} is not derived, so it would not bind keys to their files; create it with \
                     `bao write {}/keys/NAME type=aes256-gcm96 derived=true`",
                    self.key, self.mount
                )));
            }
            Err(e) => return Err(e),
        }
        Ok(KeyStatus {
            key_ref: self.key.clone(),
            current_version: self.version_of(&w).unwrap_or(0),
        })
    }
}

impl KeyProvider for OpenBaoKms {
    fn describe(&self) -> Description {
        Description {
            backend: "openbao",
            key_ref: self.key.clone(),
        }
    }

    fn generate<'a>(
        &'a self,
        binding: &'a Binding,
    ) -> BoxFuture<'a, Result<(SecretKey, WrappedDek), KmsError>> {
        Box::pin(async move {
            let dek = SecretKey::generate();
            let w = self
                .wrap_many(&[(dek.clone(), *binding)])
                .await
                .pop()
                .expect("one result per item")?;
            Ok((dek, w))
        })
    }

    fn generate_many<'a>(
        &'a self,
        bindings: &'a [Binding],
    ) -> BoxFuture<'a, Vec<Result<(SecretKey, WrappedDek), KmsError>>> {
        Box::pin(async move {
            let items: Vec<(SecretKey, Binding)> =
                bindings.iter().map(|b| (SecretKey::generate(), *b)).collect();
            let wrapped = self.wrap_many(&items).await;
            items
                .into_iter()
                .zip(wrapped)
                .map(|((dek, _), w)| w.map(|w| (dek, w)))
                .collect()
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
            self.rewrap_many(std::slice::from_ref(&(wrapped.clone(), *binding)))
                .await
                .pop()
                .expect("one result")
        })
    }

    fn rewrap_many<'a>(
        &'a self,
        items: &'a [(WrappedDek, Binding)],
    ) -> BoxFuture<'a, Vec<Result<WrappedDek, KmsError>>> {
        Box::pin(self.batched(
            "rewrap",
            items,
            |(w, b)| json!({"ciphertext": String::from_utf8_lossy(&w.blob), "context": b64(&b.v1_context())}),
            |item| self.wrapped_from(item),
        ))
    }

    fn version_of(&self, wrapped: &WrappedDek) -> Option<u32> {
        // "vault:v<N>:…"
        let s = std::str::from_utf8(&wrapped.blob).ok()?;
        s.strip_prefix("vault:v")?.split(':').next()?.parse().ok()
    }

    fn check_access(&self) -> BoxFuture<'_, Result<KeyStatus, KmsError>> {
        Box::pin(self.probe_binding())
    }

    fn new_file_key(&self, volume_id: VolumeId) -> BoxFuture<'_, Result<NewFileKey, KmsError>> {
        Box::pin(self.pooled_file_key(volume_id))
    }

    /// Drops every pooled key (they are wiped as they drop) and pools nothing again.
    fn forget_secrets(&self) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        self.pool_closed.store(true, Ordering::Release);
        pool.keys.clear();
    }

    fn request_count(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}
