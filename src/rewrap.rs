//! `kmsfs rewrap`: after a KEK rotation, re-wrap every file's DEK (and the volume name key)
//! under the newest key version. Contents are not touched; each header is rewritten in its
//! inactive slot (format v1's two-slot scheme), so a crash at any point loses nothing and a
//! second run picks up where the first stopped. Works on a mounted or unmounted volume: the
//! daemon reads a header only when it opens a file, and a torn slot falls back to the old one.

use crate::exit::Fatal;
use crate::fatal;
use crate::format::config::{CONFIG_FILE_NAME, NamesConfig};
use crate::format::header::{self, HEADER_LEN, SLOT_LEN, slot_offset};
use crate::format::name::{BackingEntry, classify};
use crate::kms::{Binding, WrappedDek};
use crate::volume::{Volume, explain_kms};
use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Files re-wrapped per KMS batch.
const BATCH: usize = 200;

struct Candidate {
    path: PathBuf,
    header: header::Header,
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

pub fn run(backing: &Path, dry_run: bool) -> Result<(), Fatal> {
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
    let mut seen = HashSet::new();
    let mut by_version: BTreeMap<Option<u32>, usize> = BTreeMap::new();
    let mut todo = Vec::new();
    let mut unreadable = 0usize;
    for path in files {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !seen.insert((meta.dev(), meta.ino())) {
            continue; // another link to a file already counted
        }
        let mut buf = vec![0u8; HEADER_LEN as usize];
        let header = File::open(&path)
            .and_then(|f| f.read_exact_at(&mut buf, 0))
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
            todo.push(Candidate { path, header });
        }
    }
    println!("key {:?} is at version {latest}", status.key_ref);
    for (v, n) in &by_version {
        match v {
            Some(v) => println!("  {n} files wrapped with version {v}"),
            None => println!("  {n} files with an unknown version"),
        }
    }
    if dry_run {
        return Ok(());
    }

    let mut done = 0usize;
    let mut failed = 0usize;
    let total = todo.len();
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
                .and_then(|w| write_slot(&c.path, &c.header, w).map_err(|e| e.to_string()));
            match result {
                Ok(()) => done += 1,
                Err(e) => {
                    failed += 1;
                    eprintln!("kmsfs: file {}: {e}", c.header.file_id);
                }
            }
        }
        if total > BATCH {
            eprintln!("rewrap: {}/{total}", done + failed);
        }
    }
    let name_key = rewrap_name_key(&volume, &rt, latest)?;
    println!(
        "re-wrapped {done} of {total} files to version {latest}{}{}{}",
        if failed > 0 {
            format!("; {failed} failed")
        } else {
            String::new()
        },
        if unreadable > 0 {
            format!("; {unreadable} unreadable headers skipped")
        } else {
            String::new()
        },
        if name_key { "; name key re-wrapped" } else { "" },
    );
    if failed > 0 {
        return Err(fatal!(
            "{failed} files could not be re-wrapped; run `kmsfs rewrap` again"
        ));
    }
    Ok(())
}

/// Writes the new wrap into the header's inactive slot and syncs it.
fn write_slot(path: &Path, h: &header::Header, w: WrappedDek) -> std::io::Result<()> {
    let invalid =
        |e: header::HeaderError| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string());
    let (index, slot) = h.next_slot(w.key_ref, w.blob).map_err(invalid)?;
    let bytes = header::encode_slot(&h.file_id, &slot).map_err(invalid)?;
    debug_assert_eq!(bytes.len(), SLOT_LEN);
    let f = OpenOptions::new().write(true).open(path)?;
    f.write_all_at(&bytes, slot_offset(index))?;
    f.sync_data()
}

/// Re-wraps the volume name key in the config if it is older than `latest`.
fn rewrap_name_key(volume: &Volume, rt: &tokio::runtime::Runtime, latest: u32) -> Result<bool, Fatal> {
    // Re-read: another rewrap may have changed it since the volume was opened.
    let mut config = crate::volume::load_config(&volume.backing)?;
    let kms = &volume.kms;
    let NamesConfig::Encrypted {
        key_ref, wrapped_key, ..
    } = &mut config.names
    else {
        return Ok(false);
    };
    let w = WrappedDek {
        key_ref: key_ref.clone(),
        blob: crate::hex::decode(wrapped_key).unwrap_or_default(),
    };
    if kms.version_of(&w).is_some_and(|v| v >= latest) {
        return Ok(false);
    }
    let new = rt
        .block_on(kms.rewrap(&w, &Binding::volume(volume.id)))
        .map_err(explain_kms)?;
    *key_ref = new.key_ref;
    *wrapped_key = crate::hex::encode(&new.blob);
    crate::durable::atomic_write(&volume.backing.join(CONFIG_FILE_NAME), &config.encode(), 0o644)
        .map_err(|e| fatal!("cannot write volume config: {e}"))?;
    Ok(true)
}
