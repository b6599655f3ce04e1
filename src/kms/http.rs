//! The HTTP client of every network backend: rustls with ring, timeouts, redirects never
//! followed (a redirect would carry credentials, and DEKs in bodies, to another host), and the
//! CA bundle the mount names; and how a failed exchange reads ([`describe`],
//! [`is_certificate_error`]).

use crate::kms::KmsError;
use std::path::Path;
use std::time::Duration;

/// A client builder with `timeout` per request, trusting `ca_bundle` (PEM) besides the
/// system's roots if given.
pub(in crate::kms) fn client_builder(
    timeout: Duration,
    ca_bundle: Option<&Path>,
) -> Result<reqwest::ClientBuilder, KmsError> {
    // reqwest is built without a default TLS crypto provider: use ring (installing twice is
    // harmless).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut b = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(3))
        .pool_idle_timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none());
    if let Some(ca) = ca_bundle {
        let bad =
            |e: &dyn std::fmt::Display| KmsError::Misconfigured(format!("CA bundle {}: {e}", ca.display()));
        let pem = std::fs::read(ca).map_err(|e| bad(&e))?;
        for c in reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| bad(&e))? {
            b = b.add_root_certificate(c);
        }
    }
    Ok(b)
}

/// A TLS failure that retrying cannot fix.
pub(in crate::kms) fn is_certificate_error(e: &reqwest::Error) -> bool {
    let text = describe(e);
    text.contains("certificate") || text.contains("UnknownIssuer")
}

/// A transport error with its chain of causes, on one line.
pub(in crate::kms) fn describe(e: &reqwest::Error) -> String {
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
