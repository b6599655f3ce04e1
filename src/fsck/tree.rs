//! The namespace half of fsck: walks the backing tree, checks every name the way the mount
//! reads it (`fs::names`, `fs::dir`), and collects the regular files for the content check.
//!
//! With encrypted names: every entry name decrypts under its parent directory's id (the root's
//! from the config, the others' from `.kmsfs.dirid`), every long name has a sidecar whose
//! content hashes to it and decrypts, no sidecar lacks its entry, no temporary entry is left
//! over, and every symlink target decrypts. With plaintext names there is nothing to decrypt:
//! every entry but the reserved root names is the user's.

use super::report::{Kind, Problem, Progress};
use crate::format::config::RESERVED_ROOT_NAMES;
use crate::format::name::{
    self, BackingEntry, DIR_ID_FILE, DirId, LONG_NAME_PREFIX, LONG_NAME_SIDECAR_SUFFIX, MAX_SIDECAR_LEN,
    NameCipher, TEMP_PREFIX,
};
use crate::fs::names::{Names, read_dir_id};
use crate::sys;
use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{File, FileType, OpenOptions};
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// A regular file to check, once per inode.
#[derive(Debug, Clone)]
pub struct FileRef {
    /// Every backing path (relative) that links to it; the first is the one reported.
    pub paths: Vec<PathBuf>,
    pub inode: u64,
}

/// What the walk found.
#[derive(Debug, Default)]
pub struct Tree {
    pub files: Vec<FileRef>,
    pub dirs: u64,
    pub symlinks: u64,
    pub other: u64,
    pub problems: Vec<Problem>,
}

/// The name ciphers and the directory id names in the current directory are bound to.
struct Encrypted<'a> {
    cipher: &'a NameCipher,
    /// `None` when the directory's id file is missing or damaged (already reported).
    dir_id: Option<DirId>,
}

struct Walker<'a> {
    /// The backing root; everything below it is opened relative to it, one component at a
    /// time, following no symlink (`sys::open_dir_beneath`).
    root: BorrowedFd<'a>,
    names: &'a Names,
    tree: Tree,
    /// (device, inode) → index in `tree.files`, so hard links are checked once.
    seen: HashMap<(u64, u64), usize>,
    todo: Vec<PathBuf>,
    entries: u64,
}

/// Walks the tree under `root` (never following symlinks, not even one swapped in for a
/// directory during the walk; never waiting on a FIFO; never entering kmsfs's own directories;
/// never writing).
pub fn walk(root: &Path, names: &Names, progress: &mut Progress) -> Tree {
    let root_fd: OwnedFd = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(root)
    {
        Ok(f) => f.into(),
        Err(e) => {
            let msg = format!("directory cannot be opened ({e})");
            let mut tree = Tree::default();
            tree.problems
                .push(Problem::new(Path::new(""), 0, Kind::Unreadable, msg));
            return tree;
        }
    };
    let mut w = Walker {
        root: root_fd.as_fd(),
        names,
        tree: Tree::default(),
        seen: HashMap::new(),
        todo: vec![PathBuf::new()],
        entries: 0,
    };
    while let Some(rel) = w.todo.pop() {
        w.dir(&rel);
        progress.update(|| format!("fsck: scanning, {} entries", w.entries));
    }
    w.tree
}

/// Lists a directory through its descriptor (not its path, which could lead elsewhere by now).
fn list(dir: BorrowedFd<'_>) -> std::io::Result<Vec<(OsString, FileType, u64)>> {
    let path = sys::proc_fd_path(dir);
    let mut entries = Vec::new();
    for e in std::fs::read_dir(Path::new(OsStr::from_bytes(path.as_bytes())))? {
        let e = e?;
        entries.push((e.file_name(), e.file_type()?, e.ino()));
    }
    Ok(entries)
}

