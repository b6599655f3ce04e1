//! `kmsfs rewrap`: after a KEK rotation, re-wrap every file's DEK (and the volume name key)
//! under the newest key version. Contents are not touched; each header is rewritten in its
//! inactive slot (format v1's two-slot scheme), so a crash at any point loses nothing and a
//! second run picks up where the first stopped. Works on a mounted or unmounted volume: the
//! daemon reads a header only when it opens a file, and a torn slot falls back to the old one.

mod report;

use crate::exit::Fatal;
use crate::fatal;
use crate::format::config::{CONFIG_FILE_NAME, NamesConfig};
use crate::format::header::{self, HEADER_LEN, SLOT_LEN, slot_offset};
use crate::format::name::{BackingEntry, classify};
use crate::kms::{Binding, WrappedDek};
use crate::sys;
use crate::volume::{Volume, explain_kms};
use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Files re-wrapped per KMS batch.
const BATCH: usize = 200;

struct Candidate {
    path: PathBuf,
    header: header::Header,
    /// The file whose header was read (device, inode): the slot is written to it, or to nothing.
    id: (u64, u64),
}

/// Every backing file that holds content (skips kmsfs's own files; follows no symlinks).
fn content_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        if classify(name.as_bytes()) == BackingEntry::Internal
            || name.as_bytes() == CONFIG_FILE_NAME.as_bytes()
        {
            continue;
        }
        let ft = e.file_type()?;
        if ft.is_dir() {
            content_files(&e.path(), out)?;
        } else if ft.is_file() {
            out.push(e.path());
        }
    }
    Ok(())
}

/// Re-wraps what is older than the key's newest version (counts only under `dry_run`), and
/// prints lines, or one JSON object on stdout under `json` (also when some files failed).
pub fn run(backing: &Path, dry_run: bool, json: bool) -> Result<(), Fatal> {
    // Opened as the mount opens it: rewrap writes new wraps, so a config pointing at a
    // planted keystore must not get them.
    let rt = crate::volume::cli_runtime()?;
    let volume = Volume::open(backing, rt.handle())?;
    let backing = volume.backing.as_path();
    let kms = &volume.kms;
    let status = volume.check_access(&rt)?;
    let latest = status.current_version;

    let mut files = Vec::new();
    content_files(backing, &mut files).map_err(|e| fatal!("cannot walk {}: {e}", backing.display()))?;
    // Every file is opened relative to the root, following no symlink anywhere on its path: the
    // walk saw regular files, but whoever writes the backing directory may swap a name for a
    // link (or a directory on the way for one) before we read or write it.
    let root = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(backing)
        .map_err(|e| fatal!("cannot open {}: {e}", backing.display()))?;
    let mut seen = HashSet::new();
    let mut by_version: BTreeMap<Option<u32>, usize> = BTreeMap::new();
    let mut todo = Vec::new();
    let mut unreadable = 0usize;
    for path in files {
        let rel = path.strip_prefix(backing).unwrap_or(&path);
        let (file, id) = match sys::open_regular_beneath(root.as_fd(), rel, libc::O_RDONLY, 0) {
            Ok((fd, st)) => (File::from(fd), (st.st_dev, st.st_ino)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // removed meanwhile
            Err(e) => {
                unreadable += 1;
                eprintln!("kmsfs: skipping {}: {e}", path.display());
                continue;
            }
        };
        if !seen.insert(id) {
            continue; // another link to a file already counted
        }
        let mut buf = vec![0u8; HEADER_LEN as usize];
        let header = file
            .read_exact_at(&mut buf, 0)
            .ok()
            .and_then(|()| header::decode(&buf).ok());
        let Some(header) = header else {
            unreadable += 1;
            eprintln!(
                "kmsfs: skipping a file with an unreadable header ({})",
                path.display()
            );
            continue;
        };
        let w = WrappedDek {
            key_ref: header.slot.key_ref.clone(),
            blob: header.slot.wrapped.clone(),
        };
        let v = kms.version_of(&w);
        *by_version.entry(v).or_default() += 1;
        if v.is_none_or(|v| v < latest) {
            todo.push(Candidate { path, header, id });
        }
    }
    let mut outcome = report::Outcome {
        key: status.key_ref.clone(),
        latest_version: latest,
        by_version,
        dry_run,
        todo: todo.len(),
        unreadable,
        ..report::Outcome::default()
    };
    if !json {
        outcome.head_lines().iter().for_each(|l| println!("{l}"));
    }
    if dry_run {
        if json {
            println!("{}", outcome.to_json());
        }
        return Ok(());
    }

    let total = todo.len();
    let mut progress = crate::progress::Progress::new();
    for chunk in todo.chunks(BATCH) {
        let items: Vec<(WrappedDek, Binding)> = chunk
            .iter()
            .map(|c| {
                (
                    WrappedDek {
                        key_ref: c.header.slot.key_ref.clone(),
                        blob: c.header.slot.wrapped.clone(),
                    },
                    volume.file_binding(c.header.file_id),
                )
            })
            .collect();
        let results = rt.block_on(kms.rewrap_many(&items));
        for (c, r) in chunk.iter().zip(results) {
            let result = r
                .map_err(|e| e.to_string())
                .and_then(|w| write_slot(root.as_fd(), backing, c, w).map_err(|e| e.to_string()));
            match result {
                Ok(()) => outcome.rewrapped += 1,
                Err(e) => {
                    outcome.failed += 1;
                    progress.clear(); // the message gets a line of its own
                    eprintln!("kmsfs: file {}: {e}", c.header.file_id);
                }
            }
            progress.update(|| format!("rewrap: {}/{total} files", outcome.rewrapped + outcome.failed));
        }
    }
    progress.clear();
    outcome.name_key_rewrapped = rewrap_name_key(&volume, &rt, latest)?;
    if (outcome.rewrapped > 0 || outcome.name_key_rewrapped) && volume.kms.describe().backend == "local" {
        outcome.backup_needed = Some(crate::key_backup::new_backup_needed(
            latest,
            &format!("--volume {}", backing.display()),
        ));
    }
    if json {
        println!("{}", outcome.to_json());
    } else {
        outcome.tail_lines().iter().for_each(|l| println!("{l}"));
    }
    if outcome.failed > 0 {
        return Err(fatal!(
            "{} files could not be re-wrapped; run `kmsfs rewrap` again",
            outcome.failed
        ));
    }
    Ok(())
}

/// Writes the new wrap into the header's inactive slot and syncs it. The file is opened again
/// below `root` following no symlink, and written only if it is still the regular file whose
/// header was read: a name swapped for a link (or another file) since then gets nothing.
fn write_slot(root: BorrowedFd<'_>, backing: &Path, c: &Candidate, w: WrappedDek) -> std::io::Result<()> {
    let h = &c.header;
    let invalid =
        |e: header::HeaderError| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string());
    let (index, slot) = h.next_slot(w.key_ref, w.blob).map_err(invalid)?;
    let bytes = header::encode_slot(&h.file_id, &slot).map_err(invalid)?;
    debug_assert_eq!(bytes.len(), SLOT_LEN);
    let rel = c.path.strip_prefix(backing).unwrap_or(&c.path);
    let (fd, st) = sys::open_regular_beneath(root, rel, libc::O_WRONLY, 0)?;
    if (st.st_dev, st.st_ino) != c.id {
        return Err(std::io::Error::other(
            "the file was replaced since its header was read; run `kmsfs rewrap` again",
        ));
    }
    let f = File::from(fd);
    f.write_all_at(&bytes, slot_offset(index))?;
    f.sync_data()
}

