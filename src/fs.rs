//! The filesystem core: inodes, handles, directory operations and file I/O over the backing
//! directory. It knows nothing of the FUSE protocol; `fuse.rs` translates requests into calls
//! here and results into replies.

pub mod attr;
pub mod content;
mod dir;
pub mod error;
pub mod inode;
pub mod names;
mod prefetch;
mod prefetch_hooks;
pub mod quiet;
mod ready;
mod setid;
mod stats;
mod waiters;
mod xattr;

pub use prefetch::DEFAULT_PREFETCH;
pub use stats::{FuseOp, KMS_ERROR_KINDS, KmsEvents, LATENCY_BUCKETS, Stats};
pub use waiters::Wait;

use crate::format::VolumeId;
use crate::format::block::{BlockLayout, ContentCipher};
use crate::format::header::{self, HEADER_LEN};
use crate::keycache::{Fetch, KeyCache};
use crate::kms::{Binding, KeyProvider, KmsError, WrappedDek};
use crate::policy::{Access, Asker, Verdict};
use crate::sys;
use attr::Attr;
use content::ContentFile;
use error::{FsError, FsResult};
use inode::{Inode, InodeTable, Kind, ROOT_INO};
use names::Names;
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Who is asking: the caller's credentials, for ownership of what they create, and its
/// process, for the access policy and the audit log.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// Attribute changes requested by setattr; `None` leaves a field alone.
#[derive(Debug, Default, Clone, Copy)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: sys::TimeSpec,
    pub mtime: sys::TimeSpec,
}

/// What a SETATTR does to the set-id bits (see `fs::setid`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SetIdRule {
    /// Nothing: the kernel clears them itself, or the change is not one that clears them.
    Keep,
    /// A size change: cleared unless the calling thread, this id, holds CAP_FSETID.
    UnlessPrivileged(u32),
    /// A SETATTR that sets nothing: cleared.
    Clear,
}

/// One directory entry as listed.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: Kind,
    pub name: OsString,
}

enum Handle {
    File {
        inode: Arc<Inode>,
        content: Arc<ContentFile>,
        write: bool,
        /// Who opened it: its reads count for that identity's usage guard.
        asker: Arc<Asker>,
    },
    Dir {
        entries: Arc<Vec<DirEntry>>,
    },
}

/// Settings the daemon chooses.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub read_only: bool,
    /// Unwrapped keys kept after their file closes: at most this many …
    pub key_cache_entries: usize,
    /// … for at most this long after the KMS unwrapped them.
    pub key_cache_ttl: std::time::Duration,
    /// How long a parked open or create may wait for the KMS before it fails with EIO;
    /// `None`: as long as the KMS client retries.
    pub open_timeout: Option<std::time::Duration>,
    /// Keys unwrapped ahead per prefetch pass (`prefetch`); 0: none.
    pub prefetch: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            read_only: false,
            key_cache_entries: DEFAULT_KEY_CACHE,
            key_cache_ttl: std::time::Duration::from_secs(300),
            open_timeout: Some(DEFAULT_OPEN_TIMEOUT),
            prefetch: DEFAULT_PREFETCH,
        }
    }
}

/// The default `--key-cache`: keys kept (each a content cipher: a key schedule). When a
/// reader goes through more files than the cache holds, LRU evicts the keys it wants next,
/// and the prefetch passes meant to hide the KMS unwrap keys that are pushed out before use:
/// at 4,096, reading 5,000 files just written made 5,600 KMS calls and cost the daemon 2.5×
/// the CPU per file of a cache that held them all. The TTL, not this count, bounds how long a
/// key stays in memory.
pub const DEFAULT_KEY_CACHE: usize = 16_384;

/// The default `--open-timeout`: under the OpenBao client's retry budget against a hung server
/// (6 attempts of up to 10 s), over anything a working KMS takes.
pub const DEFAULT_OPEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

