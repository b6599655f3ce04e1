//! The KMIP backend against a real KMIP server (PyKMIP, installed from PyPI by the harness)
//! with mutual TLS.

mod common;

use common::pykmip::Kmip;
use common::*;

const KEY: &str = "kmsfs-kek";

/// A volume on `kmip`'s key `KEY` (made Active now), its mount as the owner; `addrs` as given
/// to `--kms-addr`. Returns the volume and the key object's identifier.
fn volume_at(kmip: &Kmip, addrs: &str) -> (Volume, String) {
    let id = kmip.admin().create_active(KEY);
    let env = kmip.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let v = Volume::init_with(&["--kms", "kmip", "--kms-addr", addrs, "--kms-key", KEY], &env);
    (v, id)
}

/// Another volume on the key that exists already, with extra `kmsfs init` arguments.
fn another_volume(kmip: &Kmip, extra: &[&str]) -> Volume {
    let env = kmip.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut args = vec!["--kms", "kmip", "--kms-addr", &kmip.addr, "--kms-key", KEY];
    args.extend_from_slice(extra);
    Volume::init_with(&args, &env)
}

fn volume(kmip: &Kmip) -> (Volume, String) {
    volume_at(kmip, &kmip.addr)
}

/// A loopback address where nothing listens.
fn dead_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("127.0.0.1:{}", l.local_addr().unwrap().port())
}

#[test]
fn files_round_trip_over_kmip_and_a_swapped_header_fails_with_eio() {
    let kmip = Kmip::start();
    // The first server is down: the next one in the list serves.
    let (mut v, id) = volume_at(&kmip, &format!("{},{}", dead_addr(), kmip.addr));
    let cfg = std::fs::read_to_string(v.backing.join("kmsfs.json")).unwrap();
    assert!(
        cfg.contains("\"backend\": \"kmip\"") && cfg.contains(KEY),
        "{cfg}"
    );
    assert!(
        !cfg.contains("BEGIN"),
        "a certificate or key in the volume config"
    );
    // A header copied from one file onto another does not open: the AAD binds it.
    let header = round_trip_then_swap_a_header(&mut v);
    // The header names the key object that wrapped the DEK (wrapped-key layout v1).
    let named = |w: &[u8]| w[0] == 1 && w[1] as usize == id.len() && &w[2..] == id.as_bytes();
    assert!(header.windows(id.len() + 2).any(named));
    let status = v.run(&["status", v.mnt.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&status.stdout).contains("kmip"));
}

#[test]
fn a_file_copied_from_another_volume_on_the_same_key_does_not_open() {
    let kmip = Kmip::start();
    kmip.admin().create_active(KEY);
    let mut x = another_volume(&kmip, &["--plaintext-names"]);
    let mut y = another_volume(&kmip, &["--plaintext-names"]);
    x.mount(&[]);
    std::fs::write(x.m("f"), b"only in volume x").unwrap();
    x.unmount();
    // Same key, same file id, header and content intact: only the volume id differs, and the
    // associated data names it.
    std::fs::copy(x.backing.join("f"), y.backing.join("f")).unwrap();
    y.mount(&[]);
    assert_eq!(errno_of(&std::fs::read(y.m("f")).unwrap_err()), libc::EIO);
    y.unmount();
    assert!(
        y.log_text().contains("wrapped key did not unwrap"),
        "{}",
        y.log_text()
    );
}

#[test]
fn a_revoked_key_locks_the_mount_within_the_check_interval() {
    let kmip = Kmip::start();
    let (mut v, id) = volume(&kmip);
    v.mount_with_args(&["--check-interval", "1"]);
    std::fs::write(v.m("f"), b"data").unwrap();
    let t = std::time::Instant::now();
    kmip.admin().revoke(&id, true);
    assert!(v.wait_daemon_gone(10), "not locked after Revoke");
    eprintln!("kmip: key revoked -> daemon gone in {:?}", t.elapsed());
    let log = v.log_text();
    assert!(
        log.contains("the KMS denied access") && log.contains("Compromised"),
        "{log}"
    );
}

#[test]
fn a_destroyed_key_is_denied_at_mount() {
    let kmip = Kmip::start();
    let (mut v, id) = volume(&kmip);
    v.mount(&[]);
    std::fs::write(v.m("f"), b"data").unwrap();
    v.unmount();
    let admin = kmip.admin();
    admin.revoke(&id, false);
    admin.destroy(&id);
    let err = v.try_mount().unwrap_err();
    assert!(
        err.contains("the KMS refuses this volume's key") && err.contains("no KMIP key object"),
        "{err}"
    );
}

#[test]
fn a_client_certificate_of_another_identity_is_denied() {
    let kmip = Kmip::start();
    let (mut v, _) = volume(&kmip);
    v.env = kmip.env_as("intruder");
    let err = v.try_mount().unwrap_err();
    assert!(err.contains("the KMS refuses this volume's key"), "{err}");
    assert!(
        err.contains("not visible to this client certificate") || err.contains("no KMIP key object"),
        "{err}"
    );
}

#[test]
fn a_client_certificate_from_a_ca_the_server_does_not_know_is_denied() {
    let kmip = Kmip::start();
    let (mut v, _) = volume(&kmip);
    let d = kmip.dir.path();
    common::pykmip::make_ca(d, "rogue");
    common::pykmip::make_cert(
        d,
        "rogue",
        "rogue-client",
        common::pykmip::OWNER,
        common::pykmip::CLIENT_EXT,
    );
    v.env = kmip.env_as("rogue-client");
    let err = v.try_mount().unwrap_err();
    assert!(
        err.contains("the KMS refuses this volume's key") && err.contains("refused our client certificate"),
        "{err}"
    );
}

