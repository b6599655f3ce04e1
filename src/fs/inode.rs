//! Inodes: the kernel's inode numbers mapped to O_PATH descriptors of backing objects.
//!
//! Holding a descriptor (not a path) makes every inode immune to renames of its ancestors and
//! lets hard links share one inode: the table is keyed by the backing (device, inode) pair, and
//! the backing inode cannot be freed and reused while we hold its descriptor.

use super::content::ContentFile;
use super::error::{FsError, FsResult};
use super::quiet::Changes;
use crate::format::name::DirId;
use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

/// The root directory's inode number, fixed by FUSE.
pub const ROOT_INO: u64 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl Kind {
    pub fn from_mode(mode: u32) -> Kind {
        match mode & libc::S_IFMT {
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDevice,
            libc::S_IFBLK => Kind::BlockDevice,
            _ => Kind::File,
        }
    }
}

/// Who uses a regular file's content. Changed only under `Inode::open`.
pub struct OpenState {
    current: Arc<RwLock<Option<Arc<ContentFile>>>>,
    pub handles: usize,
}

impl OpenState {
    pub fn content(&self) -> Option<Arc<ContentFile>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_content(&mut self, c: Option<Arc<ContentFile>>) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = c;
    }
}

pub struct Inode {
    pub ino: u64,
    pub kind: Kind,
    fd: OwnedFd,
    key: (u64, u64),
    /// The open content of a regular file and its users. Taken by open and release; held
    /// across the KMS unwrap, so concurrent first opens of one file make a single KMS call.
    pub open: Mutex<OpenState>,
    /// A directory's id (names in it are bound to it), read from its id file on first use.
    pub dir_id: OnceLock<DirId>,
    /// The same content, readable without `open`: stat must not wait behind a KMS call.
    /// Shared with `OpenState`, written only under `open`.
    current: Arc<RwLock<Option<Arc<ContentFile>>>>,
    /// The directory it was last looked up or created in (0: not yet): where a reader opening
    /// files one after another finds the next ones, for prefetch, and the directory a
    /// symlink's target is sealed for (format 2). Hard links keep the latest.
    pub parent: AtomicU64,
    /// Who may change a regular file's content (see `quiet`).
    pub changes: Arc<Changes>,
}

impl Inode {
    /// The backing object's inode number (what a backing directory listing shows).
    pub fn backing_ino(&self) -> u64 {
        self.key.1
    }

    /// The O_PATH descriptor of the backing object.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Drops the open content (and so its key) without waiting for `open`.
    pub fn drop_content(&self) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The open content, if any handle has the file open.
    pub fn content(&self) -> Option<Arc<ContentFile>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn new(ino: u64, kind: Kind, fd: OwnedFd, key: (u64, u64)) -> Inode {
        let current = Arc::new(RwLock::new(None));
        Inode {
            ino,
            kind,
            fd,
            key,
            open: Mutex::new(OpenState {
                current: current.clone(),
                handles: 0,
            }),
            dir_id: OnceLock::new(),
            current,
            parent: AtomicU64::new(0),
            changes: Arc::default(),
        }
    }
}

struct Entry {
    inode: Arc<Inode>,
    /// How many lookups the kernel holds; the entry goes when forget brings it to zero.
    lookups: u64,
}

struct Tables {
    by_ino: HashMap<u64, Entry>,
    by_key: HashMap<(u64, u64), u64>,
    next_ino: u64,
}

pub struct InodeTable {
    /// Both maps and the counter, changed together by lookup and forget.
    tables: Mutex<Tables>,
}

impl InodeTable {
    pub fn new(root_fd: OwnedFd, root_stat: &libc::stat) -> Self {
        let key = (root_stat.st_dev, root_stat.st_ino);
        let root = Arc::new(Inode::new(ROOT_INO, Kind::Dir, root_fd, key));
        let mut by_ino = HashMap::new();
        by_ino.insert(
            ROOT_INO,
            Entry {
                inode: root,
                lookups: 1,
            },
        );
        let mut by_key = HashMap::new();
        by_key.insert(key, ROOT_INO);
        InodeTable {
            tables: Mutex::new(Tables {
                by_ino,
                by_key,
                next_ino: ROOT_INO + 1,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, ino: u64) -> FsResult<Arc<Inode>> {
        self.lock()
            .by_ino
            .get(&ino)
            .map(|e| e.inode.clone())
            .ok_or(FsError::Stale)
    }

    /// The inode for a backing object just looked up, counting one kernel lookup. `fd` is
    /// dropped if the object already has an inode.
    pub fn lookup(&self, fd: OwnedFd, st: &libc::stat) -> Arc<Inode> {
        let key = (st.st_dev, st.st_ino);
        let mut t = self.lock();
        if let Some(&ino) = t.by_key.get(&key)
            && let Some(e) = t.by_ino.get_mut(&ino)
        {
            e.lookups += 1;
            return e.inode.clone();
        }
        let ino = t.next_ino;
        t.next_ino += 1;
        let inode = Arc::new(Inode::new(ino, Kind::from_mode(st.st_mode), fd, key));
        t.by_key.insert(key, ino);
        t.by_ino.insert(
            ino,
            Entry {
                inode: inode.clone(),
                lookups: 1,
            },
        );
        inode
    }

    /// The kernel dropped `n` references; the inode goes when none are left.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let mut t = self.lock();
        let gone = match t.by_ino.get_mut(&ino) {
            Some(e) => {
                e.lookups = e.lookups.saturating_sub(n);
                e.lookups == 0
            }
            None => false,
        };
        if gone && let Some(e) = t.by_ino.remove(&ino) {
            t.by_key.remove(&e.inode.key);
        }
    }

    /// Points the inode of backing object `old` (if the kernel holds one) at `fd`, a new
    /// backing object that replaced it under the same name: a symlink sealed again for the
    /// directory it moved to. The kernel keeps its inode number; later calls reach the new
    /// object, in directory `parent`. Returns the new inode.
    pub fn rebind(&self, old: (u64, u64), fd: OwnedFd, st: &libc::stat, parent: u64) -> Option<Arc<Inode>> {
        let key = (st.st_dev, st.st_ino);
        let mut t = self.lock();
        // (The kernel holds both directories locked through a rename: nothing can have
        // looked the new object up yet. Should something have, it keeps its own inode.)
        if t.by_key.contains_key(&key) {
            return None;
        }
        let ino = t.by_key.remove(&old)?;
        let e = t.by_ino.get_mut(&ino)?;
        let inode = Arc::new(Inode::new(ino, Kind::from_mode(st.st_mode), fd, key));
        // Published with its directory: a readlink on it must never find none.
        inode.parent.store(parent, std::sync::atomic::Ordering::Relaxed);
        e.inode = inode.clone();
        t.by_key.insert(key, ino);
        Some(inode)
    }

    /// Every inode the kernel currently holds.
    pub fn all(&self) -> Vec<Arc<Inode>> {
        self.lock().by_ino.values().map(|e| e.inode.clone()).collect()
    }

    pub fn len(&self) -> usize {
        self.lock().by_ino.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
