//! The embedded `local` KMS: a keystore file of named, versioned 256-bit KEKs on this machine.
//!
//! Wrapped DEK = key version (u32 BE) ‖ nonce ‖ AES-256-GCM-SIV(KEK_v, DEK) ‖ tag, with associated
//! data naming the key, its version and the caller's context (the file id). The keystore is
//! re-read whenever it changes on disk, so `kmsfs key disable` takes effect on a live mount at
//! its next unwrap.

use super::{Binding, BoxFuture, Description, KeyProvider, KeyStatus, KmsError, WrappedDek};
use crate::crypto::{Aead, KEY_LEN, NONCE_LEN, SecretKey, TAG_LEN, scrubbed};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use zeroize::Zeroize;

/// Identifies a keystore file and its layout version.
pub const KEYSTORE_FORMAT: &str = "kmsfs-keystore-v1";
/// Associated-data label of a local wrap.
pub const WRAP_AAD_LABEL: &[u8] = b"kmsfs local wrap v1";
/// Length of a locally wrapped DEK.
pub const WRAPPED_LEN: usize = 4 + NONCE_LEN + KEY_LEN + TAG_LEN;
/// A keystore larger than this is refused before parsing.
const MAX_KEYSTORE_LEN: u64 = 1 << 20;

/// Hex key material as it sits in the keystore file; wiped when dropped.
#[derive(Serialize, Deserialize)]
#[serde(transparent)]
struct HexSecret(String);

