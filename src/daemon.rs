//! The composition root: volume config → KMS → filesystem core → FUSE session. The only module
//! that knows every layer.

use crate::exit::Fatal;
use crate::fatal;
use crate::fs::{Fs, Options};
use crate::fuse::FuseAdapter;
use crate::mount_state::MountState;
use crate::revocation::{Signal, Signals, WatchSettings, watch};
use crate::sys;
use crate::volume::{Located, VolumeLock, lock_volume};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct MountRequest {
    pub backing: PathBuf,
    pub mountpoint: PathBuf,
    /// `-o` options: fuser ones (ro, allow_other, allow_root, …) pass through.
    pub options: Vec<String>,
    pub threads: usize,
    /// Called once the mount serves requests and its control socket answers.
    pub on_ready: Box<dyn FnOnce() + Send>,
    /// How often to prove access to the KMS.
    pub check_interval: std::time::Duration,
    /// How long an unreachable KMS is tolerated (default: the key cache TTL).
    pub grace: Option<std::time::Duration>,
    pub key_cache_ttl: std::time::Duration,
    pub key_cache_entries: usize,
    /// How long an open or create that needs the KMS waits for it (`None`: its retry budget).
    pub open_timeout: Option<std::time::Duration>,
    /// Keys unwrapped ahead per prefetch pass (0: no prefetch).
    pub prefetch: usize,
    /// Refuse to run if memory cannot be locked.
    pub require_mlock: bool,
    /// JSON-lines audit file.
    pub audit_log: Option<PathBuf>,
    /// Audit events to journald as well.
    pub audit_journal: bool,
    /// The access policy file.
    pub policy: Option<PathBuf>,
    /// This machine's settings for the volume, if not where `anchor::path_for` looks.
    pub anchor: Option<PathBuf>,
    /// Where to serve Prometheus metrics.
    pub metrics: Option<std::net::SocketAddr>,
}

/// How a mount ended.
#[derive(Debug)]
pub enum Ended {
    Unmounted,
    /// Locked by revocation or `kmsfs lock`; the daemon exits with [`crate::exit::LOCKED`].
    Locked(String),
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

fn check_mountpoint(mp: &Path, nonempty: bool) -> Result<(), Fatal> {
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
    // Files under the mountpoint would be hidden by the mount, and programs writing there
    // would not notice that they miss the encrypted volume: refused unless asked for.
    if !nonempty && std::fs::read_dir(mp).is_ok_and(|mut d| d.next().is_some()) {
        return Err(fatal!(
            "mountpoint {} is not empty: the mount would hide its files; empty it, or add `-o nonempty`",
            mp.display()
        ));
    }
    Ok(())
}

/// True if `-o nonempty` was given.
fn wants_nonempty(options: &[String]) -> bool {
    options.iter().flat_map(|s| s.split(',')).any(|o| o == "nonempty")
}

fn fuser_config(req: &MountRequest, backing: &Path) -> Result<fuser::Config, Fatal> {
    use fuser::MountOption as O;
    let mut config = fuser::Config::default();
    let mut opts = vec![
        O::FSName(backing.display().to_string()),
        // As a kernel option, not fuser's Subtype: run as root, fuser calls mount(2) itself
        // with type "fuse" and passes Subtype only to fusermount3. The kernel then shows
        // the type as fuse.kmsfs (`findmnt -t fuse.kmsfs`, mount(8) -t, fstab).
        O::CUSTOM("subtype=kmsfs".into()),
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
            "default_permissions" | "nonempty" => {}
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
    if req.audit_journal {
        crate::audit::to_journal();
    }

    let located = Located::find_with(&req.backing, req.anchor.as_deref())?;
    let backing = located.backing.clone();
    crate::stop::clear_stale_mount(&req.mountpoint)?;
    check_mountpoint(&req.mountpoint, wants_nonempty(&req.options))?;
    let mountpoint = std::fs::canonicalize(&req.mountpoint).unwrap_or_else(|_| req.mountpoint.clone());
    let access = Arc::new(match &req.policy {
        Some(p) => crate::policy::Access::load(p, Some(&mountpoint))
            .map_err(|e| fatal!("{e}; fix the file or mount without --policy"))?,
        None => crate::policy::Access::none(Some(&mountpoint)),
    });
    if !Path::new("/dev/fuse").exists() {
        return Err(fatal!(
            "/dev/fuse is missing: install fuse3 (`apt-get install fuse3`) and load the module (`modprobe fuse`)"
        ));
    }
    let _lock = take_lock(&backing)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kmsfs-kms")
        .enable_all()
        .build()
        .map_err(|e| fatal!("cannot start the KMS runtime: {e}"))?;
    let volume = located.connect(runtime.handle())?;
    let config = &volume.config;
    let kms = volume.kms.clone();
    let backend = kms.describe().backend;
    // Prove access before mounting at all.
    let status = volume.check_access(&runtime)?;
    log::info!(
        "volume {}: KMS {backend} key {:?} version {} is usable",
        config.volume_id,
        status.key_ref,
        status.current_version
    );

    let names = volume.names(&runtime)?;
    let root: OwnedFd = File::open(&backing)
        .map_err(|e| fatal!("cannot open {}: {e}", backing.display()))?
        .into();
    let fuse_config = fuser_config(&req, &backing)?;
    let metrics = req.metrics.map(crate::metrics::bind).transpose()?;
    let options_read_only = fuse_config.mount_options.contains(&fuser::MountOption::RO);
    let options = Options {
        read_only: options_read_only,
        key_cache_entries: req.key_cache_entries,
        key_cache_ttl: req.key_cache_ttl,
        open_timeout: req.open_timeout,
        prefetch: req.prefetch,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let health = Arc::new(crate::mount_state::Health::default());
    let signals = Arc::new(Signals {
        tx: std::sync::Mutex::new(tx.clone()),
        health: health.clone(),
    });
    let fs = Arc::new(
        Fs::new(
            root,
            kms.clone(),
            volume.id,
            config.layout(),
            runtime.handle().clone(),
            names,
            options,
            signals,
        )
        .map_err(|e| fatal!("cannot open {}: {e}", backing.display()))?
        .with_access(access.clone()),
    );
    // Small reads of files no one writes fill the page cache with whole blocks (see
    // `fuse::PageFill`).
    let fill = crate::fuse::PageFill::start().map_err(|e| fatal!("cannot start a thread: {e}"))?;
    let state = Arc::new(MountState {
        fs: fs.clone(),
        page_fill: fill.clone(),
        kms: kms.clone(),
        mountpoint: mountpoint.clone(),
        backing: backing.clone(),
        volume_id: config.volume_id.clone(),
        key_ref: status.key_ref.clone(),
        key_version: std::sync::Mutex::new(status.current_version),
        notifier: std::sync::OnceLock::new(),
        started: std::time::Instant::now(),
        health,
        locked: std::sync::Mutex::new(None),
        session_ended: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        to_invalidate: std::sync::Mutex::new(None),
        stopping: std::sync::atomic::AtomicBool::new(false),
    });
    let adapter = FuseAdapter::new(fs, fill.clone());
    let mut session = fuser::Session::new(adapter, &req.mountpoint, &fuse_config).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            fatal!("cannot mount: fusermount3 or /dev/fuse missing; install fuse3 (`apt-get install fuse3`)")
        } else {
            fatal!("cannot mount {}: {e}", req.mountpoint.display())
        }
    })?;
    raise_read_ahead(&mountpoint);
    let _ = state.notifier.set(session.notifier());
    fill.set_notifier(session.notifier());
    log::info!("volume {} mounted at {}", config.volume_id, mountpoint.display());
    crate::audit::event(
        "mounted",
        serde_json::json!({"volume_id": config.volume_id, "backend": backend,
                           "key": status.key_ref, "version": status.current_version,
                           "policy": access.status()}),
    );
    let socket = crate::control::serve(&mountpoint, state.clone())
        .inspect_err(|e| {
            log::warn!("no control socket ({e}): `kmsfs status` and `kmsfs lock` will not reach this mount")
        })
        .ok();