pub struct Fs {
    inodes: InodeTable,
    /// Open file and directory handles by number. Taken briefly by open, release and every
    /// I/O call to find its handle.
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    /// Wraps and unwraps this volume's file keys.
    kms: Arc<dyn KeyProvider>,
    /// Every file key is bound to this volume and its file.
    volume_id: VolumeId,
    /// The volume's block size: every content file is read and written with it.
    layout: BlockLayout,
    runtime: tokio::runtime::Handle,
    /// Root can give created files to their callers; anyone else creates them as itself.
    chown_to_caller: bool,
    /// Whether the kernel left the clearing of set-id bits on a change of content to us (see
    /// `setid`).
    clears_setid: AtomicBool,
    /// How names, symlink targets and xattrs are stored: the name ciphers, until `lock` drops
    /// them (and so wipes them). Taken briefly by every operation on names for a reference
    /// of its own; an operation in flight when the lock comes drops the last one.
    names: RwLock<Option<Arc<Names>>>,
    /// Whether names are encrypted: what the volume is, which outlives the name ciphers.
    names_encrypted: bool,
    options: Options,
    /// Unwrapped keys of recently opened files (and of files prefetch expects to be opened).
    keys: Arc<KeyCache>,
    /// Keys unwrapped ahead of their opens.
    prefetch: Arc<prefetch::Prefetch>,
    /// Set once by `lock`: every operation then fails with ENOKEY.
    locked: AtomicBool,
    events: Arc<dyn KmsEvents>,
    pub stats: Arc<Stats>,
    /// Files made ahead of their creates (`ready`).
    ready: Arc<ready::ReadyFiles>,
    /// For each directory, the directories that entries were renamed into from it since it
    /// was last synced (`fsyncdir`).
    renamed_out: Mutex<HashMap<u64, HashMap<u64, Arc<Inode>>>>,
    /// Where opens and creates that need the KMS wait for it, off the FUSE workers.
    waiters: waiters::Waiters,
    /// Set to true by `lock`: ends every wait on the KMS at once.
    lock_signal: tokio::sync::watch::Sender<bool>,
    /// Who may open files, beyond their permissions (`policy`).
    access: Arc<Access>,
}

impl Drop for Fs {
    /// Files made ahead of creates go with the filesystem (and their refill stops), however
    /// it ends.
    fn drop(&mut self) {
        self.ready.close();
    }
}

impl Fs {
    #[allow(clippy::too_many_arguments)] // each is a different part of the opened volume or the daemon
    pub fn new(
        backing_root: OwnedFd,
        kms: Arc<dyn KeyProvider>,
        volume_id: VolumeId,
        layout: BlockLayout,
        runtime: tokio::runtime::Handle,
        names: Names,
        options: Options,
        events: Arc<dyn KmsEvents>,
    ) -> FsResult<Fs> {
        let st = sys::fstatat(backing_root.as_fd(), OsStr::new(""))?;
        let inodes = InodeTable::new(backing_root, &st);
        let ready = Arc::new(ready::ReadyFiles::new(inodes.get(ROOT_INO)?, !options.read_only));
        Ok(Fs {
            inodes,
            ready,
            renamed_out: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            kms,
            volume_id,
            layout,
            runtime,
            chown_to_caller: sys::geteuid() == 0,
            clears_setid: AtomicBool::new(false),
            names_encrypted: names.encrypted(),
            names: RwLock::new(Some(Arc::new(names))),
            keys: Arc::new(KeyCache::new(options.key_cache_entries, options.key_cache_ttl)),
            prefetch: Arc::new(prefetch::Prefetch::new(options.prefetch)),
            options,
            locked: AtomicBool::new(false),
            events,
            stats: Arc::new(Stats::default()),
            waiters: waiters::Waiters::default(),
            lock_signal: tokio::sync::watch::Sender::new(false),
            access: Arc::new(Access::none(None)),
        })
    }

    /// Puts opens and creates under an access policy.
    pub fn with_access(mut self, access: Arc<Access>) -> Fs {
        self.access = access;
        self
    }

    pub fn access(&self) -> &Access {
        &self.access
    }

    /// The volume's block layout.
    pub fn layout(&self) -> BlockLayout {
        self.layout
    }

    /// The policy's decision on an open or create by `caller`, made before anything else
    /// (a denial never reaches the KMS): who carries on, and how long its reply is held back
    /// (a throttling guard). `file_id` names the file in a denial's audit event.
    fn admit(
        &self,
        caller: Caller,
        what: &str,
        file_id: impl FnOnce() -> Option<String>,
    ) -> FsResult<(Arc<Asker>, Option<std::time::Duration>)> {
        let mut asker = self.access.asker(caller.uid, caller.gid, caller.pid);
        if !self.access.enabled() {
            return Ok((Arc::new(asker), None));
        }
        let fields = || serde_json::json!({ "file_id": file_id() });
        match self.access.check(&mut asker, what, fields) {
            Verdict::Go => Ok((Arc::new(asker), None)),
            Verdict::After(d) => Ok((Arc::new(asker), Some(d))),
            Verdict::Denied => Err(FsError::PermissionDenied),
            Verdict::Busy => Err(FsError::WouldWait),
            Verdict::Lock(why) => {
                self.events.lock(&why);
                Err(FsError::Locked)
            }
        }
    }

    /// The file id of a regular file, from its header (for the audit log).
    fn file_id_of(&self, ino: u64) -> Option<String> {
        let inode = self.inodes.get(ino).ok()?;
        if inode.kind != Kind::File {
            return None;
        }
        self.header_of(&inode).ok().map(|h| h.file_id.to_string())
    }

