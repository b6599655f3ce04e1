//! Locking and revocation: keys dropped, I/O refused with ENOKEY, the mount gone.

mod common;

use common::openbao::{Bao, ROOT_TOKEN};
use common::*;
use std::io::Read;

#[test]
fn a_disabled_local_key_locks_the_mount_within_the_check_interval() {
    let mut v = Volume::new();
    v.mount_with_args(&["--check-interval", "1"]);
    std::fs::write(v.m("f"), b"data").unwrap();
    assert_eq!(std::fs::read(v.m("f")).unwrap(), b"data");
    let t = std::time::Instant::now();
    v.key("disable");
    assert!(v.wait_daemon_gone(10), "not locked");
    let took = t.elapsed();
    assert!(!v.is_mounted());
    assert!(std::fs::read(v.m("f")).is_err());
    let log = v.log_text();
    assert!(log.contains("the KMS denied access"), "{log}");
    eprintln!("local: key disabled -> daemon gone in {took:?}");
}

#[test]
fn kmsfs_lock_cuts_off_a_process_holding_a_file_open() {
    let mut v = Volume::mounted();
    std::fs::write(v.m("f"), vec![7u8; 300_000]).unwrap();
    let mut held = std::fs::File::open(v.m("f")).unwrap();
    let mut buf = vec![0u8; 1000];
    held.read_exact(&mut buf).unwrap();
    run_ok(&["lock", v.mnt.to_str().unwrap()]);
    assert!(v.wait_daemon_gone(10));
    assert!(!v.is_mounted());
    // Its next read fails: ENOKEY while the daemon drains, then ENOTCONN once it is gone.
    let err = held.read_exact(&mut buf).unwrap_err();
    assert!(
        matches!(errno_of(&err), libc::ENOKEY | libc::ENOTCONN | libc::EIO),
        "unexpected {err}"
    );
    assert!(v.log_text().contains("locked by uid 0"), "{}", v.log_text());
}

#[test]
fn status_reports_the_mount() {
    let v = Volume::mounted();
    std::fs::write(v.m("f"), b"x").unwrap();
    let out = run_ok(&["status", v.mnt.to_str().unwrap(), "--json"]);
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s[0]["backend"], "local");
    assert_eq!(s[0]["cached_keys"], 1);
    assert_eq!(s[0]["counters"]["bytes_written"], 1);
    assert_eq!(s[0]["kms_health"], "ok");
}

#[test]
fn keys_are_locked_in_memory_and_no_core_is_dumped() {
    let v = Volume::mounted();
    std::fs::write(v.m("f"), b"x").unwrap();
    let pid = v.daemon_pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let vmlck: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap();
    assert!(vmlck > 0, "VmLck is 0");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert!(core.split_whitespace().nth(4) == Some("0"), "{core}");
    // SIGABRT: the daemon dies without a core file (cwd of the daemon is the test's cwd).
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
    let before: Vec<_> = std::fs::read_dir(&cwd)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    unsafe_free_kill(pid, "ABRT");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let after: Vec<_> = std::fs::read_dir(&cwd)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let new: Vec<_> = after.iter().filter(|n| !before.contains(n)).collect();
    assert!(
        !new.iter().any(|n| n.to_string_lossy().starts_with("core")),
        "a core file appeared: {new:?}"
    );
}

fn unsafe_free_kill(pid: u32, sig: &str) {
    std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
}

