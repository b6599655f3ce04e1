//! Test harness: a kmsfs volume in a temp directory, mounted through the real binary on a real
//! FUSE mount. `kmsfs mount` returns only once the mount serves requests (the readiness
//! signal); Drop unmounts even when a test fails.
#![allow(dead_code)]

pub mod inprocess;
pub mod moto;
pub mod openbao;
pub mod powercut;
pub mod pykmip;
pub mod workload;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn kmsfs() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kmsfs"))
}

/// The Python venv for a test server from PyPI: `$env_var`, or target/`name`; locked against
/// other test processes installing into it while the returned file is open.
pub fn test_venv(env_var: &str, name: &str) -> (PathBuf, std::fs::File) {
    let venv = std::env::var_os(env_var).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join(name)
    });
    std::fs::create_dir_all(venv.parent().unwrap()).unwrap();
    let lock = std::fs::File::create(venv.with_extension("lock")).unwrap();
    lock.lock().unwrap();
    (venv, lock)
}

/// Held while a test installs /sbin/mount.fuse.kmsfs (a link to this build) or the kmsfs
/// package (which owns that path, and removes it with the package): one at a time on the
/// machine, whichever checkout or test binary they run from.
pub fn sbin_helpers_lock() -> std::fs::File {
    let lock = std::fs::File::create("/run/lock/kmsfs-tests-sbin-helpers.lock")
        .or_else(|_| std::fs::File::create(std::env::temp_dir().join("kmsfs-tests-sbin-helpers.lock")))
        .expect("create the /sbin helpers' lock file");
    lock.lock().expect("lock the /sbin helpers");
    lock
}

/// Installs `requirements` from PyPI into `venv`, made first if missing.
pub fn pip_install(venv: &Path, requirements: &[&str]) {
    if !venv.join("bin/python").exists() {
        let st = Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(venv)
            .status()
            .unwrap();
        assert!(st.success(), "python3 -m venv failed");
    }
    let st = Command::new(venv.join("bin/pip"))
        .args(["install", "-q", "--disable-pip-version-check"])
        .args(requirements)
        .status()
        .unwrap();
    assert!(st.success(), "pip install {requirements:?} failed");
}

/// Mounts `v`, checks that files survive a remount, then that a header copied onto another
/// file does not open. Leaves `v` mounted; returns the copied header.
pub fn round_trip_then_swap_a_header(v: &mut Volume) -> Vec<u8> {
    v.mount(&[]);
    check_round_trip_across_remount(v);
    check_moved_header_fails_with_eio(v)
}

