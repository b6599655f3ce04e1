//! The FUSE adapter: unpack a request, call the filesystem core, reply. Nothing else.

use crate::fs::attr::Attr;
use crate::fs::error::FsError;
use crate::fs::inode::Kind;
use crate::fs::{Caller, Fs, SetAttr};
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long the kernel may cache attributes and names. Every change goes through this mount,
/// which tells the kernel as it happens, so a short TTL costs little and bounds staleness if
/// the backing directory is touched directly.
const TTL: Duration = Duration::from_secs(1);
/// Largest read and write request we ask the kernel for: 16 blocks per request.
pub const MAX_IO: u32 = 1024 * 1024;

pub struct FuseAdapter {
    fs: Arc<Fs>,
    /// On a read-only mount: hands the kernel the rest of each block a small read decrypted.
    fill: Option<Arc<PageFill>>,
}

impl FuseAdapter {
    pub fn new(fs: Arc<Fs>, fill: Option<Arc<PageFill>>) -> Self {
        FuseAdapter { fs, fill }
    }
}

/// Fills the kernel's page cache with the whole plaintext of each block that a small read
/// made us decrypt, so the reads of its other pages never reach the daemon: a 4 KiB read
/// of a 64 KiB block costs the whole block's decryption, and without this the next 15 reads
/// of that block would each pay it again.
///
/// Only on a read-only mount. On a writable one a store can race a write: the kernel holds
/// a page locked while its WRITE is with us, a store of that page waits for the lock and then
/// puts the older plaintext over the newer. With no writes, what a store puts is what a read
/// would return.
///
/// The stores run on a thread of their own (a store waits for page locks that READs in
/// flight hold, which only a free FUSE worker releases), from a bounded queue: when it is
/// full, a block is simply not stored. [`PageFill::close`] (on lock) waits for a store in
/// flight and stops all later ones, so no plaintext reaches the page cache after the lock
/// has invalidated it.
pub struct PageFill {
    queue: std::sync::mpsc::SyncSender<Store>,
    /// Blocks in the queue: past [`FILL_QUEUE`] a block is not even copied.
    queued: AtomicUsize,
    /// Set by `close`. Read without blocking by `offer` (a FUSE worker).
    closed: AtomicBool,
    /// Held for reading by the fill thread across each store, taken for writing by `close`
    /// once `closed` is set: a store either ended before, or sees `closed`. FUSE workers never
    /// take it: with a writer waiting, new readers block, and a worker blocked here could be
    /// the one a store in flight waits for.
    gate: std::sync::RwLock<()>,
    notifier: std::sync::OnceLock<fuser::Notifier>,
}

/// Blocks waiting for the fill thread at most; past that they are dropped.
const FILL_QUEUE: usize = 16;

struct Store {
    ino: u64,
    offset: u64,
    plain: zeroize::Zeroizing<Vec<u8>>,
}

impl PageFill {
    /// Starts the fill thread; stores begin once [`PageFill::set_notifier`] is called.
    pub fn start() -> std::io::Result<Arc<PageFill>> {
        let (queue, rx) = std::sync::mpsc::sync_channel::<Store>(FILL_QUEUE);
        let fill = Arc::new(PageFill {
            queue,
            queued: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            gate: std::sync::RwLock::new(()),
            notifier: std::sync::OnceLock::new(),
        });
        let weak = Arc::downgrade(&fill);
        std::thread::Builder::new()
            .name("kmsfs-page-fill".into())
            .spawn(move || {
                for s in rx {
                    let Some(fill) = weak.upgrade() else { break };
                    fill.queued.fetch_sub(1, Ordering::Relaxed);
                    let _gate = fill.gate.read().unwrap_or_else(|p| p.into_inner());
                    if let (false, Some(n)) = (fill.closed.load(Ordering::SeqCst), fill.notifier.get()) {
                        // The kernel refuses a store for an inode it has forgotten: nothing
                        // to do then.
                        let _ = n.store(INodeNo(s.ino), s.offset, &s.plain);
                    }
                }
            })?;
        Ok(fill)
    }

    pub fn set_notifier(&self, n: fuser::Notifier) {
        let _ = self.notifier.set(n);
    }

