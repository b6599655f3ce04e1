//! What the mount brings to AWS, resolved as AWS tools resolve it and never from the volume
//! config alone: the region (`AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's `region`, then
//! the one the volume was made in), the endpoint (`AWS_ENDPOINT_URL_KMS`, `AWS_ENDPOINT_URL`,
//! else the region's public one), `AWS_CA_BUNDLE`, and the credential [`Source`].

use super::credentials::{Source, Vars, first};
use super::profile;
use crate::kms::KmsError;
use std::path::PathBuf;

/// Everything needed to talk to one KMS key.
#[derive(Debug)]
pub struct Settings {
    /// The key as the volume names it: key id, key ARN, `alias/NAME` or alias ARN.
    pub key: String,
    pub region: String,
    /// `https://kms.REGION.amazonaws.com`, or the override.
    pub endpoint: String,
    /// `AWS_CA_BUNDLE`: PEM certificates to trust besides the system's (a private endpoint).
    pub ca_bundle: Option<PathBuf>,
    pub credentials: Source,
}

/// The process environment as [`Vars`].
fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The region of the shared config file's profile, if it names one.
fn profile_region(vars: Vars<'_>) -> Option<String> {
    let file = first(vars, &["AWS_CONFIG_FILE"])
        .map(PathBuf::from)
        .or_else(|| first(vars, &["HOME"]).map(|h| PathBuf::from(h).join(".aws/config")))?;
    let name = first(vars, &["AWS_PROFILE"]).unwrap_or_else(|| "default".into());
    let text = std::fs::read_to_string(file).ok()?;
    profile::section(&text, &name, true)?.remove("region")
}

/// The region of a key or alias ARN (`arn:aws:kms:REGION:ACCOUNT:key/…`).
pub fn region_of_arn(key: &str) -> Option<&str> {
    let mut parts = key.strip_prefix("arn:")?.split(':');
    let _partition = parts.next()?;
    (parts.next()? == "kms").then_some(())?;
    parts.next().filter(|r| !r.is_empty())
}

/// The region `kmsfs init` records: the mount's, or the key ARN's.
pub fn init_region(key: &str) -> Result<String, KmsError> {
    init_region_from(key, &process_env)
}

fn init_region_from(key: &str, vars: Vars<'_>) -> Result<String, KmsError> {
    if let Some(r) = region_of_arn(key) {
        return Ok(r.to_owned());
    }
    first(vars, &["AWS_REGION", "AWS_DEFAULT_REGION"])
        .or_else(|| profile_region(vars))
        .ok_or_else(|| {
            KmsError::Misconfigured(format!(
                "which region is {key:?} in? Set AWS_REGION (or give the key's ARN)"
            ))
        })
}

impl Settings {
    /// Settings for a volume's key from the process environment; `config_region` is the
    /// region the volume was made in (from the anchor).
    pub fn from_env(key: &str, config_region: &str) -> Result<Settings, KmsError> {
        Self::from_vars(key, config_region, &process_env)
    }

    /// [`Settings::from_env`] with the variables looked up in `vars`.
    pub fn from_vars(key: &str, config_region: &str, vars: Vars<'_>) -> Result<Settings, KmsError> {
        let region = first(vars, &["AWS_REGION", "AWS_DEFAULT_REGION"])
            .or_else(|| profile_region(vars))
            .unwrap_or_else(|| config_region.to_owned());
        if region != config_region {
            log::warn!(
                "AWS region {region} differs from the one the volume was made in ({config_region}): keys and aliases \
                 are regional"
            );
        }
        let endpoint = match first(vars, &["AWS_ENDPOINT_URL_KMS", "AWS_ENDPOINT_URL"]) {
            Some(e) if e.starts_with("https://") || e.starts_with("http://") => {
                e.trim_end_matches('/').to_owned()
            }
            Some(e) => {
                return Err(KmsError::Misconfigured(format!(
                    "AWS endpoint {e:?} must be an http:// or https:// URL"
                )));
            }
            None => format!("https://kms.{region}.amazonaws.com"),
        };
        Ok(Settings {
            key: key.to_owned(),
            credentials: Source::from_vars(vars, &region)?,
            ca_bundle: first(vars, &["AWS_CA_BUNDLE"]).map(PathBuf::from),
            region,
            endpoint,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(vars: &[(&str, &str)]) -> Result<Settings, KmsError> {
        let mut map: HashMap<String, String> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        map.insert("AWS_ACCESS_KEY_ID".into(), "AKIA".into());
        map.insert("AWS_SECRET_ACCESS_KEY".into(), "s".into());
        Settings::from_vars("alias/kmsfs", "eu-west-1", &|n| map.get(n).cloned())
    }

    #[test]
    fn region_and_endpoint_come_from_the_mount() {
        let s = settings(&[]).unwrap();
        assert_eq!(
            (s.region.as_str(), s.endpoint.as_str()),
            ("eu-west-1", "https://kms.eu-west-1.amazonaws.com")
        );
        let s = settings(&[("AWS_DEFAULT_REGION", "us-east-2"), ("AWS_REGION", "ap-south-1")]).unwrap();
        assert_eq!(s.endpoint, "https://kms.ap-south-1.amazonaws.com");
        let s = settings(&[
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:5000/"),
            ("AWS_REGION", "us-east-1"),
        ])
        .unwrap();
        assert_eq!(
            (s.region.as_str(), s.endpoint.as_str()),
            ("us-east-1", "http://127.0.0.1:5000")
        );
        let s = settings(&[
            ("AWS_ENDPOINT_URL", "http://a"),
            ("AWS_ENDPOINT_URL_KMS", "https://vpce.example"),
        ])
        .unwrap();
        assert_eq!(s.endpoint, "https://vpce.example");
        assert!(settings(&[("AWS_ENDPOINT_URL", "kms.example")]).is_err());
    }

    #[test]
    fn init_takes_the_region_of_an_arn_or_of_the_environment() {
        let arn = "arn:aws:kms:eu-central-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
        assert_eq!(region_of_arn(arn), Some("eu-central-1"));
        assert_eq!(region_of_arn("arn:aws:iam::1:role/x"), None);
        assert_eq!(region_of_arn("alias/kmsfs"), None);
        let none = |_: &str| None;
        assert_eq!(init_region_from(arn, &none).unwrap(), "eu-central-1");
        assert!(init_region_from("alias/kmsfs", &none).is_err());
        let env = |n: &str| (n == "AWS_DEFAULT_REGION").then(|| "sa-east-1".to_owned());
        assert_eq!(init_region_from("alias/kmsfs", &env).unwrap(), "sa-east-1");
    }
}
