//! What fsck found and how it is shown: one line per problem (backing path, file id, block),
//! a summary, `--json`, and a progress line on a terminal. Messages are built from fixed text,
//! numbers and ids only: never from a plaintext name, never from key material. On a volume
//! with plaintext names the backing path *is* the name, so entries are shown by inode number.

use crate::format::FileId;
pub use crate::progress::Progress;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The report of moves `--repair` writes, inside lost+found.
pub const REPORT_FILE: &str = "report.jsonl";

/// The repair report file, relative to the backing root.
pub fn report_path() -> PathBuf {
    Path::new(crate::format::config::LOST_FOUND_NAME).join(REPORT_FILE)
}

/// What kind of damage a problem is; the `kind` field of `--json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// The header does not parse: truncated, bad magic, unknown version, no intact key slot.
    Header,
    /// The slot not in use is damaged; the file still opens from the other one.
    KeySlot,
    /// The wrapped key does not unwrap under this file's id.
    Key,
    /// One or more blocks fail authentication.
    Block,
    /// The backing length is not the length of any valid file, and no whole record precedes
    /// the torn bytes (a first write cut short, or a truncation).
    Length,
    /// Torn bytes after the last whole record: an extension cut short by a crash.
    TornTail,
    /// Another file has the same file id.
    DuplicateId,
    /// An entry name does not decrypt under its directory's id.
    Name,
    /// A long name's sidecar is missing or does not match its entry.
    Sidecar,
    /// A sidecar whose entry is gone.
    OrphanSidecar,
    /// A temporary entry left by an interrupted create.
    Temp,
    /// A directory's id file is missing or damaged.
    DirId,
    /// An empty directory without its id file: an rmdir cut short (the mount gives it a new id).
    EmptyDirWithoutId,
    /// A symlink target does not decrypt.
    Symlink,
    /// A `user.` extended attribute's name or value does not decrypt for its file (altered,
    /// or copied from another file). Reported only: the file's content is not at fault.
    Xattr,
    /// The backing entry could not be read at all.
    Unreadable,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Header => "header",
            Kind::KeySlot => "key-slot",
            Kind::Key => "key",
            Kind::Block => "block",
            Kind::Length => "length",
            Kind::TornTail => "torn-tail",
            Kind::DuplicateId => "duplicate-file-id",
            Kind::Name => "name",
            Kind::Sidecar => "sidecar",
            Kind::OrphanSidecar => "orphan-sidecar",
            Kind::Temp => "temp-entry",
            Kind::DirId => "dir-id",
            Kind::EmptyDirWithoutId => "empty-dir-without-id",
            Kind::Symlink => "symlink",
            Kind::Xattr => "xattr",
            Kind::Unreadable => "unreadable",
        }
    }

    /// What an interrupted operation leaves behind on an untampered volume (a crash, a power
    /// cut): reported as a notice, which alone does not fail the check. The mount reads
    /// around all of them.
    pub fn is_notice(self) -> bool {
        matches!(
            self,
            Kind::Temp | Kind::OrphanSidecar | Kind::TornTail | Kind::EmptyDirWithoutId
        )
    }
}

/// One thing wrong with one backing entry.
#[derive(Debug, Clone)]
pub struct Problem {
    /// The entry's backing path, relative to the backing root ("" is the root).
    pub path: PathBuf,
    pub inode: u64,
    pub file_id: Option<FileId>,
    /// First and last block, for block problems.
    pub blocks: Option<(u64, u64)>,
    pub kind: Kind,
    /// What is wrong; never holds a name.
    pub message: String,
    /// Backing paths (relative) that `--repair` moves into lost+found; empty: report only.
    pub quarantine: Vec<PathBuf>,
}

impl Problem {
    pub fn new(path: &Path, inode: u64, kind: Kind, message: impl Into<String>) -> Self {
        Problem {
            path: path.to_path_buf(),
            inode,
            file_id: None,
            blocks: None,
            kind,
            message: message.into(),
            quarantine: Vec::new(),
        }
    }

    /// `--repair` moves this entry (and `also`, e.g. its sidecar) into lost+found.
    pub fn quarantine(mut self, also: &[PathBuf]) -> Self {
        self.quarantine.push(self.path.clone());
        self.quarantine.extend_from_slice(also);
        self
    }
}

