//! `--metrics ADDR`: the mount's counters in Prometheus's text format, served over plain
//! HTTP by one thread (GET /metrics). No HTTP framework: one request line in, one response
//! out, connection closed; bind it to 127.0.0.1 (or a monitoring network) only, as it has
//! no authentication. Counters carry no file names or keys.

use crate::exit::Fatal;
use crate::fatal;
use crate::mount_state::MountState;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Binds before the mount exists, so a taken port is a one-line error, not a half-started mount.
pub fn bind(addr: SocketAddr) -> Result<TcpListener, Fatal> {
    TcpListener::bind(addr)
        .map_err(|e| fatal!("cannot serve metrics on {addr}: {e}; pick a free port for --metrics"))
}

/// Serves GET /metrics on `listener` for as long as the daemon runs.
pub fn serve(listener: TcpListener, state: Arc<MountState>) {
    let spawned = std::thread::Builder::new()
        .name("kmsfs-metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Err(e) = answer(stream, &state) {
                    log::debug!("metrics request: {e}");
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("cannot start the metrics thread ({e}): no metrics for this mount");
    }
}

fn answer(stream: TcpStream, state: &MountState) -> std::io::Result<()> {
    // A client that sends nothing must not hold the one serving thread.
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    // And one that sends without end must not grow our memory: a request is a few lines.
    let mut reader = BufReader::new(std::io::Read::take(&stream, 16 * 1024));
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // The headers are read and ignored, up to the blank line.
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let mut parts = request.split_whitespace();
    let (status, body) = match (parts.next(), parts.next()) {
        (Some("GET"), Some("/metrics")) => ("200 OK", render(state)),
        _ => ("404 Not Found", "GET /metrics\n".to_owned()),
    };
    let mut out = &stream;
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()
}

