//! Command-line definitions and dispatch.

use crate::exit::Fatal;
use crate::fatal;
use crate::format::config::KmsConfig;
use crate::init::{InitKms, init};
use crate::kms::local::Keystore;
use crate::mount_cmd::MountArgs;
use crate::volume::{Located, explain_kms};
use clap::{Args, CommandFactory, Parser, Subcommand};
use std::path::{Path, PathBuf};

/// The KMS backends this binary speaks, as `init --kms` takes them.
pub const BACKENDS: [&str; 5] = ["local", "openbao", "vault", "aws-kms", "kmip"];

/// `kmsfs --version`: the release, the commit it was built from, and the backends (a literal,
/// checked against [`BACKENDS`] by a test, since `concat!` takes only literals).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("KMSFS_COMMIT"),
    "; KMS backends: local, openbao, vault, aws-kms, kmip)"
);

#[derive(Parser)]
#[command(
    name = "kmsfs",
    version = VERSION,
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
        /// The KMS: `local` (embedded keystore), `openbao` / `vault` (Transit), `aws-kms` or
        /// `kmip`.
        #[arg(long, default_value = "local", value_parser = BACKENDS)]
        kms: String,
        /// OpenBao/Vault URL(s) (default: $BAO_ADDR or $VAULT_ADDR), or KMIP HOST:PORT(s)
        /// (default: $KMSFS_KMIP_ADDR); comma-separated, tried in order.
        #[arg(long)]
        kms_addr: Option<String>,
        /// The Transit key (must be created with derived=true), the AWS KMS key (key id, key
        /// ARN or alias/NAME; region from AWS_REGION or the ARN), or the KMIP key's Name or
        /// Unique Identifier.
        #[arg(long)]
        kms_key: Option<String>,
        /// The Transit mount path.
        #[arg(long, default_value = "transit")]
        kms_mount: String,
        /// Keep file names, symlink targets and xattrs in the clear (contents stay encrypted).
        #[arg(long)]
        plaintext_names: bool,
        /// Plaintext bytes per encrypted block: a power of two from 4K to 1M. 64K suits large
        /// sequential reads (video); 4K suits small random I/O (databases such as SQLite).
        /// Fixed for the volume's life.
        #[arg(long, value_name = "SIZE", default_value = "64K")]
        block_size: String,
    },
    /// Mount a volume; returns once the mount is ready unless --foreground.
    Mount(MountArgs),
    /// Re-wrap every file key (and the name key) under the KMS key's newest version.
    Rewrap {
        backing: PathBuf,
        /// Only count files per key version.
        #[arg(long)]
        dry_run: bool,
        /// One JSON object (versions found, files re-wrapped, failures) on stdout.
        #[arg(long)]
        json: bool,
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
        /// Lay files out as a distribution package does: the unit in /usr/lib/systemd/system,
        /// man pages and completions under /usr/share (for scripts/build-deb).
        #[arg(long)]
        package: bool,
    },
    /// Record on this machine which KMS and key a volume uses (after showing them), for a
    /// volume made elsewhere or before anchors; authenticates its config if it is not yet.
    Anchor {
        backing: PathBuf,
        /// Record the config's settings again although this machine has some.
        #[arg(long)]
        replace: bool,
        /// Record without asking (after checking what it shows); needed when stdin is not a
        /// terminal.
        #[arg(long)]
        yes: bool,
    },
    /// Lock a mount now: drop every key, fail all I/O with ENOKEY, unmount.
    Lock { mountpoint: PathBuf },
    /// Reload a mount's access policy and reopen its audit log (as SIGHUP does); a bad
    /// policy file is refused and the one in force stays.
    Reload { mountpoint: PathBuf },
    /// Write the man pages (kmsfs.1, kmsfs-mount.1, …) into DIR.
    Man { dir: PathBuf },
    /// Print the completion script for SHELL (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Manage keys in a local keystore: list, create, rotate, disable, enable, backup.
    Key(KeyArgs),
}

