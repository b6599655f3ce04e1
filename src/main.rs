use clap::Parser;

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

fn main() {
    let env = env_logger::Env::new().filter_or("KMSFS_LOG", "info");
    let logger = env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .build();
    log::set_max_level(logger.filter());
    let _ = log::set_boxed_logger(Box::new(NoNames(logger)));
    let cli = kmsfs::cli::Cli::parse();
    if let Err(e) = kmsfs::cli::run(cli) {
        log::debug!("fatal: {e}");
        eprintln!("kmsfs: {e}");
        std::process::exit(1);
    }
}
