//! The access policy and the usage guard, with real users (`daemon`, uid 1, and `nobody`)
//! running real programs (cat, head, a copy of cat) against a mount.

mod common;

use common::*;
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const DAEMON: u32 = 1;
const NOBODY: u32 = 65534;

const CONTENT: &[u8] = b"plate WX-123 at 12:04\n";

/// A mounted volume under `policy`, its files `a` and `b` written by root, reachable by
/// other users (`allow_other`, and the test directories opened up).
struct Setup {
    v: Volume,
    policy: PathBuf,
    audit: PathBuf,
}

impl Setup {
    fn new(policy: &str) -> Setup {
        let mut v = Volume::new();
        std::fs::set_permissions(v.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let policy_path = v.dir.path().join("vol.policy");
        let audit = v.dir.path().join("audit.jsonl");
        std::fs::write(&policy_path, policy).unwrap();
        v.mount_full(
            &["allow_other"],
            &[
                "--policy",
                policy_path.to_str().unwrap(),
                "--audit-log",
                audit.to_str().unwrap(),
            ],
            &[],
        );
        std::fs::set_permissions(&v.mnt, std::fs::Permissions::from_mode(0o755)).unwrap();
        for f in ["a", "b"] {
            std::fs::write(v.m(f), CONTENT).unwrap();
            std::fs::set_permissions(v.m(f), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        Setup {
            v,
            policy: policy_path,
            audit,
        }
    }

    /// Runs `program args…` as `uid` (its own gid, no supplementary groups).
    fn run_as(&self, uid: u32, program: &str, args: &[&str]) -> Output {
        Command::new(program)
            .args(args)
            .current_dir("/")
            .uid(uid)
            .gid(uid)
            .output()
            .unwrap()
    }

    /// `cat FILE` (or another program that prints a file) as `uid`: its output, or stderr.
    fn read_as(&self, uid: u32, program: &str, file: &str) -> Result<Vec<u8>, String> {
        let f = self.v.m(file);
        let out = self.run_as(uid, program, &[f.to_str().unwrap()]);
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn events(&self, kind: &str) -> Vec<Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).expect("each audit line is JSON"))
            .filter(|e| e["event"] == kind)
            .collect()
    }

    fn status(&self) -> Value {
        let out = self.v.run(&["status", "--json", self.v.mnt.to_str().unwrap()]);
        serde_json::from_slice::<Value>(&out.stdout).unwrap()[0].clone()
    }

    /// Unmounts and mounts again with the same policy: the kernel's page cache is gone.
    fn remount(&mut self) {
        self.v.unmount();
        let args = [
            "--policy",
            self.policy.to_str().unwrap(),
            "--audit-log",
            self.audit.to_str().unwrap(),
        ];
        self.v.mount_full(&["allow_other"], &args, &[]);
    }

    fn reload(&self) -> Output {
        kmsfs()
            .args(["reload", self.v.mnt.to_str().unwrap()])
            .output()
            .unwrap()
    }
}

fn denied(r: Result<Vec<u8>, String>) -> bool {
    matches!(&r, Err(e) if e.contains("Permission denied"))
}

/// A copy of /bin/cat elsewhere: the same bytes, another file.
fn cat_copy(dir: &Path) -> PathBuf {
    let copy = dir.join("cat-copy");
    std::fs::copy("/bin/cat", &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    copy
}

const POLICY: &str = r#"
version = 1
default = "deny"

# The test harness (root) sets the files up.
[[rule]]
name = "harness"
users = [0]
effect = "allow"

[[rule]]
name = "workers"
users = ["daemon"]
programs = ["/bin/cat"]
effect = "audit"

[[rule]]
name = "worker-shell"
users = ["daemon"]
programs = ["/bin/sh"]
effect = "allow"

[[rule]]
name = "backup"
users = ["nobody"]
effect = "deny"
"#;

#[test]
fn users_and_programs_are_allowed_and_denied_by_the_rules_and_audited() {
    let s = Setup::new(POLICY);
    assert_eq!(s.read_as(DAEMON, "/bin/cat", "a").unwrap(), CONTENT);
    // The same user with another program: no rule, so the default (deny).
    assert!(denied(s.read_as(DAEMON, "/usr/bin/head", "a")));
    // Another user with the allowed program: its rule denies.
    assert!(denied(s.read_as(NOBODY, "/bin/cat", "a")));
    // A copy of the allowed binary is another file.
    let copy = cat_copy(s.v.dir.path());
    assert!(denied(s.read_as(DAEMON, copy.to_str().unwrap(), "a")));
    // Denied files stay listed.
    let ls = s.run_as(NOBODY, "/bin/ls", &[s.v.mnt.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&ls.stdout), "a\nb\n");

    let opens = s.events("open");
    let open = opens
        .iter()
        .find(|e| e["uid"] == DAEMON)
        .expect("the audited open");
    assert_eq!(open["rule"], "workers");
    assert_eq!(open["exe"], "/usr/bin/cat");
    assert_eq!(open["gid"], DAEMON);
    assert!(open["pid"].as_u64().unwrap() > 0);
    assert_eq!(open["schema"], 1);
    let time = open["time"].as_str().unwrap();
    assert!(
        time.len() == 24 && time.ends_with('Z') && &time[10..11] == "T",
        "{time}"
    );
    let denials = s.events("denied");
    let by = |uid: u32, exe: &str| {
        denials
            .iter()
            .find(|e| e["uid"] == uid && e["exe"] == exe)
            .unwrap_or_else(|| panic!("no denial of uid {uid} running {exe}: {denials:?}"))
            .clone()
    };
    assert_eq!(by(DAEMON, "/usr/bin/head")["rule"], "default");
    assert_eq!(by(NOBODY, "/usr/bin/cat")["rule"], "backup");
    let d = by(DAEMON, copy.to_str().unwrap());
    assert_eq!(d["rule"], "default");
    assert_eq!(d["decided_by"], "policy");
    assert_eq!(d["request"], "open");
    assert_eq!(d["file_id"].as_str().unwrap().len(), 32, "{d}");
    assert_eq!(s.status()["policy"]["denials"], 3);
    // No name and no content in the log.
    let text = std::fs::read_to_string(&s.audit).unwrap();
    assert!(!text.contains("WX-123") && !text.contains("\"a\""), "{text}");
}

#[test]
fn a_denied_open_never_reaches_the_kms() {
    let mut s = Setup::new(POLICY);
    s.remount();
    // Cold cache: an allowed open unwraps; denied ones do not.
    assert!(denied(s.read_as(NOBODY, "/bin/cat", "a")));
    assert!(denied(s.read_as(DAEMON, "/usr/bin/head", "b")));
    assert_eq!(s.status()["counters"]["kms_calls"], 0);
    assert!(s.events("unwrap").is_empty());
    assert_eq!(s.read_as(DAEMON, "/bin/cat", "a").unwrap(), CONTENT);
    let unwraps = s.events("unwrap");
    assert_eq!(unwraps.len(), 1, "{unwraps:?}");
    // The unwrap names who caused it.
    assert_eq!(unwraps[0]["uid"], DAEMON);
    assert_eq!(unwraps[0]["exe"], "/usr/bin/cat");
    assert_eq!(unwraps[0]["rule"], "workers");
}

#[test]
fn a_descriptor_keeps_working_after_exec_and_setuid() {
    let s = Setup::new(POLICY);
    let a = s.v.m("a");
    // The allowed shell opens; head, which daemon may not run on the mount, reads the
    // descriptor it inherits.
    let out = s.run_as(
        DAEMON,
        "/bin/sh",
        &[
            "-c",
            &format!("exec 3< '{}' && exec /usr/bin/head -c 100 <&3", a.display()),
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, CONTENT);
    // Root opens, then becomes nobody (denied by rule) and reads on.
    let out = Command::new("/bin/sh")
        .args([
            "-c",
            &format!(
                "exec 3< '{}' && exec setpriv --reuid=65534 --regid=65534 --clear-groups /bin/cat <&3",
                a.display()
            ),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, CONTENT);
    // A fresh open by that identity is still refused.
    assert!(denied(s.read_as(NOBODY, "/bin/cat", "a")));
}

#[test]
fn a_bad_policy_on_reload_keeps_the_one_in_force() {
    let s = Setup::new(POLICY);
    std::fs::write(
        &s.policy,
        "version = 1\n[[rule]]\nusers = [\"no-such-user-kmsfs\"]\neffect = \"allow\"\n",
    )
    .unwrap();
    let out = s.reload();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no user named \"no-such-user-kmsfs\"") && err.lines().count() == 1,
        "{err}"
    );
    assert!(s.v.log_text().contains("keeping the policy loaded before"));
    assert!(denied(s.read_as(NOBODY, "/bin/cat", "a")));
    assert_eq!(s.read_as(DAEMON, "/bin/cat", "a").unwrap(), CONTENT);
    assert_eq!(s.events("policy_rejected").len(), 1);

    // A good one by SIGHUP: nobody may read now.
    std::fs::write(
        &s.policy,
        POLICY.replace(
            "name = \"backup\"\nusers = [\"nobody\"]\neffect = \"deny\"",
            "name = \"backup\"\nusers = [\"nobody\"]\neffect = \"allow\"",
        ),
    )
    .unwrap();
    let pid = s.v.daemon_pid();
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGHUP) }, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.events("policy_loaded").is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(s.read_as(NOBODY, "/bin/cat", "a").unwrap(), CONTENT);

