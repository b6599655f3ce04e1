//! New files made ahead of their creates. A create must not give a name to a file whose header
//! is not yet durable: after a power cut that name could lead to a file cut below its header,
//! which has to keep reading as damaged (it is also what a storage that truncates files
//! produces). Syncing each header in the create costs a disk flush per file (5–6× fewer
//! creates per second on a disk), and waits on the KMS while the kernel holds the directory.
//!
//! So a background thread keeps a few dozen files ready: each with a new file id, a DEK from
//! the KMS wrapped in its header, synced, in batches whose flushes run in parallel (the
//! filesystem's journal commits them together). A create links one into place and sets its
//! mode: no KMS call, no flush. When none is ready (the first create of a mount, a burst, the
//! KMS away) the create makes its file itself, and syncs it.
//!
//! Ready files have no name where the backing filesystem can make such files (O_TMPFILE:
//! ext4, xfs, btrfs, tmpfs): a create links one into its directory, and a crash leaves
//! nothing behind. Elsewhere (NFS, FUSE) they are hidden temporary entries in the backing
//! root (`.kmsfs.tmp.ready.<hex>`) that a create renames into place: unmount and lock remove
//! them, a crash leaves them for the next writable mount to remove (fsck lists them as
//! notices meanwhile). Their keys are dropped with the volume's other keys on lock.

use super::error::{FsError, FsResult};
use super::inode::Inode;
use super::stats::{KmsEvents, Stats};
use super::waiters::{Wait, wait_kms};
use crate::format::block::ContentCipher;
use crate::format::header::{self, HEADER_LEN, KeySlot};
use crate::format::name::TEMP_PREFIX;
use crate::format::{FileId, VolumeId};
use crate::kms::{KeyProvider, KmsError, NewFileKey};
use crate::sys;
use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// Files kept ready; a refill starts when fewer than half are left.
const TARGET: usize = 128;
/// Files made and synced together; a refill makes whole batches (half the target).
const BATCH: usize = TARGET / 2;
/// Threads that flush a batch together: the journal commits concurrent flushes together.
const SYNC_THREADS: usize = 16;

fn ready_prefix() -> String {
    format!("{TEMP_PREFIX}ready.")
}

/// A file with its header, durable, nameless or under a hidden name in the backing root.
pub(super) struct Ready {
    /// `None` for a nameless (O_TMPFILE) file.
    pub name: Option<OsString>,
    pub file: File,
    pub file_id: FileId,
    pub cipher: Arc<ContentCipher>,
}

/// What making a header needs: the KMS, and where its answers are reported.
#[derive(Clone)]
pub(super) struct Maker {
    pub kms: Arc<dyn KeyProvider>,
    pub volume_id: VolumeId,
    pub runtime: tokio::runtime::Handle,
    pub events: Arc<dyn KmsEvents>,
    pub stats: Arc<Stats>,
    /// True once the volume is locked: ends a wait on the KMS at once.
    pub locked: tokio::sync::watch::Receiver<bool>,
}

impl Maker {
    /// A new file id and its DEK, wrapped and bound to both, from the KMS; `ahead` for a file
    /// made before its create (the audit log says so).
    /// It waits as `wait` says (`Wait::No` counts as `Forever`: the caller decided to wait).
    pub fn new_key(&self, ahead: bool, wait: Wait) -> FsResult<NewFileKey> {
        // A refill that checked for a lock just before one came (it then made its file) must
        // not ask, nor count a call: a locked volume asks the KMS for nothing.
        if *self.locked.borrow() {
            return Err(FsError::Locked);
        }
        self.stats.kms_calls.fetch_add(1, Ordering::Relaxed);
        let wait = if wait.may_wait() { wait } else { Wait::Forever };
        let started = std::time::Instant::now();
        let unanswered = self.stats.kms_unanswered.start();
        let key = wait_kms(
            &self.runtime,
            &self.locked,
            wait,
            self.kms.new_file_key(self.volume_id),
        )?;
        drop(unanswered);
        self.stats.kms_call_ended(started.elapsed(), &key);
        let key = key.inspect_err(|e| match e {
            KmsError::Denied(m) => self.events.denied(m),
            KmsError::Unreachable(m) => self.events.unreachable(m),
            _ => {}
        })?;
        self.events.ok();
        crate::audit::event(
            "dek_generated",
            serde_json::json!({"file_id": key.file_id.to_string(), "key": key.wrapped.key_ref,
                               "version": self.kms.version_of(&key.wrapped), "ahead": ahead,
                               "outcome": "ok"}),
        );
        Ok(key)
    }
}

