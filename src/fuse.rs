//! The FUSE adapter: unpack a request, call the filesystem core, reply. Nothing else.

use crate::fs::attr::Attr;
use crate::fs::error::FsError;
use crate::fs::inode::Kind;
use crate::fs::quiet::Quiet;
use crate::fs::{Caller, Fs, FuseOp, SetAttr};
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long the kernel may cache attributes and names. Every change goes through this mount,
/// which tells the kernel as it happens, so a short TTL costs little and bounds staleness if
/// the backing directory is touched directly.
const TTL: Duration = Duration::from_secs(1);
/// Largest read and write request we ask the kernel for: 16 blocks per request.
pub const MAX_IO: u32 = 1024 * 1024;

pub struct FuseAdapter {
    fs: Arc<Fs>,
    /// Hands the kernel the rest of each block a small read decrypted, for files with no
    /// write handle open.
    fill: Arc<PageFill>,
}

impl FuseAdapter {
    pub fn new(fs: Arc<Fs>, fill: Arc<PageFill>) -> Self {
        FuseAdapter { fs, fill }
    }

    /// After we cleared set-id bits behind the kernel's back (a WRITE, whose reply carries no
    /// attributes): drops its cached attributes, so that no exec(2) runs the
    /// changed file with the old bits. Sent before the reply, so it has taken effect by the
    /// time the caller's write(2) returns.
    fn mode_changed(&self, ino: INodeNo, cleared: bool) {
        if cleared && let Some(n) = self.fill.notifier.get() {
            // A negative offset: attributes only. Never pages from here: the kernel holds the
            // pages of a WRITE locked while it waits for our reply, and invalidating them
            // would wait for those locks.
            let _ = n.inval_inode(ino, -1, 0);
        }
    }
}

/// Fills the kernel's page cache with the whole plaintext of each block that a small read
/// made us decrypt, so the reads of its other pages never reach the daemon: a 4 KiB read
/// of a 64 KiB block costs the whole block's decryption, and without this the next 15 reads
/// of that block would each pay it again.
///
/// Only for a file with no write handle open. A store can race a change of the content: the
/// kernel holds a page locked while its WRITE is with us, a store of that page waits for the
/// lock and then puts the older plaintext over the newer; a store after a truncate's reply
/// puts back pages the kernel just dropped. So a read takes a [`Quiet`] token before it
/// decrypts (none while a write handle is open), and the store goes ahead only if the token
/// still holds when it starts. A change that comes while a store is in flight waits for it:
/// the replies to write opens and truncates go through [`PageFill::after_stores`], so no WRITE
/// and no truncate of the kernel's pages can follow before the store has ended. (A create
/// makes a new inode, which no store can concern.)
///
/// This relies on every change of content reaching us through a write handle or a truncate,
/// before the kernel changes its pages: no writeback cache (dirty pages written back after
/// the handle is gone) and no atomic O_TRUNC (a truncate inside OPEN). `init` asks for
/// neither.
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
    /// Whether a store is in the kernel now, and the replies waiting for it to end. FUSE
    /// workers take it only briefly, never across a store: a worker waiting for a store could
    /// be the one whose READ the store waits for.
    gate: std::sync::Mutex<Gate>,
    /// Signalled when a store ends (for `close`).
    ended: std::sync::Condvar,
    notifier: std::sync::OnceLock<fuser::Notifier>,
    /// What became of the blocks offered (for status and metrics).
    pub counts: FillCounts,
}

/// Blocks offered to the page fill, by outcome.
#[derive(Default)]
pub struct FillCounts {
    /// Handed to the kernel.
    pub stored: AtomicU64,
    /// Not stored: the file was opened for writing or truncated since it was read.
    pub voided: AtomicU64,
    /// Not stored: the queue was full, the fill closed (lock), or the kernel refused it.
    pub dropped: AtomicU64,
}

#[derive(Default)]
struct Gate {
    storing: bool,
    after: Vec<Box<dyn FnOnce() + Send>>,
}

