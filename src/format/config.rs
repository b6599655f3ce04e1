//! The volume config: a small JSON file in the backing root. It names the volume and its KMS;
//! it never holds a secret.

use super::block::{BlockLayout, DEFAULT_BLOCK_SIZE};
use super::{DIR_ID_LEN, VOLUME_FORMAT, VOLUME_FORMAT_V1, VOLUME_FORMAT_V2, VOLUME_ID_LEN, VolumeId};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// File name of the volume config in the backing root.
pub const CONFIG_FILE_NAME: &str = "kmsfs.json";
/// File name of the daemon lock in the backing root (held with flock while mounted).
pub const LOCK_FILE_NAME: &str = ".kmsfs.lock";
/// Directory in the backing root where `kmsfs fsck --repair` moves the entries it cannot read
/// (it never deletes them), with a JSON-lines report of what came from where.
pub const LOST_FOUND_NAME: &str = "kmsfs.lost+found";
/// Names in the backing root that belong to kmsfs, not to the user: hidden from listings and
/// refused by lookup and create.
pub const RESERVED_ROOT_NAMES: &[&str] = &[CONFIG_FILE_NAME, LOCK_FILE_NAME, LOST_FOUND_NAME];
/// A config larger than this is refused before parsing.
pub const MAX_CONFIG_LEN: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    pub format_version: u16,
    /// 16 random bytes, lowercase hex.
    pub volume_id: String,
    pub block_size: u64,
    pub kms: KmsConfig,
    pub names: NamesConfig,
    /// The volume key, wrapped by the KMS bound to the volume id: the key the config's MAC is
    /// made with. Absent in configs made before kmsfs authenticated them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_key: Option<WrappedKeyConfig>,
    /// HMAC-SHA256 over the rest of the config (see [`VolumeConfig::mac_input`]), hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// A key the KMS wrapped, as the config stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WrappedKeyConfig {
    pub key_ref: String,
    /// The wrapped key, hex.
    pub wrapped: String,
}

/// HKDF info of the config MAC key, derived from the volume key with the volume id as salt.
pub const CONFIG_MAC_INFO: &[u8] = b"kmsfs config mac";
/// Length of the config MAC.
pub const CONFIG_MAC_LEN: usize = 32;

/// The config's MAC under `volume_key`: HMAC-SHA256 with a key derived for this purpose only.
pub fn config_mac(
    volume_key: &crate::crypto::SecretKey,
    volume_id: &VolumeId,
    input: &[u8],
) -> [u8; CONFIG_MAC_LEN] {
    use hmac::{KeyInit, Mac};
    let key = volume_key.derive(&volume_id.0, CONFIG_MAC_INFO);
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key.expose())
        .expect("HMAC takes any key length");
    mac.update(input);
    mac.finalize().into_bytes().into()
}

/// How entry names, symlink targets and xattrs are stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase", deny_unknown_fields)]
pub enum NamesConfig {
    /// In the clear (`kmsfs init --plaintext-names`).
    Plaintext,
    /// Encrypted under the volume name key, which the KMS wraps bound to the volume id.
    Encrypted {
        /// The root directory's id (other directories keep theirs in an id file), hex.
        root_dir_id: String,
        /// The KMS key that wrapped the name key.
        key_ref: String,
        /// The wrapped volume name key, hex.
        wrapped_key: String,
    },
}

