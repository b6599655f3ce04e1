//! Set-user-id and set-group-id bits through the mount: a change of content by a caller
//! without CAP_FSETID clears them, as on a local filesystem, now that the daemon does it
//! rather than the kernel (FUSE_HANDLE_KILLPRIV_V2). Each case runs a real program as an
//! unprivileged user (or as root, who keeps the bits) against a real mount.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const NOBODY: u32 = 65534;

/// A mount other users can reach.
fn shared_volume() -> Volume {
    let mut v = Volume::new();
    std::fs::set_permissions(v.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    v.mount(&["allow_other"]);
    std::fs::set_permissions(&v.mnt, std::fs::Permissions::from_mode(0o777)).unwrap();
    v
}

/// A file holding "x", owned by `uid`, with `mode` (set after the chown, which clears bits).
fn file(v: &Volume, name: &str, uid: u32, mode: u32) -> PathBuf {
    let p = v.m(name);
    std::fs::write(&p, b"x").unwrap();
    std::os::unix::fs::chown(&p, Some(uid), Some(uid)).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    assert_eq!(mode_of(&p), mode);
    p
}

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Runs `sh -c script` as `uid` (and its group), with `$1` the file.
fn run_as(uid: u32, script: &str, f: &Path) {
    let mut sh = Command::new("sh");
    sh.args(["-c", script, "sh", f.to_str().unwrap()])
        .current_dir("/");
    if uid != 0 {
        sh.uid(uid).gid(uid);
    }
    let out = sh.output().unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_write_by_an_unprivileged_caller_clears_set_id_bits() {
    let mut v = shared_volume();
    let both = file(&v, "both", NOBODY, 0o6775);
    run_as(NOBODY, "printf y >> \"$1\"", &both);
    assert_eq!(
        mode_of(&both),
        0o775,
        "set-user-id and set-group-id (with group execute)"
    );
    assert_eq!(std::fs::read(&both).unwrap(), b"xy");

    // Without group execute, set-group-id marks mandatory locking and stays.
    let lock = file(&v, "lock", NOBODY, 0o2666);
    run_as(NOBODY, "printf y >> \"$1\"", &lock);
    assert_eq!(mode_of(&lock), 0o2666);

    // Root holds CAP_FSETID and keeps them.
    let root = file(&v, "root", 0, 0o6777);
    run_as(0, "printf y >> \"$1\"", &root);
    assert_eq!(mode_of(&root), 0o6777);
    v.unmount();
}

#[test]
fn a_truncate_or_allocation_by_an_unprivileged_caller_clears_set_id_bits() {
    let mut v = shared_volume();
    let cut = file(&v, "cut", NOBODY, 0o6775);
    run_as(NOBODY, "truncate -s 0 \"$1\"", &cut);
    assert_eq!(mode_of(&cut), 0o775, "truncate(2)");
    assert_eq!(std::fs::metadata(&cut).unwrap().len(), 0);

    let otrunc = file(&v, "otrunc", NOBODY, 0o4755);
    run_as(NOBODY, ": > \"$1\"", &otrunc);
    assert_eq!(mode_of(&otrunc), 0o755, "open with O_TRUNC");

    let grown = file(&v, "grown", NOBODY, 0o6775);
    run_as(NOBODY, "fallocate -l 65536 \"$1\"", &grown);
    assert_eq!(mode_of(&grown), 0o775, "fallocate(2)");
    assert_eq!(std::fs::metadata(&grown).unwrap().len(), 65536);

    // Root keeps them.
    let root = file(&v, "root", 0, 0o6777);
    run_as(0, "truncate -s 0 \"$1\"", &root);
    assert_eq!(mode_of(&root), 0o6777);

    // Root in a user namespace of its own lists every capability in /proc but holds none over
    // the mount's files (the kernel checks CAP_FSETID in the initial namespace).
    let userns = file(&v, "userns", NOBODY, 0o6777);
    run_as(0, "unshare -Ur truncate -s 0 \"$1\"", &userns);
    assert_eq!(mode_of(&userns), 0o777, "root of another user namespace");
    v.unmount();
}

#[test]
fn a_chown_clears_set_id_bits() {
    // The kernel no longer sends the mode with a chown: the backing filesystem clears the
    // bits when the daemon changes the owner or group.
    let mut v = shared_volume();
    let f = file(&v, "f", 0, 0o6755);
    std::os::unix::fs::chown(&f, Some(NOBODY), Some(NOBODY)).unwrap();
    assert_eq!(mode_of(&f), 0o755);

    // chown(f, -1, -1) too, as on a local filesystem: it reaches the daemon as a SETATTR that
    // sets nothing.
    let same = file(&v, "same", NOBODY, 0o6775);
    let script = "python3 -c 'import os, sys; os.chown(sys.argv[1], -1, -1)' \"$1\"";
    run_as(NOBODY, script, &same);
    assert_eq!(mode_of(&same), 0o775, "chown(f, -1, -1)");
    v.unmount();
}
