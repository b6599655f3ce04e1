//! `kmsfs fsck`: a clean volume is clean, every kind of damage is named by backing path, file
//! id and block, no plaintext name is ever printed, and `--repair` moves (never deletes) what
//! the mount cannot read.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

const HEADER_LEN: u64 = 4096;
const RECORD_LEN: u64 = 65536 + 28;

fn fsck_json(v: &Volume) -> (i32, serde_json::Value) {
    let r = fsck(v, &["--json"]);
    let json = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout));
    (r.code, json)
}

/// The file id in a backing file's header, as fsck prints it.
fn file_id(backing_file: &Path) -> String {
    let h = std::fs::read(backing_file).unwrap();
    h[12..28].iter().map(|b| format!("{b:02x}")).collect()
}

fn rel(v: &Volume, p: &Path) -> String {
    p.strip_prefix(&v.backing).unwrap().to_string_lossy().into_owned()
}

/// The backing root entry `f` creates (a directory, say).
fn new_root_entry(v: &Volume, f: impl FnOnce()) -> PathBuf {
    let list = || -> BTreeSet<PathBuf> {
        // Not the files the mount makes ahead of creates (hidden temporary entries).
        std::fs::read_dir(&v.backing)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                !p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(".kmsfs.tmp.")
            })
            .collect()
    };
    let before = list();
    f();
    let new: Vec<_> = list().difference(&before).cloned().collect();
    assert_eq!(new.len(), 1, "{new:?}");
    new[0].clone()
}

/// Inode numbers of every object under `dir` (the directory itself excluded).
fn inodes(dir: &Path) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        out.insert(e.metadata().unwrap().ino());
        if e.file_type().unwrap().is_dir() {
            out.extend(inodes(&e.path()));
        }
    }
    out
}

fn flip_byte(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], offset).unwrap();
}

/// A backing name that is still base64url but no longer the same ciphertext.
fn corrupt_name(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap().to_str().unwrap();
    let mut chars: Vec<char> = name.chars().collect();
    chars[3] = if chars[3] == 'A' { 'B' } else { 'A' };
    let new = path.with_file_name(chars.into_iter().collect::<String>());
    std::fs::rename(path, &new).unwrap();
    new
}

/// The line of `out` that mentions `needle`.
fn line_with<'a>(out: &'a str, needle: &str) -> &'a str {
    out.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{out}"))
}

fn one_line(err: &str) -> &str {
    let err = err.trim_end();
    assert_eq!(err.lines().count(), 1, "expected one line, got: {err}");
    err
}

const LONG: &str = "ivan_petrovich_sidorov_";

fn long_name() -> String {
    LONG.repeat(9)[..200].to_string()
}

#[test]
fn a_clean_volume_is_clean_and_no_plaintext_name_is_printed() {
    let mut v = Volume::mounted();
    let sizes: [(&str, usize); 5] = [
        ("empty_anna_schmidt.txt", 0),
        ("one_byte_bert_meier", 1),
        ("one_block_clara_wolf.bin", 65536),
        ("block_plus_one_dieter_koch.bin", 65537),
        ("big_erika_braun.mp4", 1024 * 1024 + 3),
    ];
    std::fs::create_dir_all(v.m("patients_franz/records_2024")).unwrap();
    for (i, (name, size)) in sizes.iter().enumerate() {
        let p = v.m("patients_franz/records_2024").join(name);
        std::fs::write(p, pseudo_random(*size, i as u64 + 1)).unwrap();
    }
    std::os::unix::fs::symlink(
        "patients_franz/records_2024/big_erika_braun.mp4",
        v.m("link_to_gisela_lang"),
    )
    .unwrap();
    std::fs::write(v.m(&long_name()), b"long").unwrap();
    // A sparse file: four holes, then a final block.
    let sparse = std::fs::File::create(v.m("sparse_hans_zimmer")).unwrap();
    sparse.set_len(4 * 65536 + 5).unwrap();
    drop(sparse);
    v.unmount();

    let r = fsck(&v, &[]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("0 problems"), "{}", r.stdout);
    let (code, json) = fsck_json(&v);
    assert_eq!(code, 0);
    let s = &json["summary"];
    assert_eq!(s["dirs"], 3, "{json}");
    assert_eq!(s["files"], 7, "{json}");
    assert_eq!(s["symlinks"], 1);
    assert_eq!(s["problems"], 0);
    assert_eq!(s["holes"], 4);
    // 0 + 1 + 1 + 2 + 17 blocks, 1 for the long-named file, 5 for the sparse one
    assert_eq!(s["blocks"], 27);
    let bytes: usize = sizes.iter().map(|s| s.1).sum::<usize>() + 4 + 4 * 65536 + 5;
    assert_eq!(s["bytes"], bytes as u64);
    assert_eq!(json["problems"].as_array().unwrap().len(), 0);

    // Not at the most verbose log level either.
    let traced = kmsfs()
        .args(["fsck", v.backing.to_str().unwrap()])
        .env("KMSFS_LOG", "trace")
        .output()
        .unwrap();
    assert_eq!(traced.status.code(), Some(0));
    let everything = format!(
        "{}{}{}{}",
        r.stdout,
        r.stderr,
        json,
        String::from_utf8_lossy(&traced.stderr)
    );
    let mut plaintext: Vec<String> = sizes.iter().map(|s| s.0.to_string()).collect();
    plaintext.extend(
        [
            "patients_franz",
            "records_2024",
            "link_to_gisela_lang",
            "sparse_hans_zimmer",
            LONG,
        ]
        .map(String::from),
    );
    for name in plaintext {
        assert!(!everything.contains(&name), "{name} printed:\n{everything}");
    }
}

