//! HTTP to the OpenBao servers: the client (trusted CA bundle, client certificate, redirects
//! never followed) and [`Transport::send`], one exchange retried across the HA addresses with
//! backoff, and re-sent to another node when it is late (`kms::nodes`: hedging, and nodes set
//! aside). Which answers are retried is [`triage`]'s call; a request that no server answers
//! ends as *unreachable*.

use super::errors::{Triage, triage};
use crate::kms::KmsError;
use crate::kms::http::{describe, is_certificate_error};
use crate::kms::nodes::{Nodes, SetAside};
use serde_json::Value;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Attempts per request across all servers before a request counts as unreachable.
const ATTEMPTS: u32 = 6;
/// Per-request timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What an HTTP exchange came to.
pub(super) enum Answer {
    Ok(Value),
    /// A 4xx with an error message.
    Refused(u16, String),
}

/// What one exchange with one node came to.
enum Outcome {
    /// Final, either way: an answer, or an error that retrying cannot fix.
    Done(Result<Answer, KmsError>),
    /// Ask again (another node, after a pause), with the text for the *unreachable* error.
    Retry(String),
}

/// The HTTP client and the servers it talks to.
pub(super) struct Transport {
    http: reqwest::Client,
    /// The servers, which one to ask first, and which are set aside.
    nodes: Nodes,
    namespace: Option<String>,
    /// HTTP requests sent to the server (for status and tests).
    requests: AtomicU64,
}

impl Transport {
    /// A client for `addrs` (at least one), trusting `ca_cert` if given and presenting
    /// `client_cert` (certificate, key) if given.
    pub(super) fn new(
        addrs: Vec<String>,
        namespace: Option<String>,
        ca_cert: Option<&Path>,
        client_cert: Option<(&Path, &Path)>,
    ) -> Result<Self, KmsError> {
        let mut b = crate::kms::http::client_builder(REQUEST_TIMEOUT, ca_cert)?;
        if let Some((cert, key)) = client_cert {
            let mut pem = std::fs::read(cert).map_err(|e| {
                KmsError::Misconfigured(format!("client certificate {}: {e}", cert.display()))
            })?;
            pem.extend_from_slice(
                &std::fs::read(key)
                    .map_err(|e| KmsError::Misconfigured(format!("client key {}: {e}", key.display())))?,
            );
            let id = reqwest::Identity::from_pem(&pem)
                .map_err(|e| KmsError::Misconfigured(format!("client certificate: {e}")))?;
            b = b.identity(id);
        }
        let http = b
            .build()
            .map_err(|e| KmsError::Misconfigured(format!("HTTP client: {e}")))?;
        Ok(Transport {
            http,
            nodes: Nodes::new(addrs),
            namespace,
            requests: AtomicU64::new(0),
        })
    }

    /// HTTP requests sent so far.
    pub(super) fn request_count(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The servers set aside now, for status.
    pub(super) fn set_aside(&self) -> Vec<SetAside> {
        self.nodes.report()
    }

    /// One HTTP exchange with retries: connection failures, timeouts, 429, 5xx and standby
    /// answers move on to the next server after a backoff with jitter; 4xx answers are final.
    /// An exchange that is late is sent to another server too (see [`Transport::hedged`]).
    pub(super) async fn send(
        &self,
        path: &str,
        body: Option<&Value>,
        token: Option<&str>,
    ) -> Result<Answer, KmsError> {
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            match self.hedged(self.nodes.pick(attempt), path, body, token).await {
                Outcome::Done(r) => return r,
                Outcome::Retry(why) => last = why,
            }
            if let Some(pause) = crate::kms::retry::pause_after(attempt, ATTEMPTS) {
                tokio::time::sleep(pause).await;
            }
        }
        Err(KmsError::Unreachable(last))
    }

    /// An exchange with node `idx`; if it has not ended after [`Nodes::hedge_after`], node
    /// `idx` is set aside and the same request goes to another node, and whichever ends first
    /// with an outcome other than retry wins (the other is dropped, which cancels it).
    async fn hedged(&self, idx: usize, path: &str, body: Option<&Value>, token: Option<&str>) -> Outcome {
        let first = self.exchange(idx, path, body, token);
        tokio::pin!(first);
        let late = self.nodes.hedge_after();
        if self.nodes.len() < 2 {
            return first.await;
        }
        let Ok(done) = tokio::time::timeout(late, &mut first).await else {
            let Some(other) = self.nodes.other_than(idx) else {
                return first.await;
            };
            self.nodes.set_aside(idx, late);
            let second = self.exchange(other, path, body, token);
            tokio::pin!(second);
            return tokio::select! {
                o = &mut first => match o {
                    Outcome::Retry(_) => second.await,
                    o => o,
                },
                o = &mut second => match o {
                    Outcome::Retry(_) => first.await,
                    o => o,
                },
            };
        };
        done
    }

