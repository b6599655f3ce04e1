//! The credential sources that are network services, each as its documented protocol: STS
//! AssumeRoleWithWebIdentity (query API, XML answer), the container credentials endpoint (ECS,
//! EKS Pod Identity: JSON), and EC2 instance metadata with IMDSv2 (a session token from `PUT
//! /latest/api/token`, then the role's credentials as JSON). No proxy, no redirects, short
//! timeouts: the metadata services are link-local.

use super::errors::{AwsError, classify, xml_text};
use super::identity::Credentials;
use crate::kms::KmsError;
use serde_json::Value;
use std::time::{Duration, SystemTime};
use zeroize::Zeroizing;

/// The HTTP client for credential sources.
pub(super) fn client() -> Result<reqwest::Client, KmsError> {
    crate::kms::http::client_builder(Duration::from_secs(5), None)?
        .connect_timeout(Duration::from_secs(2))
        .no_proxy()
        .build()
        .map_err(|e| KmsError::Misconfigured(format!("HTTP client: {e}")))
}

/// A full container credentials URI must be HTTPS, or plain HTTP to a loopback address or to
/// the ECS / EKS agents' link-local addresses (as the AWS SDKs require).
pub(super) fn check_container_url(url: &str) -> Result<(), KmsError> {
    if url.starts_with("https://") {
        return Ok(());
    }
    let host = url
        .strip_prefix("http://")
        .and_then(|r| r.split('/').next())
        .map(|h| {
            h.rsplit_once(':')
                .filter(|(_, p)| p.parse::<u16>().is_ok())
                .map_or(h, |(h, _)| h)
        })
        .unwrap_or("");
    let allowed = [
        "127.0.0.1",
        "localhost",
        "[::1]",
        "169.254.170.2",
        "169.254.170.23",
        "[fd00:ec2::23]",
    ];
    if allowed.contains(&host) || host.starts_with("127.") {
        return Ok(());
    }
    Err(KmsError::Misconfigured(format!(
        "container credentials URI {url}: plain HTTP only to a loopback address or the container agent"
    )))
}

/// A transport failure of a credential source: the service could not be asked.
fn unreachable(what: &str, e: reqwest::Error) -> KmsError {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    KmsError::Unreachable(format!("{what}: {kind}"))
}

/// The body of an answer, or its error classified (5xx and 429 are *unreachable*).
async fn body_of(what: &str, resp: reqwest::Response) -> Result<Zeroizing<Vec<u8>>, KmsError> {
    let status = resp.status().as_u16();
    let request_id = resp
        .headers()
        .get("x-amzn-requestid")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = Zeroizing::new(resp.bytes().await.map_err(|e| unreachable(what, e))?.to_vec());
    if (200..300).contains(&status) {
        return Ok(body);
    }
    let e = AwsError::parse(status, None, request_id.as_deref(), &body);
    if status == 429 || status >= 500 {
        return Err(KmsError::Unreachable(format!("{what}: {}", e.describe())));
    }
    Err(match classify(&e) {
        KmsError::Misconfigured(m) => KmsError::Denied(format!("{what}: {m}")),
        KmsError::Denied(m) | KmsError::Corrupt(m) | KmsError::Unreachable(m) => {
            KmsError::Denied(format!("{what}: {m}"))
        }
    })
}

