//! The composition root: volume config → KMS → filesystem core → FUSE session. The only module
//! that knows every layer.

use crate::format::config::{
    CONFIG_FILE_NAME, KmsConfig, LOCK_FILE_NAME, MAX_CONFIG_LEN, NamesConfig, VolumeConfig,
};
use crate::format::name::NameCipher;
use crate::fs::names::Names;
use crate::fs::{Fs, Options};
use crate::fuse::FuseAdapter;
use crate::kms::local::LocalKms;
use crate::kms::openbao::{OpenBaoKms, Settings};
use crate::kms::{Kms, KmsBackend, KmsError, WrappedDek};
use crate::revocation::{MountState, Signal, Signals, WatchSettings, watch};
use crate::sys;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A one-line, actionable error for the person running kmsfs.
#[derive(Debug)]
pub struct Fatal(pub String);

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Fatal {}

macro_rules! fatal {
    ($($t:tt)*) => { Fatal(format!($($t)*)) };
}

/// Reads and validates the volume config of a backing directory.
pub fn load_config(backing: &Path) -> Result<VolumeConfig, Fatal> {
    let path = backing.join(CONFIG_FILE_NAME);
    let bytes = match crate::durable::read_bounded(&path, MAX_CONFIG_LEN as u64) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !backing.is_dir() {
                return Err(fatal!("backing directory {} does not exist", backing.display()));
            }
            return Err(fatal!(
                "{} is not a kmsfs volume (no {CONFIG_FILE_NAME}); create one with `kmsfs init {}`",
                backing.display(),
                backing.display()
            ));
        }
        Err(e) => return Err(fatal!("cannot read {}: {e}", path.display())),
    };
    VolumeConfig::decode(&bytes).map_err(|e| fatal!("{}: {e}", path.display()))
}

/// The KMS a volume config names, with the mount's credentials from the environment.
/// `trust_config`: the config was just written by `kmsfs init` (see `Settings::from_env`).
pub fn kms_for(config: &VolumeConfig, trust_config: bool) -> Result<Kms, Fatal> {
    Ok(match &config.kms {
        KmsConfig::Local { keystore, key } => Kms::Local(LocalKms::new(keystore.clone(), key.clone())),
        KmsConfig::Openbao { addrs, mount, key } => {
            let settings = Settings::from_env(addrs, mount, key, trust_config).map_err(explain_kms)?;
            Kms::OpenBao(Arc::new(OpenBaoKms::new(settings).map_err(explain_kms)?))
        }
    })
}

/// The volume config is stored with the data, so whoever can write the backing directory can
/// edit it. It must not be able to send new keys somewhere the attacker controls: a local
/// keystore must live outside the backing directory and belong to the user running kmsfs.
pub fn check_kms_location(config: &VolumeConfig, backing: &Path) -> Result<(), Fatal> {
    match &config.kms {
        // Its address can be pinned on the mount side with BAO_ADDR.
        KmsConfig::Openbao { .. } => Ok(()),
        KmsConfig::Local { keystore, .. } => {
            let real = std::fs::canonicalize(keystore).unwrap_or_else(|_| keystore.clone());
            if real.starts_with(backing) {
                return Err(fatal!(
                    "the volume config points at a keystore inside the backing directory ({}); refusing: \
                     whoever can write the backing directory could supply their own keys",
                    keystore.display()
                ));
            }
            if let Ok(meta) = std::fs::metadata(&real)
                && meta.uid() != sys::geteuid()
            {
                return Err(fatal!(
                    "keystore {} is owned by uid {}, not by the user running kmsfs; refusing it",
                    keystore.display(),
                    meta.uid()
                ));
            }
            Ok(())
        }
    }
}

/// How a *denied* mount-time error begins: the daemon then exits with [`EXIT_LOCKED`], so
/// systemd does not retry a revoked server in a loop.
pub const DENIED_PREFIX: &str = "the KMS refuses this volume's key";

