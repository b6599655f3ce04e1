//! A hostile backing directory (shared or network storage someone else can write): whoever
//! writes it may deny service, but must never make the daemon, `kmsfs fsck --repair` or
//! `kmsfs rewrap` follow a link it planted, write through one, or hang on a FIFO, nor pass off
//! a symlink target or xattr value copied from elsewhere as valid. Issue 13, items 2, 5 and 6:
//! one test per attack, each of which failed (or hung, then failed on its deadline) before the
//! fix.

mod common;

use common::*;
use std::os::unix::fs::{OpenOptionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

fn one_line(err: &str) -> &str {
    let err = err.trim_end();
    assert_eq!(err.lines().count(), 1, "expected one line, got: {err}");
    err
}

fn mkfifo(path: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_bits_retain(0o644),
        0,
    )
    .unwrap();
}

/// Lets a reader blocked in opening the FIFO at `path` go on (it then reads end of file), so a
/// test that found the daemon stuck can still unmount.
fn unblock_fifo(path: &Path) {
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path);
}

/// Runs `cmd`, waiting at most `secs`: `None` if it did not finish. Then `on_timeout` runs
/// (to let a stuck daemon go), the child is killed, and left after 5 s if it still has not
/// died: a process asleep in the kernel on a FUSE request (D state) cannot be killed, and the
/// test must fail rather than hang on it.
fn run_with_deadline(cmd: &mut Command, secs: u64, on_timeout: impl FnOnce()) -> Option<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    on_timeout();
    let _ = child.kill();
    let grace = Instant::now() + Duration::from_secs(5);
    while Instant::now() < grace && child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Lists `dir` with ls(1) in a child process, failing the test (rather than hanging it) if
/// the listing does not finish within 10 s; `fifo` is then unblocked so the mount can go.
fn ls_within_deadline(dir: &Path, fifo: &Path) -> Output {
    match run_with_deadline(Command::new("ls").arg("-a").arg(dir), 10, || unblock_fifo(fifo)) {
        Some(out) => out,
        None => {
            panic!(
                "`ls {}` hung for 10 s on a FIFO planted in the backing directory",
                dir.display()
            );
        }
    }
}

/// A file's bytes as text, so a failed comparison shows what was written into it.
fn text(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap()).into_owned()
}

/// The backing root entries that are directories holding content (not lost+found).
fn backing_dirs(v: &Volume) -> Vec<PathBuf> {
    std::fs::read_dir(&v.backing)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_dir() && !e.file_name().to_string_lossy().starts_with("kmsfs."))
        .map(|e| e.path())
        .collect()
}

fn fsck_repair(v: &Volume) -> Fsck {
    fsck(v, &["--repair"])
}

/// Attack 1: `.kmsfs.lock` planted as a symlink to (or a hard link of) a file elsewhere. The
/// daemon used to truncate the target and write its pid into it.
#[test]
fn a_lock_file_planted_as_a_link_is_refused_and_its_target_untouched() {
    let mut v = Volume::new();
    let victim = v.dir.path().join("victim");
    let precious = "precious bytes, not a pid\n";
    std::fs::write(&victim, precious).unwrap();
    let lock = v.backing.join(".kmsfs.lock");
    let _ = std::fs::remove_file(&lock);
    symlink(&victim, &lock).unwrap();

    let err = match v.try_mount() {
        Ok(()) => {
            v.unmount();
            panic!(
                "mounted through a lock file planted as a symlink; its target now holds {:?}",
                text(&victim)
            );
        }
        Err(err) => err,
    };
    let line = one_line(&err);
    assert!(
        line.contains(".kmsfs.lock") && line.contains("symbolic link") && line.contains("remove it"),
        "{line}"
    );
    assert_eq!(text(&victim), precious, "the symlink's target was written");
    // fsck --repair takes the same lock the same way.
    let r = fsck_repair(&v);
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    assert!(one_line(&r.stderr).contains("symbolic link"), "{}", r.stderr);
    assert_eq!(text(&victim), precious);

    // A hard link to a file elsewhere on the same filesystem: refused too, not truncated.
    std::fs::remove_file(&lock).unwrap();
    std::fs::hard_link(&victim, &lock).unwrap();
    let err = match v.try_mount() {
        Ok(()) => {
            v.unmount();
            panic!("mounted with a lock file that is a hard link to another file");
        }
        Err(err) => err,
    };
    assert!(one_line(&err).contains("hard links"), "{err}");
    assert_eq!(text(&victim), precious, "the hard link's file was written");

    // Once it is removed, as the message says, the volume mounts.
    std::fs::remove_file(&lock).unwrap();
    v.mount(&[]);
    assert_eq!(text(&victim), precious);
}

