use clap::Parser;

fn main() {
    kmsfs::logging::init();
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