    /// A regular file's header, read without opening its content (no key needed).
    fn header_of(&self, inode: &Inode) -> FsResult<header::Header> {
        // Non-blocking: whatever the storage put there, a read of a header never waits.
        let file = File::from(sys::reopen(inode.fd(), libc::O_RDONLY | libc::O_NONBLOCK)?);
        let mut hdr = vec![0u8; HEADER_LEN as usize];
        let n = crate::durable::read_up_to(&file, &mut hdr)?;
        header::decode(&hdr[..n]).map_err(|e| {
            log::error!("inode {}: unreadable header: {e}", inode.ino);
            FsError::Corrupt
        })
    }

    /// Audits an open or create that its rule says to audit.
    fn audit_open(&self, asker: &Asker, what: &str, content: &ContentFile, write: bool) {
        if asker.audit {
            let mut m = asker.fields();
            m.insert("file_id".into(), serde_json::json!(content.file_id().to_string()));
            m.insert("write".into(), serde_json::json!(write));
            crate::audit::event(what, serde_json::Value::Object(m));
        }
    }

    /// Fails every operation once the volume is locked.
    pub fn guard(&self) -> FsResult<()> {
        if self.locked.load(Ordering::Acquire) {
            Err(FsError::Locked)
        } else {
            Ok(())
        }
    }

    /// Turns true when the volume is locked: for waits on the KMS outside the core (the
    /// watcher's access checks) to end with it.
    pub fn lock_signal(&self) -> tokio::sync::watch::Receiver<bool> {
        self.lock_signal.subscribe()
    }

    pub fn is_locked(&self) -> bool {
        self.locked.load(Ordering::Acquire)
    }

    /// The name ciphers (with plaintext names, `Names::Plain`); `Locked` once the volume is
    /// locked and they are gone.
    fn names(&self) -> FsResult<Arc<Names>> {
        self.names
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(FsError::Locked)
    }

    /// Locks the volume: from now on every operation fails with ENOKEY, and every key this
    /// filesystem holds is dropped (and so wiped): cached and open file keys, and the name
    /// ciphers. Returns the inode numbers whose kernel caches the caller must invalidate.
    pub fn lock(&self) -> Vec<u64> {
        self.locked.store(true, Ordering::Release);
        // Opens and creates waiting on the KMS fail with ENOKEY now, not when it answers.
        self.lock_signal.send_replace(true);
        // Taken out under the lock, dropped after it: never waits for an operation in flight.
        let names = self.names.write().unwrap_or_else(|p| p.into_inner()).take();
        drop(names);
        self.ready.close();
        self.lock_renamed_out().clear();
        let cached = self.keys.close();
        self.kms.forget_secrets();
        let handles = std::mem::take(&mut *self.handles());
        let inodes = self.inodes.all();
        for inode in &inodes {
            // Not through `inode.open`: an open waiting on a slow KMS holds that lock, and a
            // lock must not wait for it (that open finds the volume locked when it returns).
            inode.drop_content();
        }
        drop(handles);
        crate::audit::event("keys_dropped", serde_json::json!({"cached": cached}));
        inodes.iter().map(|i| i.ino).collect()
    }

    /// At the end of the mount, after `lock`: waits (briefly) for files being made ahead of
    /// creates to be removed, so that none is left in the backing directory.
    pub fn finish(&self) {
        self.ready.close_and_wait(std::time::Duration::from_secs(5));
    }

    /// Drops cached keys older than the TTL.
    pub fn sweep_keys(&self) {
        for id in self.keys.sweep() {
            crate::audit::event(
                "cache_evicted",
                serde_json::json!({"file_id": id.to_string(), "reason": "ttl"}),
            );
        }
    }

    pub fn cached_keys(&self) -> usize {
        self.keys.len()
    }

    /// Prefetched keys that opens used, and that left the cache unused.
    pub fn prefetch_outcomes(&self) -> (u64, u64) {
        let p = &self.keys.prefetch;
        (
            p.used.load(Ordering::Relaxed),
            p.evicted_unused.load(Ordering::Relaxed),
        )
    }

