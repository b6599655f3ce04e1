//! Who the mount is to AWS: [`Credentials`] and the default credential chain that finds them
//! the way AWS tools do ([`Source::from_vars`]), and [`Provider`], which holds the current
//! credentials and fetches new ones before they expire.
//!
//! The chain, first match wins:
//! 1. `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`);
//! 2. a systemd credential `aws-credentials` (`LoadCredential=aws-credentials:/etc/…`): a
//!    shared credentials file in `$CREDENTIALS_DIRECTORY`;
//! 3. the shared files, profile `AWS_PROFILE` (else `default`): static keys from
//!    `AWS_SHARED_CREDENTIALS_FILE` (`~/.aws/credentials`) or `AWS_CONFIG_FILE`
//!    (`~/.aws/config`), or a profile's `role_arn` + `web_identity_token_file`;
//! 4. web identity: `AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN` (STS
//!    AssumeRoleWithWebIdentity; EKS IRSA);
//! 5. container credentials: `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` or `…_FULL_URI`, with
//!    `AWS_CONTAINER_AUTHORIZATION_TOKEN(_FILE)` (ECS, EKS Pod Identity);
//! 6. EC2 instance metadata, IMDSv2 only (unless `AWS_EC2_METADATA_DISABLED=true`).
//!
//! Files holding secrets must be private to their owner ([`read_secret_file`]). Not supported:
//! SSO, `credential_process`, `source_profile` role chaining.

pub use super::identity::Credentials;
use super::profile;
use super::sources;
use crate::kms::KmsError;
use crate::kms::env::read_secret_file;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};
use zeroize::Zeroizing;

/// Fetch new credentials this long before the current ones expire (or at half their
/// lifetime, for short-lived ones).
const REFRESH_AHEAD: Duration = Duration::from_secs(5 * 60);

/// Where variables are looked up: the process environment, or a map in tests.
pub type Vars<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The first of `names` that is set and not empty.
pub(super) fn first(vars: Vars<'_>, names: &[&str]) -> Option<String> {
    names.iter().find_map(|n| vars(n).filter(|v| !v.is_empty()))
}

/// Where the mount's credentials come from: the first link of the chain that is configured.
#[derive(Debug)]
pub enum Source {
    /// Long-lived keys (environment, systemd credential, shared file): never refreshed.
    Static { creds: Credentials, from: String },
    /// STS AssumeRoleWithWebIdentity with a token read from a file at every refresh.
    WebIdentity {
        role_arn: String,
        session_name: String,
        token_file: PathBuf,
        sts_endpoint: String,
    },
    /// The ECS / EKS Pod Identity credentials endpoint.
    Container {
        url: String,
        token: Option<Zeroizing<String>>,
        token_file: Option<PathBuf>,
    },
    /// EC2 instance metadata (IMDSv2).
    Imds { endpoint: String },
}