    /// One HTTP exchange with node `idx`.
    async fn exchange(&self, idx: usize, path: &str, body: Option<&Value>, token: Option<&str>) -> Outcome {
        let addr = self.nodes.addr(idx);
        let url = format!("{addr}/v1/{path}");
        let mut req = match body {
            Some(b) => self.http.post(&url).json(b),
            None => self.http.get(&url),
        };
        if let Some(t) = token {
            req = req.header("X-Vault-Token", t);
        }
        if let Some(ns) = &self.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let sent = Instant::now();
        match req.send().await {
            Err(e) if is_certificate_error(&e) => Outcome::Done(Err(KmsError::Misconfigured(format!(
                "{addr}: the server's TLS certificate is not trusted ({}); set BAO_CACERT to its CA bundle",
                describe(&e)
            )))),
            Err(e) => Outcome::Retry(format!("{addr}: {}", describe(&e))),
            Ok(resp) => {
                let status = resp.status().as_u16();
                let v: Value = resp.json().await.unwrap_or(Value::Null);
                match triage(status, &v) {
                    Triage::Answer => {
                        self.nodes.answered(idx, sent.elapsed());
                        Outcome::Done(Ok(Answer::Ok(v)))
                    }
                    Triage::Retry(why) => Outcome::Retry(format!("{addr}: {why}")),
                    Triage::Refused(code, m) => Outcome::Done(Ok(Answer::Refused(code, m))),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kms::stub;
    use serde_json::json;

    fn transport(addrs: &[&str]) -> Transport {
        Transport::new(addrs.iter().map(|a| a.to_string()).collect(), None, None, None).expect("client")
    }

    fn unreachable_text(r: Result<Answer, KmsError>) -> String {
        match r {
            Err(KmsError::Unreachable(m)) => m,
            Err(e) => panic!("expected Unreachable, got {e:?}"),
            Ok(_) => panic!("expected Unreachable, got an answer"),
        }
    }

    #[tokio::test]
    async fn a_sealed_server_is_unreachable_after_every_attempt() {
        let sealed = stub::serve(|_| (503, r#"{"errors":["Vault is sealed"]}"#.into()));
        let t = transport(&[&sealed.url]);
        let m = unreachable_text(t.send("transit/decrypt/kek", Some(&json!({})), Some("s.t")).await);
        assert_eq!(m, format!("{}: HTTP 503 Vault is sealed", sealed.url));
        assert_eq!(t.request_count(), u64::from(ATTEMPTS));
        assert_eq!(sealed.seen().len(), ATTEMPTS as usize);
    }

    #[tokio::test]
    async fn a_server_that_does_not_listen_is_unreachable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let url = format!("http://127.0.0.1:{port}");
        let m = unreachable_text(
            transport(&[&url])
                .send("auth/token/lookup-self", None, Some("s.t"))
                .await,
        );
        assert!(m.starts_with(&format!("{url}: cannot connect")), "{m}");
    }

    #[tokio::test]
    async fn a_standby_without_active_node_hands_over_to_the_next_server() {
        let standby = stub::serve(|_| {
            (
                500,
                r#"{"errors":["local node not active but active cluster node not found"]}"#.into(),
            )
        });
        let active = stub::serve(|_| (200, r#"{"data":{"ciphertext":"vault:v1:abc"}}"#.into()));
        let t = transport(&[&standby.url, &active.url]);
        let body = json!({"plaintext": "AA=="});
        let Ok(Answer::Ok(v)) = t.send("transit/encrypt/kek", Some(&body), Some("s.t")).await else {
            panic!("the active node answers");
        };
        assert_eq!(v.pointer("/data/ciphertext"), Some(&json!("vault:v1:abc")));
        let seen = active.seen();
        assert_eq!(seen[0].path, "/v1/transit/encrypt/kek");
        assert_eq!(seen[0].token.as_deref(), Some("s.t"));
        assert_eq!(
            serde_json::from_str::<Value>(&seen[0].body).ok(),
            Some(body.clone())
        );
        // The next request goes straight to the node that answered.
        assert!(matches!(
            t.send("transit/encrypt/kek", Some(&body), Some("s.t")).await,
            Ok(Answer::Ok(_))
        ));
        assert_eq!((standby.seen().len(), active.seen().len()), (1, 2));
        assert_eq!(t.request_count(), 3);
    }

    #[tokio::test]
    async fn a_4xx_is_final_and_a_partial_batch_is_an_answer() {
        let bao = stub::serve(|r| {
            if r.path.ends_with("/decrypt/gone") {
                (400, r#"{"errors":["encryption key not found"]}"#.into())
            } else {
                (
                    400,
                    r#"{"data":{"batch_results":[{"plaintext":"","error":"invalid ciphertext length"}]}}"#
                        .into(),
                )
            }
        });
        let t = transport(&[&bao.url]);
        match t
            .send("transit/decrypt/gone", Some(&json!({})), Some("s.t"))
            .await
        {
            Ok(Answer::Refused(400, m)) => assert_eq!(m, "encryption key not found"),
            _ => panic!("expected a refusal"),
        }
        assert_eq!(t.request_count(), 1, "a 4xx is not retried");
        let partial = t.send("transit/decrypt/kek", Some(&json!({})), Some("s.t")).await;
        assert!(matches!(partial, Ok(Answer::Ok(_))));
    }
}