/// Writes the header of a new file (not synced) and returns its cipher; the DEK is wiped as
/// soon as the cipher is made from it.
pub(super) fn write_header(file: &File, key: NewFileKey) -> FsResult<Arc<ContentCipher>> {
    let NewFileKey {
        file_id,
        dek,
        wrapped,
    } = key;
    let slot = KeySlot {
        sequence: 1,
        key_ref: wrapped.key_ref,
        wrapped: wrapped.blob,
    };
    let bytes = header::encode(&file_id, &slot).map_err(|e| {
        log::error!("file {file_id}: cannot encode header: {e}");
        FsError::Corrupt
    })?;
    sys::fallocate(file.as_fd(), 0, 0, HEADER_LEN)?;
    file.write_all_at(&bytes, 0)?;
    Ok(Arc::new(ContentCipher::new(&dek, file_id)))
}

#[derive(Default)]
struct State {
    queue: VecDeque<Ready>,
    /// A refill thread is running.
    filling: bool,
    /// Set by lock: no file is made or handed out again.
    closed: bool,
}

/// The ready files of one mount.
pub(super) struct ReadyFiles {
    root: Arc<Inode>,
    /// The backing filesystem makes nameless files (until an O_TMPFILE open says otherwise).
    nameless: AtomicBool,
    state: Mutex<State>,
    /// Signalled when a refill ends.
    filled: Condvar,
    /// Started with the first batch, kept for the mount.
    flushers: OnceLock<Flushers>,
}

impl ReadyFiles {
    /// The ready files of a mount starting on `root`. A writable mount first removes those
    /// a crashed mount left behind: before it serves, so that no refill of its own (nor a
    /// late one of an earlier mount in the same process) can race with the sweep.
    pub fn new(root: Arc<Inode>, writable: bool) -> Self {
        let ready = ReadyFiles {
            root,
            nameless: AtomicBool::new(true),
            state: Mutex::new(State::default()),
            filled: Condvar::new(),
            flushers: OnceLock::new(),
        };
        if writable {
            ready.sweep();
        }
        ready
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn root(&self) -> &Inode {
        &self.root
    }

    /// A ready file, if there is one; starts a refill when few are left.
    pub fn take(self: &Arc<Self>, maker: &Maker) -> Option<Ready> {
        let (ready, refill) = {
            let mut st = self.state();
            if st.closed {
                return None;
            }
            let ready = st.queue.pop_front();
            let refill = !st.filling && st.queue.len() < TARGET / 2;
            st.filling |= refill;
            (ready, refill)
        };
        if refill {
            let (this, maker) = (self.clone(), maker.clone());
            let spawned = std::thread::Builder::new()
                .name("kmsfs-ready".into())
                .spawn(move || this.fill(&maker));
            if let Err(e) = spawned {
                log::warn!("cannot start the thread that makes files ahead of creates: {e}");
                self.state().filling = false;
            }
        }
        ready
    }

    /// Returns a file that a create could not use (its name was taken).
    pub fn put_back(&self, ready: Ready) {
        let mut st = self.state();
        if st.closed {
            drop(st);
            self.discard(&ready);
        } else {
            st.queue.push_front(ready);
        }
    }

    /// Drops every ready file and its key, and makes no more (lock).
    pub fn close(&self) {
        let drained: Vec<Ready> = {
            let mut st = self.state();
            st.closed = true;
            st.queue.drain(..).collect()
        };
        for r in drained {
            self.discard(&r);
        }
    }

    /// Removes a ready file's name, if it has one; closing it frees the rest.
    fn discard(&self, r: &Ready) {
        if let Some(name) = &r.name {
            self.remove(name);
        }
    }

    fn remove(&self, name: &OsStr) {
        if let Err(e) = sys::unlinkat(self.root.fd(), name, false)
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            log::warn!("cannot remove a ready file from the backing root: {e}");
        }
    }

    /// Runs on its own thread: makes whole batches while one more fits. Never a short batch
    /// to top the queue up: while creates take files, that would flush a few files at a time,
    /// each batch paying for its sync threads (most of a ready file's cost when they were
    /// started for two or three files).
    fn fill(&self, maker: &Maker) {
        loop {
            {
                let st = self.state();
                if st.closed || st.queue.len() + BATCH > TARGET {
                    break;
                }
            }
            let batch = match self.make_batch(maker, BATCH) {
                Ok(b) => b,
                Err(e) => {
                    // The KMS's answer has been reported; creates make their own files now.
                    log::debug!("making files ahead of creates stopped: {e}");
                    break;
                }
            };
            let mut st = self.state();
            if st.closed {
                drop(st);
                batch.iter().for_each(|r| self.discard(r));
                break;
            }
            st.queue.extend(batch);
        }
        self.state().filling = false;
        self.filled.notify_all();
    }

