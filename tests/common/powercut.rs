//! Power-cut simulator: an in-memory FUSE filesystem, served from the test process, that
//! holds back every change until the sync that makes it durable and drops the rest at a
//! simulated power cut.
//!
//! LazyFS (dsrhaslab/lazyfs) does the data half of this: it keeps written pages in its own
//! cache above a passthrough to a real directory, writes them down on fsync, and a
//! `clear-cache` fault drops the dirty ones. Its namespace operations go straight to the
//! directory below, so a lost create, rename or unlink cannot be simulated. Here nothing goes
//! anywhere: every inode has a *current* state (what the kernel sees) and a *durable* state
//! (what survives a cut), plus the ordered log of the changes made to it since it was last
//! synced.
//!
//! - FUSE `fsync` (fsync and fdatasync, and O_SYNC/O_DSYNC writes) makes one inode's content
//!   and metadata durable: data, size, mode, owner, times, xattrs, symlink target. Not its
//!   names.
//! - FUSE `fsyncdir` makes one directory's entry set (and its metadata) durable. A new
//!   directory whose name is durable but that was never fsynced itself has no durable
//!   entries; a new file whose name is durable but that was never fsynced is empty.
//! - Nothing else makes anything durable: not flush, release, close, or sync(2)/syncfs(2)
//!   (the kernel sends FUSE_SYNCFS only to virtiofs, and fuser 0.18 has no method for it).
//!   [`PowerCut::sync_all`] stands in for a syncfs.
//! - A change to a directory is logged in that directory: create/mkdir/mknod/symlink/link
//!   log "set name → inode", unlink/rmdir log "remove name". A rename within one directory
//!   is one atomic change; a rename between two directories is two changes, one in each,
//!   that may survive independently (the name in both, one or neither), which POSIX allows.
//!
//! A cut rebuilds the state from the durable one: every inode takes its durable state (with
//! [`Cut::Random`], plus a random prefix of its pending log, modelling writeback that happened
//! before the power went), then only what is reachable from the root through those entries
//! survives. A directory reached through a second name (a half-durable directory move) keeps
//! its first name only, so the result is always a tree. The mount is then replaced by a fresh
//! one, so the kernel forgets every cached dentry, attribute and page; descriptors still open
//! on the old mount get EIO.
//!
//! Use (tests run as root; the mount has `default_permissions` and `allow_other`):
//!
//! ```text
//! let mut pc = PowerCut::mount(&dir);       // an empty layer at an existing directory
//! /* set up under pc.path(), e.g. `kmsfs init` of a backing directory inside it */
//! pc.sync_all();                            // the setup is durable (what a syncfs would do)
//! pc.reset_syncs();
//! /* run the program under test; kill it (SIGKILL is the power going) */
//! pc.syncs("/vol/some/file").fsync;         // sync counters by path, pc.sync_events() in order
//! eprintln!("{}", pc.dump());               // current and durable trees, pending changes
//! pc.cut(Cut::DropAll);                     // or Cut::Random(seed); pc.path() is a fresh mount
//! assert_eq!(pc.tree(View::Current), expected);
//! ```
//!
//! A process still holding descriptors on the layer at the cut (a live daemon) makes the
//! unmount lazy: its descriptors get EIO from then on, like those of a dead machine.
#![allow(dead_code)]

use super::Rng;
use fuser::{
    AccessFlags, BackgroundSession, BsdFileFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, SessionACL, TimeOrNow, WriteFlags,
};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

/// Nothing is cached by the kernel beyond one request: the state only changes through the
/// kernel, but a zero TTL keeps st_blocks, nlink and ctime honest for free.
const TTL: Duration = Duration::ZERO;
const ROOT: u64 = 1;
const NAME_MAX: usize = 255;

/// How much of what was not synced survives a cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// Every unsynced change is lost.
    DropAll,
    /// For each inode, a random prefix (seeded) of its unsynced changes survives, in order:
    /// some writeback happened before the power went.
    Random(u64),
}

/// Which state [`PowerCut::tree`] lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    /// What the kernel sees now.
    Current,
    /// What a `cut(Cut::DropAll)` would leave.
    Durable,
}

/// One name in a tree listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub ino: u64,
    /// 'f' file, 'd' directory, 'l' symlink, 's' other (fifo, socket, device).
    pub kind: char,
    /// Permission bits (07777).
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    /// File content, or the symlink target.
    pub data: Vec<u8>,
    pub xattrs: BTreeMap<OsString, Vec<u8>>,
}

/// How often an inode was synced, by the path it had when it was.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncCounts {
    pub fsync: u64,
    pub fdatasync: u64,
    pub fsyncdir: u64,
}