/// An entry `--repair` moved, or failed to move.
#[derive(Debug, Clone)]
pub struct Moved {
    pub from: PathBuf,
    pub inode: u64,
    /// Relative to the backing root; the error if the move failed.
    pub to: Result<PathBuf, String>,
}

/// Counts for the summary line.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    /// Directories, the root included.
    pub dirs: u64,
    /// Regular files (each hard-linked file once).
    pub files: u64,
    pub symlinks: u64,
    /// FIFOs, sockets, devices.
    pub other: u64,
    /// Blocks checked, holes included.
    pub blocks: u64,
    pub holes: u64,
    /// Plaintext bytes checked.
    pub bytes: u64,
    /// Files that kept changing while checked (written through a live mount): not judged.
    pub in_use: u64,
}

/// How entries are named in the output.
#[derive(Debug, Clone, Copy)]
pub struct Show {
    /// Backing paths are encrypted and may be printed; otherwise entries go by inode.
    pub names_encrypted: bool,
}

impl Show {
    pub fn entry(self, path: &Path, inode: u64) -> String {
        if !self.names_encrypted {
            return format!("inode {inode}");
        }
        if path.as_os_str().is_empty() {
            return "(root)".into();
        }
        path.to_string_lossy().into_owned()
    }

    fn path_json(self, path: &Path) -> serde_json::Value {
        if self.names_encrypted {
            serde_json::Value::String(path.to_string_lossy().into_owned())
        } else {
            serde_json::Value::Null
        }
    }
}

fn blocks_text(blocks: Option<(u64, u64)>) -> Option<String> {
    match blocks? {
        (a, b) if a == b => Some(format!("block {a}")),
        (a, b) => Some(format!("blocks {a}-{b}")),
    }
}

/// One problem as a line: `PATH (file ID, block N): what is wrong`.
pub fn problem_line(p: &Problem, show: Show) -> String {
    let mut tags = Vec::new();
    if let Some(id) = p.file_id {
        tags.push(format!("file {id}"));
    }
    tags.extend(blocks_text(p.blocks));
    let tags = if tags.is_empty() {
        String::new()
    } else {
        format!(" ({})", tags.join(", "))
    };
    let notice = if p.kind.is_notice() { "notice: " } else { "" };
    format!("{notice}{}{tags}: {}", show.entry(&p.path, p.inode), p.message)
}

/// Whether any of `problems` is more than a crash leftover.
pub fn any_damage(problems: &[Problem]) -> bool {
    problems.iter().any(|p| !p.kind.is_notice())
}

/// Bytes for people: "1.0 MiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} bytes")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Everything fsck has to say, ready to print.
pub struct Report<'a> {
    pub volume_id: &'a str,
    pub format_version: u16,
    pub summary: &'a Summary,
    pub problems: &'a [Problem],
    /// `Some` when `--repair` ran.
    pub moved: Option<&'a [Moved]>,
    pub show: Show,
}

