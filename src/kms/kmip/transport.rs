//! Mutual TLS to the KMIP servers: [`Transport::send`] sends one request message of batch
//! items and returns one result per item, retried across the HA addresses with backoff.
//! Connections are kept open and reused (one request at a time each); a connection that
//! fails is dropped.
//!
//! The exchange is blocking I/O (std sockets under rustls) run on tokio's blocking pool: a
//! KMIP message is one write and one length-prefixed read, which needs no async machinery.
//! Requests carry plaintext DEKs (Encrypt) and answers return them (Decrypt): the encoded
//! message and the answer are in buffers wiped on drop; rustls's own record buffers are not
//! ours to wipe (see `openbao/transit.rs` on what a TLS library keeps).

use super::errors::tls_failure;
use crate::kmip::messages::{self, Failure, Request};
use crate::kmip::ttlv::{self, ITEM_HEADER_LEN, Item};
use crate::kms::KmsError;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use zeroize::Zeroizing;

/// Attempts per message across all servers before it counts as unreachable.
const ATTEMPTS: usize = 4;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Per read and per write.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Open connections kept for reuse.
const MAX_IDLE: usize = 4;

type Stream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// One result per batch item: the payload's items, or the server's refusal.
pub(super) type Results = Vec<Result<Vec<Item>, Failure>>;

struct Conn {
    /// Index into `addrs`.
    server: usize,
    stream: Stream,
}

struct Inner {
    addrs: Vec<String>,
    tls: Arc<rustls::ClientConfig>,
    /// Open connections not in use; taken by a request, given back when it succeeds.
    idle: Mutex<Vec<Conn>>,
    /// Index of the server that answered last: we stick to it.
    preferred: AtomicUsize,
    /// Messages sent (for status and tests).
    requests: AtomicU64,
}

pub(super) struct Transport {
    inner: Arc<Inner>,
}

impl Transport {
    pub(super) fn new(addrs: Vec<String>, tls: Arc<rustls::ClientConfig>) -> Transport {
        Transport {
            inner: Arc::new(Inner {
                addrs,
                tls,
                idle: Mutex::new(Vec::new()),
                preferred: AtomicUsize::new(0),
                requests: AtomicU64::new(0),
            }),
        }
    }

    pub(super) fn request_count(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// Sends `batch` (1 to `messages::MAX_BATCH` items) as one message.
    pub(super) async fn send(&self, batch: Vec<Request>) -> Result<Results, KmsError> {
        let count = batch.len();
        let message = ttlv::encode(&messages::request_message(batch))
            .map_err(|e| KmsError::Misconfigured(format!("KMIP request: {e}")))?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.exchange(&message, count))
            .await
            .map_err(|e| KmsError::Unreachable(format!("KMIP request task: {e}")))?
    }
}

impl Inner {
    fn exchange(&self, message: &[u8], count: usize) -> Result<Results, KmsError> {
        let n = self.addrs.len();
        let mut last = String::new();
        let attempts = ATTEMPTS.max(n);
        for attempt in 0..attempts {
            let server = (self.preferred.load(Ordering::Relaxed) + attempt) % n;
            let addr = &self.addrs[server];
            let reused = self.take_idle(server);
            let fresh = reused.is_none();
            let conn = match reused {
                Some(c) => Ok(c),
                None => self.connect(server),
            };
            self.requests.fetch_add(1, Ordering::Relaxed);
            let outcome = conn.and_then(|mut c| {
                let answer = round_trip(&mut c.stream, message)?;
                Ok((c, answer))
            });
            match outcome {
                Ok((conn, answer)) => {
                    let results = ttlv::decode(&answer)
                        .map_err(|e| e.to_string())
                        .and_then(|item| messages::parse_response(&item, count).map_err(|e| e.to_string()))
                        .map_err(|e| KmsError::Misconfigured(format!("{addr}: {e}")))?;
                    self.preferred.store(server, Ordering::Relaxed);
                    self.give_back(conn);
                    return Ok(results);
                }
                Err(e) => {
                    if let Some(refusal) = tls_failure(addr, &e) {
                        return Err(refusal);
                    }
                    last = format!("{addr}: {e}");
                    // A kept connection the server has closed meanwhile: try again at once.
                    if !fresh {
                        continue;
                    }
                }
            }
            // Backoff with jitter (50 ms, 100 ms, 200 ms … ± 50 %), none after the last attempt.
            if let Some(pause) = crate::kms::retry::pause_after(attempt as u32, attempts as u32) {
                std::thread::sleep(pause);
            }
        }
        Err(KmsError::Unreachable(last))
    }

    fn take_idle(&self, server: usize) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let i = idle.iter().position(|c| c.server == server)?;
        Some(idle.swap_remove(i))
    }

    fn give_back(&self, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }

    /// A TCP connection to server `server` with the TLS handshake done.
    fn connect(&self, server: usize) -> Result<Conn, std::io::Error> {
        let addr = &self.addrs[server];
        let host = host_of(addr);
        let name = rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("server name {host:?}: {e}"),
            )
        })?;
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "the address resolves to nothing");
        for sa in addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&sa, CONNECT_TIMEOUT) {
                Ok(tcp) => {
                    tcp.set_read_timeout(Some(IO_TIMEOUT))?;
                    tcp.set_write_timeout(Some(IO_TIMEOUT))?;
                    tcp.set_nodelay(true)?;
                    let tls = rustls::ClientConnection::new(self.tls.clone(), name.clone())
                        .map_err(std::io::Error::other)?;
                    let mut stream = rustls::StreamOwned::new(tls, tcp);
                    while stream.conn.is_handshaking() {
                        stream.conn.complete_io(&mut stream.sock)?;
                    }
                    return Ok(Conn { server, stream });
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

/// The host of `HOST:PORT` (brackets of an IPv6 literal removed).
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Writes `message` and reads one answer, its length checked before it is read.
fn round_trip(stream: &mut Stream, message: &[u8]) -> Result<Zeroizing<Vec<u8>>, std::io::Error> {
    stream.write_all(message)?;
    stream.flush()?;
    let mut header = [0u8; ITEM_HEADER_LEN];
    stream.read_exact(&mut header)?;
    let len = ttlv::message_len(&header)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("answer: {e}")))?;
    let mut answer = Zeroizing::new(vec![0u8; len]);
    answer[..ITEM_HEADER_LEN].copy_from_slice(&header);
    stream.read_exact(&mut answer[ITEM_HEADER_LEN..])?;
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn servers_that_do_not_listen_are_unreachable_after_every_address() {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let dead = || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("127.0.0.1:{}", l.local_addr().unwrap().port())
        };
        let (a, b) = (dead(), dead());
        let t = Transport::new(vec![a.clone(), b.clone()], Arc::new(tls));
        let err = t.send(vec![messages::locate_by_name("k")]).await.err();
        let Some(KmsError::Unreachable(m)) = err else {
            panic!("expected Unreachable, got {err:?}")
        };
        assert!(m.starts_with(&format!("{b}: ")) && !m.contains('\n'), "{m}");
        assert_eq!(t.request_count(), ATTEMPTS as u64);
    }

    #[test]
    fn hosts_of_addresses() {
        assert_eq!(host_of("kms.example:5696"), "kms.example");
        assert_eq!(host_of("127.0.0.1:5696"), "127.0.0.1");
        assert_eq!(host_of("[::1]:5696"), "::1");
    }
}