impl Walker<'_> {
    fn problem(&mut self, p: Problem) {
        self.tree.problems.push(p);
    }

    fn dir(&mut self, rel: &Path) {
        self.tree.dirs += 1;
        let is_root = rel.as_os_str().is_empty();
        let opened = sys::open_dir_beneath(self.root, rel).and_then(|d| {
            let st = sys::fstat(d.as_fd())?;
            Ok((d, st.st_ino))
        });
        let (dir, ino) = match opened {
            Ok(d) => d,
            Err(e) => {
                let ino = sys::stat_beneath(self.root, rel).map(|st| st.st_ino).unwrap_or(0);
                let msg = format!("directory cannot be opened ({e})");
                self.problem(Problem::new(rel, ino, Kind::Unreadable, msg));
                return;
            }
        };
        let dir = dir.as_fd();
        let encrypted = match self.names {
            Names::Plain => None,
            Names::Encrypted { cipher, root_dir_id } => Some(Encrypted {
                cipher,
                dir_id: if is_root {
                    Some(*root_dir_id)
                } else {
                    self.dir_id(dir, rel, ino)
                },
            }),
        };
        let mut entries = match list(dir) {
            Ok(entries) => entries,
            Err(e) => {
                let msg = format!("directory cannot be listed ({e})");
                self.problem(Problem::new(rel, ino, Kind::Unreadable, msg));
                return;
            }
        };
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let present: HashSet<OsString> = entries.iter().map(|e| e.0.clone()).collect();
        for (name, ft, ino) in &entries {
            self.entries += 1;
            if is_root
                && RESERVED_ROOT_NAMES
                    .iter()
                    .any(|r| name.as_bytes() == r.as_bytes())
            {
                continue; // the config, the lock, lost+found: not the user's
            }
            let rel_e = rel.join(name);
            if encrypted.is_none() && name.as_bytes().starts_with(TEMP_PREFIX.as_bytes()) {
                // Hidden from a plaintext-names mount too.
                self.internal(&rel_e, name, *ino, &present);
                continue;
            }
            if let Some(enc) = &encrypted
                && !self.name(enc, dir, rel, &rel_e, name, *ino, &present)
            {
                continue; // one of kmsfs's own entries, checked and done with
            }
            if ft.is_dir() {
                self.todo.push(rel_e);
            } else if ft.is_symlink() {
                self.tree.symlinks += 1;
                // (Without its directory's id, the directory is already reported.)
                if let Some(Encrypted {
                    cipher,
                    dir_id: Some(id),
                }) = &encrypted
                {
                    self.symlink(cipher, id, dir, name, &rel_e, *ino);
                }
            } else if ft.is_file() {
                self.file(dir, name, &rel_e);
            } else {
                self.tree.other += 1;
            }
        }
    }

    /// The id of a directory other than the root, as `fs::names::read_dir_id` reads it.
    fn dir_id(&mut self, dir: BorrowedFd<'_>, rel: &Path, ino: u64) -> Option<DirId> {
        match read_dir_id(dir) {
            Ok(id) => Some(id),
            Err(e) => {
                let empty = || list(dir).is_ok_and(|l| l.is_empty());
                let (kind, msg) = match e.raw_os_error() {
                    _ if e.kind() == std::io::ErrorKind::NotFound && empty() => (
                        Kind::EmptyDirWithoutId,
                        "empty directory without its id file (an rmdir cut short); the mount gives it a new one"
                            .to_string(),
                    ),
                    _ if e.kind() == std::io::ErrorKind::NotFound => (
                        Kind::DirId,
                        format!(
                            "directory has no id file ({DIR_ID_FILE}): no name in it can be decrypted, \
                             the mount reads it as damaged"
                        ),
                    ),
                    Some(libc::EACCES) | Some(libc::EPERM) => (
                        Kind::Unreadable,
                        format!("directory id file cannot be read ({e})"),
                    ),
                    _ => (
                        Kind::DirId,
                        format!("directory id file is damaged ({e}): no name in it can be decrypted"),
                    ),
                };
                let p = Problem::new(rel, ino, kind, msg);
                self.problem(if kind == Kind::DirId { p.quarantine(&[]) } else { p });
                None
            }
        }
    }

    /// Checks one entry name of an encrypted-names directory; false for kmsfs's own entries
    /// (which the caller must not treat as user entries).
    #[allow(clippy::too_many_arguments)]
    fn name(
        &mut self,
        enc: &Encrypted<'_>,
        dir: BorrowedFd<'_>,
        rel: &Path,
        rel_e: &Path,
        name: &OsStr,
        ino: u64,
        present: &HashSet<OsString>,
    ) -> bool {
        match name::classify(name.as_bytes()) {
            BackingEntry::Internal => {
                self.internal(rel_e, name, ino, present);
                false
            }
            BackingEntry::Short(encoded) => {
                if let Some(id) = enc.dir_id
                    && enc.cipher.decrypt_name(&id, encoded).is_err()
                {
                    let msg = "name does not decrypt under its directory's id (altered, or moved from \
                               another directory); the mount does not list it";
                    self.problem(Problem::new(rel_e, ino, Kind::Name, msg).quarantine(&[]));
                }
                true
            }
            BackingEntry::Long(long) => {
                if let Some(id) = enc.dir_id {
                    self.long_name(enc.cipher, &id, dir, rel, rel_e, long, ino);
                }
                true
            }
        }
    }

    /// kmsfs's own entries: id files (read with their directory), temporary entries, sidecars.
    fn internal(&mut self, rel_e: &Path, name: &OsStr, ino: u64, present: &HashSet<OsString>) {
        let Ok(s) = std::str::from_utf8(name.as_bytes()) else {
            return;
        };
        if s.starts_with(TEMP_PREFIX) {
            let msg = "temporary entry left by an interrupted create, or a file made ahead of creates by a \
                       mount that ended without removing it (hidden from the mount)";
            self.problem(Problem::new(rel_e, ino, Kind::Temp, msg).quarantine(&[]));
        } else if let Some(long) = s
            .strip_suffix(LONG_NAME_SIDECAR_SUFFIX)
            .filter(|l| l.starts_with(LONG_NAME_PREFIX))
            && !present.contains(OsStr::new(long))
        {
            let msg = "long-name sidecar without its entry (left by an interrupted remove or rename)";
            self.problem(Problem::new(rel_e, ino, Kind::OrphanSidecar, msg).quarantine(&[]));
        }
        // DIR_ID_FILE is read with its directory; anything else starting with '.' (another
        // tool's temporary file, NFS's silly renames) is not kmsfs's and is left alone.
    }

    /// A long name: its sidecar must exist, hash to the entry's name, and decrypt.
    #[allow(clippy::too_many_arguments)]
    fn long_name(
        &mut self,
        cipher: &NameCipher,
        id: &DirId,
        dir: BorrowedFd<'_>,
        rel: &Path,
        rel_e: &Path,
        long: &str,
        ino: u64,
    ) {
        let sidecar_name = name::sidecar_of(long);
        let sidecar = rel.join(&sidecar_name);
        let problem = match read_sidecar(dir, &sidecar_name) {
            Err(SidecarError::Missing) => Some((
                Kind::Sidecar,
                "long name without its sidecar: the name cannot be decrypted".to_string(),
                vec![],
            )),
            Err(SidecarError::Unreadable(e)) => Some((
                Kind::Unreadable,
                format!("long-name sidecar cannot be read ({e})"),
                vec![],
            )),
            Err(SidecarError::Mismatch(why)) => Some((
                Kind::Sidecar,
                format!(
                    "long-name sidecar does not belong to this entry ({why}): the name cannot be decrypted"
                ),
                vec![sidecar],
            )),
            Ok(encoded) => cipher.decrypt_name(id, &encoded).err().map(|_| {
                (
                    Kind::Name,
                    "long name (in its sidecar) does not decrypt under its directory's id".to_string(),
                    vec![sidecar],
                )
            }),
        };
        if let Some((kind, msg, also)) = problem {
            let p = Problem::new(rel_e, ino, kind, msg);
            self.problem(if kind == Kind::Unreadable {
                p
            } else {
                p.quarantine(&also)
            });
        }
    }

    fn symlink(
        &mut self,
        cipher: &NameCipher,
        dir_id: &DirId,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        rel_e: &Path,
        ino: u64,
    ) {
        let target = sys::openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0)
            .and_then(|fd| sys::readlink_fd(fd.as_fd()));
        match target {
            Ok(target) => {
                if cipher.decrypt_symlink(dir_id, &target).is_err() {
                    let msg = "symlink target does not decrypt in its directory (altered, or moved here)";
                    self.problem(Problem::new(rel_e, ino, Kind::Symlink, msg).quarantine(&[]));
                }
            }
            Err(e) => {
                let msg = format!("symlink cannot be read ({e})");
                self.problem(Problem::new(rel_e, ino, Kind::Unreadable, msg));
            }
        }
    }

    fn file(&mut self, dir: BorrowedFd<'_>, name: &OsStr, rel_e: &Path) {
        match sys::fstatat(dir, name) {
            Ok(st) => match self.seen.get(&(st.st_dev, st.st_ino)) {
                Some(&i) => self.tree.files[i].paths.push(rel_e.to_path_buf()),
                None => {
                    self.seen.insert((st.st_dev, st.st_ino), self.tree.files.len());
                    self.tree.files.push(FileRef {
                        paths: vec![rel_e.to_path_buf()],
                        inode: st.st_ino,
                    });
                }
            },
            Err(e) => {
                let msg = format!("file cannot be read ({e})");
                self.problem(Problem::new(rel_e, 0, Kind::Unreadable, msg));
            }
        }
    }
}

