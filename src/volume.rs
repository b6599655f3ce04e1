//! Opening a volume, the same way for every command: read and check its config, decide where
//! its keys come from, build the key provider, prove access, unwrap the name key.
//!
//! The mount, `fsck`, `rewrap` and `key --volume` all start here, so a check added here (a
//! trust anchor, a config MAC) holds for all of them.

use crate::exit::Fatal;
use crate::fatal;
use crate::format::VolumeId;
use crate::format::config::{
    CONFIG_FILE_NAME, KmsConfig, LOCK_FILE_NAME, MAX_CONFIG_LEN, NamesConfig, VolumeConfig,
};
use crate::format::name::{DIR_ID_LEN, NameCipher};
use crate::fs::names::Names;
use crate::kms::local::LocalKms;
use crate::kms::{Binding, KeyProvider, KeyStatus, KmsError, WrappedDek};
use crate::kms::{aws, kmip, openbao};
use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A volume's backing directory and its checked config, before any KMS is asked.
pub struct Located {
    /// The backing directory, canonical.
    pub backing: PathBuf,
    /// The config as stored, checked against the anchor (its MAC is checked by
    /// [`Volume::check_access`], which needs the KMS).
    pub config: VolumeConfig,
    /// Where the volume's keys are: from the anchor.
    pub kms: KmsConfig,
}

/// An open volume: its config and the key provider that holds its keys.
pub struct Volume {
    /// The backing directory, canonical.
    pub backing: PathBuf,
    pub config: VolumeConfig,
    pub id: VolumeId,
    pub kms: Arc<dyn KeyProvider>,
}

impl Located {
    /// Finds the volume in `backing` and checks its config against this machine's settings
    /// for it (the anchor): where its keys are comes from the anchor, never from the config.
    pub fn find(backing: &Path) -> Result<Located, Fatal> {
        Self::find_with(backing, None)
    }

    /// [`Located::find`] with the anchor at `anchor` (from `--anchor` or fstab's `anchor=`)
    /// instead of where [`crate::anchor::path_for`] looks.
    pub fn find_with(backing: &Path, anchor: Option<&Path>) -> Result<Located, Fatal> {
        let (canonical, config) = read(backing)?;
        let anchor_path = match anchor {
            Some(p) => p.to_path_buf(),
            None => crate::anchor::path_for(&canonical),
        };
        let Some(anchor) = crate::anchor::load(&anchor_path)? else {
            return Err(fatal!(
                "this machine has no settings for the volume in {} ({} is missing): where its keys are \
                 must not come from the backing directory alone; if this is your volume, check what \
                 `kmsfs anchor {}` shows and confirm",
                canonical.display(),
                anchor_path.display(),
                canonical.display()
            ));
        };
        anchor.check(&canonical, &config, &anchor_path)?;
        check_kms_location(&anchor.kms, &canonical)?;
        Ok(Located {
            backing: canonical,
            config,
            kms: anchor.kms,
        })
    }

    /// Builds the volume's key provider from the anchor's settings (no KMS request yet);
    /// background work it needs runs on `runtime`.
    pub fn connect(self, runtime: &tokio::runtime::Handle) -> Result<Volume, Fatal> {
        // The anchor is this machine's own record, so its server addresses may be used as
        // they are (`BAO_ADDR` still overrides them).
        let kms = key_provider(&self.kms, true, runtime).map_err(explain_kms)?;
        Ok(Volume {
            backing: self.backing,
            id: self.config.volume_id(),
            config: self.config,
            kms,
        })
    }
}

/// The canonical backing directory and its config as stored (not yet trusted).
pub fn read(backing: &Path) -> Result<(PathBuf, VolumeConfig), Fatal> {
    let canonical = std::fs::canonicalize(backing).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            fatal!("backing directory {} does not exist", backing.display())
        } else {
            fatal!("backing directory {}: {e}", backing.display())
        }
    })?;
    let config = load_config(&canonical)?;
    Ok((canonical, config))
}

impl Volume {
    /// [`Located::find`] then [`Located::connect`].
    pub fn open(backing: &Path, runtime: &tokio::runtime::Handle) -> Result<Volume, Fatal> {
        Located::find(backing)?.connect(runtime)
    }

    /// Proves the mount may use its key, and that the config is the one kmsfs wrote: its MAC
    /// is checked under the volume key, which the anchored KMS unwraps. Every command calls
    /// this before it trusts anything in the config.
    pub fn check_access(&self, rt: &tokio::runtime::Runtime) -> Result<KeyStatus, Fatal> {
        let status = rt.block_on(self.kms.check_access()).map_err(explain_kms)?;
        let key = self.volume_key(rt)?;
        if !self.config.mac_matches(&key) {
            return Err(fatal!(
                "the volume config in {} fails its authentication: it was changed outside kmsfs and is \
                 not trusted; restore kmsfs.json from a backup",
                self.backing.display()
            ));
        }
        Ok(status)
    }