#[derive(Args)]
struct KeyArgs {
    action: KeyAction,
    /// The key's name (all actions but `list` and `backup`); for `backup`, the file to write.
    #[arg(value_name = "NAME|OUT")]
    name: Option<String>,
    /// The keystore file.
    #[arg(long, conflicts_with = "volume")]
    keystore: Option<PathBuf>,
    /// A volume's backing directory: use the keystore this machine's settings for it (the
    /// anchor) name, never the one its config in the backing directory names.
    #[arg(long)]
    volume: Option<PathBuf>,
    /// `list` only: one JSON object on stdout.
    #[arg(long)]
    json: bool,
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
    /// Copy the keystore to OUT (mode 600) and list the key versions the copy holds.
    Backup,
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
            block_size,
        } => {
            // Checked before anything is made (clap's own errors take three lines).
            let layout = crate::format::block::parse_block_size(&block_size).map_err(Fatal::new)?;
            let kms = match kms.as_str() {
                "local" => InitKms::Local { keystore, key },
                "kmip" => InitKms::Kmip {
                    addrs: kms_addr
                        .or_else(|| std::env::var(crate::kms::kmip::ADDR_VAR).ok())
                        .ok_or_else(|| Fatal::new("give --kms-addr HOST:5696 (or set KMSFS_KMIP_ADDR)"))?,
                    key: kms_key.ok_or_else(|| Fatal::new("give --kms-key NAME: the KMIP key to use"))?,
                },
                "aws-kms" => InitKms::AwsKms {
                    key: kms_key.ok_or_else(|| {
                        Fatal::new("give --kms-key KEY: the AWS KMS key id, key ARN or alias/NAME")
                    })?,
                },
                _ => InitKms::OpenBao {
                    addrs: kms_addr
                        .or_else(|| std::env::var("BAO_ADDR").ok())
                        .or_else(|| std::env::var("VAULT_ADDR").ok())
                        .ok_or_else(|| Fatal::new("give --kms-addr URL (or set BAO_ADDR)"))?,
                    key: kms_key.ok_or_else(|| Fatal::new("give --kms-key NAME: the Transit key to use"))?,
                    mount: kms_mount,
                },
            };
            init(&backing, kms, plaintext_names, layout)
        }
        Cmd::Rewrap {
            backing,
            dry_run,
            json,
        } => crate::rewrap::run(&backing, dry_run, json),
        Cmd::Fsck {
            backing,
            json,
            repair,
        } => fsck(&backing, crate::fsck::Options { json, repair }),
        Cmd::Mount(args) => crate::mount_cmd::mount(args),
        Cmd::Unmount { mountpoint, lazy } => crate::unmount::unmount(&mountpoint, lazy),
        Cmd::Status { mountpoint, json } => status(mountpoint, json),
        Cmd::Lock { mountpoint } => lock(&mountpoint),
        Cmd::Reload { mountpoint } => reload(&mountpoint),
        Cmd::InstallUnits {
            bin_dir,
            root,
            package,
        } => {
            let layout = if package {
                &crate::install::PACKAGE
            } else {
                &crate::install::LOCAL
            };
            crate::install::install_units(&bin_dir, &root, layout, Cli::command())
        }
        Cmd::Key(args) => key(args),
        Cmd::Anchor {
            backing,
            replace,
            yes,
        } => crate::init::anchor(&backing, replace, yes),
        Cmd::Man { dir } => crate::docs::man_pages(Cli::command(), &dir),
        Cmd::Completions { shell } => {
            use std::io::Write;
            std::io::stdout()
                .write_all(&crate::docs::completions(Cli::command(), shell))
                .map_err(|e| fatal!("cannot write the completions: {e}"))
        }
    }
}

/// fsck has its own exit statuses: problems found is not the same failure as no check at all.
fn fsck(backing: &Path, opts: crate::fsck::Options) -> Result<(), Fatal> {
    match crate::fsck::run(backing, opts) {
        Ok(true) => Ok(()),
        Ok(false) => std::process::exit(crate::exit::FSCK_PROBLEMS),
        Err(e) => {
            eprintln!("kmsfs: {e}");
            std::process::exit(crate::exit::FSCK_FATAL);
        }
    }
}

