//! The AWS KMS backend against moto's server (the AWS KMS wire protocol), started by the test
//! with SigV4 signature checking on: a signing bug fails every test here.

mod common;

use common::moto::{ALIAS, AccessKey, Moto};
use common::*;

/// A volume on `moto`'s `alias/kmsfs` whose mount signs as `key`.
fn volume(moto: &Moto, key: &AccessKey) -> Volume {
    let env = moto.env(key);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Volume::init_with(&["--kms", "aws-kms", "--kms-key", ALIAS], &env)
}

#[test]
fn files_round_trip_over_aws_kms_and_a_moved_header_does_not_open() {
    let moto = Moto::start();
    let mut v = volume(&moto, &moto.mount);
    let cfg = std::fs::read_to_string(v.backing.join("kmsfs.json")).unwrap();
    assert!(!cfg.contains(&moto.mount.secret), "a secret in the volume config");
    assert!(
        cfg.contains(r#""backend": "aws-kms""#) && cfg.contains(ALIAS),
        "{cfg}"
    );
    v.mount(&[]);
    // Status names the key by its ARN.
    let status = v.run(&["status", v.mnt.to_str().unwrap()]);
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains(&moto.key_arn) && status.contains("aws-kms"),
        "{status}"
    );
    check_round_trip_across_remount(&mut v);
    // A header copied from one file onto another does not open.
    check_moved_header_fails_with_eio(&mut v);
}

#[test]
fn a_wrong_secret_is_refused_because_signatures_are_checked() {
    let moto = Moto::start();
    let forged = AccessKey {
        id: moto.mount.id.clone(),
        secret: format!("{}x", moto.mount.secret),
    };
    let d = tempfile::tempdir().unwrap();
    let out = kmsfs()
        .args([
            "init",
            d.path().join("v").to_str().unwrap(),
            "--kms",
            "aws-kms",
            "--kms-key",
            ALIAS,
        ])
        .envs(moto.env(&forged))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("KMS refuses") && err.contains("SignatureDoesNotMatch"),
        "{err}"
    );
}

#[test]
fn rewrap_after_rotation_re_encrypts_every_header_on_the_server() {
    let moto = Moto::start();
    let mut v = volume(&moto, &moto.mount);
    v.mount(&[]);
    for i in 0..20 {
        std::fs::write(v.m(&format!("f{i}")), format!("file {i}")).unwrap();
    }
    v.unmount();
    let before: Vec<Vec<u8>> = v
        .backing_files()
        .iter()
        .map(|f| std::fs::read(f).unwrap())
        .collect();
    moto.admin(&format!("kms.rotate_key_on_demand(KeyId='{}')", moto.key_arn));
    let out = v.run(&["rewrap", v.backing.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("re-wrapped 20 of 20 files"), "{text}");
    assert!(text.contains("name key re-wrapped"), "{text}");
    let after: Vec<Vec<u8>> = v
        .backing_files()
        .iter()
        .map(|f| std::fs::read(f).unwrap())
        .collect();
    assert_eq!(before.len(), after.len());
    assert!(
        before.iter().zip(&after).all(|(b, a)| b != a),
        "every header has a new wrap"
    );
    v.mount(&[]);
    for i in 0..20 {
        assert_eq!(
            std::fs::read_to_string(v.m(&format!("f{i}"))).unwrap(),
            format!("file {i}")
        );
    }
}

#[test]
fn a_dead_server_fails_uncached_opens_and_cached_files_keep_working() {
    let mut moto = Moto::start();
    let mut v = volume(&moto, &moto.mount);
    v.mount(&[]);
    std::fs::write(v.m("cached"), b"in the cache").unwrap();
    std::fs::write(v.m("cold"), b"not in the cache").unwrap();
    v.remount_with(&["--grace", "300"]);
    assert_eq!(std::fs::read(v.m("cached")).unwrap(), b"in the cache");
    moto.kill();
    assert_eq!(std::fs::read(v.m("cached")).unwrap(), b"in the cache");
    let err = std::fs::read(v.m("cold")).unwrap_err();
    assert_eq!(errno_of(&err), libc::EIO);
    assert!(
        v.is_mounted(),
        "an unreachable KMS does not lock the mount within its grace"
    );
    v.unmount();
    let log = v.log_text();
    assert!(log.contains("KMS unreachable"), "{log}");
}

#[test]
fn a_deleted_access_key_locks_the_mount() {
    let moto = Moto::start();
    let mut v = volume(&moto, &moto.mount);
    v.mount(&[]);
    std::fs::write(v.m("f"), b"data").unwrap();
    v.remount(); // so the next open needs the KMS
    moto.admin(&format!(
        "iam.delete_access_key(UserName='kmsfs', AccessKeyId='{}')",
        moto.mount.id
    ));
    let err = std::fs::read(v.m("f")).unwrap_err();
    assert_eq!(errno_of(&err), libc::EACCES);
    assert!(v.wait_daemon_gone(10), "a denied unwrap locks the mount");
    assert!(v.log_text().contains("InvalidClientTokenId"), "{}", v.log_text());
}

#[test]
fn a_disabled_key_locks_the_mount_at_the_next_check() {
    let moto = Moto::start();
    let mut v = volume(&moto, &moto.mount);
    v.mount_with_args(&["--check-interval", "1"]);
    std::fs::write(v.m("f"), b"data").unwrap();
    // By key id: moto 5.2.5's DisableKey fails with a 500 when given the ARN.
    let key_id = moto.key_arn.rsplit('/').next().unwrap();
    moto.admin(&format!("kms.disable_key(KeyId='{key_id}')"));
    assert!(
        v.wait_daemon_gone(15),
        "the watcher locks a mount whose key is disabled"
    );
    let log = v.log_text();
    assert!(
        log.contains(&format!("key {} is Disabled", moto.key_arn)),
        "{log}"
    );
}

/// The web identity link of the credential chain against moto's STS: the mount exchanges its
/// token file for temporary credentials and signs with them (session token included).
#[test]
fn web_identity_credentials_come_from_sts() {
    let moto = Moto::start_with(false);
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "eyJhbGciOiJSUzI1NiJ9.e30.sig").unwrap();
    let env = [
        ("AWS_ENDPOINT_URL", moto.url.as_str()),
        ("AWS_REGION", common::moto::REGION),
        ("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/kmsfs"),
        ("AWS_WEB_IDENTITY_TOKEN_FILE", token.to_str().unwrap()),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ];
    let mut v = Volume::init_with(&["--kms", "aws-kms", "--kms-key", ALIAS], &env);
    v.mount(&[]);
    std::fs::write(v.m("f"), b"via web identity").unwrap();
    v.remount();
    assert_eq!(std::fs::read(v.m("f")).unwrap(), b"via web identity");
    v.unmount();
    let log = v.log_text();
    assert!(
        log.contains("AWS credentials: web identity for arn:aws:iam::123456789012:role/kmsfs"),
        "{log}"
    );
    assert!(moto.log().contains("POST / HTTP/1.1\" 200"), "moto answered");
}