    // A file others may write is refused, at reload and at mount.
    std::fs::set_permissions(&s.policy, std::fs::Permissions::from_mode(0o666)).unwrap();
    let err = String::from_utf8_lossy(&s.reload().stderr).into_owned();
    assert!(err.contains("writable by group or others"), "{err}");
}

#[test]
fn a_policy_others_may_write_is_refused_at_mount() {
    let v = Volume::new();
    let p = v.dir.path().join("p.policy");
    std::fs::write(&p, "version = 1\n").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o646)).unwrap();
    let mut args = v.mount_args(&[]);
    args.extend(["--policy".into(), p.display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = run_err(&args);
    assert!(
        err.contains("writable by group or others") && err.contains("chmod"),
        "{err}"
    );
}

/// A policy allowing everyone, with one guard on daemon's opens.
fn guarded(action: &str, extra: &str) -> String {
    format!(
        r#"
version = 1
[[guard]]
name = "burst"
users = ["daemon"]
window = "1m"
opens = 5
action = "{action}"
{extra}
"#
    )
}

/// Opens `a` as daemon with cat, `n` times; the outcomes.
fn burst(s: &Setup, n: usize) -> Vec<Result<Vec<u8>, String>> {
    (0..n).map(|_| s.read_as(DAEMON, "/bin/cat", "a")).collect()
}

#[test]
fn guard_deny_stops_only_the_identity_that_crossed() {
    let s = Setup::new(&guarded("deny", "cooldown = \"1h\""));
    let r = burst(&s, 8);
    assert!(r[..5].iter().all(Result::is_ok), "{r:?}");
    assert!(r[5..].iter().all(|r| denied(r.clone())), "{r:?}");
    // Root, and daemon with another program, are other identities.
    assert_eq!(std::fs::read(s.v.m("a")).unwrap(), CONTENT);
    assert_eq!(s.read_as(DAEMON, "/usr/bin/head", "a").unwrap(), CONTENT);
    let alerts = s.events("alert");
    assert_eq!(alerts.len(), 1, "one alert per crossing: {alerts:?}");
    assert_eq!(alerts[0]["guard"], "burst");
    assert_eq!(alerts[0]["uid"], DAEMON);
    assert_eq!(alerts[0]["exe"], "/usr/bin/cat");
    assert_eq!(alerts[0]["action"], "deny");
    assert_eq!(alerts[0]["threshold"], 5);
    let denials = s.events("denied");
    assert_eq!(denials.len(), 3);
    assert_eq!(denials[0]["decided_by"], "guard burst");
    let p = &s.status()["policy"];
    assert_eq!(p["alerts"], 1);
    assert_eq!(p["restricted"][0]["uid"], DAEMON);
    assert_eq!(p["restricted"][0]["state"], "denied");
    assert!(
        s.v.log_text()
            .contains("guard burst: uid 1 running /usr/bin/cat: 6 opens in 60 s")
    );
}

#[test]
fn guard_alert_only_alerts() {
    let s = Setup::new(&guarded("alert", ""));
    assert!(burst(&s, 9).iter().all(Result::is_ok));
    assert_eq!(s.events("alert").len(), 1);
    assert!(s.events("denied").is_empty());
}

#[test]
fn guard_throttle_parks_replies_and_serves_everyone_else() {
    let s = std::sync::Arc::new(Setup::new(&guarded("throttle", "delay = \"200ms\"")));
    assert!(burst(&s, 5).iter().all(Result::is_ok));
    // Past the threshold, daemon's opens are spaced 200 ms apart: 24 at once (more than the
    // daemon's 16 FUSE workers) take ≥ 4.8 s.
    let t = Instant::now();
    let readers: Vec<_> = (0..24)
        .map(|_| {
            let s = s.clone();
            std::thread::spawn(move || s.read_as(DAEMON, "/bin/cat", "a"))
        })
        .collect();
    // Meanwhile other callers are answered at once: no FUSE worker sleeps.
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..20 {
        let one = Instant::now();
        assert_eq!(std::fs::read(s.v.m("b")).unwrap(), CONTENT);
        assert!(one.elapsed() < Duration::from_millis(500), "{:?}", one.elapsed());
    }
    for r in readers {
        assert_eq!(r.join().unwrap().unwrap(), CONTENT);
    }
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(3000),
        "8 throttled opens took {took:?}"
    );
    assert_eq!(s.events("alert").len(), 1);
    assert_eq!(s.events("alert")[0]["action"], "throttle");
}

