//! In-process harness: the filesystem core (`kmsfs::fs::Fs`) on a real volume, without FUSE.
//!
//! The volume is made by `kmsfs init` (the binary, as for a mount) and opened the way the
//! daemon opens it: `kmsfs::volume::Volume::open` reads and checks the config and builds the
//! real local-keystore provider, `check_access` proves the key, `names` unwraps the volume name
//! key. Everything below the FUSE adapter is the code a mount runs; only the kernel is missing,
//! so tests call the core's inode-number operations directly, with `Walk` standing in for the
//! kernel's path walk.

use kmsfs::exit::Fatal;
use kmsfs::fs::attr::Attr;
use kmsfs::fs::error::FsResult;
use kmsfs::fs::inode::{Kind, ROOT_INO};
use kmsfs::fs::{Caller, Fs, KmsEvents, Options};
use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// What the core told the daemon about the KMS, counted.
#[derive(Default)]
pub struct Events {
    pub denied: AtomicUsize,
    pub unreachable: AtomicUsize,
}

impl KmsEvents for Events {
    fn denied(&self, _why: &str) {
        self.denied.fetch_add(1, Ordering::SeqCst);
    }
    fn unreachable(&self, _why: &str) {
        self.unreachable.fetch_add(1, Ordering::SeqCst);
    }
}

/// A volume (backing directory and keystore in a temp directory) served by an in-process `Fs`.
pub struct InProcess {
    /// The temp directory, backing directory and keystore (never mounted).
    pub vol: super::Volume,
    /// Runs the KMS calls, as the daemon's runtime does.
    pub rt: tokio::runtime::Runtime,
    pub events: Arc<Events>,
    pub options: Options,
    fs: Option<Arc<Fs>>,
}

impl InProcess {
    /// A fresh volume with encrypted names under the system temp directory.
    pub fn new() -> InProcess {
        Self::create(&std::env::temp_dir(), &[], Options::default())
    }

    /// A fresh volume under `parent`, made with extra `kmsfs init` arguments (say
    /// `--plaintext-names`), opened with `options`.
    pub fn create(parent: &Path, init_args: &[&str], options: Options) -> InProcess {
        let vol = super::Volume::init_in(parent, init_args, &[]);
        let rt = kmsfs::volume::cli_runtime().expect("tokio runtime");
        let mut h = InProcess {
            vol,
            rt,
            events: Arc::new(Events::default()),
            options,
            fs: None,
        };
        h.fs = Some(Arc::new(
            h.open().unwrap_or_else(|e| panic!("open volume: {}", e.message)),
        ));
        h
    }

    /// Opens the volume the way `daemon::run_mount` does, up to (not including) FUSE.
    pub fn open(&self) -> Result<Fs, Fatal> {
        let volume = kmsfs::volume::Volume::open(&self.vol.backing, self.rt.handle())?;
        volume.check_access(&self.rt)?;
        let names = volume.names(&self.rt)?;
        let root: OwnedFd = std::fs::File::open(&volume.backing)
            .expect("open backing directory")
            .into();
        Fs::new(
            root,
            volume.kms.clone(),
            volume.id,
            volume.config.layout(),
            self.rt.handle().clone(),
            names,
            self.options,
            self.events.clone(),
        )
        .map_err(|e| Fatal::new(format!("Fs::new: {e}")))
    }

    pub fn fs(&self) -> &Fs {
        self.fs.as_ref().expect("volume is open")
    }

    /// The filesystem, for threads that outlive a borrow.
    pub fn shared(&self) -> Arc<Fs> {
        self.fs.as_ref().expect("volume is open").clone()
    }

    /// Drops the filesystem (every handle and cached key with it) and opens the volume again:
    /// what an unmount and a mount do to the core.
    /// Ends the filesystem as the daemon does at unmount: keys dropped, files made ahead of
    /// creates removed (and their refill stopped).
    fn end(&mut self) {
        if let Some(fs) = self.fs.take() {
            fs.lock();
            fs.finish();
        }
    }

    pub fn remount(&mut self) {
        self.end();
        self.fs = Some(Arc::new(
            self.open()
                .unwrap_or_else(|e| panic!("reopen volume: {}", e.message)),
        ));
    }