#[test]
fn the_audit_log_holds_no_name_and_no_key() {
    let mut v = Volume::new();
    let audit = v.dir.path().join("audit.jsonl");
    v.mount_with_args(&["--audit-log", audit.to_str().unwrap()]);
    // Not hex: the log is full of hex ids, and "face" is one by chance now and then.
    std::fs::write(v.m("Jane_Doe_interview.mp4"), b"plate XY-987").unwrap();
    v.remount_with(&["--audit-log", audit.to_str().unwrap()]);
    assert_eq!(
        std::fs::read(v.m("Jane_Doe_interview.mp4")).unwrap(),
        b"plate XY-987"
    );
    run_ok(&["lock", v.mnt.to_str().unwrap()]);
    assert!(v.wait_daemon_gone(10));
    let text = std::fs::read_to_string(&audit).unwrap();
    for ev in [
        "\"mounted\"",
        "\"dek_generated\"",
        "\"unwrap\"",
        "\"locked\"",
        "\"unmounted\"",
    ] {
        assert!(text.contains(ev), "no {ev} event in:\n{text}");
    }
    assert!(!text.contains("Jane") && !text.contains("plate XY"), "{text}");
    let keystore = std::fs::read_to_string(&v.keystore).unwrap();
    let key_hex = keystore
        .split("\"key_hex\": \"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    assert!(!text.contains(key_hex) && !v.log_text().contains(key_hex));
    for line in text.lines() {
        serde_json::from_str::<serde_json::Value>(line).expect("each audit line is JSON");
    }
}

#[test]
fn a_revoked_openbao_token_locks_the_mount() {
    let bao = Bao::start();
    bao.minimal_policy("kmsfs", "fs-kek");
    let token = bao.token(&["kmsfs"]);
    let mut v = Volume::init_with(
        &["--kms", "openbao", "--kms-addr", &bao.addr, "--kms-key", "fs-kek"],
        &[("BAO_TOKEN", token.as_str()), ("BAO_ADDR", bao.addr.as_str())],
    );
    v.mount_with_args(&["--check-interval", "1"]);
    std::fs::write(v.m("f"), b"data").unwrap();
    let t = std::time::Instant::now();
    bao.api(
        "POST",
        "auth/token/revoke",
        &serde_json::json!({ "token": token }).to_string(),
    );
    assert!(v.wait_daemon_gone(15), "not locked after the token was revoked");
    eprintln!("openbao: token revoked -> daemon gone in {:?}", t.elapsed());
    assert!(v.log_text().contains("denied"), "{}", v.log_text());
}

#[test]
fn an_unavailable_openbao_keeps_cached_files_then_locks_after_the_grace_period() {
    let bao = Bao::start();
    let mut v = Volume::init_with(
        &["--kms", "openbao", "--kms-addr", &bao.addr, "--kms-key", "fs-kek"],
        &[("BAO_TOKEN", ROOT_TOKEN), ("BAO_ADDR", bao.addr.as_str())],
    );
    v.mount_with_args(&["--check-interval", "1", "--grace", "12"]);
    std::fs::write(v.m("cached"), b"cached").unwrap();
    std::fs::write(v.m("uncached"), b"uncached").unwrap();
    v.remount_with(&["--check-interval", "1", "--grace", "12"]);
    assert_eq!(std::fs::read(v.m("cached")).unwrap(), b"cached"); // key now cached
    bao.api("POST", "sys/seal", "");
    // Cached keys keep working; new opens fail with EIO.
    assert_eq!(std::fs::read(v.m("cached")).unwrap(), b"cached");
    assert_eq!(errno_of(&std::fs::read(v.m("uncached")).unwrap_err()), libc::EIO);
    // Back before the grace period ends: service resumes, nothing locked.
    let unseal_key = bao.unseal_key();
    bao.api_noauth(
        "POST",
        "sys/unseal",
        &serde_json::json!({ "key": unseal_key }).to_string(),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !v.log_text().contains("KMS reachable again") {
        assert!(
            std::time::Instant::now() < deadline,
            "service did not resume: {}",
            v.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(v.is_mounted(), "locked although the KMS came back in time");
    assert_eq!(std::fs::read(v.m("uncached")).unwrap(), b"uncached");
    // Sealed for longer than the grace period: locked.
    bao.api("POST", "sys/seal", "");
    assert!(v.wait_daemon_gone(40), "not locked after the grace period");
    let log = v.log_text();
    assert!(log.contains("grace period over"), "{log}");
    assert!(log.contains("KMS unreachable"), "{log}");
}