impl Source {
    /// The chain's first configured source, from `vars` (`region` names the STS endpoint).
    pub fn from_vars(vars: Vars<'_>, region: &str) -> Result<Source, KmsError> {
        // 1. The environment.
        let env = |k: &str| match k {
            "aws_access_key_id" => first(vars, &["AWS_ACCESS_KEY_ID"]),
            "aws_secret_access_key" => first(vars, &["AWS_SECRET_ACCESS_KEY"]),
            "aws_session_token" => first(vars, &["AWS_SESSION_TOKEN"]),
            _ => None,
        };
        if let Some(creds) = Credentials::from_settings(env) {
            return Ok(Source::Static {
                creds,
                from: "environment".into(),
            });
        }
        if first(vars, &["AWS_ACCESS_KEY_ID"]).is_some() {
            return Err(KmsError::Misconfigured(
                "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not".into(),
            ));
        }
        let profile_name = first(vars, &["AWS_PROFILE"]).unwrap_or_else(|| "default".into());
        // 2. A systemd credential: a shared credentials file kept out of the environment.
        if let Some(dir) = first(vars, &["CREDENTIALS_DIRECTORY"]) {
            let file = PathBuf::from(dir).join("aws-credentials");
            if file.is_file() {
                let text = read_secret_file(&file)?;
                let p = profile::section(&text, &profile_name, false).ok_or_else(|| {
                    KmsError::Misconfigured(format!("{}: no profile [{profile_name}]", file.display()))
                })?;
                return Self::static_from(&p, format!("systemd credential {}", file.display()));
            }
        }
        // 3. The shared files.
        let home = first(vars, &["HOME"]).map(PathBuf::from);
        let at_home = |rel: &str| home.as_ref().map(|h| h.join(rel));
        let cred_file = first(vars, &["AWS_SHARED_CREDENTIALS_FILE"])
            .map(PathBuf::from)
            .or_else(|| at_home(".aws/credentials"));
        if let Some(file) = cred_file.filter(|f| f.is_file()) {
            let text = read_secret_file(&file)?;
            if let Some(p) = profile::section(&text, &profile_name, false)
                && p.contains_key("aws_access_key_id")
            {
                return Self::static_from(&p, format!("{} [{profile_name}]", file.display()));
            }
        }
        let config_file = first(vars, &["AWS_CONFIG_FILE"])
            .map(PathBuf::from)
            .or_else(|| at_home(".aws/config"));
        let config_profile = config_file
            .as_ref()
            .filter(|f| f.is_file())
            .and_then(|f| std::fs::read_to_string(f).ok())
            .and_then(|text| profile::section(&text, &profile_name, true));
        if let (Some(p), Some(file)) = (&config_profile, &config_file) {
            if p.contains_key("aws_secret_access_key") {
                // Secrets in the config file: only from a private one.
                let text = read_secret_file(file)?;
                let p = profile::section(&text, &profile_name, true).unwrap_or_default();
                return Self::static_from(&p, format!("{} [profile {profile_name}]", file.display()));
            }
            if let (Some(role), Some(token)) = (p.get("role_arn"), p.get("web_identity_token_file")) {
                return Ok(Self::web_identity(
                    vars,
                    region,
                    role,
                    token,
                    p.get("role_session_name"),
                ));
            }
        }
        // 4. Web identity from the environment.
        if let (Some(role), Some(token)) = (
            first(vars, &["AWS_ROLE_ARN"]),
            first(vars, &["AWS_WEB_IDENTITY_TOKEN_FILE"]),
        ) {
            let session = first(vars, &["AWS_ROLE_SESSION_NAME"]);
            return Ok(Self::web_identity(vars, region, &role, &token, session.as_ref()));
        }
        // 5. Container credentials.
        let container_url = first(vars, &["AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"])
            .map(|rel| format!("http://169.254.170.2{rel}"))
            .or_else(|| first(vars, &["AWS_CONTAINER_CREDENTIALS_FULL_URI"]));
        if let Some(url) = container_url {
            sources::check_container_url(&url)?;
            return Ok(Source::Container {
                url,
                token: first(vars, &["AWS_CONTAINER_AUTHORIZATION_TOKEN"]).map(Zeroizing::new),
                token_file: first(vars, &["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"]).map(PathBuf::from),
            });
        }
        // 6. Instance metadata.
        if first(vars, &["AWS_EC2_METADATA_DISABLED"]).is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Err(KmsError::Misconfigured(
                "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, a web identity \
                 (AWS_ROLE_ARN, AWS_WEB_IDENTITY_TOKEN_FILE), or a systemd credential aws-credentials"
                    .into(),
            ));
        }
        let endpoint = first(vars, &["AWS_EC2_METADATA_SERVICE_ENDPOINT"])
            .unwrap_or_else(|| "http://169.254.169.254".into());
        Ok(Source::Imds {
            endpoint: endpoint.trim_end_matches('/').to_owned(),
        })
    }

    fn static_from(p: &profile::Profile, from: String) -> Result<Source, KmsError> {
        let creds = Credentials::from_settings(|k| p.get(k).cloned()).ok_or_else(|| {
            KmsError::Misconfigured(format!(
                "{from}: needs aws_access_key_id and aws_secret_access_key"
            ))
        })?;
        Ok(Source::Static { creds, from })
    }

    fn web_identity(
        vars: Vars<'_>,
        region: &str,
        role: &str,
        token_file: &str,
        session: Option<&String>,
    ) -> Source {
        let sts_endpoint = first(vars, &["AWS_ENDPOINT_URL_STS", "AWS_ENDPOINT_URL"])
            .unwrap_or_else(|| format!("https://sts.{region}.amazonaws.com"));
        Source::WebIdentity {
            role_arn: role.to_owned(),
            session_name: session.cloned().unwrap_or_else(|| "kmsfs".into()),
            token_file: PathBuf::from(token_file),
            sts_endpoint: sts_endpoint.trim_end_matches('/').to_owned(),
        }
    }

    /// What the source is, for the log (no secret).
    pub fn describe(&self) -> String {
        match self {
            Source::Static { creds, from } => format!("access key {} from {from}", creds.access_key_id),
            Source::WebIdentity { role_arn, .. } => format!("web identity for {role_arn}"),
            Source::Container { url, .. } => format!("container credentials from {url}"),
            Source::Imds { endpoint } => format!("instance metadata at {endpoint}"),
        }
    }
}