#[test]
fn guard_lock_locks_the_mount_when_an_admin_asked_for_it() {
    let mut s = Setup::new(&guarded("lock", ""));
    let r = burst(&s, 6);
    assert!(r[..5].iter().all(Result::is_ok), "{r:?}");
    assert!(r[5].is_err());
    assert!(s.v.wait_daemon_gone(10), "the mount did not lock");
    assert!(s.v.log_text().contains("usage guard burst"));
    let locked = s.events("locked");
    assert!(
        locked[0]["reason"]
            .as_str()
            .unwrap()
            .contains("usage guard burst"),
        "{locked:?}"
    );
}

#[test]
fn guard_counts_bytes_read_per_identity() {
    let mut s = Setup::new(
        r#"
version = 1
[[guard]]
name = "exfil"
window = "1m"
bytes_read = "1 MiB"
cooldown = "10m"
"#,
    );
    std::fs::write(s.v.m("big"), vec![1u8; 3 << 20]).unwrap();
    std::fs::set_permissions(s.v.m("big"), std::fs::Permissions::from_mode(0o644)).unwrap();
    // Bytes the kernel serves from its page cache never reach the daemon: start cold.
    s.remount();
    // The read that crosses completes; the next open by that identity is refused.
    assert_eq!(s.read_as(DAEMON, "/bin/cat", "big").unwrap().len(), 3 << 20);
    assert!(denied(s.read_as(DAEMON, "/bin/cat", "a")));
    let alerts = s.events("alert");
    assert_eq!(alerts[0]["counter"], "bytes_read");
}