#[derive(Debug)]
enum SidecarError {
    Missing,
    Unreadable(std::io::Error),
    Mismatch(&'static str),
}

/// Reads a sidecar (`file_name` in `dir`) as `fs::names` does: only a regular file, never
/// through a symlink or waiting on a FIFO, at most `MAX_SIDECAR_LEN` + 1 bytes, UTF-8, and its
/// hash must be the long name it sits beside (`file_name` minus the suffix).
fn read_sidecar(dir: BorrowedFd<'_>, file_name: &str) -> Result<String, SidecarError> {
    let (fd, _) = sys::open_regular_at(dir, OsStr::new(file_name), libc::O_RDONLY, 0).map_err(|e| {
        match e.kind() {
            std::io::ErrorKind::NotFound => SidecarError::Missing,
            // A symlink, FIFO or device: the mount cannot read it either.
            std::io::ErrorKind::InvalidData => SidecarError::Mismatch("not a regular file"),
            _ => SidecarError::Unreadable(e),
        }
    })?;
    let f = File::from(fd);
    let mut buf = Vec::new();
    f.take(MAX_SIDECAR_LEN as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(SidecarError::Unreadable)?;
    if buf.len() > MAX_SIDECAR_LEN {
        return Err(SidecarError::Mismatch("too long"));
    }
    let encoded = String::from_utf8(buf).map_err(|_| SidecarError::Mismatch("not UTF-8"))?;
    let file_name = file_name.as_bytes();
    let long = &file_name[..file_name.len().saturating_sub(LONG_NAME_SIDECAR_SUFFIX.len())];
    if name::long_name_of(&encoded).as_bytes() != long {
        return Err(SidecarError::Mismatch("its hash is not the entry's name"));
    }
    Ok(encoded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SecretKey;
    use crate::format::config::LOST_FOUND_NAME;
    use crate::format::name::DIR_ID_LEN;

    fn names() -> Names {
        Names::Encrypted {
            cipher: Box::new(NameCipher::new(
                &SecretKey::generate(),
                b"volume",
                crate::format::VOLUME_FORMAT,
            )),
            root_dir_id: [3; DIR_ID_LEN],
        }
    }

    fn kinds(t: &Tree) -> Vec<(String, Kind)> {
        let mut v: Vec<_> = t
            .problems
            .iter()
            .map(|p| (p.path.to_string_lossy().into_owned(), p.kind))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_sound_tree_has_no_problems_and_every_damage_is_named() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let n = names();
        let Names::Encrypted { cipher, root_dir_id } = &n else {
            unreachable!()
        };
        // root: a file, a long-named file with its sidecar, a directory with its id
        let short = cipher.encrypt_name(root_dir_id, b"report.pdf").unwrap();
        std::fs::write(root.join(&short), b"").unwrap();
        let enc_long = cipher.encrypt_name(root_dir_id, &[b'x'; 200]).unwrap();
        let (long, needs_sidecar) = name::backing_name_for(&enc_long);
        assert!(needs_sidecar);
        std::fs::write(root.join(&long), b"").unwrap();
        std::fs::write(root.join(name::sidecar_of(&long)), &enc_long).unwrap();
        let sub = cipher.encrypt_name(root_dir_id, b"sub").unwrap();
        std::fs::create_dir(root.join(&sub)).unwrap();
        std::fs::write(root.join(&sub).join(DIR_ID_FILE), [9u8; DIR_ID_LEN]).unwrap();
        let inner = cipher.encrypt_name(&[9; DIR_ID_LEN], b"inner").unwrap();
        std::os::unix::fs::symlink(
            cipher.encrypt_symlink(&[9; DIR_ID_LEN], b"../report.pdf"),
            root.join(&sub).join(&inner),
        )
        .unwrap();
        std::fs::write(root.join("kmsfs.json"), b"{}").unwrap();
        std::fs::create_dir(root.join(LOST_FOUND_NAME)).unwrap();
        std::fs::write(root.join(LOST_FOUND_NAME).join("junk"), b"").unwrap();
        let t = walk(root, &n, &mut Progress::new());
        assert_eq!(kinds(&t), vec![]);
        assert_eq!((t.dirs, t.files.len(), t.symlinks), (2, 2, 1));

        // Now damage: a name moved to another directory, a sidecar without entry, a temp
        // directory, a directory without id, a symlink target altered.
        std::fs::rename(root.join(&short), root.join(&sub).join(&short)).unwrap();
        std::fs::write(root.join("kmsfs.long.AAAA.name"), b"x").unwrap();
        std::fs::create_dir(root.join(".kmsfs.tmp.0011")).unwrap();
        let empty = cipher.encrypt_name(root_dir_id, b"empty").unwrap();
        std::fs::create_dir(root.join(&empty)).unwrap();
        let no_id = cipher.encrypt_name(root_dir_id, b"no id").unwrap();
        std::fs::create_dir(root.join(&no_id)).unwrap();
        std::fs::write(root.join(&no_id).join("AAAAAAAAAAAAAAAAAAAAAA"), b"").unwrap();
        std::fs::remove_file(root.join(&sub).join(&inner)).unwrap();
        std::os::unix::fs::symlink(
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            root.join(&sub).join(&inner),
        )
        .unwrap();
        std::fs::write(root.join(name::sidecar_of(&long)), b"tampered").unwrap();
        let t = walk(root, &n, &mut Progress::new());
        let mut expected = vec![
            (".kmsfs.tmp.0011".to_string(), Kind::Temp),
            (empty.clone(), Kind::EmptyDirWithoutId),
            (no_id.clone(), Kind::DirId),
            (long.clone(), Kind::Sidecar),
            ("kmsfs.long.AAAA.name".to_string(), Kind::OrphanSidecar),
            (format!("{sub}/{short}"), Kind::Name),
            (format!("{sub}/{inner}"), Kind::Symlink),
        ];
        expected.sort();
        assert_eq!(kinds(&t), expected);
        // Every one of them but the empty directory (which the mount repairs) is quarantined
        // by --repair; the bad sidecar goes with its entry.
        assert!(
            t.problems
                .iter()
                .all(|p| p.quarantine.is_empty() == (p.kind == Kind::EmptyDirWithoutId))
        );
        let lp = t.problems.iter().find(|p| p.kind == Kind::Sidecar).unwrap();
        assert_eq!(lp.quarantine.len(), 2);
    }

    #[test]
    fn plaintext_names_are_all_the_users_but_temporary_entries() {
        let d = tempfile::tempdir().unwrap();
        for n in [".hidden", "kmsfs.long.x.name", ".kmsfs.tmp.1"] {
            std::fs::write(d.path().join(n), b"").unwrap();
        }
        std::fs::write(d.path().join(".kmsfs.lock"), b"").unwrap();
        let t = walk(d.path(), &Names::Plain, &mut Progress::new());
        assert_eq!(kinds(&t), vec![(".kmsfs.tmp.1".to_string(), Kind::Temp)]);
        assert_eq!(t.files.len(), 2);
    }
}