/// Which KMS wraps this volume's keys, and its non-secret parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase", deny_unknown_fields)]
pub enum KmsConfig {
    /// The embedded keystore: a file of versioned KEKs on this machine.
    Local {
        /// Absolute path of the keystore file.
        keystore: PathBuf,
        /// Name of the key in the keystore that wraps new DEKs.
        key: String,
    },
    /// OpenBao or Vault Transit. Credentials come from the mount's environment, never from
    /// here; `BAO_ADDR` at mount time overrides `addrs`.
    Openbao {
        /// Server addresses (`https://host:8200`), tried in order.
        addrs: Vec<String>,
        /// The Transit mount path.
        mount: String,
        /// The Transit key (created with `derived=true`).
        key: String,
    },
    /// A KMIP key manager, over mutual TLS. The client certificate, its key and the CA come
    /// from the mount's environment, never from here; `KMSFS_KMIP_ADDR` overrides `addrs`.
    Kmip {
        /// Server addresses (`host:5696`), tried in order.
        addrs: Vec<String>,
        /// The key object's Name (or Unique Identifier).
        key: String,
    },
    /// AWS KMS. Credentials and the endpoint come from the mount's environment, never from
    /// here; `AWS_REGION` at mount time overrides `region`.
    #[serde(rename = "aws-kms")]
    AwsKms {
        /// The symmetric KMS key: key id, key ARN, `alias/NAME` or alias ARN.
        key: String,
        /// The region the key is in (keys and aliases are regional).
        region: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    TooLarge(usize),
    Syntax(String),
    UnsupportedVersion(u16),
    Invalid(&'static str),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::TooLarge(n) => write!(f, "config is {n} bytes, more than {MAX_CONFIG_LEN}"),
            ConfigError::Syntax(e) => write!(f, "config does not parse: {e}"),
            ConfigError::UnsupportedVersion(v) => {
                write!(f, "volume format version {v} is not supported by this kmsfs")
            }
            ConfigError::Invalid(what) => write!(f, "config is invalid: {what}"),
        }
    }
}

impl VolumeConfig {
    /// A new config with a fresh volume id; `names` is filled in by the caller once the KMS
    /// has wrapped the name key for that id.
    pub fn new(kms: KmsConfig) -> Self {
        let mut id = [0u8; VOLUME_ID_LEN];
        crate::crypto::fill_random(&mut id);
        VolumeConfig {
            format_version: VOLUME_FORMAT,
            volume_id: crate::hex::encode(&id),
            block_size: DEFAULT_BLOCK_SIZE,
            kms,
            names: NamesConfig::Plaintext,
            volume_key: None,
            mac: None,
        }
    }

    /// The bytes the MAC covers: the config as written, with no `mac` field. Everything else
    /// is covered: names mode and keys, ids, KMS settings, sizes.
    pub fn mac_input(&self) -> Vec<u8> {
        let mut c = self.clone();
        c.mac = None;
        c.encode()
    }

    /// Sets the MAC under `volume_key` (after every change).
    pub fn seal(&mut self, volume_key: &crate::crypto::SecretKey) {
        let mac = config_mac(volume_key, &self.volume_id(), &self.mac_input());
        self.mac = Some(crate::hex::encode(&mac));
    }