impl Report<'_> {
    fn damage(&self) -> u64 {
        self.problems.iter().filter(|p| !p.kind.is_notice()).count() as u64
    }

    fn repairable(&self) -> usize {
        self.problems.iter().filter(|p| !p.quarantine.is_empty()).count()
    }

    pub fn write_text(&self, out: &mut impl Write) -> std::io::Result<()> {
        for p in self.problems {
            writeln!(out, "{}", problem_line(p, self.show))?;
        }
        let s = self.summary;
        let mut line = format!(
            "volume {}: {}, {}, {}, {} other; {} ({} holes), {} checked; {}",
            self.volume_id,
            plural(s.dirs, "dir", "dirs"),
            plural(s.files, "file", "files"),
            plural(s.symlinks, "symlink", "symlinks"),
            s.other,
            plural(s.blocks, "block", "blocks"),
            s.holes,
            human_bytes(s.bytes),
            plural(self.damage(), "problem", "problems"),
        );
        let notices = self.problems.len() as u64 - self.damage();
        if notices > 0 {
            line += &format!(
                ", {} (left by a crash or power cut; harmless)",
                plural(notices, "notice", "notices")
            );
        }
        if s.in_use > 0 {
            line += &format!(
                "; {} changing while checked (in use on a live mount) not judged",
                plural(s.in_use, "file", "files")
            );
        }
        writeln!(out, "{line}")?;
        if self.format_version == crate::format::VOLUME_FORMAT_V1 && self.show.names_encrypted {
            writeln!(
                out,
                "volume format 1: symlink targets and xattr values are bound to the volume only, not to their \
                 directory and file; a volume made by `kmsfs init` now binds them (docs/format.md, \"Volume formats\")"
            )?;
        }
        match self.moved {
            None if self.repairable() > 0 => writeln!(
                out,
                "{} can be moved into {}/ with `kmsfs fsck --repair` (unmounted; nothing is deleted)",
                plural(self.repairable() as u64, "entry", "entries"),
                crate::format::config::LOST_FOUND_NAME
            )?,
            None => {}
            Some(moved) => {
                let mut ok = 0;
                for m in moved {
                    let from = self.show.entry(&m.from, m.inode);
                    match &m.to {
                        Ok(to) => {
                            ok += 1;
                            writeln!(out, "moved {from} -> {}", to.display())?;
                        }
                        Err(e) => writeln!(out, "cannot move {from}: {e}")?,
                    }
                }
                writeln!(
                    out,
                    "repair: moved {} into {}/ (see {}); nothing was deleted",
                    plural(ok, "entry", "entries"),
                    crate::format::config::LOST_FOUND_NAME,
                    report_path().display()
                )?;
            }
        }
        Ok(())
    }

    pub fn to_json(&self) -> serde_json::Value {
        let s = self.summary;
        let problems: Vec<serde_json::Value> = self
            .problems
            .iter()
            .map(|p| {
                serde_json::json!({
                    "kind": p.kind.as_str(),
                    "severity": if p.kind.is_notice() { "notice" } else { "problem" },
                    "path": self.show.path_json(&p.path),
                    "inode": p.inode,
                    "file_id": p.file_id.map(|id| id.to_string()),
                    "block": p.blocks.map(|b| b.0),
                    "last_block": p.blocks.map(|b| b.1),
                    "message": p.message,
                    "repair": if p.quarantine.is_empty() { "none" } else { "quarantine" },
                })
            })
            .collect();
        let moved = self.moved.map(|moved| {
            moved
                .iter()
                .map(|m| {
                    serde_json::json!({
                        "path": self.show.path_json(&m.from),
                        "inode": m.inode,
                        "moved_to": m.to.as_ref().ok().map(|p| p.to_string_lossy().into_owned()),
                        "error": m.to.as_ref().err(),
                    })
                })
                .collect::<Vec<_>>()
        });
        serde_json::json!({
            "volume_id": self.volume_id,
            "format_version": self.format_version,
            "names": if self.show.names_encrypted { "encrypted" } else { "plaintext" },
            "summary": {
                "dirs": s.dirs,
                "files": s.files,
                "symlinks": s.symlinks,
                "other": s.other,
                "blocks": s.blocks,
                "holes": s.holes,
                "bytes": s.bytes,
                "in_use": s.in_use,
                "problems": self.damage(),
                "notices": self.problems.len() as u64 - self.damage(),
                "repairable": self.repairable(),
            },
            "problems": problems,
            "repair": moved,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_name_path_file_and_blocks() {
        let mut p = Problem::new(Path::new("a/b"), 7, Kind::Block, "fails authentication");
        p.file_id = Some(FileId([0xab; 16]));
        p.blocks = Some((2, 2));
        let enc = Show {
            names_encrypted: true,
        };
        assert_eq!(
            problem_line(&p, enc),
            format!("a/b (file {}, block 2): fails authentication", "ab".repeat(16))
        );
        p.blocks = Some((2, 5));
        assert!(problem_line(&p, enc).contains("blocks 2-5"));
        // With plaintext names the path is the name: entries go by inode.
        let plain = Show {
            names_encrypted: false,
        };
        assert!(problem_line(&p, plain).starts_with("inode 7 ("));
        assert!(!problem_line(&p, plain).contains("a/b"));
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(0), "0 bytes");
        assert_eq!(human_bytes(1023), "1023 bytes");
        assert_eq!(human_bytes(1024 * 1024 + 3), "1.0 MiB");
    }
}
