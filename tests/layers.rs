//! The module map as code: which module may use which, checked on every test run.
//!
//! It reads `src/` as text (no compiler plugin), finds every module's references to other
//! modules of ours (`crate::…`, `super::…`, and a parent's use of its own child), and checks:
//! no import cycle, not even through a parent and its child; each layer uses only the layers
//! below it (docs/design.md, "Module map"); `unsafe` is allowed in one module only.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path ("fs::content") → its source without comments and test modules.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let rel = p
                .strip_prefix(concat!(env!("CARGO_MANIFEST_DIR"), "/src"))
                .unwrap();
            let mut parts: Vec<String> = rel
                .with_extension("")
                .iter()
                .map(|c| c.to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|l| l == "mod") {
                parts.pop();
            }
            // Unit tests kept in their own file (`mod tests;`) belong to no layer.
            if parts == ["lib"] || parts == ["main"] || parts.last().is_some_and(|l| l == "tests") {
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            // What tests use is not part of the module's dependencies.
            let code = text.split("#[cfg(test)]").next().unwrap_or("");
            let code: String = code
                .lines()
                .map(|l| l.split("//").next().unwrap_or(""))
                .collect::<Vec<_>>()
                .join("\n");
            out.insert(parts.join("::"), code);
        }
    }
    let mut out = BTreeMap::new();
    walk(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src")), &mut out);
    out
}

/// Every `prefix` followed by a path of lowercase identifiers (`crate::fs::content::X` gives
/// `fs::content`), or by a `{…}` group whose members are taken one by one.
fn paths_after(code: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in code.match_indices(prefix) {
        let before = code[..i].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let rest = &code[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let inner = group.split('}').next().unwrap_or("");
            out.extend(inner.split(',').map(|m| m.trim().to_owned()));
        } else {
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            out.push(rest[..end].to_owned());
        }
    }
    out
}

/// The longest known module that `path` (relative to the crate root) names.
fn resolve(mods: &BTreeMap<String, String>, path: &str) -> Option<String> {
    let segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    (1..=segs.len())
        .rev()
        .map(|n| segs[..n].join("::"))
        .find(|c| mods.contains_key(c))
}

/// Module → the modules of ours it uses.
fn graph(mods: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, code) in mods {
        let mut to = BTreeSet::new();
        for p in paths_after(code, "crate::") {
            to.extend(resolve(mods, &p));
        }
        let parent: Vec<&str> = m.split("::").collect();
        let parent = &parent[..parent.len() - 1];
        for p in paths_after(code, "super::") {
            let full = parent
                .iter()
                .copied()
                .chain(p.split("::"))
                .collect::<Vec<_>>()
                .join("::");
            match resolve(mods, &full) {
                Some(t) => to.insert(t),
                None if !parent.is_empty() => to.insert(parent.join("::")),
                None => false,
            };
        }
        // A parent naming its own child (`use content::ContentFile`).
        for child in mods.keys().filter(|k| {
            k.strip_prefix(&format!("{m}::"))
                .is_some_and(|rest| !rest.contains("::"))
        }) {
            let leaf = child.rsplit("::").next().unwrap();
            if !paths_after(code, &format!("{leaf}::")).is_empty() {
                to.insert(child.clone());
            }
        }
        to.remove(m);
        edges.insert(m.clone(), to);
    }
    edges
}

/// A cycle through `start`, if there is one.
fn cycle_from(edges: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_owned(), vec![start.to_owned()])];
    let mut seen = BTreeSet::new();
    while let Some((m, path)) = stack.pop() {
        for next in edges.get(&m).into_iter().flatten() {
            if next == start {
                let mut p = path.clone();
                p.push(start.to_owned());
                return Some(p);
            }
            if seen.insert(next.clone()) {
                let mut p = path.clone();
                p.push(next.clone());
                stack.push((next.clone(), p));
            }
        }
    }
    None
}

#[test]
fn no_module_imports_another_that_imports_it_back() {
    let edges = graph(&modules());
    assert!(edges.len() > 30, "the scan found too few modules: {edges:?}");
    // The scan sees what it must: a known edge.
    assert!(edges["fs"].contains("fs::content"), "{:?}", edges["fs"]);
    let cycles: Vec<String> = edges
        .keys()
        .filter_map(|m| cycle_from(&edges, m))
        .map(|c| c.join(" -> "))
        .collect();
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn layers_use_only_what_is_below_them() {
    let edges = graph(&modules());
    let top = |m: &str| m.split("::").next().unwrap().to_owned();
    // module (and its submodules) → top-level modules it must not use.
    let forbidden: &[(&str, &[&str])] = &[
        ("crypto", &["*"]),
        ("hex", &["*"]),
        ("exit", &["*"]),
        // The KMIP codec is pure and stands alone, like crypto.
        ("kmip", &["*"]),
        (
            "format",
            &[
                "fs", "kms", "keycache", "fuse", "daemon", "volume", "sys", "durable", "cli",
            ],
        ),
        (
            "kms",
            &["fs", "fuse", "keycache", "daemon", "volume", "fsck", "cli"],
        ),
        ("keycache", &["kms", "fs", "fuse", "daemon"]),
        (
            "fs",
            &[
                "fuse",
                "daemon",
                "volume",
                "cli",
                "fsck",
                "revocation",
                "mount_state",
            ],
        ),
        ("fuse", &["format", "crypto", "kms", "daemon", "volume"]),
        ("volume", &["daemon", "fuse", "cli", "fsck", "rewrap"]),
        ("fsck", &["daemon", "fuse", "cli"]),
        ("rewrap", &["daemon", "fuse", "cli"]),
    ];
    let mut wrong = Vec::new();
    for (m, to) in &edges {
        for (layer, banned) in forbidden {
            if top(m) != *layer {
                continue;
            }
            for t in to {
                let t_top = top(t);
                let all = banned == &["*"] && t_top != *layer;
                if all || banned.contains(&t_top.as_str()) {
                    wrong.push(format!("{m} uses {t}"));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
}

#[test]
fn only_sys_allows_unsafe_and_only_the_adapters_know_fuser() {
    for (m, code) in modules() {
        if m != "sys" {
            assert!(!code.contains("allow(unsafe_code)"), "{m} allows unsafe code");
        }
        let fuser_ok = ["fuse", "daemon", "mount_state"].contains(&m.as_str());
        assert!(fuser_ok || !code.contains("fuser::"), "{m} uses fuser");
    }
}
