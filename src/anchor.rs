//! The mount side's own record of a volume: which volume lives in a backing directory, which
//! KMS and key hold its keys, and how its names are stored. The trust anchor.
//!
//! The volume config (`kmsfs.json`) lives with the data, on storage that may be hostile:
//! whoever can write it could point the mount at a keystore or server of their own, or turn
//! name encryption off. So the KMS settings are taken from the anchor, a small file on the
//! machine that mounts (`/etc/kmsfs/anchors/`, or `KMSFS_ANCHOR_DIR`, or one file named by
//! `KMSFS_ANCHOR`), written by `kmsfs init` or, for a volume made elsewhere or before anchors
//! existed, by `kmsfs anchor BACKING` after the admin has checked what it shows. The config
//! may only agree with the anchor, and an anchored volume's config must carry a valid MAC
//! (checked with a key the anchored KMS unwraps), so no field of it can be changed unseen.

use crate::exit::Fatal;
use crate::fatal;
use crate::format::config::{KmsConfig, NamesConfig, VolumeConfig};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Identifies an anchor file and its layout version.
pub const ANCHOR_FORMAT: &str = "kmsfs-anchor-v1";
/// An anchor larger than this is refused before parsing.
const MAX_ANCHOR_LEN: u64 = 64 * 1024;
/// Names one anchor file (overrides the directory).
pub const ANCHOR_ENV: &str = "KMSFS_ANCHOR";
/// The directory of anchors, one per backing directory.
pub const ANCHOR_DIR_ENV: &str = "KMSFS_ANCHOR_DIR";

/// What the mount side knows of one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Anchor {
    pub format: String,
    /// The backing directory it was made for (canonical), so one anchor cannot serve another.
    pub backing: PathBuf,
    /// The volume id, hex.
    pub volume_id: String,
    /// "encrypted" or "plaintext": a config may not switch name encryption off.
    pub names: String,
    /// Where the volume's keys are.
    pub kms: KmsConfig,
}

fn names_mode(n: &NamesConfig) -> &'static str {
    match n {
        NamesConfig::Encrypted { .. } => "encrypted",
        NamesConfig::Plaintext => "plaintext",
    }
}

impl Anchor {
    /// The anchor for a volume whose config the admin has checked.
    pub fn for_config(backing: &Path, config: &VolumeConfig) -> Anchor {
        Anchor {
            format: ANCHOR_FORMAT.into(),
            backing: backing.to_path_buf(),
            volume_id: config.volume_id.clone(),
            names: names_mode(&config.names).into(),
            kms: config.kms.clone(),
        }
    }

    /// Refuses a config that disagrees with the anchor, naming what differs. The config is
    /// stored with the data: it may confirm the anchor, never override it.
    pub fn check(&self, backing: &Path, config: &VolumeConfig, anchor_path: &Path) -> Result<(), Fatal> {
        let untrusted = |what: String| {
            fatal!(
                "the volume config in {} {what}, but this machine's settings for it ({}) say otherwise: \
                 the config was changed outside kmsfs and is not trusted; restore kmsfs.json from a backup",
                backing.display(),
                anchor_path.display()
            )
        };
        if self.backing != backing {
            return Err(fatal!(
                "the settings in {} are for the volume in {}, not {}",
                anchor_path.display(),
                self.backing.display(),
                backing.display()
            ));
        }
        if config.volume_id != self.volume_id {
            return Err(untrusted(format!("names volume {}", config.volume_id)));
        }
        if config.kms != self.kms {
            return Err(untrusted("names another KMS or key".into()));
        }
        if names_mode(&config.names) != self.names {
            return Err(untrusted(format!("says names are {}", names_mode(&config.names))));
        }
        if config.mac.is_none() {
            return Err(untrusted("carries no authentication (mac)".into()));
        }
        Ok(())
    }
}

