//! [`Credentials`]: what the signer needs, as any link of the credential chain gives it.

use std::time::SystemTime;
use zeroize::Zeroizing;

/// An access key, its secret and, for temporary credentials, a session token and expiry.
#[derive(Clone)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: Zeroizing<String>,
    pub session_token: Option<Zeroizing<String>>,
    pub expires: Option<SystemTime>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, ..)", self.access_key_id)
    }
}

impl Credentials {
    /// Static credentials from a profile's (or the environment's) three settings.
    pub(super) fn from_settings(get: impl Fn(&str) -> Option<String>) -> Option<Credentials> {
        Some(Credentials {
            access_key_id: get("aws_access_key_id")?,
            secret_access_key: Zeroizing::new(get("aws_secret_access_key")?),
            session_token: get("aws_session_token").map(Zeroizing::new),
            expires: None,
        })
    }
}