/// The exposition: one `# HELP`/`# TYPE` pair per family.
pub fn render(state: &MountState) -> String {
    let st = &state.fs.stats;
    let mut o = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (suffix, v) in samples {
            let _ = writeln!(o, "{name}{suffix} {v}");
        }
    };
    let one = |v: u64| vec![(String::new(), v as f64)];
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let d = state.kms.describe();
    family(
        "kmsfs_volume_info",
        "gauge",
        "The mounted volume and its KMS.",
        &[(
            format!(
                "{{volume_id=\"{}\",backend=\"{}\",key=\"{}\"}}",
                state.volume_id,
                d.backend,
                escape(&state.key_ref)
            ),
            1.0,
        )],
    );
    family(
        "kmsfs_kms_requests_total",
        "counter",
        "Requests sent to the KMS (a batch is one).",
        &one(state.kms.request_count()),
    );
    family(
        "kmsfs_kms_calls_total",
        "counter",
        "Keys asked of the KMS (unwraps and new file keys).",
        &one(get(&st.kms_calls)),
    );
    let errors: Vec<(String, f64)> = crate::fs::KMS_ERROR_KINDS
        .iter()
        .zip(&st.kms_errors)
        .map(|(k, n)| (format!("{{kind=\"{k}\"}}"), get(n) as f64))
        .collect();
    family(
        "kmsfs_kms_errors_total",
        "counter",
        "KMS calls that failed, by kind.",
        &errors,
    );
    let (buckets, count, sum) = st.kms_latency.snapshot();
    let mut h: Vec<(String, f64)> = crate::fs::LATENCY_BUCKETS
        .iter()
        .zip(&buckets)
        .map(|(le, n)| (format!("_bucket{{le=\"{le}\"}}"), *n as f64))
        .collect();
    h.push(("_bucket{le=\"+Inf\"}".into(), count as f64));
    h.push(("_sum".into(), sum));
    h.push(("_count".into(), count as f64));
    family(
        "kmsfs_kms_call_duration_seconds",
        "histogram",
        "How long KMS calls for keys took.",
        &h,
    );
    family(
        "kmsfs_key_cache_hits_total",
        "counter",
        "Opens whose key was cached.",
        &one(get(&st.cache_hits)),
    );
    family(
        "kmsfs_key_cache_misses_total",
        "counter",
        "Opens that needed the KMS.",
        &one(get(&st.cache_misses)),
    );
    family(
        "kmsfs_kms_joined_total",
        "counter",
        "Opens that missed the cache while another caller (prefetch, another open) was asking for the same key, and waited for that answer.",
        &one(get(&st.kms_joined)),
    );
    {
        let c = &state.page_fill.counts;
        let outcomes: Vec<(String, f64)> = [
            ("stored", &c.stored),
            ("voided", &c.voided),
            ("dropped", &c.dropped),
        ]
        .iter()
        .map(|(k, n)| (format!("{{outcome=\"{k}\"}}"), get(n) as f64))
        .collect();
        family(
            "kmsfs_page_fill_blocks_total",
            "counter",
            "Whole blocks a small read decrypted, by what became of them: stored in the page cache, voided (the file was opened for writing or truncated since the read), dropped (queue full, lock, refused by the kernel).",
            &outcomes,
        );
    }
    let requests: Vec<(String, f64)> = st
        .requests
        .snapshot()
        .map(|(op, n)| (format!("{{op=\"{op}\"}}"), n as f64))
        .collect();
    family(
        "kmsfs_fuse_requests_total",
        "counter",
        "FUSE requests answered, by operation (a forget counts once per inode).",
        &requests,
    );
    family(
        "kmsfs_key_cache_size",
        "gauge",
        "Unwrapped keys held now.",
        &one(state.fs.cached_keys() as u64),
    );
    family(
        "kmsfs_read_bytes_total",
        "counter",
        "Plaintext bytes read through the mount.",
        &one(get(&st.bytes_read)),
    );
    family(
        "kmsfs_written_bytes_total",
        "counter",
        "Plaintext bytes written through the mount.",
        &one(get(&st.bytes_written)),
    );
    family(
        "kmsfs_opens_total",
        "counter",
        "Opens asked for through the mount.",
        &one(get(&st.opens)),
    );
    family(
        "kmsfs_auth_failures_total",
        "counter",
        "Blocks or headers that failed authentication.",
        &one(get(&st.auth_failures)),
    );
    family(
        "kmsfs_policy_denials_total",
        "counter",
        "Opens and creates refused by the access policy or a usage guard.",
        &one(get(&state.fs.access().denials)),
    );
    family(
        "kmsfs_guard_alerts_total",
        "counter",
        "Usage guard thresholds crossed (one per crossing).",
        &one(get(&state.fs.access().alerts)),
    );
    family(
        "kmsfs_locked",
        "gauge",
        "1 once the mount is locked (revoked, kmsfs lock, or stopping with files open).",
        &one(u64::from(state.locked_reason().is_some())),
    );
    let health = state.health_now();
    let now = health.split(':').next().unwrap_or("ok").to_owned();
    let states: Vec<(String, f64)> = ["ok", "waiting", "denied", "unreachable"]
        .iter()
        .map(|s| (format!("{{state=\"{s}\"}}"), f64::from(u8::from(*s == now))))
        .collect();
    family(
        "kmsfs_kms_health",
        "gauge",
        "The outcome of the last KMS call, or waiting while one has gone unanswered over 1 s (1 for the current state).",
        &states,
    );
    let (unanswered, oldest) = st.kms_unanswered.oldest().unwrap_or_default();
    family(
        "kmsfs_kms_unanswered_calls",
        "gauge",
        "KMS calls for keys sent and not answered yet.",
        &one(unanswered as u64),
    );
    family(
        "kmsfs_kms_oldest_unanswered_seconds",
        "gauge",
        "How long the oldest unanswered KMS call has waited (0: none).",
        &[(String::new(), oldest.as_secs_f64())],
    );
    family(
        "kmsfs_uptime_seconds",
        "gauge",
        "Seconds since the mount started.",
        &one(state.started.elapsed().as_secs()),
    );
    o
}

/// A label value as the text format wants it.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
