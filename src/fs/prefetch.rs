//! Key prefetch: a reader that lists a directory, or opens its files one after another, would
//! otherwise pay one KMS round trip per file. So the keys of the directory's other regular
//! files are unwrapped ahead, many at once (the network backends' batchers send concurrent
//! unwraps as one request), into the key cache, where the following opens find them.
//!
//! Bounds, because every prefetched key is a key in memory and a KMS call nobody asked for yet:
//! - at most `--prefetch` keys per pass, and never more than half the key cache (a pass must
//!   not push out the keys it just placed, nor every key of the files in use);
//! - one pass per directory at a time, [`MAX_RUNNING`] over the whole mount;
//! - only files the caller could open: read permission by the mode bits, as the kernel checks
//!   them (`default_permissions`), search permission on the directory, and the policy's rules;
//!   each unwrap counts for the caller's usage guard and is audited in its name
//!   (`"prefetch": true`).
//!
//! Nothing here runs on a FUSE worker: a trigger updates a little state and spawns the pass;
//! the headers are read on a blocking thread of the runtime and the unwraps are futures on it.
//!
//! Which files: in name order, starting after the file just opened (or at the first, for a
//! listing), the first ones whose keys are not cached. A pass starts when the directory is
//! listed, when two opens in a row in one directory miss the cache (a reader going through
//! it), and, to keep ahead of that reader, when its opens have used half of what the last pass
//! placed.

use super::inode::{Inode, Kind, ROOT_INO};
use super::names::Names;
use super::stats::{KmsEvents, Stats};
use super::{Caller, Fs};
use crate::format::VolumeId;
use crate::format::block::ContentCipher;
use crate::format::header::{self, HEADER_LEN, Header};
use crate::format::name::DirId;
use crate::keycache::KeyCache;
use crate::kms::{Binding, KeyProvider, KmsError, WrappedDek};
use crate::policy::{Access, Asker, Identity};
use crate::sys;
use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The default `--prefetch`: keys per pass. Two Transit batches at most, and at 1,000 opens a
/// second a quarter of a second of reading ahead.
pub const DEFAULT_PREFETCH: usize = 256;
/// Two opens that miss the cache in one directory within this long are a reader going
/// through it.
const SEQUENTIAL_WITHIN: Duration = Duration::from_secs(5);
/// Passes running at once over the whole mount.
const MAX_RUNNING: usize = 4;
/// Directories whose state is kept; past this, the idle ones are forgotten.
const MAX_DIRS: usize = 1024;
/// Files remembered as done per directory; past this, the set starts afresh.
const MAX_SEEN: usize = 1 << 20;

/// What prefetch knows of one directory.
#[derive(Default)]
struct DirState {
    running: bool,
    /// When an open in it last missed the cache.
    last_miss: Option<Instant>,
    /// Keys the last pass placed, and opens in the directory since it started: the next pass
    /// starts when half of them are used.
    placed: usize,
    opens: usize,
    /// The last pass reached the end of the listing: no pass to keep ahead until a miss.
    exhausted: bool,
    /// Backing inode numbers whose keys passes found cached or placed: skipped without reading
    /// their headers. Taken by a running pass and given back when it ends.
    seen: HashSet<u64>,
}

/// Prefetch settings and state, shared by the filesystem and its running passes.
pub(super) struct Prefetch {
    /// Keys per pass (`--prefetch`); 0: off.
    limit: usize,
    /// Per-directory state by inode number, and how many passes run. Taken briefly by opens
    /// and listings (on FUSE workers) and by a pass as it starts and ends; never held across
    /// I/O or a KMS call.
    state: Mutex<(HashMap<u64, DirState>, usize)>,
}