/// One sync request, in the order they came.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncEvent {
    /// "fsync", "fdatasync" or "fsyncdir".
    pub kind: &'static str,
    /// Path inside the mount ("/" is the root; "<unlinked N>" for an inode with no name).
    pub path: String,
}

#[derive(Clone, Debug)]
enum Body {
    File(Vec<u8>),
    Dir(BTreeMap<OsString, u64>),
    Symlink(OsString),
    Special { kind: FileType, rdev: u32 },
}

#[derive(Clone, Debug)]
struct Node {
    body: Body,
    perm: u16,
    uid: u32,
    gid: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
    xattrs: BTreeMap<OsString, Vec<u8>>,
}

impl Node {
    fn is_dir(&self) -> bool {
        matches!(self.body, Body::Dir(_))
    }

    fn kind(&self) -> FileType {
        match &self.body {
            Body::File(_) => FileType::RegularFile,
            Body::Dir(_) => FileType::Directory,
            Body::Symlink(_) => FileType::Symlink,
            Body::Special { kind, .. } => *kind,
        }
    }

    fn size(&self) -> u64 {
        match &self.body {
            Body::File(d) => d.len() as u64,
            Body::Dir(e) => e.len() as u64,
            Body::Symlink(t) => t.len() as u64,
            Body::Special { .. } => 0,
        }
    }

    /// A regular file's data; EISDIR or EINVAL for anything else.
    fn content(&self) -> Result<&Vec<u8>, Errno> {
        match &self.body {
            Body::File(d) => Ok(d),
            Body::Dir(_) => Err(err(libc::EISDIR)),
            _ => Err(err(libc::EINVAL)),
        }
    }

    fn entries(&self) -> Result<&BTreeMap<OsString, u64>, Errno> {
        match &self.body {
            Body::Dir(e) => Ok(e),
            _ => Err(err(libc::ENOTDIR)),
        }
    }
}

/// One unsynced change of one inode.
#[derive(Clone, Debug)]
enum Op {
    Write {
        off: u64,
        data: Vec<u8>,
    },
    Truncate(u64),
    /// Zeroes a range inside the file (punch hole, zero range).
    Zero {
        off: u64,
        len: u64,
    },
    /// Directory: the name now refers to this inode (create, link, replace).
    Set(OsString, u64),
    Remove(OsString),
    /// Same-directory rename: atomic.
    Rename(OsString, OsString),
    /// Same-directory RENAME_EXCHANGE: atomic.
    Exchange(OsString, OsString),
    Perm(u16),
    Owner(u32, u32),
    /// Only the times change (they are in every logged change anyway).
    Touch,
    SetXattr(OsString, Vec<u8>),
    RemoveXattr(OsString),
}

#[derive(Clone, Debug)]
struct Pending {
    op: Op,
    /// atime, mtime, ctime after the change.
    times: [SystemTime; 3],
}

fn apply(node: &mut Node, p: &Pending) {
    match (&p.op, &mut node.body) {
        (Op::Write { off, data }, Body::File(d)) => {
            let (off, end) = (*off as usize, *off as usize + data.len());
            if d.len() < end {
                d.resize(end, 0);
            }
            d[off..end].copy_from_slice(data);
        }
        (Op::Truncate(size), Body::File(d)) => d.resize(*size as usize, 0),
        (Op::Zero { off, len }, Body::File(d)) => {
            let end = (off + len).min(d.len() as u64) as usize;
            let off = (*off as usize).min(end);
            d[off..end].fill(0);
        }
        (Op::Set(name, ino), Body::Dir(e)) => {
            e.insert(name.clone(), *ino);
        }
        (Op::Remove(name), Body::Dir(e)) => {
            e.remove(name);
        }
        (Op::Rename(from, to), Body::Dir(e)) => {
            if let Some(ino) = e.remove(from) {
                e.insert(to.clone(), ino);
            }
        }
        (Op::Exchange(a, b), Body::Dir(e)) => {
            if let (Some(x), Some(y)) = (e.get(a).copied(), e.get(b).copied()) {
                e.insert(a.clone(), y);
                e.insert(b.clone(), x);
            }
        }
        (Op::Perm(m), _) => node.perm = *m,
        (Op::Owner(u, g), _) => {
            node.uid = *u;
            node.gid = *g;
        }
        (Op::Touch, _) => {}
        (Op::SetXattr(n, v), _) => {
            node.xattrs.insert(n.clone(), v.clone());
        }
        (Op::RemoveXattr(n), _) => {
            node.xattrs.remove(n);
        }
        (op, _) => panic!("powercut: {op:?} logged on a {:?}", node.kind()),
    }
    [node.atime, node.mtime, node.ctime] = p.times;
}

struct Inode {
    cur: Node,
    dur: Node,
    pending: Vec<Pending>,
    /// Current names of a non-directory (directories count their subdirectories instead).
    links: u32,
}

