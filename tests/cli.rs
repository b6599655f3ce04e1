//! The command line: clear one-line errors for each way a mount can be set up wrong.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;

fn one_line(err: &str) -> &str {
    let err = err.trim_end();
    assert_eq!(err.lines().count(), 1, "expected one line, got: {err}");
    err
}

#[test]
fn a_second_daemon_on_the_same_backing_is_refused() {
    let v = Volume::mounted();
    let other = v.dir.path().join("mnt2");
    std::fs::create_dir(&other).unwrap();
    let err = run_err(&["mount", v.backing.to_str().unwrap(), other.to_str().unwrap()]);
    assert!(
        one_line(&err).contains("already mounted by another kmsfs daemon"),
        "{err}"
    );
}

#[test]
fn mounting_over_a_busy_or_missing_mountpoint_is_refused() {
    let v = Volume::mounted();
    let err = run_err(&["mount", v.backing.to_str().unwrap(), v.mnt.to_str().unwrap()]);
    assert!(one_line(&err).contains("busy"), "{err}");
    let fresh = Volume::new();
    let missing = fresh.dir.path().join("nope");
    let err = run_err(&[
        "mount",
        fresh.backing.to_str().unwrap(),
        missing.to_str().unwrap(),
    ]);
    assert!(one_line(&err).contains("does not exist"), "{err}");
}

#[test]
fn an_uninitialised_backing_directory_says_to_run_init() {
    let d = tempfile::tempdir().unwrap();
    let mnt = d.path().join("m");
    std::fs::create_dir(&mnt).unwrap();
    let err = run_err(&["mount", d.path().to_str().unwrap(), mnt.to_str().unwrap()]);
    assert!(one_line(&err).contains("kmsfs init"), "{err}");
}

#[test]
fn a_keystore_others_can_read_is_refused_with_the_fix() {
    let v = Volume::new();
    std::fs::set_permissions(&v.keystore, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = v.mount_err(&[]);
    assert!(one_line(&err).contains("chmod 600"), "{err}");
}

#[test]
fn a_missing_keystore_is_a_clear_error() {
    let v = Volume::new();
    std::fs::rename(&v.keystore, v.dir.path().join("moved")).unwrap();
    let err = v.mount_err(&[]);
    assert!(one_line(&err).contains("not found"), "{err}");
}

#[test]
fn a_disabled_key_refuses_the_mount() {
    let v = Volume::new();
    v.key("disable");
    let err = v.mount_err(&[]);
    assert!(one_line(&err).contains("disabled"), "{err}");
}

#[test]
fn a_wrong_keystore_is_refused_at_mount() {
    let mut v = Volume::mounted();
    std::fs::write(v.m("f"), b"data").unwrap();
    v.unmount();
    // Replace the keystore with a new one that has a key of the same name: the volume name
    // key does not unwrap, so the mount is refused before any file is touched.
    std::fs::remove_file(&v.keystore).unwrap();
    run_ok(&[
        "key",
        "create",
        "default",
        "--keystore",
        v.keystore.to_str().unwrap(),
    ]);
    let err = v.mount_err(&[]);
    assert!(one_line(&err).contains("is this the volume's keystore?"), "{err}");
}

#[test]
fn a_wrong_keystore_fails_opens_not_with_garbage() {
    // With plaintext names too, the volume key (the config's MAC key) is unwrapped at mount: a
    // wrong keystore is refused there. One swapped in while mounted fails the next cold open.
    let mut v = Volume::init_with(&["--plaintext-names"], &[]);
    v.mount(&[]);
    std::fs::write(v.m("f"), b"data").unwrap();
    v.unmount();
    let real = std::fs::read(&v.keystore).unwrap();
    std::fs::remove_file(&v.keystore).unwrap();
    run_ok(&[
        "key",
        "create",
        "default",
        "--keystore",
        v.keystore.to_str().unwrap(),
    ]);
    let err = v.mount_err(&[]);
    assert!(one_line(&err).contains("is this the volume's keystore"), "{err}");
    let wrong = std::fs::read(&v.keystore).unwrap();
    std::fs::write(&v.keystore, &real).unwrap();
    v.mount(&[]);
    std::fs::write(&v.keystore, &wrong).unwrap();
    let err = std::fs::read(v.m("f")).unwrap_err();
    assert_eq!(errno_of(&err), libc::EIO);
    assert!(v.log_text().contains("cannot unwrap its key"), "{}", v.log_text());
}

#[test]
fn init_refuses_non_empty_directories_and_keystores_inside_the_backing() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("x"), b"").unwrap();
    let err = run_err(&["init", d.path().to_str().unwrap()]);
    assert!(one_line(&err).contains("not empty"), "{err}");
    let b = d.path().join("b");
    let ks = b.join("inside.keystore");
    let err = run_err(&["init", b.to_str().unwrap(), "--keystore", ks.to_str().unwrap()]);
    assert!(one_line(&err).contains("must not live inside"), "{err}");
}

