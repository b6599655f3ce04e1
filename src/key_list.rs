//! `kmsfs key list [--json]`: each key in a local keystore, its state and versions, for people
//! (one tab-separated line per key) or for scripts (one JSON document). Never key material.

use crate::exit::Fatal;
use crate::kms::local::Keystore;
use std::path::Path;

/// The keystore's keys as one JSON document: `{"keystore": PATH, "keys": [{"name", "enabled",
/// "current_version", "versions": [{"version", "created_unix"}]}]}`.
pub fn to_json(keystore: &Path, store: &Keystore) -> serde_json::Value {
    let keys: Vec<serde_json::Value> = store
        .keys
        .iter()
        .map(|k| {
            serde_json::json!({
                "name": k.name,
                "enabled": k.enabled,
                "current_version": k.current().version,
                "versions": k.versions.iter().map(|v| serde_json::json!({
                    "version": v.version,
                    "created_unix": v.created_unix,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::json!({ "keystore": keystore.display().to_string(), "keys": keys })
}

pub fn list(keystore: &Path, json: bool) -> Result<(), Fatal> {
    let store = Keystore::load(keystore).map_err(crate::volume::explain_kms)?;
    if json {
        println!("{}", to_json(keystore, &store));
        return Ok(());
    }
    for k in &store.keys {
        let state = if k.enabled { "enabled" } else { "DISABLED" };
        println!(
            "{}\t{state}\tcurrent version {}\t{} versions",
            k.name,
            k.current().version,
            k.versions.len()
        );
    }
    Ok(())
}