    /// The content cipher of the file with header `h`: from the cache, or unwrapped by the KMS.
    ///
    /// The DEK lives on the heap inside its `SecretKey` from the KMS's answer until the
    /// cipher is made from it, and is wiped when it drops here; only the cipher (the derived
    /// key's schedule) is kept.
    fn cipher_for(&self, h: &header::Header, asker: &Asker, wait: Wait) -> FsResult<Arc<ContentCipher>> {
        // A locked volume asks the KMS for nothing.
        self.guard()?;
        if let Some(c) = self.keys.get(&h.file_id) {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(c);
        }
        if !wait.may_wait() {
            return Err(FsError::WouldWait);
        }
        self.stats.cache_misses.fetch_add(1, Ordering::Relaxed);
        let _claim = loop {
            match self.keys.claim(h.file_id) {
                Fetch::Mine(claim) => {
                    // The fetch that held it may have just cached the key.
                    if let Some(c) = self.keys.get(&h.file_id) {
                        return Ok(c);
                    }
                    break claim;
                }
                Fetch::Theirs(mut other) => {
                    // A prefetch pass or another open is asking for this key now: its answer
                    // serves this open too. If it brings no key, this open asks itself.
                    self.stats.kms_joined.fetch_add(1, Ordering::Relaxed);
                    let waited =
                        waiters::wait_kms(&self.runtime, &self.lock_signal.subscribe(), wait, async {
                            let _ = other.changed().await;
                            Ok(())
                        })?;
                    if let Err(e) = waited {
                        log::error!("file {}: cannot unwrap its key: {e}", h.file_id);
                        if let KmsError::Unreachable(m) = &e {
                            self.events.unreachable(m);
                        }
                        return Err(e.into());
                    }
                    self.guard()?;
                    if let Some(c) = self.keys.get(&h.file_id) {
                        return Ok(c);
                    }
                }
            }
        };
        self.stats.kms_calls.fetch_add(1, Ordering::Relaxed);
        let wrapped = WrappedDek {
            key_ref: h.slot.key_ref.clone(),
            blob: h.slot.wrapped.clone(),
        };
        let version = self.kms.version_of(&wrapped);
        let started = std::time::Instant::now();
        let unanswered = self.stats.kms_unanswered.start();
        let binding = Binding::file(self.volume_id, h.file_id);
        let result = waiters::wait_kms(
            &self.runtime,
            &self.lock_signal.subscribe(),
            wait,
            self.kms.unwrap(&wrapped, &binding),
        )?;
        drop(unanswered);
        self.stats.kms_call_ended(started.elapsed(), &result);
        prefetch::audit_unwrap(asker, h, &wrapped, version, &result, started, false);
        let dek = result.inspect_err(|e| {
            log::error!("file {}: cannot unwrap its key: {e}", h.file_id);
            match e {
                KmsError::Denied(m) => self.events.denied(m),
                KmsError::Unreachable(m) => self.events.unreachable(m),
                _ => {}
            }
        })?;
        self.events.ok();
        if let Some(why) = self.access.unwrapped(asker) {
            self.events.lock(&why);
        }
        let cipher = Arc::new(ContentCipher::new(&dek, h.file_id));
        drop(dek);
        if let Some(old) = self.keys.insert(h.file_id, cipher.clone()) {
            crate::audit::event(
                "cache_evicted",
                serde_json::json!({"file_id": old.to_string(), "reason": "lru"}),
            );
        }
        Ok(cipher)
    }

