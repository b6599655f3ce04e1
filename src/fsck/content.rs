//! The content half of fsck: every regular file's header (both key slots, a unique file id),
//! its key (unwrapped through the KMS in batches, as `rewrap` batches), and every block,
//! opened with the rules the mount reads them by (`fs::content`): a non-final record of zeros
//! is a hole, a non-final record sealed as final is an interrupted extension and fine, the
//! last record must open as final.
//!
//! This module holds fsck's only KMS requests (`unwrap_many`). A KMS that refuses or cannot
//! be reached ends the run with one line; so does a key that unwraps no file at all (the
//! wrong keystore), rather than one line per file.

use super::report::{Kind, Problem, Progress, Summary};
use super::tree::FileRef;
use crate::exit::Fatal;
use crate::format::FileId;
use crate::format::block::{Block, BlockError, BlockLayout, ContentCipher, Extent, RECORD_OVERHEAD};
use crate::format::header::{self, HEADER_LEN, Header, SlotState};
use crate::format::name::{NameCipher, XATTR_USER_PREFIX, XattrOwner};
use crate::kms::{Binding, KmsError, WrappedDek};
use crate::sys;
use crate::volume::{Volume, explain_kms};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Files whose keys are unwrapped per KMS batch.
const BATCH: usize = 200;
/// Plaintext read per `pread` (as the mount reads): this many bytes' worth of whole records.
const BYTES_PER_READ: u64 = 1 << 20;

/// The outcome of checking one file's records.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BlockCheck {
    /// Plaintext size (of the intact records, if the last one is torn).
    pub size: u64,
    pub blocks: u64,
    pub holes: u64,
    pub failed: Vec<(u64, BlockError)>,
    /// Bytes of a torn record after the last whole one.
    pub torn: Option<u64>,
}

/// Opens every record of a backing file of `len` bytes in a volume of `layout`, by the rules
/// the mount reads them by.
pub fn check_blocks(
    file: &File,
    len: u64,
    layout: BlockLayout,
    cipher: &ContentCipher,
) -> std::io::Result<BlockCheck> {
    let mut out = BlockCheck::default();
    let Ok(Extent { size, torn }) = layout.extent(len) else {
        return Ok(out);
    };
    out.size = size;
    out.torn = (torn > 0).then_some(torn);
    out.blocks = layout.block_count(out.size);
    let per_read = layout.blocks_in(BYTES_PER_READ);
    let mut buf = Vec::new();
    let mut first = 0;
    while first < out.blocks {
        let last = (first + per_read).min(out.blocks) - 1;
        let start = layout.record_offset(first);
        let stop = layout.record_offset(last) + layout.block_plain_len(out.size, last) + RECORD_OVERHEAD;
        buf.resize((stop - start) as usize, 0);
        file.read_exact_at(&mut buf, start)?;
        for b in first..=last {
            let at = (layout.record_offset(b) - start) as usize;
            let rec = &mut buf[at..at + (layout.block_plain_len(out.size, b) + RECORD_OVERHEAD) as usize];
            match cipher.open_block(b, b + 1 == out.blocks, rec) {
                Ok(Block::Hole) => out.holes += 1,
                Ok(Block::Data) => {}
                Err(f) => out.failed.push((b, f)),
            }
        }
        first = last + 1;
    }
    Ok(out)
}

/// Consecutive failed blocks with the same cause, as (first, last, cause).
fn runs(failed: &[(u64, BlockError)]) -> Vec<(u64, u64, BlockError)> {
    let mut out: Vec<(u64, u64, BlockError)> = Vec::new();
    for &(b, f) in failed {
        match out.last_mut() {
            Some((_, last, cause)) if *last + 1 == b && *cause == f => *last = b,
            _ => out.push((b, b, f)),
        }
    }
    out
}

/// A file whose header parsed, waiting for its key.
struct Opened<'a> {
    file_ref: &'a FileRef,
    file: File,
    header: Header,
}

/// Checks every file's header, key and blocks; adds to `summary` and `problems`. Returns the
/// file id of every backing path whose header parsed.
pub struct ContentCheck<'a> {
    pub root: &'a Path,
    pub volume: &'a Volume,
    pub rt: &'a tokio::runtime::Runtime,
    pub summary: &'a mut Summary,
    pub problems: &'a mut Vec<Problem>,
    pub progress: &'a mut Progress,
    /// The name ciphers, to check xattrs against their file (format 2, encrypted names).
    pub names: Option<&'a NameCipher>,
}

