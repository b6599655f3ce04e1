//! Command-line definitions and dispatch.

use crate::daemon::{self, Fatal};
use crate::format::config::{CONFIG_FILE_NAME, KmsConfig, NamesConfig, VolumeConfig};
use crate::kms::KmsBackend;
use crate::kms::local::Keystore;
use clap::{Args, Parser, Subcommand};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Environment variable through which a daemonising `kmsfs mount` asks its child to report
/// readiness (a `READY` or `ERROR: …` line on stdout).
const READY_ENV: &str = "KMSFS_READY_STDOUT";

#[derive(Parser)]
#[command(
    name = "kmsfs",
    version,
    about = "An encrypting FUSE filesystem whose keys live in a KMS"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a new encrypted volume in BACKING (and a local keystore beside it).
    Init {
        backing: PathBuf,
        /// Keystore file for the local KMS (default: BACKING's sibling `NAME.keystore`).
        #[arg(long)]
        keystore: Option<PathBuf>,
        /// Name of the local keystore key that wraps this volume's file keys.
        #[arg(long, default_value = "default")]
        key: String,
        /// The KMS: `local` (embedded keystore), or `openbao` / `vault` (Transit).
        #[arg(long, default_value = "local", value_parser = ["local", "openbao", "vault"])]
        kms: String,
        /// OpenBao/Vault address(es), comma-separated (default: $BAO_ADDR or $VAULT_ADDR).
        #[arg(long)]
        kms_addr: Option<String>,
        /// The Transit key (must be created with derived=true).
        #[arg(long)]
        kms_key: Option<String>,
        /// The Transit mount path.
        #[arg(long, default_value = "transit")]
        kms_mount: String,
        /// Keep file names, symlink targets and xattrs in the clear (contents stay encrypted).
        #[arg(long)]
        plaintext_names: bool,
    },
    /// Mount a volume; returns once the mount is ready unless --foreground.
    Mount(MountArgs),
    /// Re-wrap every file key (and the name key) under the KMS key's newest version.
    Rewrap {
        backing: PathBuf,
        /// Only count files per key version.
        #[arg(long)]
        dry_run: bool,
    },
    /// Check a volume: names, headers, keys (through the KMS) and every block. Read-only
    /// (also next to a live mount) unless --repair. Exit 0 clean, 1 problems, 2 fatal.
    Fsck {
        backing: PathBuf,
        /// One JSON object (summary and problems) on stdout.
        #[arg(long)]
        json: bool,
        /// Move unreadable entries into BACKING/kmsfs.lost+found/ with a report; deletes
        /// nothing. Refused while the volume is mounted.
        #[arg(long)]
        repair: bool,
    },
    /// Unmount a volume and wait for its daemon to exit.
    Unmount {
        mountpoint: PathBuf,
        /// Detach now even if files are open (the daemon exits when they close).
        #[arg(long)]
        lazy: bool,
    },
    /// Show a mount's state: KMS, keys cached, counters (all mounts if none is given).
    Status {
        mountpoint: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Install kmsfs for systemd and mount(8): the binary, the mount.kmsfs helpers, the
    /// kmsfs@.service template, and /etc/kmsfs.
    InstallUnits {
        /// Where the binary goes.
        #[arg(long, default_value = "/usr/local/bin")]
        bin_dir: PathBuf,
        /// Install under this directory instead of / (for packaging and tests).
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// Lock a mount now: drop every key, fail all I/O with ENOKEY, unmount.
    Lock { mountpoint: PathBuf },
    /// Manage keys in a local keystore: list, create, rotate, disable, enable.
    Key(KeyArgs),
}

#[derive(Args)]
struct MountArgs {
    backing: PathBuf,
    mountpoint: PathBuf,
    /// Stay in the foreground and log to stderr.
    #[arg(short, long)]
    foreground: bool,
    /// Mount options, comma-separated (ro, allow_other, allow_root, noexec, …).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Log file of a daemonised mount (default: /var/log/kmsfs/MOUNTPOINT.log).
    #[arg(long)]
    log_file: Option<PathBuf>,
    /// FUSE worker threads. A thread waiting on the KMS blocks only itself, and concurrent
    /// opens that wait together are sent to the KMS as one batch, so more threads than cores.
    #[arg(long, default_value_t = 16)]
    threads: usize,
    /// Seconds between checks that the KMS still grants access.
    #[arg(long, default_value_t = 30)]
    check_interval: u64,
    /// Seconds an unreachable KMS is tolerated before the mount locks (default: the key TTL).
    #[arg(long)]
    grace: Option<u64>,
    /// Seconds an unwrapped key stays cached after the KMS gave it.
    #[arg(long, default_value_t = 300)]
    key_ttl: u64,
    /// Most unwrapped keys kept cached.
    #[arg(long, default_value_t = 4096)]
    key_cache: usize,
    /// Refuse to mount if memory cannot be locked against swapping.
    #[arg(long)]
    require_mlock: bool,
    /// Append JSON-lines audit events of key operations to this file (also logged).
    #[arg(long)]
    audit_log: Option<PathBuf>,
}

#[derive(Args)]
struct KeyArgs {
    action: KeyAction,
    /// The key's name (all actions but `list`).
    name: Option<String>,
    /// The keystore file.
    #[arg(long, conflicts_with = "volume")]
    keystore: Option<PathBuf>,
    /// A volume's backing directory: use the keystore its config names.
    #[arg(long)]
    volume: Option<PathBuf>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum KeyAction {
    /// List keys and their versions.
    List,
    /// Create a key (and the keystore if it does not exist).
    Create,
    /// Add a new version to a key; new files use it, old versions still unwrap.
    Rotate,
    /// Refuse every unwrap with this key (mounted volumes fail opens with EACCES).
    Disable,
    /// Allow a disabled key again.
    Enable,
}

pub fn run(cli: Cli) -> Result<(), Fatal> {
    match cli.command {
        Cmd::Init {
            backing,
            keystore,
            key,
            plaintext_names,
            kms,
            kms_addr,
            kms_key,
            kms_mount,
        } => {
            let kms = match kms.as_str() {
                "local" => InitKms::Local { keystore, key },
                _ => InitKms::OpenBao {
                    addrs: kms_addr
                        .or_else(|| std::env::var("BAO_ADDR").ok())
                        .or_else(|| std::env::var("VAULT_ADDR").ok())
                        .ok_or_else(|| Fatal("give --kms-addr URL (or set BAO_ADDR)".into()))?,
                    key: kms_key
                        .ok_or_else(|| Fatal("give --kms-key NAME: the Transit key to use".into()))?,
                    mount: kms_mount,
                },
            };
            init(&backing, kms, plaintext_names)
        }
        Cmd::Rewrap { backing, dry_run } => crate::rewrap::run(&backing, dry_run),
        Cmd::Fsck {
            backing,
            json,
            repair,
        } => fsck(&backing, crate::fsck::Options { json, repair }),
        Cmd::Mount(args) => mount(args),
        Cmd::Unmount { mountpoint, lazy } => daemon::unmount(&mountpoint, lazy),
        Cmd::Status { mountpoint, json } => status(mountpoint, json),
        Cmd::Lock { mountpoint } => lock(&mountpoint),
        Cmd::InstallUnits { bin_dir, root } => install_units(&bin_dir, &root),
        Cmd::Key(args) => key(args),
    }
}

/// fsck has its own exit statuses: problems found is not the same failure as no check at all.
fn fsck(backing: &Path, opts: crate::fsck::Options) -> Result<(), Fatal> {
    match crate::fsck::run(backing, opts) {
        Ok(true) => Ok(()),
        Ok(false) => std::process::exit(crate::fsck::EXIT_PROBLEMS),
        Err(e) => {
            eprintln!("kmsfs: {e}");
            std::process::exit(crate::fsck::EXIT_FATAL);
        }
    }
}

fn absolute(p: &Path) -> Result<PathBuf, Fatal> {
    std::path::absolute(p).map_err(|e| Fatal(format!("{}: {e}", p.display())))
}

fn default_keystore(backing: &Path) -> Result<PathBuf, Fatal> {
    let backing = absolute(backing)?;
    let name = backing
        .file_name()
        .ok_or_else(|| Fatal(format!("{} has no directory name", backing.display())))?;
    let mut file = name.to_os_string();
    file.push(".keystore");
    Ok(backing.with_file_name(file))
}

enum InitKms {
    Local {
        keystore: Option<PathBuf>,
        key: String,
    },
    OpenBao {
        addrs: String,
        key: String,
        mount: String,
    },
}

fn init(backing: &Path, kms: InitKms, plaintext_names: bool) -> Result<(), Fatal> {
    if backing.join(CONFIG_FILE_NAME).exists() {
        return Err(Fatal(format!("{} is already a kmsfs volume", backing.display())));
    }
    match std::fs::read_dir(backing) {
        Ok(mut d) => {
            if d.next().is_some() {
                return Err(Fatal(format!(
                    "{} is not empty; kmsfs initialises only an empty or new directory",
                    backing.display()
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(backing)
                .map_err(|e| Fatal(format!("cannot create {}: {e}", backing.display())))?;
        }
        Err(e) => return Err(Fatal(format!("{}: {e}", backing.display()))),
    }
    let backing = std::fs::canonicalize(backing).map_err(|e| Fatal(format!("{}: {e}", backing.display())))?;
    let (kms_config, about) = match kms {
        InitKms::Local { keystore, key } => {
            let keystore = match keystore {
                Some(k) => absolute(&k)?,
                None => default_keystore(&backing)?,
            };
            if keystore.starts_with(&backing) {
                return Err(Fatal(
                    "the keystore must not live inside the backing directory: whoever holds the ciphertext would hold the keys"
                        .into(),
                ));
            }
            let mut store = if keystore.exists() {
                Keystore::load(&keystore).map_err(daemon::explain_kms)?
            } else {
                Keystore::default()
            };
            let created_key = store.key(&key).is_none();
            if created_key {
                store.create_key(&key).map_err(Fatal)?;
                store
                    .save(&keystore)
                    .map_err(|e| Fatal(format!("cannot write keystore {}: {e}", keystore.display())))?;
            }
            let about = format!(
                "keystore: {} (key {key:?}{}) — back it up and keep it off the backing storage: without it the data is lost",
                keystore.display(),
                if created_key { ", created" } else { "" }
            );
            (KmsConfig::Local { keystore, key }, about)
        }
        InitKms::OpenBao { addrs, key, mount } => {
            let addrs: Vec<String> = addrs
                .split(',')
                .map(|a| a.trim().trim_end_matches('/').to_owned())
                .collect();
            let about = format!("KMS: OpenBao Transit key {key:?} at {}", addrs.join(", "));
            (KmsConfig::Openbao { addrs, mount, key }, about)
        }
    };
    let mut config = VolumeConfig::new(kms_config);
    // Prove the key works before the volume exists, and have it wrap the volume name key.
    let kms = daemon::kms_for(&config, true)?;
    let rt = daemon::cli_runtime();
    rt.block_on(kms.check_access()).map_err(daemon::explain_kms)?;
    if !plaintext_names {
        let (_name_key, wrapped) = rt
            .block_on(kms.generate_dek(&config.volume_id_bytes()))
            .map_err(daemon::explain_kms)?;
        let mut root_id = [0u8; crate::format::name::DIR_ID_LEN];
        crate::crypto::fill_random(&mut root_id);
        config.names = NamesConfig::Encrypted {
            root_dir_id: crate::hex::encode(&root_id),
            key_ref: wrapped.key_ref,
            wrapped_key: crate::hex::encode(&wrapped.blob),
        };
    }
    crate::durable::atomic_write(&backing.join(CONFIG_FILE_NAME), &config.encode(), 0o644)
        .map_err(|e| Fatal(format!("cannot write volume config: {e}")))?;
    let names = if plaintext_names {
        "plaintext names"
    } else {
        "encrypted names"
    };
    println!(
        "initialised volume {} in {} ({names})",
        config.volume_id,
        backing.display()
    );
    println!("{about}");
    Ok(())
}

fn log_path_for(mountpoint: &Path) -> Result<PathBuf, Fatal> {
    let mp = absolute(mountpoint)?;
    let escaped: String = mp
        .to_string_lossy()
        .trim_start_matches('/')
        .chars()
        .map(|c| if c == '/' { '-' } else { c })
        .collect();
    Ok(PathBuf::from("/var/log/kmsfs").join(format!("{escaped}.log")))
}

fn mount(args: MountArgs) -> Result<(), Fatal> {
    if args.foreground {
        return mount_foreground(args);
    }
    let log_path = match &args.log_file {
        Some(p) => absolute(p)?,
        None => log_path_for(&args.mountpoint)?,
    };
    if let Some(dir) = log_path.parent() {
        use std::os::unix::fs::DirBuilderExt;
        let _ = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir);
    }
    let log = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(|e| Fatal(format!("cannot open log file {}: {e}", log_path.display())))?
    };
    let exe = std::env::current_exe().map_err(|e| Fatal(format!("cannot find own executable: {e}")))?;
    let mut cmd = Command::new(exe);
    cmd.arg("mount")
        .arg(absolute(&args.backing)?)
        .arg(absolute(&args.mountpoint)?)
        .arg("--foreground")
        .arg("--threads")
        .arg(args.threads.to_string())
        .arg("--check-interval")
        .arg(args.check_interval.to_string())
        .arg("--key-ttl")
        .arg(args.key_ttl.to_string())
        .arg("--key-cache")
        .arg(args.key_cache.to_string());
    if let Some(g) = args.grace {
        cmd.arg("--grace").arg(g.to_string());
    }
    if args.require_mlock {
        cmd.arg("--require-mlock");
    }
    if let Some(a) = &args.audit_log {
        cmd.arg("--audit-log").arg(absolute(a)?);
    }
    for o in &args.options {
        cmd.arg("-o").arg(o);
    }
    use std::os::unix::process::CommandExt;
    let mut child = cmd
        .env(READY_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        // Its own process group: a Ctrl-C in this terminal must not kill the daemon.
        .process_group(0)
        .spawn()
        .map_err(|e| Fatal(format!("cannot start the daemon: {e}")))?;
    let out = child.stdout.take().expect("piped stdout");
    for line in BufReader::new(out).lines() {
        let line = line.unwrap_or_default();
        if line == "READY" {
            return Ok(());
        }
        if let Some(msg) = line.strip_prefix("ERROR: ") {
            let _ = child.wait();
            return Err(Fatal(msg.into()));
        }
    }
    let status = child.wait().map_err(|e| Fatal(e.to_string()))?;
    Err(Fatal(format!(
        "the daemon exited during startup ({status}); see {}",
        log_path.display()
    )))
}

fn mount_foreground(args: MountArgs) -> Result<(), Fatal> {
    let notify = std::env::var_os(READY_ENV).is_some();
    // SAFETY of the environment: removing our own variable before any thread starts.
    let on_ready: Box<dyn FnOnce() + Send> = Box::new(move || {
        log::info!("mount is ready");
        crate::notify::notify("READY=1\nSTATUS=mounted; KMS ok");
        if notify {
            let mut out = std::io::stdout();
            let _ = writeln!(out, "READY");
            let _ = out.flush();
            // The parent stops reading once it has READY; nothing more goes to this pipe.
            if let Ok(null) = std::fs::File::open("/dev/null") {
                use std::os::fd::AsFd;
                let _ = crate::sys::dup2(null.as_fd(), 1);
            }
        }
    });
    let secs = std::time::Duration::from_secs;
    let req = daemon::MountRequest {
        backing: args.backing,
        mountpoint: args.mountpoint,
        options: args.options,
        threads: args.threads,
        on_ready,
        check_interval: secs(args.check_interval.max(1)),
        grace: args.grace.map(secs),
        key_cache_ttl: secs(args.key_ttl),
        key_cache_entries: args.key_cache,
        require_mlock: args.require_mlock,
        audit_log: args.audit_log,
    };
    match daemon::run_mount(req) {
        Ok(daemon::Ended::Unmounted) => Ok(()),
        Ok(daemon::Ended::Locked(why)) => {
            eprintln!("kmsfs: locked: {why}");
            std::process::exit(daemon::EXIT_LOCKED);
        }
        Err(e) => {
            if notify {
                println!("ERROR: {e}");
            }
            if e.0.starts_with(daemon::DENIED_PREFIX) {
                // Revoked before we even mounted: not a failure to retry.
                eprintln!("kmsfs: {e}");
                std::process::exit(daemon::EXIT_LOCKED);
            }
            Err(e)
        }
    }
}

fn status(mountpoint: Option<PathBuf>, as_json: bool) -> Result<(), Fatal> {
    let mounts: Vec<PathBuf> = match mountpoint {
        Some(m) => vec![std::fs::canonicalize(&m).map_err(|e| Fatal(format!("{}: {e}", m.display())))?],
        None => kmsfs_mounts(),
    };
    if mounts.is_empty() {
        return Err(Fatal("no kmsfs mounts".into()));
    }
    let mut all = Vec::new();
    for m in &mounts {
        let v = crate::control::request(m, "status").map_err(|e| {
            Fatal(format!(
                "{}: no answer from the daemon's control socket ({e})",
                m.display()
            ))
        })?;
        all.push(v);
    }
    if as_json {
        println!("{}", serde_json::Value::Array(all));
        return Ok(());
    }
    for v in all {
        let c = &v["counters"];
        println!("{}", v["mountpoint"].as_str().unwrap_or("?"));
        println!(
            "  volume      {} ({})",
            v["volume_id"].as_str().unwrap_or("?"),
            v["backing"].as_str().unwrap_or("?")
        );
        println!(
            "  KMS         {} key {} version {} — {}",
            v["backend"], v["key"], v["key_version"], v["kms_health"]
        );
        println!("  locked      {}", v["locked"].as_str().unwrap_or("no"));
        println!("  uptime      {} s", v["uptime_secs"]);
        println!("  keys cached {}", v["cached_keys"]);
        println!(
            "  KMS calls {} (requests {}), cache hits {} / misses {}, read {} B, written {} B, auth failures {}",
            c["kms_calls"],
            c["kms_requests"],
            c["cache_hits"],
            c["cache_misses"],
            c["bytes_read"],
            c["bytes_written"],
            c["auth_failures"]
        );
    }
    Ok(())
}

/// Mountpoints of live kmsfs mounts (those with a control socket).
fn kmsfs_mounts() -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mp = left.split(' ').nth(4)?;
            right.starts_with("fuse ").then(|| PathBuf::from(mp))
        })
        .filter(|m| crate::control::socket_path(m).exists())
        .collect()
}

/// The systemd unit template, with its binary path to fill in.
pub const SERVICE_TEMPLATE: &str = include_str!("../systemd/kmsfs@.service");
const CONF_EXAMPLE: &str = include_str!("../systemd/kmsfs.conf.example");
const CREDENTIALS_EXAMPLE: &str = include_str!("../systemd/kmsfs@.service.d/credentials.conf.example");

/// The unit template with `kmsfs` at `bin`.
pub fn service_unit(bin: &Path) -> String {
    SERVICE_TEMPLATE.replace("/usr/local/bin/kmsfs", &bin.display().to_string())
}

fn install_units(bin_dir: &Path, root: &Path) -> Result<(), Fatal> {
    use std::os::unix::fs::DirBuilderExt;
    let io = |what: &str, e: std::io::Error| Fatal(format!("install-units: {what}: {e}"));
    let under = |p: &str| root.join(p.trim_start_matches('/'));
    let bin = bin_dir.join("kmsfs");
    let staged_bin = under(&bin.to_string_lossy());
    std::fs::create_dir_all(staged_bin.parent().expect("has a parent")).map_err(|e| io("bin dir", e))?;
    let exe = std::env::current_exe().map_err(|e| io("own executable", e))?;
    if std::fs::canonicalize(&staged_bin).ok() != Some(exe.clone()) {
        let tmp = staged_bin.with_extension("new");
        std::fs::copy(&exe, &tmp).map_err(|e| io("copy binary", e))?;
        std::fs::rename(&tmp, &staged_bin).map_err(|e| io("install binary", e))?;
    }
    for helper in ["sbin/mount.kmsfs", "sbin/mount.fuse.kmsfs"] {
        let link = under(helper);
        std::fs::create_dir_all(link.parent().expect("has a parent")).map_err(|e| io("sbin", e))?;
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&bin, &link).map_err(|e| io(helper, e))?;
    }
    let units = under("etc/systemd/system");
    std::fs::create_dir_all(units.join("kmsfs@.service.d")).map_err(|e| io("unit dir", e))?;
    std::fs::write(units.join("kmsfs@.service"), service_unit(&bin)).map_err(|e| io("unit", e))?;
    std::fs::write(
        units.join("kmsfs@.service.d/credentials.conf.example"),
        CREDENTIALS_EXAMPLE,
    )
    .map_err(|e| io("drop-in example", e))?;
    let etc = under("etc/kmsfs");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(etc.join("credentials"))
        .map_err(|e| io("/etc/kmsfs", e))?;
    let example = etc.join("example.conf.example");
    if !example.exists() {
        std::fs::write(&example, CONF_EXAMPLE).map_err(|e| io("config example", e))?;
    }
    println!(
        "installed {} and mount.kmsfs / mount.fuse.kmsfs helpers",
        bin.display()
    );
    println!("unit: /etc/systemd/system/kmsfs@.service; now:");
    println!("  systemctl daemon-reload");
    println!("  cp /etc/kmsfs/example.conf.example /etc/kmsfs/NAME.conf && $EDITOR /etc/kmsfs/NAME.conf");
    println!("  systemctl enable --now kmsfs@NAME");
    Ok(())
}

fn lock(mountpoint: &Path) -> Result<(), Fatal> {
    let mp =
        std::fs::canonicalize(mountpoint).map_err(|e| Fatal(format!("{}: {e}", mountpoint.display())))?;
    let backing = daemon::backing_of_mount(&mp)
        .ok_or_else(|| Fatal(format!("{} is not a kmsfs mount", mp.display())))?;
    crate::control::request(&mp, "lock").map_err(|e| {
        Fatal(format!(
            "{}: no answer from the daemon's control socket ({e})",
            mp.display()
        ))
    })?;
    if !daemon::wait_for_daemon_exit(&backing) {
        return Err(Fatal(format!(
            "{}: locked, but the daemon has not exited after 30 s",
            mp.display()
        )));
    }
    println!("{} locked: keys dropped, mount gone", mp.display());
    Ok(())
}

fn key(args: KeyArgs) -> Result<(), Fatal> {
    let path = match (args.keystore, args.volume) {
        (Some(k), _) => absolute(&k)?,
        (None, Some(v)) => match daemon::load_config(&v)?.kms {
            KmsConfig::Local { keystore, .. } => keystore,
            KmsConfig::Openbao { key, .. } => {
                return Err(Fatal(format!(
                    "this volume's keys live in OpenBao: manage Transit key {key:?} there (e.g. `bao write -f transit/keys/{key}/rotate`)"
                )));
            }
        },
        (None, None) => return Err(Fatal("give --keystore PATH or --volume BACKING".into())),
    };
    let load = || Keystore::load(&path).map_err(daemon::explain_kms);
    let save = |s: &Keystore| {
        s.save(&path)
            .map_err(|e| Fatal(format!("cannot write keystore {}: {e}", path.display())))
    };
    if let KeyAction::List = args.action {
        for k in &load()?.keys {
            let state = if k.enabled { "enabled" } else { "DISABLED" };
            println!(
                "{}\t{state}\tcurrent version {}\t{} versions",
                k.name,
                k.current().version,
                k.versions.len()
            );
        }
        return Ok(());
    }
    let name = args
        .name
        .ok_or_else(|| Fatal("name the key: `kmsfs key ACTION NAME`".into()))?;
    let mut s = match args.action {
        KeyAction::Create if !path.exists() => Keystore::default(),
        _ => load()?,
    };
    let message = match args.action {
        KeyAction::List => unreachable!("handled above"),
        KeyAction::Create => {
            s.create_key(&name).map_err(Fatal)?;
            format!("created key {name:?} in {}", path.display())
        }
        KeyAction::Rotate => {
            let v = s.rotate(&name).map_err(Fatal)?;
            format!("key {name:?} now at version {v}; new files use it, existing files keep opening")
        }
        KeyAction::Disable => {
            s.set_enabled(&name, false).map_err(Fatal)?;
            format!("key {name:?} disabled: files it wraps no longer open")
        }
        KeyAction::Enable => {
            s.set_enabled(&name, true).map_err(Fatal)?;
            format!("key {name:?} enabled")
        }
    };
    save(&s)?;
    println!("{message}");
    Ok(())
}
