//! Test-only: a scripted HTTP server on 127.0.0.1 that answers each request with what a closure
//! says, so transports, auth and credential sources can be tested against a KMS's (or a
//! metadata service's) exact answers without the real thing.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// One request as the stub saw it.
#[derive(Debug, Clone)]
pub(in crate::kms) struct Request {
    pub method: String,
    pub path: String,
    /// Every header, names in lowercase.
    pub headers: Vec<(String, String)>,
    pub token: Option<String>,
    pub body: String,
}

impl Request {
    /// The value of header `name` (lowercase), if sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A running stub: its base URL and every request it answered so far.
pub(in crate::kms) struct Stub {
    pub url: String,
    seen: Arc<Mutex<Vec<Request>>>,
}

impl Stub {
    /// The requests answered so far, in order.
    pub fn seen(&self) -> Vec<Request> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Serves `answer` (status, JSON body) on a fresh port until the test process ends.
pub(in crate::kms) fn serve(answer: impl Fn(&Request) -> (u16, String) + Send + 'static) -> Stub {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the stub");
    let url = format!("http://{}", listener.local_addr().expect("stub address"));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let Some(req) = read_request(&stream) else {
                continue;
            };
            let (status, body) = answer(&req);
            log.lock().unwrap_or_else(|p| p.into_inner()).push(req);
            let _ = write!(
                stream,
                "HTTP/1.1 {status} Stub\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Stub { url, seen }
}

fn read_request(stream: &TcpStream) -> Option<Request> {
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut words = line.split_whitespace();
    let method = words.next()?.to_owned();
    let path = words.next()?.to_owned();
    let (mut len, mut token, mut headers) = (0, None, Vec::new());
    loop {
        let mut header = String::new();
        r.read_line(&mut header).ok()?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => len = value.trim().parse().ok()?,
                "x-vault-token" => token = Some(value.trim().to_owned()),
                _ => {}
            }
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some(Request {
        method,
        path,
        headers,
        token,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}