/// Re-wraps the volume's own keys in the config (the name key and the volume key) if they
/// are older than `latest`, and seals the config again.
fn rewrap_name_key(volume: &Volume, rt: &tokio::runtime::Runtime, latest: u32) -> Result<bool, Fatal> {
    // Re-read, and check again: another rewrap may have changed it since the volume was opened.
    let mut config = crate::volume::load_config(&volume.backing)?;
    if config != volume.config {
        return Err(fatal!(
            "the volume config in {} changed while rewrap ran; run `kmsfs rewrap` again",
            volume.backing.display()
        ));
    }
    let kms = &volume.kms;
    let binding = Binding::volume(volume.id);
    let volume_key = volume.volume_key(rt)?;
    let mut changed = false;
    let mut fields: Vec<(&mut String, &mut String)> = Vec::new();
    if let NamesConfig::Encrypted {
        key_ref, wrapped_key, ..
    } = &mut config.names
    {
        fields.push((key_ref, wrapped_key));
    }
    if let Some(k) = &mut config.volume_key {
        fields.push((&mut k.key_ref, &mut k.wrapped));
    }
    for (key_ref, wrapped) in fields {
        let w = WrappedDek {
            key_ref: key_ref.clone(),
            blob: crate::hex::decode(wrapped).unwrap_or_default(),
        };
        if kms.version_of(&w).is_some_and(|v| v >= latest) {
            continue;
        }
        let new = rt.block_on(kms.rewrap(&w, &binding)).map_err(explain_kms)?;
        *key_ref = new.key_ref;
        *wrapped = crate::hex::encode(&new.blob);
        changed = true;
    }
    if !changed {
        return Ok(false);
    }
    config.seal(&volume_key);
    crate::durable::atomic_write(&volume.backing.join(CONFIG_FILE_NAME), &config.encode(), 0o644)
        .map_err(|e| fatal!("cannot write volume config: {e}"))?;
    Ok(true)
}
