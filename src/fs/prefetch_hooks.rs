//! Where the filesystem starts prefetch passes (`prefetch`): a listing from its start, and
//! opens that go through a directory. Apart from `prefetch` so that the core names only the
//! prefetch state, and the passes know nothing of the core.

use super::inode::{Kind, ROOT_INO};
use super::names::Names;
use super::prefetch::{Pass, Running, SEQUENTIAL_WITHIN};
use super::{Caller, Fs};
use crate::policy::Asker;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Instant;

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