/// journald for this test: the machine's, or one started here (the daemon runs standalone).
fn journald() -> Option<std::process::Child> {
    let socket = Path::new("/run/systemd/journal/socket");
    let unbound = std::os::unix::net::UnixDatagram::unbound().unwrap();
    if socket.exists() && unbound.connect(socket).is_ok() {
        return None;
    }
    let child = Command::new("/lib/systemd/systemd-journald")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("systemd-journald (apt-get install systemd)");
    // Until it answers, not until the socket exists: a journald killed by an earlier run
    // leaves its socket behind, and events sent before the new one binds are lost.
    let deadline = Instant::now() + Duration::from_secs(10);
    let answers = || {
        let d = std::os::unix::net::UnixDatagram::unbound().unwrap();
        d.connect(socket).is_ok()
    };
    while !answers() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(child)
}

#[test]
fn audit_events_reach_journald_as_fields() {
    let mut started = journald();
    let mut v = Volume::new();
    let policy = v.dir.path().join("p.policy");
    let text =
        "version = 1\ndefault = \"deny\"\n[[rule]]\nname = \"harness\"\nusers = [0]\neffect = \"audit\"\n";
    std::fs::write(&policy, text).unwrap();
    v.mount_with_args(&["--policy", policy.to_str().unwrap(), "--audit-journal"]);
    std::fs::write(v.m("f"), CONTENT).unwrap();
    let pid = format!("_PID={}", v.daemon_pid());
    let mut found = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while found.is_empty() && Instant::now() < deadline {
        let out = Command::new("journalctl")
            .args([
                "-o",
                "json",
                "--no-pager",
                "SYSLOG_IDENTIFIER=kmsfs-audit",
                &pid,
                "KMSFS_EVENT=create",
            ])
            .output()
            .unwrap();
        found = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .collect();
        std::thread::sleep(Duration::from_millis(100));
    }
    v.unmount();
    if let Some(c) = &mut started {
        let _ = c.kill();
        let _ = c.wait();
    }
    let e = found.first().expect("the create event in the journal");
    assert_eq!(e["KMSFS_RULE"], "harness");
    assert_eq!(e["KMSFS_UID"], "0");
    assert_eq!(e["KMSFS_SCHEMA"], "1");
    assert_eq!(e["KMSFS_FILE_ID"].as_str().unwrap().len(), 32);
    assert!(
        e["KMSFS_EXE"].as_str().unwrap().contains("policy-"),
        "the test binary: {e}"
    );
    assert_eq!(e["PRIORITY"], "5");
}

#[test]
fn reload_reopens_the_audit_log_after_it_was_moved() {
    let s = Setup::new(POLICY);
    assert!(denied(s.read_as(NOBODY, "/bin/cat", "a")));
    let rotated = s.audit.with_extension("1");
    std::fs::rename(&s.audit, &rotated).unwrap();
    let out = s.reload();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(denied(s.read_as(NOBODY, "/bin/cat", "b")));
    let new = s.events("denied");
    assert_eq!(new.len(), 1, "the new file has the new denial only: {new:?}");
    let mode = std::fs::metadata(&s.audit).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(
        std::fs::read_to_string(&rotated)
            .unwrap()
            .matches("\"denied\"")
            .count(),
        1
    );
}
