//! Key prefetch through a real mount with the local keystore: a listing (or a reader going
//! through a directory) unwraps the keys of its files ahead, only of files the caller could
//! open, each audited as a prefetch; `--prefetch 0` turns it off.

mod common;

use common::*;
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// uid and gid of `daemon`.
const DAEMON: u32 = 1;

/// A mounted volume with an audit log, other users let in, and `n` files in `d`.
struct Setup {
    v: Volume,
    audit: PathBuf,
    policy: Option<PathBuf>,
}

impl Setup {
    fn new(n: usize, policy: Option<&str>, extra: &[&str]) -> Setup {
        let v = Volume::new();
        std::fs::set_permissions(v.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let audit = v.dir.path().join("audit.jsonl");
        let policy = policy.map(|p| {
            let path = v.dir.path().join("vol.policy");
            std::fs::write(&path, p).unwrap();
            path
        });
        let mut s = Setup { v, audit, policy };
        s.mount(extra);
        std::fs::set_permissions(&s.v.mnt, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir(s.v.m("d")).unwrap();
        for i in 0..n {
            let f = s.v.m(&format!("d/f{i:04}"));
            std::fs::write(&f, format!("file {i}")).unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        s
    }

    fn mount(&mut self, extra: &[&str]) {
        let mut args = vec!["--audit-log", self.audit.to_str().unwrap()];
        if let Some(p) = &self.policy {
            args.extend(["--policy", p.to_str().unwrap()]);
        }
        args.extend_from_slice(extra);
        self.v.mount_full(&["allow_other"], &args, &[]);
    }

    /// Unmounts and mounts again (cold key cache), with `extra` arguments; the audit log
    /// starts afresh.
    fn remount(&mut self, extra: &[&str]) {
        self.v.unmount();
        std::fs::remove_file(&self.audit).unwrap();
        self.mount(extra);
    }

    fn unwraps(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).expect("each audit line is JSON"))
            .filter(|e| e["event"] == "unwrap")
            .collect()
    }

    /// Unwraps made by prefetch, and by opens.
    fn split_unwraps(&self) -> (Vec<Value>, Vec<Value>) {
        self.unwraps().into_iter().partition(|e| e["prefetch"] == true)
    }

    fn counters(&self) -> Value {
        let out = self.v.run(&["status", "--json", self.v.mnt.to_str().unwrap()]);
        serde_json::from_slice::<Value>(&out.stdout).unwrap()[0]["counters"].clone()
    }

    /// Waits (up to 20 s) until `n` keys have been prefetched.
    fn wait_prefetched(&self, n: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.counters()["prefetched"].as_u64().unwrap_or(0) >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// `ls d` as `uid` (with its own gid).
    fn ls_as(&self, uid: u32) {
        let out = Command::new("ls")
            .arg(self.v.m("d"))
            .current_dir("/")
            .uid(uid)
            .gid(uid)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ls: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn read_all(&self, n: usize) {
        for i in 0..n {
            let got = std::fs::read(self.v.m(&format!("d/f{i:04}"))).unwrap();
            assert_eq!(got, format!("file {i}").as_bytes());
        }
    }
}

#[test]
fn a_listing_unwraps_the_keys_ahead_and_the_reads_that_follow_ask_the_kms_nothing() {
    let mut s = Setup::new(200, None, &[]);
    s.remount(&[]);
    s.ls_as(0);
    assert!(s.wait_prefetched(200), "prefetched: {}", s.counters());
    s.read_all(200);
    let (ahead, by_opens) = s.split_unwraps();
    assert_eq!(ahead.len(), 200, "one prefetched unwrap per file");
    assert!(
        by_opens.is_empty(),
        "opens asked the KMS {} times",
        by_opens.len()
    );
    let e = &ahead[0];
    assert_eq!(e["outcome"], "ok");
    assert_eq!(e["uid"], 0, "audited in the name of who listed");
    assert!(e["file_id"].is_string() && e["exe"].is_string(), "{e}");
    let c = s.counters();
    assert_eq!(c["prefetched"], 200);
    assert_eq!(c["prefetch_used"], 200, "{c}");
    assert_eq!(c["prefetch_evicted_unused"], 0, "{c}");
    assert_eq!(c["cache_misses"], 0, "{c}");
}

/// Files just written keep their keys (the create caches them) for a reader going through
/// the directory after. With the old default of 4,096 keys, reading 5,000 files in the order
/// they were written missed on every one (LRU had evicted the oldest, and each miss evicted
/// the key wanted next): 5,000 unwraps.
#[test]
fn a_directory_of_5000_files_just_written_reads_without_the_kms() {
    let s = Setup::new(5000, None, &[]);
    s.read_all(5000);
    let unwraps = s.unwraps();
    assert!(
        unwraps.is_empty(),
        "5,000 files read after their creates asked the KMS to unwrap {} keys",
        unwraps.len()
    );
    assert_eq!(s.counters()["cache_misses"], 0, "{}", s.counters());
}

#[test]
fn a_reader_going_through_a_directory_is_kept_ahead_of() {
    let mut s = Setup::new(600, None, &[]);
    s.remount(&[]);
    s.read_all(600);
    let (ahead, by_opens) = s.split_unwraps();
    assert!(
        by_opens.len() <= 150,
        "600 files read in order, {} asked by their opens, {} prefetched",
        by_opens.len(),
        ahead.len()
    );
    let c = s.counters();
    assert!(c["prefetch_used"].as_u64().unwrap() >= 450, "{c}");
}

#[test]
fn prefetch_0_turns_it_off() {
    let mut s = Setup::new(50, None, &[]);
    s.remount(&["--prefetch", "0"]);
    s.ls_as(0);
    s.read_all(50);
    let (ahead, by_opens) = s.split_unwraps();
    assert!(ahead.is_empty());
    assert_eq!(by_opens.len(), 50);
    assert_eq!(s.counters()["prefetched"], 0);
}

#[test]
fn only_files_the_caller_may_read_are_prefetched() {
    let mut s = Setup::new(4, None, &[]);
    std::fs::write(s.v.m("d/secret"), b"root's").unwrap();
    std::fs::set_permissions(s.v.m("d/secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
    s.remount(&[]);
    s.ls_as(DAEMON);
    assert!(s.wait_prefetched(4), "prefetched: {}", s.counters());
    // The secret's file id, from root's own open of it.
    std::fs::read(s.v.m("d/secret")).unwrap();
    let (ahead, by_opens) = s.split_unwraps();
    let secret = by_opens.iter().find(|e| e["uid"] == 0).expect("root's unwrap")["file_id"].clone();
    assert_eq!(ahead.len(), 4, "{ahead:?}");
    assert!(ahead.iter().all(|e| e["uid"] == DAEMON && e["file_id"] != secret));
    assert_eq!(s.counters()["prefetched"], 4);
}

#[test]
fn an_identity_the_policy_denies_sets_no_prefetch_off() {
    let policy = r#"
version = 1
default = "deny"

[[rule]]
name = "harness"
users = [0]
effect = "allow"
"#;
    let mut s = Setup::new(20, Some(policy), &[]);
    s.remount(&[]);
    s.ls_as(DAEMON);
    // Root lists until its own pass runs: the daemon user's pass, had it run, came first and
    // would have placed every key in its name.
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.counters()["prefetched"].as_u64().unwrap_or(0) < 20 && Instant::now() < deadline {
        s.ls_as(0);
        std::thread::sleep(Duration::from_millis(20));
    }
    let (ahead, _) = s.split_unwraps();
    assert_eq!(ahead.len(), 20);
    assert!(
        ahead.iter().all(|e| e["uid"] == 0),
        "prefetched for a denied identity"
    );
}