    /// The volume key (the config's MAC key), unwrapped by the KMS.
    pub fn volume_key(&self, rt: &tokio::runtime::Runtime) -> Result<crate::crypto::SecretKey, Fatal> {
        let Some(k) = &self.config.volume_key else {
            return Err(fatal!(
                "the volume config in {} carries no volume key: it was changed outside kmsfs and is not \
                 trusted; restore kmsfs.json from a backup",
                self.backing.display()
            ));
        };
        let wrapped = WrappedDek {
            key_ref: k.key_ref.clone(),
            blob: crate::hex::decode(&k.wrapped).unwrap_or_default(),
        };
        rt.block_on(self.kms.unwrap(&wrapped, &Binding::volume(self.id)))
            .map_err(|e| match e {
                KmsError::Corrupt(m) if let Some(f) = self.missing_version(rt, &wrapped) => {
                    log::debug!("volume key: {m}");
                    f
                }
                KmsError::Corrupt(m) => fatal!(
                    "the KMS could not unwrap the volume key of {} ({m}): is this the volume's keystore? \
                     If it is, the config was changed outside kmsfs: restore kmsfs.json from a backup",
                    self.backing.display()
                ),
                e => explain_kms(e),
            })
    }

    /// If `wrapped` needs a newer key version than the KMS has (a keystore restored from a
    /// backup taken before a rotate and rewrap), the error that says so and what to do.
    fn missing_version(&self, rt: &tokio::runtime::Runtime, wrapped: &WrappedDek) -> Option<Fatal> {
        let needed = self.kms.version_of(wrapped)?;
        let have = rt.block_on(self.kms.check_access()).ok()?;
        (needed > have.current_version).then(|| {
            fatal!(
                "the volume's keys need version {needed} of key {:?}, but the KMS has it only up to version {}: \
                 the keystore is older than the volume (restored from a backup taken before a `key rotate`?); \
                 restore a newer backup of it (one that lists version {needed})",
                have.key_ref,
                have.current_version
            )
        })
    }

    /// Unwraps the volume name key (bound to the volume id) and derives the name ciphers.
    pub fn names(&self, rt: &tokio::runtime::Runtime) -> Result<Names, Fatal> {
        let NamesConfig::Encrypted {
            root_dir_id,
            key_ref,
            wrapped_key,
        } = &self.config.names
        else {
            return Ok(Names::Plain);
        };
        let wrapped = WrappedDek {
            key_ref: key_ref.clone(),
            blob: crate::hex::decode(wrapped_key).unwrap_or_default(),
        };
        let key = rt
            .block_on(self.kms.unwrap(&wrapped, &Binding::volume(self.id)))
            .map_err(explain_kms)?;
        let mut root = [0u8; DIR_ID_LEN];
        // Validated when the config was decoded.
        if let Some(id) = crate::hex::decode(root_dir_id).filter(|b| b.len() == DIR_ID_LEN) {
            root.copy_from_slice(&id);
        }
        Ok(Names::Encrypted {
            cipher: Box::new(NameCipher::new(&key, &self.id.0, self.config.format_version)),
            root_dir_id: root,
        })
    }

    /// The binding of one of this volume's files.
    pub fn file_binding(&self, file_id: crate::format::FileId) -> Binding {
        Binding::file(self.id, file_id)
    }
}

/// The provider for a volume's KMS settings: the one place a backend is chosen (a new backend
/// is a module under `kms/` and one arm here). Background work a backend needs (OpenBao's
/// unwrap batcher) is spawned on `runtime`.
///
/// `trust_config`: the settings were just typed by the admin (`kmsfs init`), so addresses in
/// them may be used without a mount-side setting (see `openbao::Settings::from_env`).
pub fn key_provider(
    config: &KmsConfig,
    trust_config: bool,
    runtime: &tokio::runtime::Handle,
) -> Result<Arc<dyn KeyProvider>, KmsError> {
    Ok(match config {
        KmsConfig::Local { keystore, key } => Arc::new(LocalKms::new(keystore.clone(), key.clone())),
        KmsConfig::Openbao { addrs, mount, key } => {
            let settings = openbao::Settings::from_env(addrs, mount, key, trust_config)?;
            openbao::OpenBaoKms::connect(settings, runtime)?
        }
        KmsConfig::Kmip { addrs, key } => {
            let settings = kmip::Settings::from_env(addrs, key, trust_config)?;
            kmip::KmipKms::connect(settings, runtime)?
        }
        KmsConfig::AwsKms { key, region } => aws::AwsKms::connect(aws::Settings::from_env(key, region)?)?,
    })
}

/// Reads and validates the volume config of a backing directory.
pub fn load_config(backing: &Path) -> Result<VolumeConfig, Fatal> {
    let path = backing.join(CONFIG_FILE_NAME);
    let bytes = match crate::durable::read_bounded(&path, MAX_CONFIG_LEN as u64) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !backing.is_dir() {
                return Err(fatal!("backing directory {} does not exist", backing.display()));
            }
            return Err(fatal!(
                "{} is not a kmsfs volume (no {CONFIG_FILE_NAME}); create one with `kmsfs init {}`",
                backing.display(),
                backing.display()
            ));
        }
        Err(e) => return Err(fatal!("cannot read {}: {e}", path.display())),
    };
    VolumeConfig::decode(&bytes).map_err(|e| fatal!("{}: {e}", path.display()))
}