fn status(mountpoint: Option<PathBuf>, as_json: bool) -> Result<(), Fatal> {
    let listing = mountpoint.is_none();
    let mounts: Vec<PathBuf> = match mountpoint {
        // Never a call on the mountpoint itself: it would wait for a busy daemon.
        Some(m) => vec![
            crate::mountinfo::resolve_mountpoint(&m)
                .map_err(|e| Fatal::new(format!("{}: {e}", m.display())))?,
        ],
        None => kmsfs_mounts(),
    };
    if mounts.is_empty() {
        return Err(Fatal::new("no kmsfs mounts"));
    }
    let mut all = Vec::new();
    let mut silent = Vec::new();
    for (m, asked) in mounts.iter().zip(ask_all(&mounts, listing)) {
        match asked {
            Asked::Answer(v) => all.push(v),
            Asked::Gone => {}
            Asked::Silent(e) => {
                let why = silence(&e);
                if !listing {
                    return Err(Fatal::new(format!("{}: {why}", m.display())));
                }
                all.push(serde_json::json!({ "mountpoint": m, "error": why }));
                silent.push(m.display().to_string());
            }
        }
    }
    // Every answer is printed before a silent daemon fails the command: one hung mount must
    // not hide the state of the others.
    let done = || match silent.len() {
        0 => Ok(()),
        _ => Err(Fatal::new(format!(
            "{} did not answer: its entry says why",
            silent.join(", ")
        ))),
    };
    if as_json {
        println!("{}", serde_json::Value::Array(all));
        return done();
    }
    for v in &all {
        if let Some(e) = v["error"].as_str() {
            println!("{}", v["mountpoint"].as_str().unwrap_or("?"));
            println!("  state       {e}");
            continue;
        }
        let c = &v["counters"];
        // Strings as text, numbers as numbers: no JSON quotes in the human form.
        let t = |x: &serde_json::Value| match x {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => "?".into(),
            other => other.to_string(),
        };
        println!("{}", v["mountpoint"].as_str().unwrap_or("?"));
        println!(
            "  volume      {} ({})",
            v["volume_id"].as_str().unwrap_or("?"),
            v["backing"].as_str().unwrap_or("?")
        );
        if let Some(bs) = v["block_size"].as_u64() {
            println!("  block size  {}", crate::format::block::human_block_size(bs));
        }
        println!(
            "  KMS         {} key {} version {} — {}",
            t(&v["backend"]),
            t(&v["key"]),
            t(&v["key_version"]),
            t(&v["kms_health"])
        );
        for node in v["kms_set_aside"].as_array().into_iter().flatten() {
            println!(
                "  set aside   KMS node {} ({}; asked again in {} s)",
                t(&node["addr"]),
                t(&node["why"]),
                t(&node["secs_left"])
            );
        }
        println!("  locked      {}", v["locked"].as_str().unwrap_or("no"));
        println!("  uptime      {} s", v["uptime_secs"]);
        println!("  keys cached {}", v["cached_keys"]);
        println!(
            "  KMS calls {} (requests {}), cache hits {} / misses {} ({} joined a call in flight), read {} B, written {} B, auth failures {}",
            c["kms_calls"],
            c["kms_requests"],
            c["cache_hits"],
            c["cache_misses"],
            c["kms_joined"],
            c["bytes_read"],
            c["bytes_written"],
            c["auth_failures"]
        );
        let f = &c["page_fill"];
        if f.is_object() {
            println!(
                "  page fill   {} blocks stored in the page cache, {} voided (opened for writing or truncated since the read), {} dropped",
                f["stored"], f["voided"], f["dropped"]
            );
        }
        let p = &v["policy"];
        if p.is_object() {
            println!(
                "  policy      {} ({} rules, {} guards, loaded {}): {} denials, {} alerts, {} identities restricted",
                t(&p["file"]),
                p["rules"],
                p["guards"],
                t(&p["loaded"]),
                p["denials"],
                p["alerts"],
                p["restricted"].as_array().map_or(0, Vec::len)
            );
        }
    }
    done()
}

/// What a control socket's silence means, in words an admin can act on.
fn silence(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound => {
            "the daemon is gone (nothing listens on its control socket): `umount` the dead mount".into()
        }
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            "the daemon did not answer within 5 s (stopped or wedged): see its log".into()
        }
        _ => format!("no answer from the daemon's control socket ({e})"),
    }
}