    fn handles(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Handle>>> {
        self.handles.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn handle(&self, fh: u64) -> FsResult<Arc<Handle>> {
        self.handles().get(&fh).cloned().ok_or(FsError::BadHandle)
    }

    /// Registers a handle; refused once the volume is locked (an open that was waiting on
    /// the KMS when the lock came must not hand out a key).
    fn add_handle(&self, h: Handle) -> FsResult<u64> {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let mut handles = self.handles();
        self.guard()?;
        if let Handle::File {
            inode, write: true, ..
        } = &h
        {
            // Before the handle exists: no write through it can come before this.
            inode.changes.begin();
        }
        handles.insert(fh, Arc::new(h));
        Ok(fh)
    }

    fn check_writable(&self) -> FsResult<()> {
        if self.options.read_only {
            Err(FsError::ReadOnly)
        } else {
            Ok(())
        }
    }

    fn attr_of(&self, inode: &Inode) -> FsResult<Attr> {
        let st = sys::fstatat(inode.fd(), OsStr::new(""))?;
        Ok(self.attr_from(inode, &st))
    }

    pub fn forget(&self, ino: u64, n: u64) {
        self.inodes.forget(ino, n);
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        self.attr_of(&*self.inodes.get(ino)?)
    }

    pub fn setattr(&self, ino: u64, fh: Option<u64>, set: SetAttr) -> FsResult<Attr> {
        self.setattr_waiting(ino, fh, set, SetIdRule::Keep, &Asker::daemon(), Wait::Forever)
    }

    /// [`Fs::setattr`] for a FUSE worker: a truncate by path (no handle) of a file whose key
    /// is not in memory is parked on a KMS waiter, as an open is; anything else is answered
    /// at once.
    pub fn setattr_then(
        self: &Arc<Self>,
        ino: u64,
        fh: Option<u64>,
        set: SetAttr,
        caller: Caller,
        done: impl FnOnce(FsResult<Attr>) + Send + 'static,
    ) {
        let setid = self.setid_rule(&set, caller.pid);
        if set.size.is_some() && fh.is_none() && self.guard().is_ok() {
            // Truncating by path opens the file: the policy decides as for an open.
            let asker = match self.admit(caller, "truncate", || self.file_id_of(ino)) {
                Ok((asker, _)) => asker,
                Err(e) => return done(Err(e)),
            };
            // A probe before anything changes, so that a parked setattr starts from scratch.
            let probe = self.inodes.get(ino).and_then(|inode| {
                self.open_content(&inode, &asker, Wait::No)?;
                self.close_content(&inode);
                Ok(())
            });
            if let Err(FsError::WouldWait) = probe {
                let fs = self.clone();
                self.park(move |wait| done(fs.setattr_waiting(ino, fh, set, setid, &asker, wait)));
                return;
            }
            return done(self.setattr_waiting(ino, fh, set, setid, &asker, Wait::Forever));
        }
        done(self.setattr_waiting(ino, fh, set, setid, &Asker::daemon(), Wait::Forever))
    }

    fn setattr_waiting(
        &self,
        ino: u64,
        fh: Option<u64>,
        set: SetAttr,
        setid: SetIdRule,
        asker: &Asker,
        wait: Wait,
    ) -> FsResult<Attr> {
        let inode = self.inodes.get(ino)?;
        if setid == SetIdRule::Clear {
            self.clear_setid(&inode, None)?;
        }
        if let Some(mode) = set.mode
            && inode.kind != Kind::Symlink
        {
            sys::chmod_fd(inode.fd(), mode & 0o7777)?;
        }
        if set.uid.is_some() || set.gid.is_some() {
            sys::chown_fd(inode.fd(), set.uid, set.gid)?;
        }
        if let Some(size) = set.size {
            // Truncating by path opens the file: its key would come from the KMS.
            self.guard()?;
            self.check_writable()?;
            if inode.kind != Kind::File {
                return Err(FsError::InvalidArgument);
            }
            let content = match fh {
                Some(fh) => match &*self.handle(fh)? {
                    Handle::File { content, .. } => content.clone(),
                    Handle::Dir { .. } => return Err(FsError::BadHandle),
                },
                None => self.open_content(&inode, asker, wait)?,
            };
            // Once the truncate is allowed (a refused one changes nothing).
            if let SetIdRule::UnlessPrivileged(pid) = setid
                && let Err(e) = self.clear_setid(&inode, Some(pid))
            {
                if fh.is_none() {
                    self.close_content(&inode);
                }
                return Err(e);
            }
            inode.changes.begin();
            let result = content.truncate(size);
            inode.changes.end();
            if fh.is_none() {
                self.close_content(&inode);
            }
            result?;
        }
        if set.atime.is_some() || set.mtime.is_some() {
            sys::utimens_fd(inode.fd(), set.atime, set.mtime)?;
        }
        self.attr_of(&inode)
    }

    /// Creates a regular file with a fresh DEK and returns it open, waiting for the KMS if
    /// no file made ahead is ready.
    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        caller: Caller,
    ) -> FsResult<(Attr, u64)> {
        // Not parked (mknod of a regular file): a throttling guard's delay is not applied.
        let (asker, _) = self.admit(caller, "create", || None)?;
        self.create_waiting(parent, name, mode, flags, &asker, Wait::Forever)
    }

    /// [`Fs::create`] for a FUSE worker: `done` gets the result, at once when a file made
    /// ahead is ready (or the create fails early), else from a KMS waiter thread once the KMS
    /// has given the new file its key (at most `--open-timeout` later, at once on lock).
    pub fn create_then(
        self: &Arc<Self>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        caller: Caller,
        done: impl FnOnce(FsResult<(Attr, u64)>) + Send + 'static,
    ) {
        let (asker, delay) = match self.admit(caller, "create", || None) {
            Ok(a) => a,
            Err(e) => return done(Err(e)),
        };
        if let Some(d) = delay {
            let (fs, name) = (self.clone(), name.to_owned());
            return self.park_after(d, move |wait| {
                done(fs.create_waiting(parent, &name, mode, flags, &asker, wait))
            });
        }
        match self.create_waiting(parent, name, mode, flags, &asker, Wait::No) {
            Err(FsError::WouldWait) => {
                let (fs, name) = (self.clone(), name.to_owned());
                self.park(move |wait| done(fs.create_waiting(parent, &name, mode, flags, &asker, wait)));
            }
            r => done(r),
        }
    }

    fn create_waiting(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        asker: &Arc<Asker>,
        wait: Wait,
    ) -> FsResult<(Attr, u64)> {
        self.guard()?;
        let caller = Caller {
            uid: asker.who.uid,
            gid: asker.who.gid,
            pid: asker.who.pid,
        };
        self.check_writable()?;
        let dir = self.inodes.get(parent)?;
        let b = self.backing(&dir, name)?;
        let content = self.create_entry(&dir, &b, |n| {
            if let Some(content) = self.create_from_ready(&dir, n, mode)? {
                return Ok(content);
            }
            if !wait.may_wait() {
                return Err(FsError::WouldWait);
            }
            // Made under a hidden name and renamed into place once its header is written: a
            // daemon killed in between (the KMS call can take a while) leaves a hidden
            // temporary file, never an entry without a header, which could not be opened.
            let tmp = names::temp_name();
            let fd = sys::openat(
                dir.fd(),
                &tmp,
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                mode & 0o7777,
            )?;
            let file = File::from(fd);
            let made = self
                .write_new_header(&file, wait)
                .and_then(|cipher| {
                    // The header is durable before the entry has its name, so no cut, at any
                    // moment, can leave a named file without its header: that would read as a
                    // file cut by the storage (EIO), which must stay the answer to tampering.
                    file.sync_data()?;
                    ContentFile::new(file, cipher, self.layout, true)
                })
                .and_then(|content| {
                    sys::renameat2(dir.fd(), &tmp, dir.fd(), n, libc::RENAME_NOREPLACE)?;
                    Ok(content)
                });
            if made.is_err() {
                let _ = sys::unlinkat(dir.fd(), &tmp, false);
            }
            made
        })?;
        let content = Arc::new(content);
        let attr = self.finish_create(&dir, &b.name, caller)?;
        let inode = self.inodes.get(attr.ino)?;
        let content = {
            let mut open = inode.open.lock().unwrap_or_else(|p| p.into_inner());
            // A fresh file has no content open, unless another create raced us to it (the
            // kernel serialises creates in one directory, so this is belt and braces).
            let content = open.content().unwrap_or(content);
            open.set_content(Some(content.clone()));
            open.handles += 1;
            content
        };
        let write = flags & libc::O_ACCMODE != libc::O_RDONLY;
        self.audit_open(asker, "create", &content, write);
        let fh = self.add_handle(Handle::File {
            inode,
            content,
            write,
            asker: asker.clone(),
        })?;
        Ok((attr, fh))
    }

    /// Gets a new file id and its wrapped DEK from the KMS and writes the header.
    fn write_new_header(&self, file: &File, wait: Wait) -> FsResult<Arc<ContentCipher>> {
        // A locked volume asks the KMS for nothing.
        self.guard()?;
        let key = self.maker().new_key(false, wait)?;
        let file_id = key.file_id;
        let cipher = ready::write_header(file, key)?;
        // Reopening a file just made needs no KMS call.
        self.keys.insert(file_id, cipher.clone());
        Ok(cipher)
    }

    /// A create from a file made ahead (`ready`): linked (nameless) or renamed (hidden name)
    /// into place as `name` in `dir`, and given its mode. `None` when no file is ready, in a
    /// set-group-id directory (a file made in the root would not carry the directory's
    /// group), or when it cannot be put there (`dir` on another filesystem mounted inside
    /// the backing tree: EXDEV): the create then makes its own file.
    fn create_from_ready(&self, dir: &Inode, name: &OsStr, mode: u32) -> FsResult<Option<ContentFile>> {
        if sys::fstatat(dir.fd(), OsStr::new(""))?.st_mode & libc::S_ISGID != 0 {
            return Ok(None);
        }
        let Some(r) = self.ready.take(&self.maker()) else {
            return Ok(None);
        };
        let placed = match &r.name {
            None => sys::link_fd(r.file.as_fd(), dir.fd(), name),
            Some(hidden) => {
                let root = self.ready.root();
                sys::renameat2(root.fd(), hidden, dir.fd(), name, libc::RENAME_NOREPLACE)
            }
        };
        if let Err(e) = placed {
            self.ready.put_back(r);
            return match e.raw_os_error() {
                Some(libc::EEXIST) => Err(e.into()),
                // EXDEV, say: the file suits creates elsewhere, and this one makes its own.
                _ => Ok(None),
            };
        }
        // Its mode as asked, and its times those of the create, not of when it was made.
        let made = sys::fchmod(r.file.as_fd(), mode & 0o7777)
            .and_then(|()| sys::utimens_fd(r.file.as_fd(), Some(None), Some(None)))
            .map_err(FsError::from)
            .and_then(|()| ContentFile::new(r.file, r.cipher.clone(), self.layout, true));
        if made.is_err() {
            let _ = sys::unlinkat(dir.fd(), name, false);
        }
        self.keys.insert(r.file_id, r.cipher);
        made.map(Some)
    }

    fn maker(&self) -> ready::Maker {
        ready::Maker {
            kms: self.kms.clone(),
            volume_id: self.volume_id,
            runtime: self.runtime.clone(),
            events: self.events.clone(),
            stats: self.stats.clone(),
            locked: self.lock_signal.subscribe(),
        }
    }

    /// The open content of a regular file, opening it (header + KMS unwrap) if needed, and
    /// counting one more user of it. Pair with `close_content`.
    ///
    /// With `Wait::No` it fails with `WouldWait` rather than ask the KMS, or wait behind an
    /// open of the same file that is asking it.
    fn open_content(&self, inode: &Inode, asker: &Asker, wait: Wait) -> FsResult<Arc<ContentFile>> {
        if inode.kind != Kind::File {
            return Err(FsError::InvalidArgument);
        }
        let mut open = if wait.may_wait() {
            inode.open.lock().unwrap_or_else(|p| p.into_inner())
        } else {
            match inode.open.try_lock() {
                Ok(g) => g,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return Err(FsError::WouldWait),
            }
        };
        if let Some(c) = open.content() {
            open.handles += 1;
            return Ok(c);
        }
        let (fd, writable) = match sys::reopen(inode.fd(), libc::O_RDWR) {
            Ok(fd) => (fd, !self.options.read_only),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM)
                ) =>
            {
                (sys::reopen(inode.fd(), libc::O_RDONLY)?, false)
            }
            Err(e) => return Err(e.into()),
        };
        let file = File::from(fd);
        let mut hdr = vec![0u8; HEADER_LEN as usize];
        let n = crate::durable::read_up_to(&file, &mut hdr)?;
        let h = header::decode(&hdr[..n]).map_err(|e| {
            log::error!("inode {}: unreadable header: {e}", inode.ino);
            FsError::Corrupt
        })?;
        let cipher = self.cipher_for(&h, asker, wait)?;
        let content = Arc::new(ContentFile::new(file, cipher, self.layout, writable)?);
        // A lock that came while we waited on the KMS wins: drop the key, publish nothing.
        self.guard()?;
        open.set_content(Some(content.clone()));
        open.handles += 1;
        Ok(content)
    }

    /// One user of an inode's content is done; the last one closes it and drops its key.
    fn close_content(&self, inode: &Inode) {
        let mut open = inode.open.lock().unwrap_or_else(|p| p.into_inner());
        open.handles = open.handles.saturating_sub(1);
        if open.handles == 0 {
            open.set_content(None);
        }
    }

    /// Opens a file for the daemon itself (no policy), waiting for the KMS if its key is not
    /// in memory.
    pub fn open(&self, ino: u64, flags: i32) -> FsResult<u64> {
        self.open_waiting(ino, flags, &Arc::new(Asker::daemon()), Wait::Forever)
    }

    /// [`Fs::open`] for a FUSE worker: `done` gets the handle or the error, at once when no
    /// KMS call is needed (content open, key cached) or the open fails early; else from a KMS
    /// waiter thread once the key is unwrapped (at most `--open-timeout` later, and at once
    /// with ENOKEY if the volume is locked meanwhile).
    pub fn open_then(
        self: &Arc<Self>,
        ino: u64,
        flags: i32,
        caller: Caller,
        done: impl FnOnce(FsResult<u64>) + Send + 'static,
    ) {
        self.stats.opens.fetch_add(1, Ordering::Relaxed);
        let (asker, delay) = match self.admit(caller, "open", || self.file_id_of(ino)) {
            Ok(a) => a,
            Err(e) => return done(Err(e)),
        };
        if let Some(d) = delay {
            let fs = self.clone();
            return self.park_after(d, move |wait| done(fs.open_waiting(ino, flags, &asker, wait)));
        }
        match self.open_waiting(ino, flags, &asker, Wait::No) {
            Err(FsError::WouldWait) => {
                self.prefetch_opened(ino, &asker, true);
                let fs = self.clone();
                self.park(move |wait| done(fs.open_waiting(ino, flags, &asker, wait)));
            }
            r => {
                if r.is_ok() {
                    self.prefetch_opened(ino, &asker, false);
                }
                done(r)
            }
        }
    }

    /// Parks `job` for `delay` (a throttled open: on a timer, no thread sleeps), then as
    /// `park` does.
    fn park_after(self: &Arc<Self>, delay: std::time::Duration, job: impl FnOnce(Wait) + Send + 'static) {
        let fs = self.clone();
        self.runtime.spawn(async move {
            tokio::time::sleep(delay).await;
            fs.park(job);
        });
    }

    /// Runs `job` on a KMS waiter thread, allowed to wait `--open-timeout` from now. With
    /// every waiter busy and the queue full, runs it here, not allowed to wait: unless the
    /// key has come meanwhile, it fails with EAGAIN (`WouldWait`) rather than hold a FUSE
    /// worker.
    fn park(&self, job: impl FnOnce(Wait) + Send + 'static) {
        let job = Arc::new(Mutex::new(Some(job)));
        let queued = job.clone();
        let wait = Wait::from_now(self.options.open_timeout);
        let submitted = self.waiters.submit(Box::new(move || {
            if let Some(job) = queued.lock().unwrap_or_else(|p| p.into_inner()).take() {
                job(wait);
            }
        }));
        if submitted.is_err() {
            log::warn!(
                "{} opens are waiting on the KMS already: refusing another (EAGAIN)",
                waiters::MAX_THREADS + waiters::MAX_QUEUED
            );
            if let Some(job) = job.lock().unwrap_or_else(|p| p.into_inner()).take() {
                job(Wait::No);
            }
        }
    }

    fn open_waiting(&self, ino: u64, flags: i32, asker: &Arc<Asker>, wait: Wait) -> FsResult<u64> {
        self.guard()?;
        let inode = self.inodes.get(ino)?;
        let write = flags & libc::O_ACCMODE != libc::O_RDONLY;
        if write {
            self.check_writable()?;
        }
        let content = self.open_content(&inode, asker, wait)?;
        if write && !content.writable() {
            self.close_content(&inode);
            return Err(FsError::PermissionDenied);
        }
        self.audit_open(asker, "open", &content, write);
        self.add_handle(Handle::File {
            inode,
            content,
            write,
            asker: asker.clone(),
        })
    }

    fn file_handle(&self, fh: u64) -> FsResult<(Arc<ContentFile>, bool)> {
        match &*self.handle(fh)? {
            Handle::File { content, write, .. } => Ok((content.clone(), *write)),
            Handle::Dir { .. } => Err(FsError::BadHandle),
        }
    }

    /// Reads into `buf[..n]` (a scratch buffer the caller reuses) and returns `n`.
    pub fn read(&self, fh: u64, offset: u64, size: u32, buf: &mut Vec<u8>) -> FsResult<usize> {
        let handle = self.handle(fh)?;
        let Handle::File { content, asker, .. } = &*handle else {
            return Err(FsError::BadHandle);
        };
        let r = content.read_into(offset, size, buf);
        match &r {
            Ok(n) => {
                // Bytes decrypted count for the usage guard of who opened the file.
                if self.access.enabled()
                    && let Some(why) = self.access.read(asker, *n as u64)
                {
                    self.events.lock(&why);
                }
                self.stats.bytes_read.fetch_add(*n as u64, Ordering::Relaxed)
            }
            Err(FsError::Corrupt) => self.stats.auth_failures.fetch_add(1, Ordering::Relaxed),
            Err(_) => 0,
        };
        r
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<usize> {
        let (content, write) = self.file_handle(fh)?;
        if !write {
            return Err(FsError::NotWritable);
        }
        let n = content.write(offset, data)?;
        self.stats.bytes_written.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> FsResult<()> {
        self.file_handle(fh)?.0.sync(datasync)
    }

    /// Makes the directory's entries durable. Everything they depend on already is: headers
    /// are synced before a file gets its name, id files and long-name sidecars before their
    /// entries (docs/format.md, "Crash ordering"). An entry renamed out of this directory into
    /// another since the last sync makes that other directory durable first: syncing only the
    /// side it left could lose both names at a cut (a filesystem that journals a rename as one
    /// change never does; one that syncs each directory alone can).
    pub fn fsyncdir(&self, ino: u64) -> FsResult<()> {
        let dir = self.inodes.get(ino)?;
        let targets = self.lock_renamed_out().remove(&ino).unwrap_or_default();
        for target in targets.values() {
            sys::fsync_dir(target.fd())?;
        }
        Ok(sys::fsync_dir(dir.fd())?)
    }

    /// Notes a rename from directory `from` into `to` (see `fsyncdir`).
    fn renamed_between(&self, from: &Arc<Inode>, to: &Arc<Inode>) {
        if from.ino != to.ino {
            self.lock_renamed_out()
                .entry(from.ino)
                .or_default()
                .insert(to.ino, to.clone());
        }
    }

    fn lock_renamed_out(&self) -> std::sync::MutexGuard<'_, HashMap<u64, HashMap<u64, Arc<Inode>>>> {
        self.renamed_out.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> FsResult<()> {
        if mode != 0 {
            return Err(FsError::Unsupported);
        }
        let (content, write) = self.file_handle(fh)?;
        if !write {
            return Err(FsError::NotWritable);
        }
        content.allocate(offset, length)
    }

    pub fn release(&self, fh: u64) {
        let h = self.handles().remove(&fh);
        if let Some(h) = h
            && let Handle::File { inode, write, .. } = &*h
        {
            if *write {
                inode.changes.end();
            }
            self.close_content(inode);
        }
    }

    /// A [`quiet::Quiet`] token for the file behind `fh` if no one may change its content
    /// now (no write handle open, no truncate in progress).
    pub fn quiet(&self, fh: u64) -> Option<quiet::Quiet> {
        match &*self.handle(fh).ok()? {
            Handle::File { inode, .. } => inode.changes.quiet(),
            Handle::Dir { .. } => None,
        }
    }

    pub fn statfs(&self) -> FsResult<libc::statvfs> {
        let root = self.inodes.get(ROOT_INO)?;
        Ok(sys::statvfs_fd(root.fd())?)
    }

    /// Number of inodes the kernel holds references to (for status and tests).
    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }
}
