//! The log: records to stderr, with a journald priority and no timestamp of our own when
//! stderr is the journal (systemd's `JOURNAL_STREAM`; the journal stamps each line itself, and
//! `journalctl -p err` filters on the priority), with one timestamp otherwise. A daemonised
//! mount's stderr is its log file, which [`reopen_logs`] opens again after a rotation.

use std::io::Write;
use std::os::unix::fs::MetadataExt;

/// The environment variable through which a daemonising `kmsfs mount` tells its child where
/// its log file is, so that [`reopen_logs`] can open it again.
pub const LOG_FILE_ENV: &str = "KMSFS_LOG_FILE";

/// Drops other crates' log records below error level, whatever KMSFS_LOG asks for: fuser's
/// debug output carries file names, and names must never reach our log.
struct NoNames(env_logger::Logger);

impl log::Log for NoNames {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        let target = metadata.target();
        // Certificate failures come back to us as errors and are reported in one line.
        if target.starts_with("rustls") {
            return false;
        }
        let ours = target.starts_with("kmsfs");
        (ours || metadata.level() <= log::Level::Error) && self.0.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            self.0.log(record);
        }
    }

    fn flush(&self) {
        self.0.flush();
    }
}

/// True if stderr is the stream systemd connected to the journal: `JOURNAL_STREAM` holds its
/// `DEVICE:INODE` (systemd.exec(5)); a child whose stderr was redirected elsewhere inherits the
/// variable but not the stream, hence the comparison.
fn stderr_is_journal() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

/// sd-daemon(3)'s priority prefix for a level.
pub fn priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

/// Installs the logger (level from `KMSFS_LOG`, default info).
pub fn init() {
    let env = env_logger::Env::new().filter_or("KMSFS_LOG", "info");
    let mut builder = env_logger::Builder::from_env(env);
    if stderr_is_journal() {
        builder.format(|buf, record| writeln!(buf, "<{}>{}", priority(record.level()), record.args()));
    } else {
        builder.format_timestamp_millis();
    }
    let logger = builder.build();
    log::set_max_level(logger.filter());
    let _ = log::set_boxed_logger(Box::new(NoNames(logger)));
}

/// Opens a daemonised mount's log file again (after logrotate moved it away) and points
/// stderr, where every record goes, at it. A no-op for a mount that logs to a terminal or the
/// journal. For the SIGHUP handler to call; until it does, the logrotate snippet uses
/// copytruncate, which needs no reopen.
pub fn reopen_logs() {
    let Some(path) = std::env::var_os(LOG_FILE_ENV) else {
        return;
    };
    use std::os::unix::fs::OpenOptionsExt;
    let opened = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&path);
    let result = opened.and_then(|f| crate::sys::dup2(std::os::fd::AsFd::as_fd(&f), 2));
    match result {
        Ok(()) => log::info!("log file reopened"),
        Err(e) => log::error!(
            "cannot reopen the log file {}: {e}; logging on to the old one",
            std::path::Path::new(&path).display()
        ),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn priorities_are_sd_daemons() {
        assert_eq!(super::priority(log::Level::Error), 3);
        assert_eq!(super::priority(log::Level::Warn), 4);
        assert_eq!(super::priority(log::Level::Info), 6);
        assert_eq!(super::priority(log::Level::Debug), 7);
    }
}
