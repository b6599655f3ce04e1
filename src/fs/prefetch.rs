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
//! An open that misses the cache while a pass is asking for its key waits for the pass's answer
//! ([`crate::keycache::Fetch`]) rather than asking again, and a pass skips a key an open is
//! already asking for: each key is asked for once.
//!
//! Nothing here runs on a FUSE worker: a trigger updates a little state and spawns the pass;
//! the headers are read on a blocking thread of the runtime and the unwraps are futures on it.
//!
//! Which files: in name order, starting after the file just opened (or at the first, for a
//! listing), the first ones whose keys are not cached. A pass starts when the directory is
//! listed, when two opens in a row in one directory miss the cache (a reader going through
//! it), and, to keep ahead of that reader, when its opens have used half of what the last pass
//! placed.

use super::inode::{Inode, ROOT_INO};
use super::names::Names;
use super::stats::{KmsEvents, Stats};
use crate::format::VolumeId;
use crate::format::block::ContentCipher;
use crate::format::header::{self, HEADER_LEN, Header};
use crate::format::name::DirId;
use crate::keycache::{Fetch, KeyCache};
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
pub(super) const SEQUENTIAL_WITHIN: Duration = Duration::from_secs(5);
/// Passes running at once over the whole mount.
const MAX_RUNNING: usize = 4;
/// Directories whose state is kept; past this, the idle ones are forgotten.
const MAX_DIRS: usize = 1024;
/// Files remembered as done per directory; past this, the set starts afresh.
const MAX_SEEN: usize = 1 << 20;

/// What prefetch knows of one directory.
#[derive(Default)]
pub(super) struct DirState {
    pub(super) running: bool,
    /// When an open in it last missed the cache.
    pub(super) last_miss: Option<Instant>,
    /// Keys the last pass placed, and opens in the directory since it started: the next pass
    /// starts when half of them are used.
    pub(super) placed: usize,
    pub(super) opens: usize,
    /// The last pass reached the end of the listing: no pass to keep ahead until a miss.
    pub(super) exhausted: bool,
    /// Backing inode numbers whose keys passes found cached or placed: skipped without reading
    /// their headers. Taken by a running pass and given back when it ends.
    pub(super) seen: HashSet<u64>,
}

/// Prefetch settings and state, shared by the filesystem and its running passes.
pub(super) struct Prefetch {
    /// Keys per pass (`--prefetch`); 0: off.
    pub(super) limit: usize,
    /// Per-directory state by inode number, and how many passes run. Taken briefly by opens
    /// and listings (on FUSE workers) and by a pass as it starts and ends; never held across
    /// I/O or a KMS call.
    pub(super) state: Mutex<(HashMap<u64, DirState>, usize)>,
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
    pub(super) fn start(&self, dir: u64, decide: impl FnOnce(&mut DirState) -> bool) -> Option<HashSet<u64>> {
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
pub(super) struct Running {
    pub(super) prefetch: Arc<Prefetch>,
    pub(super) dir: u64,
    pub(super) seen: HashSet<u64>,
    pub(super) placed: usize,
    pub(super) exhausted: bool,
}

impl Drop for Running {
    fn drop(&mut self) {
        let seen = std::mem::take(&mut self.seen);
        self.prefetch.end(self.dir, seen, self.placed, self.exhausted);
    }
}

/// One pass: what it needs of the filesystem, cloned out of it so that it runs on its own.
pub(super) struct Pass {
    pub(super) dir: Arc<Inode>,
    pub(super) dir_id: Option<DirId>,
    pub(super) names: Arc<Names>,
    /// Start after this file (backing inode number) in name order; `None`: at the first.
    pub(super) after: Option<u64>,
    pub(super) limit: usize,
    /// Who set the pass off: what it may read, and whose name its unwraps are made in.
    pub(super) asker: Asker,
    pub(super) kms: Arc<dyn KeyProvider>,
    pub(super) volume_id: VolumeId,
    pub(super) keys: Arc<KeyCache>,
    pub(super) stats: Arc<Stats>,
    pub(super) events: Arc<dyn KmsEvents>,
    pub(super) access: Arc<Access>,
    /// True once the volume is locked: the pass stops.
    pub(super) locked: tokio::sync::watch::Receiver<bool>,
}

/// A file whose key a pass unwraps: its backing inode number and header.
type Wanted = (u64, Header);

/// What a pass found in its directory.
pub(super) struct Scanned {
    /// The pass and the files whose keys it unwraps; `None`: nothing to do.
    pub(super) todo: Option<(Pass, Vec<Wanted>)>,
    /// The done set, with the files found cached added.
    pub(super) seen: HashSet<u64>,
    /// The listing was covered to its end.
    pub(super) exhausted: bool,
}

impl Pass {
    fn is_locked(&self) -> bool {
        *self.locked.borrow()
    }

    /// Reads the directory and the headers of the files to prefetch (blocking: a thread of the
    /// runtime's blocking pool).
    pub(super) fn scan(mut self, mut seen: HashSet<u64>) -> Scanned {
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
    pub(super) async fn unwrap_all(self, wanted: Vec<Wanted>, seen: &mut HashSet<u64>) -> usize {
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
                Ok((ino, Ok(fetched))) => {
                    seen.insert(ino);
                    placed += usize::from(fetched);
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
    /// caches it; false if an open was already asking for it (or has cached it meanwhile).
    async fn unwrap_one(&self, h: &Header) -> Result<bool, KmsError> {
        if self.is_locked() {
            return Err(KmsError::Unreachable("the volume is locked".into()));
        }
        let Fetch::Mine(_claim) = self.keys.claim(h.file_id) else {
            return Ok(false);
        };
        if self.keys.contains(&h.file_id) {
            return Ok(false);
        }
        let wrapped = WrappedDek {
            key_ref: h.slot.key_ref.clone(),
            blob: h.slot.wrapped.clone(),
        };
        let binding = Binding::file(self.volume_id, h.file_id);
        self.stats.kms_calls.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let unanswered = self.stats.kms_unanswered.start();
        let mut locked = self.locked.clone();
        let result = tokio::select! {
            r = self.kms.unwrap(&wrapped, &binding) => r,
            _ = locked.wait_for(|l| *l) => return Err(KmsError::Unreachable("the volume is locked".into())),
        };
        drop(unanswered);
        self.stats.kms_call_ended(started.elapsed(), &result);
        audit_unwrap(
            &self.asker,
            h,
            &wrapped,
            self.kms.version_of(&wrapped),
            &result,
            started,
            true,
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
        Ok(true)
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

/// The `unwrap` audit event, in the name of the caller whose open needed the key or whose
/// listing or opens set a prefetch off (then marked `"prefetch": true`).
pub(super) fn audit_unwrap(
    asker: &Asker,
    h: &Header,
    wrapped: &WrappedDek,
    version: Option<u32>,
    result: &Result<crate::crypto::SecretKey, KmsError>,
    started: Instant,
    prefetch: bool,
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
                           "outcome": outcome, "latency_ms": (ms * 1000.0).round() / 1000.0})
        .as_object()
        .cloned()
        .unwrap_or_default(),
    );
    if prefetch {
        fields.insert("prefetch".into(), serde_json::json!(true));
    }
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