/// The current credentials, and when they were fetched.
struct Current {
    creds: Credentials,
    fetched: SystemTime,
}

/// Hands out usable credentials, fetching new ones from the source before they expire.
pub(super) struct Provider {
    source: Source,
    http: reqwest::Client,
    /// The credentials in use. Taken by every request; held across a fetch, so concurrent
    /// requests wait for one new set instead of each fetching.
    current: tokio::sync::Mutex<Option<Current>>,
}

impl Provider {
    pub(super) fn new(source: Source) -> Result<Self, KmsError> {
        Ok(Provider {
            source,
            http: sources::client()?,
            current: tokio::sync::Mutex::new(None),
        })
    }

    /// Credentials to sign with now.
    pub(super) async fn get(&self) -> Result<Credentials, KmsError> {
        let mut cur = self.current.lock().await;
        let now = SystemTime::now();
        if let Some(c) = cur.as_ref()
            && !due(c, now)
        {
            return Ok(c.creds.clone());
        }
        match self.fetch().await {
            Ok(creds) => {
                if cur.is_none() {
                    log::info!("AWS credentials: {}", self.source.describe());
                }
                *cur = Some(Current {
                    creds: creds.clone(),
                    fetched: now,
                });
                Ok(creds)
            }
            // The old ones still work for a while: use them, and try again next time.
            Err(e)
                if cur
                    .as_ref()
                    .is_some_and(|c| c.creds.expires.is_some_and(|x| x > now)) =>
            {
                log::warn!(
                    "cannot refresh AWS credentials yet ({e}); using the current ones until they expire"
                );
                Ok(cur.as_ref().expect("checked").creds.clone())
            }
            Err(e) => Err(e),
        }
    }

    /// Forgets the current credentials (the server said they expired): the next `get` fetches.
    pub(super) async fn invalidate(&self) {
        if !matches!(self.source, Source::Static { .. }) {
            *self.current.lock().await = None;
        }
    }

    async fn fetch(&self) -> Result<Credentials, KmsError> {
        match &self.source {
            Source::Static { creds, .. } => Ok(creds.clone()),
            Source::WebIdentity {
                role_arn,
                session_name,
                token_file,
                sts_endpoint,
            } => {
                let token = read_token_file(token_file)?;
                sources::assume_role_with_web_identity(
                    &self.http,
                    sts_endpoint,
                    role_arn,
                    session_name,
                    &token,
                )
                .await
            }
            Source::Container {
                url,
                token,
                token_file,
            } => {
                let auth = match (token_file, token) {
                    (Some(f), _) => Some(read_token_file(f)?),
                    (None, Some(t)) => Some(t.clone()),
                    (None, None) => None,
                };
                sources::container(&self.http, url, auth.as_ref().map(|t| t.as_str())).await
            }
            Source::Imds { endpoint } => sources::imds(&self.http, endpoint).await,
        }
    }
}

/// Whether credentials fetched at `c.fetched` must be fetched again at `now`.
fn due(c: &Current, now: SystemTime) -> bool {
    let Some(expires) = c.creds.expires else {
        return false;
    };
    let lifetime = expires.duration_since(c.fetched).unwrap_or_default();
    let ahead = REFRESH_AHEAD.min(lifetime / 2);
    now + ahead >= expires
}