#[test]
fn unknown_mount_options_are_refused() {
    let v = Volume::new();
    let err = v.mount_err(&["frobnicate"]);
    assert!(one_line(&err).contains("unknown mount option"), "{err}");
}

#[test]
fn key_commands_manage_the_keystore() {
    let v = Volume::new();
    v.key("rotate");
    let out = run_ok(&["key", "list", "--volume", v.backing.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("default\tenabled\tcurrent version 2"), "{text}");
    let mode = std::fs::metadata(&v.keystore).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// Parses a command's stdout as exactly one JSON document.
fn json_of(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not one JSON document ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn key_list_and_rewrap_print_one_json_document_with_json() {
    let mut v = Volume::mounted();
    std::fs::write(v.m("a"), b"one").unwrap();
    std::fs::write(v.m("b"), b"two").unwrap();
    v.unmount();
    v.key("rotate");
    let b = v.backing.to_str().unwrap().to_owned();

    let list = json_of(&run_ok(&["key", "list", "--json", "--volume", &b]));
    assert_eq!(list["keystore"], v.keystore.to_str().unwrap(), "{list}");
    let key = &list["keys"][0];
    assert_eq!(key["name"], "default", "{list}");
    assert_eq!(key["enabled"], true, "{list}");
    assert_eq!(key["current_version"], 2, "{list}");
    let versions: Vec<_> = key["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [1, 2], "{list}");
    assert!(key["versions"][0]["created_unix"].as_u64().unwrap() > 0, "{list}");

    let dry = json_of(&run_ok(&["rewrap", "--json", "--dry-run", &b]));
    assert_eq!(dry["latest_version"], 2, "{dry}");
    assert_eq!(dry["files_by_version"], serde_json::json!({"1": 2}), "{dry}");
    assert_eq!(dry["dry_run"], true, "{dry}");
    assert_eq!(dry["to_rewrap"], 2, "{dry}");
    assert_eq!(dry["rewrapped"], 0, "{dry}");

    let run = json_of(&run_ok(&["rewrap", "--json", &b]));
    assert_eq!(run["rewrapped"], 2, "{run}");
    assert_eq!(run["failed"], 0, "{run}");
    assert_eq!(run["name_key_rewrapped"], true, "{run}");
    assert!(
        run["backup_needed"]
            .as_str()
            .unwrap()
            .contains("kmsfs key backup"),
        "{run}"
    );

    let again = json_of(&run_ok(&["rewrap", "--json", &b]));
    assert_eq!(again["files_by_version"], serde_json::json!({"2": 2}), "{again}");
    assert_eq!(again["rewrapped"], 0, "{again}");
    assert_eq!(again["backup_needed"], serde_json::Value::Null, "{again}");

    let err = run_err(&["key", "rotate", "default", "--json", "--volume", &b]);
    assert!(
        one_line(&err).contains("--json goes with `kmsfs key list` only"),
        "{err}"
    );
}

/// Runs kmsfs with stdout and stderr on a terminal (util-linux script(1) gives it a pty);
/// returns what the terminal showed.
fn on_a_terminal(args: &[&str]) -> String {
    let cmd = std::iter::once(env!("CARGO_BIN_EXE_kmsfs"))
        .chain(args.iter().copied())
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let out = std::process::Command::new("script")
        .args(["-q", "-e", "-c", &cmd, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run script(1) (util-linux)");
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{cmd} failed on a terminal: {shown}");
    shown
}

#[test]
fn rewrap_and_fsck_show_progress_on_a_terminal_only() {
    let mut v = Volume::mounted();
    for i in 0..3 {
        std::fs::write(v.m(&format!("f{i}")), b"x").unwrap();
    }
    v.unmount();
    let b = v.backing.to_str().unwrap().to_owned();
    // Into a pipe: no progress, on stderr or stdout, while 3 files are re-wrapped.
    v.key("rotate");
    let out = run_ok(&["rewrap", &b]);
    let piped = String::from_utf8_lossy(&out.stderr) + String::from_utf8_lossy(&out.stdout);
    assert!(piped.contains("re-wrapped 3 of 3 files"), "{piped}");
    assert!(!piped.contains("rewrap: ") && !piped.contains('\r'), "{piped}");
    // On a terminal: a line rewritten in place, erased before the summary.
    v.key("rotate");
    let shown = on_a_terminal(&["rewrap", &b]);
    assert!(shown.contains("\rrewrap: 1/3 files"), "{shown:?}");
    assert!(shown.contains("re-wrapped 3 of 3 files"), "{shown:?}");

    let shown = on_a_terminal(&["fsck", &b]);
    assert!(shown.contains("\rfsck: "), "{shown:?}");
    let out = run_ok(&["fsck", &b]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains('\r'));
}

#[test]
fn a_read_only_mount_refuses_writes() {
    let mut v = Volume::mounted();
    std::fs::write(v.m("f"), b"data").unwrap();
    v.unmount();
    v.mount(&["ro"]);
    assert_eq!(std::fs::read(v.m("f")).unwrap(), b"data");
    assert_eq!(
        errno_of(&std::fs::write(v.m("f"), b"x").unwrap_err()),
        libc::EROFS
    );
}

#[test]
fn a_config_pointing_at_a_keystore_inside_the_backing_is_refused() {
    let v = Volume::new();
    // An attacker with write access to the backing directory plants a keystore and edits the
    // config to use it.
    let planted = v.backing.join("planted.keystore");
    std::fs::copy(&v.keystore, &planted).unwrap();
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = v.backing.join("kmsfs.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace(v.keystore.to_str().unwrap(), planted.to_str().unwrap()),
    )
    .unwrap();
    // The KMS comes from this machine's settings for the volume (its anchor), never from the
    // config: a config that names another keystore is not trusted.
    let err = v.mount_err(&[]);
    assert!(one_line(&err).contains("not trusted"), "{err}");
    // rewrap writes new wraps: it must refuse the planted keystore too.
    let err = run_err(&["rewrap", v.backing.to_str().unwrap()]);
    assert!(one_line(&err).contains("not trusted"), "{err}");
    // So must the key commands: disabling the planted decoy would leave the real key live.
    let err = run_err(&[
        "key",
        "disable",
        "default",
        "--volume",
        v.backing.to_str().unwrap(),
    ]);
    assert!(one_line(&err).contains("not trusted"), "{err}");
    let ks = std::fs::read_to_string(&planted).unwrap();
    assert!(!ks.contains("\"enabled\": false"), "the decoy was changed: {ks}");
}

#[test]
fn status_for_people_prints_text_not_json() {
    let v = Volume::mounted();
    let out = run_ok(&["status", v.mnt.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("KMS         local key default version 1 — ok"),
        "{text}"
    );
    assert!(!text.contains('"'), "JSON quotes in the human form: {text}");
}

#[test]
fn restoring_a_backup_older_than_a_rotation_names_the_missing_version_and_the_remedy() {
    let mut v = Volume::mounted();
    let b = v.backing.to_str().unwrap().to_owned();
    std::fs::write(v.m("before"), b"written before the backup").unwrap();
    let old = v.dir.path().join("keystore.old-backup");
    let out = run_ok(&["key", "backup", "--volume", &b, old.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{said}");
    assert!(said.contains("\"default\": versions 1 (current 1)"), "{said}");
    assert_eq!(
        std::fs::metadata(&old).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // A backup beside the data would travel with it.
    let inside = v.backing.join("keys.backup");
    let err = run_err(&["key", "backup", "--volume", &b, inside.to_str().unwrap()]);
    assert!(err.contains("inside the backing directory"), "{err}");
    assert!(!inside.exists());

    std::fs::write(v.m("after"), b"written after").unwrap();
    v.unmount();
    let out = run_ok(&["key", "rotate", "default", "--volume", &b]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        said.contains("a new backup is needed") && said.contains("version 2"),
        "{said}"
    );
    let out = run_ok(&["rewrap", &b]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.contains("a new backup is needed"), "{said}");
    let new = v.dir.path().join("keystore.new-backup");
    run_ok(&["key", "backup", "--volume", &b, new.to_str().unwrap()]);

    // The old backup restored: the mount names the version it lacks and what to do.
    std::fs::copy(&old, &v.keystore).unwrap();
    let err = v.mount_err(&[]);
    eprintln!("{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("need version 2 of key \"default\""), "{err}");
    assert!(err.contains("restore a newer backup"), "{err}");
    // The newer backup opens everything.
    std::fs::copy(&new, &v.keystore).unwrap();
    v.mount(&[]);
    assert_eq!(
        std::fs::read(v.m("before")).unwrap(),
        b"written before the backup"
    );
    assert_eq!(std::fs::read(v.m("after")).unwrap(), b"written after");
    v.unmount();
}

#[test]
fn a_mount_is_fuse_kmsfs_and_status_finds_it_under_a_name_with_a_space() {
    let mut v = Volume::new();
    v.mnt = v.dir.path().join("my media");
    std::fs::create_dir(&v.mnt).unwrap();
    v.mount(&[]);
    let mp = v.mnt.canonicalize().unwrap();
    let out = std::process::Command::new("findmnt")
        .args(["-n", "-t", "fuse.kmsfs", "-o", "TARGET,FSTYPE"])
        .output()
        .unwrap();
    let found = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("findmnt -t fuse.kmsfs:\n{found}");
    assert!(
        found.lines().any(|l| l.starts_with(mp.to_str().unwrap())),
        "{found}"
    );
    // All mounts, then this one by name: in plain text, no JSON quotes. (The listing's exit
    // status is not ours to check: a dead mount elsewhere on the machine rightly fails it.)
    let all = String::from_utf8_lossy(&kmsfs().arg("status").output().unwrap().stdout).into_owned();
    assert!(all.lines().any(|l| l == mp.to_str().unwrap()), "{all}");
    let one = String::from_utf8_lossy(&run_ok(&["status", v.mnt.to_str().unwrap()]).stdout).into_owned();
    eprintln!("{one}");
    assert!(one.starts_with(mp.to_str().unwrap()), "{one}");
    assert!(!one.contains('"'), "JSON quotes in plain status:\n{one}");
    v.unmount();
}

#[test]
fn a_non_empty_mountpoint_is_refused_unless_nonempty() {
    let mut v = Volume::new();
    std::fs::write(v.mnt.join("hidden"), b"would be hidden").unwrap();
    let err = v.mount_err(&[]);
    assert!(
        one_line(&err).contains("is not empty") && err.contains("-o nonempty"),
        "{err}"
    );
    assert!(!v.is_mounted());
    v.mount(&["nonempty"]);
    assert!(v.is_mounted());
    v.unmount();
    assert!(v.mnt.join("hidden").exists());
}

#[test]
fn a_failed_mount_leaves_no_log_file() {
    let d = tempfile::tempdir().unwrap();
    let (backing, mnt, log) = (d.path().join("b"), d.path().join("m"), d.path().join("m.log"));
    std::fs::create_dir(&backing).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let err = run_err(&[
        "mount",
        backing.to_str().unwrap(),
        mnt.to_str().unwrap(),
        "--log-file",
        log.to_str().unwrap(),
    ]);
    assert!(one_line(&err).contains("not a kmsfs volume"), "{err}");
    assert!(!log.exists(), "a failed mount left {}", log.display());
}

#[test]
fn man_pages_completions_and_version_come_from_the_cli() {
    let d = tempfile::tempdir().unwrap();
    run_ok(&["man", d.path().to_str().unwrap()]);
    let page = d.path().join("kmsfs-mount.1");
    let out = std::process::Command::new("man")
        .args(["-l", "-P", "cat"])
        .arg(&page)
        .env("MANWIDTH", "200")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("--open-timeout"), "{text}");
    assert!(d.path().join("kmsfs.1").exists() && d.path().join("kmsfs-key.1").exists());

    let script = run_ok(&["completions", "bash"]).stdout;
    let out = std::process::Command::new("bash")
        .args(["-c", "source /dev/stdin && complete -p kmsfs"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(&script)?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("kmsfs"), "{out:?}");

    let v = String::from_utf8_lossy(&run_ok(&["--version"]).stdout).into_owned();
    eprintln!("{v}");
    assert!(v.contains("commit ") && !v.contains("commit unknown"), "{v}");
    assert!(v.contains("local, openbao, vault, aws-kms, kmip"), "{v}");
}

/// `init --block-size`: the config, the records of its files, stat's block size and `status`
/// follow the size chosen, and the data reads back after a remount. A size no volume may have
/// is one line naming the range, and nothing is made.
#[test]
fn init_takes_a_block_size_and_the_volume_keeps_it() {
    use std::os::unix::fs::MetadataExt;
    for (arg, bs) in [("4K", 4096u64), ("1m", 1 << 20), ("65536", 65536)] {
        let mut v = Volume::init_with(&["--block-size", arg], &[]);
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(v.backing.join("kmsfs.json")).unwrap()).unwrap();
        assert_eq!(
            (config["block_size"].as_u64(), config["format_version"].as_u64()),
            (Some(bs), Some(2))
        );
        v.mount(&[]);
        let data: Vec<u8> = (0..3 * bs + 5).map(|i| (i % 251) as u8).collect();
        std::fs::write(v.mnt.join("f"), &data).unwrap();
        let m = std::fs::metadata(v.mnt.join("f")).unwrap();
        assert_eq!((m.len(), m.blksize()), (data.len() as u64, bs));
        // The backing file holds three full records and a 5-byte one of this block size.
        let layout = kmsfs::format::block::BlockLayout::new(bs).unwrap();
        let want = layout.backing_len(data.len() as u64);
        assert_eq!(want, kmsfs::format::header::HEADER_LEN + 3 * (bs + 28) + 5 + 28);
        let lens: Vec<u64> = std::fs::read_dir(&v.backing)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .collect();
        assert!(lens.contains(&want), "no backing file of {want} bytes: {lens:?}");
        let out = run_ok(&["status", v.mnt.to_str().unwrap(), "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(status[0]["block_size"].as_u64(), Some(bs));
        let out = run_ok(&["status", v.mnt.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stdout);
        let shown = if bs == 1 << 20 {
            "1 MiB".to_string()
        } else {
            format!("{} KiB", bs / 1024)
        };
        assert!(text.contains(&format!("  block size  {shown}\n")), "{text}");
        v.remount();
        assert!(
            std::fs::read(v.mnt.join("f")).unwrap() == data,
            "{bs}: data differs after a remount"
        );
    }
    for bad in ["3000", "2K", "2M", "4G", "64 KiB", "big"] {
        let d = tempfile::tempdir().unwrap();
        let backing = d.path().join("vol");
        let err = run_err(&["init", backing.to_str().unwrap(), "--block-size", bad]);
        assert!(
            one_line(&err).contains("give a power of two from 4 KiB to 1 MiB"),
            "{bad}: {err}"
        );
        assert!(
            !backing.exists() && !d.path().join("vol.keystore").exists(),
            "{bad}: something was made"
        );
    }
}
