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
    // Installed as /sbin/mount.kmsfs or /sbin/mount.fuse.kmsfs, we are mount(8)'s helper.
    let argv0 = std::env::args().next().unwrap_or_default();
    let name = std::path::Path::new(&argv0)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("");
    let cli = if name.starts_with("mount.") {
        let args: Vec<String> = std::env::args().skip(1).collect();
        match kmsfs::mount_helper::translate(&args) {
            Ok((args, env_files)) => {
                for f in env_files {
                    if let Err(e) = kmsfs::mount_helper::load_env_file(&f) {
                        eprintln!("{name}: {e}");
                        std::process::exit(1);
                    }
                }
                kmsfs::cli::Cli::parse_from(std::iter::once("kmsfs".to_owned()).chain(args))
            }
            Err(e) => {
                eprintln!("{name}: {e}");
                std::process::exit(1);
            }
        }
    } else {
        kmsfs::cli::Cli::parse()
    };
    if let Err(e) = kmsfs::cli::run(cli) {
        log::debug!("fatal: {e}");
        eprintln!("kmsfs: {e}");
        std::process::exit(kmsfs::exit::FAILURE);
    }
}