    /// Closes (as [`ReadyFiles::close`]) and waits up to `limit` for a refill in flight to
    /// remove what it was making, so that an unmount leaves no ready file behind.
    pub fn close_and_wait(&self, limit: Duration) {
        self.close();
        let st = self.state();
        let _ = self.filled.wait_timeout_while(st, limit, |st| st.filling);
    }

    /// `n` files with their headers, all synced.
    fn make_batch(&self, maker: &Maker, n: usize) -> FsResult<Vec<Ready>> {
        let mut batch = Vec::with_capacity(n);
        let made = (|| -> FsResult<()> {
            for _ in 0..n {
                // Stop as soon as the volume locks: it asks the KMS for nothing more.
                if self.state().closed {
                    return Err(FsError::Locked);
                }
                // The file first: a backing root that refuses files costs no key.
                let (file, name) = self.new_file()?;
                let made = maker.new_key(true, Wait::Forever).and_then(|key| {
                    let file_id = key.file_id;
                    write_header(&file, key).map(|cipher| (file_id, cipher))
                });
                match made {
                    Ok((file_id, cipher)) => batch.push(Ready {
                        name,
                        file,
                        file_id,
                        cipher,
                    }),
                    Err(e) => {
                        if let Some(name) = &name {
                            self.remove(name);
                        }
                        return Err(e);
                    }
                }
            }
            let (synced, r) = self
                .flushers
                .get_or_init(Flushers::start)
                .sync_all(std::mem::take(&mut batch));
            batch = synced;
            r
        })();
        if let Err(e) = made {
            batch.iter().for_each(|r| self.discard(r));
            return Err(e);
        }
        Ok(batch)
    }

    /// A new empty file: nameless if the backing filesystem can make one, else under a
    /// hidden name in the backing root.
    fn new_file(&self) -> FsResult<(File, Option<OsString>)> {
        if self.nameless.load(Ordering::Relaxed) {
            let flags = libc::O_RDWR | libc::O_TMPFILE;
            match sys::openat(self.root.fd(), OsStr::new("."), flags, 0o600) {
                Ok(fd) => return Ok((File::from(fd), None)),
                // Out of space or descriptors: a named file would fail alike, for now.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ENOSPC | libc::EDQUOT | libc::EMFILE | libc::ENFILE | libc::ENOMEM)
                    ) =>
                {
                    return Err(e.into());
                }
                // EOPNOTSUPP from NFS, FUSE, overlayfs on some uppers; EISDIR from kernels
                // before 3.11; anything else a sandbox or security module may answer. Named
                // files from now on; if those fail too, the refill stops with that error.
                Err(e) => {
                    log::info!(
                        "the backing filesystem makes no nameless files ({e}); files made ahead of creates get hidden names"
                    );
                    self.nameless.store(false, Ordering::Relaxed);
                }
            }
        }
        let mut r = [0u8; 8];
        crate::crypto::fill_random(&mut r);
        let name: OsString = format!("{}{}", ready_prefix(), crate::hex::encode(&r)).into();
        let flags = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
        let file = File::from(sys::openat(self.root.fd(), &name, flags, 0o600)?);
        Ok((file, Some(name)))
    }

    /// Removes ready files a crashed mount left in the backing root. Only one mount at a time
    /// makes files under that prefix, and this one has made none yet.
    fn sweep(&self) {
        let path = sys::proc_fd_path(self.root.fd());
        let Ok(entries) = std::fs::read_dir(std::path::Path::new(OsStr::from_bytes(path.as_bytes()))) else {
            return;
        };
        let prefix = ready_prefix();
        let mut removed = 0;
        for e in entries.flatten() {
            if e.file_name().as_bytes().starts_with(prefix.as_bytes()) {
                self.remove(&e.file_name());
                removed += 1;
            }
        }
        if removed > 0 {
            log::info!("removed {removed} ready files left by an earlier mount");
        }
    }
}

impl Drop for ReadyFiles {
    fn drop(&mut self) {
        self.close();
    }
}