    /// Whether the MAC is the one `volume_key` makes (in constant time).
    pub fn mac_matches(&self, volume_key: &crate::crypto::SecretKey) -> bool {
        use hmac::{KeyInit, Mac};
        let Some(given) = self.mac.as_deref().and_then(crate::hex::decode) else {
            return false;
        };
        let key = volume_key.derive(&self.volume_id().0, CONFIG_MAC_INFO);
        let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key.expose())
            .expect("HMAC takes any key length");
        mac.update(&self.mac_input());
        mac.verify_slice(&given).is_ok()
    }

    /// The volume id (validated at decode; all zeros if the field was changed since).
    pub fn volume_id(&self) -> VolumeId {
        let mut id = [0u8; VOLUME_ID_LEN];
        if let Some(bytes) = crate::hex::decode(&self.volume_id).filter(|b| b.len() == VOLUME_ID_LEN) {
            id.copy_from_slice(&bytes);
        }
        VolumeId(id)
    }

    /// The volume's block layout (validated at decode; the default if the field was changed
    /// since to a size no volume may have).
    pub fn layout(&self) -> BlockLayout {
        BlockLayout::new(self.block_size).unwrap_or_default()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("config serialises");
        v.push(b'\n');
        v
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ConfigError> {
        if bytes.len() > MAX_CONFIG_LEN {
            return Err(ConfigError::TooLarge(bytes.len()));
        }
        let c: VolumeConfig =
            serde_json::from_slice(bytes).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.format_version != VOLUME_FORMAT_V1 && self.format_version != VOLUME_FORMAT_V2 {
            return Err(ConfigError::UnsupportedVersion(self.format_version));
        }
        // Format 1 volumes all have 64 KiB blocks; format 2 ones the size chosen at init.
        if self.format_version == VOLUME_FORMAT_V1 && self.block_size != DEFAULT_BLOCK_SIZE {
            return Err(ConfigError::Invalid("block_size must be 65536 in format 1"));
        }
        if BlockLayout::new(self.block_size).is_none() {
            return Err(ConfigError::Invalid(
                "block_size must be a power of two from 4096 to 1048576 (4 KiB to 1 MiB)",
            ));
        }
        // Format 2 came with the authenticated config: a v2 config without its MAC is a
        // downgrade, not an old volume.
        if self.format_version >= VOLUME_FORMAT_V2 && self.mac.is_none() {
            return Err(ConfigError::Invalid(
                "a format 2 config without its volume_key and mac is not trusted (it was altered)",
            ));
        }
        match crate::hex::decode(&self.volume_id) {
            Some(id) if id.len() == VOLUME_ID_LEN => {}
            _ => return Err(ConfigError::Invalid("volume_id must be 32 hex digits")),
        }
        if let NamesConfig::Encrypted {
            root_dir_id,
            key_ref,
            wrapped_key,
        } = &self.names
        {
            match crate::hex::decode(root_dir_id) {
                Some(id) if id.len() == DIR_ID_LEN => {}
                _ => return Err(ConfigError::Invalid("root_dir_id must be 32 hex digits")),
            }
            if key_ref.is_empty() || key_ref.len() > super::header::MAX_KEY_REF_LEN {
                return Err(ConfigError::Invalid("names key_ref must be 1 to 256 bytes"));
            }
            match crate::hex::decode(wrapped_key) {
                Some(w) if !w.is_empty() && w.len() <= super::header::MAX_WRAPPED_LEN => {}
                _ => {
                    return Err(ConfigError::Invalid(
                        "names wrapped_key must be 1 to 1024 bytes of hex",
                    ));
                }
            }
        }
        match &self.kms {
            KmsConfig::Local { keystore, key } => {
                if !keystore.is_absolute() {
                    return Err(ConfigError::Invalid("local keystore path must be absolute"));
                }
                if key.is_empty() || key.len() > super::header::MAX_KEY_REF_LEN {
                    return Err(ConfigError::Invalid("key name must be 1 to 256 bytes"));
                }
            }
            KmsConfig::Openbao { addrs, mount, key } => {
                if addrs.is_empty()
                    || addrs
                        .iter()
                        .any(|a| !a.starts_with("http://") && !a.starts_with("https://"))
                {
                    return Err(ConfigError::Invalid(
                        "OpenBao addresses must be http:// or https:// URLs",
                    ));
                }
                if mount.is_empty() || key.is_empty() || key.len() > super::header::MAX_KEY_REF_LEN {
                    return Err(ConfigError::Invalid("OpenBao mount and key must be set"));
                }
            }
            KmsConfig::Kmip { addrs, key } => {
                if addrs.is_empty() || !addrs.iter().all(|a| is_host_port(a)) {
                    return Err(ConfigError::Invalid("KMIP addresses must be HOST:PORT"));
                }
                if key.is_empty() || key.len() > super::header::MAX_KEY_REF_LEN {
                    return Err(ConfigError::Invalid("KMIP key must be 1 to 256 bytes"));
                }
            }
            KmsConfig::AwsKms { key, region } => {
                if key.is_empty() || key.len() > super::header::MAX_KEY_REF_LEN {
                    return Err(ConfigError::Invalid("AWS KMS key must be 1 to 256 bytes"));
                }
                if region.is_empty()
                    || region.len() > 64
                    || !region
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                {
                    return Err(ConfigError::Invalid("AWS region must be like eu-west-1"));
                }
            }
        }
        if let Some(k) = &self.volume_key {
            if k.key_ref.is_empty() || k.key_ref.len() > super::header::MAX_KEY_REF_LEN {
                return Err(ConfigError::Invalid("volume_key key_ref must be 1 to 256 bytes"));
            }
            match crate::hex::decode(&k.wrapped) {
                Some(w) if !w.is_empty() && w.len() <= super::header::MAX_WRAPPED_LEN => {}
                _ => {
                    return Err(ConfigError::Invalid(
                        "volume_key wrapped must be 1 to 1024 bytes of hex",
                    ));
                }
            }
        }
        match (&self.volume_key, &self.mac) {
            (None, None) => {}
            (Some(_), Some(m)) if crate::hex::decode(m).is_some_and(|m| m.len() == CONFIG_MAC_LEN) => {}
            _ => {
                return Err(ConfigError::Invalid(
                    "volume_key and a 64-hex-digit mac go together",
                ));
            }
        }
        // kmsfs writes the config back pretty-printed (rewrap), which can be longer than a
        // compact original: accept only what can be written back and read again.
        if self.encode().len() > MAX_CONFIG_LEN {
            return Err(ConfigError::Invalid("config is over 64 KiB once written back"));
        }
        Ok(())
    }
}

