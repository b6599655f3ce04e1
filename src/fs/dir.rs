//! Namespace operations: lookup, create, remove, rename, link, symlinks and listings, with
//! names translated through `names` (encrypted under the parent directory's id).
//!
//! Crash ordering, so that no entry is ever unreachable (docs/format.md, "Names"):
//! - a directory is made under a hidden temporary name, given its id file (fsynced), then
//!   renamed into place;
//! - a long name's sidecar is written (and fsynced) before its entry, and removed after it;
//! - a symlink moved to another directory (format 2 binds its target to its directory) is
//!   made anew there, renamed into place, and only then removed from where it was.

use super::attr::Attr;
use super::error::{FsError, FsResult};
use super::inode::{Inode, Kind, ROOT_INO};
use super::names::{self, BackingName, Names};
use super::{Caller, DirEntry, Fs, Handle};
use crate::format::name::{DIR_ID_FILE, DIR_ID_LEN, DirId, NameCipher, symlink_plain_len};
use crate::sys;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

/// A symlink made anew for the directory it moves to (see `Fs::rename`).
struct Resealed {
    /// Its temporary name in the new directory.
    tmp: OsString,
    /// The new link and the old one, by descriptor.
    new: OwnedFd,
    old: OwnedFd,
}

impl Fs {
    /// The id names in `dir` are bound to (`None` with plaintext names).
    pub(super) fn dir_id(&self, dir: &Inode) -> FsResult<Option<DirId>> {
        self.dir_id_in(&*self.names()?, dir)
    }

    /// [`Fs::dir_id`] with the name ciphers the caller already holds.
    fn dir_id_in(&self, names: &Names, dir: &Inode) -> FsResult<Option<DirId>> {
        let Names::Encrypted { root_dir_id, .. } = names else {
            return Ok(None);
        };
        if dir.ino == ROOT_INO {
            return Ok(Some(*root_dir_id));
        }
        if let Some(id) = dir.dir_id.get() {
            return Ok(Some(*id));
        }
        let id = match names::read_dir_id(dir.fd()) {
            Ok(id) => id,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && list_backing(dir.fd())?.is_empty() => {
                self.renew_dir_id(dir)?
            }
            Err(e) => {
                log::error!("directory inode {}: missing or damaged id file ({e})", dir.ino);
                return Err(FsError::Corrupt);
            }
        };
        Ok(Some(*dir.dir_id.get_or_init(|| id)))
    }

    /// An id for an empty directory that has lost its id file: what an rmdir (or a rename
    /// over it) cut short by a crash or power cut leaves, as they remove the id file first.
    /// No name in it can be lost, so it gets a new id and reads as the empty directory it is.
    /// (Removing the id file of a directory that has entries still reads as damaged.)
    fn renew_dir_id(&self, dir: &Inode) -> FsResult<DirId> {
        let mut id = [0u8; DIR_ID_LEN];
        crate::crypto::fill_random(&mut id);
        if self.check_writable().is_err() {
            // Nothing can be created in it, so an id kept in memory serves its lookups.
            return Ok(id);
        }
        match names::write_dir_id(dir.fd(), &id) {
            Ok(()) => {
                log::warn!(
                    "directory inode {}: empty and without its id file (an rmdir cut short?); gave it a new one",
                    dir.ino
                );
                Ok(id)
            }
            // Another request renewed it first.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(names::read_dir_id(dir.fd())?),
            Err(e) => Err(e.into()),
        }
    }

    pub(super) fn backing(&self, dir: &Inode, name: &OsStr) -> FsResult<BackingName> {
        let names = self.names()?;
        let id = self.dir_id_in(&names, dir)?;
        names.to_backing(id.as_ref(), dir.ino == ROOT_INO, name)
    }

    /// Attributes as the mount shows them.
    pub(super) fn attr_from(&self, inode: &Inode, st: &libc::stat) -> Attr {
        let mut attr = Attr::from_stat(inode.ino, st, self.layout, inode.content().map(|c| c.size()));
        if inode.kind == Kind::Symlink && self.names_encrypted {
            attr.size = symlink_plain_len(attr.size);
        }
        attr
    }