impl ContentCheck<'_> {
    pub fn run(mut self, files: &[FileRef]) -> Result<HashMap<PathBuf, FileId>, Fatal> {
        // Files are opened relative to the root, following no symlink on the way.
        let root = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(self.root)
            .map_err(|e| Fatal::new(format!("cannot open {}: {e}", self.root.display())))?;
        let mut ids: HashMap<FileId, u64> = HashMap::new();
        let mut by_path = HashMap::new();
        let (mut unwrapped, mut refused, mut done) = (0u64, 0u64, 0usize);
        let mut first_refusal = None;
        for chunk in files.chunks(BATCH) {
            let mut opened = Vec::with_capacity(chunk.len());
            for f in chunk {
                if let Some(o) = self.open(root.as_fd(), f) {
                    if let Some(other) = ids.insert(o.header.file_id, f.inode) {
                        let msg = format!(
                            "another file (inode {other}) has the same file id: a copy made \
                             outside the mount, or a header copied onto this file"
                        );
                        self.problems.push(with_id(
                            Problem::new(&f.paths[0], f.inode, Kind::DuplicateId, msg),
                            &o,
                        ));
                    }
                    for p in &f.paths {
                        by_path.insert(p.clone(), o.header.file_id);
                    }
                    opened.push(o);
                }
            }
            // The one KMS request of each batch.
            let items: Vec<(WrappedDek, Binding)> = opened
                .iter()
                .map(|o| {
                    let w = WrappedDek {
                        key_ref: o.header.slot.key_ref.clone(),
                        blob: o.header.slot.wrapped.clone(),
                    };
                    (w, self.volume.file_binding(o.header.file_id))
                })
                .collect();
            let keys = self.rt.block_on(self.volume.kms.unwrap_many(&items));
            for (o, key) in opened.iter().zip(keys) {
                match key {
                    Ok(dek) => {
                        unwrapped += 1;
                        let cipher = ContentCipher::new(&dek, o.header.file_id);
                        drop(dek);
                        self.blocks(o, &cipher);
                        // The file id is authentic now that its key unwrapped under it.
                        if let Some(names) = self.names.filter(|n| n.binds_placement()) {
                            self.xattrs(o, names);
                        }
                    }
                    Err(KmsError::Corrupt(m)) => {
                        refused += 1;
                        first_refusal.get_or_insert(m);
                        let msg = "the wrapped key does not unwrap under this file's id (header \
                                   altered or copied from another file)";
                        let f = o.file_ref;
                        let p = Problem::new(&f.paths[0], f.inode, Kind::Key, msg);
                        self.problems.push(with_id(p, o).quarantine(&f.paths[1..]));
                    }
                    Err(e) => return Err(explain_kms(e)),
                }
            }
            done += chunk.len();
            let (total, bytes) = (files.len(), self.summary.bytes);
            self.progress.update(|| {
                format!(
                    "fsck: {done}/{total} files, {} checked",
                    super::report::human_bytes(bytes)
                )
            });
        }
        if unwrapped == 0 && refused > 1 {
            return Err(Fatal::new(format!(
                "none of the {refused} file keys unwraps ({}): is the KMS key in the volume config \
                 the one this volume was made with (for a local keystore: the right keystore file)? \
                 Nothing was changed",
                first_refusal.unwrap_or_default()
            )));
        }
        Ok(by_path)
    }

    /// Every `user.` attribute of the file must decrypt, its value bound to this file: one
    /// problem for the first that does not (report only: the content is not at fault).
    fn xattrs(&mut self, o: &Opened<'_>, names: &NameCipher) {
        let owner = XattrOwner::File(o.header.file_id);
        let mut list = vec![0u8; 65536];
        let Ok(n) = sys::listxattr_fd(o.file.as_fd(), &mut list) else {
            return;
        };
        let mut value = vec![0u8; 65536 + 256];
        let bad = list[..n]
            .split(|&b| b == 0)
            .filter(|s| s.starts_with(XATTR_USER_PREFIX.as_bytes()))
            .find(|stored| {
                let Ok(len) = sys::getxattr_fd(o.file.as_fd(), OsStr::from_bytes(stored), &mut value) else {
                    return false; // removed since it was listed
                };
                names.decrypt_xattr_name(stored).is_err()
                    || names
                        .decrypt_xattr_value(&owner, &String::from_utf8_lossy(stored), &value[..len])
                        .is_err()
            });
        if bad.is_some() {
            let f = o.file_ref;
            let msg =
                "an extended attribute does not decrypt for this file (altered, or copied from another file)";
            self.problems
                .push(with_id(Problem::new(&f.paths[0], f.inode, Kind::Xattr, msg), o));
        }
    }

    /// Opens a file and parses its header; a problem (and `None`) if that fails. Only a regular
    /// file is read: no symlink is followed on the way or at the end, no FIFO waited on (the
    /// walk saw a regular file here, but the name may have been swapped since).
    fn open<'f>(&mut self, root: BorrowedFd<'_>, f: &'f FileRef) -> Option<Opened<'f>> {
        self.summary.files += 1;
        let path = &f.paths[0];
        let file = match sys::open_regular_beneath(root, path, libc::O_RDONLY, 0) {
            Ok((fd, _)) => File::from(fd),
            Err(e) => {
                let msg = format!("file cannot be opened ({e})");
                self.problems
                    .push(Problem::new(path, f.inode, Kind::Unreadable, msg));
                return None;
            }
        };
        let mut buf = vec![0u8; HEADER_LEN as usize];
        let n = match crate::durable::read_up_to(&file, &mut buf) {
            Ok(n) => n,
            Err(e) => {
                let msg = format!("header cannot be read ({e})");
                self.problems
                    .push(Problem::new(path, f.inode, Kind::Unreadable, msg));
                return None;
            }
        };
        let header = match header::decode(&buf[..n]) {
            Ok(h) => h,
            Err(e) => {
                let msg = format!("unreadable header: {e}");
                let p = Problem::new(path, f.inode, Kind::Header, msg).quarantine(&f.paths[1..]);
                self.problems.push(p);
                return None;
            }
        };
        let opened = Opened {
            file_ref: f,
            file,
            header,
        };
        if let Ok(states) = header::slot_states(&buf[..n]) {
            let other = 1 - opened.header.slot_index;
            if states[other] == SlotState::Damaged {
                let msg = format!(
                    "key slot {} is damaged (a torn re-wrap, or altered); the file opens from slot {}",
                    slot_name(other),
                    slot_name(opened.header.slot_index)
                );
                self.problems
                    .push(with_id(Problem::new(path, f.inode, Kind::KeySlot, msg), &opened));
            }
        }
        Some(opened)
    }

    /// Checks a file's blocks. A file that changes meanwhile (written through a live mount)
    /// is checked once more, then left unjudged.
    fn blocks(&mut self, o: &Opened<'_>, cipher: &ContentCipher) {
        let f = o.file_ref;
        let mut result = None;
        for _ in 0..2 {
            let Ok(before) = o.file.metadata().map(|m| stamp(&m)) else {
                break;
            };
            let check = check_blocks(&o.file, before.0, self.volume.config.layout(), cipher);
            let after = o.file.metadata().map(|m| stamp(&m)).ok();
            let eof = matches!(&check, Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof);
            if after == Some(before) && !eof {
                result = Some((before.0, check));
                break;
            }
        }
        let Some((len, check)) = result else {
            self.summary.in_use += 1;
            return;
        };
        let check = match check {
            Ok(c) => c,
            Err(e) => {
                let msg = format!("content cannot be read ({e})");
                self.problems.push(with_id(
                    Problem::new(&f.paths[0], f.inode, Kind::Unreadable, msg),
                    o,
                ));
                return;
            }
        };
        self.summary.blocks += check.blocks;
        self.summary.holes += check.holes;
        self.summary.bytes += check.size;
        if let Some(torn) = check.torn {
            // After at least one whole record (whose final flag is checked with the blocks),
            // torn bytes are an extension cut short. With none, the file would read as empty:
            // that is also what a storage truncating it would produce, so it stays a problem.
            let (kind, what) = if check.blocks > 0 {
                (Kind::TornTail, "an extension cut short")
            } else {
                (Kind::Length, "a first write cut short, or the file truncated")
            };
            let msg = format!(
                "backing length {len} is not a valid size: {torn} bytes of a torn record after the \
                 last whole block ({what}; the mount ignores them, opening the file for writing \
                 through the mount cuts them off)"
            );
            let mut p = with_id(Problem::new(&f.paths[0], f.inode, kind, msg), o);
            p.blocks = Some((check.blocks, check.blocks));
            self.problems.push(p);
        }
        for (first, last, cause) in runs(&check.failed) {
            let p = Problem::new(&f.paths[0], f.inode, Kind::Block, cause.message());
            let mut p = with_id(p, o).quarantine(&f.paths[1..]);
            p.blocks = Some((first, last));
            self.problems.push(p);
        }
    }
}