/// Attack 2: `kmsfs.lost+found/report.jsonl` planted as a symlink (fsck --repair appended its
/// JSON lines to the target), and `kmsfs.lost+found` itself planted as a symlink to a
/// directory outside the volume.
#[test]
fn fsck_repair_writes_nothing_through_a_planted_lost_found_or_report() {
    let mut v = Volume::mounted();
    std::fs::write(v.m("kept"), b"data").unwrap();
    v.unmount();
    // Something for --repair to move: a temporary entry left by an interrupted create.
    let leftover = v.backing.join(".kmsfs.tmp.0011");
    std::fs::create_dir(&leftover).unwrap();

    // (a) report.jsonl is a symlink to a file elsewhere.
    let victim = v.dir.path().join("victim");
    let precious = "precious\n";
    std::fs::write(&victim, precious).unwrap();
    let lf = v.backing.join("kmsfs.lost+found");
    std::fs::create_dir(&lf).unwrap();
    symlink(&victim, lf.join("report.jsonl")).unwrap();
    let r = fsck_repair(&v);
    assert_eq!(
        text(&victim),
        precious,
        "fsck --repair appended to the report symlink's target"
    );
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    let line = one_line(&r.stderr);
    assert!(
        line.contains("report.jsonl") && line.contains("symbolic link") && line.contains("nothing was moved"),
        "{line}"
    );
    assert!(leftover.exists(), "an entry was moved before the refusal");

    // A FIFO there neither blocks nor is written.
    std::fs::remove_file(lf.join("report.jsonl")).unwrap();
    mkfifo(&lf.join("report.jsonl"));
    let out = run_with_deadline(
        kmsfs()
            .arg("fsck")
            .arg(&v.backing)
            .arg("--repair")
            .envs(v.env.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
        20,
        || {},
    )
    .expect("fsck --repair hung on a FIFO report");
    assert_eq!(out.status.code(), Some(2));
    assert!(one_line(&String::from_utf8_lossy(&out.stderr)).contains("FIFO"));
    assert!(leftover.exists());

    // (b) lost+found is a symlink to a directory elsewhere.
    std::fs::remove_file(lf.join("report.jsonl")).unwrap();
    std::fs::remove_dir(&lf).unwrap();
    let outside = v.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    symlink(&outside, &lf).unwrap();
    let r = fsck_repair(&v);
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    let line = one_line(&r.stderr);
    assert!(
        line.contains("kmsfs.lost+found")
            && line.contains("symbolic link")
            && line.contains("nothing was moved"),
        "{line}"
    );
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "written outside the volume"
    );
    assert!(leftover.exists());

    // Moved aside, as the message says: the repair runs and moves the leftover.
    std::fs::rename(&lf, v.backing.join("kmsfs.lost+found.suspect")).unwrap();
    std::fs::remove_file(v.backing.join("kmsfs.lost+found.suspect")).unwrap();
    let r = fsck_repair(&v);
    // A temporary entry is a crash leftover: a notice, so the status is 0.
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(!leftover.exists());
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    assert!(
        std::fs::symlink_metadata(lf.join("report.jsonl"))
            .unwrap()
            .is_file()
    );
}

/// Attack 3a: a FIFO planted as a directory's id file put FUSE threads to sleep for ever in
/// open(2); `ls` of the directory never returned. It must fail with EIO, logged by inode.
#[test]
fn a_fifo_as_a_directory_id_file_fails_the_listing_instead_of_hanging() {
    let mut v = Volume::mounted();
    std::fs::create_dir(v.m("secret_dir_quux")).unwrap();
    std::fs::write(v.m("secret_dir_quux/inner"), b"x").unwrap();
    v.unmount();
    let dirs = backing_dirs(&v);
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let id = dirs[0].join(".kmsfs.dirid");
    std::fs::remove_file(&id).unwrap();
    mkfifo(&id);
    v.mount(&[]);

    let out = ls_within_deadline(&v.m("secret_dir_quux"), &id);
    assert!(!out.status.success(), "ls succeeded: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Input/output error"), "{stderr}");
    // Other entries still work; the log names the directory by inode, not by name.
    std::fs::write(v.m("other"), b"ok").unwrap();
    assert_eq!(std::fs::read(v.m("other")).unwrap(), b"ok");
    let log = v.log_text();
    assert!(
        log.contains("directory inode") && log.contains("id file") && log.contains("FIFO"),
        "{log}"
    );
    assert!(
        !log.contains("secret_dir_quux"),
        "the log carries a plaintext name"
    );
}