struct State {
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    /// Bumped at every cut and lazy unmount: requests from an older mount get EIO.
    epoch: u64,
    next_fh: u64,
    dir_handles: HashMap<u64, Vec<(u64, FileType, OsString)>>,
    syncs: BTreeMap<String, SyncCounts>,
    events: Vec<SyncEvent>,
    /// Testing the tests: when set, fsyncdir does nothing (see tests/powercut.rs).
    break_fsyncdir: bool,
}

fn err(code: i32) -> Errno {
    Errno::from_i32(code)
}

fn new_node(body: Body, perm: u16, uid: u32, gid: u32) -> Node {
    let now = SystemTime::now();
    Node {
        body,
        perm,
        uid,
        gid,
        atime: now,
        mtime: now,
        ctime: now,
        xattrs: BTreeMap::new(),
    }
}

fn check_name(name: &OsStr) -> Result<(), Errno> {
    if name.len() > NAME_MAX {
        return Err(err(libc::ENAMETOOLONG));
    }
    Ok(())
}

impl State {
    fn new() -> State {
        let root = new_node(Body::Dir(BTreeMap::new()), 0o755, 0, 0);
        let mut inodes = HashMap::new();
        inodes.insert(
            ROOT,
            Inode {
                cur: root.clone(),
                dur: root,
                pending: Vec::new(),
                links: 0,
            },
        );
        State {
            inodes,
            next_ino: ROOT + 1,
            epoch: 0,
            next_fh: 1,
            dir_handles: HashMap::new(),
            syncs: BTreeMap::new(),
            events: Vec::new(),
            break_fsyncdir: false,
        }
    }

    fn node(&self, ino: u64) -> Result<&Node, Errno> {
        self.inodes.get(&ino).map(|i| &i.cur).ok_or(err(libc::ENOENT))
    }

    fn child(&self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        self.node(parent)?
            .entries()?
            .get(name)
            .copied()
            .ok_or(err(libc::ENOENT))
    }

