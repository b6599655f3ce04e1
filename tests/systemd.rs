//! systemd and mount(8) integration: unit verification, the notify protocol, the mount helper.

mod common;

use common::*;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn have(tool: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn units_verify_without_a_single_warning() {
    if !have("systemd-analyze") {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have systemd-analyze (scripts/ensure-deps)"
        );
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    }
    // The template, installed as install-units would (binary path filled in), verified
    // through an instance name.
    let d = tempfile::tempdir().unwrap();
    run_ok(&["install-units", "--root", d.path().to_str().unwrap()]);
    let unit = d.path().join("etc/systemd/system/kmsfs@.service");
    let text = std::fs::read_to_string(&unit)
        .unwrap()
        .replace("/usr/local/bin/kmsfs", env!("CARGO_BIN_EXE_kmsfs"));
    let instance = d.path().join("kmsfs@media.service");
    std::fs::write(&instance, text).unwrap();
    // Documentation= names the man pages install-units wrote: verify runs man(1) on each
    // (the trailing colon keeps the system's own pages, mount.fuse3(8), in the path).
    let manpath = format!("{}:", d.path().join("usr/local/share/man").display());
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&instance)
        .env("MANPATH", manpath)
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "systemd-analyze verify kmsfs@media.service: {:?} {all:?}",
        out.status
    );
    assert!(
        out.status.success() && all.trim().is_empty(),
        "systemd-analyze verify says:\n{all}"
    );
    // And the helpers it installed point at the binary.
    let helper = d.path().join("sbin/mount.fuse.kmsfs");
    assert_eq!(
        std::fs::read_link(helper).unwrap(),
        Path::new("/usr/local/bin/kmsfs")
    );
}

#[test]
fn notify_ready_only_once_the_mount_serves_and_stopping_on_unmount() {
    let mut v = Volume::mounted();
    std::fs::write(v.m("hello"), b"served").unwrap();
    v.unmount();
    let d = tempfile::tempdir().unwrap();
    let sock_path = d.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut child = kmsfs()
        .args([
            "mount",
            v.backing.to_str().unwrap(),
            v.mnt.to_str().unwrap(),
            "--foreground",
        ])
        .env("NOTIFY_SOCKET", &sock_path)
        .stderr(std::fs::File::create(&v.log).unwrap())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 4096];
    let mut seen = Vec::new();
    loop {
        let n = sock.recv(&mut buf).expect("a notification before the timeout");
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        seen.push(msg.clone());
        if msg.lines().any(|l| l == "READY=1") {
            break;
        }
    }
    // At READY=1 the mount already serves files.
    assert_eq!(std::fs::read(v.m("hello")).unwrap(), b"served");
    run_ok(&["unmount", v.mnt.to_str().unwrap()]);
    loop {
        let n = sock.recv(&mut buf).expect("STOPPING=1 before the timeout");
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        seen.push(msg.clone());
        if msg.lines().any(|l| l == "STOPPING=1") {
            break;
        }
    }
    assert!(child.wait().unwrap().success());
    eprintln!("notify sequence: {seen:?}");
}

/// Installs the mount(8) helper for fuse.kmsfs, pointing at this build, until the returned
/// lock is dropped (tests/package.rs installs and removes the packaged one).
fn install_helper() -> std::fs::File {
    let lock = sbin_helpers_lock();
    let link = Path::new("/sbin/mount.fuse.kmsfs");
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_kmsfs"), link).unwrap();
    lock
}