/// A KMS error as the admin should read it at mount time.
pub fn explain_kms(e: KmsError) -> Fatal {
    match e {
        KmsError::Denied(m) => {
            fatal!("the KMS refuses this volume's key ({m}); re-enable the key or restore access")
        }
        KmsError::Unreachable(m) => fatal!("cannot reach the KMS ({m}); check that it is up and try again"),
        KmsError::Corrupt(m) => {
            fatal!("the KMS could not unwrap a key ({m}): is this the volume's keystore?")
        }
        KmsError::Misconfigured(m) => Fatal(m),
    }
}

/// A runtime for KMS calls from the command line.
pub fn cli_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Runs one KMS call from the command line.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    cli_runtime().block_on(f)
}

pub struct MountRequest {
    pub backing: PathBuf,
    pub mountpoint: PathBuf,
    /// `-o` options: fuser ones (ro, allow_other, allow_root, …) pass through.
    pub options: Vec<String>,
    pub threads: usize,
    /// Called once the mount serves requests.
    pub on_ready: Box<dyn FnOnce() + Send>,
    /// How often to prove access to the KMS.
    pub check_interval: std::time::Duration,
    /// How long an unreachable KMS is tolerated (default: the key cache TTL).
    pub grace: Option<std::time::Duration>,
    pub key_cache_ttl: std::time::Duration,
    pub key_cache_entries: usize,
    /// Refuse to run if memory cannot be locked.
    pub require_mlock: bool,
    /// JSON-lines audit file.
    pub audit_log: Option<PathBuf>,
}

/// How a mount ended.
#[derive(Debug)]
pub enum Ended {
    Unmounted,
    /// Locked by revocation or `kmsfs lock`; the daemon exits with [`EXIT_LOCKED`].
    Locked(String),
}

/// Exit status of a daemon whose mount was locked: systemd units list it in
/// `RestartPreventExitStatus=` so a revoked server is not remounted in a loop.
pub const EXIT_LOCKED: i32 = 75;

/// Unwraps the volume name key (bound to the volume id) and derives the name ciphers.
pub fn open_names(
    runtime: &tokio::runtime::Runtime,
    kms: &Kms,
    config: &VolumeConfig,
) -> Result<Names, Fatal> {
    let NamesConfig::Encrypted {
        root_dir_id,
        key_ref,
        wrapped_key,
    } = &config.names
    else {
        return Ok(Names::Plain);
    };
    let wrapped = WrappedDek {
        key_ref: key_ref.clone(),
        blob: crate::hex::decode(wrapped_key).unwrap_or_default(),
    };
    let volume_id = config.volume_id_bytes();
    let key = runtime
        .block_on(kms.unwrap_dek(&wrapped, &volume_id))
        .map_err(explain_kms)?;
    let mut root = [0u8; crate::format::name::DIR_ID_LEN];
    root.copy_from_slice(&crate::hex::decode(root_dir_id).unwrap_or_default());
    Ok(Names::Encrypted {
        cipher: Box::new(NameCipher::new(&key, &volume_id)),
        root_dir_id: root,
    })
}

/// The backing directory's lock file, held by whoever may change the volume (the daemon, or
/// `kmsfs fsck --repair`).
pub enum VolumeLock {
    /// Ours until dropped; it holds our pid, so a refused mount can name us.
    Held(File),
    /// Another process holds it; its pid as it wrote it.
    Busy { pid: String },
}

pub fn lock_volume(backing: &Path) -> Result<VolumeLock, Fatal> {
    let path = backing.join(LOCK_FILE_NAME);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| fatal!("cannot open lock file {}: {e}", path.display()))?;
    match sys::try_lock_exclusive(f.as_fd()) {
        Ok(true) => {}
        Ok(false) => {
            // A pid is a few bytes; the file sits in the backing directory, so bound the read.
            let pid = crate::durable::read_bounded(&path, 32)
                .map(|b| String::from_utf8_lossy(&b).trim().to_string())
                .unwrap_or_default();
            return Ok(VolumeLock::Busy { pid });
        }
        Err(e) => return Err(fatal!("cannot lock {}: {e}", path.display())),
    }
    f.set_len(0).ok();
    let _ = writeln!(f, "{}", std::process::id());
    Ok(VolumeLock::Held(f))
}