/// Whoever can write the backing directory must never hold the keys: a local keystore must
/// live outside it and belong to the user running kmsfs (checked on the anchor's settings,
/// so also a mistyped anchor is caught).
pub fn check_kms_location(kms: &KmsConfig, backing: &Path) -> Result<(), Fatal> {
    match kms {
        // Their addresses can be pinned on the mount side (BAO_ADDR, KMSFS_KMIP_ADDR); the
        // KMIP client certificate and key come from the mount's environment only.
        KmsConfig::Openbao { .. } | KmsConfig::Kmip { .. } => Ok(()),
        // Its endpoint comes from the mount side only (AWS_ENDPOINT_URL_KMS), never the config.
        KmsConfig::AwsKms { .. } => Ok(()),
        KmsConfig::Local { keystore, .. } => {
            let real = std::fs::canonicalize(keystore).unwrap_or_else(|_| keystore.clone());
            if real.starts_with(backing) {
                return Err(fatal!(
                    "the volume config points at a keystore inside the backing directory ({}); refusing: \
                     whoever can write the backing directory could supply their own keys",
                    keystore.display()
                ));
            }
            if let Ok(meta) = std::fs::metadata(&real)
                && meta.uid() != crate::sys::geteuid()
            {
                return Err(fatal!(
                    "keystore {} is owned by uid {}, not by the user running kmsfs; refusing it",
                    keystore.display(),
                    meta.uid()
                ));
            }
            Ok(())
        }
    }
}

/// A KMS error as the admin should read it when a command or a mount starts. A refusal
/// becomes [`Fatal::denied`], which a daemon turns into [`crate::exit::LOCKED`].
pub fn explain_kms(e: KmsError) -> Fatal {
    match e {
        KmsError::Denied(m) => Fatal::denied(format!(
            "the KMS refuses this volume's key ({m}); re-enable the key or restore access"
        )),
        KmsError::Unreachable(m) => fatal!("cannot reach the KMS ({m}); check that it is up and try again"),
        KmsError::Corrupt(m) => {
            fatal!("the KMS could not unwrap a key ({m}): is this the volume's keystore?")
        }
        KmsError::Misconfigured(m) => Fatal::new(m),
    }
}

/// A runtime for KMS calls from a command (fsck, rewrap, init): one thread is plenty.
pub fn cli_runtime() -> Result<tokio::runtime::Runtime, Fatal> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fatal!("cannot start the KMS runtime: {e}"))
}

/// The backing directory's lock file, held by whoever may change the volume (the daemon, or
/// `kmsfs fsck --repair`).
pub enum VolumeLock {
    /// Ours until dropped; it holds our pid, so a refused mount can name us.
    Held(File),
    /// Another process holds it; its pid as it wrote it.
    Busy { pid: String },
}

pub fn lock_volume(backing: &Path) -> Result<VolumeLock, Fatal> {
    let path = backing.join(LOCK_FILE_NAME);
    // Whoever can write the backing directory may have put a symlink, a FIFO, a device or a
    // hard link to some other file here: follow no link, open nothing but a regular file
    // (`sys::open_regular`: checked on a descriptor before it is opened for real), and write
    // only to one with no other name.
    let refuse = |what: &str| {
        fatal!(
            "refusing lock file {}: {what} (kmsfs writes its lock only to a regular file of its \
             own, never through a link); remove it (`rm {}`) and try again",
            path.display(),
            path.display()
        )
    };
    let (fd, st) = match crate::sys::open_regular(&path, libc::O_RDWR | libc::O_CREAT, 0o600) {
        Ok(opened) => opened,
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => return Err(refuse(&e.to_string())),
        Err(e) => return Err(fatal!("cannot open lock file {}: {e}", path.display())),
    };
    if st.st_nlink != 1 {
        return Err(refuse(&format!("it has {} hard links", st.st_nlink)));
    }
    let mut f = File::from(fd);
    match crate::sys::try_lock_exclusive(f.as_fd()) {
        Ok(true) => {}
        Ok(false) => {
            // A pid is a few bytes, read from the descriptor we hold; only its digits reach a
            // message (the file sits in the backing directory).
            let mut buf = [0u8; 32];
            let n = crate::durable::read_up_to(&f, &mut buf).unwrap_or(0);
            let pid = buf[..n]
                .iter()
                .map(|&b| b as char)
                .filter(char::is_ascii_digit)
                .collect();
            return Ok(VolumeLock::Busy { pid });
        }
        Err(e) => return Err(fatal!("cannot lock {}: {e}", path.display())),
    }
    f.set_len(0).ok();
    let _ = writeln!(f, "{}", std::process::id());
    Ok(VolumeLock::Held(f))
}
