//! What the mount brings to a KMIP server, all from its own environment and never from the
//! backing directory: the server addresses (the anchor's, or `KMSFS_KMIP_ADDR`), and the
//! mutual-TLS files: the CA that signed the servers' certificates, and the client certificate
//! and key that are the mount's identity on the key manager. Each file comes from a variable
//! or from a systemd credential of a fixed name (`LoadCredential=kmip-key.pem:/etc/…`).

use crate::kms::KmsError;
use crate::kms::env::{Vars, file_setting, first, process_env};
use std::path::PathBuf;

/// Overrides the servers' addresses (comma-separated `HOST:PORT`).
pub const ADDR_VAR: &str = "KMSFS_KMIP_ADDR";
/// The CA bundle (PEM) that signed the servers' certificates; or credential `kmip-ca.pem`.
pub const CA_VAR: &str = "KMSFS_KMIP_CA";
/// The client certificate (PEM, with its chain); or credential `kmip-cert.pem`.
pub const CERT_VAR: &str = "KMSFS_KMIP_CERT";
/// The client's private key (PEM, readable by its owner only); or credential `kmip-key.pem`.
pub const KEY_VAR: &str = "KMSFS_KMIP_KEY";

/// Everything needed to reach one key on a KMIP key manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `HOST:PORT`, tried in order.
    pub addrs: Vec<String>,
    /// The key object's Name (or its Unique Identifier).
    pub key: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub client_key: PathBuf,
}

/// Splits a comma-separated address list, trimmed, empty entries dropped.
pub fn parse_addrs(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect()
}

impl Settings {
    /// Settings for a volume whose config names `config_addrs` and `key`. The config's
    /// addresses are used as they are only when `trust_config` (the anchor, or the admin at
    /// `kmsfs init`); otherwise `KMSFS_KMIP_ADDR` must name them.
    pub fn from_env(config_addrs: &[String], key: &str, trust_config: bool) -> Result<Settings, KmsError> {
        Self::from_vars(config_addrs, key, trust_config, &process_env)
    }

    /// [`Settings::from_env`] with the variables looked up in `vars`.
    pub fn from_vars(
        config_addrs: &[String],
        key: &str,
        trust_config: bool,
        vars: Vars<'_>,
    ) -> Result<Settings, KmsError> {
        let addrs = match first(vars, &[ADDR_VAR]) {
            Some(a) => parse_addrs(&a),
            None if trust_config => config_addrs.to_vec(),
            None => {
                return Err(KmsError::Misconfigured(format!(
                    "set {ADDR_VAR} (the volume was made with {}): the server address is taken from the \
                     mount's settings, never from the volume config alone",
                    config_addrs.join(",")
                )));
            }
        };
        if addrs.is_empty() {
            return Err(KmsError::Misconfigured(format!(
                "no KMIP server address: set {ADDR_VAR}"
            )));
        }
        let file = |var: &str, credential: &str, what: &str| {
            file_setting(vars, &[var], credential).ok_or_else(|| {
                KmsError::Misconfigured(format!(
                    "no KMIP {what}: set {var} (or give the systemd credential {credential}); key managers \
                     require mutual TLS"
                ))
            })
        };
        Ok(Settings {
            addrs,
            key: key.to_owned(),
            ca: file(CA_VAR, "kmip-ca.pem", "CA certificate")?,
            cert: file(CERT_VAR, "kmip-cert.pem", "client certificate")?,
            client_key: file(KEY_VAR, "kmip-key.pem", "client key")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(vars: &[(&str, &str)], trust: bool) -> Result<Settings, KmsError> {
        let map: std::collections::HashMap<String, String> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Settings::from_vars(&["kms1:5696".to_owned()], "kek", trust, &|n| map.get(n).cloned())
    }

    #[test]
    fn addresses_and_tls_files_come_from_the_mount() {
        let tls = [
            (CA_VAR, "/c/ca.pem"),
            (CERT_VAR, "/c/cert.pem"),
            (KEY_VAR, "/c/key.pem"),
        ];
        let s = settings(&tls, true).unwrap();
        assert_eq!(s.addrs, ["kms1:5696"]);
        assert_eq!(
            (s.ca.to_str(), s.cert.to_str(), s.client_key.to_str()),
            (Some("/c/ca.pem"), Some("/c/cert.pem"), Some("/c/key.pem"))
        );
        // Not trusted: the config's addresses alone are refused.
        let Err(KmsError::Misconfigured(m)) = settings(&tls, false) else {
            panic!("refused")
        };
        assert!(
            m.starts_with("set KMSFS_KMIP_ADDR (the volume was made with kms1:5696)"),
            "{m}"
        );
        let mut with_addr = tls.to_vec();
        with_addr.push((ADDR_VAR, " a:5696, b:15696 ,"));
        assert_eq!(settings(&with_addr, false).unwrap().addrs, ["a:5696", "b:15696"]);
        // Each TLS file is required.
        let Err(KmsError::Misconfigured(m)) = settings(&tls[..2], true) else {
            panic!("refused")
        };
        assert!(m.starts_with("no KMIP client key: set KMSFS_KMIP_KEY"), "{m}");
    }

    #[test]
    fn tls_files_come_from_systemd_credentials() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["kmip-ca.pem", "kmip-cert.pem", "kmip-key.pem"] {
            std::fs::write(dir.path().join(f), "pem").unwrap();
        }
        let d = dir.path().to_str().unwrap();
        let s = settings(&[("CREDENTIALS_DIRECTORY", d)], true).unwrap();
        assert_eq!(s.client_key, dir.path().join("kmip-key.pem"));
        assert_eq!(s.ca, dir.path().join("kmip-ca.pem"));
    }
}