    /// Looks `name` up in `parent` and counts a kernel reference to the result.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        let dir = self.inodes.get(parent)?;
        let b = match self.backing(&dir, name) {
            Err(FsError::Reserved) => {
                return Err(FsError::NotFound);
            }
            other => other?,
        };
        self.lookup_backing(&dir, &b.name)
    }

    fn lookup_backing(&self, dir: &Inode, backing: &OsStr) -> FsResult<Attr> {
        let fd = sys::openat(dir.fd(), backing, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        let st = sys::fstatat(fd.as_fd(), OsStr::new(""))?;
        let inode = self.inodes.lookup(fd, &st);
        let was = inode.parent.swap(dir.ino, std::sync::atomic::Ordering::Relaxed);
        // Format 2 seals a symlink's target for its one directory, and kmsfs never links one
        // into a second: met in two, it is a hard link the storage made, and whichever
        // directory was looked up last must not decide which target reads as valid.
        if inode.kind == Kind::Symlink
            && was != 0
            && was != dir.ino
            && self.names()?.cipher().is_some_and(NameCipher::binds_placement)
        {
            inode.parent.store(was, std::sync::atomic::Ordering::Relaxed);
            self.inodes.forget(inode.ino, 1);
            log::error!(
                "symlink inode {}: found in directory inodes {was} and {} (a hard link kmsfs did not make)",
                inode.ino,
                dir.ino
            );
            return Err(FsError::Corrupt);
        }
        Ok(self.attr_from(&inode, &st))
    }

    /// The parent inode for a change to its entries, and the backing name of `name` in it.
    fn prepare_change(&self, parent: u64, name: &OsStr) -> FsResult<(Arc<Inode>, BackingName)> {
        self.check_writable()?;
        let dir = self.inodes.get(parent)?;
        let b = self.backing(&dir, name)?;
        Ok((dir, b))
    }

    /// Creates an entry with `make`, writing a long name's sidecar first and removing it again
    /// if `make` fails.
    pub(super) fn create_entry<T>(
        &self,
        dir: &Inode,
        b: &BackingName,
        make: impl FnOnce(&OsStr) -> FsResult<T>,
    ) -> FsResult<T> {
        let wrote_sidecar = match &b.sidecar {
            Some((_, encoded)) => names::write_sidecar(dir.fd(), &b.name, encoded)?,
            None => false,
        };
        let result = make(&b.name);
        if result.is_err()
            && wrote_sidecar
            && let Some((sidecar, _)) = &b.sidecar
        {
            let _ = sys::unlinkat(dir.fd(), sidecar, false);
        }
        result
    }

    /// Removes a long name's sidecar once its entry is gone.
    fn remove_sidecar(&self, dir: &Inode, b: &BackingName) {
        if let Some((sidecar, _)) = &b.sidecar
            && let Err(e) = sys::unlinkat(dir.fd(), sidecar, false)
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            log::warn!(
                "directory inode {}: cannot remove a long-name sidecar: {e}",
                dir.ino
            );
        }
    }

    /// Gives a new entry to its caller (when we run as root) and looks it up.
    pub(super) fn finish_create(&self, dir: &Inode, backing: &OsStr, caller: Caller) -> FsResult<Attr> {
        let fd = sys::openat(dir.fd(), backing, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        self.give_to_caller(dir, fd.as_fd(), caller)?;
        let st = sys::fstatat(fd.as_fd(), OsStr::new(""))?;
        let inode = self.inodes.lookup(fd, &st);
        inode.parent.store(dir.ino, std::sync::atomic::Ordering::Relaxed);
        Ok(self.attr_from(&inode, &st))
    }

    fn give_to_caller(&self, dir: &Inode, fd: BorrowedFd<'_>, caller: Caller) -> FsResult<()> {
        if !self.chown_to_caller {
            return Ok(());
        }
        // In a set-group-id directory the new entry keeps the directory's group, as the
        // backing filesystem already arranged.
        let dir_st = sys::fstatat(dir.fd(), OsStr::new(""))?;
        let gid = (dir_st.st_mode & libc::S_ISGID == 0).then_some(caller.gid);
        sys::chown_fd(fd, Some(caller.uid), gid)?;
        Ok(())
    }

    pub fn mkdir(&self, parent: u64, name: &OsStr, mode: u32, caller: Caller) -> FsResult<Attr> {
        let (dir, b) = self.prepare_change(parent, name)?;
        if !self.names_encrypted {
            sys::mkdirat(dir.fd(), &b.name, mode & 0o7777)?;
            return self.finish_create(&dir, &b.name, caller);
        }
        // Made under a hidden name and given its id before it can be seen: a directory
        // without an id would hold names nobody can decrypt.
        let tmp = names::temp_name();
        sys::mkdirat(dir.fd(), &tmp, 0o700)?;
        let made = (|| -> FsResult<()> {
            let tfd = sys::openat(
                dir.fd(),
                &tmp,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )?;
            let mut id = [0u8; DIR_ID_LEN];
            crate::crypto::fill_random(&mut id);
            names::write_dir_id_file(tfd.as_fd(), &id)?;
            // Asked-for mode only now that the id file is in. A set-group-id parent passes its
            // bit on, as mkdir(2) would have.
            let parent_st = sys::fstatat(dir.fd(), OsStr::new(""))?;
            let inherit = parent_st.st_mode & libc::S_ISGID;
            sys::fchmod(tfd.as_fd(), (mode & 0o7777) | inherit)?;
            // Its id file's entry and its mode are durable before it gets its name.
            sys::fsync_dir(tfd.as_fd())?;
            self.create_entry(&dir, &b, |final_name| {
                Ok(sys::renameat2(
                    dir.fd(),
                    &tmp,
                    dir.fd(),
                    final_name,
                    libc::RENAME_NOREPLACE,
                )?)
            })
        })();
        if let Err(e) = made {
            let _ = remove_temp_dir(dir.fd(), &tmp);
            return Err(e);
        }
        self.finish_create(&dir, &b.name, caller)
    }

    pub fn mknod(&self, parent: u64, name: &OsStr, mode: u32, rdev: u64, caller: Caller) -> FsResult<Attr> {
        if mode & libc::S_IFMT == libc::S_IFREG || mode & libc::S_IFMT == 0 {
            let (attr, fh) = self.create(parent, name, mode, libc::O_WRONLY, caller)?;
            self.release(fh);
            return Ok(attr);
        }
        let (dir, b) = self.prepare_change(parent, name)?;
        self.create_entry(&dir, &b, |n| Ok(sys::mknodat(dir.fd(), n, mode, rdev)?))?;
        self.finish_create(&dir, &b.name, caller)
    }

    pub fn symlink(&self, parent: u64, name: &OsStr, target: &OsStr, caller: Caller) -> FsResult<Attr> {
        let (dir, b) = self.prepare_change(parent, name)?;
        let stored = self.stored_target(&dir, target.as_bytes())?;
        self.create_entry(&dir, &b, |n| Ok(sys::symlinkat(&stored, dir.fd(), n)?))?;
        self.finish_create(&dir, &b.name, caller)
    }

    /// The stored form of a symlink target for a link in `dir`.
    fn stored_target(&self, dir: &Inode, target: &[u8]) -> FsResult<OsString> {
        let names = self.names()?;
        let stored: OsString = match (names.cipher(), self.dir_id_in(&names, dir)?) {
            (Some(c), Some(id)) => c.encrypt_symlink(&id, target).into(),
            _ => OsStr::from_bytes(target).to_os_string(),
        };
        if stored.len() >= libc::PATH_MAX as usize {
            return Err(FsError::NameTooLong);
        }
        Ok(stored)
    }

    /// The target of the symlink `stored` (as read from the backing link) in `dir`.
    fn plain_target(&self, dir: &Inode, stored: Vec<u8>, ino: u64) -> FsResult<Vec<u8>> {
        let names = self.names()?;
        match (names.cipher(), self.dir_id_in(&names, dir)?) {
            (Some(c), Some(id)) => c.decrypt_symlink(&id, &stored).map_err(|_| {
                log::error!(
                    "symlink inode {ino}: target does not decrypt in directory inode {} (altered, or moved there)",
                    dir.ino
                );
                FsError::Corrupt
            }),
            _ => Ok(stored),
        }
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let inode = self.inodes.get(ino)?;
        let stored = sys::readlink_fd(inode.fd())?;
        let names = self.names()?;
        let Some(cipher) = names.cipher() else {
            return Ok(stored);
        };
        if !cipher.binds_placement() {
            // Format 1: the target is bound to the volume only; any directory's id will do.
            return cipher.decrypt_symlink(&[0; DIR_ID_LEN], &stored).map_err(|_| {
                log::error!("symlink inode {ino}: target does not decrypt");
                FsError::Corrupt
            });
        }
        // A link is only ever reached through a lookup in its directory, which records it.
        let dir = match inode.parent.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            p => self.inodes.get(p).ok(),
        };
        let Some(dir) = dir else {
            log::error!("symlink inode {ino}: its directory is not known");
            return Err(FsError::Corrupt);
        };
        self.plain_target(&dir, stored, ino)
    }

    /// Whether a symlink's stored target is bound to `from` and must be sealed again to live
    /// in `to` (volume format 2, encrypted names, two different directories).
    fn rebinds(&self, from: u64, to: &Inode) -> FsResult<bool> {
        Ok(from != to.ino && self.names()?.cipher().is_some_and(NameCipher::binds_placement))
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> FsResult<Attr> {
        let (dir, b) = self.prepare_change(newparent, newname)?;
        let inode = self.inodes.get(ino)?;
        // A symlink's target is sealed for its directory: one backing link cannot be valid in
        // two. As for a link across filesystems, `ln`, `cp -l` and `mv` report it or copy.
        if inode.kind == Kind::Symlink {
            let home = inode.parent.load(std::sync::atomic::Ordering::Relaxed);
            if self.rebinds(home, &dir)? {
                return Err(FsError::CrossDirectory);
            }
        }
        self.create_entry(&dir, &b, |n| Ok(sys::link_fd(inode.fd(), dir.fd(), n)?))?;
        self.lookup_backing(&dir, &b.name)
    }

    /// For a rename of a symlink that must be sealed again for its new directory: the resealed
    /// link, made whole under a temporary name in `to_dir`, to be renamed into place.
    fn resealed_link(
        &self,
        from_dir: &Inode,
        from: &BackingName,
        to_dir: &Inode,
        to: &BackingName,
        flags: u32,
    ) -> FsResult<Option<Resealed>> {
        if !self.rebinds(from_dir.ino, to_dir)? {
            return Ok(None);
        }
        let is_link = |dir: &Inode, b: &BackingName| {
            sys::fstatat(dir.fd(), &b.name).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK)
        };
        if flags & libc::RENAME_EXCHANGE != 0 {
            return match is_link(from_dir, from) || is_link(to_dir, to) {
                true => Err(FsError::CrossDirectory),
                false => Ok(None),
            };
        }
        let fd = sys::openat(from_dir.fd(), &from.name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        let st = sys::fstatat(fd.as_fd(), OsStr::new(""))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFLNK {
            return Ok(None);
        }
        let target = self.plain_target(from_dir, sys::readlink_fd(fd.as_fd())?, st.st_ino)?;
        let stored = self.stored_target(to_dir, &target)?;
        let tmp = names::temp_name();
        sys::symlinkat(&stored, to_dir.fd(), &tmp)?;
        // Held by descriptor from here on: the rename keeps the object, and nothing the
        // storage swaps in under the name afterwards is taken for it.
        let made = sys::openat(to_dir.fd(), &tmp, libc::O_PATH | libc::O_NOFOLLOW, 0).and_then(|new| {
            let nst = sys::fstatat(new.as_fd(), OsStr::new(""))?;
            if nst.st_mode & libc::S_IFMT != libc::S_IFLNK {
                return Err(sys::wrong_type(nst.st_mode, "symlink"));
            }
            // Same owner and times as the link it replaces: a move changes neither.
            sys::chown_fd(new.as_fd(), Some(st.st_uid), Some(st.st_gid))?;
            let at = |s: i64, ns: i64| Some(Some((s, ns)));
            sys::utimens_fd(
                new.as_fd(),
                at(st.st_atime, st.st_atime_nsec),
                at(st.st_mtime, st.st_mtime_nsec),
            )?;
            Ok(new)
        });
        match made {
            Ok(new) => Ok(Some(Resealed { tmp, new, old: fd })),
            Err(e) => {
                let _ = sys::unlinkat(to_dir.fd(), &tmp, false);
                Err(e.into())
            }
        }
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let (dir, b) = self.prepare_change(parent, name)?;
        sys::unlinkat(dir.fd(), &b.name, false)?;
        self.remove_sidecar(&dir, &b);
        Ok(())
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let (dir, b) = self.prepare_change(parent, name)?;
        if self.names_encrypted {
            let sub = sys::openat(
                dir.fd(),
                &b.name,
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )?;
            // Only the id file may remain; it goes first (and comes back if rmdir fails).
            let id = names::read_dir_id(sub.as_fd()).ok();
            if list_backing(sub.as_fd())?
                .iter()
                .any(|n| n.as_bytes() != DIR_ID_FILE.as_bytes())
            {
                return Err(FsError::NotEmpty);
            }
            if id.is_some() {
                sys::unlinkat(sub.as_fd(), OsStr::new(DIR_ID_FILE), false)?;
            }
            if let Err(e) = sys::unlinkat(dir.fd(), &b.name, true) {
                if let Some(id) = id {
                    let _ = names::write_dir_id(sub.as_fd(), &id);
                }
                return Err(e.into());
            }
        } else {
            sys::unlinkat(dir.fd(), &b.name, true)?;
        }
        self.remove_sidecar(&dir, &b);
        Ok(())
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> FsResult<()> {
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 {
            return Err(FsError::InvalidArgument);
        }
        let (from_dir, from) = self.prepare_change(parent, name)?;
        let (to_dir, to) = self.prepare_change(newparent, newname)?;
        // Replacing an empty directory: its id file must go first (and comes back if the
        // rename fails), or the backing rename sees a non-empty directory.
        let same_entry = from_dir.ino == to_dir.ino && from.name == to.name;
        let replaced = match flags {
            0 if !same_entry => self.take_empty_dir_id(&to_dir, &to.name)?,
            _ => None,
        };
        // A symlink moving to another directory is sealed again for it (format 2): the new
        // link is renamed into place, then the old one removed, so a crash between the two
        // leaves both, never neither. An exchange would need both at once: EXDEV, as for an
        // exchange across filesystems.
        let resealed = match self.resealed_link(&from_dir, &from, &to_dir, &to, flags) {
            Ok(r) => r,
            Err(e) => {
                self.restore_dir_id(replaced);
                return Err(e);
            }
        };
        // The new name (re-encrypted under the new parent's id) gets its sidecar first; a
        // directory keeps its id, so everything below it stays readable.
        let result = self.create_entry(&to_dir, &to, |n| match &resealed {
            Some(r) => Ok(sys::renameat2(to_dir.fd(), &r.tmp, to_dir.fd(), n, flags)?),
            None => Ok(sys::renameat2(from_dir.fd(), &from.name, to_dir.fd(), n, flags)?),
        });
        if let Err(e) = result {
            if let Some(r) = &resealed {
                let _ = sys::unlinkat(to_dir.fd(), &r.tmp, false);
            }
            self.restore_dir_id(replaced);
            return Err(e);
        }
        if let Some(r) = resealed {
            // The rename is done: what follows is cleanup, and the move has happened whatever
            // it meets (an old link left behind is a duplicate, not a loss).
            if let Err(e) = sys::unlinkat(from_dir.fd(), &from.name, false) {
                log::warn!(
                    "directory inode {}: a symlink moved out stays behind as well: {e}",
                    from_dir.ino
                );
            }
            // The kernel moves its inode along: point it at the new link, unless the old one
            // lives on under another name (a hard link in its directory), which keeps it.
            if let Ok(o) = sys::fstatat(r.old.as_fd(), OsStr::new(""))
                && o.st_nlink == 0
                && let Ok(st) = sys::fstatat(r.new.as_fd(), OsStr::new(""))
            {
                self.inodes.rebind((o.st_dev, o.st_ino), r.new, &st, to_dir.ino);
            }
        }
        if flags & libc::RENAME_EXCHANGE == 0 && !same_entry {
            self.remove_sidecar(&from_dir, &from);
        }
        self.renamed_between(&from_dir, &to_dir);
        if flags & libc::RENAME_EXCHANGE != 0 {
            self.renamed_between(&to_dir, &from_dir);
        }
        Ok(())
    }

    /// Puts back the id file `take_empty_dir_id` removed, after a rename that failed.
    fn restore_dir_id(&self, replaced: Option<(std::os::fd::OwnedFd, DirId)>) {
        if let Some((fd, id)) = replaced {
            let _ = names::write_dir_id(fd.as_fd(), &id);
        }
    }

    /// If `backing` in `dir` is a directory holding nothing but its id file, removes the id
    /// file and returns the directory and its id (to restore on failure). A non-empty
    /// directory is left alone: the rename then fails with ENOTEMPTY, as it should.
    fn take_empty_dir_id(
        &self,
        dir: &Inode,
        backing: &OsStr,
    ) -> FsResult<Option<(std::os::fd::OwnedFd, DirId)>> {
        if !self.names_encrypted {
            return Ok(None);
        }
        let Ok(sub) = sys::openat(
            dir.fd(),
            backing,
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        ) else {
            return Ok(None);
        };
        let Ok(id) = names::read_dir_id(sub.as_fd()) else {
            return Ok(None);
        };
        if list_backing(sub.as_fd())?
            .iter()
            .any(|n| n.as_bytes() != DIR_ID_FILE.as_bytes())
        {
            return Ok(None);
        }
        sys::unlinkat(sub.as_fd(), OsStr::new(DIR_ID_FILE), false)?;
        Ok(Some((sub, id)))
    }

    pub fn opendir(&self, ino: u64) -> FsResult<u64> {
        let inode = self.inodes.get(ino)?;
        let id = self.dir_id(&inode)?;
        let names = self.names()?;
        let path = sys::proc_fd_path(inode.fd());
        let mut entries = Vec::new();
        let mut undecryptable = 0usize;
        for e in std::fs::read_dir(std::path::Path::new(OsStr::from_bytes(path.as_bytes())))? {
            let e = e?;
            let name = match names.from_backing(inode.fd(), id.as_ref(), ino == ROOT_INO, &e.file_name()) {
                None => continue,
                Some(Ok(name)) => name,
                Some(Err(_)) => {
                    undecryptable += 1;
                    continue;
                }
            };
            use std::os::unix::fs::DirEntryExt;
            entries.push(DirEntry {
                ino: e.ino(),
                kind: kind_of(&e.file_type()?),
                name,
            });
        }
        if undecryptable > 0 {
            log::warn!(
                "directory inode {ino}: skipped {undecryptable} entries whose names do not decrypt \
                 (altered, or not written by this volume)"
            );
        }
        self.add_handle(Handle::Dir {
            entries: Arc::new(entries),
        })
    }

    /// The directory's entries after `offset` (entries are numbered from 1; `.` and `..` come
    /// first).
    ///
    /// A listing from its start unwraps the keys of the files in it that `caller` could open
    /// ahead, in the background (`prefetch`).
    pub fn readdir(&self, ino: u64, fh: u64, offset: u64, caller: Caller) -> FsResult<Vec<(u64, DirEntry)>> {
        let entries = match &*self.handle(fh)? {
            Handle::Dir { entries } => entries.clone(),
            Handle::File { .. } => return Err(FsError::BadHandle),
        };
        if offset == 0 {
            self.prefetch_listed(ino, caller);
        }
        let dot = |name: &str, ino| DirEntry {
            ino,
            kind: Kind::Dir,
            name: name.into(),
        };
        Ok([dot(".", ino), dot("..", ROOT_INO)]
            .into_iter()
            .chain(entries.iter().cloned())
            .enumerate()
            .map(|(i, e)| (i as u64 + 1, e))
            .skip(offset as usize)
            .collect())
    }

    pub fn releasedir(&self, fh: u64) {
        self.handles().remove(&fh);
    }
}

fn kind_of(ft: &std::fs::FileType) -> Kind {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        Kind::Dir
    } else if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_fifo() {
        Kind::Fifo
    } else if ft.is_socket() {
        Kind::Socket
    } else if ft.is_char_device() {
        Kind::CharDevice
    } else if ft.is_block_device() {
        Kind::BlockDevice
    } else {
        Kind::File
    }
}

/// Every backing name in a directory.
fn list_backing(dir: BorrowedFd<'_>) -> std::io::Result<Vec<OsString>> {
    let path = sys::proc_fd_path(dir);
    std::fs::read_dir(std::path::Path::new(OsStr::from_bytes(path.as_bytes())))?
        .map(|e| e.map(|e| e.file_name()))
        .collect()
}

/// Removes a half-made directory (its id file, then itself).
fn remove_temp_dir(parent: BorrowedFd<'_>, tmp: &OsStr) -> std::io::Result<()> {
    if let Ok(fd) = sys::openat(
        parent,
        tmp,
        libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    ) {
        let _ = sys::unlinkat(fd.as_fd(), OsStr::new(DIR_ID_FILE), false);
    }
    sys::unlinkat(parent, tmp, true)
}
