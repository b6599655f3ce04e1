//! `kmsfs status` with no mountpoint lists every mount. One daemon that is stopping or wedged
//! must neither hang the listing nor hide the others. Its own test binary: it freezes a
//! daemon, and every other listing running meanwhile would see it.

mod common;

use common::*;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Resumes a frozen daemon however the test ends.
struct Frozen(i32);

impl Frozen {
    fn new(pid: u32) -> Frozen {
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
        Frozen(pid as i32)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// Runs `kmsfs status`, failing the test (not hanging it) if it takes over 30 s.
fn status_within_30s(during: impl FnOnce()) -> Output {
    let mut child = kmsfs()
        .arg("status")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    during();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kmsfs status hung on a frozen daemon");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_frozen_daemon_is_named_and_a_vanishing_one_skipped_while_the_others_are_listed() {
    let mut a = Volume::mounted();
    let mut b = Volume::mounted();
    // Paths resolved before the freeze: a stat of b's root would wait on the frozen daemon.
    let (ma, mb) = (a.mnt.canonicalize().unwrap(), b.mnt.canonicalize().unwrap());
    let (ma, mb) = (ma.to_str().unwrap(), mb.to_str().unwrap());
    let frozen = Frozen::new(b.daemon_pid());

    // Frozen but mounted: a's state is printed, b is named, the command fails.
    let out = status_within_30s(|| {});
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    eprintln!("{stdout}\n{stderr}");
    assert!(!out.status.success());
    assert!(stdout.lines().any(|l| l == ma), "{stdout}");
    assert!(stdout.contains("keys cached"), "{stdout}");
    assert!(
        stderr.contains(mb) && stderr.contains("did not answer"),
        "{stderr}"
    );
    let entry = stdout.split(&format!("{mb}\n")).nth(1).unwrap_or_default();
    assert!(
        entry.starts_with("  state       the daemon did not answer within 5 s"),
        "{stdout}"
    );

    // Unmounted while the listing waits on it (it waits up to 5 s on the frozen daemon; the
    // unmount comes after 0.5 s): a mount that went away is no failure.
    let out = status_within_30s(|| {
        std::thread::sleep(Duration::from_millis(500));
        let st = Command::new("umount").args(["-l", mb]).status().unwrap();
        assert!(st.success());
    });
    // (Not the exit status: a dead mount elsewhere on the machine would rightly fail it.)
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(stdout.lines().any(|l| l == ma), "{stdout}");
    assert!(!stdout.contains(mb) && !stderr.contains(mb), "{stdout}{stderr}");

    drop(frozen);
    assert!(b.wait_daemon_gone(10), "the detached daemon did not exit");
    a.unmount();
}