#[test]
fn mount_t_fuse_kmsfs_and_mount_a_with_an_fstab() {
    let _helper = install_helper();
    let v = Volume::new();
    let log = v.dir.path().join("helper.log");
    let opts = format!("_netdev,nofail,x-systemd.automount,log={}", log.display());
    let st = std::process::Command::new("mount")
        .args(["-t", "fuse.kmsfs"])
        .arg(&v.backing)
        .arg(&v.mnt)
        .args(["-o", &opts])
        .status()
        .unwrap();
    assert!(st.success(), "mount -t fuse.kmsfs failed");
    std::fs::write(v.m("f"), b"via mount(8)").unwrap();
    assert_eq!(std::fs::read(v.m("f")).unwrap(), b"via mount(8)");
    assert!(v.is_mounted());
    run_ok(&["unmount", v.mnt.to_str().unwrap()]);

    // mount -a with a test fstab
    let fstab = v.dir.path().join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# test fstab\n{} {} fuse.kmsfs defaults,_netdev,nofail,log={} 0 0\n",
            v.backing.display(),
            v.mnt.display(),
            log.display()
        ),
    )
    .unwrap();
    let st = std::process::Command::new("mount")
        .arg("-a")
        .arg("-T")
        .arg(&fstab)
        .status()
        .unwrap();
    assert!(st.success(), "mount -a -T failed");
    assert_eq!(std::fs::read(v.m("f")).unwrap(), b"via mount(8)");
    run_ok(&["unmount", v.mnt.to_str().unwrap()]);

    // An unknown option is a clear error from the helper.
    let out = std::process::Command::new("mount")
        .args(["-t", "fuse.kmsfs"])
        .arg(&v.backing)
        .arg(&v.mnt)
        .args(["-o", "frobnicate"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown mount option"),
        "{out:?}"
    );
}

/// A foreground daemon as the unit starts it (`ExecStart=… --foreground`), with its notify
/// socket; returns once it has sent READY=1.
struct Service {
    child: std::process::Child,
    sock: UnixDatagram,
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = kmsfs().args(["unmount", "--lazy"]).arg(&self.mnt).output();
            let _ = self.child.wait();
        }
    }
}

impl Service {
    fn start(v: &Volume, extra: &[&str], env: &[(&str, &str)]) -> Service {
        let dir = tempfile::tempdir().unwrap();
        let sock_path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&sock_path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let child = kmsfs()
            .args([
                "mount",
                v.backing.to_str().unwrap(),
                v.mnt.to_str().unwrap(),
                "--foreground",
            ])
            .args(extra)
            .env("NOTIFY_SOCKET", &sock_path)
            .envs(env.iter().copied())
            .stderr(std::fs::File::create(&v.log).unwrap())
            .spawn()
            .unwrap();
        let s = Service {
            child,
            sock,
            mnt: v.mnt.clone(),
            _dir: dir,
        };
        s.wait_for("READY=1");
        s
    }

    fn wait_for(&self, line: &str) {
        let mut buf = [0u8; 4096];
        loop {
            let n = self
                .sock
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("no {line} from the daemon: {e}"));
            if String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == line) {
                return;
            }
        }
    }

    /// How many WATCHDOG=1 pings arrive within `d`.
    fn pings_within(&self, d: Duration) -> usize {
        let deadline = std::time::Instant::now() + d;
        let mut buf = [0u8; 4096];
        let mut n = 0;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return n;
            }
            self.sock.set_read_timeout(Some(left)).unwrap();
            if let Ok(len) = self.sock.recv(&mut buf) {
                n += String::from_utf8_lossy(&buf[..len])
                    .lines()
                    .filter(|l| *l == "WATCHDOG=1")
                    .count();
            }
        }
    }
}

/// A `[Service]` setting of the shipped unit, if it has it.
fn unit_setting(key: &str) -> Option<String> {
    let unit =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/kmsfs@.service")).unwrap();
    unit.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('=').map(str::to_owned))
}

/// systemd's time span syntax, as far as the unit uses it ("60s", "2min", "500ms", "90").
fn timespan(s: &str) -> Duration {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..split].parse().unwrap();
    match &s[split..] {
        "" | "s" | "sec" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "min" | "m" => Duration::from_secs(60 * n),
        other => panic!("time unit {other:?}"),
    }
}