/// Asks every daemon at once, each on its own thread, and gives each at most 7 s: a frozen
/// daemon whose listen queue is full blocks even the connect, and N of them must not cost N
/// times the wait. A thread still blocked then is left behind (the command is about to exit).
fn ask_all(mounts: &[PathBuf], listing: bool) -> Vec<Asked> {
    let (tx, rx) = std::sync::mpsc::channel();
    for (i, m) in mounts.iter().enumerate() {
        let (tx, m) = (tx.clone(), m.clone());
        std::thread::spawn(move || {
            let _ = tx.send((i, ask_status(&m, listing)));
        });
    }
    drop(tx);
    let mut answers: Vec<Option<Asked>> = mounts.iter().map(|_| None).collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(7);
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok((i, a)) => answers[i] = Some(a),
            Err(_) => break,
        }
    }
    answers
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Asked::Silent(std::io::ErrorKind::TimedOut.into())))
        .collect()
}

enum Asked {
    Answer(serde_json::Value),
    /// The mount left the table while we asked: a daemon that was stopping, not a problem.
    Gone,
    Silent(std::io::Error),
}

/// Asks one daemon for its status. When listing every mount, a daemon that does not answer
/// is asked again for up to a second, for it may be stopping: a mount that has left the
/// table by then is skipped rather than failing the whole listing.
fn ask_status(m: &Path, listing: bool) -> Asked {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        match crate::control::request(m, "status") {
            Ok(v) => return Asked::Answer(v),
            Err(_) if listing && !crate::mountinfo::fuse_mountpoints().iter().any(|x| x == m) => {
                return Asked::Gone;
            }
            Err(e) if !listing || std::time::Instant::now() >= deadline => return Asked::Silent(e),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    }
}

fn reload(mountpoint: &Path) -> Result<(), Fatal> {
    let mp = crate::mountinfo::resolve_mountpoint(mountpoint)
        .map_err(|e| Fatal::new(format!("{}: {e}", mountpoint.display())))?;
    let v = crate::control::request(&mp, "reload").map_err(|e| {
        Fatal::new(format!(
            "{}: no answer from the daemon's control socket ({e})",
            mp.display()
        ))
    })?;
    if let Some(e) = v["error"].as_str() {
        return Err(Fatal::new(format!("{}: policy not reloaded: {e}", mp.display())));
    }
    match &v["policy"] {
        serde_json::Value::Null => println!("{}: no policy (audit log reopened)", mp.display()),
        p => println!(
            "{}: policy reloaded: {} rules, {} guards",
            mp.display(),
            p["rules"],
            p["guards"]
        ),
    }
    Ok(())
}

/// Mountpoints of live kmsfs mounts (those with a control socket).
fn kmsfs_mounts() -> Vec<PathBuf> {
    crate::mountinfo::fuse_mountpoints()
        .into_iter()
        .filter(|m| crate::control::socket_path(m).exists())
        .collect()
}

/// The systemd unit template, with its binary path to fill in.
/// Locks a mount: returns once the daemon says every key is gone and all I/O is refused,
/// and waits a moment for the daemon to exit (files held open keep the detached mount alive
/// for up to 2 s more; the daemon then aborts the connection and exits).
fn lock(mountpoint: &Path) -> Result<(), Fatal> {
    // Never a call on the mountpoint itself: it would wait for a busy daemon.
    let mp = crate::mountinfo::resolve_mountpoint(mountpoint)
        .map_err(|e| Fatal::new(format!("{}: {e}", mountpoint.display())))?;
    let backing = crate::mountinfo::backing_of_mount(&mp)
        .ok_or_else(|| Fatal::new(format!("{} is not a kmsfs mount", mp.display())))?;
    let answer = crate::control::request(&mp, "lock");
    match &answer {
        Ok(v) if v["locked"] == true => {}
        Ok(v) => {
            return Err(Fatal::new(format!(
                "{}: the daemon did not lock: {}",
                mp.display(),
                v["error"].as_str().unwrap_or("unexpected answer")
            )));
        }
        // Connected and asked, but no answer: a lock already under way may end the daemon
        // first. Its exit is the answer.
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            if !crate::unmount::wait_for_daemon_exit(&backing) {
                return Err(Fatal::new(format!(
                    "{}: no answer to the lock, and the daemon has not exited after 30 s",
                    mp.display()
                )));
            }
        }
        Err(e) => {
            return Err(Fatal::new(format!(
                "{}: no answer from the daemon's control socket ({e})",
                mp.display()
            )));
        }
    }
    if crate::unmount::wait_for_daemon_exit_within(&backing, std::time::Duration::from_millis(250)) {
        println!("{} locked: keys dropped, mount gone", mp.display());
    } else {
        println!(
            "{} locked: keys dropped, all I/O refused; the mount goes once its daemon exits (within seconds)",
            mp.display()
        );
    }
    Ok(())
}

