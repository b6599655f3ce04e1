//! The OpenBao Transit backend against a real OpenBao server started by the test.

mod common;

use common::openbao::{Bao, ROOT_TOKEN};
use common::*;

/// A volume on `bao` whose mount uses `token`.
fn volume(bao: &Bao, token: &str) -> Volume {
    let env = [("BAO_TOKEN", token), ("BAO_ADDR", bao.addr.as_str())];
    Volume::init_with(
        &["--kms", "openbao", "--kms-addr", &bao.addr, "--kms-key", "fs-kek"],
        &env,
    )
}

#[test]
fn files_round_trip_over_openbao_with_the_minimal_policy() {
    let bao = Bao::start();
    bao.minimal_policy("kmsfs", "fs-kek");
    let token = bao.token(&["kmsfs"]);
    let mut v = volume(&bao, &token);
    let cfg = std::fs::read_to_string(v.backing.join("kmsfs.json")).unwrap();
    assert!(!cfg.contains(&token), "a secret in the volume config");
    // A header copied from one file onto another does not open: the context is enforced.
    round_trip_then_swap_a_header(&mut v);
}

#[test]
fn the_anchor_names_the_server_when_bao_addr_is_unset() {
    let bao = Bao::start();
    bao.minimal_policy("kmsfs", "fs-kek");
    let token = bao.token(&["kmsfs"]);
    let mut v = volume(&bao, &token);
    // The server's address comes from this machine's anchor, not from the environment (nor
    // from the volume config, which only has to agree with the anchor).
    v.env.retain(|(k, _)| k != "BAO_ADDR");
    v.mount(&[]);
    std::fs::write(v.m("f"), b"over the anchored address").unwrap();
    v.remount();
    assert_eq!(std::fs::read(v.m("f")).unwrap(), b"over the anchored address");
}

#[test]
fn a_non_derived_key_is_refused_at_init() {
    let bao = Bao::start();
    bao.api("POST", "transit/keys/plain", r#"{"type":"aes256-gcm96"}"#);
    let d = tempfile::tempdir().unwrap();
    let out = kmsfs()
        .args(["init", d.path().join("v").to_str().unwrap(), "--kms", "openbao"])
        .args(["--kms-addr", &bao.addr, "--kms-key", "plain"])
        .env("BAO_TOKEN", ROOT_TOKEN)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("derived=true"));
}

#[test]
fn a_policy_without_decrypt_fails_opens_with_eacces() {
    let bao = Bao::start();
    bao.minimal_policy("kmsfs", "fs-kek");
    let token = bao.token(&["kmsfs"]);
    let mut v = volume(&bao, &token);
    v.mount(&[]);
    std::fs::write(v.m("f"), b"data").unwrap();
    v.remount(); // so the next open needs the KMS
    // The admin takes decrypt away from the mount's policy: the next open is refused.
    bao.policy(
        "kmsfs",
        "path \"transit/encrypt/fs-kek\" { capabilities = [\"update\"] }\n",
    );
    let err = std::fs::read(v.m("f")).unwrap_err();
    assert_eq!(errno_of(&err), libc::EACCES);
    assert!(v.wait_daemon_gone(10), "a denied unwrap locks the mount");
    assert!(v.log_text().contains("may not decrypt"), "{}", v.log_text());
}

