//! The storage is hostile: whoever can write the backing directory must not be able to choose
//! the volume's KMS or key, switch name encryption off, or change any field of the volume
//! config unseen. Each test is an attack that worked before the mount side kept its own record
//! of the volume (the anchor) and the config carried a MAC.

mod common;
use common::*;
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;

fn config(v: &Volume) -> Value {
    serde_json::from_slice(&std::fs::read(v.backing.join("kmsfs.json")).unwrap()).unwrap()
}

fn write_config(v: &Volume, c: &Value) {
    std::fs::write(
        v.backing.join("kmsfs.json"),
        serde_json::to_vec_pretty(c).unwrap(),
    )
    .unwrap();
}

/// This volume's anchor file among those the tests write (`.cargo/config.toml`).
fn anchor_of(v: &Volume) -> std::path::PathBuf {
    let anchors = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-anchors");
    let id = config(v)["volume_id"].as_str().unwrap().to_owned();
    let canonical = std::fs::canonicalize(&v.backing).unwrap();
    let mine: Vec<_> = std::fs::read_dir(&anchors)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            std::fs::read_to_string(p)
                .is_ok_and(|t| t.contains(&id) && t.contains(canonical.to_str().unwrap()))
        })
        .collect();
    assert_eq!(mine.len(), 1, "{mine:?}");
    mine.into_iter().next().unwrap()
}

fn one_line(s: &str) -> String {
    s.lines().collect::<Vec<_>>().join(" ")
}

/// Every command that trusts the config refuses it, with one line saying it is not trusted.
fn refused_everywhere(v: &Volume, expect: &str) {
    refused(v, expect, true)
}

/// As [`refused_everywhere`]; `key_too`: also `kmsfs key --volume`, which reads only where
/// the keystore is, and that from the anchor (so a change the anchor cannot see, caught by
/// the MAC alone, does not concern it).
fn refused(v: &Volume, expect: &str, key_too: bool) {
    let b = v.backing.to_str().unwrap();
    let err = v.mount_err(&[]);
    assert!(one_line(&err).contains(expect), "mount: {err}");
    let mut commands = vec![vec!["fsck", b], vec!["rewrap", b]];
    if key_too {
        commands.push(vec!["key", "disable", "default", "--volume", b]);
    }
    for args in commands {
        let out = kmsfs().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted the config");
        assert!(one_line(&err).contains(expect), "{args:?}: {err}");
    }
}

#[test]
fn a_config_pointing_at_a_planted_keystore_sends_no_key_there() {
    let mut v = Volume::mounted();
    std::fs::write(v.m("before"), b"x").unwrap();
    v.unmount();
    // The attacker's own keystore, outside the backing directory this time (a symlink to it
    // from inside was the first version of this attack), owned by root, mode 0600.
    let decoy = v.dir.path().join("decoy.keystore");
    run_ok(&["key", "create", "default", "--keystore", decoy.to_str().unwrap()]);
    let mut c = config(&v);
    c["kms"]["keystore"] = decoy.to_str().unwrap().into();
    write_config(&v, &c);
    refused_everywhere(&v, "not trusted");
    let ks = std::fs::read_to_string(&decoy).unwrap();
    assert!(
        !ks.contains("\"enabled\": false"),
        "key disable touched the decoy"
    );
}

#[test]
fn a_config_naming_another_kms_backend_is_refused() {
    let v = Volume::new();
    let mut c = config(&v);
    c["kms"] = serde_json::json!({"backend": "openbao", "addrs": ["http://127.0.0.1:1"],
                                  "mount": "transit", "key": "k"});
    write_config(&v, &c);
    refused_everywhere(&v, "not trusted");
}

#[test]
fn names_cannot_be_switched_to_plaintext() {
    let mut v = Volume::mounted();
    std::fs::write(v.m("secret-name.jpg"), b"x").unwrap();
    v.unmount();
    let mut c = config(&v);
    c["names"] = serde_json::json!({"mode": "plaintext"});
    write_config(&v, &c);
    refused_everywhere(&v, "not trusted");
}

#[test]
fn any_other_change_fails_the_config_mac() {
    let v = Volume::new();
    let mut c = config(&v);
    // A field the anchor does not record: only the MAC catches it.
    c["names"]["root_dir_id"] = "00112233445566778899aabbccddeeff".into();
    write_config(&v, &c);
    refused(&v, "fails its authentication", false);
}