/// Holds the backing directory's lock file for as long as the daemon runs.
fn take_lock(backing: &Path) -> Result<File, Fatal> {
    match lock_volume(backing)? {
        VolumeLock::Held(f) => Ok(f),
        VolumeLock::Busy { pid } => Err(fatal!(
            "{} is already mounted by another kmsfs daemon (pid {pid}); unmount it first",
            backing.display()
        )),
    }
}

fn check_mountpoint(mp: &Path) -> Result<(), Fatal> {
    let meta = std::fs::metadata(mp).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            fatal!(
                "mountpoint {} does not exist; create it with `mkdir -p {}`",
                mp.display(),
                mp.display()
            )
        } else {
            fatal!("mountpoint {}: {e}", mp.display())
        }
    })?;
    if !meta.is_dir() {
        return Err(fatal!("mountpoint {} is not a directory", mp.display()));
    }
    let parent = mp.parent().unwrap_or(Path::new("/"));
    if let Ok(pm) = std::fs::metadata(parent)
        && pm.dev() != meta.dev()
    {
        return Err(fatal!(
            "mountpoint {} is busy: something is already mounted there (`kmsfs unmount {}`)",
            mp.display(),
            mp.display()
        ));
    }
    Ok(())
}

fn fuser_config(req: &MountRequest, backing: &Path) -> Result<fuser::Config, Fatal> {
    use fuser::MountOption as O;
    let mut config = fuser::Config::default();
    let mut opts = vec![
        O::FSName(backing.display().to_string()),
        O::Subtype("kmsfs".into()),
        // The kernel checks permissions against the attributes we report; without this any
        // local user could read files through a root-run daemon.
        O::DefaultPermissions,
    ];
    for o in req
        .options
        .iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.is_empty())
    {
        match o {
            "ro" => opts.push(O::RO),
            "rw" => opts.push(O::RW),
            "allow_other" => config.acl = fuser::SessionACL::All,
            "allow_root" => config.acl = fuser::SessionACL::RootAndOwner,
            "default_permissions" => {}
            "dev" => opts.push(O::Dev),
            "nodev" => opts.push(O::NoDev),
            "suid" => opts.push(O::Suid),
            "nosuid" => opts.push(O::NoSuid),
            "exec" => opts.push(O::Exec),
            "noexec" => opts.push(O::NoExec),
            "atime" => opts.push(O::Atime),
            "noatime" => opts.push(O::NoAtime),
            "sync" => opts.push(O::Sync),
            "async" => opts.push(O::Async),
            "dirsync" => opts.push(O::DirSync),
            other => return Err(fatal!("unknown mount option {other:?}")),
        }
    }
    config.mount_options = opts;
    config.n_threads = Some(req.threads.max(1));
    config.clone_fd = true;
    Ok(config)
}