#[test]
fn rotation_rewrap_and_min_decryption_version() {
    let bao = Bao::start();
    bao.minimal_policy("kmsfs", "fs-kek");
    let token = bao.token(&["kmsfs"]);
    let mut v = volume(&bao, &token);
    v.mount(&[]);
    for i in 0..20 {
        std::fs::write(v.m(&format!("f{i}")), format!("file {i}")).unwrap();
    }
    v.unmount();
    bao.api("POST", "transit/keys/fs-kek/rotate", "");
    let out = v.run(&["rewrap", v.backing.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("re-wrapped 20 of 20 files to version 2"), "{text}");
    assert!(text.contains("name key re-wrapped"), "{text}");
    // A second run has nothing to do.
    let out = v.run(&["rewrap", v.backing.to_str().unwrap(), "--dry-run"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("20 files wrapped with version 2"));
    // Retire version 1: everything still opens.
    bao.api(
        "POST",
        "transit/keys/fs-kek/config",
        r#"{"min_decryption_version":2}"#,
    );
    v.mount(&[]);
    for i in 0..20 {
        assert_eq!(
            std::fs::read_to_string(v.m(&format!("f{i}"))).unwrap(),
            format!("file {i}")
        );
    }
}

#[test]
fn an_unreachable_server_fails_uncached_opens_with_eio_and_says_so() {
    let mut bao = Bao::start();
    let mut v = volume(&bao, ROOT_TOKEN);
    v.mount(&[]);
    std::fs::write(v.m("f"), b"data").unwrap();
    v.remount(); // the key of a file just made is cached: start cold
    bao.kill();
    let err = std::fs::read(v.m("f")).unwrap_err();
    assert_eq!(errno_of(&err), libc::EIO);
    v.unmount();
    let log = v.log_text();
    assert!(log.contains("KMS unreachable"), "{log}");
}

#[test]
fn approle_login_works() {
    let bao = Bao::start();
    bao.minimal_policy("kmsfs", "fs-kek");
    let (role, secret) = bao.approle("kmsfs");
    let env = [
        ("BAO_ROLE_ID", role.as_str()),
        ("BAO_SECRET_ID", secret.as_str()),
        ("BAO_ADDR", bao.addr.as_str()),
    ];
    let mut v = Volume::init_with(
        &["--kms", "openbao", "--kms-addr", &bao.addr, "--kms-key", "fs-kek"],
        &env,
    );
    v.mount(&[]);
    std::fs::write(v.m("f"), b"via approle").unwrap();
    v.remount();
    assert_eq!(std::fs::read(v.m("f")).unwrap(), b"via approle");
    v.unmount();
    assert!(v.log_text().contains("logged in to OpenBao with AppRole"));
    // A wrong secret id is a clear error at mount.
    v.env = vec![
        ("BAO_ROLE_ID".into(), role),
        ("BAO_SECRET_ID".into(), "wrong".into()),
    ];
    let out = kmsfs()
        .args(v.mount_args(&[]))
        .env("BAO_ROLE_ID", &v.env[0].1)
        .env("BAO_SECRET_ID", "wrong")
        .env("BAO_ADDR", &bao.addr)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("AppRole login refused"));
}

#[test]
fn tls_server_is_accepted_with_its_ca_and_refused_without() {
    let bao = Bao::start_tls();
    let ca = bao.ca_cert.clone().unwrap();
    let d = tempfile::tempdir().unwrap();
    let init = |dir: &str, with_ca: bool| {
        let mut c = kmsfs();
        c.args(["init", d.path().join(dir).to_str().unwrap(), "--kms", "openbao"])
            .args(["--kms-addr", &bao.addr, "--kms-key", "fs-kek"])
            .env("BAO_TOKEN", ROOT_TOKEN);
        if with_ca {
            c.env("BAO_CACERT", &ca);
        }
        c.output().unwrap()
    };
    let refused = init("without", false);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains("BAO_CACERT"), "{err}");
    let ok = init("with", true);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
}

#[test]
fn concurrent_opens_are_coalesced_into_batches() {
    let bao = Bao::start();
    let mut v = volume(&bao, ROOT_TOKEN);
    v.mount(&[]);
    let n = 500;
    for i in 0..n {
        std::fs::write(v.m(&format!("f{i}")), format!("content {i}")).unwrap();
    }
    v.unmount();
    let created = kms_requests(&v.log_text());
    assert!(created < n / 4, "creating {n} files took {created} KMS requests");
    v.mount(&[]);
    read_from_16_threads(&v.mnt, n, |i| format!("f{i}"));
    v.unmount();
    let log = v.log_text();
    let opened = kms_requests(&log[log.rfind("is usable").unwrap()..]);
    assert!(
        opened < n / 3,
        "opening {n} files from 16 threads took {opened} KMS requests"
    );
}