    /// Queues the plaintext `plain` of inode `ino` from `offset` (block-aligned) for the page
    /// cache, unless the queue is full or the fill is closed.
    fn offer(&self, ino: u64, offset: u64, plain: &[u8]) {
        if self.closed.load(Ordering::SeqCst) {
            return;
        }
        // Counted before it is sent, so the fill thread's decrement never comes first.
        if self.queued.fetch_add(1, Ordering::Relaxed) >= FILL_QUEUE {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let store = Store {
            ino,
            offset,
            plain: zeroize::Zeroizing::new(plain.to_vec()),
        };
        if self.queue.try_send(store).is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// No store from now on; returns once a store in flight has ended.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        drop(self.gate.write().unwrap_or_else(|p| p.into_inner()));
    }
}

fn errno(e: &FsError) -> Errno {
    log::debug!("request failed: {e:?} (errno {})", e.errno());
    Errno::from_i32(e.errno())
}

fn kind(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: kind(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

fn time_spec(t: Option<TimeOrNow>) -> crate::sys::TimeSpec {
    t.map(|t| match t {
        TimeOrNow::Now => None,
        TimeOrNow::SpecificTime(st) => Some(match st.duration_since(UNIX_EPOCH) {
            Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i64),
            Err(e) => {
                let d = e.duration();
                let (mut s, mut ns) = (-(d.as_secs() as i64), -(d.subsec_nanos() as i64));
                if ns < 0 {
                    s -= 1;
                    ns += 1_000_000_000;
                }
                (s, ns)
            }
        }),
    })
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

/// Replies ENOKEY (through the errno table) once the volume is locked.
macro_rules! guard {
    ($self:ident, $reply:ident) => {
        if let Err(e) = $self.fs.guard() {
            $reply.error(errno(&e));
            return;
        }
    };
}

fn entry(reply: ReplyEntry, r: Result<Attr, FsError>) {
    match r {
        Ok(a) => reply.entry(&TTL, &file_attr(&a), Generation(0)),
        Err(e) => reply.error(errno(&e)),
    }
}

fn empty(reply: ReplyEmpty, r: Result<(), FsError>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Large requests are the first lever on FUSE throughput (see bench/).
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        guard!(self, reply);
        entry(reply, self.fs.lookup(parent.0, name));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        guard!(self, reply);
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        guard!(self, reply);
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: time_spec(atime),
            mtime: time_spec(mtime),
        };
        // A truncate by path that needs the KMS is answered from a KMS waiter thread.
        self.fs
            .setattr_then(ino.0, fh.map(|f| f.0), set, caller(req), move |r| match r {
                Ok(a) => reply.attr(&TTL, &file_attr(&a)),
                Err(e) => reply.error(errno(&e)),
            });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        guard!(self, reply);
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        guard!(self, reply);
        entry(
            reply,
            self.fs.mknod(parent.0, name, mode, rdev as u64, caller(req)),
        );
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        guard!(self, reply);
        entry(reply, self.fs.mkdir(parent.0, name, mode, caller(req)));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guard!(self, reply);
        empty(reply, self.fs.unlink(parent.0, name));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guard!(self, reply);
        empty(reply, self.fs.rmdir(parent.0, name));
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        guard!(self, reply);
        entry(
            reply,
            self.fs
                .symlink(parent.0, link_name, target.as_os_str(), caller(req)),
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        guard!(self, reply);
        empty(
            reply,
            self.fs.rename(parent.0, name, newparent.0, newname, flags.bits()),
        );
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        guard!(self, reply);
        entry(reply, self.fs.link(ino.0, newparent.0, newname));
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        guard!(self, reply);
        // Answered here when the key is in memory; otherwise from a KMS waiter thread, while
        // this worker serves other requests.
        self.fs.open_then(ino.0, flags.0, caller(req), move |r| match r {
            // Every write reaches us through this mount, so the kernel's cached pages stay
            // valid across opens.
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(errno(&e)),
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        guard!(self, reply);
        log::trace!("read {size} bytes at {offset}");
        // One scratch buffer per FUSE thread: reads allocate and clear nothing. It holds the
        // last plaintext this thread returned, as the kernel's page cache does anyway.
        thread_local! {
            static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let block = self.fs.layout().block_size();
        let fill = self.fill.as_ref().filter(|_| {
            // A read smaller than a block (O_DIRECT reads bypass the page cache).
            u64::from(size) < block && flags.0 & libc::O_DIRECT == 0
        });
        let Some(fill) = fill else {
            return READ_BUF.with_borrow_mut(|buf| match self.fs.read(fh.0, offset, size, buf) {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => reply.error(errno(&e)),
            });
        };
        // The whole blocks the read falls in: they are decrypted whole anyway.
        let start = offset - offset % block;
        let end = offset
            .saturating_add(u64::from(size))
            .div_ceil(block)
            .saturating_mul(block);
        let len = u32::try_from(end - start).unwrap_or(u32::MAX);
        READ_BUF.with_borrow_mut(|buf| match self.fs.read(fh.0, start, len, buf) {
            Ok(n) => {
                let from = usize::try_from(offset - start).unwrap_or(usize::MAX).min(n);
                let to = from.saturating_add(size as usize).min(n);
                reply.data(&buf[from..to]);
                if to - from < n {
                    fill.offer(ino.0, start, &buf[..n]);
                }
            }
            Err(e) => reply.error(errno(&e)),
        })
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        guard!(self, reply);
        log::trace!("write {} bytes at {offset}", data.len());
        match self.fs.write(fh.0, offset, data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        guard!(self, reply);
        // Writes reach the backing file before we reply to them: nothing is buffered here.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.fs.release(fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        guard!(self, reply);
        empty(reply, self.fs.fsync(fh.0, datasync));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        guard!(self, reply);
        match self.fs.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(&self, req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        guard!(self, reply);
        match self.fs.readdir(ino.0, fh.0, offset, caller(req)) {
            Ok(entries) => {
                for (next, e) in entries {
                    if reply.add(INodeNo(e.ino), next, kind(e.kind), &e.name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        guard!(self, reply);
        empty(reply, self.fs.fsyncdir(ino.0));
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        guard!(self, reply);
        match self.fs.getxattr(ino.0, name) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() <= size as usize => reply.data(&v),
            Ok(_) => reply.error(errno(&FsError::Range)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        guard!(self, reply);
        match self.fs.listxattr(ino.0) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() <= size as usize => reply.data(&v),
            Ok(_) => reply.error(errno(&FsError::Range)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        guard!(self, reply);
        empty(reply, self.fs.setxattr(ino.0, name, value, flags));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guard!(self, reply);
        empty(reply, self.fs.removexattr(ino.0, name));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        guard!(self, reply);
        match self.fs.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        guard!(self, reply);
        // The mount always uses `default_permissions`: the kernel checks access itself.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        guard!(self, reply);
        // Answered here when a file made ahead is ready; otherwise from a KMS waiter thread.
        self.fs
            .create_then(parent.0, name, mode, flags, caller(req), move |r| match r {
                Ok((a, fh)) => reply.created(
                    &TTL,
                    &file_attr(&a),
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::FOPEN_KEEP_CACHE,
                ),
                Err(e) => reply.error(errno(&e)),
            });
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        guard!(self, reply);
        empty(reply, self.fs.fallocate(fh.0, offset, length, mode));
    }
}