/// Mounts a volume and serves it until it is unmounted, locked, or the daemon is told to stop.
pub fn run_mount(req: MountRequest) -> Result<Ended, Fatal> {
    if let Err(e) = sys::disable_core_dumps() {
        log::warn!("cannot disable core dumps: {e}");
    }
    if let Err(e) = sys::lock_memory() {
        if req.require_mlock {
            return Err(fatal!(
                "cannot lock memory ({e}); raise RLIMIT_MEMLOCK (LimitMEMLOCK=infinity in the unit) or drop --require-mlock"
            ));
        }
        log::warn!("cannot lock memory ({e}): unwrapped keys could be swapped to disk; raise RLIMIT_MEMLOCK");
    }
    // Modes of created files come from the caller's request, already masked by the kernel.
    sys::set_umask(0);
    sys::raise_nofile_limit();
    if let Some(p) = &req.audit_log {
        crate::audit::open(p).map_err(|e| fatal!("cannot open audit log {}: {e}", p.display()))?;
    }

    let backing = std::fs::canonicalize(&req.backing)
        .map_err(|e| fatal!("backing directory {}: {e}", req.backing.display()))?;
    let mountpoint = std::fs::canonicalize(&req.mountpoint).unwrap_or_else(|_| req.mountpoint.clone());
    let config = load_config(&backing)?;
    check_mountpoint(&req.mountpoint)?;
    if !Path::new("/dev/fuse").exists() {
        return Err(fatal!(
            "/dev/fuse is missing: install fuse3 (`apt-get install fuse3`) and load the module (`modprobe fuse`)"
        ));
    }
    let _lock = take_lock(&backing)?;
    check_kms_location(&config, &backing)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kmsfs-kms")
        .enable_all()
        .build()
        .map_err(|e| fatal!("cannot start the KMS runtime: {e}"))?;
    let kms = Arc::new(kms_for(&config, false)?);
    {
        let _in_runtime = runtime.enter();
        kms.start();
    }
    // Prove access before mounting at all.
    let status = runtime.block_on(kms.check_access()).map_err(explain_kms)?;
    log::info!(
        "volume {}: KMS {} key {:?} version {} is usable",
        config.volume_id,
        status.backend,
        status.key_ref,
        status.current_version
    );

    let names = open_names(&runtime, &kms, &config)?;
    let root: OwnedFd = File::open(&backing)
        .map_err(|e| fatal!("cannot open {}: {e}", backing.display()))?
        .into();
    let fuse_config = fuser_config(&req, &backing)?;
    let options = Options {
        read_only: fuse_config.mount_options.contains(&fuser::MountOption::RO),
        key_cache_entries: req.key_cache_entries,
        key_cache_ttl: req.key_cache_ttl,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let signals = Arc::new(Signals(std::sync::Mutex::new(tx.clone())));
    let fs = Arc::new(
        Fs::new(
            root,
            kms.clone(),
            runtime.handle().clone(),
            names,
            options,
            signals,
        )
        .map_err(|e| fatal!("{e:?}"))?,
    );
    let state = Arc::new(MountState {
        fs: fs.clone(),
        kms: kms.clone(),
        mountpoint: mountpoint.clone(),
        backing: backing.clone(),
        volume_id: config.volume_id.clone(),
        key_ref: status.key_ref.clone(),
        key_version: std::sync::Mutex::new(status.current_version),
        notifier: std::sync::OnceLock::new(),
        started: std::time::Instant::now(),
        health: std::sync::Mutex::new("ok".into()),
        locked: std::sync::Mutex::new(None),
        session_ended: Arc::new(std::sync::atomic::AtomicBool::new(false)),
    });
    let adapter = FuseAdapter::new(fs, req.on_ready);
    let mut session = fuser::Session::new(adapter, &req.mountpoint, &fuse_config).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            fatal!("cannot mount: fusermount3 or /dev/fuse missing; install fuse3 (`apt-get install fuse3`)")
        } else {
            fatal!("cannot mount {}: {e}", req.mountpoint.display())
        }
    })?;
    let _ = state.notifier.set(session.notifier());
    log::info!("volume {} mounted at {}", config.volume_id, mountpoint.display());
    crate::audit::event(
        "mounted",
        serde_json::json!({"volume_id": config.volume_id, "backend": status.backend,
                           "key": status.key_ref, "version": status.current_version}),
    );
    let socket = crate::control::serve(&mountpoint, state.clone())
        .inspect_err(|e| {
            log::warn!("no control socket ({e}): `kmsfs status` and `kmsfs lock` will not reach this mount")
        })
        .ok();

    // SIGTERM/SIGINT unmount gracefully: the session loop then ends and every key is dropped.
    let mut unmounter = session.unmount_callable();
    let signal_mountpoint = mountpoint.clone();
    runtime.spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
        else {
            log::warn!("cannot install signal handlers; stop with `kmsfs unmount`");
            return;
        };
        let mut lazy = false;
        loop {
            tokio::select! {
                _ = term.recv() => log::info!("SIGTERM: unmounting"),
                _ = int.recv() => log::info!("SIGINT: unmounting"),
            }
            // The first signal unmounts gracefully; if files are busy, the next one detaches.
            let result = if lazy {
                sys::umount(signal_mountpoint.as_os_str(), true)
            } else {
                unmounter.unmount()
            };
            match result {
                Ok(()) => return,
                Err(e) => {
                    log::error!("unmount failed ({e}); send the signal again to detach lazily");
                    lazy = true;
                }
            }
        }
    });
    let watcher = {
        let state = state.clone();
        let handle = runtime.handle().clone();
        let settings = WatchSettings {
            interval: req.check_interval,
            grace: req.grace.unwrap_or(req.key_cache_ttl),
        };
        std::thread::Builder::new()
            .name("kmsfs-watch".into())
            .spawn(move || watch(state, rx, handle, settings))
            .map_err(|e| fatal!("cannot start the revocation watcher: {e}"))?
    };

    let result = session.run();
    crate::notify::notify("STOPPING=1");
    state
        .session_ended
        .store(true, std::sync::atomic::Ordering::Release);
    let _ = tx.send(Signal::Stop);
    let _ = watcher.join();
    // Every key goes now, whatever ended the session.
    state.fs.lock();
    if let Kms::OpenBao(k) = &*kms {
        k.clear_pool();
    }
    if let Some(p) = socket {
        let _ = std::fs::remove_file(p);
    }
    if kms.request_count() > 0 {
        log::info!("KMS requests sent while mounted: {}", kms.request_count());
    }
    runtime.shutdown_background();
    if let Some(why) = state.locked_reason() {
        log::warn!("volume {} locked and unmounted: {why}", config.volume_id);
        crate::audit::event(
            "unmounted",
            serde_json::json!({"volume_id": config.volume_id, "outcome": "locked"}),
        );
        return Ok(Ended::Locked(why));
    }
    crate::audit::event(
        "unmounted",
        serde_json::json!({"volume_id": config.volume_id, "outcome": "ok"}),
    );
    match result {
        Ok(()) => {
            log::info!("volume {} unmounted", config.volume_id);
            Ok(Ended::Unmounted)
        }
        Err(e) => Err(fatal!("FUSE session ended with an error: {e}")),
    }
}

