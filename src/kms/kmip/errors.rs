//! How a KMIP answer maps to the trait's outcomes: [`classify`] sorts a failed batch item by
//! its result reason, [`tls_failure`] says which TLS errors no retry can fix. Pure functions.
//!
//! Measured on PyKMIP 0.11: a key that is Pre-Active, Deactivated or Compromised gives
//! *Permission Denied* ("must be in the Active state"); a destroyed key, or one owned by
//! another client identity, *Item Not Found*; a Decrypt whose associated data or tag does not
//! match gives *General Failure* (other servers say *Cryptographic Failure*).

use crate::kmip::messages::{Failure, Operation, reason};
use crate::kms::KmsError;
use rustls::AlertDescription;

/// The outcome of a failed batch item of operation `op`.
pub(super) fn classify(op: Operation, f: &Failure) -> KmsError {
    match f.reason {
        Some(reason::PERMISSION_DENIED | reason::AUTHENTICATION_NOT_SUCCESSFUL) => {
            KmsError::Denied(format!("KMIP {op:?}: {f}"))
        }
        Some(reason::ITEM_NOT_FOUND) => KmsError::Denied(format!(
            "KMIP {op:?}: {f} (destroyed, or not visible to this client certificate)"
        )),
        Some(reason::CRYPTOGRAPHIC_FAILURE | reason::GENERAL_FAILURE) if op == Operation::Decrypt => {
            KmsError::Corrupt(format!("KMIP Decrypt: {f}"))
        }
        // The server stopped before this item: ask again later.
        None => KmsError::Unreachable(format!("KMIP {op:?}: {f}")),
        Some(_) => KmsError::Misconfigured(format!("the KMIP server refused {op:?}: {f}")),
    }
}

/// The outcome of a TLS error with `addr` that retrying cannot fix, if `e` is one.
pub(super) fn tls_failure(addr: &str, e: &std::io::Error) -> Option<KmsError> {
    let tls = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    match tls {
        rustls::Error::InvalidCertificate(why) => Some(KmsError::Misconfigured(format!(
            "KMIP server {addr}: its TLS certificate is not trusted ({why:?}); set KMSFS_KMIP_CA to the CA \
             that signed it"
        ))),
        rustls::Error::AlertReceived(
            a @ (AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRequired
            | AlertDescription::AccessDenied),
        ) => Some(KmsError::Denied(format!(
            "KMIP server {addr} refused our client certificate (TLS alert {a:?})"
        ))),
        rustls::Error::AlertReceived(AlertDescription::HandshakeFailure)
        | rustls::Error::PeerIncompatible(_) => Some(KmsError::Misconfigured(format!(
            "KMIP server {addr}: no TLS version or cipher suite in common ({tls}); kmsfs offers TLS 1.2 and \
             1.3 with AEAD suites only: give the server an ECDSA certificate or enable GCM suites"
        ))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(r: u32) -> Failure {
        Failure {
            reason: Some(r),
            message: "m".into(),
        }
    }

    #[test]
    fn refusals_are_classified() {
        let denied = |e: KmsError| matches!(e, KmsError::Denied(_));
        assert!(denied(classify(
            Operation::Decrypt,
            &failure(reason::PERMISSION_DENIED)
        )));
        assert!(denied(classify(
            Operation::Locate,
            &failure(reason::ITEM_NOT_FOUND)
        )));
        assert!(denied(classify(
            Operation::Encrypt,
            &failure(reason::AUTHENTICATION_NOT_SUCCESSFUL)
        )));
        assert!(matches!(
            classify(Operation::Decrypt, &failure(reason::GENERAL_FAILURE)),
            KmsError::Corrupt(_)
        ));
        assert!(matches!(
            classify(Operation::Encrypt, &failure(reason::GENERAL_FAILURE)),
            KmsError::Misconfigured(_)
        ));
        assert!(matches!(
            classify(Operation::Decrypt, &failure(0x07)),
            KmsError::Misconfigured(_)
        ));
        let unanswered = Failure {
            reason: None,
            message: "x".into(),
        };
        assert!(matches!(
            classify(Operation::Decrypt, &unanswered),
            KmsError::Unreachable(_)
        ));
    }

    #[test]
    fn tls_errors_that_no_retry_fixes() {
        let io = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let untrusted = io(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ));
        let Some(KmsError::Misconfigured(m)) = tls_failure("h:5696", &untrusted) else {
            panic!()
        };
        assert!(m.contains("KMSFS_KMIP_CA") && !m.contains('\n'), "{m}");
        let refused = io(rustls::Error::AlertReceived(AlertDescription::UnknownCA));
        assert!(matches!(
            tls_failure("h:5696", &refused),
            Some(KmsError::Denied(_))
        ));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(tls_failure("h:5696", &reset), None);
    }
}
