//! `kmsfs mount`: in the foreground (the daemon proper), or daemonised: a child runs the
//! daemon with its log in a file, and the parent returns once the child reports the mount
//! ready (or its one-line error).

use crate::exit::Fatal;
use crate::fatal;
use clap::Args;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Environment variable through which a daemonising `kmsfs mount` asks its child to report
/// readiness (a `READY` or `ERROR: …` line on stdout).
const READY_ENV: &str = "KMSFS_READY_STDOUT";
#[derive(Args)]
pub struct MountArgs {
    pub backing: PathBuf,
    pub mountpoint: PathBuf,
    /// Stay in the foreground and log to stderr.
    #[arg(short, long)]
    pub foreground: bool,
    /// Mount options, comma-separated (ro, allow_other, allow_root, noexec, …).
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Log file of a daemonised mount (default: /var/log/kmsfs/MOUNTPOINT.log).
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    /// FUSE worker threads. None of them waits on the KMS (an open that needs it is parked on
    /// the KMS waiters); more threads than cores still overlap disk waits.
    #[arg(long, default_value_t = 16)]
    pub threads: usize,
    /// Seconds between checks that the KMS still grants access.
    #[arg(long, default_value_t = 30)]
    pub check_interval: u64,
    /// Seconds an unreachable KMS is tolerated before the mount locks (default: the key TTL).
    #[arg(long)]
    pub grace: Option<u64>,
    /// Seconds an unwrapped key stays cached after the KMS gave it.
    #[arg(long, default_value_t = 300)]
    pub key_ttl: u64,
    /// Most unwrapped keys kept cached.
    #[arg(long, default_value_t = crate::fs::DEFAULT_KEY_CACHE)]
    pub key_cache: usize,
    /// Seconds an open or create that needs the KMS waits for it before failing with EIO
    /// (0: as long as the KMS client retries). Other files are served meanwhile.
    #[arg(long, default_value_t = crate::fs::DEFAULT_OPEN_TIMEOUT.as_secs_f64())]
    pub open_timeout: f64,
    /// Keys unwrapped ahead when a directory is listed or its files are opened one after
    /// another: at most this many per pass, only of files the caller could open (0: off).
    #[arg(long, default_value_t = crate::fs::DEFAULT_PREFETCH)]
    pub prefetch: usize,
    /// Refuse to mount if memory cannot be locked against swapping.
    #[arg(long)]
    pub require_mlock: bool,
    /// Append JSON-lines audit events of key operations to this file (also logged).
    #[arg(long)]
    pub audit_log: Option<PathBuf>,
    /// Also send audit events to journald as structured KMSFS_* fields.
    #[arg(long)]
    pub audit_journal: bool,
    /// Access policy (TOML): who may open files, beyond their permissions, and usage guards
    /// (docs/policy.md). SIGHUP or `kmsfs reload` reloads it.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// This machine's record of the volume (which KMS and key), if not in the anchor
    /// directory (/etc/kmsfs/anchors).
    #[arg(long)]
    pub anchor: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464; no authentication).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<std::net::SocketAddr>,
}

fn absolute(p: &Path) -> Result<PathBuf, Fatal> {
    std::path::absolute(p).map_err(|e| fatal!("{}: {e}", p.display()))
}

/// The default log file of a daemonised mount: named like systemd escapes paths (`/` → `-`,
/// a `-` or other special byte → `\xNN`), so `/a-b` and `/a/b` never share one.
fn log_path_for(mountpoint: &Path) -> Result<PathBuf, Fatal> {
    let mp = absolute(mountpoint)?;
    Ok(PathBuf::from("/var/log/kmsfs").join(format!("{}.log", escape_path(&mp))))
}