/// The default directory of anchors: /etc/kmsfs/anchors for root, ~/.config/kmsfs/anchors
/// for anyone else.
fn default_dir() -> PathBuf {
    if let Some(d) = std::env::var_os(ANCHOR_DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if crate::sys::geteuid() == 0 {
        return PathBuf::from("/etc/kmsfs/anchors");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/".into());
    home.join(".config/kmsfs/anchors")
}

/// Where the anchor of the volume in `backing` (canonical) is: `KMSFS_ANCHOR`, or a file in
/// the anchor directory named after the backing directory and a hash of its whole path (so
/// `/a-b` and `/a/b` never share one).
pub fn path_for(backing: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os(ANCHOR_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    use sha2::Digest;
    let hash = sha2::Sha256::digest(backing.as_os_str().as_encoded_bytes());
    let leaf: String = backing
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    default_dir().join(format!("{leaf}-{}.json", crate::hex::encode(&hash[..8])))
}

/// Reads the anchor at `path`, if there is one. It must be a regular file (not followed
/// through a symlink) owned by root or by us, writable by nobody else.
pub fn load(path: &Path) -> Result<Option<Anchor>, Fatal> {
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(fatal!("volume settings {}: {e}", path.display())),
    };
    let meta = f
        .metadata()
        .map_err(|e| fatal!("volume settings {}: {e}", path.display()))?;
    if !meta.is_file() || (meta.uid() != 0 && meta.uid() != crate::sys::geteuid()) || meta.mode() & 0o022 != 0
    {
        return Err(fatal!(
            "volume settings {} must be a regular file owned by root (or by the user running kmsfs) \
             that no one else can write",
            path.display()
        ));
    }
    check_dir(path)?;
    let mut bytes = Vec::new();
    f.take(MAX_ANCHOR_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fatal!("volume settings {}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_ANCHOR_LEN {
        return Err(fatal!("volume settings {} are too large", path.display()));
    }
    let anchor: Anchor = serde_json::from_slice(&bytes)
        .map_err(|e| fatal!("volume settings {} do not parse: {e}", path.display()))?;
    if anchor.format != ANCHOR_FORMAT {
        return Err(fatal!(
            "volume settings {}: unknown format {:?}",
            path.display(),
            anchor.format
        ));
    }
    Ok(Some(anchor))
}

/// The anchor's directory must be as trusted as the anchor: whoever may write it can put
/// another volume's anchor (a root-owned file) in its place. A sticky directory (/tmp) is
/// fine: there only a file's owner may replace it.
fn check_dir(path: &Path) -> Result<(), Fatal> {
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    let meta =
        std::fs::metadata(dir).map_err(|e| fatal!("volume settings directory {}: {e}", dir.display()))?;
    let owner_ok = meta.uid() == 0 || meta.uid() == crate::sys::geteuid();
    let writable_by_others = meta.mode() & 0o022 != 0 && meta.mode() & 0o1000 == 0;
    if !owner_ok || writable_by_others {
        return Err(fatal!(
            "volume settings directory {} must belong to root (or the user running kmsfs) and be \
             writable by no one else: chown root {} && chmod go-w {}",
            dir.display(),
            dir.display(),
            dir.display()
        ));
    }
    Ok(())
}

/// Writes the anchor (atomically, mode 0644 in a directory only its owner can change).
pub fn save(path: &Path, anchor: &Anchor) -> Result<(), Fatal> {
    if let Some(dir) = path.parent() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|e| fatal!("cannot create {}: {e}", dir.display()))?;
    }
    let mut bytes = serde_json::to_vec_pretty(anchor).expect("anchor serialises");
    bytes.push(b'\n');
    crate::durable::atomic_write(path, &bytes, 0o644)
        .map_err(|e| fatal!("cannot write volume settings {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_anchor_files_do_not_collide() {
        let a = path_for(Path::new("/a-b"));
        let b = path_for(Path::new("/a/b"));
        assert_ne!(a, b);
        assert!(a.to_string_lossy().ends_with(".json"));
    }

    #[test]
    fn a_config_may_only_agree() {
        let mut config = VolumeConfig::new(KmsConfig::Local {
            keystore: "/etc/kmsfs/v.keystore".into(),
            key: "default".into(),
        });
        config.mac = Some("00".repeat(32));
        let backing = Path::new("/srv/v");
        let anchor = Anchor::for_config(backing, &config);
        let p = Path::new("/etc/kmsfs/anchors/v.json");
        anchor.check(backing, &config, p).unwrap();
        let mut decoy = config.clone();
        decoy.kms = KmsConfig::Local {
            keystore: "/srv/v/planted".into(),
            key: "default".into(),
        };
        assert!(anchor.check(backing, &decoy, p).is_err());
        let mut stripped = config.clone();
        stripped.mac = None;
        assert!(anchor.check(backing, &stripped, p).is_err());
        let mut other = config.clone();
        other.volume_id = "ab".repeat(16);
        assert!(anchor.check(backing, &other, p).is_err());
        assert!(anchor.check(Path::new("/srv/w"), &config, p).is_err());
    }
}
