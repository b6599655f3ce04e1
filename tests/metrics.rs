//! `--metrics`: the Prometheus text a mount serves, read by Prometheus's own Python client's
//! parser (prometheus_client from PyPI, in the test venv), not by our own code.

mod common;

use common::*;
use std::collections::HashMap;

/// Fetches ADDR/metrics and parses it with prometheus_client; returns (sample name, labels)
/// → value, and family name → type.
fn scrape(addr: &str) -> (HashMap<(String, String), f64>, HashMap<String, String>) {
    let (venv, _lock) = test_venv("KMSFS_PROMETHEUS_VENV", "prometheus-venv");
    pip_install(&venv, &["prometheus_client"]);
    let script = r#"
import json, sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families
text = urllib.request.urlopen("http://" + sys.argv[1] + "/metrics", timeout=10).read().decode()
out = {"samples": [], "types": {}}
for f in text_string_to_metric_families(text):
    out["types"][f.name] = f.type
    for s in f.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        out["samples"].append([s.name, labels, s.value])
print(json.dumps(out))
"#;
    let out = std::process::Command::new(venv.join("bin/python"))
        .args(["-c", script, addr])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "parse failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let samples = v["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                (
                    s[0].as_str().unwrap().to_owned(),
                    s[1].as_str().unwrap().to_owned(),
                ),
                s[2].as_f64().unwrap(),
            )
        })
        .collect();
    let types = v["types"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, t)| (k.clone(), t.as_str().unwrap().to_owned()))
        .collect();
    (samples, types)
}

/// A loopback address with a port free right now, for `--metrics`.
fn free_local_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("127.0.0.1:{}", l.local_addr().unwrap().port())
}

#[test]
fn metrics_parse_as_prometheus_text_and_count_what_the_mount_did() {
    let addr = free_local_addr();
    let mut v = Volume::new();
    v.mount_with_args(&["--metrics", &addr]);
    let data = pseudo_random(200_000, 7);
    std::fs::write(v.m("f"), &data).unwrap();
    v.remount_with(&["--metrics", &addr]);
    assert!(std::fs::read(v.m("f")).unwrap() == data);
    // A later open finds the key cached, once the kernel's release of the first (sent after
    // close returns) has reached the daemon; until then it shares the open file instead.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let hits = |s: &std::collections::HashMap<(String, String), f64>| {
        s.get(&("kmsfs_key_cache_hits_total".to_owned(), String::new()))
            .copied()
            .unwrap_or(0.0)
    };
    loop {
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(std::fs::read(v.m("f")).unwrap() == data);
        if hits(&scrape(&addr).0) >= 1.0 || std::time::Instant::now() > deadline {
            break;
        }
    }

    let (s, types) = scrape(&addr);
    let get = |name: &str, labels: &str| -> f64 {
        *s.get(&(name.to_owned(), labels.to_owned()))
            .unwrap_or_else(|| panic!("no sample {name}{{{labels}}} in {s:?}"))
    };
    eprintln!("types: {types:?}");
    assert_eq!(types["kmsfs_kms_call_duration_seconds"], "histogram");
    assert_eq!(types["kmsfs_opens"], "counter");
    assert_eq!(types["kmsfs_key_cache_size"], "gauge");
    // The second read may come from the page cache.
    assert!(get("kmsfs_read_bytes_total", "") >= data.len() as f64);
    assert!(get("kmsfs_opens_total", "") >= 2.0);
    // The first open needs the KMS, the second finds its key cached.
    assert!(get("kmsfs_key_cache_misses_total", "") >= 1.0);
    assert!(get("kmsfs_key_cache_hits_total", "") >= 1.0);
    assert!(get("kmsfs_key_cache_size", "") >= 1.0);
    let calls = get("kmsfs_kms_call_duration_seconds_count", "");
    assert!(calls >= 1.0);
    assert_eq!(get("kmsfs_kms_call_duration_seconds_bucket", "le=+Inf"), calls);
    // Requests are what a network backend sends; the local keystore sends none.
    assert!(get("kmsfs_kms_requests_total", "") >= 0.0);
    assert_eq!(get("kmsfs_kms_errors_total", "kind=denied"), 0.0);
    assert_eq!(get("kmsfs_kms_health", "state=ok"), 1.0);
    assert_eq!(get("kmsfs_locked", ""), 0.0);
    assert_eq!(get("kmsfs_policy_denials_total", ""), 0.0);
    assert_eq!(get("kmsfs_guard_alerts_total", ""), 0.0);
    v.unmount();
}

/// Closing a file asks the daemon nothing: writes reach the backing file before they are
/// answered, so a FLUSH would be a round trip with no work in it, paid by every close (the
/// open flag FOPEN_NOFLUSH tells the kernel not to send it). The per-operation request
/// counters show it, and count what the files did.
#[test]
fn closing_a_file_sends_no_flush() {
    let addr = free_local_addr();
    let mut v = Volume::new();
    v.mount_with_args(&["--metrics", &addr]);
    let data = pseudo_random(4096, 3);
    for i in 0..20 {
        std::fs::write(v.m(&format!("f{i}")), &data).unwrap();
    }
    for i in 0..20 {
        assert!(std::fs::read(v.m(&format!("f{i}"))).unwrap() == data);
    }
    let (s, types) = scrape(&addr);
    assert_eq!(types["kmsfs_fuse_requests"], "counter");
    let op = |o: &str| -> f64 {
        *s.get(&("kmsfs_fuse_requests_total".to_owned(), format!("op={o}")))
            .unwrap_or_else(|| panic!("no count for {o} in {s:?}"))
    };
    assert!(op("create") >= 20.0, "creates counted: {}", op("create"));
    assert!(op("write") >= 20.0, "writes counted: {}", op("write"));
    assert!(op("open") >= 20.0, "opens counted: {}", op("open"));
    assert_eq!(op("init"), 1.0);
    assert_eq!(
        op("flush"),
        0.0,
        "40 closes sent FLUSH requests the daemon had nothing to do for"
    );
    v.unmount();
}

/// A file written many times asks for its `security.capability` once, not before each write:
/// the mount takes the clearing of set-id bits on itself (FUSE_HANDLE_KILLPRIV_V2), and the
/// kernel then needs to check a file only once. Before, every write(2) cost a GETXATTR round
/// trip on top of its WRITE.
#[test]
fn writes_to_an_open_file_ask_for_no_xattr_each() {
    use std::io::Write;
    let addr = free_local_addr();
    let mut v = Volume::new();
    v.mount_with_args(&["--metrics", &addr]);
    let mut f = std::fs::File::create(v.m("f")).unwrap();
    for i in 0..20u8 {
        f.write_all(&[i; 512]).unwrap();
    }
    drop(f);
    assert_eq!(std::fs::read(v.m("f")).unwrap().len(), 20 * 512);
    let (s, _) = scrape(&addr);
    let op = |o: &str| -> f64 {
        s.get(&("kmsfs_fuse_requests_total".to_owned(), format!("op={o}")))
            .copied()
            .unwrap_or(0.0)
    };
    assert!(op("write") >= 20.0, "writes counted: {}", op("write"));
    assert!(
        op("getxattr") <= 1.0,
        "{} GETXATTRs for {} writes to one file",
        op("getxattr"),
        op("write")
    );
    v.unmount();
}