    fn attr(&self, ino: u64) -> FileAttr {
        let i = &self.inodes[&ino];
        let n = &i.cur;
        let nlink = match &n.body {
            Body::Dir(e) => 2 + e.values().filter(|c| self.inodes[c].cur.is_dir()).count() as u32,
            _ => i.links,
        };
        let size = n.size();
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(4096) * 8,
            atime: n.atime,
            mtime: n.mtime,
            ctime: n.ctime,
            crtime: n.ctime,
            kind: n.kind(),
            perm: n.perm,
            nlink,
            uid: n.uid,
            gid: n.gid,
            rdev: match n.body {
                Body::Special { rdev, .. } => rdev,
                _ => 0,
            },
            blksize: 4096,
            flags: 0,
        }
    }

    /// Applies a change to the current state and logs it as pending.
    fn record(&mut self, ino: u64, op: Op, touch_mtime: bool) {
        let now = SystemTime::now();
        let i = self.inodes.get_mut(&ino).expect("inode");
        i.cur.ctime = now;
        if touch_mtime {
            i.cur.mtime = now;
        }
        let p = Pending {
            op,
            times: [i.cur.atime, i.cur.mtime, i.cur.ctime],
        };
        apply(&mut i.cur, &p);
        i.pending.push(p);
    }

    fn sync(&mut self, ino: u64) {
        let i = self.inodes.get_mut(&ino).expect("inode");
        i.dur = i.cur.clone();
        i.pending.clear();
    }

    fn set_links(&mut self, ino: u64, delta: i32) {
        let i = self.inodes.get_mut(&ino).expect("inode");
        if !i.cur.is_dir() {
            i.links = i.links.saturating_add_signed(delta);
            i.cur.ctime = SystemTime::now();
        }
    }

    /// A new inode under `parent`; its durable state is the one it is created with.
    fn create_child(
        &mut self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        body: Body,
        perm: u16,
    ) -> Result<u64, Errno> {
        check_name(name)?;
        let p = self.node(parent)?;
        if p.entries()?.contains_key(name) {
            return Err(err(libc::EEXIST));
        }
        let (mut gid, mut perm) = (req.gid(), perm & 0o7777);
        if p.perm & libc::S_ISGID as u16 != 0 {
            gid = p.gid;
            if matches!(body, Body::Dir(_)) {
                perm |= libc::S_ISGID as u16;
            }
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let node = new_node(body, perm, req.uid(), gid);
        let links = u32::from(!node.is_dir());
        self.inodes.insert(
            ino,
            Inode {
                cur: node.clone(),
                dur: node,
                pending: Vec::new(),
                links,
            },
        );
        self.record(parent, Op::Set(name.to_owned(), ino), true);
        Ok(ino)
    }

    fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        check_name(newname)?;
        let src = self.child(parent, name)?;
        let dst = match self.child(newparent, newname) {
            Ok(d) => Some(d),
            Err(e) if e == err(libc::ENOENT) => None,
            Err(e) => return Err(e),
        };
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            let dst = dst.ok_or(err(libc::ENOENT))?;
            if parent == newparent {
                self.record(parent, Op::Exchange(name.to_owned(), newname.to_owned()), true);
            } else {
                self.record(parent, Op::Set(name.to_owned(), dst), true);
                self.record(newparent, Op::Set(newname.to_owned(), src), true);
            }
            return Ok(());
        }
        if !(flags - RenameFlags::RENAME_NOREPLACE).is_empty() {
            return Err(err(libc::EINVAL));
        }
        if let Some(dst) = dst {
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(err(libc::EEXIST));
            }
            if dst == src {
                return Ok(());
            }
            let (s, d) = (self.node(src)?, self.node(dst)?);
            match (s.is_dir(), d.is_dir()) {
                (true, false) => return Err(err(libc::ENOTDIR)),
                (false, true) => return Err(err(libc::EISDIR)),
                (true, true) if !d.entries()?.is_empty() => return Err(err(libc::ENOTEMPTY)),
                _ => {}
            }
            self.set_links(dst, -1);
        }
        if parent == newparent {
            self.record(parent, Op::Rename(name.to_owned(), newname.to_owned()), true);
        } else {
            self.record(parent, Op::Remove(name.to_owned()), true);
            self.record(newparent, Op::Set(newname.to_owned(), src), true);
        }
        self.inodes.get_mut(&src).expect("inode").cur.ctime = SystemTime::now();
        Ok(())
    }

    /// The current path of an inode (first found from the root), for the sync counters.
    fn path_of(&self, ino: u64) -> String {
        if ino == ROOT {
            return "/".into();
        }
        let mut queue = VecDeque::from([(ROOT, String::new())]);
        let mut seen = HashSet::new();
        while let Some((d, path)) = queue.pop_front() {
            if !seen.insert(d) {
                continue;
            }
            let Ok(entries) = self.inodes[&d].cur.entries() else {
                continue;
            };
            for (name, &c) in entries {
                let p = format!("{path}/{}", name.to_string_lossy());
                if c == ino {
                    return p;
                }
                if self.inodes[&c].cur.is_dir() {
                    queue.push_back((c, p));
                }
            }
        }
        format!("<unlinked {ino}>")
    }

    fn count_sync(&mut self, ino: u64, kind: &'static str) {
        let path = self.path_of(ino);
        let c = self.syncs.entry(path.clone()).or_default();
        match kind {
            "fsync" => c.fsync += 1,
            "fdatasync" => c.fdatasync += 1,
            _ => c.fsyncdir += 1,
        }
        self.events.push(SyncEvent { kind, path });
    }

    /// What survives a cut: each inode's durable state plus (Random) a prefix of its log,
    /// restricted to what the root reaches. Does not change the state.
    fn surviving(&self, mut rng: Option<&mut Rng>) -> HashMap<u64, Node> {
        let mut inos: Vec<u64> = self.inodes.keys().copied().collect();
        inos.sort_unstable();
        let mut post: HashMap<u64, Node> = HashMap::new();
        for ino in inos {
            let i = &self.inodes[&ino];
            let keep = match rng.as_deref_mut() {
                Some(r) => r.below(i.pending.len() as u64 + 1) as usize,
                None => 0,
            };
            let mut n = i.dur.clone();
            for p in &i.pending[..keep] {
                apply(&mut n, p);
            }
            post.insert(ino, n);
        }
        let mut out = HashMap::new();
        let mut queue = VecDeque::from([ROOT]);
        let mut reached = HashSet::from([ROOT]);
        while let Some(d) = queue.pop_front() {
            let mut node = post.remove(&d).expect("directory reached once");
            let Body::Dir(entries) = &mut node.body else {
                unreachable!()
            };
            entries.retain(|_, c| {
                let Some(child) = post.get(c).or_else(|| out.get(c)) else {
                    // Only a directory already taken out of `post` is missing.
                    return false;
                };
                if child.is_dir() {
                    // A directory keeps its first name: a second one (a half-durable move)
                    // or a cycle is dropped.
                    if !reached.insert(*c) {
                        return false;
                    }
                    queue.push_back(*c);
                } else {
                    reached.insert(*c);
                }
                true
            });
            out.insert(d, node);
        }
        for ino in reached {
            if let Some(n) = post.remove(&ino) {
                out.insert(ino, n);
            }
        }
        out
    }

    fn cut(&mut self, mode: Cut) {
        let mut rng = match mode {
            Cut::DropAll => None,
            Cut::Random(seed) => Some(Rng(seed)),
        };
        let nodes = self.surviving(rng.as_mut());
        let mut links: HashMap<u64, u32> = HashMap::new();
        for n in nodes.values() {
            if let Body::Dir(e) = &n.body {
                for c in e.values() {
                    *links.entry(*c).or_default() += 1;
                }
            }
        }
        self.inodes = nodes
            .into_iter()
            .map(|(ino, n)| {
                let links = if n.is_dir() { 0 } else { links[&ino] };
                (
                    ino,
                    Inode {
                        cur: n.clone(),
                        dur: n,
                        pending: Vec::new(),
                        links,
                    },
                )
            })
            .collect();
        self.dir_handles.clear();
        self.epoch += 1;
    }

    fn sync_all(&mut self) {
        let inos: Vec<u64> = self.inodes.keys().copied().collect();
        for ino in inos {
            self.sync(ino);
        }
    }
}