/// Blocks waiting for the fill thread at most; past that they are dropped.
const FILL_QUEUE: usize = 16;
/// The fill thread's nice value.
const FILL_NICE: i32 = -10;

struct Store {
    ino: u64,
    offset: u64,
    /// Wiped on drop.
    plain: Vec<u8>,
    quiet: Quiet,
}

impl Drop for Store {
    fn drop(&mut self) {
        // At memset speed: `zeroize` writes a byte at a time through volatile stores, and a
        // 64 KiB block took longer to wipe that way than to hand to the kernel. `black_box`
        // keeps the compiler from dropping the memset as a dead store.
        self.plain.fill(0);
        std::hint::black_box(&mut self.plain);
    }
}

impl PageFill {
    /// Starts the fill thread; stores begin once [`PageFill::set_notifier`] is called.
    pub fn start() -> std::io::Result<Arc<PageFill>> {
        let (queue, rx) = std::sync::mpsc::sync_channel::<Store>(FILL_QUEUE);
        let fill = Arc::new(PageFill {
            queue,
            queued: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            gate: std::sync::Mutex::new(Gate::default()),
            ended: std::sync::Condvar::new(),
            notifier: std::sync::OnceLock::new(),
            counts: FillCounts::default(),
        });
        let weak = Arc::downgrade(&fill);
        std::thread::Builder::new()
            .name("kmsfs-page-fill".into())
            .spawn(move || {
                // Ahead of the readers: with more readers than cores the fill thread was
                // runnable but waiting for a core most of the time, its queue stayed full and
                // nine blocks in ten were dropped. Its work is bounded by theirs (at most
                // one store per read), and each store saves reads later.
                if let Err(e) = crate::sys::nice_this_thread(FILL_NICE) {
                    log::debug!("page fill thread keeps its priority: {e}");
                }
                for s in rx {
                    let Some(fill) = weak.upgrade() else { break };
                    fill.queued.fetch_sub(1, Ordering::Relaxed);
                    fill.store(s);
                }
            })?;
        Ok(fill)
    }

    pub fn set_notifier(&self, n: fuser::Notifier) {
        let _ = self.notifier.set(n);
    }