    // SIGTERM/SIGINT unmount gracefully, or drop the keys and detach if files are open.
    let mut unmounter = session.unmount_callable();
    runtime.spawn(crate::stop::on_signals(state.clone(), move || {
        unmounter.unmount()
    }));
    crate::watchdog::start(mountpoint.clone(), state.session_ended.clone());
    if let Some(listener) = metrics {
        crate::metrics::serve(listener, state.clone());
    }
    // SIGHUP: the policy reloaded, the audit log and the log file reopened (logrotate).
    let hup_state = state.clone();
    runtime.spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            log::warn!("cannot handle SIGHUP; reload with `kmsfs reload`");
            return;
        };
        while hup.recv().await.is_some() {
            log::info!("SIGHUP: reloading the policy, reopening the audit log and the log file");
            hup_state.reload();
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

    // The handshake happened in `Session::new`; ready only now that the control socket,
    // signals and watchers are up too: a `kmsfs lock` right after `kmsfs mount` returns
    // must find the socket (it once raced it).
    (req.on_ready)();
    let result = session.run();
    crate::notify::notify("STOPPING=1");
    state
        .session_ended
        .store(true, std::sync::atomic::Ordering::Release);
    let _ = tx.send(Signal::Stop);
    // Every key goes now, whatever ended the session; waits on the KMS end with it.
    state.fs.lock();
    // The watcher may be in an access check against a hung KMS: give it a moment, not more.
    let joined = std::time::Instant::now() + std::time::Duration::from_secs(1);
    while !watcher.is_finished() && std::time::Instant::now() < joined {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    if watcher.is_finished() {
        let _ = watcher.join();
    }
    state.fs.finish();
    if let Some(p) = socket {
        let _ = std::fs::remove_file(p);
    }
    if kms.request_count() > 0 {
        log::info!("KMS requests sent while mounted: {}", kms.request_count());
    }
    runtime.shutdown_background();
    if let Some(why) = state.locked_reason().filter(|_| !state.stopped()) {
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

/// Lets sequential reads arrive as whole 1 MiB requests. The kernel caps a FUSE mount's
/// read-ahead at its 128 KiB default whatever `max_readahead` the daemon offers, so a large
/// sequential read reached us as 8 requests per MiB, each a round trip (the gain, measured:
/// README, "Performance"). Only root may set it; elsewhere reads work as before.
fn raise_read_ahead(mountpoint: &std::path::Path) {
    let kib = crate::fuse::MAX_IO / 1024;
    match crate::mountinfo::fuse_device(mountpoint) {
        Some(dev) => {
            if let Err(e) = sys::set_read_ahead_kb(&dev, kib) {
                log::debug!("read-ahead left at the kernel's default ({e})");
            }
        }
        None => log::debug!("read-ahead left at the kernel's default: the mount is not in mountinfo"),
    }
}
