//! `kmsfs key backup`: a copy of a local keystore that can be restored by copying it back,
//! and what it holds (each key's versions), so an admin can tell whether a backup still opens
//! a volume: files written after a `key rotate` need the newer version, and after a
//! `rewrap` every file does.

use crate::exit::Fatal;
use crate::fatal;
use crate::kms::local::Keystore;
use std::path::Path;

/// Copies the keystore at `keystore` to `out` (mode 0600, written atomically), refusing a
/// place inside the backing directory `backing` (the backup would travel with the data).
pub fn backup(keystore: &Path, out: &Path, backing: Option<&Path>) -> Result<(), Fatal> {
    let out = std::path::absolute(out).map_err(|e| fatal!("{}: {e}", out.display()))?;
    if let Some(b) = backing {
        let dir = out.parent().unwrap_or(Path::new("/"));
        if let (Ok(d), Ok(b)) = (std::fs::canonicalize(dir), std::fs::canonicalize(b))
            && d.starts_with(&b)
        {
            return Err(fatal!(
                "{} is inside the backing directory {}: keep the keystore's backup off the storage that holds the data",
                out.display(),
                b.display()
            ));
        }
    }
    let store = Keystore::load(keystore).map_err(crate::volume::explain_kms)?;
    store
        .save(&out)
        .map_err(|e| fatal!("cannot write the backup {}: {e}", out.display()))?;
    println!(
        "backed up keystore {} to {} (mode 600):",
        keystore.display(),
        out.display()
    );
    for k in &store.keys {
        let versions: Vec<String> = k.versions.iter().map(|v| v.version.to_string()).collect();
        println!(
            "  key {:?}: versions {} (current {})",
            k.name,
            versions.join(", "),
            k.current().version
        );
    }
    println!(
        "it opens files wrapped with these versions only: take a new backup after every `kmsfs key rotate` and `kmsfs rewrap`; restore with `cp {} {}`",
        out.display(),
        keystore.display()
    );
    Ok(())
}

/// What `key rotate` and `rewrap` print: older backups stop opening what they write.
pub fn new_backup_needed(version: u32, volume_hint: &str) -> String {
    format!(
        "a new backup is needed: keystore backups taken before now lack version {version} and cannot open files wrapped with it; run `kmsfs key backup {volume_hint} OUT`"
    )
}
