use clap::Parser;

fn main() {
    let env = env_logger::Env::new().filter_or("KMSFS_LOG", "info,fuser=error");
    env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .init();
    let cli = kmsfs::cli::Cli::parse();
    if let Err(e) = kmsfs::cli::run(cli) {
        log::debug!("fatal: {e}");
        eprintln!("kmsfs: {e}");
        std::process::exit(1);
    }
}
