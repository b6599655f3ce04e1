//! What the mount brings to the server, all from its own environment and never from the volume
//! config alone: [`Settings`] (addresses, namespace, CA, client certificate) and
//! [`Credentials`] (a token or an AppRole, from variables, systemd credentials or files that
//! only their owner may read: [`read_secret_file`]).

use crate::kms::KmsError;
pub use crate::kms::secret_file::read_secret_file;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

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

/// Where settings are looked up by name: the process environment, or a map in tests.
pub type Vars<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment as [`Vars`].
fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The first of `names` that is set and not empty.
fn first(vars: Vars<'_>, names: &[&str]) -> Option<String> {
    names.iter().find_map(|n| vars(n).filter(|v| !v.is_empty()))
}

impl Credentials {
    /// Credentials from the environment, systemd credentials or files, in that order:
    /// BAO_TOKEN/VAULT_TOKEN, BAO_TOKEN_FILE, $CREDENTIALS_DIRECTORY/bao-token, then AppRole
    /// (BAO_ROLE_ID + BAO_SECRET_ID / BAO_SECRET_ID_FILE / $CREDENTIALS_DIRECTORY/bao-secret-id).
    pub fn from_env() -> Result<Credentials, KmsError> {
        Self::from_vars(&process_env)
    }

    /// [`Credentials::from_env`] with the variables looked up in `vars`.
    pub fn from_vars(vars: Vars<'_>) -> Result<Credentials, KmsError> {
        if let Some(t) = first(vars, &["BAO_TOKEN", "VAULT_TOKEN"]) {
            return Ok(Credentials::Token(Zeroizing::new(t)));
        }
        let cred_dir = vars("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        if let Some(f) = first(vars, &["BAO_TOKEN_FILE", "VAULT_TOKEN_FILE"]) {
            return Ok(Credentials::Token(read_secret_file(Path::new(&f))?));
        }
        if let Some(d) = &cred_dir
            && d.join("bao-token").is_file()
        {
            return Ok(Credentials::Token(read_secret_file(&d.join("bao-token"))?));
        }
        if let Some(role_id) = first(vars, &["BAO_ROLE_ID", "VAULT_ROLE_ID"]) {
            let secret_id = if let Some(s) = first(vars, &["BAO_SECRET_ID", "VAULT_SECRET_ID"]) {
                Zeroizing::new(s)
            } else if let Some(f) = first(vars, &["BAO_SECRET_ID_FILE"]) {
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
        Self::from_vars(config_addrs, mount, key, trust_config, &process_env)
    }

    /// [`Settings::from_env`] with the variables looked up in `vars`.
    pub fn from_vars(
        config_addrs: &[String],
        mount: &str,
        key: &str,
        trust_config: bool,
        vars: Vars<'_>,
    ) -> Result<Settings, KmsError> {
        let addrs: Vec<String> = match first(vars, &["BAO_ADDR", "VAULT_ADDR"]) {
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
            first(vars, &["BAO_CLIENT_CERT", "VAULT_CLIENT_CERT"]),
            first(vars, &["BAO_CLIENT_KEY", "VAULT_CLIENT_KEY"]),
        ) {
            (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
            _ => None,
        };
        Ok(Settings {
            addrs,
            mount: mount.to_owned(),
            key: key.to_owned(),
            namespace: first(vars, &["BAO_NAMESPACE", "VAULT_NAMESPACE"]),
            ca_cert: first(vars, &["BAO_CACERT", "VAULT_CACERT"]).map(PathBuf::from),
            client_cert,
            credentials: Credentials::from_vars(vars)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(vars: &[(&str, &str)], trust_config: bool) -> Result<Settings, KmsError> {
        let map: std::collections::HashMap<String, String> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let config = ["https://config.example:8200".to_owned()];
        Settings::from_vars(&config, "transit", "kek", trust_config, &|n| map.get(n).cloned())
    }

    /// The message of a refusal that `settings` must give.
    fn refusal(vars: &[(&str, &str)], trust_config: bool) -> String {
        match settings(vars, trust_config) {
            Err(KmsError::Misconfigured(m)) => m,
            Err(e) => panic!("expected Misconfigured, got {e:?}"),
            Ok(_) => panic!("expected Misconfigured, got settings"),
        }
    }

    #[test]
    fn settings_come_from_the_mounts_variables() {
        let token = ("BAO_TOKEN", "s.test");
        // No BAO_ADDR and a config that is not trusted: refused, whatever the credentials.
        let m = refusal(&[token], false);
        assert!(
            m.starts_with("set BAO_ADDR (the volume was made with https://config.example:8200)"),
            "{m}"
        );
        // An empty BAO_ADDR counts as unset.
        assert!(refusal(&[token, ("BAO_ADDR", "")], false).starts_with("set BAO_ADDR"));

        // At init the config is trusted: its addresses are used.
        let s = settings(&[token], true).expect("trusted config");
        assert_eq!(s.addrs, ["https://config.example:8200"]);
        assert_eq!((s.mount.as_str(), s.key.as_str()), ("transit", "kek"));
        assert!(matches!(&s.credentials, Credentials::Token(t) if t.as_str() == "s.test"));
        assert!(s.namespace.is_none() && s.ca_cert.is_none() && s.client_cert.is_none());

        // BAO_ADDR wins over the config: a comma-separated list, trimmed; VAULT_ADDR as well.
        let addr = ("BAO_ADDR", "https://a.example:8200/, https://b.example:8200");
        let s = settings(&[token, addr, ("BAO_NAMESPACE", "team")], false).expect("BAO_ADDR set");
        assert_eq!(s.addrs, ["https://a.example:8200", "https://b.example:8200"]);
        assert_eq!(s.namespace.as_deref(), Some("team"));
        let s = settings(&[token, ("VAULT_ADDR", "https://v.example:8200")], false).expect("VAULT_ADDR");
        assert_eq!(s.addrs, ["https://v.example:8200"]);

        // No credentials at all, then an AppRole without its secret id, then with it.
        assert!(refusal(&[addr], false).starts_with("no OpenBao credentials"));
        let role = ("BAO_ROLE_ID", "role-1");
        assert!(refusal(&[addr, role], false).contains("no secret id"));
        let s = settings(&[addr, role, ("BAO_SECRET_ID", "secret-1")], false).expect("AppRole");
        let Credentials::AppRole { role_id, secret_id } = &s.credentials else {
            panic!("expected AppRole credentials");
        };
        assert_eq!((role_id.as_str(), secret_id.as_str()), ("role-1", "secret-1"));
    }
}
