//! Who the mount is to the server: the token [`Session`] (looked up or obtained by AppRole
//! login, renewed at two thirds of its lease) and [`Auth::call`], a request with the current
//! token that tells a dead token (log in again, once) from a policy refusal (*denied*).

use super::credentials::Credentials;
use super::errors::classify;
use super::transport::{Answer, Transport};
use crate::kms::KmsError;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;
use zeroize::Zeroizing;

/// A token and when to renew it.
struct Session {
    token: Zeroizing<String>,
    /// Renew (or log in again) after this; `None` for tokens that do not expire.
    renew_at: Option<Instant>,
    renewable: bool,
}

fn session_from(token: Zeroizing<String>, lease_secs: u64, renewable: bool) -> Session {
    Session {
        token,
        // Renew at two thirds of the lease.
        renew_at: (lease_secs > 0).then(|| Instant::now() + Duration::from_secs(lease_secs * 2 / 3)),
        renewable,
    }
}

/// The credentials and the token they gave.
pub(super) struct Auth {
    credentials: Credentials,
    /// The current token. Taken by every request to read it; held across a login or renewal
    /// so concurrent requests wait for one new token instead of each logging in.
    session: Mutex<Option<Session>>,
}

impl Auth {
    /// No token yet: the first request looks it up or logs in.
    pub(super) fn new(credentials: Credentials) -> Self {
        Auth {
            credentials,
            session: Mutex::new(None),
        }
    }

    /// A usable token: logs in (AppRole) or renews when due.
    async fn token(&self, t: &Transport, force_new: bool) -> Result<Zeroizing<String>, KmsError> {
        let mut s = self.session.lock().await;
        let due = match &*s {
            None => true,
            Some(sess) => force_new || sess.renew_at.is_some_and(|t| Instant::now() >= t),
        };
        if !due {
            return Ok(s.as_ref().map(|x| x.token.clone()).expect("session present"));
        }
        // Renew first where we can; log in again where we cannot.
        if let (Some(sess), false) = (s.as_ref(), force_new)
            && sess.renewable
            && let Ok(Answer::Ok(v)) = t
                .send("auth/token/renew-self", Some(&json!({})), Some(&sess.token))
                .await
        {
            let lease = v
                .pointer("/auth/lease_duration")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            let token = sess.token.clone();
            *s = Some(session_from(token, lease, true));
            log::info!("OpenBao token renewed for {lease} s");
            return Ok(s.as_ref().expect("just set").token.clone());
        }
        let new = self.login(t).await?;
        let token = new.token.clone();
        *s = Some(new);
        Ok(token)
    }

    async fn login(&self, t: &Transport) -> Result<Session, KmsError> {
        match &self.credentials {
            Credentials::Token(tok) => {
                // A static token: learn its lease so we renew it in time.
                match t.send("auth/token/lookup-self", None, Some(tok)).await? {
                    Answer::Ok(v) => {
                        let ttl = v.pointer("/data/ttl").and_then(Value::as_u64).unwrap_or(0);
                        let renewable = v
                            .pointer("/data/renewable")
                            .and_then(Value::as_bool)
                            .unwrap_or(false);
                        Ok(session_from(tok.clone(), ttl, renewable))
                    }
                    Answer::Refused(403, _) => Err(KmsError::Denied(
                        "the OpenBao token is invalid, expired or revoked; give the mount a new token".into(),
                    )),
                    Answer::Refused(code, m) => {
                        Err(KmsError::Misconfigured(format!("token lookup: HTTP {code} {m}")))
                    }
                }
            }
            Credentials::AppRole { role_id, secret_id } => {
                let body = json!({"role_id": role_id, "secret_id": secret_id.as_str()});
                match t.send("auth/approle/login", Some(&body), None).await? {
                    Answer::Ok(v) => {
                        let token = v
                            .pointer("/auth/client_token")
                            .and_then(Value::as_str)
                            .ok_or_else(|| {
                                KmsError::Misconfigured("AppRole login returned no token".into())
                            })?;
                        let lease = v
                            .pointer("/auth/lease_duration")
                            .and_then(Value::as_u64)
                            .unwrap_or(0);
                        let renewable = v
                            .pointer("/auth/renewable")
                            .and_then(Value::as_bool)
                            .unwrap_or(false);
                        log::info!("logged in to OpenBao with AppRole (lease {lease} s)");
                        Ok(session_from(Zeroizing::new(token.to_owned()), lease, renewable))
                    }
                    Answer::Refused(_, m) => Err(KmsError::Denied(format!(
                        "AppRole login refused ({m}); check the role id and secret id"
                    ))),
                }
            }
        }
    }

