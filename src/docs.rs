//! Man pages and shell completions, generated from the clap definitions so they never
//! disagree with the binary: `kmsfs man DIR`, `kmsfs completions SHELL`, and install-units.

use crate::exit::Fatal;
use crate::fatal;
use clap::CommandFactory;
use std::path::Path;

/// Writes kmsfs.1 and one page per subcommand (kmsfs-mount.1, …) into `dir`.
pub fn man_pages(dir: &Path) -> Result<(), Fatal> {
    std::fs::create_dir_all(dir).map_err(|e| fatal!("cannot create {}: {e}", dir.display()))?;
    clap_mangen::generate_to(crate::cli::Cli::command(), dir)
        .map_err(|e| fatal!("cannot write man pages into {}: {e}", dir.display()))
}

/// The completion script for `shell`.
pub fn completions(shell: clap_complete::Shell) -> Vec<u8> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut crate::cli::Cli::command(), "kmsfs", &mut out);
    out
}