/// `HOST:PORT` with a numeric port, no scheme, no spaces (an IPv6 host in brackets).
fn is_host_port(a: &str) -> bool {
    let Some((host, port)) = a.rsplit_once(':') else {
        return false;
    };
    !host.is_empty()
        && port.parse::<u16>().is_ok_and(|p| p > 0)
        && !host.contains("://")
        && host.chars().all(|c| c.is_ascii_graphic() && c != '/')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VolumeConfig {
        let mut c = VolumeConfig::new(KmsConfig::Local {
            keystore: "/etc/kmsfs/vol.keystore".into(),
            key: "default".into(),
        });
        c.names = NamesConfig::Encrypted {
            root_dir_id: "00112233445566778899aabbccddeeff".into(),
            key_ref: "default".into(),
            wrapped_key: "abcd".into(),
        };
        // Unauthenticated, as format 1 allows: these tests are about the fields.
        c.format_version = VOLUME_FORMAT_V1;
        c
    }

    #[test]
    fn format_2_needs_its_mac_and_format_3_is_not_known() {
        let key = crate::crypto::SecretKey::generate();
        let mut c = sample();
        c.format_version = VOLUME_FORMAT_V2;
        assert!(
            VolumeConfig::decode(&c.encode()).is_err(),
            "format 2 without a mac"
        );
        c.volume_key = Some(WrappedKeyConfig {
            key_ref: "default".into(),
            wrapped: "beef".into(),
        });
        c.seal(&key);
        assert_eq!(VolumeConfig::decode(&c.encode()).unwrap(), c);
        c.format_version = 3;
        assert!(matches!(
            VolumeConfig::decode(&c.encode()),
            Err(ConfigError::UnsupportedVersion(3))
        ));
    }

    /// Format 2: any block size from 4 KiB to 1 MiB that is a power of two; format 1: 64 KiB.
    #[test]
    fn block_sizes_by_format() {
        let key = crate::crypto::SecretKey::generate();
        let decode = |version: u16, block_size: u64| {
            let mut c = sample();
            c.format_version = version;
            c.block_size = block_size;
            if version == VOLUME_FORMAT_V2 {
                c.volume_key = Some(WrappedKeyConfig {
                    key_ref: "default".into(),
                    wrapped: "beef".into(),
                });
                c.seal(&key);
            }
            VolumeConfig::decode(&c.encode())
        };
        for bs in [4096, 8192, 65536, 1 << 20] {
            let c = decode(VOLUME_FORMAT_V2, bs).unwrap();
            assert_eq!(c.layout().block_size(), bs);
            assert!(c.mac_matches(&key));
        }
        for bs in [0, 2048, 3000, 4095, 65535, 100_000, 2 << 20, u64::MAX] {
            match decode(VOLUME_FORMAT_V2, bs) {
                Err(ConfigError::Invalid(m)) => assert!(m.contains("4096 to 1048576"), "{m}"),
                other => panic!("{bs}: {other:?}"),
            }
        }
        assert_eq!(
            decode(VOLUME_FORMAT_V1, 65536).unwrap().layout(),
            BlockLayout::DEFAULT
        );
        for bs in [4096, 1 << 20, 3000] {
            match decode(VOLUME_FORMAT_V1, bs) {
                Err(ConfigError::Invalid(m)) => assert!(m.contains("65536 in format 1"), "{m}"),
                other => panic!("{bs}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_mac_covers_every_field() {
        let key = crate::crypto::SecretKey::generate();
        let mut c = sample();
        c.volume_key = Some(WrappedKeyConfig {
            key_ref: "default".into(),
            wrapped: "beef".into(),
        });
        c.seal(&key);
        let c = VolumeConfig::decode(&c.encode()).unwrap();
        assert!(c.mac_matches(&key));
        assert!(!c.mac_matches(&crate::crypto::SecretKey::generate()));
        let changes: [fn(&mut VolumeConfig); 6] = [
            |c| c.names = NamesConfig::Plaintext,
            |c| c.block_size = 4096,
            |c| c.volume_id = "ffeeddccbbaa99887766554433221100".into(),
            |c| {
                c.kms = KmsConfig::Local {
                    keystore: "/tmp/decoy".into(),
                    key: "default".into(),
                }
            },
            |c| c.volume_key.as_mut().unwrap().wrapped = "beee".into(),
            |c| c.mac = Some("00".repeat(CONFIG_MAC_LEN)),
        ];
        for change in changes {
            let mut bad = c.clone();
            change(&mut bad);
            assert!(!bad.mac_matches(&key), "{bad:?}");
        }
        let mut stripped = c.clone();
        stripped.mac = None;
        assert!(
            VolumeConfig::decode(&stripped.encode()).is_err(),
            "a key without a mac"
        );
    }

    #[test]
    fn aws_kms_configs_round_trip_and_are_checked() {
        let mut c = sample();
        c.kms = KmsConfig::AwsKms {
            key: "alias/kmsfs".into(),
            region: "eu-west-1".into(),
        };
        let text = String::from_utf8(c.encode()).unwrap();
        assert!(text.contains(r#""backend": "aws-kms""#), "{text}");
        assert_eq!(VolumeConfig::decode(text.as_bytes()).unwrap(), c);
        for bad in [
            text.replace("\"alias/kmsfs\"", "\"\""),
            text.replace("eu-west-1", "EU WEST"),
            text.replace("\"region\"", "\"endpoint\""),
        ] {
            assert!(VolumeConfig::decode(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn round_trip() {
        let c = sample();
        assert_eq!(VolumeConfig::decode(&c.encode()).unwrap(), c);
        let mut k = VolumeConfig::new(KmsConfig::Kmip {
            addrs: vec!["kms1.example:5696".into(), "[::1]:5696".into()],
            key: "kmsfs-kek".into(),
        });
        k.names = NamesConfig::Plaintext;
        k.format_version = VOLUME_FORMAT_V1;
        assert_eq!(VolumeConfig::decode(&k.encode()).unwrap(), k);
    }

    #[test]
    fn kmip_addresses_are_host_and_port() {
        for good in ["kms:5696", "10.0.0.1:5696", "[::1]:5696"] {
            assert!(is_host_port(good), "{good}");
        }
        for bad in [
            "kms",
            "https://kms:5696",
            "kms:",
            ":5696",
            "kms:0",
            "kms:99999",
            "k ms:5696",
            "a/b:1",
        ] {
            assert!(!is_host_port(bad), "{bad}");
        }
    }

    #[test]
    fn bad_configs_are_errors() {
        let good = String::from_utf8(sample().encode()).unwrap();
        for bad in [
            String::new(),
            "{".into(),
            good.replace("\"format_version\": 1", "\"format_version\": 9"),
            good.replace("65536", "4096"),
            good.replace("\"key\"", "\"kee\""),
            good.replace("/etc/kmsfs", "relative"),
            good.replace("\"local\"", "\"nope\""),
            good.replace("00112233445566778899aabbccddeeff", "0011"),
            good.replace("\"abcd\"", "\"xyz\""),
            good.replace("\"encrypted\"", "\"rot13\""),
            good[..good.len() / 2].to_string(),
        ] {
            assert!(VolumeConfig::decode(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(matches!(
            VolumeConfig::decode(&vec![b' '; MAX_CONFIG_LEN + 1]),
            Err(ConfigError::TooLarge(_))
        ));
    }

    /// The `config` fuzz target's invariant (what decode accepts, encode writes back to
    /// something decode accepts) at a size the fuzzer does not reach: a compact config under
    /// the limit whose pretty-printed form, as `kmsfs rewrap` writes it back, is over it.
    #[test]
    fn accepted_configs_stay_under_the_limit_when_rewritten() {
        let mut c = VolumeConfig::new(KmsConfig::Openbao {
            addrs: vec!["http://".into(); 6000],
            mount: "transit".into(),
            key: "k".into(),
        });
        c.names = NamesConfig::Plaintext;
        let compact = serde_json::to_vec(&c).unwrap();
        assert!(compact.len() <= MAX_CONFIG_LEN && c.encode().len() > MAX_CONFIG_LEN);
        assert!(matches!(
            VolumeConfig::decode(&compact),
            Err(ConfigError::Invalid(_))
        ));
    }
}