fn key(args: KeyArgs) -> Result<(), Fatal> {
    let volume_hint = match &args.volume {
        Some(v) => format!("--volume {}", v.display()),
        None => "--keystore PATH".into(),
    };
    let backing = args.volume.clone();
    let path = match (args.keystore, args.volume) {
        (Some(k), _) => std::path::absolute(&k).map_err(|e| fatal!("{}: {e}", k.display()))?,
        // Found as every command finds a volume: a config that points at a keystore planted
        // in the backing directory is refused here too.
        (None, Some(v)) => match Located::find(&v)?.kms {
            KmsConfig::Local { keystore, .. } => keystore,
            KmsConfig::Openbao { key, .. } => {
                return Err(Fatal::new(format!(
                    "this volume's keys live in OpenBao: manage Transit key {key:?} there (e.g. `bao write -f transit/keys/{key}/rotate`)"
                )));
            }
            KmsConfig::Kmip { key, .. } => {
                return Err(Fatal::new(format!(
                    "this volume's keys live in a KMIP key manager: manage key {key:?} there (rotate: a new key object of that name, `kmsfs rewrap`, then deactivate the old one)"
                )));
            }
            KmsConfig::AwsKms { key, region } => {
                return Err(Fatal::new(format!(
                    "this volume's keys live in AWS KMS: manage key {key:?} in {region} there (e.g. `aws kms rotate-key-on-demand --key-id ...`), then run `kmsfs rewrap`"
                )));
            }
        },
        (None, None) => return Err(Fatal::new("give --keystore PATH or --volume BACKING")),
    };
    let load = || Keystore::load(&path).map_err(explain_kms);
    let save = |s: &Keystore| {
        s.save(&path)
            .map_err(|e| Fatal::new(format!("cannot write keystore {}: {e}", path.display())))
    };
    if let KeyAction::List = args.action {
        return crate::key_list::list(&path, args.json);
    }
    if args.json {
        return Err(Fatal::new("--json goes with `kmsfs key list` only; drop it"));
    }
    if let KeyAction::Backup = args.action {
        let out = args
            .name
            .ok_or_else(|| Fatal::new("name the backup file: `kmsfs key backup --volume BACKING OUT`"))?;
        return crate::key_backup::backup(&path, Path::new(&out), backing.as_deref());
    }
    let name = args
        .name
        .ok_or_else(|| Fatal::new("name the key: `kmsfs key ACTION NAME`"))?;
    let mut s = match args.action {
        KeyAction::Create if !path.exists() => Keystore::default(),
        _ => load()?,
    };
    let message = match args.action {
        KeyAction::List | KeyAction::Backup => unreachable!("handled above"),
        KeyAction::Create => {
            s.create_key(&name).map_err(Fatal::new)?;
            format!("created key {name:?} in {}", path.display())
        }
        KeyAction::Rotate => {
            let v = s.rotate(&name).map_err(Fatal::new)?;
            format!(
                "key {name:?} now at version {v}; new files use it, existing files keep opening\n{}",
                crate::key_backup::new_backup_needed(v, &volume_hint)
            )
        }
        KeyAction::Disable => {
            s.set_enabled(&name, false).map_err(Fatal::new)?;
            format!("key {name:?} disabled: files it wraps no longer open")
        }
        KeyAction::Enable => {
            s.set_enabled(&name, true).map_err(Fatal::new)?;
            format!("key {name:?} enabled")
        }
    };
    save(&s)?;
    println!("{message}");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_version_names_every_backend() {
        let listed = super::VERSION
            .split("KMS backends: ")
            .nth(1)
            .unwrap()
            .trim_end_matches(')');
        assert_eq!(listed, super::BACKENDS.join(", "));
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