/// A token file (web identity, container authorization): rotated by its issuer, so read at
/// every fetch. Not a long-lived secret, but not ours to spread either.
fn read_token_file(path: &std::path::Path) -> Result<Zeroizing<String>, KmsError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| KmsError::Misconfigured(format!("token file {}: {e}", path.display())))?;
    Ok(Zeroizing::new(text.trim().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::os::unix::fs::PermissionsExt;

    fn source(vars: &[(&str, &str)]) -> Result<Source, KmsError> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Source::from_vars(&|n| map.get(n).cloned(), "eu-west-1")
    }

    fn private(path: &std::path::Path, text: &str) {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    #[test]
    fn the_chain_takes_the_first_configured_source() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().to_str().unwrap();
        let no_imds = ("AWS_EC2_METADATA_DISABLED", "true");
        // Nothing configured, metadata off: a clear refusal.
        assert!(
            matches!(source(&[("HOME", home), no_imds]), Err(KmsError::Misconfigured(m)) if m.starts_with("no AWS credentials"))
        );
        // Nothing configured: instance metadata, at its documented address or the override.
        let Ok(Source::Imds { endpoint }) = source(&[("HOME", home)]) else {
            panic!("imds")
        };
        assert_eq!(endpoint, "http://169.254.169.254");
        let Ok(Source::Imds { endpoint }) =
            source(&[("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:9/")])
        else {
            panic!("imds")
        };
        assert_eq!(endpoint, "http://127.0.0.1:9");
        // Container credentials: the relative URI goes to the ECS agent's address.
        let Ok(Source::Container { url, .. }) =
            source(&[("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "/v2/credentials/x")])
        else {
            panic!("container")
        };
        assert_eq!(url, "http://169.254.170.2/v2/credentials/x");
        // A full URI over plain HTTP only to a loopback or the agents' link-local addresses.
        assert!(source(&[("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://evil.example/creds")]).is_err());
        // Web identity wins over the container, and names STS in the region (or the override).
        let wi = [
            ("AWS_ROLE_ARN", "arn:aws:iam::111122223333:role/kmsfs"),
            ("AWS_WEB_IDENTITY_TOKEN_FILE", "/run/token"),
            ("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "/v2/credentials/x"),
        ];
        let Ok(Source::WebIdentity {
            sts_endpoint,
            session_name,
            ..
        }) = source(&wi)
        else {
            panic!("web identity")
        };
        assert_eq!(
            (sts_endpoint.as_str(), session_name.as_str()),
            ("https://sts.eu-west-1.amazonaws.com", "kmsfs")
        );
        // A shared credentials file with AWS_PROFILE wins over web identity; it must be private.
        std::fs::create_dir(dir.path().join(".aws")).unwrap();
        let creds = dir.path().join(".aws/credentials");
        private(
            &creds,
            "[default]\naws_access_key_id=AKIAD\naws_secret_access_key=sd\n[team]\naws_access_key_id=AKIAT\naws_secret_access_key=st\n",
        );
        let mut vars = wi.to_vec();
        vars.extend([("HOME", home), ("AWS_PROFILE", "team")]);
        let Ok(Source::Static { creds: c, from }) = source(&vars) else {
            panic!("profile")
        };
        assert_eq!(
            (c.access_key_id.as_str(), c.secret_access_key.as_str()),
            ("AKIAT", "st")
        );
        assert!(from.ends_with("[team]"), "{from}");
        std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(source(&vars), Err(KmsError::Misconfigured(m)) if m.contains("chmod 600")));
        // A systemd credential wins over the shared files.
        let cred_dir = dir.path().join("creds");
        std::fs::create_dir(&cred_dir).unwrap();
        private(
            &cred_dir.join("aws-credentials"),
            "[team]\naws_access_key_id=AKIASYSTEMD\naws_secret_access_key=ss\n",
        );
        vars.push(("CREDENTIALS_DIRECTORY", cred_dir.to_str().unwrap()));
        let Ok(Source::Static { creds: c, .. }) = source(&vars) else {
            panic!("systemd")
        };
        assert_eq!(c.access_key_id, "AKIASYSTEMD");
        // The environment wins over everything; a key id without its secret is refused.
        vars.extend([
            ("AWS_ACCESS_KEY_ID", "AKIAENV"),
            ("AWS_SECRET_ACCESS_KEY", "se"),
            ("AWS_SESSION_TOKEN", "tok"),
        ]);
        let Ok(Source::Static { creds: c, from }) = source(&vars) else {
            panic!("env")
        };
        assert_eq!(
            (c.access_key_id.as_str(), from.as_str()),
            ("AKIAENV", "environment")
        );
        assert_eq!(c.session_token.as_deref().map(String::as_str), Some("tok"));
        assert!(source(&[("AWS_ACCESS_KEY_ID", "AKIAENV")]).is_err());
        // Credentials print without their secret.
        assert_eq!(format!("{c:?}"), "Credentials(AKIAENV, ..)");
    }

    #[test]
    fn the_config_files_profile_may_name_a_web_identity() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config");
        std::fs::write(
            &config,
            "[profile ci]\nrole_arn = arn:aws:iam::1:role/r\nweb_identity_token_file = /t\n",
        )
        .unwrap();
        let Ok(Source::WebIdentity { role_arn, .. }) = source(&[
            ("AWS_CONFIG_FILE", config.to_str().unwrap()),
            ("AWS_PROFILE", "ci"),
            ("HOME", dir.path().to_str().unwrap()),
        ]) else {
            panic!("web identity from the config file")
        };
        assert_eq!(role_arn, "arn:aws:iam::1:role/r");
    }

    /// The provider against a container credentials endpoint: credentials are kept while
    /// valid, fetched again once due, and the old ones serve while a refresh fails.
    #[tokio::test]
    async fn the_provider_keeps_credentials_until_they_are_due() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let expiration = std::sync::Arc::new(std::sync::Mutex::new("2099-01-01T00:00:00Z".to_owned()));
        let served = std::sync::Arc::new(AtomicU32::new(0));
        let (e, n) = (expiration.clone(), served.clone());
        let agent = crate::kms::stub::serve(move |_| {
            let exp = e.lock().unwrap().clone();
            if exp == "down" {
                return (500, String::new());
            }
            let i = n.fetch_add(1, Ordering::SeqCst);
            let body = format!(
                r#"{{"AccessKeyId":"ASIA{i}","SecretAccessKey":"s","Token":"t","Expiration":"{exp}"}}"#
            );
            (200, body)
        });
        let provider = |url: String| {
            Provider::new(Source::Container {
                url,
                token: None,
                token_file: None,
            })
            .unwrap()
        };
        let p = provider(agent.url.clone());
        assert_eq!(p.get().await.unwrap().access_key_id, "ASIA0");
        assert_eq!(
            p.get().await.unwrap().access_key_id,
            "ASIA0",
            "valid for years: kept"
        );
        assert_eq!(served.load(Ordering::SeqCst), 1);
        // Credentials that are already past their refresh point are fetched at every use.
        *expiration.lock().unwrap() = "2000-01-01T00:00:00Z".into();
        let p = provider(agent.url.clone());
        assert_eq!(p.get().await.unwrap().access_key_id, "ASIA1");
        assert_eq!(p.get().await.unwrap().access_key_id, "ASIA2");
        // A refresh that fails while the current credentials are still valid keeps them.
        *expiration.lock().unwrap() = "2099-01-01T00:00:00Z".into();
        let p = provider(agent.url.clone());
        p.get().await.unwrap();
        {
            // An hour's credentials with a minute left: due, and still valid.
            let mut cur = p.current.lock().await;
            let cur = cur.as_mut().unwrap();
            cur.fetched = SystemTime::now() - Duration::from_secs(3600);
            cur.creds.expires = Some(SystemTime::now() + Duration::from_secs(60));
        }
        *expiration.lock().unwrap() = "down".into();
        assert_eq!(p.get().await.unwrap().access_key_id, "ASIA3");
        // Expired credentials are not used: the failure is the answer.
        p.invalidate().await;
        assert!(matches!(p.get().await, Err(KmsError::Unreachable(_))));
    }

    #[test]
    fn temporary_credentials_are_fetched_again_before_they_expire() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let current = |lifetime: u64| Current {
            creds: Credentials {
                access_key_id: "A".into(),
                secret_access_key: Zeroizing::new("s".into()),
                session_token: None,
                expires: Some(t0 + Duration::from_secs(lifetime)),
            },
            fetched: t0,
        };
        // An hour's credentials: kept until five minutes before they expire.
        let hour = current(3600);
        assert!(!due(&hour, t0 + Duration::from_secs(3600 - 301)));
        assert!(due(&hour, t0 + Duration::from_secs(3600 - 300)));
        // Two minutes' credentials: fetched again at half their life.
        let short = current(120);
        assert!(!due(&short, t0 + Duration::from_secs(59)));
        assert!(due(&short, t0 + Duration::from_secs(60)));
        // Static ones never.
        let mut never = current(0);
        never.creds.expires = None;
        assert!(!due(&never, t0 + Duration::from_secs(1 << 40)));
    }
}
