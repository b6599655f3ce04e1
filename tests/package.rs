//! The Debian package: scripts/build-deb on this build, installed with dpkg into the real
//! system (tests run as root on throwaway machines and in CI), a volume made with
//! /usr/bin/kmsfs and mounted from an fstab line through /sbin's helper, then removed again.

mod common;

use common::sbin_helpers_lock;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs a command to success; returns its output.
fn ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The installed package, and a mount made through it: Drop detaches the mount and removes
/// the package, also when the test fails half-way.
struct Installed {
    mnt: PathBuf,
    _helpers: std::fs::File,
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).output();
        // Purged, not only removed: no conffile or dpkg record outlives the test.
        let _ = Command::new("dpkg").args(["-P", "kmsfs"]).output();
    }
}

#[test]
fn the_deb_installs_mounts_from_an_fstab_line_and_removes() {
    let root = rustix::process::geteuid().is_root();
    if !root || !have("dpkg-deb") {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run this test as root with dpkg"
        );
        eprintln!("skipped: needs root and dpkg");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    // A copy of this build, so a cargo build that replaces target/debug/kmsfs meanwhile (or a
    // test running it) cannot change what gets packaged; the .deb goes to our own directory.
    let bin = d.path().join("kmsfs");
    std::fs::copy(env!("CARGO_BIN_EXE_kmsfs"), &bin).unwrap();
    let out = ok(
        Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/build-deb"))
            .arg(&bin)
            .arg(d.path()),
    );
    let deb = PathBuf::from(String::from_utf8_lossy(&out.stdout).lines().last().unwrap());
    assert!(deb.starts_with(d.path()), "{}", deb.display());

    let control = String::from_utf8(ok(Command::new("dpkg-deb").arg("-f").arg(&deb)).stdout).unwrap();
    let arch = String::from_utf8(ok(Command::new("dpkg").arg("--print-architecture")).stdout).unwrap();
    for field in [
        "Package: kmsfs".to_string(),
        format!("Version: {}", env!("CARGO_PKG_VERSION")),
        format!("Architecture: {}", arch.trim()),
        "Depends: fuse3".into(),
        format!("License: {}", env!("CARGO_PKG_LICENSE")),
        "Maintainer: ".into(),
        format!("Description: {}", env!("CARGO_PKG_DESCRIPTION")),
    ] {
        assert!(control.contains(&field), "no {field:?} in:\n{control}");
    }

    let mnt = d.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let _installed = Installed {
        mnt: mnt.clone(),
        _helpers: sbin_helpers_lock(),
    };
    ok(Command::new("dpkg").arg("-i").arg(&deb));
    let listed = String::from_utf8(ok(Command::new("dpkg").args(["-L", "kmsfs"])).stdout).unwrap();
    for path in [
        "/usr/bin/kmsfs",
        "/sbin/mount.kmsfs",
        "/sbin/mount.fuse.kmsfs",
        "/usr/lib/systemd/system/kmsfs@.service",
        "/usr/share/man/man1/kmsfs.1.gz",
        "/usr/share/man/man1/kmsfs-mount.1.gz",
        "/usr/share/bash-completion/completions/kmsfs",
        "/usr/share/zsh/vendor-completions/_kmsfs",
        "/usr/share/fish/vendor_completions.d/kmsfs.fish",
        "/etc/logrotate.d/kmsfs",
        "/usr/share/doc/kmsfs/copyright",
    ] {
        assert!(
            listed.lines().any(|l| l == path),
            "dpkg -L lacks {path}:\n{listed}"
        );
        assert!(Path::new(path).exists(), "{path} is listed but not installed");
    }
    let unit = std::fs::read_to_string("/usr/lib/systemd/system/kmsfs@.service").unwrap();
    assert!(
        unit.contains("ExecStart=/usr/bin/kmsfs mount ") && !unit.contains("/usr/local"),
        "{unit}"
    );
    assert_eq!(
        std::fs::read_link("/sbin/mount.fuse.kmsfs").unwrap(),
        Path::new("/usr/bin/kmsfs")
    );

    // A volume made by the installed binary, mounted as the boot would: an fstab line.
    let backing = d.path().join("vol");
    ok(Command::new("/usr/bin/kmsfs").arg("init").arg(&backing));
    let fstab = d.path().join("fstab");
    let log = d.path().join("mount.log");
    std::fs::write(
        &fstab,
        format!(
            "{} {} fuse.kmsfs defaults,_netdev,nofail,log={} 0 0\n",
            backing.display(),
            mnt.display(),
            log.display()
        ),
    )
    .unwrap();
    ok(Command::new("mount").arg("-T").arg(&fstab).arg(&mnt));
    std::fs::write(mnt.join("f"), b"through the package").unwrap();
    assert_eq!(std::fs::read(mnt.join("f")).unwrap(), b"through the package");
    let findmnt = ok(Command::new("findmnt").args(["-n", "-o", "FSTYPE"]).arg(&mnt));
    assert_eq!(String::from_utf8_lossy(&findmnt.stdout).trim(), "fuse.kmsfs");
    ok(Command::new("/usr/bin/kmsfs").arg("unmount").arg(&mnt));
    // What was written is in the backing directory, encrypted: no plaintext anywhere in it.
    let mut found = Vec::new();
    for e in std::fs::read_dir(&backing).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            found.extend(std::fs::read(p).unwrap());
        }
    }
    assert!(!found.windows(19).any(|w| w == b"through the package"));

    ok(Command::new("dpkg").args(["-r", "kmsfs"]));
    assert!(!Path::new("/usr/bin/kmsfs").exists());
    assert!(std::fs::symlink_metadata("/sbin/mount.fuse.kmsfs").is_err());
    // The admin's files stay until a purge.
    assert!(Path::new("/etc/logrotate.d/kmsfs").exists());
    ok(Command::new("dpkg").args(["-P", "kmsfs"]));
    assert!(!Path::new("/etc/logrotate.d/kmsfs").exists());
}