/// Runs kmsfs and returns its output; panics with stderr if it fails.
pub fn run_ok(args: &[&str]) -> Output {
    let out = kmsfs().args(args).output().expect("run kmsfs");
    assert!(
        out.status.success(),
        "kmsfs {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs kmsfs expecting failure; returns its stderr.
pub fn run_err(args: &[&str]) -> String {
    let out = kmsfs().args(args).output().expect("run kmsfs");
    assert!(!out.status.success(), "kmsfs {args:?} unexpectedly succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub struct Volume {
    pub dir: tempfile::TempDir,
    pub backing: PathBuf,
    pub mnt: PathBuf,
    pub keystore: PathBuf,
    pub log: PathBuf,
    /// Environment for every kmsfs call on this volume (KMS credentials).
    pub env: Vec<(String, String)>,
    mounted: bool,
}

impl Volume {
    /// A freshly initialised volume, not mounted.
    pub fn new() -> Volume {
        Self::init_with(&[], &[])
    }

    /// A volume initialised with extra `kmsfs init` arguments and environment.
    pub fn init_with(extra: &[&str], env: &[(&str, &str)]) -> Volume {
        Self::init_in(&std::env::temp_dir(), extra, env)
    }

    /// A volume (backing, mountpoint, keystore) in a new temp directory under `parent`, e.g.
    /// on tmpfs where a test does many syncs and the disk is not what it tests.
    pub fn init_in(parent: &Path, extra: &[&str], env: &[(&str, &str)]) -> Volume {
        let dir = tempfile::tempdir_in(parent).expect("tempdir");
        let backing = dir.path().join("vol");
        let mnt = dir.path().join("mnt");
        let keystore = dir.path().join("vol.keystore");
        std::fs::create_dir(&mnt).unwrap();
        let mut args = vec!["init", backing.to_str().unwrap()];
        args.extend_from_slice(extra);
        run_env_ok(&args, env);
        let log = dir.path().join("kmsfs.log");
        Volume {
            dir,
            backing,
            mnt,
            keystore,
            log,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            mounted: false,
        }
    }

    /// A volume whose backing directory is `backing` (on a test layer beneath it, say); its
    /// keystore, mountpoint and log go in a new temp directory.
    pub fn init_backing_at(backing: &Path) -> Volume {
        let dir = tempfile::tempdir().expect("tempdir");
        let mnt = dir.path().join("mnt");
        let keystore = dir.path().join("vol.keystore");
        std::fs::create_dir(&mnt).unwrap();
        run_ok(&[
            "init",
            backing.to_str().unwrap(),
            "--keystore",
            keystore.to_str().unwrap(),
        ]);
        let log = dir.path().join("kmsfs.log");
        Volume {
            dir,
            backing: backing.to_path_buf(),
            mnt,
            keystore,
            log,
            env: Vec::new(),
            mounted: false,
        }
    }

    /// A volume that is initialised and mounted.
    pub fn mounted() -> Volume {
        let mut v = Volume::new();
        v.mount(&[]);
        v
    }

    pub fn mount_args(&self, options: &[&str]) -> Vec<String> {
        let mut args = vec![
            "mount".to_string(),
            self.backing.display().to_string(),
            self.mnt.display().to_string(),
            "--log-file".into(),
            self.log.display().to_string(),
        ];
        for o in options {
            args.push("-o".into());
            args.push(o.to_string());
        }
        args
    }

    pub fn mount(&mut self, options: &[&str]) {
        self.mount_with_env(options, &[]);
    }

    /// Runs `kmsfs mount` expecting it to fail; returns its stderr.
    pub fn mount_err(&self, options: &[&str]) -> String {
        let args = self.mount_args(options);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_err(&args)
    }

    /// Mounts, or returns kmsfs's stderr if the mount is refused.
    pub fn try_mount(&mut self) -> Result<(), String> {
        let out = kmsfs()
            .args(self.mount_args(&[]))
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("run kmsfs mount");
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        self.mounted = true;
        Ok(())
    }

    /// Mounts with extra `kmsfs mount` arguments (e.g. `--check-interval 1`).
    pub fn mount_with_args(&mut self, extra: &[&str]) {
        self.mount_full(&[], extra, &[]);
    }

    /// The daemon's pid (from the lock file it holds).
    pub fn daemon_pid(&self) -> u32 {
        std::fs::read_to_string(self.backing.join(".kmsfs.lock"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// True while the mountpoint is a mount.
    pub fn is_mounted(&self) -> bool {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mp = std::fs::canonicalize(&self.mnt).unwrap();
        info.lines().any(|l| l.split(' ').nth(4) == mp.to_str())
    }

    /// Waits (up to `secs`) for the daemon to let go of the volume; true if it did.
    pub fn wait_daemon_gone(&mut self, secs: u64) -> bool {
        let f = std::fs::File::open(self.backing.join(".kmsfs.lock")).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while std::time::Instant::now() < deadline {
            if f.try_lock().is_ok() {
                let _ = f.unlock();
                self.mounted = false;
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        false
    }

    /// Mounts with extra environment for the daemon (e.g. a log level).
    pub fn mount_with_env(&mut self, options: &[&str], env: &[(&str, &str)]) {
        self.mount_full(options, &[], env);
    }

    /// Mounts with `-o` options, extra arguments and extra environment; returns once ready.
    pub fn mount_full(&mut self, options: &[&str], extra: &[&str], env: &[(&str, &str)]) {
        let mut args = self.mount_args(options);
        args.extend(extra.iter().map(|s| s.to_string()));
        let out = kmsfs()
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(env.iter().copied())
            .output()
            .expect("run kmsfs mount");
        assert!(
            out.status.success(),
            "mount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.mounted = true;
    }

    pub fn unmount(&mut self) {
        // Tests run in parallel threads of one process: a `kmsfs` child forked by another test
        // holds copies of our descriptors until it execs, so a file we just closed can keep the
        // mount busy for a moment. Retry a busy unmount; anything else fails at once.
        for _ in 0..20 {
            let out = kmsfs()
                .args(["unmount", self.mnt.to_str().unwrap()])
                .output()
                .unwrap();
            if out.status.success() {
                self.mounted = false;
                return;
            }
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("is busy"), "kmsfs unmount failed: {err}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("{} stayed busy for a second", self.mnt.display());
    }

    /// Runs kmsfs with this volume's environment.
    pub fn run(&self, args: &[&str]) -> Output {
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        run_env_ok(args, &env)
    }

    pub fn remount(&mut self) {
        self.unmount();
        self.mount(&[]);
    }

    pub fn remount_with(&mut self, extra: &[&str]) {
        self.unmount();
        self.mount_with_args(extra);
    }

    /// Path inside the mount.
    pub fn m(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// Every regular backing file that holds file content (not kmsfs's own files).
    pub fn backing_files(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let e = e.unwrap();
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') || name == "kmsfs.json" || name.ends_with(".name") {
                    continue;
                }
                let ft = e.file_type().unwrap();
                if ft.is_dir() {
                    walk(&e.path(), out);
                } else if ft.is_file() {
                    out.push(e.path());
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.backing, &mut out);
        out
    }

    /// Runs `f`, which must create exactly one file through the mount, and returns the
    /// backing file it created (names are encrypted, so this is how a test finds it).
    pub fn backing_of_new(&self, f: impl FnOnce()) -> PathBuf {
        let before = self.backing_files();
        f();
        let mut new: Vec<_> = self
            .backing_files()
            .into_iter()
            .filter(|p| !before.contains(p))
            .collect();
        assert_eq!(new.len(), 1, "expected one new backing file, got {new:?}");
        new.pop().unwrap()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn key(&self, action: &str) {
        run_ok(&[
            "key",
            action,
            "default",
            "--keystore",
            self.keystore.to_str().unwrap(),
        ]);
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        if self.mounted {
            let _ = kmsfs()
                .args(["unmount", "--lazy", self.mnt.to_str().unwrap()])
                .output();
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// True if `needle` occurs in any file under `dir`.
pub fn tree_contains(dir: &Path, needle: &[u8]) -> bool {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if e.file_name()
            .as_encoded_bytes()
            .windows(needle.len())
            .any(|w| w == needle)
        {
            return true;
        }
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            if tree_contains(&p, needle) {
                return true;
            }
        } else if ft.is_file() {
            let data = std::fs::read(&p).unwrap();
            if data.windows(needle.len()).any(|w| w == needle) {
                return true;
            }
        }
    }
    false
}

/// Creates files `made-ahead-<n>` in the mount's `dir` until one of them took a file the
/// daemon made ahead of its create, and returns how many it created. The first create
/// starts the refill. A create that makes its own file logs an `"ahead":false` key event, so
/// fewer of those than creates means one took a file made ahead.
pub fn create_until_one_is_made_ahead(v: &Volume, dir: &str) -> usize {
    let own = || v.log_text().matches(r#""ahead":false"#).count();
    let before = own();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut n = 0;
    loop {
        let name = format!("made-ahead-{n}");
        let rel = if dir.is_empty() {
            name
        } else {
            format!("{dir}/{name}")
        };
        std::fs::write(v.m(&rel), n.to_string()).unwrap();
        n += 1;
        if own() - before < n {
            return n;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "after {n} creates none took a file made ahead"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

pub fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// Runs kmsfs with extra environment; panics with stderr if it fails.
pub fn run_env_ok(args: &[&str], env: &[(&str, &str)]) -> Output {
    let out = kmsfs()
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run kmsfs");
    assert!(
        out.status.success(),
        "kmsfs {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// SplitMix64: a small, seedable generator, the same everywhere, so failures replay.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// What `kmsfs fsck` said: its exit status and output.
pub struct Fsck {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `kmsfs fsck BACKING EXTRA…` with the volume's environment.
pub fn fsck(v: &Volume, extra: &[&str]) -> Fsck {
    let out = kmsfs()
        .arg("fsck")
        .arg(&v.backing)
        .args(extra)
        .envs(v.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .expect("run kmsfs fsck");
    Fsck {
        code: out.status.code().expect("exit code"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Files in a mounted volume survive a remount: a directory, a file of several blocks and a
/// small one.
pub fn check_round_trip_across_remount(v: &mut Volume) {
    std::fs::create_dir(v.m("d")).unwrap();
    let data = pseudo_random(300_000, 4);
    std::fs::write(v.m("d/video.bin"), &data).unwrap();
    std::fs::write(v.m("small"), b"hello").unwrap();
    v.remount();
    assert!(std::fs::read(v.m("d/video.bin")).unwrap() == data);
    assert_eq!(std::fs::read(v.m("small")).unwrap(), b"hello");
}

/// In a mounted volume, a header copied from one file onto another does not open (EIO) and
/// the original still does: the KMS binds each wrapped key to its file. Leaves the volume
/// mounted; returns the copied header.
pub fn check_moved_header_fails_with_eio(v: &mut Volume) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let a = v.backing_of_new(|| std::fs::write(v.m("a"), b"secret a").unwrap());
    let b = v.backing_of_new(|| std::fs::write(v.m("b"), b"secret b").unwrap());
    v.unmount();
    let header_a = std::fs::read(&a).unwrap()[..4096].to_vec();
    let f = std::fs::OpenOptions::new().write(true).open(&b).unwrap();
    f.write_all_at(&header_a, 0).unwrap();
    v.mount(&[]);
    assert_eq!(errno_of(&std::fs::read(v.m("b")).unwrap_err()), libc::EIO);
    assert_eq!(std::fs::read(v.m("a")).unwrap(), b"secret a");
    header_a
}