#[test]
fn every_kind_of_damage_is_reported_with_path_file_id_and_block() {
    damage_is_reported(65536);
}

#[test]
fn every_kind_of_damage_is_reported_with_path_file_id_and_block_4k() {
    damage_is_reported(4096);
}

#[test]
fn every_kind_of_damage_is_reported_with_path_file_id_and_block_1m() {
    damage_is_reported(1 << 20);
}

/// Each kind of damage on a volume of `block`-byte blocks, with where it is.
fn damage_is_reported(block: u64) {
    let record_len = block + 28;
    let mut v = Volume::init_with(&["--block-size", &block.to_string()], &[]);
    v.mount(&[]);
    let flip =
        v.backing_of_new(|| std::fs::write(v.m("flip_ada"), pseudo_random(4 * block as usize, 1)).unwrap());
    let garble = v.backing_of_new(|| std::fs::write(v.m("garble_ben"), b"hello").unwrap());
    let cut =
        v.backing_of_new(|| std::fs::write(v.m("cut_cyd"), pseudo_random(block as usize + 1, 2)).unwrap());
    let renamed = v.backing_of_new(|| std::fs::write(v.m("renamed_dot"), b"x").unwrap());
    let good = v.backing_of_new(|| std::fs::write(v.m("good_eve"), b"fine").unwrap());
    let no_id = new_root_entry(&v, || std::fs::create_dir(v.m("no_id_fay")).unwrap());
    std::fs::write(v.m("no_id_fay/inside_gus"), b"y").unwrap();
    let long = v.backing_of_new(|| std::fs::write(v.m(&long_name()), b"x").unwrap());
    let (flip_id, cut_id) = (file_id(&flip), file_id(&cut));
    v.unmount();

    flip_byte(&flip, HEADER_LEN + 2 * record_len + 100);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&garble)
        .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, &[0xff; 20], 40))
        .unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cut)
        .and_then(|f| f.set_len(HEADER_LEN + record_len + 10))
        .unwrap();
    let renamed = corrupt_name(&renamed);
    std::fs::remove_file(no_id.join(".kmsfs.dirid")).unwrap();
    std::fs::remove_file(&long).unwrap(); // leaves its sidecar behind
    let orphan = format!("{}.name", rel(&v, &long));

    let r = fsck(&v, &[]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    let out = &r.stdout;
    let l = line_with(out, &rel(&v, &flip));
    assert!(
        l.contains(&format!("file {flip_id}")) && l.contains("block 2)"),
        "{l}"
    );
    assert!(l.contains("fails authentication"), "{l}");
    assert!(line_with(out, &rel(&v, &garble)).contains("unreadable header"));
    let l = line_with(out, &format!("file {cut_id}, block 1"));
    assert!(l.contains("not a valid size"), "{l}");
    let l = line_with(out, &format!("file {cut_id}, block 0"));
    assert!(l.contains("cut short"), "{l}");
    assert!(line_with(out, &rel(&v, &renamed)).contains("name does not decrypt"));
    assert!(line_with(out, &rel(&v, &no_id)).contains("no id file"));
    let l = line_with(out, &orphan);
    assert!(
        l.starts_with("notice: ") && l.contains("sidecar without its entry"),
        "{l}"
    );
    assert!(!out.contains(&rel(&v, &good)), "{out}");
    let l = line_with(out, "volume ");
    assert!(l.contains("5 problems, 2 notices"), "{out}");

    let (code, json) = fsck_json(&v);
    assert_eq!(code, 1);
    let problems = json["problems"].as_array().unwrap();
    let kinds: BTreeSet<&str> = problems.iter().map(|p| p["kind"].as_str().unwrap()).collect();
    let expected = ["block", "dir-id", "header", "name", "orphan-sidecar", "torn-tail"];
    assert_eq!(kinds, expected.into_iter().collect(), "{json}");
    let block = problems
        .iter()
        .find(|p| p["kind"] == "block" && p["file_id"] == flip_id.as_str());
    let block = block.unwrap_or_else(|| panic!("{json}"));
    assert_eq!(
        (&block["block"], &block["repair"]),
        (&2.into(), &"quarantine".into())
    );
    assert_eq!(block["path"], rel(&v, &flip).as_str());
}