/// Attack 3b: the same with a FIFO planted as a long name's sidecar: the listing goes on
/// without that entry (as for any name that does not decrypt), with a warning.
#[test]
fn a_fifo_as_a_long_name_sidecar_does_not_hang_a_listing() {
    let mut v = Volume::mounted();
    let long = "secret_long_name_".repeat(12);
    std::fs::write(v.m(&long), b"long").unwrap();
    std::fs::write(v.m("short_one"), b"short").unwrap();
    v.unmount();
    let sidecars: Vec<PathBuf> = std::fs::read_dir(&v.backing)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("kmsfs.long.") && n.ends_with(".name")
        })
        .collect();
    assert_eq!(sidecars.len(), 1, "{sidecars:?}");
    std::fs::remove_file(&sidecars[0]).unwrap();
    mkfifo(&sidecars[0]);
    v.mount(&[]);

    let out = ls_within_deadline(&v.mnt, &sidecars[0]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("short_one") && !stdout.contains(&long),
        "{stdout}"
    );
    let log = v.log_text();
    assert!(
        log.contains("skipped 1 entries whose names do not decrypt"),
        "{log}"
    );
    assert!(
        !log.contains("secret_long_name"),
        "the log carries a plaintext name"
    );
}

/// Attack 4: the keystore path is a symlink (here to the real keystore). It is refused: a
/// keystore is opened only directly, checked (type, owner, mode) on the descriptor it is
/// read from.
#[test]
fn a_keystore_path_that_is_a_symlink_is_refused() {
    let mut v = Volume::new();
    let real = v.dir.path().join("real.keystore");
    std::fs::rename(&v.keystore, &real).unwrap();
    symlink(&real, &v.keystore).unwrap();
    let err = match v.try_mount() {
        Ok(()) => {
            v.unmount();
            panic!("mounted through a keystore symlink");
        }
        Err(err) => err,
    };
    let line = one_line(&err);
    assert!(
        line.contains(v.keystore.to_str().unwrap()) && line.contains("symbolic link"),
        "{line}"
    );
    // The key commands read it the same way.
    let out = kmsfs()
        .args(["key", "list", "--keystore", v.keystore.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(one_line(&String::from_utf8_lossy(&out.stderr)).contains("symbolic link"));
    // The file itself in its place: the volume mounts again.
    std::fs::remove_file(&v.keystore).unwrap();
    std::fs::rename(&real, &v.keystore).unwrap();
    v.mount(&[]);
}

/// A live `local` KMS checks owner and mode again whenever the keystore changes: chmod-ed
/// open, or swapped for a symlink, it is refused at the next call, not served from memory.
#[test]
fn a_live_local_kms_rechecks_the_keystore_on_every_reload() {
    use kmsfs::kms::KeyProvider;
    use kmsfs::kms::local::{Keystore, LocalKms};
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("ks");
    let mut ks = Keystore::default();
    ks.create_key("default").unwrap();
    ks.save(&path).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let kms = LocalKms::new(path.clone(), "default".into());
    rt.block_on(kms.check_access()).unwrap();

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = rt
        .block_on(kms.check_access())
        .expect_err("a group-readable keystore was still used");
    assert!(e.to_string().contains("chmod 600"), "{e}");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    rt.block_on(kms.check_access()).unwrap();

    let real = d.path().join("real");
    std::fs::rename(&path, &real).unwrap();
    symlink(&real, &path).unwrap();
    let e = rt
        .block_on(kms.check_access())
        .expect_err("a symlinked keystore was used");
    assert!(e.to_string().contains("symbolic link"), "{e}");
}

/// The volume config planted as a symlink to a config elsewhere is not read.
#[test]
fn a_config_planted_as_a_symlink_is_refused() {
    let mut v = Volume::new();
    let cfg = v.backing.join("kmsfs.json");
    let elsewhere = v.dir.path().join("elsewhere.json");
    std::fs::rename(&cfg, &elsewhere).unwrap();
    symlink(&elsewhere, &cfg).unwrap();
    let err = match v.try_mount() {
        Ok(()) => {
            v.unmount();
            panic!("mounted with a config read through a symlink");
        }
        Err(err) => err,
    };
    let line = one_line(&err);
    assert!(
        line.contains("kmsfs.json") && line.contains("symbolic link"),
        "{line}"
    );
    // A FIFO there fails at once too.
    std::fs::remove_file(&cfg).unwrap();
    mkfifo(&cfg);
    let out =
        run_with_deadline(kmsfs().args(v.mount_args(&[])), 20, || {}).expect("mount hung on a FIFO config");
    assert!(!out.status.success());
    assert!(one_line(&String::from_utf8_lossy(&out.stderr)).contains("FIFO"));
}

/// Attack 5: `kmsfs rewrap` opened headers with `File::open` and wrote slots with
/// `OpenOptions::write`, both following symlinks: a file name swapped for a symlink between the
/// walk and the write had the new slot written into the link's target. Here a thread keeps
/// swapping a file with a symlink to a copy of it outside the volume (a genuine header, so
/// rewrap would re-wrap it) while rewrap runs, round after round; the copy must never change.
#[test]
fn rewrap_never_writes_through_a_symlink_swapped_in_for_a_file() {
    let mut v = Volume::mounted();
    let file = v.backing_of_new(|| std::fs::write(v.m("f"), b"content").unwrap());
    v.unmount();
    let victim = v.dir.path().join("victim");
    std::fs::copy(&file, &victim).unwrap();
    let original = std::fs::read(&victim).unwrap();
    // Hidden from the walk (a '.' name is kmsfs's own), swapped with the file's name.
    let link = v.backing.join(".swap");
    symlink(&victim, &link).unwrap();
    let exchange = |a: &Path, b: &Path| {
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            a,
            rustix::fs::CWD,
            b,
            rustix::fs::RenameFlags::EXCHANGE,
        )
        .unwrap()
    };
    let rewrap = || {
        kmsfs()
            .args(["rewrap", v.backing.to_str().unwrap()])
            .output()
            .unwrap()
    };

    // A symlink already in place when rewrap starts.
    exchange(&file, &link);
    v.key("rotate");
    let _ = rewrap();
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        original,
        "rewrap wrote through a symlink"
    );
    exchange(&file, &link);

    // A symlink swapped in while rewrap runs.
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (stop, file, link) = (stop.clone(), file.clone(), link.clone());
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    &file,
                    rustix::fs::CWD,
                    &link,
                    rustix::fs::RenameFlags::EXCHANGE,
                )
                .unwrap();
                swaps += 1;
            }
            swaps
        })
    };
    let mut wrote_through = None;
    for round in 0..30 {
        v.key("rotate");
        let _ = rewrap();
        if std::fs::read(&victim).unwrap() != original {
            wrote_through = Some(round);
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    assert!(swaps > 0);
    if std::fs::symlink_metadata(&file).unwrap().file_type().is_symlink() {
        exchange(&file, &link);
    }
    assert_eq!(
        wrote_through, None,
        "rewrap wrote a key slot through a symlink swapped in for a file (round {wrote_through:?})"
    );

    // The real file was re-wrapped in place and still reads.
    std::fs::remove_file(&link).unwrap();
    let out = rewrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    v.mount(&[]);
    assert_eq!(std::fs::read(v.m("f")).unwrap(), b"content");
}

fn c_path(p: &Path) -> std::ffi::CString {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let n = std::ffi::CString::new(name).unwrap();
    let r = unsafe {
        libc::setxattr(
            c_path(p).as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr {name} on {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

/// The value of xattr `name` (as stored, no decoding), or the errno.
fn get_xattr(p: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 70_000];
    let r = unsafe { libc::getxattr(c_path(p).as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

/// The user-visible entries of a backing directory (not kmsfs's own dot files).
fn backing_entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    v.sort();
    v
}

/// Makes `a/l` and `b/m` (two symlinks in two directories), unmounts, and returns the backing
/// links of the two backing directories, in listing order (which is a's is not known).
fn links_in_two_directories(v: &mut Volume) -> (PathBuf, PathBuf) {
    std::fs::create_dir(v.m("a")).unwrap();
    std::fs::create_dir(v.m("b")).unwrap();
    symlink("../private/plates.csv", v.m("a/l")).unwrap();
    symlink("public.txt", v.m("b/m")).unwrap();
    v.unmount();
    let dirs = backing_dirs(v);
    assert_eq!(dirs.len(), 2);
    let first = |d: &Path| backing_entries(d).into_iter().next().unwrap();
    (first(&dirs[0]), first(&dirs[1]))
}

/// Attack 5a: a symlink's stored target copied over another link's in a different directory.
/// Format 2 seals a target for its directory: the copy reads as EIO, not as the other target.
#[test]
fn a_symlink_target_copied_into_another_directory_reads_as_eio() {
    let mut v = Volume::mounted();
    let (l, m) = links_in_two_directories(&mut v);
    let (l, m) = (&l, &m);
    let stored = std::fs::read_link(l).unwrap();
    std::fs::remove_file(m).unwrap();
    symlink(&stored, m).unwrap();
    v.mount(&[]);
    // One of a/l, b/m now holds the other's stored target; neither may read as valid
    // but its own.
    let read = |p: &str| std::fs::read_link(v.m(p)).map_err(|e| e.raw_os_error());
    let (a, b) = (read("a/l"), read("b/m"));
    let copied = if a == Ok("../private/plates.csv".into()) {
        b
    } else {
        a
    };
    assert_eq!(
        copied,
        Err(Some(libc::EIO)),
        "a target copied from another directory was served"
    );
    assert!(
        v.log_text().contains("does not decrypt in directory"),
        "{}",
        v.log_text()
    );
    v.unmount();
}

/// Attack 5b: an xattr value copied from one file onto another (same attribute name). Format 2
/// binds a value to its file's id: the copy reads as EIO.
#[test]
fn an_xattr_value_copied_onto_another_file_reads_as_eio() {
    let mut v = Volume::mounted();
    std::fs::write(v.m("face.jpg"), b"1").unwrap();
    std::fs::write(v.m("car.jpg"), b"2").unwrap();
    set_xattr(&v.m("face.jpg"), "user.note", b"Jane Doe, 00:13");
    set_xattr(&v.m("car.jpg"), "user.note", b"nobody");
    std::fs::create_dir(v.m("d")).unwrap();
    set_xattr(&v.m("d"), "user.note", b"dir note");
    v.unmount();
    let files: Vec<PathBuf> = backing_entries(&v.backing)
        .into_iter()
        .filter(|p| p.is_file() && !p.file_name().unwrap().to_string_lossy().starts_with("kmsfs"))
        .collect();
    assert_eq!(files.len(), 2);
    let stored_name = |p: &Path| {
        let mut buf = vec![0u8; 4096];
        let n = unsafe { libc::listxattr(c_path(p).as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        assert!(n > 0);
        let names: Vec<String> = buf[..n as usize]
            .split(|&b| b == 0)
            .filter(|s| s.starts_with(b"user."))
            .map(|s| String::from_utf8(s.to_vec()).unwrap())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        names[0].clone()
    };
    let name = stored_name(&files[0]);
    assert_eq!(
        name,
        stored_name(&files[1]),
        "one attribute name, one stored name"
    );
    let value = get_xattr(&files[0], &name).unwrap();
    set_xattr(&files[1], &name, &value);
    // And the file's value onto the directory.
    let dir = backing_dirs(&v)[0].clone();
    set_xattr(&dir, &name, &value);
    // fsck names the file the value was copied onto (it checks files' attributes).
    let r = fsck(&v, &["--json"]);
    let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let xattr: Vec<&serde_json::Value> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["kind"] == "xattr")
        .collect();
    let copied_onto = files[1].strip_prefix(&v.backing).unwrap().to_str().unwrap();
    assert_eq!(xattr.len(), 1, "{report}");
    assert_eq!(xattr[0]["path"], copied_onto, "{report}");
    assert_eq!(r.code, 1, "{}", r.stdout);
    v.mount(&[]);
    let (a, b) = (
        get_xattr(&v.m("face.jpg"), "user.note"),
        get_xattr(&v.m("car.jpg"), "user.note"),
    );
    // One file holds its own value, the other the copy, which must not read as valid.
    let (own, copied) = match &a {
        Ok(x) if x == b"Jane Doe, 00:13" => (a.clone(), b.clone()),
        _ => (b.clone(), a.clone()),
    };
    assert!(own.is_ok(), "{a:?} {b:?}");
    assert_eq!(
        copied,
        Err(libc::EIO),
        "a value copied from another file was served: {a:?} {b:?}"
    );
    assert_eq!(get_xattr(&v.m("d"), "user.note"), Err(libc::EIO));
    v.unmount();
}

/// What format 2 changes for users: a symlink moved to another directory keeps its target (it
/// is sealed again for it); a hard link of a symlink into another directory, or an exchange of
/// a symlink across directories, is EXDEV, as across filesystems.
#[test]
fn symlinks_move_between_directories_and_cross_directory_links_are_exdev() {
    let mut v = Volume::mounted();
    std::fs::create_dir(v.m("a")).unwrap();
    std::fs::create_dir(v.m("b")).unwrap();
    symlink("../target/of/l", v.m("a/l")).unwrap();
    assert_eq!(
        std::fs::read_link(v.m("a/l")).unwrap(),
        Path::new("../target/of/l")
    );
    // A move keeps the link's owner and times.
    std::os::unix::fs::lchown(v.m("a/l"), Some(4321), Some(4322)).unwrap();
    let st = |p: &str| {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(v.m(p)).unwrap();
        (m.uid(), m.gid(), m.mtime(), m.mtime_nsec())
    };
    let before = st("a/l");
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::rename(v.m("a/l"), v.m("b/l")).unwrap();
    assert_eq!(
        std::fs::read_link(v.m("b/l")).unwrap(),
        Path::new("../target/of/l")
    );
    assert!(std::fs::symlink_metadata(v.m("a/l")).is_err());
    assert_eq!(st("b/l"), before, "owner or mtime changed by the move");
    // Over an existing link, and back.
    symlink("old", v.m("a/k")).unwrap();
    std::fs::rename(v.m("b/l"), v.m("a/k")).unwrap();
    assert_eq!(
        std::fs::read_link(v.m("a/k")).unwrap(),
        Path::new("../target/of/l")
    );
    // Same directory: a real hard link.
    std::fs::hard_link(v.m("a/k"), v.m("a/k2")).unwrap();
    assert_eq!(
        std::fs::read_link(v.m("a/k2")).unwrap(),
        Path::new("../target/of/l")
    );
    let err = std::fs::hard_link(v.m("a/k"), v.m("b/k")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EXDEV));
    std::fs::write(v.m("b/f"), b"x").unwrap();
    let r = rustix::fs::renameat_with(
        rustix::fs::CWD,
        v.m("a/k"),
        rustix::fs::CWD,
        v.m("b/f"),
        rustix::fs::RenameFlags::EXCHANGE,
    );
    assert_eq!(r, Err(rustix::io::Errno::XDEV));
    v.remount();
    assert_eq!(
        std::fs::read_link(v.m("a/k")).unwrap(),
        Path::new("../target/of/l")
    );
    assert_eq!(std::fs::read(v.m("b/f")).unwrap(), b"x");
    // No temporary link left behind in either directory.
    for d in backing_dirs(&v) {
        for e in std::fs::read_dir(&d).unwrap() {
            let n = e.unwrap().file_name();
            assert!(!n.to_string_lossy().starts_with(".kmsfs.tmp."), "{n:?}");
        }
    }
    v.unmount();
}

/// Attack 5c: the storage hard-links a symlink from one directory into another (kmsfs never
/// does). Whichever directory was looked up last must not make the other's name read the
/// target as valid: the link's lookup in a second directory is EIO.
#[test]
fn a_symlink_hard_linked_into_another_directory_by_the_storage_is_eio() {
    let mut v = Volume::mounted();
    let (l0, l1) = links_in_two_directories(&mut v);
    // The link of dirs[0] hard-linked in place of the link of dirs[1].
    std::fs::remove_file(&l1).unwrap();
    std::fs::hard_link(&l0, &l1).unwrap();
    v.mount(&[]);
    // Which name is the planted one depends on the listing order of the backing directory:
    // the planted name is looked up first, then the link's own directory.
    let (own, planted) = match std::fs::read_link(v.m("a/l")) {
        Ok(_) => ("a/l", "b/m"),
        Err(_) => ("b/m", "a/l"),
    };
    v.remount();
    // First met through the planted name; then through its own, which is the second
    // directory it is found in.
    assert!(std::fs::symlink_metadata(v.m(planted)).is_ok());
    let after = std::fs::symlink_metadata(v.m(own)).map_err(|e| e.raw_os_error());
    assert_eq!(after.as_ref().map(|_| ()), Err(&Some(libc::EIO)));
    let read = std::fs::read_link(v.m(planted)).map_err(|e| e.raw_os_error());
    assert!(
        read.is_err(),
        "the planted name read the other directory's target: {read:?} (own lookup: {after:?})"
    );
    v.unmount();
}