/// Sixteen readers going through a directory, with prefetch keeping ahead of them: an open
/// whose key a pass (or another open) is fetching waits for that answer, and a pass skips a
/// key an open is fetching. So the audit log shows one unwrap per file, not two.
#[test]
fn sixteen_readers_and_prefetch_ask_for_each_key_once() {
    let bao = Bao::start();
    let mut v = volume(&bao, ROOT_TOKEN);
    v.mount(&[]);
    let n = 600;
    std::fs::create_dir(v.m("d")).unwrap();
    for i in 0..n {
        std::fs::write(v.m(&format!("d/img{i:04}")), format!("content {i}")).unwrap();
    }
    v.unmount();
    let audit = v.dir.path().join("audit.jsonl");
    let audit_arg = audit.to_str().unwrap().to_owned();
    v.mount_with_args(&["--audit-log", &audit_arg]);
    read_from_16_threads(&v.mnt, n, |i| format!("d/img{i:04}"));
    let status = run_ok(&["status", v.mnt.to_str().unwrap(), "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    v.unmount();
    let mut per_file = std::collections::HashMap::<String, usize>::new();
    for line in std::fs::read_to_string(&audit).unwrap().lines() {
        let e: serde_json::Value = serde_json::from_str(line).unwrap();
        if e["event"] == "unwrap" && e["outcome"] == "ok" {
            *per_file
                .entry(e["file_id"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    let twice: Vec<_> = per_file.iter().filter(|(_, n)| **n > 1).collect();
    eprintln!(
        "{} keys unwrapped, {} of them more than once; counters {}",
        per_file.len(),
        twice.len(),
        status[0]["counters"]
    );
    assert_eq!(per_file.len(), n, "every file's key was unwrapped");
    assert!(twice.is_empty(), "{} keys unwrapped more than once", twice.len());
}

/// Reads files 0..n (`name(i)` under `mnt`, holding "content i") from 16 threads, thread t
/// taking t, t + 16, …: readers going through one set of files side by side.
fn read_from_16_threads(mnt: &std::path::Path, n: usize, name: fn(usize) -> String) {
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let mnt = mnt.to_owned();
            std::thread::spawn(move || {
                for i in (t..n).step_by(16) {
                    let got = std::fs::read_to_string(mnt.join(name(i))).unwrap();
                    assert_eq!(got, format!("content {i}"));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// The last "KMS requests sent while mounted: N" in a log.
fn kms_requests(log: &str) -> usize {
    log.lines()
        .rev()
        .find_map(|l| l.split("KMS requests sent while mounted: ").nth(1))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(usize::MAX)
}

#[test]
fn killing_the_active_node_of_an_ha_cluster_reaches_no_application() {
    use common::openbao::RaftCluster;
    let mut cluster = RaftCluster::start();
    let all = cluster.addrs.join(",");
    let token = cluster.root_token.clone();
    let env = [("BAO_ADDR", all.as_str()), ("BAO_TOKEN", token.as_str())];
    let mut v = Volume::init_with(&["--kms", "openbao", "--kms-key", "fs-kek"], &env);
    v.mount(&[]);
    let n = 300;
    for i in 0..n {
        std::fs::write(v.m(&format!("f{i}")), format!("content {i}")).unwrap();
    }
    // No key cache: every open below asks the cluster.
    v.remount_with(&["--key-ttl", "0", "--grace", "60"]);
    // Readers open uncached files (each open unwraps a key) while the active node dies.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|t| {
            let mnt = v.mnt.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut opened = 0;
                for i in (t..n).step_by(4).cycle() {
                    let got = std::fs::read_to_string(mnt.join(format!("f{i}")));
                    assert_eq!(got.unwrap(), format!("content {i}"), "file {i}");
                    opened += 1;
                    if stop.load(std::sync::atomic::Ordering::Relaxed) && opened > n / 4 {
                        return opened;
                    }
                }
                unreachable!()
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let active = cluster.active().expect("an active node");
    cluster.kill(active);
    std::thread::sleep(std::time::Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        assert!(r.join().expect("no reader saw an error") > 0);
    }
}

#[test]
fn a_hung_node_of_an_ha_cluster_holds_no_cold_open_past_a_second() {
    use common::openbao::RaftCluster;
    use std::time::{Duration, Instant};
    let cluster = RaftCluster::start();
    // kmsfs asks the first address first: make it the active node, the one that will hang.
    let active = cluster.active().expect("an active node");
    let mut addrs = cluster.addrs.clone();
    addrs.rotate_left(active);
    let all = addrs.join(",");
    let token = cluster.root_token.clone();
    let env = [("BAO_ADDR", all.as_str()), ("BAO_TOKEN", token.as_str())];
    let mut v = Volume::init_with(&["--kms", "openbao", "--kms-key", "fs-kek"], &env);
    v.mount(&[]);
    let n = 200;
    for i in 0..n {
        std::fs::write(v.m(&format!("f{i}")), format!("content {i}")).unwrap();
    }
    // No key cache: every open below asks the cluster.
    v.remount_with(&["--key-ttl", "0", "--grace", "60"]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|t| {
            let mnt = v.mnt.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut slowest = Duration::ZERO;
                for i in (t..n).step_by(4).cycle() {
                    let started = Instant::now();
                    let got = std::fs::read_to_string(mnt.join(format!("f{i}")));
                    slowest = slowest.max(started.elapsed());
                    assert_eq!(got.unwrap(), format!("content {i}"), "file {i}");
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        return slowest;
                    }
                }
                unreachable!()
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // The node kmsfs talks to hangs for 5 s (it resumes when `frozen` drops, whatever happens).
    let frozen = cluster.freeze(active);
    std::thread::sleep(Duration::from_secs(2));
    let mnt = v.mnt.to_str().unwrap().to_owned();
    let json: serde_json::Value =
        serde_json::from_slice(&run_ok(&["status", &mnt, "--json"]).stdout).unwrap();
    let text = String::from_utf8(run_ok(&["status", &mnt]).stdout).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let slowest = readers
        .into_iter()
        .map(|r| r.join().expect("no reader saw an error"))
        .max();
    drop(frozen);
    eprintln!("hung node: slowest cold open {slowest:?}");
    assert!(
        slowest < Some(Duration::from_secs(1)),
        "a cold open waited {slowest:?}"
    );
    let aside = &json[0]["kms_set_aside"];
    assert_eq!(aside[0]["addr"].as_str(), Some(addrs[0].as_str()), "{json}");
    assert_eq!(aside.as_array().map(Vec::len), Some(1), "{json}");
    assert!(
        text.contains(&format!("set aside   KMS node {}", addrs[0])),
        "{text}"
    );
    v.unmount();
    let log = v.log_text();
    let said = log
        .lines()
        .filter(|l| l.contains(&addrs[0]) && l.contains("no answer within"))
        .count();
    assert_eq!(said, 1, "the hung node is logged once: {log}");
}

/// The p-th percentile (0..=100) of `v`, in milliseconds.
fn percentile_ms(v: &mut [std::time::Duration], p: usize) -> f64 {
    v.sort();
    let i = (v.len().saturating_sub(1) * p) / 100;
    v.get(i).map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
}

/// Runs `kmsfs <args>` and returns how long it took.
fn timed_kmsfs(args: &[&str]) -> std::time::Duration {
    let t = std::time::Instant::now();
    let out = kmsfs().args(args).output().unwrap();
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "kmsfs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

#[test]
fn a_hung_kms_stalls_no_fuse_worker() {
    use std::os::unix::fs::FileExt;
    use std::time::{Duration, Instant};
    let bao = Bao::start();
    let mut v = volume(&bao, ROOT_TOKEN);
    v.mount(&[]);
    // More files than FUSE workers (16), each to be opened cold while the KMS is hung.
    let n = 24;
    for i in 0..n {
        std::fs::write(v.m(&format!("f{i}")), format!("content {i}")).unwrap();
    }
    let size = 8 << 20;
    std::fs::write(v.m("held"), pseudo_random(size, 7)).unwrap();
    v.remount();
    let held = std::fs::File::open(v.m("held")).unwrap();
    let mut buf = vec![0u8; 4096];
    held.read_exact_at(&mut buf, 0).unwrap();

    // The server hangs for at most 10 s (SIGSTOP), then resumes even if an assert fails.
    let frozen = bao.freeze();
    let hang = Instant::now();
    let openers: Vec<_> = (0..n)
        .map(|i| {
            let p = v.m(&format!("f{i}"));
            std::thread::spawn(move || {
                let r = std::fs::File::open(p);
                (Instant::now(), r.err().map(|e| errno_of(&e)))
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));

    // Reads of the file held open, each past the kernel's page cache, for 2 s.
    let mut reads = Vec::new();
    let mut offset = 0u64;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until && hang.elapsed() < Duration::from_secs(8) {
        rustix::fs::fadvise(&held, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        let t = Instant::now();
        held.read_exact_at(&mut buf, offset).unwrap();
        reads.push(t.elapsed());
        offset = (offset + (1 << 20) + 4096) % (size as u64 - 4096);
    }
    let (count, p50, p99) = (
        reads.len(),
        percentile_ms(&mut reads, 50),
        percentile_ms(&mut reads, 99),
    );

    let mnt = v.mnt.to_str().unwrap().to_owned();
    let status: Vec<Duration> = (0..3).map(|_| timed_kmsfs(&["status", &mnt, "--json"])).collect();
    // A KMS that answers nothing is not "ok": the opens parked 2.5 s ago are unanswered.
    let during = run_ok(&["status", &mnt, "--json"]);
    let during: serde_json::Value = serde_json::from_slice(&during.stdout).unwrap();
    let health = during[0]["kms_health"].as_str().unwrap_or_default().to_owned();
    let lock = timed_kmsfs(&["lock", &mnt]);
    let locked_at = Instant::now();
    // Every parked open fails with the lock's errno, promptly.
    let results: Vec<_> = openers.into_iter().map(|t| t.join().unwrap()).collect();
    let in_hang = hang.elapsed();
    eprintln!(
        "hung KMS: {count} reads of a held-open file p50 {p50:.2} ms p99 {p99:.2} ms; \
         status {status:?}; lock {lock:?}; parked opens done {:?} after the lock",
        results
            .iter()
            .map(|(t, _)| t.saturating_duration_since(locked_at))
            .max()
            .unwrap()
    );
    assert!(
        in_hang < Duration::from_secs(10),
        "the test outlived the hang: {in_hang:?}"
    );
    assert!(count >= 20, "only {count} reads in 2 s");
    assert!(p99 < 500.0, "held-open reads p99 {p99:.1} ms during the hang");
    assert!(
        status.iter().min().unwrap() < &Duration::from_millis(200),
        "kmsfs status took {status:?}"
    );
    assert!(status.iter().all(|d| *d < Duration::from_secs(1)), "{status:?}");
    assert!(lock < Duration::from_secs(1), "kmsfs lock took {lock:?}");
    assert!(
        health.starts_with("waiting: ") && health.contains("unanswered"),
        "health during the hang: {health}"
    );
    assert!(
        during[0]["kms_unanswered"]["oldest_secs"].as_f64().unwrap_or(0.0) >= 2.0,
        "{during}"
    );
    for (done, errno) in &results {
        assert_eq!(*errno, Some(libc::ENOKEY), "a parked open after the lock");
        assert!(done.saturating_duration_since(locked_at) < Duration::from_secs(1));
    }
    let err = held.read_exact_at(&mut buf, 0).unwrap_err();
    assert!(
        matches!(errno_of(&err), libc::ENOKEY | libc::ENOTCONN | libc::EIO),
        "unexpected {err}"
    );
    // The daemon exits although the KMS is still hung: nothing waits on it at the end.
    assert!(v.wait_daemon_gone(10));
    drop(frozen);
    eprintln!("hung KMS: daemon gone {:?} after the lock", locked_at.elapsed());
    assert!(
        hang.elapsed() < Duration::from_secs(10),
        "the daemon waited on the hung KMS"
    );
}

#[test]
fn an_open_gives_up_at_its_deadline_and_health_is_the_last_call() {
    let bao = Bao::start();
    let mut v = volume(&bao, ROOT_TOKEN);
    v.mount(&[]);
    for f in ["a", "b"] {
        std::fs::write(v.m(f), f).unwrap();
    }
    v.unmount();
    v.mount_with_args(&["--open-timeout", "1"]);
    let mnt = v.mnt.to_str().unwrap().to_owned();
    let health = || {
        let out = run_ok(&["status", &mnt, "--json"]);
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        s[0]["kms_health"].as_str().unwrap().to_owned()
    };
    let frozen = bao.freeze();
    let t = std::time::Instant::now();
    let err = std::fs::read(v.m("a")).unwrap_err();
    let took = t.elapsed();
    assert_eq!(errno_of(&err), libc::EIO);
    assert!(
        took >= std::time::Duration::from_millis(900) && took < std::time::Duration::from_secs(5),
        "the open failed after {took:?}"
    );
    // The failed call is the health at once, not at the next access check.
    let h = health();
    assert!(h.starts_with("unreachable") && h.contains("within 1 s"), "{h}");
    frozen.thaw();
    // And the next successful call makes it ok again, at once.
    assert_eq!(std::fs::read(v.m("b")).unwrap(), b"b");
    assert_eq!(health(), "ok");
    v.unmount();
    let log = v.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("cannot unwrap its key") && l.contains("within 1 s")),
        "{log}"
    );
}