fn with_id(mut p: Problem, o: &Opened<'_>) -> Problem {
    p.file_id = Some(o.header.file_id);
    p
}

fn slot_name(index: usize) -> char {
    if index == 0 { 'A' } else { 'B' }
}

/// What tells us a file changed while we read it: length, modification and change times.
fn stamp(m: &std::fs::Metadata) -> (u64, i64, i64, i64, i64) {
    (m.len(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SecretKey;
    use crate::format::block::record_body;

    /// The smallest, the default and the largest block size: each test runs on each.
    fn layouts() -> [BlockLayout; 3] {
        [4096, 65536, 1 << 20].map(|bs| BlockLayout::new(bs).unwrap())
    }

    /// A backing file of `size` bytes sealed as the mount seals it; `holes` are left zero.
    fn sealed(l: BlockLayout, cipher: &ContentCipher, size: u64, holes: &[u64]) -> Vec<u8> {
        let mut out = vec![0u8; HEADER_LEN as usize];
        let n = l.block_count(size);
        for b in 0..n {
            let plain = l.block_plain_len(size, b) as usize;
            let mut rec = vec![0u8; plain + RECORD_OVERHEAD as usize];
            if !holes.contains(&b) {
                let len = rec.len();
                rec[record_body(len)].fill((b as u8).wrapping_add(1));
                cipher.seal(b, b + 1 == n, &mut rec);
            }
            out.extend_from_slice(&rec);
        }
        out
    }

    fn check(l: BlockLayout, bytes: &[u8], cipher: &ContentCipher) -> BlockCheck {
        let mut tmp = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut tmp, bytes).unwrap();
        check_blocks(&tmp, bytes.len() as u64, l, cipher).unwrap()
    }

    fn cipher() -> ContentCipher {
        ContentCipher::new(&SecretKey::generate(), FileId::generate())
    }

    #[test]
    fn sound_files_of_every_edge_size_pass() {
        let c = cipher();
        for l in layouts() {
            let bs = l.block_size();
            // 300 blocks: more than one read at every block size.
            for size in [0, 1, bs - 1, bs, bs + 1, 3 * bs + 3, 40 * bs + 1, 300 * bs - 1] {
                if size > 64 << 20 {
                    continue;
                }
                let r = check(l, &sealed(l, &c, size, &[]), &c);
                assert_eq!(r.failed, vec![], "{bs}: size {size}");
                assert_eq!((r.size, r.blocks, r.torn), (size, l.block_count(size), None));
            }
            let r = check(l, &sealed(l, &c, 3 * bs + 3, &[1, 2]), &c);
            assert_eq!((r.holes, r.failed.len()), (2, 0));
        }
    }

    #[test]
    fn every_kind_of_damage_is_found_with_its_block() {
        let c = cipher();
        for l in layouts() {
            let size = 5 * l.block_size() + 100;
            let good = sealed(l, &c, size, &[]);
            let at = |b: u64| l.record_offset(b) as usize;

            let mut flipped = good.clone();
            flipped[at(2) + 500] ^= 1;
            assert_eq!(check(l, &flipped, &c).failed, vec![(2, BlockError::Auth)]);

            // Cut at a block boundary: the new last block was sealed as a middle one.
            let cut = &good[..at(3)];
            assert_eq!(check(l, cut, &c).failed, vec![(2, BlockError::Cut)]);

            // Cut inside the last record's overhead: torn, and block 4 is then last but not final.
            let torn = &good[..at(5) + 10];
            let r = check(l, torn, &c);
            assert_eq!((r.torn, r.failed.clone()), (Some(10), vec![(4, BlockError::Cut)]));

            let mut zero_last = good.clone();
            zero_last[at(5)..].fill(0);
            assert_eq!(check(l, &zero_last, &c).failed, vec![(5, BlockError::FinalZero)]);

            let mut bad_last = good.clone();
            let end = bad_last.len() - 1;
            bad_last[end] ^= 1;
            assert_eq!(check(l, &bad_last, &c).failed, vec![(5, BlockError::FinalAuth)]);

            // Another file's key opens nothing.
            let r = check(l, &good, &cipher());
            assert_eq!(r.failed.len(), 6);
            assert_eq!(
                runs(&r.failed),
                vec![(0, 4, BlockError::Auth), (5, 5, BlockError::FinalAuth)]
            );
        }
    }

    /// Read with another block size, a file fails: its records are where that size does not
    /// put them (why the block size is in the authenticated config).
    #[test]
    fn a_file_read_with_the_wrong_block_size_fails() {
        let c = cipher();
        let [k4, k64, m1] = layouts();
        let bytes = sealed(k64, &c, 3 * 65536 + 5, &[]);
        for wrong in [k4, m1] {
            assert!(!check(wrong, &bytes, &c).failed.is_empty());
        }
    }

    #[test]
    fn an_interrupted_extension_is_readable() {
        // Block 1 still sealed as final, block 2 the new last block: what a crash between
        // the last two steps of an extension leaves.
        let c = cipher();
        for l in layouts() {
            let bs = l.block_size();
            let mut bytes = sealed(l, &c, 2 * bs, &[]);
            bytes.extend_from_slice(&sealed(l, &c, 3 * bs, &[])[l.record_offset(2) as usize..]);
            assert_eq!(check(l, &bytes, &c).failed, vec![]);
        }
    }
}