    /// Transit `op` on `key` (at `path`) with the current token. A 403 is checked with
    /// lookup-self: a dead token means log in again (once); a live one means the policy
    /// refuses, which is *denied*.
    pub(super) async fn call(
        &self,
        t: &Transport,
        path: &str,
        op: &str,
        key: &str,
        body: &Value,
    ) -> Result<Value, KmsError> {
        let mut token = self.token(t, false).await?;
        for retry in 0..2 {
            match t.send(path, Some(body), Some(&token)).await? {
                Answer::Ok(v) => return Ok(v),
                Answer::Refused(403, m) => {
                    let alive = matches!(
                        t.send("auth/token/lookup-self", None, Some(&token)).await,
                        Ok(Answer::Ok(_))
                    );
                    if alive || retry == 1 {
                        return Err(KmsError::Denied(format!(
                            "the token may not {op} with key {key:?} ({m})"
                        )));
                    }
                    log::warn!("OpenBao token is no longer valid; logging in again");
                    token = self.token(t, true).await?;
                }
                Answer::Refused(code, m) => return Err(classify(code, &m)),
            }
        }
        unreachable!("loop returns")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kms::stub::{self, Stub};
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn sessions_renew_at_two_thirds_of_the_lease() {
        let before = Instant::now();
        let s = session_from(Zeroizing::new("s.t".into()), 3600, true);
        let after = Instant::now();
        let at = s.renew_at.expect("a lease is renewed");
        assert!(at >= before + Duration::from_secs(2400) && at <= after + Duration::from_secs(2400));
        assert!(s.renewable && s.token.as_str() == "s.t");
        // A token without a lease (root, or ttl 0) is never renewed.
        let s = session_from(Zeroizing::new("s.root".into()), 0, false);
        assert!(s.renew_at.is_none() && !s.renewable);
        // A one-second lease is due at once.
        let s = session_from(Zeroizing::new("s.t".into()), 1, true);
        assert!(s.renew_at.expect("a lease") <= Instant::now());
    }

    const LIVE: &str = r#"{"data":{"ttl":0,"renewable":false}}"#;
    const POLICY_DENIED: &str = r#"{"errors":["1 error occurred:\n\t* permission denied\n\n"]}"#;
    const DEAD_TOKEN: &str = r#"{"errors":["permission denied"]}"#;

    async fn call(url: &str, credentials: Credentials) -> Result<Value, KmsError> {
        let t = Transport::new(vec![url.to_owned()], None, None, None).expect("client");
        Auth::new(credentials)
            .call(&t, "transit/decrypt/kek", "decrypt", "kek", &json!({}))
            .await
    }

    fn token(t: &str) -> Credentials {
        Credentials::Token(Zeroizing::new(t.into()))
    }

    fn approle(secret_id: &str) -> Credentials {
        Credentials::AppRole {
            role_id: "role".into(),
            secret_id: Zeroizing::new(secret_id.into()),
        }
    }

    /// The paths requested so far, in order, on one line.
    fn paths(bao: &Stub) -> String {
        let seen = bao.seen();
        let paths: Vec<&str> = seen.iter().map(|r| r.path.trim_start_matches("/v1/")).collect();
        paths.join(" ")
    }

    #[tokio::test]
    async fn a_403_with_a_live_token_is_denied_by_policy() {
        let bao = stub::serve(|r| match r.path.as_str() {
            "/v1/auth/token/lookup-self" => (200, LIVE.into()),
            _ => (403, POLICY_DENIED.into()),
        });
        let e = call(&bao.url, token("s.t")).await.err();
        let want = "the token may not decrypt with key \"kek\" (1 error occurred: * permission denied  )";
        assert_eq!(e, Some(KmsError::Denied(want.into())));
        let want = "auth/token/lookup-self transit/decrypt/kek auth/token/lookup-self";
        assert_eq!(paths(&bao), want);
    }

    #[tokio::test]
    async fn a_revoked_token_is_denied() {
        let lookups = AtomicU32::new(0);
        let bao = stub::serve(move |r| match r.path.as_str() {
            // Alive when the mount starts, revoked by the time it is used.
            "/v1/auth/token/lookup-self" if lookups.fetch_add(1, Ordering::Relaxed) == 0 => {
                (200, LIVE.into())
            }
            _ => (403, DEAD_TOKEN.into()),
        });
        let e = call(&bao.url, token("s.t")).await.err();
        assert!(
            matches!(&e, Some(KmsError::Denied(m)) if m.contains("invalid, expired or revoked")),
            "{e:?}"
        );
        // Lookup, call, lookup (dead), lookup again to log in.
        let want = "auth/token/lookup-self transit/decrypt/kek auth/token/lookup-self auth/token/lookup-self";
        assert_eq!(paths(&bao), want);
    }

    #[tokio::test]
    async fn an_approle_logs_in_again_when_its_token_dies() {
        let logins = AtomicU32::new(0);
        let bao = stub::serve(move |r| match (r.path.as_str(), r.token.as_deref()) {
            ("/v1/auth/approle/login", _) => {
                let n = logins.fetch_add(1, Ordering::Relaxed) + 1;
                let auth = json!({"auth": {"client_token": format!("s.{n}"), "lease_duration": 3600, "renewable": true}});
                (200, auth.to_string())
            }
            // The first token is revoked.
            (_, Some("s.1")) => (403, DEAD_TOKEN.into()),
            ("/v1/transit/decrypt/kek", Some("s.2")) => (200, r#"{"data":{"plaintext":"AA=="}}"#.into()),
            _ => (400, r#"{"errors":["unexpected"]}"#.into()),
        });
        let v = call(&bao.url, approle("secret"))
            .await
            .expect("the second token works");
        assert_eq!(v.pointer("/data/plaintext"), Some(&json!("AA==")));
        let want = "auth/approle/login transit/decrypt/kek auth/token/lookup-self auth/approle/login \
                    transit/decrypt/kek";
        assert_eq!(paths(&bao), want);
        let login = &bao.seen()[0];
        assert!(login.token.is_none() && login.body.contains("\"secret_id\":\"secret\""));
    }

    #[tokio::test]
    async fn a_refused_approle_login_is_denied() {
        let bao = stub::serve(|_| (400, r#"{"errors":["invalid role or secret ID"]}"#.into()));
        let e = call(&bao.url, approle("wrong")).await.err();
        assert_eq!(
            e,
            Some(KmsError::Denied(
                "AppRole login refused (invalid role or secret ID); check the role id and secret id".into()
            ))
        );
    }

    #[tokio::test]
    async fn other_refusals_are_classified() {
        let bao = stub::serve(|r| match r.path.as_str() {
            "/v1/auth/token/lookup-self" => (200, LIVE.into()),
            _ => (400, r#"{"errors":["refusing to use soft-deleted key"]}"#.into()),
        });
        let e = call(&bao.url, token("s.t")).await.err();
        assert_eq!(
            e,
            Some(KmsError::Denied("refusing to use soft-deleted key".into()))
        );
    }
}
