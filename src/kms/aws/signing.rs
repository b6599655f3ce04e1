//! SigV4 signing of one request with `aws-sigv4`, AWS's own signer (the one its SDKs use):
//! the headers to add (`Authorization`, `X-Amz-Date`, `X-Amz-Security-Token` for temporary
//! credentials) for a POST of `body` to `url` with `headers`, at `time`.

use super::identity::Credentials;
use crate::kms::KmsError;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use std::time::SystemTime;

/// The service name in the credential scope.
pub(super) const SERVICE: &str = "kms";

/// The headers that sign a POST of `body` to `url` carrying `headers`.
pub(super) fn sign_post(
    creds: &Credentials,
    region: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    time: SystemTime,
) -> Result<Vec<(String, String)>, KmsError> {
    let bad = |e: &dyn std::fmt::Display| KmsError::Misconfigured(format!("cannot sign the request: {e}"));
    // The signer's copy of the secret wipes itself on drop (aws-credential-types zeroizes).
    let identity = aws_credential_types::Credentials::new(
        creds.access_key_id.as_str(),
        creds.secret_access_key.as_str(),
        creds.session_token.as_ref().map(|t| t.to_string()),
        creds.expires,
        "kmsfs",
    )
    .into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(SERVICE)
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| bad(&e))?
        .into();
    let request = SignableRequest::new("POST", url, headers.iter().copied(), SignableBody::Bytes(body))
        .map_err(|e| bad(&e))?;
    let (instructions, _signature) = sign(request, &params).map_err(|e| bad(&e))?.into_parts();
    Ok(instructions
        .headers()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use zeroize::Zeroizing;

    fn creds(token: Option<&str>) -> Credentials {
        Credentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: Zeroizing::new("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into()),
            session_token: token.map(|t| Zeroizing::new(t.into())),
            expires: None,
        }
    }

    fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
        h.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn requests_are_signed_for_kms_in_the_region_at_the_time() {
        // 2015-08-30T12:36:00Z, the date of AWS's SigV4 test suite.
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_440_938_160);
        let headers = [
            ("content-type", "application/x-amz-json-1.1"),
            ("x-amz-target", "TrentService.Decrypt"),
        ];
        let url = "https://kms.eu-west-1.amazonaws.com/";
        let h = sign_post(&creds(None), "eu-west-1", url, &headers, b"{}", t).unwrap();
        assert_eq!(header(&h, "x-amz-date"), Some("20150830T123600Z"));
        let auth = header(&h, "authorization").unwrap();
        assert!(
            auth.starts_with(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/eu-west-1/kms/aws4_request, \
                 SignedHeaders=content-type;host;x-amz-date;x-amz-target, Signature="
            ),
            "{auth}"
        );
        assert!(!auth.contains("wJalrXUtnFEMI"), "the secret never leaves");
        assert!(header(&h, "x-amz-security-token").is_none());
        // Another body, region or time: another signature.
        let sig = |h: &[(String, String)]| {
            header(h, "authorization")
                .unwrap()
                .rsplit('=')
                .next()
                .unwrap()
                .to_owned()
        };
        let other_body = sign_post(&creds(None), "eu-west-1", url, &headers, b"{ }", t).unwrap();
        let other_region = sign_post(&creds(None), "us-east-1", url, &headers, b"{}", t).unwrap();
        assert_ne!(sig(&h), sig(&other_body));
        assert_ne!(sig(&h), sig(&other_region));
        // Temporary credentials carry their session token.
        let h = sign_post(
            &creds(Some("FQoGZXIvYXdzE")),
            "eu-west-1",
            url,
            &headers,
            b"{}",
            t,
        )
        .unwrap();
        assert_eq!(header(&h, "x-amz-security-token"), Some("FQoGZXIvYXdzE"));
    }
}
