//! The rustls client configuration for mutual TLS with a KMIP server: the servers' CA as the
//! only trust root, and the client certificate and key as our identity. ring provider, TLS 1.2
//! and 1.3 (KMIP 1.4's profiles require TLS 1.2; rustls offers only AEAD suites, so a server
//! with an RSA certificate that allows only CBC suites, as PyKMIP's `TLS1.2` suite does, will
//! not shake hands: give it an ECDSA certificate).

use crate::kms::KmsError;
use crate::kms::kmip::settings::{CA_VAR, CERT_VAR, KEY_VAR};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

fn bad(path: &Path, var: &str, e: impl std::fmt::Display) -> KmsError {
    KmsError::Misconfigured(format!("KMIP TLS file {} ({var}): {e}", path.display()))
}

fn certificates(path: &Path, var: &str) -> Result<Vec<CertificateDer<'static>>, KmsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(path, var, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(path, var, e))?;
    if certs.is_empty() {
        return Err(bad(path, var, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// The client configuration for `ca` (PEM bundle), `cert` (PEM chain) and `key` (PEM, a file
/// only its owner may read).
pub(super) fn client_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<Arc<rustls::ClientConfig>, KmsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certificates(ca, CA_VAR)? {
        roots.add(c).map_err(|e| bad(ca, CA_VAR, e))?;
    }
    let chain = certificates(cert, CERT_VAR)?;
    let pem = crate::kms::env::read_secret_file(key)?;
    let private = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| bad(key, KEY_VAR, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| KmsError::Misconfigured(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, private)
        .map_err(|e| bad(key, KEY_VAR, format!("does not go with {}: {e}", cert.display())))?;
    Ok(Arc::new(config))
}