    fn lock_gate(&self) -> std::sync::MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// On the fill thread: hands `s` to the kernel if nothing changed since it was read.
    fn store(&self, s: Store) {
        let Some(n) = self.notifier.get() else {
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        {
            let mut gate = self.lock_gate();
            // Checked under the gate: a change that comes after this finds `storing` set
            // and waits; one that came before voided the token.
            if self.closed.load(Ordering::SeqCst) {
                self.counts.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if !s.quiet.holds() {
                self.counts.voided.fetch_add(1, Ordering::Relaxed);
                return;
            }
            gate.storing = true;
        }
        let _end = StoreEnds(self);
        // The kernel refuses a store for an inode it has forgotten: nothing to do then.
        let outcome = match n.store(INodeNo(s.ino), s.offset, &s.plain) {
            Ok(()) => &self.counts.stored,
            Err(_) => &self.counts.dropped,
        };
        outcome.fetch_add(1, Ordering::Relaxed);
    }

    /// Queues the plaintext `plain` of inode `ino` from `offset` (block-aligned), read under
    /// `quiet`, for the page cache, unless the queue is full or the fill is closed.
    fn offer(&self, ino: u64, offset: u64, plain: &[u8], quiet: Quiet) {
        if self.closed.load(Ordering::SeqCst) {
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // Counted before it is sent, so the fill thread's decrement never comes first.
        if self.queued.fetch_add(1, Ordering::Relaxed) >= FILL_QUEUE {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let store = Store {
            ino,
            offset,
            plain: plain.to_vec(),
            quiet,
        };
        if self.queue.try_send(store).is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Runs `reply` (the reply to a request that may change a file's content) once no store
    /// is in flight: at once if none is, else on the fill thread when it ends. The change
    /// itself has begun already, so no store starts after this for the file.
    fn after_stores(&self, reply: impl FnOnce() + Send + 'static) {
        let mut gate = self.lock_gate();
        if gate.storing {
            gate.after.push(Box::new(reply));
        } else {
            drop(gate);
            reply();
        }
    }

    /// No store from now on; returns once a store in flight has ended.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let mut gate = self.lock_gate();
        while gate.storing {
            gate = self.ended.wait(gate).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Ends a store however it ends (a panic included): clears `storing`, wakes `close`, and
/// sends the replies that waited, so no write open or truncate waits for good.
struct StoreEnds<'a>(&'a PageFill);

impl Drop for StoreEnds<'_> {
    fn drop(&mut self) {
        let fill = self.0;
        let after = {
            let mut gate = fill.lock_gate();
            gate.storing = false;
            std::mem::take(&mut gate.after)
        };
        fill.ended.notify_all();
        for reply in after {
            reply();
        }
    }
}

/// Runs `reply` after any store in flight when `fill` is given, else at once.
fn after_stores(fill: &Option<Arc<PageFill>>, reply: impl FnOnce() + Send + 'static) {
    match fill {
        Some(f) => f.after_stores(reply),
        None => reply(),
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

/// How every file is opened (and created):
/// - FOPEN_KEEP_CACHE: every write reaches us through this mount, so the kernel's cached
///   pages stay valid across opens;
/// - FOPEN_NOFLUSH: the kernel sends no FLUSH at close. Writes reach the backing file before
///   we answer them and nothing is buffered here, so a FLUSH had nothing to do, and it was a
///   round trip every close() waited for: one of the 6-7 requests of a small file's create
///   or read. (Without the writeback cache, which we do not ask for, the kernel honours it.)
const OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_KEEP_CACHE.union(FopenFlags::FOPEN_NOFLUSH);

/// Counts the request, then replies ENOKEY (through the errno table) once the volume is
/// locked.
macro_rules! guard {
    ($self:ident, $reply:ident, $op:ident) => {
        $self.fs.stats.requests.count(FuseOp::$op);
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
        // Large requests are the first lever on FUSE throughput (see bench/). Nothing else is
        // asked for: the page fill relies on having neither the writeback cache nor atomic
        // O_TRUNC (see `PageFill`).
        self.fs.stats.requests.count(FuseOp::Init);
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        // The clearing of set-id bits on writes and truncates, so that the kernel stops
        // asking for `security.capability` before each write (see `fs::setid`). A kernel
        // without it (before 5.11) keeps doing both itself. `fs::setid` counts on every
        // truncate reaching us as a SETATTR: asking for atomic O_TRUNC would let one through
        // OPEN without its bits cleared.
        if config
            .add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2)
            .is_ok()
        {
            self.fs.set_clears_setid();
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        guard!(self, reply, Lookup);
        entry(reply, self.fs.lookup(parent.0, name));
    }

    // fuser answers the kernel's BATCH_FORGET by calling this once per inode: each counts.
    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.stats.requests.count(FuseOp::Forget);
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        guard!(self, reply, Getattr);
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
        guard!(self, reply, Setattr);
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: time_spec(atime),
            mtime: time_spec(mtime),
        };
        // A truncate by path that needs the KMS is answered from a KMS waiter thread; a
        // truncate after any page-cache store in flight.
        let fill = size.is_some().then(|| self.fill.clone());
        self.fs
            .setattr_then(ino.0, fh.map(|f| f.0), set, caller(req), move |r| {
                after_stores(&fill, move || match r {
                    Ok(a) => reply.attr(&TTL, &file_attr(&a)),
                    Err(e) => reply.error(errno(&e)),
                })
            });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        guard!(self, reply, Readlink);
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
        guard!(self, reply, Mknod);
        entry(
            reply,
            self.fs.mknod(parent.0, name, mode, rdev as u64, caller(req)),
        );
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        guard!(self, reply, Mkdir);
        entry(reply, self.fs.mkdir(parent.0, name, mode, caller(req)));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guard!(self, reply, Unlink);
        empty(reply, self.fs.unlink(parent.0, name));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guard!(self, reply, Rmdir);
        empty(reply, self.fs.rmdir(parent.0, name));
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        guard!(self, reply, Symlink);
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
        guard!(self, reply, Rename);
        empty(
            reply,
            self.fs.rename(parent.0, name, newparent.0, newname, flags.bits()),
        );
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        guard!(self, reply, Link);
        entry(reply, self.fs.link(ino.0, newparent.0, newname));
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        guard!(self, reply, Open);
        // Answered here when the key is in memory; otherwise from a KMS waiter thread, while
        // this worker serves other requests.
        // A handle that may write is handed out after any page-cache store in flight.
        let fill = (flags.0 & libc::O_ACCMODE != libc::O_RDONLY).then(|| self.fill.clone());
        self.fs.open_then(ino.0, flags.0, caller(req), move |r| {
            after_stores(&fill, move || match r {
                Ok(fh) => reply.opened(FileHandle(fh), OPEN_FLAGS),
                Err(e) => reply.error(errno(&e)),
            })
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
        guard!(self, reply, Read);
        log::trace!("read {size} bytes at {offset}");
        // One scratch buffer per FUSE thread: reads allocate and clear nothing. It holds the
        // last plaintext this thread returned, as the kernel's page cache does anyway.
        thread_local! {
            static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let block = self.fs.layout().block_size();
        // A read smaller than a block (O_DIRECT reads bypass the page cache), of a file with
        // no write handle open: the token is taken before the read (see `PageFill`).
        let quiet = (u64::from(size) < block && flags.0 & libc::O_DIRECT == 0)
            .then(|| self.fs.quiet(fh.0))
            .flatten();
        let Some(quiet) = quiet else {
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
                    self.fill.offer(ino.0, start, &buf[..n], quiet);
                }
            }
            Err(e) => reply.error(errno(&e)),
        })
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        guard!(self, reply, Write);
        log::trace!("write {} bytes at {offset}", data.len());
        if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            match self.fs.clear_setid_for_write(fh.0) {
                Ok(cleared) => self.mode_changed(ino, cleared),
                Err(e) => return reply.error(errno(&e)),
            }
        }
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
        // Not sent for our files (`OPEN_FLAGS` has FOPEN_NOFLUSH); answered for any kernel
        // that sends it anyway.
        guard!(self, reply, Flush);
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
        self.fs.stats.requests.count(FuseOp::Release);
        self.fs.release(fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        guard!(self, reply, Fsync);
        empty(reply, self.fs.fsync(fh.0, datasync));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        guard!(self, reply, Opendir);
        match self.fs.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(&self, req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        guard!(self, reply, Readdir);
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
        self.fs.stats.requests.count(FuseOp::Releasedir);
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        guard!(self, reply, Fsyncdir);
        empty(reply, self.fs.fsyncdir(ino.0));
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        guard!(self, reply, Getxattr);
        match self.fs.getxattr(ino.0, name) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() <= size as usize => reply.data(&v),
            Ok(_) => reply.error(errno(&FsError::Range)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        guard!(self, reply, Listxattr);
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
        guard!(self, reply, Setxattr);
        empty(reply, self.fs.setxattr(ino.0, name, value, flags));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guard!(self, reply, Removexattr);
        empty(reply, self.fs.removexattr(ino.0, name));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        guard!(self, reply, Statfs);
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
        guard!(self, reply, Access);
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
        guard!(self, reply, Create);
        // Answered here when a file made ahead is ready; otherwise from a KMS waiter thread.
        self.fs
            .create_then(parent.0, name, mode, flags, caller(req), move |r| match r {
                Ok((a, fh)) => reply.created(&TTL, &file_attr(&a), Generation(0), FileHandle(fh), OPEN_FLAGS),
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
        guard!(self, reply, Fallocate);
        // Set-id bits: the kernel sends a SETATTR that sets nothing first (see `fs::setid`).
        empty(reply, self.fs.fallocate(fh.0, offset, length, mode));
    }
}