fn tree_of(nodes: &HashMap<u64, Node>) -> BTreeMap<String, Item> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(ROOT, "/".to_string())];
    let mut seen = HashSet::new();
    while let Some((ino, path)) = stack.pop() {
        let Some(n) = nodes.get(&ino) else { continue };
        let (kind, data) = match &n.body {
            Body::File(d) => ('f', d.clone()),
            Body::Dir(_) => ('d', Vec::new()),
            Body::Symlink(t) => ('l', t.as_bytes().to_vec()),
            Body::Special { .. } => ('s', Vec::new()),
        };
        if let Body::Dir(e) = &n.body
            && seen.insert(ino)
        {
            for (name, c) in e {
                let base = if path == "/" { "" } else { &path };
                stack.push((*c, format!("{base}/{}", name.to_string_lossy())));
            }
        }
        out.insert(
            path,
            Item {
                ino,
                kind,
                mode: n.perm,
                uid: n.uid,
                gid: n.gid,
                data,
                xattrs: n.xattrs.clone(),
            },
        );
    }
    out
}

/// The filesystem one mount serves; all mounts of one [`PowerCut`] share the state.
struct PcFs {
    state: Arc<Mutex<State>>,
    epoch: u64,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl PcFs {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> Result<T, Errno>) -> Result<T, Errno> {
        let mut st = lock(&self.state);
        if st.epoch != self.epoch {
            // A descriptor from before the cut: the machine it belonged to is gone.
            return Err(err(libc::EIO));
        }
        f(&mut st)
    }

