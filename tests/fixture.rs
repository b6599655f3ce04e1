//! The frozen format v1 volume in `tests/fixtures/v1`: a backing directory, its local keystore
//! and a manifest of what the mounted volume holds (SHA-256 of every file, symlink targets).
//! Encrypted xattrs are not in it: they live in the backing files' xattrs, which git does not
//! keep (tests/names.rs covers them). Every later kmsfs must mount it and read it byte for byte: a change that breaks this
//! test breaks users' volumes.
//!
//! The fixture was made once by `make_v1_fixture` (ignored; it refuses to overwrite) and is
//! never regenerated.

mod common;

use common::*;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the mounted tree holds, as the manifest records it: path → description.
fn describe(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let what = if m.file_type().is_symlink() {
                format!("symlink {}", std::fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                walk(root, &p, out);
                "dir".to_string()
            } else {
                let data = std::fs::read(&p).unwrap();
                format!("file {} sha256:{}", data.len(), hex(&Sha256::digest(&data)))
            };
            out.insert(rel, what);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            copy_tree(&e.path(), &dest);
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(e.path()).unwrap(), dest).unwrap();
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

fn manifest_lines(m: &BTreeMap<String, String>) -> String {
    m.iter().map(|(k, v)| format!("{k}\t{v}\n")).collect()
}

#[test]
fn the_frozen_v1_volume_reads_byte_for_byte() {
    let fixture = fixture_dir();
    let tmp = tempfile::tempdir().unwrap();
    let backing = tmp.path().join("vol");
    let mnt = tmp.path().join("mnt");
    let keystore = tmp.path().join("vol.keystore");
    copy_tree(&fixture.join("backing"), &backing);
    std::fs::create_dir(&mnt).unwrap();
    std::fs::copy(fixture.join("keystore.json"), &keystore).unwrap();
    std::fs::set_permissions(&keystore, std::fs::Permissions::from_mode(0o600)).unwrap();
    // The config names its keystore by absolute path: point it at the copy (the only field
    // that depends on where a volume lives).
    let config_path = backing.join("kmsfs.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config["kms"]["keystore"] = keystore.to_str().unwrap().into();
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();

    // The upgrade path of a volume made before anchors: it does not mount until this machine
    // has recorded its KMS (`kmsfs anchor`, which also authenticates its config).
    let err = run_err(&["mount", backing.to_str().unwrap(), mnt.to_str().unwrap()]);
    assert!(err.contains("kmsfs anchor"), "{err}");
    let out = run_ok(&["anchor", backing.to_str().unwrap(), "--yes"]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("local keystore")
            && shown.contains("names encrypted")
            && shown.contains("format 1; the config is NOT authenticated"),
        "{shown}"
    );
    // fsck says what format 1 does not bind. (It also finds the hard link, which the copy
    // above made into two files with one file id.)
    let out = kmsfs()
        .args(["fsck", backing.to_str().unwrap()])
        .output()
        .unwrap();
    let fsck = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        fsck.contains("1 problem") && fsck.contains("volume format 1:"),
        "{fsck}"
    );
    run_ok(&["mount", backing.to_str().unwrap(), mnt.to_str().unwrap()]);
    let got = describe(&mnt);
    run_ok(&["unmount", mnt.to_str().unwrap()]);
    let want = std::fs::read_to_string(fixture.join("manifest.tsv")).unwrap();
    assert_eq!(
        manifest_lines(&got),
        want,
        "the v1 fixture no longer reads as it was written"
    );
}

/// Made the fixture once (2026-11-23, kmsfs 0.1.0, format v1). Kept to show how, not to rerun:
/// it refuses to overwrite the frozen files.
#[test]
#[ignore = "made tests/fixtures/v1 once; never regenerate a frozen fixture"]
fn make_v1_fixture() {
    let out = fixture_dir();
    assert!(
        !out.exists(),
        "{} exists: a frozen fixture is never regenerated",
        out.display()
    );
    let mut v = Volume::new();
    v.mount(&[]);
    std::fs::write(v.m("hello.txt"), b"hello, kmsfs format v1\n").unwrap();
    std::fs::hard_link(v.m("hello.txt"), v.m("hello-link.txt")).unwrap();
    std::fs::write(v.m("empty"), b"").unwrap();
    std::fs::write(v.m("one-block.bin"), pseudo_random(65536, 1)).unwrap();
    std::fs::write(v.m("block-and-a-byte.bin"), pseudo_random(65537, 2)).unwrap();
    std::fs::create_dir_all(v.m("photos/2026")).unwrap();
    std::fs::write(v.m("photos/2026/plate_AB-123-CD.jpg"), pseudo_random(5000, 3)).unwrap();
    std::os::unix::fs::symlink("photos/2026/plate_AB-123-CD.jpg", v.m("latest")).unwrap();
    std::fs::write(
        v.m(&format!("photos/{}.mp4", "interview-".repeat(20))),
        pseudo_random(300_000, 4),
    )
    .unwrap();
    // A sparse file: holes are all-zero records.
    let f = std::fs::File::create(v.m("sparse.bin")).unwrap();
    f.set_len(400_000).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"island of data", 200_000).unwrap();
    drop(f);
    // Files under a second key version.
    v.key("rotate");
    std::fs::write(v.m("after-rotation.txt"), b"wrapped by key version 2\n").unwrap();
    let manifest = describe(&v.mnt);
    v.unmount();

    std::fs::create_dir_all(&out).unwrap();
    copy_tree(&v.backing, &out.join("backing"));
    std::fs::remove_file(out.join("backing/.kmsfs.lock")).ok();
    std::fs::copy(&v.keystore, out.join("keystore.json")).unwrap();
    std::fs::write(out.join("manifest.tsv"), manifest_lines(&manifest)).unwrap();
}