fn escape_path(p: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let bytes = p.as_os_str().as_bytes();
    let trimmed = bytes.strip_prefix(b"/").unwrap_or(bytes);
    let mut out = String::new();
    for (i, &b) in trimmed.iter().enumerate() {
        match b {
            b'/' => out.push('-'),
            b'.' if i == 0 => out.push_str("\\x2e"),
            b if b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b':' => out.push(b as char),
            b => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out
}

pub fn mount(args: MountArgs) -> Result<(), Fatal> {
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
    let fresh_log = !log_path.exists();
    let log = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(|e| Fatal::new(format!("cannot open log file {}: {e}", log_path.display())))?
    };
    let exe = std::env::current_exe().map_err(|e| Fatal::new(format!("cannot find own executable: {e}")))?;
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
        .arg(args.key_cache.to_string())
        .arg("--open-timeout")
        .arg(args.open_timeout.to_string())
        .arg("--prefetch")
        .arg(args.prefetch.to_string());
    if let Some(g) = args.grace {
        cmd.arg("--grace").arg(g.to_string());
    }
    if args.require_mlock {
        cmd.arg("--require-mlock");
    }
    if let Some(a) = &args.audit_log {
        cmd.arg("--audit-log").arg(absolute(a)?);
    }
    if args.audit_journal {
        cmd.arg("--audit-journal");
    }
    if let Some(p) = &args.policy {
        cmd.arg("--policy").arg(absolute(p)?);
    }
    if let Some(a) = &args.anchor {
        cmd.arg("--anchor").arg(absolute(a)?);
    }
    if let Some(m) = &args.metrics {
        cmd.arg("--metrics").arg(m.to_string());
    }
    for o in &args.options {
        cmd.arg("-o").arg(o);
    }
    use std::os::unix::process::CommandExt;
    let mut child = cmd
        .env(READY_ENV, "1")
        .env(crate::logging::LOG_FILE_ENV, &log_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        // Its own process group: a Ctrl-C in this terminal must not kill the daemon.
        .process_group(0)
        .spawn()
        .map_err(|e| Fatal::new(format!("cannot start the daemon: {e}")))?;
    let out = child.stdout.take().expect("piped stdout");
    for line in BufReader::new(out).lines() {
        let line = line.unwrap_or_default();
        if line == "READY" {
            return Ok(());
        }
        if let Some(msg) = line.strip_prefix("ERROR: ") {
            let _ = child.wait();
            if fresh_log {
                remove_if_only(&log_path, &format!("kmsfs: {msg}"));
            }
            return Err(Fatal::new(msg));
        }
    }
    let status = child.wait().map_err(|e| Fatal::new(e.to_string()))?;
    if fresh_log && remove_if_only(&log_path, "") {
        return Err(fatal!(
            "the daemon exited during startup ({status}) without a word"
        ));
    }
    Err(Fatal::new(format!(
        "the daemon exited during startup ({status}); see {}",
        log_path.display()
    )))
}

/// Removes a log file that a failed start created and that holds nothing but `error` (which
/// the caller prints anyway) or nothing at all: no empty or redundant logs pile up. True if
/// it did.
fn remove_if_only(log: &Path, error: &str) -> bool {
    let redundant = std::fs::read_to_string(log).is_ok_and(|t| t.trim().is_empty() || t.trim() == error);
    redundant && std::fs::remove_file(log).is_ok()
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
    let req = crate::daemon::MountRequest {
        backing: args.backing,
        mountpoint: args.mountpoint,
        options: args.options,
        threads: args.threads,
        on_ready,
        check_interval: secs(args.check_interval.max(1)),
        grace: args.grace.map(secs),
        key_cache_ttl: secs(args.key_ttl),
        key_cache_entries: args.key_cache,
        open_timeout: (args.open_timeout > 0.0)
            .then(|| std::time::Duration::try_from_secs_f64(args.open_timeout).ok())
            .flatten(),
        prefetch: args.prefetch,
        require_mlock: args.require_mlock,
        audit_log: args.audit_log,
        audit_journal: args.audit_journal,
        policy: args.policy,
        anchor: args.anchor,
        metrics: args.metrics,
    };
    match crate::daemon::run_mount(req) {
        Ok(crate::daemon::Ended::Unmounted) => Ok(()),
        Ok(crate::daemon::Ended::Locked(why)) => {
            eprintln!("kmsfs: locked: {why}");
            std::process::exit(crate::exit::LOCKED);
        }
        Err(e) => {
            if notify {
                println!("ERROR: {e}");
            }
            if e.cause == crate::exit::Cause::Denied {
                // Revoked before we even mounted: not a failure to retry.
                eprintln!("kmsfs: {e}");
                std::process::exit(e.exit_code());
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::escape_path;
    use std::path::Path;

    #[test]
    fn log_names_do_not_collide() {
        assert_eq!(escape_path(Path::new("/mnt/a-b")), "mnt-a\\x2db");
        assert_eq!(escape_path(Path::new("/mnt/a/b")), "mnt-a-b");
        assert_eq!(escape_path(Path::new("/srv/my media")), "srv-my\\x20media");
    }
}