    fn entry(&self, reply: ReplyEntry, f: impl FnOnce(&mut State) -> Result<u64, Errno>) {
        match self.with(|st| f(st).map(|ino| st.attr(ino))) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn data(&self, reply: ReplyData, f: impl FnOnce(&mut State) -> Result<Vec<u8>, Errno>) {
        match self.with(f) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn empty(&self, reply: ReplyEmpty, f: impl FnOnce(&mut State) -> Result<(), Errno>) {
        match self.with(f) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

fn xattr_reply(reply: ReplyXattr, size: u32, data: Result<Vec<u8>, Errno>) {
    match data {
        Err(e) => reply.error(e),
        Ok(d) if size == 0 => reply.size(d.len() as u32),
        Ok(d) if d.len() > size as usize => reply.error(err(libc::ERANGE)),
        Ok(d) => reply.data(&d),
    }
}

impl Filesystem for PcFs {
    fn init(&mut self, _req: &Request, _config: &mut KernelConfig) -> std::io::Result<()> {
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.entry(reply, |st| st.child(parent.0, name));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.with(|st| st.node(ino.0).map(|_| st.attr(ino.0))) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let ino = ino.0;
        let r = self.with(|st| {
            let n = st.node(ino)?;
            if size.is_some() {
                n.content()?;
            }
            let (ouid, ogid) = (n.uid, n.gid);
            if let Some(m) = mode {
                st.record(ino, Op::Perm((m & 0o7777) as u16), false);
            }
            if uid.is_some() || gid.is_some() {
                st.record(ino, Op::Owner(uid.unwrap_or(ouid), gid.unwrap_or(ogid)), false);
            }
            if let Some(s) = size {
                st.record(ino, Op::Truncate(s), true);
            }
            if atime.is_some() || mtime.is_some() {
                let now = SystemTime::now();
                let t = |x: TimeOrNow| match x {
                    TimeOrNow::SpecificTime(t) => t,
                    TimeOrNow::Now => now,
                };
                let n = &mut st.inodes.get_mut(&ino).expect("inode").cur;
                if let Some(a) = atime {
                    n.atime = t(a);
                }
                if let Some(m) = mtime {
                    n.mtime = t(m);
                }
                st.record(ino, Op::Touch, false);
            }
            Ok(st.attr(ino))
        });
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.data(reply, |st| match &st.node(ino.0)?.body {
            Body::Symlink(t) => Ok(t.as_bytes().to_vec()),
            _ => Err(err(libc::EINVAL)),
        });
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
        let body = match mode & libc::S_IFMT {
            0 | libc::S_IFREG => Body::File(Vec::new()),
            libc::S_IFIFO => Body::Special {
                kind: FileType::NamedPipe,
                rdev: 0,
            },
            libc::S_IFSOCK => Body::Special {
                kind: FileType::Socket,
                rdev: 0,
            },
            libc::S_IFCHR => Body::Special {
                kind: FileType::CharDevice,
                rdev,
            },
            libc::S_IFBLK => Body::Special {
                kind: FileType::BlockDevice,
                rdev,
            },
            _ => return reply.error(err(libc::EINVAL)),
        };
        self.entry(reply, |st| {
            st.create_child(req, parent.0, name, body, mode as u16)
        });
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        self.entry(reply, |st| {
            st.create_child(req, parent.0, name, Body::Dir(BTreeMap::new()), mode as u16)
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty(reply, |st| {
            let ino = st.child(parent.0, name)?;
            if st.node(ino)?.is_dir() {
                return Err(err(libc::EISDIR));
            }
            st.record(parent.0, Op::Remove(name.to_owned()), true);
            st.set_links(ino, -1);
            Ok(())
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty(reply, |st| {
            let ino = st.child(parent.0, name)?;
            if !st.node(ino)?.entries()?.is_empty() {
                return Err(err(libc::ENOTEMPTY));
            }
            st.record(parent.0, Op::Remove(name.to_owned()), true);
            Ok(())
        });
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        self.entry(reply, |st| {
            let body = Body::Symlink(target.as_os_str().to_owned());
            st.create_child(req, parent.0, link_name, body, 0o777)
        });
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
        self.empty(reply, |st| st.rename(parent.0, name, newparent.0, newname, flags));
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        self.entry(reply, |st| {
            check_name(newname)?;
            if st.node(ino.0)?.is_dir() {
                return Err(err(libc::EPERM));
            }
            if st.node(newparent.0)?.entries()?.contains_key(newname) {
                return Err(err(libc::EEXIST));
            }
            st.record(newparent.0, Op::Set(newname.to_owned(), ino.0), true);
            st.set_links(ino.0, 1);
            Ok(ino.0)
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.with(|st| match st.node(ino.0)?.body {
            Body::Dir(_) => Err(err(libc::EISDIR)),
            _ => Ok(()),
        }) {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.data(reply, |st| {
            let d = st.node(ino.0)?.content()?;
            let start = (offset as usize).min(d.len());
            let end = (start + size as usize).min(d.len());
            Ok(d[start..end].to_vec())
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.with(|st| {
            st.node(ino.0)?.content()?;
            let op = Op::Write {
                off: offset,
                data: data.to_vec(),
            };
            st.record(ino.0, op, true);
            if flags.0 & libc::O_DSYNC != 0 {
                st.sync(ino.0);
            }
            Ok(())
        }) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
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
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        self.empty(reply, |st| {
            st.node(ino.0)?;
            st.sync(ino.0);
            st.count_sync(ino.0, if datasync { "fdatasync" } else { "fsync" });
            Ok(())
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.with(|st| {
            st.node(ino.0)?.entries()?;
            let fh = st.next_fh;
            st.next_fh += 1;
            st.dir_handles.insert(fh, Vec::new());
            Ok(fh)
        }) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        match self.with(|st| listing(st, ino.0, fh.0, offset)) {
            Ok(list) => {
                for (i, (c, kind, name)) in list.iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(*c), i as u64 + 1, *kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        match self.with(|st| {
            let list = listing(st, ino.0, fh.0, offset)?;
            Ok(list
                .into_iter()
                .enumerate()
                .skip(offset as usize)
                .filter(|(_, (c, _, _))| st.inodes.contains_key(c))
                .map(|(i, (c, _, name))| (i, name, st.attr(c)))
                .collect::<Vec<_>>())
        }) {
            Ok(list) => {
                for (i, name, attr) in list {
                    if reply.add(attr.ino, i as u64 + 1, &name, &TTL, &attr, Generation(0)) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
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
        lock(&self.state).dir_handles.remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.empty(reply, |st| {
            st.node(ino.0)?.entries()?;
            if !st.break_fsyncdir {
                st.sync(ino.0);
            }
            st.count_sync(ino.0, "fsyncdir");
            Ok(())
        });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (used, files) = {
            let st = lock(&self.state);
            let used: u64 = st.inodes.values().map(|i| i.cur.size().div_ceil(4096)).sum();
            (used, st.inodes.len() as u64)
        };
        let (blocks, inodes) = (1u64 << 22, 1u64 << 22);
        let free = blocks.saturating_sub(used);
        reply.statfs(
            blocks,
            free,
            free,
            inodes,
            inodes.saturating_sub(files),
            4096,
            NAME_MAX as u32,
            4096,
        );
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
        self.empty(reply, |st| {
            let exists = st.node(ino.0)?.xattrs.contains_key(name);
            if flags & libc::XATTR_CREATE != 0 && exists {
                return Err(err(libc::EEXIST));
            }
            if flags & libc::XATTR_REPLACE != 0 && !exists {
                return Err(err(libc::ENODATA));
            }
            st.record(ino.0, Op::SetXattr(name.to_owned(), value.to_vec()), false);
            Ok(())
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let data = self.with(|st| {
            st.node(ino.0)?
                .xattrs
                .get(name)
                .cloned()
                .ok_or(err(libc::ENODATA))
        });
        xattr_reply(reply, size, data);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let data = self.with(|st| {
            let mut out = Vec::new();
            for name in st.node(ino.0)?.xattrs.keys() {
                out.extend_from_slice(name.as_bytes());
                out.push(0);
            }
            Ok(out)
        });
        xattr_reply(reply, size, data);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty(reply, |st| {
            if !st.node(ino.0)?.xattrs.contains_key(name) {
                return Err(err(libc::ENODATA));
            }
            st.record(ino.0, Op::RemoveXattr(name.to_owned()), false);
            Ok(())
        });
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        self.empty(reply, |st| st.node(ino.0).map(|_| ()));
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
        match self.with(|st| {
            let ino = match st.child(parent.0, name) {
                Ok(_) if flags & libc::O_EXCL != 0 => return Err(err(libc::EEXIST)),
                Ok(ino) => {
                    if st.node(ino)?.is_dir() {
                        return Err(err(libc::EISDIR));
                    }
                    if flags & libc::O_TRUNC != 0 && st.node(ino)?.size() != 0 {
                        st.record(ino, Op::Truncate(0), true);
                    }
                    ino
                }
                Err(e) if e == err(libc::ENOENT) => {
                    st.create_child(req, parent.0, name, Body::File(Vec::new()), mode as u16)?
                }
                Err(e) => return Err(e),
            };
            Ok(st.attr(ino))
        }) {
            Ok(a) => reply.created(&TTL, &a, Generation(0), FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.empty(reply, |st| {
            let size = st.node(ino.0)?.content()?.len() as u64;
            let end = offset + length;
            let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
            let zero = match mode & !libc::FALLOC_FL_KEEP_SIZE {
                0 => false,
                libc::FALLOC_FL_PUNCH_HOLE if keep => true,
                libc::FALLOC_FL_ZERO_RANGE => true,
                _ => return Err(err(libc::EOPNOTSUPP)),
            };
            if zero {
                let op = Op::Zero {
                    off: offset,
                    len: length,
                };
                st.record(ino.0, op, true);
            }
            if !keep && end > size {
                st.record(ino.0, Op::Truncate(end), true);
            }
            Ok(())
        });
    }
}

/// A directory's listing for one handle: taken at the first read (offset 0) so offsets stay
/// stable while the directory changes.
fn listing(st: &mut State, ino: u64, fh: u64, offset: u64) -> Result<Vec<(u64, FileType, OsString)>, Errno> {
    let entries = st.node(ino)?.entries()?;
    let cached = st.dir_handles.get(&fh).filter(|l| offset != 0 && !l.is_empty());
    if let Some(l) = cached {
        return Ok(l.clone());
    }
    let mut list = vec![
        (ino, FileType::Directory, OsString::from(".")),
        (ino, FileType::Directory, OsString::from("..")),
    ];
    for (name, c) in entries {
        list.push((*c, st.inodes[c].cur.kind(), name.clone()));
    }
    st.dir_handles.insert(fh, list.clone());
    Ok(list)
}

/// A power-cut layer mounted at a directory. Drop unmounts it.
pub struct PowerCut {
    path: PathBuf,
    state: Arc<Mutex<State>>,
    session: Option<BackgroundSession>,
}

impl PowerCut {
    /// Mounts an empty layer (only the root directory, durable) at `dir`, which must exist.
    pub fn mount(dir: impl AsRef<Path>) -> PowerCut {
        let mut pc = PowerCut {
            path: dir.as_ref().to_path_buf(),
            state: Arc::new(Mutex::new(State::new())),
            session: None,
        };
        pc.mount_session();
        pc
    }

    fn mount_session(&mut self) {
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("powercut".into()),
            MountOption::Subtype("powercut".into()),
            MountOption::DefaultPermissions,
        ];
        config.acl = SessionACL::All;
        let epoch = lock(&self.state).epoch;
        let fs = PcFs {
            state: self.state.clone(),
            epoch,
        };
        // Session::new has done the FUSE handshake when it returns: the mount serves.
        let session = fuser::spawn_mount(fs, &self.path, &config)
            .unwrap_or_else(|e| panic!("mount powercut at {}: {e}", self.path.display()));
        self.session = Some(session);
    }

    /// The mountpoint.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unmounts: a plain unmount if nothing holds the mount (retried briefly), else a lazy
    /// one, after which the old mount's requests get EIO.
    fn unmount(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        let c = CString::new(self.path.as_os_str().as_bytes()).expect("path without NUL");
        for _ in 0..10 {
            // SAFETY: a valid NUL-terminated path.
            if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
                let _ = session.join();
                return;
            }
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::EBUSY) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        lock(&self.state).epoch += 1;
        // The session thread lives on until the last descriptor on the old mount closes;
        // dropping the handle detaches it (its own unmount attempt finds nothing to do).
        drop(session);
    }

    /// The power cut: unmounts, keeps what was durable (see [`Cut`]) and mounts the result
    /// again at the same path. Sync counters are kept.
    pub fn cut(&mut self, mode: Cut) {
        self.unmount();
        lock(&self.state).cut(mode);
        self.mount_session();
    }

    /// Makes everything durable, as a syncfs(2) would if FUSE passed it on.
    pub fn sync_all(&self) {
        lock(&self.state).sync_all();
    }

    /// Unsynced changes, over all inodes.
    pub fn pending(&self) -> usize {
        lock(&self.state).inodes.values().map(|i| i.pending.len()).sum()
    }

    /// Every path of the current tree or of what a `cut(DropAll)` would leave.
    pub fn tree(&self, view: View) -> BTreeMap<String, Item> {
        let st = lock(&self.state);
        match view {
            View::Current => {
                let nodes: HashMap<u64, Node> = st.inodes.iter().map(|(k, i)| (*k, i.cur.clone())).collect();
                tree_of(&nodes)
            }
            View::Durable => tree_of(&st.surviving(None)),
        }
    }

    /// Both trees and the pending changes, for debugging a failed test.
    pub fn dump(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        for (title, view) in [("current", View::Current), ("durable", View::Durable)] {
            let _ = writeln!(out, "{title}:");
            for (path, it) in self.tree(view) {
                let shown = String::from_utf8_lossy(&it.data[..it.data.len().min(32)]).into_owned();
                let _ = writeln!(
                    out,
                    "  {} {:04o} ino={} len={} {:?}{} {path}",
                    it.kind,
                    it.mode,
                    it.ino,
                    it.data.len(),
                    shown,
                    if it.xattrs.is_empty() {
                        String::new()
                    } else {
                        format!(" xattrs={:?}", it.xattrs.keys())
                    },
                );
            }
        }
        let st = lock(&self.state);
        let mut inos: Vec<_> = st.inodes.iter().filter(|(_, i)| !i.pending.is_empty()).collect();
        inos.sort_by_key(|(k, _)| **k);
        let _ = writeln!(out, "pending:");
        for (ino, i) in inos {
            let ops: Vec<String> = i
                .pending
                .iter()
                .map(|p| match &p.op {
                    Op::Write { off, data } => format!("write({off}, {})", data.len()),
                    op => format!("{op:?}"),
                })
                .collect();
            let _ = writeln!(out, "  ino {ino} ({}): {}", st.path_of(*ino), ops.join(", "));
        }
        out
    }

    /// Syncs counted for a path inside the mount ("/a/b", "a/b" or the full path).
    pub fn syncs(&self, path: impl AsRef<Path>) -> SyncCounts {
        let p = path.as_ref();
        let rel = p.strip_prefix(&self.path).unwrap_or(p);
        let key = format!("/{}", rel.to_string_lossy().trim_start_matches('/'));
        lock(&self.state).syncs.get(&key).copied().unwrap_or_default()
    }

    /// Every sync so far, in order.
    pub fn sync_events(&self) -> Vec<SyncEvent> {
        lock(&self.state).events.clone()
    }

    /// Forgets the sync counters and events.
    pub fn reset_syncs(&self) {
        let mut st = lock(&self.state);
        st.syncs.clear();
        st.events.clear();
    }

    /// Testing the tests: makes fsyncdir a no-op (a deliberately broken layer).
    pub fn break_fsyncdir(&self, broken: bool) {
        lock(&self.state).break_fsyncdir = broken;
    }
}

impl Drop for PowerCut {
    fn drop(&mut self) {
        self.unmount();
    }
}
