//! systemd and mount(8) integration: unit verification, the notify protocol, the mount helper.

mod common;

use common::*;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
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
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&instance)
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

/// Installs the mount(8) helper for fuse.kmsfs, pointing at this build.
fn install_helper() {
    let link = Path::new("/sbin/mount.fuse.kmsfs");
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_kmsfs"), link).unwrap();
}

#[test]
fn mount_t_fuse_kmsfs_and_mount_a_with_an_fstab() {
    install_helper();
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