/// The threads that flush batches. Starting 16 threads for each batch of 64 files and joining
/// them cost about 20 µs of a create's 160 µs of daemon CPU on tmpfs, where the flushes
/// themselves are nearly free. These wait for work for the life of the mount, and end when
/// their [`ReadyFiles`] is dropped.
struct Flushers {
    jobs: mpsc::Sender<Flush>,
}

/// Files to flush, handed back with the result when done.
struct Flush {
    index: usize,
    files: Vec<Ready>,
    done: mpsc::Sender<(usize, Vec<Ready>, std::io::Result<()>)>,
}

impl Flushers {
    fn start() -> Self {
        let (jobs, queue) = mpsc::channel::<Flush>();
        let queue = Arc::new(Mutex::new(queue));
        for _ in 0..SYNC_THREADS {
            let queue = queue.clone();
            let spawned = std::thread::Builder::new()
                .name("kmsfs-flush".into())
                .spawn(move || {
                    loop {
                        // Held while waiting for a job and taking it, never during a flush:
                        // the flushes run in parallel.
                        let job = queue.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        let Ok(Flush { index, files, done }) = job else {
                            return;
                        };
                        let r = files.iter().try_for_each(|r| r.file.sync_data());
                        let _ = done.send((index, files, r));
                    }
                });
            if let Err(e) = spawned {
                // The others take its share; with none at all, `sync_all` reports it.
                log::warn!("cannot start a thread that flushes files made ahead of creates: {e}");
            }
        }
        Flushers { jobs }
    }

    /// Flushes every file of `batch`, spread over the threads; hands the files back, in
    /// their order, with the first error met.
    fn sync_all(&self, batch: Vec<Ready>) -> (Vec<Ready>, FsResult<()>) {
        let per_thread = batch.len().div_ceil(SYNC_THREADS).max(1);
        let (done, results) = mpsc::channel();
        let mut chunks: Vec<Vec<Ready>> = Vec::new();
        let mut rest = batch.into_iter().peekable();
        while rest.peek().is_some() {
            chunks.push(rest.by_ref().take(per_thread).collect());
        }
        let sent = chunks.len();
        let mut back: Vec<Option<Vec<Ready>>> = (0..sent).map(|_| None).collect();
        let mut result: FsResult<()> = Ok(());
        for (index, files) in chunks.into_iter().enumerate() {
            let flush = Flush {
                index,
                files,
                done: done.clone(),
            };
            // No thread left to take it: the job comes back in the error.
            if let Err(mpsc::SendError(flush)) = self.jobs.send(flush) {
                back[flush.index] = Some(flush.files);
                result = Err(std::io::Error::other("no thread left to flush new files").into());
            }
        }
        // Ours dropped, the loop below ends when every job has answered or was dropped with a
        // thread that ended.
        drop(done);
        while let Ok((index, files, r)) = results.recv() {
            back[index] = Some(files);
            if result.is_ok() {
                result = r.map_err(FsError::from);
            }
        }
        if back.iter().any(Option::is_none) && result.is_ok() {
            result = Err(std::io::Error::other("a thread flushing new files ended").into());
        }
        (back.into_iter().flatten().flatten().collect(), result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SecretKey;
    use crate::format::FILE_ID_LEN;

    fn ready_file(dir: &std::path::Path, i: u8) -> Ready {
        let file = File::create(dir.join(format!("f{i}"))).unwrap();
        let file_id = FileId([i; FILE_ID_LEN]);
        Ready {
            name: None,
            file,
            file_id,
            cipher: Arc::new(ContentCipher::new(&SecretKey::generate(), file_id)),
        }
    }

    /// Batches are cut into one chunk per thread, or fewer: each file comes back once, in
    /// order, however the count falls against the threads.
    #[test]
    fn flushing_hands_every_file_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let flushers = Flushers::start();
        for n in [
            0,
            1,
            SYNC_THREADS - 1,
            SYNC_THREADS,
            SYNC_THREADS + 1,
            BATCH,
            3 * SYNC_THREADS + 5,
        ] {
            let batch: Vec<Ready> = (0..n).map(|i| ready_file(dir.path(), i as u8)).collect();
            let (back, r) = flushers.sync_all(batch);
            r.unwrap();
            let ids: Vec<u8> = back.iter().map(|r| r.file_id.0[0]).collect();
            assert_eq!(ids, (0..n).map(|i| i as u8).collect::<Vec<_>>(), "batch of {n}");
        }
    }
}