impl Prefetch {
    pub fn new(limit: usize) -> Prefetch {
        Prefetch {
            limit,
            state: Mutex::new((HashMap::new(), 0)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, (HashMap<u64, DirState>, usize)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks a pass over `dir` as running and hands it the directory's done set, if no pass
    /// runs there yet and fewer than [`MAX_RUNNING`] run at all.
    fn start(&self, dir: u64, decide: impl FnOnce(&mut DirState) -> bool) -> Option<HashSet<u64>> {
        let mut g = self.lock();
        let (dirs, running) = &mut *g;
        if dirs.len() >= MAX_DIRS && !dirs.contains_key(&dir) {
            dirs.retain(|_, d| d.running);
        }
        let d = dirs.entry(dir).or_default();
        if d.running || *running >= MAX_RUNNING || !decide(d) {
            return None;
        }
        d.running = true;
        d.opens = 0;
        *running += 1;
        Some(std::mem::take(&mut d.seen))
    }

    /// A pass over `dir` ended, having placed `placed` keys; `exhausted` if it reached the end
    /// of the listing.
    fn end(&self, dir: u64, seen: HashSet<u64>, placed: usize, exhausted: bool) {
        let mut g = self.lock();
        let (dirs, running) = &mut *g;
        *running = running.saturating_sub(1);
        let d = dirs.entry(dir).or_default();
        d.running = false;
        d.placed = placed;
        d.exhausted = exhausted;
        d.seen = if seen.len() > MAX_SEEN {
            HashSet::new()
        } else {
            seen
        };
    }
}

/// Ends a pass's bookkeeping however the pass ends (a runtime shutting down drops it).
struct Running {
    prefetch: Arc<Prefetch>,
    dir: u64,
    seen: HashSet<u64>,
    placed: usize,
    exhausted: bool,
}

impl Drop for Running {
    fn drop(&mut self) {
        let seen = std::mem::take(&mut self.seen);
        self.prefetch.end(self.dir, seen, self.placed, self.exhausted);
    }
}

impl Fs {
    /// `caller` listed directory `ino` from its start: prefetch from its first file.
    pub(super) fn prefetch_listed(&self, ino: u64, caller: Caller) {
        if self.prefetch.limit == 0 {
            return;
        }
        let asker = self.access.asker(caller.uid, caller.gid, caller.pid);
        // The program is named now: the pass's audit events come after `ls` may have exited.
        let _ = asker.who.exe();
        let Some(seen) = self.prefetch.start(ino, |d| {
            // A listing is a fresh look: files whose keys have gone since are wanted again.
            d.seen.clear();
            true
        }) else {
            return;
        };
        self.spawn_pass(ino, None, asker, seen);
    }

    /// An open of inode `ino` by `asker` went ahead (the policy admitted it); `missed`: its key
    /// was not in memory.
    pub(super) fn prefetch_opened(&self, ino: u64, asker: &Asker, missed: bool) {
        if self.prefetch.limit == 0 {
            return;
        }
        let Ok(inode) = self.inodes.get(ino) else {
            return;
        };
        let dir = inode.parent.load(Ordering::Relaxed);
        if inode.kind != Kind::File || dir == 0 {
            return;
        }
        let Some(seen) = self.prefetch.start(dir, |d| {
            d.opens += 1;
            let sequential = missed && d.last_miss.is_some_and(|t| t.elapsed() < SEQUENTIAL_WITHIN);
            if missed {
                d.last_miss = Some(Instant::now());
            }
            if sequential && d.exhausted {
                // Keys have gone (or files come) since the directory was last covered.
                d.seen.clear();
            }
            sequential || (!d.exhausted && d.placed > 0 && d.opens >= d.placed.div_ceil(2))
        }) else {
            return;
        };
        // The pass asks in this caller's name (the rules are applied again there, off this
        // thread).
        let who = self.access.asker(asker.who.uid, asker.who.gid, asker.who.pid);
        let _ = who.who.exe();
        self.spawn_pass(dir, Some(inode.backing_ino()), who, seen);
    }

    /// Starts a pass over directory `dir` for `asker`, after the file with backing inode
    /// `after` if given. The pass's state is already marked running.
    fn spawn_pass(&self, dir: u64, after: Option<u64>, asker: Asker, seen: HashSet<u64>) {
        let mut running = Running {
            prefetch: self.prefetch.clone(),
            dir,
            seen,
            placed: 0,
            exhausted: false,
        };
        if self.guard().is_err() {
            return;
        }
        let (Ok(inode), Ok(names)) = (self.inodes.get(dir), self.names()) else {
            return;
        };
        // The directory's id was read when it was listed or a name in it looked up; a pass
        // does not read it on a FUSE worker.
        let id = match &*names {
            Names::Plain => None,
            Names::Encrypted { root_dir_id, .. } if dir == ROOT_INO => Some(*root_dir_id),
            Names::Encrypted { .. } => match inode.dir_id.get() {
                Some(id) => Some(*id),
                None => return,
            },
        };
        let limit = self.prefetch.limit.min(self.keys.capacity() / 2);
        let pass = Pass {
            dir: inode,
            dir_id: id,
            names,
            after,
            limit,
            asker,
            kms: self.kms.clone(),
            volume_id: self.volume_id,
            keys: self.keys.clone(),
            stats: self.stats.clone(),
            events: self.events.clone(),
            access: self.access.clone(),
            locked: self.lock_signal.subscribe(),
        };
        self.runtime.spawn(async move {
            let seen = std::mem::take(&mut running.seen);
            let Ok(scanned) = tokio::task::spawn_blocking(move || pass.scan(seen)).await else {
                return;
            };
            running.seen = scanned.seen;
            running.exhausted = scanned.exhausted;
            if let Some((pass, wanted)) = scanned.todo {
                running.placed = pass.unwrap_all(wanted, &mut running.seen).await;
            }
            drop(running);
        });
    }
}

/// One pass: what it needs of the filesystem, cloned out of it so that it runs on its own.
struct Pass {
    dir: Arc<Inode>,
    dir_id: Option<DirId>,
    names: Arc<Names>,
    /// Start after this file (backing inode number) in name order; `None`: at the first.
    after: Option<u64>,
    limit: usize,
    /// Who set the pass off: what it may read, and whose name its unwraps are made in.
    asker: Asker,
    kms: Arc<dyn KeyProvider>,
    volume_id: VolumeId,
    keys: Arc<KeyCache>,
    stats: Arc<Stats>,
    events: Arc<dyn KmsEvents>,
    access: Arc<Access>,
    /// True once the volume is locked: the pass stops.
    locked: tokio::sync::watch::Receiver<bool>,
}

/// A file whose key a pass unwraps: its backing inode number and header.
type Wanted = (u64, Header);

/// What a pass found in its directory.
struct Scanned {
    /// The pass and the files whose keys it unwraps; `None`: nothing to do.
    todo: Option<(Pass, Vec<Wanted>)>,
    /// The done set, with the files found cached added.
    seen: HashSet<u64>,
    /// The listing was covered to its end.
    exhausted: bool,
}

impl Pass {
    fn is_locked(&self) -> bool {
        *self.locked.borrow()
    }

    /// Reads the directory and the headers of the files to prefetch (blocking: a thread of the
    /// runtime's blocking pool).
    fn scan(mut self, mut seen: HashSet<u64>) -> Scanned {
        let nothing = |seen, exhausted| Scanned {
            todo: None,
            seen,
            exhausted,
        };
        // The rules only: a denied identity gets nothing done for it. Its guards count the
        // unwraps below, not an open.
        if self.is_locked() || !self.access.permits(&mut self.asker) {
            return nothing(seen, false);
        }
        let who = &self.asker.who;
        let Ok(dir_st) = sys::fstatat(self.dir.fd(), OsStr::new("")) else {
            return nothing(seen, false);
        };
        if !permitted(who, &dir_st, 0o1) {
            return nothing(seen, true);
        }
        let mut files = match self.list(&seen) {
            Ok(f) => f,
            Err(e) => {
                log::debug!("prefetch: directory inode {}: cannot list it: {e}", self.dir.ino);
                return nothing(seen, false);
            }
        };
        files.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        // After the file just opened, wrapping round: "ahead" of a reader in name order.
        if let Some(after) = self.after
            && let Some(i) = files.iter().position(|f| f.2 == after)
        {
            files.rotate_left(i + 1);
            // Its own open is asking the KMS for its key already.
            files.pop();
        }
        let mut wanted = Vec::new();
        let mut exhausted = true;
        for (_, backing, ino) in files {
            if wanted.len() >= self.limit {
                exhausted = false;
                break;
            }
            let Some(h) = self.header_if_readable(&backing) else {
                continue;
            };
            if self.keys.contains(&h.file_id) {
                seen.insert(ino);
            } else {
                wanted.push((ino, h));
            }
        }
        if wanted.is_empty() {
            return nothing(seen, exhausted);
        }
        Scanned {
            todo: Some((self, wanted)),
            seen,
            exhausted,
        }
    }

    /// The directory's regular files not in `seen`: (name, backing name, backing inode).
    fn list(&self, seen: &HashSet<u64>) -> std::io::Result<Vec<(OsString, OsString, u64)>> {
        use std::os::unix::fs::DirEntryExt;
        let path = sys::proc_fd_path(self.dir.fd());
        let is_root = self.dir.ino == ROOT_INO;
        let mut files = Vec::new();
        for e in std::fs::read_dir(std::path::Path::new(OsStr::from_bytes(path.as_bytes())))? {
            let e = e?;
            if seen.contains(&e.ino()) || !e.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            let backing = e.file_name();
            // Hidden entries (ours, temporary) and names that do not decrypt are not files to
            // prefetch.
            if let Some(Ok(name)) =
                self.names
                    .from_backing(self.dir.fd(), self.dir_id.as_ref(), is_root, &backing)
            {
                files.push((name, backing, e.ino()));
            }
        }
        Ok(files)
    }

    /// The header of a regular file in the directory that the caller may read, if readable.
    fn header_if_readable(&self, backing: &OsStr) -> Option<Header> {
        // O_PATH first: a planted FIFO or device is never opened, a symlink never followed.
        let fd = sys::openat(self.dir.fd(), backing, libc::O_PATH | libc::O_NOFOLLOW, 0).ok()?;
        let st = sys::fstatat(std::os::fd::AsFd::as_fd(&fd), OsStr::new("")).ok()?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG || !permitted(&self.asker.who, &st, 0o4) {
            return None;
        }
        let file = File::from(sys::reopen(std::os::fd::AsFd::as_fd(&fd), libc::O_RDONLY).ok()?);
        let mut hdr = vec![0u8; HEADER_LEN as usize];
        let n = crate::durable::read_up_to(&file, &mut hdr).ok()?;
        header::decode(&hdr[..n]).ok()
    }

    /// Unwraps every wanted key at once (the batcher makes batches of them) and caches them;
    /// returns how many it placed.
    async fn unwrap_all(self, wanted: Vec<Wanted>, seen: &mut HashSet<u64>) -> usize {
        let pass = Arc::new(self);
        let mut set = tokio::task::JoinSet::new();
        for (ino, h) in wanted {
            let pass = pass.clone();
            set.spawn(async move {
                let placed = pass.unwrap_one(&h).await;
                (ino, placed)
            });
        }
        let mut placed = 0;
        let mut reported = HashSet::new();
        while let Some(done) = set.join_next().await {
            match done {
                Ok((ino, Ok(()))) => {
                    seen.insert(ino);
                    placed += 1;
                }
                Ok((_, Err(e))) => {
                    // One report per kind of failure per pass, not one per file.
                    if reported.insert(e.kind()) {
                        pass.report(&e);
                    }
                    if matches!(e, KmsError::Denied(_)) {
                        set.abort_all();
                    }
                }
                Err(_) => {}
            }
        }
        if placed > 0 {
            pass.events.ok();
        }
        placed
    }

    /// Unwraps one key, audits it in the caller's name, counts it for the caller's guard and
    /// caches it.
    async fn unwrap_one(&self, h: &Header) -> Result<(), KmsError> {
        if self.is_locked() {
            return Err(KmsError::Unreachable("the volume is locked".into()));
        }
        let wrapped = WrappedDek {
            key_ref: h.slot.key_ref.clone(),
            blob: h.slot.wrapped.clone(),
        };
        let binding = Binding::file(self.volume_id, h.file_id);
        self.stats.kms_calls.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let mut locked = self.locked.clone();
        let result = tokio::select! {
            r = self.kms.unwrap(&wrapped, &binding) => r,
            _ = locked.wait_for(|l| *l) => return Err(KmsError::Unreachable("the volume is locked".into())),
        };
        audit_unwrap(
            &self.asker,
            h,
            &wrapped,
            self.kms.version_of(&wrapped),
            &result,
            started,
        );
        let dek = result?;
        if let Some(why) = self.access.unwrapped(&self.asker) {
            self.events.lock(&why);
        }
        let cipher = Arc::new(ContentCipher::new(&dek, h.file_id));
        drop(dek);
        self.stats.prefetched.fetch_add(1, Ordering::Relaxed);
        if let Some(old) = self.keys.insert_prefetched(h.file_id, cipher) {
            crate::audit::event(
                "cache_evicted",
                serde_json::json!({"file_id": old.to_string(), "reason": "lru"}),
            );
        }
        Ok(())
    }

    /// What the KMS said, as an open's unwrap reports it: a refusal locks the mount.
    fn report(&self, e: &KmsError) {
        log::warn!("prefetch in directory inode {}: {e}", self.dir.ino);
        match e {
            KmsError::Denied(m) => self.events.denied(m),
            KmsError::Unreachable(m) if !self.is_locked() => self.events.unreachable(m),
            _ => {}
        }
    }
}

/// The `unwrap` audit event of a prefetched key: as an open's, in the name of the caller that
/// set the prefetch off, marked `"prefetch": true`.
fn audit_unwrap(
    asker: &Asker,
    h: &Header,
    wrapped: &WrappedDek,
    version: Option<u32>,
    result: &Result<crate::crypto::SecretKey, KmsError>,
    started: Instant,
) {
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let outcome = match result {
        Ok(_) => "ok",
        Err(KmsError::Denied(_)) => "denied",
        Err(KmsError::Unreachable(_)) => "unreachable",
        Err(_) => "failed",
    };
    let mut fields = asker.fields();
    fields.extend(
        serde_json::json!({"file_id": h.file_id.to_string(), "key": wrapped.key_ref, "version": version,
                           "outcome": outcome, "latency_ms": (ms * 1000.0).round() / 1000.0,
                           "prefetch": true})
        .as_object()
        .cloned()
        .unwrap_or_default(),
    );
    crate::audit::event("unwrap", serde_json::Value::Object(fields));
}

/// Whether `who` has the permission `bits` (4 read, 1 search) on an object with these
/// attributes, as the kernel decides it with `default_permissions`: the owner's bits for its
/// owner, the group's for a member (primary or supplementary group), else the others'; root
/// may read anything, and search a directory.
fn permitted(who: &Identity, st: &libc::stat, bits: u32) -> bool {
    if who.uid == 0 {
        return true;
    }
    let mode = st.st_mode;
    let granted = if st.st_uid == who.uid {
        mode >> 6
    } else if who.in_group(st.st_gid) {
        mode >> 3
    } else {
        mode
    };
    granted & bits == bits
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attributes with this mode and owner (the rest from `/`: `libc::stat` has padding
    /// fields that safe code cannot name).
    fn stat(mode: u32, uid: u32, gid: u32) -> libc::stat {
        let root = std::fs::File::open("/").expect("/");
        let mut st = sys::fstatat(std::os::fd::AsFd::as_fd(&root), OsStr::new("")).expect("stat /");
        st.st_mode = libc::S_IFREG | mode;
        st.st_uid = uid;
        st.st_gid = gid;
        st
    }

    #[test]
    fn read_permission_as_the_kernel_checks_it() {
        // A pid that is not ours: no supplementary groups are read for it.
        let who = |uid, gid| Identity::new(uid, gid, u32::MAX, None);
        assert!(permitted(&who(0, 0), &stat(0o000, 5, 5), 0o4), "root reads all");
        assert!(
            !permitted(&who(1, 1), &stat(0o600, 0, 0), 0o4),
            "root's private file"
        );
        assert!(permitted(&who(1, 1), &stat(0o600, 1, 0), 0o4), "the owner's");
        assert!(
            !permitted(&who(1, 1), &stat(0o066, 1, 1), 0o4),
            "the owner gets the owner's bits only"
        );
        assert!(permitted(&who(1, 7), &stat(0o640, 0, 7), 0o4), "the group's");
        assert!(
            !permitted(&who(1, 7), &stat(0o604, 0, 7), 0o4),
            "a member gets the group's bits only"
        );
        assert!(permitted(&who(1, 1), &stat(0o604, 0, 7), 0o4), "the others'");
        assert!(!permitted(&who(1, 1), &stat(0o644, 0, 7), 0o1), "no search bit");
    }
}