#[test]
fn a_header_may_name_only_an_object_of_the_configured_key() {
    use kmsfs::format::{FileId, VolumeId};
    use kmsfs::kms::{Binding, KeyProvider, KmsError};
    let kmip = Kmip::start();
    let admin = kmip.admin();
    admin.create_active(KEY);
    admin.create_active("some-other-key");
    let ours = kmip.client(KEY);
    let other = kmip.client("some-other-key");
    let b = Binding::file(VolumeId::generate(), FileId::generate());
    // Wrapped by another key this client may use, with the right binding: still refused.
    let (_, w) = other.rt.block_on(other.kms.generate(&b)).unwrap();
    let err = ours.rt.block_on(ours.kms.unwrap(&w, &b)).unwrap_err();
    assert!(
        matches!(&err, KmsError::Corrupt(m) if m.contains("which is not one of")),
        "{err:?}"
    );
    let (_, w) = ours.rt.block_on(ours.kms.generate(&b)).unwrap();
    assert!(ours.rt.block_on(ours.kms.unwrap(&w, &b)).is_ok());
}

#[test]
fn a_wrong_ca_is_a_one_line_error() {
    let kmip = Kmip::start();
    let other = tempfile::tempdir().unwrap();
    common::pykmip::make_ca(other.path(), "other");
    let d = tempfile::tempdir().unwrap();
    kmip.admin().create_active(KEY);
    let mut env = kmip.env();
    env[0].1 = other.path().join("other-ca.crt").display().to_string();
    let out = kmsfs()
        .args(["init", d.path().join("v").to_str().unwrap(), "--kms", "kmip"])
        .args(["--kms-addr", &kmip.addr, "--kms-key", KEY])
        .envs(env)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("TLS certificate is not trusted") && err.contains("KMSFS_KMIP_CA"),
        "{err}"
    );
}

#[test]
fn with_the_server_down_uncached_opens_fail_and_cached_files_keep_working() {
    let mut kmip = Kmip::start();
    let (mut v, _) = volume(&kmip);
    v.mount(&[]);
    std::fs::write(v.m("cached"), b"in the key cache").unwrap();
    std::fs::write(v.m("cold"), b"needs the KMS").unwrap();
    v.remount();
    assert_eq!(std::fs::read(v.m("cached")).unwrap(), b"in the key cache");
    kmip.kill();
    assert_eq!(std::fs::read(v.m("cached")).unwrap(), b"in the key cache");
    let err = std::fs::read(v.m("cold")).unwrap_err();
    assert_eq!(errno_of(&err), libc::EIO);
    v.unmount();
    assert!(v.log_text().contains("KMS unreachable"), "{}", v.log_text());
}

#[test]
fn rotation_is_a_new_key_object_then_rewrap_then_the_old_one_retires() {
    let kmip = Kmip::start();
    let (mut v, old) = volume(&kmip);
    v.mount(&[]);
    for i in 0..10 {
        std::fs::write(v.m(&format!("f{i}")), format!("file {i}")).unwrap();
    }
    v.unmount();
    // PyKMIP has no ReKey: a new object of the same name, made Active, is the new version.
    let admin = kmip.admin();
    let new = admin.create_active(KEY);
    assert_ne!(new, old);
    let out = v.run(&["rewrap", v.backing.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("re-wrapped 10 of 10 files to version 2"), "{text}");
    assert!(text.contains("name key re-wrapped"), "{text}");
    // Only now the old object retires; every file still opens.
    admin.revoke(&old, false);
    v.mount(&[]);
    for i in 0..10 {
        assert_eq!(
            std::fs::read_to_string(v.m(&format!("f{i}"))).unwrap(),
            format!("file {i}")
        );
    }
}

/// Measured, not only checked: how many unwraps go in one message, and what one costs.
#[test]
fn unwraps_go_as_batch_items_of_one_message() {
    use kmsfs::format::{FileId, VolumeId};
    use kmsfs::kms::{Binding, KeyProvider, KmsError};
    let kmip = Kmip::start();
    kmip.admin().create_active(KEY);
    let c = kmip.client(KEY);
    let volume = VolumeId::generate();
    let bindings: Vec<Binding> = (0..200)
        .map(|_| Binding::file(volume, FileId::generate()))
        .collect();
    let made: Vec<_> =
        c.rt.block_on(c.kms.generate_many(&bindings))
            .into_iter()
            .map(Result::unwrap)
            .collect();
    let mut items: Vec<_> = made
        .iter()
        .zip(&bindings)
        .map(|((_, w), b)| (w.clone(), *b))
        .collect();
    // One item bound to another file: it alone fails, the rest of its batch is answered.
    items[70].1 = Binding::file(volume, FileId::generate());
    let before = c.kms.request_count();
    let t = std::time::Instant::now();
    let got = c.rt.block_on(c.kms.unwrap_many(&items));
    let took = t.elapsed();
    let messages = c.kms.request_count() - before;
    for (i, (r, (dek, _))) in got.iter().zip(&made).enumerate() {
        match r {
            Ok(k) => assert!(i != 70 && k.expose() == dek.expose(), "item {i}"),
            Err(e) => assert!(i == 70 && matches!(e, KmsError::Corrupt(_)), "item {i}: {e:?}"),
        }
    }
    assert_eq!(messages, 4, "200 unwraps in messages of 64 items");
    let t = std::time::Instant::now();
    for (w, b) in items.iter().take(20) {
        c.rt.block_on(c.kms.unwrap_many(std::slice::from_ref(&(w.clone(), *b))))[0]
            .as_ref()
            .unwrap();
    }
    let one = t.elapsed() / 20;
    eprintln!(
        "kmip: 200 unwraps in {messages} messages, {took:?} ({:?} per unwrap); one unwrap alone: {one:?}",
        took / 200
    );
}