#[test]
fn a_stop_by_the_units_own_sequence_ends_the_daemon_with_a_file_held_open() {
    let v = Volume::new();
    let mut svc = Service::start(&v, &[], &[]);
    std::fs::write(v.m("open"), b"held open during the stop").unwrap();
    let held = std::fs::File::open(v.m("open")).unwrap();
    // systemd's stop (systemd.kill(5), systemd.service(5)): ExecStop= if any, then KillSignal=
    // (SIGTERM) to the main process, then SIGKILL at TimeoutStopSec=.
    if let Some(stop) = unit_setting("ExecStop") {
        let cmd = stop
            .replace("/usr/local/bin/kmsfs", env!("CARGO_BIN_EXE_kmsfs"))
            .replace("${KMSFS_MOUNTPOINT}", v.mnt.to_str().unwrap());
        let st = std::process::Command::new("sh")
            .args(["-c", &cmd])
            .status()
            .unwrap();
        eprintln!("ExecStop {cmd:?}: {st}");
    }
    assert!(unit_setting("KillSignal").is_none_or(|s| s == "SIGTERM"));
    let timeout = timespan(&unit_setting("TimeoutStopSec").unwrap_or("90s".into()));
    let t = std::time::Instant::now();
    // SAFETY: a signal to our own child, whose pid we have not reaped yet.
    assert_eq!(unsafe { libc::kill(svc.child.id() as i32, libc::SIGTERM) }, 0);
    let status = loop {
        if let Some(st) = svc.child.try_wait().unwrap() {
            break st;
        }
        if t.elapsed() > timeout {
            let _ = svc.child.kill();
            panic!("the daemon outlived TimeoutStopSec ({timeout:?}): systemd would SIGKILL it");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = std::fs::read_to_string(&v.log).unwrap();
    eprintln!("stopped in {:?} with {status}; log:\n{log}", t.elapsed());
    assert_eq!(status.code(), Some(0), "a stop must exit 0: {log}");
    // The keys are gone with it: the file held open reads nothing any more.
    use std::os::unix::fs::FileExt;
    assert!(held.read_at(&mut [0u8; 16], 0).is_err());
    drop(held);
    assert!(!v.is_mounted(), "the mount outlived its daemon");
    // And the next start works.
    let mut again = Service::start(&v, &[], &[]);
    assert_eq!(std::fs::read(v.m("open")).unwrap(), b"held open during the stop");
    run_ok(&["unmount", v.mnt.to_str().unwrap()]);
    assert!(again.child.wait().unwrap().success());
}

#[test]
fn a_mount_over_a_stale_kmsfs_mountpoint_detaches_it_first() {
    let mut v = Volume::mounted();
    std::fs::write(v.m("f"), b"survives a SIGKILL").unwrap();
    // SAFETY: kills the test's own daemon.
    assert_eq!(unsafe { libc::kill(v.daemon_pid() as i32, libc::SIGKILL) }, 0);
    assert!(v.wait_daemon_gone(10));
    let e = std::fs::metadata(&v.mnt).unwrap_err();
    assert_eq!(errno_of(&e), libc::ENOTCONN, "not stale: {e}");
    v.mount(&[]);
    assert_eq!(std::fs::read(v.m("f")).unwrap(), b"survives a SIGKILL");
    assert!(v.log_text().contains("stale kmsfs mount"), "{}", v.log_text());
    v.unmount();
}

/// Mounts a FUSE filesystem at `at` that never answers (nobody reads the device): every call
/// on it waits until the returned device is closed, which aborts the connection.
fn mount_unanswered_fuse(at: &Path) -> std::fs::File {
    use std::os::fd::AsRawFd;
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .unwrap();
    let opts = std::ffi::CString::new(format!(
        "fd={},rootmode=40000,user_id=0,group_id=0",
        dev.as_raw_fd()
    ))
    .unwrap();
    let target = std::ffi::CString::new(at.to_str().unwrap()).unwrap();
    // SAFETY: plain C strings that outlive the call.
    let r = unsafe {
        libc::mount(
            c"unanswered".as_ptr(),
            target.as_ptr(),
            c"fuse".as_ptr(),
            0,
            opts.as_ptr().cast(),
        )
    };
    assert_eq!(r, 0, "mount: {}", std::io::Error::last_os_error());
    dev
}

#[test]
fn the_watchdog_is_fed_only_while_the_fuse_loop_answers() {
    let mut v = Volume::mounted();
    let dirs = |v: &Volume| -> Vec<PathBuf> {
        std::fs::read_dir(&v.backing)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_dir())
            .collect()
    };
    let before = dirs(&v);
    std::fs::create_dir(v.m("d")).unwrap();
    let backing_d = dirs(&v).into_iter().find(|p| !before.contains(p)).unwrap();
    v.unmount();
    // Under the backing directory of `d`, a filesystem that never answers: the one FUSE worker
    // that looks `d` up waits there, as a worker stuck on dead storage would.
    let dev = mount_unanswered_fuse(&backing_d);
    let svc = Service::start(&v, &["--threads", "1"], &[("WATCHDOG_USEC", "400000")]);
    let fed = svc.pings_within(Duration::from_millis(1200));
    assert!(fed >= 2, "{fed} pings in 1.2 s with WatchdogSec=0.4s");
    let mnt = v.mnt.clone();
    let stuck = std::thread::spawn(move || std::fs::metadata(mnt.join("d")).map(|_| ()));
    // One ping may have been under way; then none while the worker is stuck.
    svc.pings_within(Duration::from_millis(500));
    let starved = svc.pings_within(Duration::from_millis(1200));
    assert_eq!(starved, 0, "pinged while the FUSE loop could not answer");
    // Abort the unanswered filesystem: the worker is free, the pings come back.
    drop(dev);
    let _ = stuck.join().unwrap();
    let back = svc.pings_within(Duration::from_millis(1200));
    assert!(back >= 1, "no pings once the FUSE loop answers again");
    let target = std::ffi::CString::new(backing_d.to_str().unwrap()).unwrap();
    // SAFETY: a C string that outlives the call.
    unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    drop(svc);
}

/// How many `HH:MM:SS` times a log line carries.
fn timestamps(line: &str) -> usize {
    let b = line.as_bytes();
    let d = |i: usize| b.get(i).is_some_and(u8::is_ascii_digit);
    (0..b.len())
        .filter(|&i| {
            d(i) && d(i + 1)
                && b.get(i + 2) == Some(&b':')
                && d(i + 3)
                && d(i + 4)
                && b.get(i + 5) == Some(&b':')
                && d(i + 6)
                && d(i + 7)
        })
        .count()
}

#[test]
fn log_lines_carry_journald_priorities_under_systemd_and_one_timestamp_otherwise() {
    use std::os::unix::fs::MetadataExt;
    let v = Volume::new();
    // stderr is the journal's stream when JOURNAL_STREAM names its device and inode.
    std::fs::write(&v.log, b"").unwrap();
    let m = std::fs::metadata(&v.log).unwrap();
    let stream = format!("{}:{}", m.dev(), m.ino());
    drop(Service::start(&v, &[], &[("JOURNAL_STREAM", &stream)]));
    let journal = std::fs::read_to_string(&v.log).unwrap();
    eprintln!("as the journal gets it:\n{journal}");
    assert!(journal.lines().count() >= 2, "{journal}");
    for l in journal.lines() {
        assert!(
            l.len() > 3 && l.starts_with('<') && (b'0'..=b'7').contains(&l.as_bytes()[1]) && &l[2..3] == ">",
            "no priority: {l}"
        );
        assert_eq!(timestamps(l), 0, "the journal stamps lines itself: {l}");
    }
    assert!(
        journal
            .lines()
            .any(|l| l.starts_with("<6>") && l.contains("mounted at")),
        "{journal}"
    );

    // Not the journal (the variable inherited, the stream not): one timestamp per line.
    drop(Service::start(&v, &[], &[("JOURNAL_STREAM", "1:1")]));
    let file = std::fs::read_to_string(&v.log).unwrap();
    eprintln!("as a file gets it:\n{file}");
    for l in file.lines() {
        assert!(!l.starts_with('<'), "{l}");
        assert_eq!(timestamps(l), 1, "{l}");
    }
}

#[test]
fn the_unit_rates_4_5_or_better_without_hiding_the_mount() {
    let unit =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/kmsfs@.service")).unwrap();
    // Each of these gives the service its own mount namespace: the FUSE mount would be
    // invisible to the host.
    for key in [
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "PrivateMounts",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectProc",
        "ProcSubset",
        "RootDirectory",
        "ReadWritePaths",
        "ReadOnlyPaths",
        "InaccessiblePaths",
        "TemporaryFileSystem",
        "BindPaths",
        "PrivateUsers",
    ] {
        assert!(
            !unit
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{key}="))),
            "{key}= would hide the mount from the host"
        );
    }
    if !have("systemd-analyze") {
        assert!(std::env::var_os("CI").is_none(), "CI must have systemd-analyze");
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("kmsfs@media.service"), &unit).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args([
            "security",
            "--offline=yes",
            "--threshold=45",
            "kmsfs@media.service",
        ])
        .current_dir(d.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let overall = text
        .lines()
        .find(|l| l.contains("Overall exposure"))
        .unwrap_or("");
    eprintln!("{overall}");
    assert!(
        out.status.success(),
        "systemd-analyze security rates the unit above 4.5:\n{text}"
    );
}