    /// Drops the filesystem; `try_remount` opens it again or says why not.
    pub fn try_remount(&mut self) -> Result<(), Fatal> {
        self.end();
        self.fs = Some(Arc::new(self.open()?));
        Ok(())
    }

    /// Enables or disables the volume's key in its keystore, as `kmsfs key disable` does.
    pub fn set_key_enabled(&self, enabled: bool) {
        use kmsfs::kms::local::Keystore;
        let mut ks = Keystore::load(&self.vol.keystore).expect("load keystore");
        ks.set_enabled("default", enabled).expect("key exists");
        ks.save(&self.vol.keystore).expect("save keystore");
    }
}

/// The test process's credentials, as the kernel would pass them.
pub fn caller() -> Caller {
    // SAFETY: geteuid and getegid cannot fail and touch no memory.
    unsafe {
        Caller {
            uid: libc::geteuid(),
            gid: libc::getegid(),
            pid: std::process::id(),
        }
    }
}

/// The process umask (from /proc: umask(2) would change it, racing other test threads). The
/// kernel applies it to the mode of everything created through a mount without POSIX ACLs.
pub fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

/// Looks up every component of `path` (relative to the root, `/`-separated, no symlinks
/// followed) and returns the last one's attributes. Each lookup counts a reference in the
/// core, as it does for the kernel; tests that keep the `Fs` short-lived never forget them.
pub fn lookup_path(fs: &Fs, path: &str) -> FsResult<Attr> {
    let mut attr = fs.getattr(ROOT_INO)?;
    for c in path.split('/').filter(|c| !c.is_empty()) {
        attr = fs.lookup(attr.ino, OsStr::new(c))?;
    }
    Ok(attr)
}

/// The inode number of `path`; panics with the errno if it does not resolve.
pub fn ino(fs: &Fs, path: &str) -> u64 {
    match lookup_path(fs, path) {
        Ok(a) => a.ino,
        Err(e) => panic!("lookup {path}: errno {}", e.errno()),
    }
}

/// The directory holding `path` and the last component's name.
pub fn parent_of<'p>(fs: &Fs, path: &'p str) -> (u64, &'p OsStr) {
    let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
    (ino(fs, dir), OsStr::new(name))
}

/// Linux's limit on symlinks followed in one path walk (MAXSYMLINKS).
pub const MAX_SYMLINKS: u32 = 40;

/// A resolved object: its inode number and kind.
#[derive(Debug, Clone, Copy)]
pub struct Node {
    pub ino: u64,
    pub kind: Kind,
}

/// The last component of a path, after the walk.
pub enum Last {
    /// It exists: the directory it was found in, its name there, its attributes.
    Found { dir: u64, name: Vec<u8>, attr: Attr },
    /// It does not exist: where it would be created (after any symlink was followed).
    Missing { dir: u64, name: Vec<u8> },
}

/// Resolves paths the way the kernel's path walk drives a FUSE filesystem: one lookup per
/// component, ENOTDIR for a component that is not a directory, symlinks followed relative to
/// the directory holding them (ELOOP past 40). Errors are errnos, as the application sees
/// them. Every lookup counts a reference in the core; when the walk is dropped they are all
/// forgotten (the kernel evicting its dentries at once, the harshest order it may choose)
/// except those `keep` hands to the caller.
pub struct Walk<'a> {
    pub fs: &'a Fs,
    refs: Vec<u64>,
    links: u32,
}

impl<'a> Walk<'a> {
    pub fn new(fs: &'a Fs) -> Self {
        Walk {
            fs,
            refs: Vec::new(),
            links: 0,
        }
    }

    /// One lookup, counted.
    pub fn lookup(&mut self, dir: u64, name: &[u8]) -> Result<Attr, i32> {
        let a = self
            .fs
            .lookup(dir, OsStr::from_bytes(name))
            .map_err(|e| e.errno())?;
        self.refs.push(a.ino);
        Ok(a)
    }

    /// Records a reference the core counted for an entry it made (create, mkdir, link…).
    pub fn counted(&mut self, ino: u64) {
        self.refs.push(ino);
    }