#[test]
fn fsck_runs_read_only_next_to_a_live_mount_and_repair_is_refused_there() {
    let v = Volume::mounted();
    std::fs::create_dir(v.m("d")).unwrap();
    std::fs::write(v.m("d/a"), pseudo_random(200_000, 3)).unwrap();
    std::fs::write(v.m("b"), b"bee").unwrap();
    let lock = std::fs::read(v.backing.join(".kmsfs.lock")).unwrap();

    let r = fsck(&v, &[]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let (_, json) = fsck_json(&v);
    assert_eq!(json["summary"]["files"], 2);
    assert_eq!(json["summary"]["bytes"], 200_003);

    let r = fsck(&v, &["--repair"]);
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    let err = one_line(&r.stderr);
    assert!(
        err.contains("is mounted") && err.contains("unmount it first"),
        "{err}"
    );
    assert!(r.stdout.is_empty());
    // Nothing was touched: the daemon's lock file, the tree, the mount.
    assert_eq!(std::fs::read(v.backing.join(".kmsfs.lock")).unwrap(), lock);
    assert!(!v.backing.join("kmsfs.lost+found").exists());
    assert_eq!(std::fs::read(v.m("d/a")).unwrap(), pseudo_random(200_000, 3));
    std::fs::write(v.m("c"), b"still writable").unwrap();
    assert_eq!(fsck(&v, &[]).code, 0);
}

#[test]
fn repair_moves_unreadable_entries_into_lost_found_and_deletes_nothing() {
    let mut v = Volume::mounted();
    std::fs::write(v.m("keep_gus"), pseudo_random(150_000, 4)).unwrap();
    std::fs::create_dir(v.m("keep_dir_hal")).unwrap();
    std::fs::write(v.m("keep_dir_hal/inner_ida"), b"inner").unwrap();
    let flip = v.backing_of_new(|| std::fs::write(v.m("flip_jon"), pseudo_random(3 * 65536, 5)).unwrap());
    let garble = v.backing_of_new(|| std::fs::write(v.m("garble_kim"), b"hello").unwrap());
    let renamed = v.backing_of_new(|| std::fs::write(v.m("renamed_lou"), b"x").unwrap());
    let no_id = new_root_entry(&v, || std::fs::create_dir(v.m("no_id_max")).unwrap());
    std::fs::write(v.m("no_id_max/inside_ned"), b"y").unwrap();
    let long = v.backing_of_new(|| std::fs::write(v.m(&long_name()), b"z").unwrap());
    v.unmount();

    flip_byte(&flip, HEADER_LEN + RECORD_LEN + 7);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&garble)
        .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, b"notkmsfs", 0))
        .unwrap();
    let renamed = corrupt_name(&renamed);
    std::fs::remove_file(no_id.join(".kmsfs.dirid")).unwrap();
    std::fs::remove_file(&long).unwrap();
    std::fs::create_dir(v.backing.join(".kmsfs.tmp.0123456789abcdef")).unwrap();
    let before = inodes(&v.backing);

    let r = fsck(&v, &["--repair"]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    let moved_from: BTreeSet<String> = [
        rel(&v, &flip),
        rel(&v, &garble),
        rel(&v, &renamed),
        rel(&v, &no_id),
        format!("{}.name", rel(&v, &long)),
        ".kmsfs.tmp.0123456789abcdef".to_string(),
    ]
    .into();
    for m in &moved_from {
        line_with(&r.stdout, &format!("moved {m} -> kmsfs.lost+found/"));
    }
    assert!(r.stdout.contains("moved 6 entries"), "{}", r.stdout);

    // Nothing deleted: every object is still there, plus lost+found and its report.
    let after = inodes(&v.backing);
    assert!(before.is_subset(&after), "lost: {:?}", before.difference(&after));
    assert_eq!(after.len(), before.len() + 2);
    let report = std::fs::read_to_string(v.backing.join("kmsfs.lost+found/report.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = report.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let originals: BTreeSet<String> = lines
        .iter()
        .map(|l| l["original"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(originals, moved_from);
    for l in &lines {
        assert!(l["reason"].as_str().unwrap().len() > 10, "{l}");
        assert!(l["time"].as_str().unwrap().ends_with('Z'), "{l}");
        let to = v.backing.join(l["moved_to"].as_str().unwrap());
        assert!(to.symlink_metadata().is_ok(), "{l}");
    }
    let flipped = lines
        .iter()
        .find(|l| l["original"] == rel(&v, &flip).as_str())
        .unwrap();
    assert_eq!(
        flipped["file_id"],
        file_id(&v.backing.join(flipped["moved_to"].as_str().unwrap()))
    );

    let again = fsck(&v, &[]);
    assert_eq!(again.code, 0, "{}{}", again.stdout, again.stderr);

    // The mount still works, shows what was kept, and neither shows nor chokes on lost+found.
    v.mount(&[]);
    let mut listing: Vec<String> = std::fs::read_dir(&v.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    listing.sort();
    assert_eq!(listing, ["keep_dir_hal", "keep_gus"]);
    assert_eq!(std::fs::read(v.m("keep_gus")).unwrap(), pseudo_random(150_000, 4));
    assert_eq!(std::fs::read(v.m("keep_dir_hal/inner_ida")).unwrap(), b"inner");
    assert!(std::fs::metadata(v.m("kmsfs.lost+found")).is_err());
    std::fs::write(v.m("new_after_repair"), b"ok").unwrap();
    assert!(!v.log_text().contains("do not decrypt"), "{}", v.log_text());
}

#[test]
fn plaintext_names_volumes_print_inodes_and_hide_lost_found() {
    let mut v = Volume::init_with(&["--plaintext-names"], &[]);
    v.mount(&[]);
    std::fs::write(v.m("secret_patient_olga.txt"), pseudo_random(70_000, 6)).unwrap();
    std::fs::write(v.m("other_paul.txt"), b"p").unwrap();
    v.unmount();
    let bad = v.backing.join("secret_patient_olga.txt");
    let ino = std::fs::metadata(&bad).unwrap().ino();
    flip_byte(&bad, HEADER_LEN + RECORD_LEN + 1);

    let r = fsck(&v, &[]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(line_with(&r.stdout, &format!("inode {ino} (file ")).contains("block 1"));
    let r = fsck(&v, &["--repair"]);
    assert_eq!(r.code, 1);
    let (_, json) = fsck_json(&v);
    assert_eq!(json["summary"]["problems"], 0, "{json}");
    for out in [&r.stdout, &r.stderr, &json.to_string()] {
        assert!(!out.contains("secret") && !out.contains("other_paul"), "{out}");
    }
    let moved: Vec<String> = std::fs::read_dir(v.backing.join("kmsfs.lost+found"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(moved.len(), 2, "{moved:?}");
    assert!(moved.iter().all(|m| !m.contains("secret")), "{moved:?}");

    v.mount(&[]);
    let listing: Vec<_> = std::fs::read_dir(&v.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(listing, ["other_paul.txt"]);
    // With plaintext names lost+found is a reserved root name, like the config.
    assert!(std::fs::metadata(v.m("kmsfs.lost+found")).is_err());
    let err = std::fs::create_dir(v.m("kmsfs.lost+found")).unwrap_err();
    assert_eq!(errno_of(&err), libc::EPERM);
}

#[test]
fn a_missing_keystore_or_refusing_kms_is_one_fatal_line() {
    let v = Volume::new();
    std::fs::rename(&v.keystore, v.dir.path().join("moved")).unwrap();
    let r = fsck(&v, &[]);
    assert_eq!(r.code, 2);
    assert!(one_line(&r.stderr).contains("not found"), "{}", r.stderr);
    assert!(r.stdout.is_empty());
    std::fs::rename(v.dir.path().join("moved"), &v.keystore).unwrap();

    v.key("disable");
    let r = fsck(&v, &["--json"]);
    assert_eq!(r.code, 2);
    assert!(one_line(&r.stderr).contains("disabled"), "{}", r.stderr);

    let missing = v.dir.path().join("nothing-here");
    let out = kmsfs().arg("fsck").arg(&missing).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(one_line(&String::from_utf8_lossy(&out.stderr)).contains("nothing-here"));
}

#[test]
fn the_wrong_keystore_is_one_fatal_line_and_repair_moves_nothing() {
    // With plaintext names too, the volume key is unwrapped before the files: the wrong
    // keystore is one line, before anything is judged or moved.
    let mut v = Volume::init_with(&["--plaintext-names"], &[]);
    v.mount(&[]);
    for i in 0..5 {
        std::fs::write(v.m(&format!("f{i}")), b"data").unwrap();
    }
    v.unmount();
    std::fs::remove_file(&v.keystore).unwrap();
    run_ok(&[
        "key",
        "create",
        "default",
        "--keystore",
        v.keystore.to_str().unwrap(),
    ]);
    let r = fsck(&v, &["--repair"]);
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    assert!(
        one_line(&r.stderr).contains("is this the volume's keystore?"),
        "{}",
        r.stderr
    );
    assert!(!v.backing.join("kmsfs.lost+found").exists());
}

#[test]
fn crash_leftovers_are_notices_and_the_mount_reads_around_them() {
    let mut v = Volume::mounted();
    std::fs::write(v.m("ok_ann"), b"kept").unwrap();
    let empty = new_root_entry(&v, || std::fs::create_dir(v.m("emptied_bob")).unwrap());
    let torn = v.backing_of_new(|| std::fs::write(v.m("torn_cy"), pseudo_random(2 * 65536, 7)).unwrap());
    let long = v.backing_of_new(|| std::fs::write(v.m(&long_name()), b"z").unwrap());
    v.unmount();
    // What a power cut can leave on a volume nobody touched: an rmdir that had removed the id
    // file, bytes of an extension past the last whole record, a create's temporary entry, a
    // remove that had not reached the sidecar yet.
    std::fs::remove_file(empty.join(".kmsfs.dirid")).unwrap();
    let len = std::fs::metadata(&torn).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&torn)
        .and_then(|f| f.set_len(len + 9))
        .unwrap();
    std::fs::write(v.backing.join(".kmsfs.tmp.00112233aabbccdd"), b"").unwrap();
    std::fs::remove_file(&long).unwrap();

    let r = fsck(&v, &[]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let notices: Vec<&str> = r.stdout.lines().filter(|l| l.starts_with("notice: ")).collect();
    assert_eq!(notices.len(), 4, "{}", r.stdout);
    assert!(line_with(&r.stdout, &rel(&v, &empty)).contains("empty directory without its id file"));
    assert!(
        line_with(&r.stdout, "volume ").contains("0 problems, 4 notices"),
        "{}",
        r.stdout
    );
    let (code, json) = fsck_json(&v);
    assert_eq!((code, &json["summary"]["notices"]), (0, &4.into()), "{json}");

    // The emptied directory reads as the empty directory it is, and takes new entries.
    v.mount(&[]);
    assert_eq!(std::fs::read_dir(v.m("emptied_bob")).unwrap().count(), 0);
    std::fs::write(v.m("emptied_bob/new_dee"), b"new").unwrap();
    assert_eq!(
        std::fs::read(v.m("torn_cy")).unwrap(),
        pseudo_random(2 * 65536, 7)
    );
    v.remount();
    assert_eq!(std::fs::read(v.m("emptied_bob/new_dee")).unwrap(), b"new");
    assert_eq!(std::fs::read(v.m("ok_ann")).unwrap(), b"kept");
}