/// Finds the backing directory of a kmsfs mount from /proc/self/mountinfo.
pub fn backing_of_mount(mountpoint: &Path) -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let target = mountpoint.to_str()?;
    info.lines().rev().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mp = left.split(' ').nth(4)?;
        let mut r = right.split(' ');
        let fstype = r.next()?;
        let source = r.next()?;
        // fuser mounts with type "fuse"; a kmsfs source is a directory with a volume config.
        let source = PathBuf::from(unescape_mountinfo(source));
        (fstype.starts_with("fuse")
            && unescape_mountinfo(mp) == target
            && source.join(CONFIG_FILE_NAME).is_file())
        .then_some(source)
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts a kmsfs mount and waits for its daemon to finish (it drops its keys on exit).
pub fn unmount(mountpoint: &Path, lazy: bool) -> Result<(), Fatal> {
    let mp = std::fs::canonicalize(mountpoint).map_err(|e| fatal!("{}: {e}", mountpoint.display()))?;
    let backing = backing_of_mount(&mp).ok_or_else(|| fatal!("{} is not a kmsfs mount", mp.display()))?;
    let result = if sys::geteuid() == 0 {
        sys::umount(mp.as_os_str(), lazy)
    } else {
        let mut cmd = std::process::Command::new("fusermount3");
        cmd.arg("-u");
        if lazy {
            cmd.arg("-z");
        }
        match cmd.arg(&mp).status() {
            Ok(s) if s.success() => Ok(()),
            Ok(_) => Err(std::io::Error::from_raw_os_error(libc::EBUSY)),
            Err(e) => Err(e),
        }
    };
    result.map_err(|e| {
        if e.raw_os_error() == Some(libc::EBUSY) {
            fatal!(
                "{} is busy: close the files open in it, or use `kmsfs unmount --lazy`",
                mp.display()
            )
        } else {
            fatal!("cannot unmount {}: {e}", mp.display())
        }
    })?;
    if !wait_for_daemon_exit(&backing) {
        return Err(fatal!(
            "{} is unmounted but its daemon has not exited after 30 s",
            mp.display()
        ));
    }
    Ok(())
}

/// Waits (up to 30 s) until no daemon holds the backing directory's lock; false on timeout.
pub fn wait_for_daemon_exit(backing: &Path) -> bool {
    let Ok(f) = File::open(backing.join(LOCK_FILE_NAME)) else {
        return true;
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if let Ok(true) = sys::try_lock_exclusive(f.as_fd()) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    log::warn!("the daemon for {} has not exited after 30 s", backing.display());
    false
}