    /// Hands one counted reference to `ino` to the caller, who must `forget` it later (an
    /// open file pins its inode in the kernel).
    pub fn keep(&mut self, ino: u64) {
        let i = self
            .refs
            .iter()
            .rposition(|&r| r == ino)
            .expect("a reference to keep");
        self.refs.swap_remove(i);
    }

    /// Resolves `comps` from `start`, following every symlink; `chain` collects each directory
    /// passed through (with no `..` in any path, these are the result's ancestors).
    pub fn walk(&mut self, start: Node, comps: &[&[u8]], chain: &mut Vec<u64>) -> Result<Node, i32> {
        let mut cur = start;
        for c in comps.iter().filter(|c| !c.is_empty()) {
            if cur.kind != Kind::Dir {
                return Err(libc::ENOTDIR);
            }
            chain.push(cur.ino);
            cur = self.step(cur.ino, c, chain)?;
        }
        Ok(cur)
    }

    /// `name` in `dir`, followed if it is a symlink.
    fn step(&mut self, dir: u64, name: &[u8], chain: &mut Vec<u64>) -> Result<Node, i32> {
        let a = self.lookup(dir, name)?;
        if a.kind != Kind::Symlink {
            return Ok(Node {
                ino: a.ino,
                kind: a.kind,
            });
        }
        let target = self.link_target(a.ino)?;
        let comps = split(&target);
        let d = Node {
            ino: dir,
            kind: Kind::Dir,
        };
        self.walk(d, &comps, chain)
    }

    /// Counts one more symlink followed and reads its target.
    fn link_target(&mut self, ino: u64) -> Result<Vec<u8>, i32> {
        self.links += 1;
        if self.links > MAX_SYMLINKS {
            return Err(libc::ELOOP);
        }
        let t = self.fs.readlink(ino).map_err(|e| e.errno())?;
        assert!(
            !t.starts_with(b"/"),
            "absolute symlink targets leave the filesystem; the tests make none"
        );
        Ok(t)
    }

    /// The directory holding `path`'s last component (relative to `start`), the chain of
    /// directories leading to it (itself included), and the last component.
    pub fn parent_in<'p>(&mut self, start: Node, path: &'p [u8]) -> Result<(u64, Vec<u64>, &'p [u8]), i32> {
        let comps = split(path);
        let (last, dirs) = comps.split_last().expect("a non-empty path");
        let mut chain = Vec::new();
        let d = self.walk(start, dirs, &mut chain)?;
        if d.kind != Kind::Dir {
            return Err(libc::ENOTDIR);
        }
        chain.push(d.ino);
        Ok((d.ino, chain, last))
    }

    /// [`Walk::parent_in`] from the root.
    pub fn parent<'p>(&mut self, path: &'p [u8]) -> Result<(u64, Vec<u64>, &'p [u8]), i32> {
        self.parent_in(root(), path)
    }

    /// `path`'s last component, followed through symlinks if `follow`. A missing last
    /// component (or symlink target) is `Last::Missing`, with where it would be created.
    pub fn last(&mut self, path: &[u8], follow: bool) -> Result<Last, i32> {
        let (mut dir, _, name) = self.parent(path)?;
        let mut name = name.to_vec();
        loop {
            let attr = match self.lookup(dir, &name) {
                Ok(a) => a,
                Err(libc::ENOENT) => return Ok(Last::Missing { dir, name }),
                Err(e) => return Err(e),
            };
            if !follow || attr.kind != Kind::Symlink {
                return Ok(Last::Found { dir, name, attr });
            }
            let target = self.link_target(attr.ino)?;
            let d = Node {
                ino: dir,
                kind: Kind::Dir,
            };
            let (d, _, n) = self.parent_in(d, &target)?;
            dir = d;
            name = n.to_vec();
        }
    }
}

impl Drop for Walk<'_> {
    fn drop(&mut self) {
        for &ino in &self.refs {
            self.fs.forget(ino, 1);
        }
    }
}

/// The root directory.
pub fn root() -> Node {
    Node {
        ino: ROOT_INO,
        kind: Kind::Dir,
    }
}

/// A path's non-empty components.
pub fn split(path: &[u8]) -> Vec<&[u8]> {
    path.split(|&b| b == b'/').filter(|c| !c.is_empty()).collect()
}
