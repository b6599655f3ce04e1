//! `kmsfs fsck BACKING`: a read-only check of a whole volume, unmounted or alongside a live
//! mount (it never takes the daemon's lock and never writes, unless `--repair`).
//!
//! It checks that the config decodes; every name decrypts under its directory's id, every
//! directory has its id file, long names have their sidecars and no sidecar or temporary entry
//! is left over, symlink targets decrypt (`tree`); every content file's header and both key
//! slots, that its key unwraps through the KMS under its file id, and that every block opens
//! (`content`). It prints one line per problem, by backing path, file id and block index
//! (never a plaintext name, never a key), and a summary (`report`). `--repair` moves what
//! the mount cannot read into `kmsfs.lost+found/` with a report, and deletes nothing (`repair`).
//!
//! Exit status: 0 clean (notices of crash leftovers allowed: temporary entries, orphan sidecars,
//! torn tails, empty directories without their id), [`crate::exit::FSCK_PROBLEMS`] if problems
//! were found (repaired or not),
//! [`crate::exit::FSCK_FATAL`] if the check could not run (no config, KMS refused or unreachable, volume
//! mounted under `--repair`).

mod content;
mod repair;
mod report;
mod tree;

use crate::exit::Fatal;
use crate::format::config::NamesConfig;
use crate::fs::names::Names;
use crate::volume::Located;
use report::{Progress, Report, Show, Summary};
use std::io::Write;
use std::path::Path;

/// What `kmsfs fsck` was asked to do.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// One JSON object on stdout instead of lines.
    pub json: bool,
    /// Move unreadable entries into lost+found (the volume must not be mounted).
    pub repair: bool,
}

/// Checks (and with `--repair`, repairs) the volume in `backing`, prints the report on stdout,
/// and returns whether it was clean.
pub fn run(backing: &Path, opts: Options) -> Result<bool, Fatal> {
    // The verdicts below decide what --repair moves: they must come from the volume's own KMS,
    // not from a keystore planted next to the data (`Located::find` checks that).
    let located = Located::find(backing)?;
    let root = located.backing.clone();
    let _lock = if opts.repair {
        Some(repair::lock(&root)?)
    } else {
        None
    };
    let rt = crate::volume::cli_runtime()?;
    let volume = located.connect(rt.handle())?;
    volume.check_access(&rt)?;
    let names = volume.names(&rt)?;
    let config = &volume.config;
    let show = Show {
        names_encrypted: matches!(config.names, NamesConfig::Encrypted { .. }),
    };
    debug_assert_eq!(show.names_encrypted, matches!(names, Names::Encrypted { .. }));

    let mut progress = Progress::new();
    let tree = tree::walk(&root, &names, &mut progress);
    let mut summary = Summary {
        dirs: tree.dirs,
        symlinks: tree.symlinks,
        other: tree.other,
        ..Summary::default()
    };
    let mut problems = tree.problems;
    let ids = content::ContentCheck {
        root: &root,
        volume: &volume,
        rt: &rt,
        summary: &mut summary,
        problems: &mut problems,
        progress: &mut progress,
        names: names.cipher(),
    }
    .run(&tree.files);
    progress.clear();
    let ids = ids?;
    // Name problems of regular files: the file id lets an admin match them with the logs.
    for p in &mut problems {
        if p.file_id.is_none() {
            p.file_id = ids.get(&p.path).copied();
        }
    }
    problems.sort_by(|a, b| (&a.path, a.blocks, a.kind).cmp(&(&b.path, b.blocks, b.kind)));

    let moved = if opts.repair {
        Some(repair::quarantine(&root, &problems, show.names_encrypted)?)
    } else {
        None
    };
    let report = Report {
        volume_id: &config.volume_id,
        format_version: config.format_version,
        summary: &summary,
        problems: &problems,
        moved: moved.as_deref(),
        show,
    };
    let mut out = std::io::stdout().lock();
    let written = if opts.json {
        writeln!(out, "{}", report.to_json())
    } else {
        report.write_text(&mut out)
    };
    written
        .and_then(|()| out.flush())
        .map_err(|e| crate::fatal!("cannot write the report: {e}"))?;
    Ok(!report::any_damage(&problems))
}