#[test]
fn a_config_without_its_mac_cannot_pass_for_an_old_volume() {
    let v = Volume::new();
    let mut c = config(&v);
    let o = c.as_object_mut().unwrap();
    o.remove("mac");
    o.remove("volume_key");
    write_config(&v, &c);
    refused_everywhere(&v, "not trusted");
    // Relabelled as format 1 too (which may lack a MAC): the anchor still expects one.
    c["format_version"] = 1.into();
    write_config(&v, &c);
    refused_everywhere(&v, "not trusted");
}

#[test]
fn a_volume_this_machine_has_no_record_of_does_not_mount_until_anchored() {
    let mut v = Volume::new();
    // As on a machine that never saw the volume.
    std::fs::remove_file(anchor_of(&v)).unwrap();
    let err = v.mount_err(&[]);
    assert!(one_line(&err).contains("kmsfs anchor"), "{err}");
    // Nothing is recorded without the admin's word: no terminal here, so `--yes`.
    let err = run_err(&["anchor", v.backing.to_str().unwrap()]);
    assert!(one_line(&err).contains("run again with --yes"), "{err}");
    assert!(v.mount_err(&[]).contains("kmsfs anchor"));
    let out = run_ok(&["anchor", v.backing.to_str().unwrap(), "--yes"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("local keystore"));
    v.mount(&[]);
    std::fs::write(v.m("f"), b"ok").unwrap();
    v.unmount();
    // Recording again is an explicit act.
    let err = run_err(&["anchor", v.backing.to_str().unwrap(), "--yes"]);
    assert!(one_line(&err).contains("--replace"), "{err}");
}

#[test]
fn a_writable_anchor_is_refused() {
    let v = Volume::new();
    let mine = anchor_of(&v);
    std::fs::set_permissions(&mine, std::fs::Permissions::from_mode(0o666)).unwrap();
    let err = v.mount_err(&[]);
    assert!(one_line(&err).contains("no one else can write"), "{err}");
}

#[test]
fn an_anchor_in_a_directory_others_may_write_is_refused() {
    let mut v = Volume::new();
    let dir = v.dir.path().join("anchors");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o775)).unwrap();
    let elsewhere = dir.join("media.anchor");
    std::fs::rename(anchor_of(&v), &elsewhere).unwrap();
    let args = ["--anchor", elsewhere.to_str().unwrap()];
    let mut mount = v.mount_args(&[]);
    mount.extend(args.iter().map(|s| s.to_string()));
    let mount: Vec<&str> = mount.iter().map(String::as_str).collect();
    let err = run_err(&mount);
    assert!(one_line(&err).contains("chmod go-w"), "{err}");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    v.mount_full(&[], &args, &[]);
    v.unmount();
}

#[test]
fn rewrap_keeps_the_config_authenticated() {
    let mut v = Volume::mounted();
    std::fs::write(v.m("f"), b"data").unwrap();
    v.unmount();
    run_ok(&[
        "key",
        "rotate",
        "default",
        "--keystore",
        v.keystore.to_str().unwrap(),
    ]);
    let before = config(&v);
    run_ok(&["rewrap", v.backing.to_str().unwrap()]);
    let after = config(&v);
    assert_ne!(before["volume_key"], after["volume_key"], "volume key re-wrapped");
    assert_ne!(before["mac"], after["mac"]);
    v.mount(&[]);
    assert_eq!(std::fs::read(v.m("f")).unwrap(), b"data");
}

#[test]
fn an_anchor_kept_elsewhere_is_named_with_anchor() {
    let mut v = Volume::new();
    let elsewhere = v.dir.path().join("media.anchor");
    std::fs::rename(anchor_of(&v), &elsewhere).unwrap();
    let err = v.mount_err(&[]);
    assert!(one_line(&err).contains("kmsfs anchor"), "{err}");
    // `--anchor FILE` on the command line, `anchor=FILE` in fstab (tests/systemd.rs covers
    // the helper's translation: src/mount_helper.rs).
    v.mount_full(&[], &["--anchor", elsewhere.to_str().unwrap()], &[]);
    std::fs::write(v.m("f"), b"ok").unwrap();
    v.unmount();
}