/// `application/x-www-form-urlencoded` value encoding.
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// STS AssumeRoleWithWebIdentity: temporary credentials for `role_arn` in exchange for the
/// OIDC `token`. Unsigned: the token is the proof.
pub(super) async fn assume_role_with_web_identity(
    http: &reqwest::Client,
    sts_endpoint: &str,
    role_arn: &str,
    session_name: &str,
    token: &str,
) -> Result<Credentials, KmsError> {
    let body = Zeroizing::new(format!(
        "Action=AssumeRoleWithWebIdentity&Version=2011-06-15&RoleArn={}&RoleSessionName={}&WebIdentityToken={}",
        form_encode(role_arn),
        form_encode(session_name),
        form_encode(token)
    ));
    let what = "STS AssumeRoleWithWebIdentity";
    let resp = http
        .post(format!("{sts_endpoint}/"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(body.as_bytes().to_vec())
        .send()
        .await
        .map_err(|e| unreachable(what, e))?;
    let body = body_of(what, resp).await?;
    let text = Zeroizing::new(String::from_utf8_lossy(&body).into_owned());
    let field = |tag: &str| xml_text(&text, tag);
    let bad = || KmsError::Misconfigured(format!("{what}: the answer has no credentials"));
    Ok(Credentials {
        access_key_id: field("AccessKeyId").ok_or_else(bad)?,
        secret_access_key: Zeroizing::new(field("SecretAccessKey").ok_or_else(bad)?),
        session_token: field("SessionToken").map(Zeroizing::new),
        expires: field("Expiration").and_then(|t| parse_time(&t)),
    })
}

/// Credentials from the JSON the container endpoint and IMDS both answer with.
fn from_json(what: &str, body: &[u8]) -> Result<Credentials, KmsError> {
    let mut v: Value = serde_json::from_slice(body)
        .map_err(|_| KmsError::Misconfigured(format!("{what}: the answer is not JSON")))?;
    let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    if let Some(code) = text("Code").filter(|c| c != "Success") {
        crate::kms::wire::wipe(&mut v);
        return Err(KmsError::Denied(format!("{what}: {code}")));
    }
    let creds = match (text("AccessKeyId"), text("SecretAccessKey")) {
        (Some(id), Some(secret)) => Ok(Credentials {
            access_key_id: id,
            secret_access_key: Zeroizing::new(secret),
            session_token: text("Token").map(Zeroizing::new),
            expires: text("Expiration").and_then(|t| parse_time(&t)),
        }),
        _ => Err(KmsError::Misconfigured(format!(
            "{what}: the answer has no credentials"
        ))),
    };
    crate::kms::wire::wipe(&mut v);
    creds
}

/// The container credentials endpoint, with its authorization token if one is given.
pub(super) async fn container(
    http: &reqwest::Client,
    url: &str,
    authorization: Option<&str>,
) -> Result<Credentials, KmsError> {
    let what = "container credentials";
    let mut req = http.get(url);
    if let Some(a) = authorization {
        req = req.header("Authorization", a);
    }
    let resp = req.send().await.map_err(|e| unreachable(what, e))?;
    from_json(what, &body_of(what, resp).await?)
}

/// The instance role's credentials over IMDSv2.
pub(super) async fn imds(http: &reqwest::Client, endpoint: &str) -> Result<Credentials, KmsError> {
    let what = "instance metadata";
    let resp = http
        .put(format!("{endpoint}/latest/api/token"))
        .header("X-aws-ec2-metadata-token-ttl-seconds", "21600")
        .send()
        .await
        .map_err(|e| unreachable(what, e))?;
    let token = Zeroizing::new(
        String::from_utf8_lossy(&body_of(what, resp).await?)
            .trim()
            .to_owned(),
    );
    let get = |path: String| {
        http.get(format!(
            "{endpoint}/latest/meta-data/iam/security-credentials/{path}"
        ))
        .header("X-aws-ec2-metadata-token", token.as_str())
        .send()
    };
    let resp = get(String::new()).await.map_err(|e| unreachable(what, e))?;
    let roles = body_of(what, resp).await?;
    let role = String::from_utf8_lossy(&roles)
        .lines()
        .next()
        .map(|l| l.trim().to_owned())
        .filter(|r| !r.is_empty() && !r.contains('/'))
        .ok_or_else(|| KmsError::Misconfigured(format!("{what}: the instance has no IAM role")))?;
    let resp = get(role).await.map_err(|e| unreachable(what, e))?;
    from_json(what, &body_of(what, resp).await?)
}

/// An ISO 8601 UTC time as AWS writes expirations: `2026-12-02T03:04:05Z`, with or without
/// fractional seconds.
pub(super) fn parse_time(s: &str) -> Option<SystemTime> {
    let s = s.trim().strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let time = time.split('.').next()?;
    let mut t = time.split(':').map(|x| x.parse::<i64>().ok());
    let (h, min, sec) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || h > 23 || min > 59 || sec > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + min * 60 + sec;
    u64::try_from(secs)
        .ok()
        .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kms::stub;

    #[test]
    fn times_parse_as_aws_writes_them() {
        let t = |s| parse_time(s).map(|t| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs());
        assert_eq!(t("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(t("2019-11-01T20:26:47Z"), Some(1_572_640_007));
        assert_eq!(t("2000-02-29T12:00:00.123Z"), Some(951_825_600));
        for bad in ["2019-11-01T20:26:47", "2019-13-01T00:00:00Z", "soon", ""] {
            assert_eq!(t(bad), None, "{bad}");
        }
    }

    /// IMDSv2 as the EC2 documentation describes it: a token from PUT, then the role name,
    /// then its credentials, every GET carrying the token.
    #[tokio::test]
    async fn imds_v2_gives_the_roles_credentials() {
        let server = stub::serve(|r| {
            match (r.method.as_str(), r.path.as_str()) {
            ("PUT", "/latest/api/token") if r.header("x-aws-ec2-metadata-token-ttl-seconds") == Some("21600") => {
                (200, "AQAEAtoken==".into())
            }
            ("GET", _) if r.header("x-aws-ec2-metadata-token") != Some("AQAEAtoken==") => (401, String::new()),
            ("GET", "/latest/meta-data/iam/security-credentials/") => (200, "kmsfs-role\n".into()),
            ("GET", "/latest/meta-data/iam/security-credentials/kmsfs-role") => (
                200,
                r#"{"Code":"Success","LastUpdated":"2026-12-01T00:00:00Z","Type":"AWS-HMAC","AccessKeyId":"ASIAIMDS","SecretAccessKey":"imds-secret","Token":"imds-token","Expiration":"2030-01-01T00:00:00Z"}"#.into(),
            ),
            _ => (404, String::new()),
        }
        });
        let c = imds(&client().unwrap(), &server.url).await.unwrap();
        assert_eq!(c.access_key_id, "ASIAIMDS");
        assert_eq!(c.secret_access_key.as_str(), "imds-secret");
        assert_eq!(c.session_token.as_deref().map(String::as_str), Some("imds-token"));
        assert_eq!(c.expires, parse_time("2030-01-01T00:00:00Z"));
        let seen: Vec<String> = server
            .seen()
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect();
        assert_eq!(seen[0], "PUT /latest/api/token");
        assert_eq!(seen.len(), 3);
    }

    #[tokio::test]
    async fn imds_without_a_role_or_an_answer_is_refused_or_unreachable() {
        let no_role = stub::serve(|r| match r.method.as_str() {
            "PUT" => (200, "t".into()),
            _ => (404, "<html>Not Found</html>".into()),
        });
        assert!(matches!(
            imds(&client().unwrap(), &no_role.url).await,
            Err(KmsError::Denied(_))
        ));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let gone = imds(&client().unwrap(), &format!("http://127.0.0.1:{port}")).await;
        assert!(
            matches!(&gone, Err(KmsError::Unreachable(m)) if m.contains("cannot connect")),
            "{gone:?}"
        );
    }

    /// The container endpoint as ECS and EKS Pod Identity serve it.
    #[tokio::test]
    async fn container_credentials_carry_the_authorization_token() {
        let agent = stub::serve(|r| {
            match r.header("authorization") {
            Some("Bearer pod-token") => (
                200,
                r#"{"AccessKeyId":"ASIAPOD","SecretAccessKey":"pod-secret","Token":"pod-session","AccountId":"111122223333","Expiration":"2030-01-01T00:00:00Z"}"#.into(),
            ),
            _ => (403, r#"{"Code":"AccessDenied","Message":"bad token"}"#.into()),
        }
        });
        let url = format!("{}/v1/credentials", agent.url);
        let http = client().unwrap();
        let c = container(&http, &url, Some("Bearer pod-token")).await.unwrap();
        assert_eq!(
            (c.access_key_id.as_str(), c.secret_access_key.as_str()),
            ("ASIAPOD", "pod-secret")
        );
        assert!(matches!(
            container(&http, &url, None).await,
            Err(KmsError::Denied(_))
        ));
        assert_eq!(agent.seen()[0].path, "/v1/credentials");
        check_container_url(&url).unwrap();
    }

    /// STS's documented answer to AssumeRoleWithWebIdentity, and its refusal of a bad token.
    #[tokio::test]
    async fn web_identity_exchanges_the_token_at_sts() {
        let sts = stub::serve(|r| {
            if r.body.contains("WebIdentityToken=good.jwt%2Btoken") {
                (200, "<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><AssumeRoleWithWebIdentityResult><Credentials><SessionToken>sts-session</SessionToken><SecretAccessKey>sts-secret</SecretAccessKey><Expiration>2030-01-01T00:00:00Z</Expiration><AccessKeyId>ASIASTS</AccessKeyId></Credentials></AssumeRoleWithWebIdentityResult><ResponseMetadata><RequestId>ad4156e9</RequestId></ResponseMetadata></AssumeRoleWithWebIdentityResponse>".into())
            } else {
                (400, "<ErrorResponse><Error><Type>Sender</Type><Code>InvalidIdentityToken</Code><Message>bad</Message></Error><RequestId>r-2</RequestId></ErrorResponse>".into())
            }
        });
        let http = client().unwrap();
        let role = "arn:aws:iam::111122223333:role/kmsfs";
        let c = assume_role_with_web_identity(&http, &sts.url, role, "kmsfs", "good.jwt+token")
            .await
            .unwrap();
        assert_eq!(
            (c.access_key_id.as_str(), c.secret_access_key.as_str()),
            ("ASIASTS", "sts-secret")
        );
        assert_eq!(
            c.session_token.as_deref().map(String::as_str),
            Some("sts-session")
        );
        let body = &sts.seen()[0].body;
        assert!(body.starts_with("Action=AssumeRoleWithWebIdentity&Version=2011-06-15&RoleArn=arn%3Aaws%3Aiam%3A%3A111122223333%3Arole%2Fkmsfs"), "{body}");
        let e = assume_role_with_web_identity(&http, &sts.url, role, "kmsfs", "bad").await;
        assert!(
            matches!(&e, Err(KmsError::Denied(m)) if m.contains("InvalidIdentityToken") && m.contains("r-2")),
            "{e:?}"
        );
    }
}