impl Drop for HexSecret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileVersion {
    version: u32,
    created_unix: u64,
    key_hex: HexSecret,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKey {
    name: String,
    enabled: bool,
    versions: Vec<FileVersion>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKeystore {
    format: String,
    keys: Vec<FileKey>,
}

/// One version of a key.
pub struct KeyVersion {
    pub version: u32,
    pub created_unix: u64,
    secret: SecretKey,
}

/// A named key with its versions; the newest version wraps, all versions unwrap.
pub struct Key {
    pub name: String,
    pub enabled: bool,
    pub versions: Vec<KeyVersion>,
}

impl Key {
    pub fn current(&self) -> &KeyVersion {
        // A key is never created or loaded without a version (checked in `from_file`).
        self.versions.last().expect("key has a version")
    }
}

/// The keystore's contents in memory.
#[derive(Default)]
pub struct Keystore {
    pub keys: Vec<Key>,
}

fn misconfigured(path: &Path, what: &str) -> KmsError {
    KmsError::Misconfigured(format!("keystore {}: {what}", path.display()))
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Keystore {
    /// Reads and checks a keystore file. Refuses a symlink, anything but a regular file, one
    /// owned by someone other than us or root, and one that group or others can read.
    pub fn load(path: &Path) -> Result<Keystore, KmsError> {
        Self::load_stamped(path).map(|(keystore, _)| keystore)
    }

    /// [`Keystore::load`], with the identity of the file it read. The file is opened once, by
    /// descriptor (O_NOFOLLOW|O_NONBLOCK|O_CLOEXEC: a link is not followed, a FIFO does not
    /// block), and its type, owner and mode are checked on that descriptor before its bytes are
    /// read from it: nothing swapped in after the check is read.
    fn load_stamped(path: &Path) -> Result<(Keystore, Stamp), KmsError> {
        let (fd, st) = match crate::sys::open_regular(path, libc::O_RDONLY, 0) {
            Ok(opened) => opened,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(misconfigured(
                    path,
                    "not found; restore it from your backup (without it the volume cannot be opened)",
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                let link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
                return Err(misconfigured(
                    path,
                    &if link {
                        format!(
                            "is a symbolic link, and kmsfs opens a keystore only directly, never \
                             through a link: replace the link with the file it points to \
                             (`readlink -f {}` names it)",
                            path.display()
                        )
                    } else {
                        format!("{e}; restore the keystore file from your backup")
                    },
                ));
            }
            Err(e) => return Err(KmsError::Unreachable(format!("keystore {}: {e}", path.display()))),
        };
        let euid = crate::sys::geteuid();
        if st.st_uid != euid && st.st_uid != 0 {
            return Err(misconfigured(
                path,
                &format!(
                    "owned by uid {}, not by the user running kmsfs (uid {euid}) or root; refusing it",
                    st.st_uid
                ),
            ));
        }
        if st.st_mode & 0o077 != 0 {
            return Err(misconfigured(
                path,
                &format!(
                    "mode {:o} lets group or others read it; run `chmod 600 {}`",
                    st.st_mode & 0o777,
                    path.display()
                ),
            ));
        }
        let file = std::fs::File::from(fd);
        let bytes = zeroize::Zeroizing::new(
            crate::durable::read_all_bounded(&file, st.st_size as u64, MAX_KEYSTORE_LEN).map_err(
                |e| match e.kind() {
                    std::io::ErrorKind::InvalidData => misconfigured(path, &e.to_string()),
                    _ => KmsError::Unreachable(format!("keystore {}: {e}", path.display())),
                },
            )?,
        );
        let file: FileKeystore = serde_json::from_slice(&bytes)
            .map_err(|e| misconfigured(path, &format!("does not parse ({e})")))?;
        let keystore = Self::from_file(file).map_err(|what| misconfigured(path, what))?;
        Ok((keystore, Stamp::of_stat(&st)))
    }

    fn from_file(file: FileKeystore) -> Result<Keystore, &'static str> {
        if file.format != KEYSTORE_FORMAT {
            return Err("unknown keystore format");
        }
        let mut keys = Vec::new();
        for k in file.keys {
            if k.versions.is_empty() {
                return Err("a key has no versions");
            }
            let mut versions = Vec::new();
            for (i, v) in k.versions.iter().enumerate() {
                if v.version as usize != i + 1 {
                    return Err("key versions must be numbered 1, 2, 3…");
                }
                let raw = zeroize::Zeroizing::new(crate::hex::decode(&v.key_hex.0).ok_or("bad key hex")?);
                let secret = SecretKey::from_slice(&raw).ok_or("a key is not 256 bits")?;
                versions.push(KeyVersion {
                    version: v.version,
                    created_unix: v.created_unix,
                    secret,
                });
            }
            keys.push(Key {
                name: k.name,
                enabled: k.enabled,
                versions,
            });
        }
        Ok(Keystore { keys })
    }

    /// Writes the keystore atomically with mode 0600.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let file = FileKeystore {
            format: KEYSTORE_FORMAT.into(),
            keys: self
                .keys
                .iter()
                .map(|k| FileKey {
                    name: k.name.clone(),
                    enabled: k.enabled,
                    versions: k
                        .versions
                        .iter()
                        .map(|v| FileVersion {
                            version: v.version,
                            created_unix: v.created_unix,
                            key_hex: HexSecret(crate::hex::encode(v.secret.expose())),
                        })
                        .collect(),
                })
                .collect(),
        };
        let mut bytes =
            zeroize::Zeroizing::new(serde_json::to_vec_pretty(&file).expect("keystore serialises"));
        bytes.push(b'\n');
        crate::durable::atomic_write(path, &bytes, 0o600)
    }

    pub fn key(&self, name: &str) -> Option<&Key> {
        self.keys.iter().find(|k| k.name == name)
    }

    fn key_mut(&mut self, name: &str) -> Result<&mut Key, String> {
        self.keys
            .iter_mut()
            .find(|k| k.name == name)
            .ok_or_else(|| format!("no key named {name:?} in the keystore"))
    }

    /// Adds a new key with one random version.
    pub fn create_key(&mut self, name: &str) -> Result<(), String> {
        if name.is_empty() || name.len() > crate::format::header::MAX_KEY_REF_LEN {
            return Err("a key name must be 1 to 256 bytes".into());
        }
        if self.key(name).is_some() {
            return Err(format!("a key named {name:?} already exists"));
        }
        self.keys.push(Key {
            name: name.into(),
            enabled: true,
            versions: vec![KeyVersion {
                version: 1,
                created_unix: now_unix(),
                secret: SecretKey::generate(),
            }],
        });
        Ok(())
    }

    /// Adds a new version to a key; new wraps use it, old versions still unwrap.
    pub fn rotate(&mut self, name: &str) -> Result<u32, String> {
        let key = self.key_mut(name)?;
        let version = key.current().version + 1;
        key.versions.push(KeyVersion {
            version,
            created_unix: now_unix(),
            secret: SecretKey::generate(),
        });
        Ok(version)
    }

    pub fn set_enabled(&mut self, name: &str, enabled: bool) -> Result<(), String> {
        self.key_mut(name)?.enabled = enabled;
        Ok(())
    }

    fn usable_key(&self, name: &str) -> Result<&Key, KmsError> {
        let key = self
            .key(name)
            .ok_or_else(|| KmsError::Denied(format!("key {name:?} does not exist in the keystore")))?;
        if !key.enabled {
            return Err(KmsError::Denied(format!("key {name:?} is disabled")));
        }
        Ok(key)
    }

    /// Wraps `dek` under the current version of key `name`, bound to `context`.
    pub fn wrap(&self, name: &str, dek: &SecretKey, context: &[u8]) -> Result<WrappedDek, KmsError> {
        let key = self.usable_key(name)?;
        let v = key.current();
        let aad = wrap_aad(name, v.version, context);
        // One stack scrub for the key schedule and the seal, not one each.
        let sealed = scrubbed(|| Aead::new(&v.secret).seal(&aad, dek.expose()));
        let mut blob = Vec::with_capacity(WRAPPED_LEN);
        blob.extend_from_slice(&v.version.to_be_bytes());
        blob.extend_from_slice(&sealed);
        Ok(WrappedDek {
            key_ref: name.into(),
            blob,
        })
    }

    /// Unwraps a DEK wrapped by [`Keystore::wrap`] with the same key name and context.
    pub fn unwrap(&self, wrapped: &WrappedDek, context: &[u8]) -> Result<SecretKey, KmsError> {
        let key = self.usable_key(&wrapped.key_ref)?;
        if wrapped.blob.len() != WRAPPED_LEN {
            return Err(KmsError::Corrupt(format!(
                "wrapped key is {} bytes, expected {WRAPPED_LEN}",
                wrapped.blob.len()
            )));
        }
        let version = u32::from_be_bytes(wrapped.blob[..4].try_into().expect("4 bytes"));
        let v = key
            .versions
            .iter()
            .find(|v| v.version == version)
            .ok_or_else(|| KmsError::Corrupt(format!("key {:?} has no version {version}", key.name)))?;
        let aad = wrap_aad(&key.name, version, context);
        let dek = scrubbed(|| Aead::new(&v.secret).open(&aad, &wrapped.blob[4..]))
            .map_err(|_| KmsError::Corrupt("the keystore's key does not open this file's key".into()))?;
        SecretKey::from_slice(&dek)
            .ok_or_else(|| KmsError::Corrupt("unwrapped key has the wrong length".into()))
    }
}

fn wrap_aad(name: &str, version: u32, context: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(WRAP_AAD_LABEL.len() + 2 + name.len() + 4 + context.len());
    aad.extend_from_slice(WRAP_AAD_LABEL);
    aad.extend_from_slice(&(name.len() as u16).to_be_bytes());
    aad.extend_from_slice(name.as_bytes());
    aad.extend_from_slice(&version.to_be_bytes());
    aad.extend_from_slice(context);
    aad
}

/// Identity of the keystore file as last read: reload (and so check owner and mode again) when
/// any of these change. The change time moves with every chmod, chown and write.
#[derive(PartialEq, Eq, Clone, Copy)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mode: u32,
    uid: u32,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl Stamp {
    fn of_stat(st: &libc::stat) -> Stamp {
        Stamp {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size as u64,
            mode: st.st_mode,
            uid: st.st_uid,
            mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec,
            ctime_ns: st.st_ctime * 1_000_000_000 + st.st_ctime_nsec,
        }
    }

    /// From the path's own status (lstat): a keystore swapped for a symlink changes it.
    fn of_meta(m: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mode: m.mode(),
            uid: m.uid(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
        }
    }
}

/// The `local` backend: one key of one keystore file.
pub struct LocalKms {
    path: PathBuf,
    key: String,
    /// The keystore as last read and the file identity it was read from. Taken briefly by
    /// every KMS call; held across the re-read so two callers do not parse it twice.
    loaded: Mutex<Option<(Stamp, Arc<Keystore>)>>,
}

impl LocalKms {
    pub fn new(path: PathBuf, key: String) -> Self {
        LocalKms {
            path,
            key,
            loaded: Mutex::new(None),
        }
    }

