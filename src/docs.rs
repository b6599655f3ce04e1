//! Man pages and shell completions, generated from the clap definitions so they never
//! disagree with the binary: `kmsfs man DIR`, `kmsfs completions SHELL`, and install-units.

use crate::exit::Fatal;
use crate::fatal;
use std::path::Path;

// The command line comes in as `cli` (`Cli::command()`): the CLI calls this module, so this
// module does not name the CLI back.

/// Writes kmsfs.1 and one page per subcommand (kmsfs-mount.1, …) into `dir`.
pub fn man_pages(cli: clap::Command, dir: &Path) -> Result<(), Fatal> {
    std::fs::create_dir_all(dir).map_err(|e| fatal!("cannot create {}: {e}", dir.display()))?;
    clap_mangen::generate_to(cli, dir)
        .map_err(|e| fatal!("cannot write man pages into {}: {e}", dir.display()))
}

/// The completion script for `shell`.
pub fn completions(mut cli: clap::Command, shell: clap_complete::Shell) -> Vec<u8> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cli, "kmsfs", &mut out);
    out
}