    /// The keystore as it is on disk now. Re-read, with its type, owner and mode checked again
    /// (`Keystore::load`), whenever the path's own status differs from that of the file last
    /// read: a keystore chmod-ed open, given away or swapped for a link is refused at the next
    /// call, not served from memory.
    fn store(&self) -> Result<Arc<Keystore>, KmsError> {
        let now = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| Stamp::of_meta(&m));
        let mut guard = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let (Some(s), Some((old, store))) = (now, guard.as_ref())
            && s == *old
        {
            return Ok(store.clone());
        }
        *guard = None;
        let (store, read) = Keystore::load_stamped(&self.path)?;
        let store = Arc::new(store);
        // The identity of what was read (from its descriptor), not of what was stat-ed before.
        *guard = Some((read, store.clone()));
        Ok(store)
    }
}

impl KeyProvider for LocalKms {
    fn describe(&self) -> Description {
        Description {
            backend: "local",
            key_ref: self.key.clone(),
        }
    }

    /// Drops the loaded keystore (its KEKs are wiped as they drop): on lock and at the end of
    /// a mount nothing keeps them. A later call would read the file again.
    fn forget_secrets(&self) {
        let dropped = self.loaded.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(dropped);
    }

    fn generate<'a>(
        &'a self,
        binding: &'a Binding,
    ) -> BoxFuture<'a, Result<(SecretKey, WrappedDek), KmsError>> {
        Box::pin(async move {
            let dek = SecretKey::generate();
            let wrapped = self.store()?.wrap(&self.key, &dek, &binding.v1_context())?;
            Ok((dek, wrapped))
        })
    }

    fn unwrap<'a>(
        &'a self,
        wrapped: &'a WrappedDek,
        binding: &'a Binding,
    ) -> BoxFuture<'a, Result<SecretKey, KmsError>> {
        Box::pin(async move { self.store()?.unwrap(wrapped, &binding.v1_context()) })
    }

    fn rewrap<'a>(
        &'a self,
        wrapped: &'a WrappedDek,
        binding: &'a Binding,
    ) -> BoxFuture<'a, Result<WrappedDek, KmsError>> {
        Box::pin(async move {
            let store = self.store()?;
            let context = binding.v1_context();
            let dek = store.unwrap(wrapped, &context)?;
            store.wrap(&self.key, &dek, &context)
        })
    }

    fn version_of(&self, wrapped: &WrappedDek) -> Option<u32> {
        Some(u32::from_be_bytes(wrapped.blob.get(..4)?.try_into().ok()?))
    }

    fn check_access(&self) -> BoxFuture<'_, Result<KeyStatus, KmsError>> {
        Box::pin(async move {
            let store = self.store()?;
            let key = store.usable_key(&self.key)?;
            Ok(KeyStatus {
                key_ref: key.name.clone(),
                current_version: key.current().version,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn ctx(name: &[u8]) -> Binding {
        let mut f = [0u8; crate::format::FILE_ID_LEN];
        f[..name.len()].copy_from_slice(name);
        Binding::file(
            crate::format::VolumeId([9; crate::format::VOLUME_ID_LEN]),
            crate::format::FileId(f),
        )
    }

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ks");
        let mut ks = Keystore::default();
        ks.create_key("default").unwrap();
        ks.save(&p).unwrap();
        (d, p)
    }

    #[test]
    fn wrap_unwrap_is_bound_to_context_and_survives_rotation() {
        let (_d, p) = setup();
        let kms = LocalKms::new(p.clone(), "default".into());
        let (dek, w) = block_on(kms.generate(&ctx(b"file-a"))).unwrap();
        assert_eq!(
            block_on(kms.unwrap(&w, &ctx(b"file-a"))).unwrap().expose(),
            dek.expose()
        );
        assert!(matches!(
            block_on(kms.unwrap(&w, &ctx(b"file-b"))),
            Err(KmsError::Corrupt(_))
        ));

        let mut ks = Keystore::load(&p).unwrap();
        assert_eq!(ks.rotate("default").unwrap(), 2);
        ks.save(&p).unwrap();
        assert_eq!(block_on(kms.check_access()).unwrap().current_version, 2);
        let w2 = block_on(kms.rewrap(&w, &ctx(b"file-a"))).unwrap();
        assert_ne!(w2.blob, w.blob);
        assert_eq!(u32::from_be_bytes(w2.blob[..4].try_into().unwrap()), 2);
        assert_eq!(
            block_on(kms.unwrap(&w2, &ctx(b"file-a"))).unwrap().expose(),
            dek.expose()
        );
        assert_eq!(
            block_on(kms.unwrap(&w, &ctx(b"file-a"))).unwrap().expose(),
            dek.expose()
        );
    }

    #[test]
    fn forget_secrets_drops_the_loaded_keystore() {
        let (_d, p) = setup();
        let kms = LocalKms::new(p.clone(), "default".into());
        let (dek, w) = block_on(kms.generate(&ctx(b"f"))).unwrap();
        assert!(kms.loaded.lock().unwrap().is_some());
        kms.forget_secrets();
        assert!(kms.loaded.lock().unwrap().is_none(), "KEKs still loaded");
        // Nothing is lost: the next call reads the keystore again.
        assert_eq!(
            block_on(kms.unwrap(&w, &ctx(b"f"))).unwrap().expose(),
            dek.expose()
        );
    }

    #[test]
    fn disabled_key_is_denied_on_a_live_kms() {
        let (_d, p) = setup();
        let kms = LocalKms::new(p.clone(), "default".into());
        let (_, w) = block_on(kms.generate(&ctx(b"f"))).unwrap();
        let mut ks = Keystore::load(&p).unwrap();
        ks.set_enabled("default", false).unwrap();
        ks.save(&p).unwrap();
        assert!(matches!(
            block_on(kms.unwrap(&w, &ctx(b"f"))),
            Err(KmsError::Denied(_))
        ));
        assert!(matches!(block_on(kms.check_access()), Err(KmsError::Denied(_))));
    }

    #[test]
    fn open_or_missing_keystore_is_refused_with_advice() {
        let (_d, p) = setup();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        match Keystore::load(&p) {
            Err(KmsError::Misconfigured(m)) => assert!(m.contains("chmod 600"), "{m}"),
            _ => panic!("world-readable keystore accepted"),
        }
        match Keystore::load(&p.with_extension("gone")) {
            Err(KmsError::Misconfigured(m)) => assert!(m.contains("not found"), "{m}"),
            _ => panic!("missing keystore accepted"),
        }
    }

    #[test]
    fn garbled_wrapped_keys_are_corrupt_not_panics() {
        let (_d, p) = setup();
        let ks = Keystore::load(&p).unwrap();
        let w = ks.wrap("default", &SecretKey::generate(), b"c").unwrap();
        for len in [0, 3, 4, WRAPPED_LEN - 1, WRAPPED_LEN + 1] {
            let mut bad = w.clone();
            bad.blob.resize(len, 0);
            assert!(ks.unwrap(&bad, b"c").is_err());
        }
        let mut bad = w.clone();
        bad.blob[0..4].copy_from_slice(&7u32.to_be_bytes());
        assert!(matches!(ks.unwrap(&bad, b"c"), Err(KmsError::Corrupt(_))));
    }
}
