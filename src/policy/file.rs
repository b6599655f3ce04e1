//! The policy file: its TOML shape, and its checks on load. Everything an admin can get wrong
//! is caught here, with the line's rule or guard named, so that a bad file never replaces a
//! good policy (docs/policy.md has the reference).

use super::guard::{Action, GuardRule, Limits};
use super::rules::{Effect, Policy, Rule};
use super::selector::Selector;
use serde::Deserialize;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The only version this daemon reads.
pub const VERSION: u32 = 1;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    /// What applies when no rule matches.
    #[serde(default)]
    default: Option<String>,
    #[serde(default)]
    rule: Vec<RuleFile>,
    #[serde(default)]
    guard: Vec<GuardFile>,
}

/// A user or group by name or number.
#[derive(Deserialize)]
#[serde(untagged)]
enum Who {
    Id(u32),
    Name(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    name: Option<String>,
    users: Option<Vec<Who>>,
    groups: Option<Vec<Who>>,
    programs: Option<Vec<PathBuf>>,
    effect: String,
}

/// A number, or a size with a unit ("10 GiB") for `bytes_read`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Amount {
    Count(u64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GuardFile {
    name: Option<String>,
    users: Option<Vec<Who>>,
    groups: Option<Vec<Who>>,
    programs: Option<Vec<PathBuf>>,
    window: String,
    opens: Option<u64>,
    unwraps: Option<u64>,
    bytes_read: Option<Amount>,
    action: Option<String>,
    cooldown: Option<String>,
    delay: Option<String>,
}

/// Reads, checks and compiles the policy at `path`. The file must be the admin's: a regular
/// file owned by root (or by the daemon's user) that nobody else may write, as sudoers is.
pub fn load(path: &Path) -> Result<Policy, String> {
    use std::io::Read;
    let cannot = |e: std::io::Error| format!("cannot read policy {}: {e}", path.display());
    // Checked and read through one descriptor: the file read is the file checked. Opened
    // non-blocking so that a FIFO put there cannot hang a reload.
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(cannot)?;
    let meta = f.metadata().map_err(cannot)?;
    if !meta.is_file() {
        return Err(format!("policy {} is not a regular file", path.display()));
    }
    let me = crate::sys::geteuid();
    if meta.uid() != 0 && meta.uid() != me {
        return Err(format!(
            "policy {} is owned by uid {}: it must belong to root (chown root {})",
            path.display(),
            meta.uid(),
            path.display()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "policy {} is writable by group or others: chmod 0644 (or 0600) it",
            path.display()
        ));
    }
    // A policy is a page or two; a huge file is a mistake, not a policy.
    let mut text = String::new();
    (&mut f).take(1 << 20).read_to_string(&mut text).map_err(cannot)?;
    parse(&text).map_err(|e| format!("policy {}: {e}", path.display()))
}

/// Checks and compiles a policy's text. Names of users, groups and programs are resolved now:
/// a program is matched by the file it is (device and inode) when the policy is loaded.
pub fn parse(text: &str) -> Result<Policy, String> {
    let file: File = toml::from_str(text).map_err(|e| one_line(&e.to_string()))?;
    if file.version != VERSION {
        return Err(format!(
            "version {} is not one this kmsfs reads (it reads version {VERSION})",
            file.version
        ));
    }
    let default = match &file.default {
        None => Effect::Allow,
        Some(e) => effect(e).map_err(|e| format!("default: {e}"))?,
    };
    let mut names = std::collections::HashSet::new();
    let mut rules = Vec::new();
    for (i, r) in file.rule.iter().enumerate() {
        let name = r.name.clone().unwrap_or_else(|| format!("rule {}", i + 1));
        let at = |e: String| format!("rule {name:?}: {e}");
        if name.is_empty() || !names.insert(name.clone()) {
            return Err(at("rule names must be unique and not empty".into()));
        }
        rules.push(Rule {
            select: selector(&r.users, &r.groups, &r.programs).map_err(at)?,
            effect: effect(&r.effect).map_err(at)?,
            name: name.into(),
        });
    }
    let mut guards = Vec::new();
    for (i, g) in file.guard.iter().enumerate() {
        let name = g.name.clone().unwrap_or_else(|| format!("guard {}", i + 1));
        let at = |e: String| format!("guard {name:?}: {e}");
        if name.is_empty() || !names.insert(name.clone()) {
            return Err(at(
                "guard names must be unique, not empty, and not a rule's".into()
            ));
        }
        guards.push(guard(g, name.clone()).map_err(at)?);
    }
    Ok(Policy {
        rules,
        default,
        guards,
    })
}

fn guard(g: &GuardFile, name: String) -> Result<GuardRule, String> {
    let window = duration(&g.window).map_err(|e| format!("window: {e}"))?;
    if window < Duration::from_secs(1) {
        return Err("window: at least 1s".into());
    }
    let bytes_read = match &g.bytes_read {
        None => None,
        Some(Amount::Count(n)) => Some(*n),
        Some(Amount::Text(t)) => Some(size(t).map_err(|e| format!("bytes_read: {e}"))?),
    };
    let limits = Limits {
        opens: g.opens,
        unwraps: g.unwraps,
        bytes_read,
    };
    if [limits.opens, limits.unwraps, limits.bytes_read]
        .iter()
        .all(Option::is_none)
    {
        return Err("give at least one of opens, unwraps, bytes_read".into());
    }
    if [limits.opens, limits.unwraps, limits.bytes_read].contains(&Some(0)) {
        return Err("a threshold of 0 would fire on everything; leave it out instead".into());
    }
    // The default for a guard nobody tuned: alert, and stop only the identity that crossed it.
    let action = match g.action.as_deref().unwrap_or("deny") {
        "alert" => Action::Alert,
        "throttle" => Action::Throttle,
        "deny" => Action::Deny,
        "lock" => Action::Lock,
        other => return Err(format!("action {other:?}: use alert, throttle, deny or lock")),
    };
    let cooldown = match &g.cooldown {
        Some(c) => duration(c).map_err(|e| format!("cooldown: {e}"))?,
        None => window,
    };
    // Throttled opens are spaced so that the rate stays at the threshold.
    let delay = match &g.delay {
        Some(d) => duration(d).map_err(|e| format!("delay: {e}"))?,
        None => limits.opens.map_or(Duration::from_millis(100), |n| {
            window / n.min(u32::MAX as u64) as u32
        }),
    };
    Ok(GuardRule {
        name: name.into(),
        select: selector(&g.users, &g.groups, &g.programs)?,
        window,
        limits,
        action,
        cooldown,
        delay,
    })
}

fn effect(s: &str) -> Result<Effect, String> {
    match s {
        "allow" => Ok(Effect::Allow),
        "deny" => Ok(Effect::Deny),
        "audit" | "allow-and-audit" => Ok(Effect::Audit),
        other => Err(format!("effect {other:?}: use allow, deny or audit")),
    }
}

fn selector(
    users: &Option<Vec<Who>>,
    groups: &Option<Vec<Who>>,
    programs: &Option<Vec<PathBuf>>,
) -> Result<Selector, String> {
    let users = users
        .as_ref()
        .map(|v| v.iter().map(|w| id(w, "user", crate::sys::user_id)).collect())
        .transpose()?;
    let groups = groups
        .as_ref()
        .map(|v| v.iter().map(|w| id(w, "group", crate::sys::group_id)).collect())
        .transpose()?;
    let programs = programs
        .as_ref()
        .map(|v| v.iter().map(|p| program(p)).collect())
        .transpose()?;
    for (what, empty) in [
        ("users", users.as_ref().is_some_and(Vec::is_empty)),
        ("groups", groups.as_ref().is_some_and(Vec::is_empty)),
        ("programs", programs.as_ref().is_some_and(Vec::is_empty)),
    ] {
        if empty {
            return Err(format!(
                "{what} = [] matches nobody; leave it out to match everyone"
            ));
        }
    }
    Ok(Selector {
        users,
        groups,
        programs,
    })
}

fn id(w: &Who, what: &str, lookup: fn(&str) -> std::io::Result<Option<u32>>) -> Result<u32, String> {
    match w {
        Who::Id(n) => Ok(*n),
        Who::Name(name) => match lookup(name) {
            Ok(Some(n)) => Ok(n),
            Ok(None) => Err(format!("no {what} named {name:?} on this machine")),
            Err(e) => Err(format!("cannot look up {what} {name:?}: {e}")),
        },
    }
}

/// A program as the file it is now: a copy elsewhere, or a new binary put at this path
/// later, is another file and does not match until the policy is reloaded.
fn program(p: &Path) -> Result<(u64, u64, PathBuf), String> {
    if !p.is_absolute() {
        return Err(format!("program {}: give an absolute path", p.display()));
    }
    let meta = std::fs::metadata(p).map_err(|e| format!("program {}: {e}", p.display()))?;
    if !meta.is_file() {
        return Err(format!("program {} is not a regular file", p.display()));
    }
    Ok((meta.dev(), meta.ino(), p.to_path_buf()))
}

/// "500ms", "30s", "10m", "2h", "1d"; a bare number is seconds.
pub fn duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 10m or 1h"))?;
    let secs = |k: u64| Ok(Duration::from_secs(n.saturating_mul(k)));
    match unit.trim() {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => secs(1),
        "m" | "min" => secs(60),
        "h" => secs(3600),
        "d" => secs(86400),
        _ => Err(format!("{s:?} is not a duration like 30s, 10m or 1h")),
    }
}

/// "512", "64 KiB", "10MiB", "2 GiB", "1TiB".
fn size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 10 GiB"))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        "TiB" => 40,
        _ => return Err(format!("{s:?} is not a size like 500 MiB or 10 GiB")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// TOML's errors quote the offending line over several lines; the daemon's log wants one.
fn one_line(e: &str) -> String {
    e.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.chars().all(|c| c == '|' || c == '^' || c == ' '))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_policy_compiles() {
        let p = parse(
            r#"
            version = 1
            default = "deny"
            [[rule]]
            name = "workers"
            users = ["root", 1001]
            groups = [0]
            programs = ["/bin/sh"]
            effect = "allow"
            [[rule]]
            name = "backup"
            users = [34]
            effect = "deny"
            [[guard]]
            name = "mass"
            window = "1m"
            opens = 500
            bytes_read = "10 GiB"
            "#,
        )
        .unwrap();
        assert_eq!(p.rules.len(), 2);
        assert_eq!(p.default, Effect::Deny);
        let g = &p.guards[0];
        assert_eq!(g.action, Action::Deny);
        assert_eq!(g.cooldown, Duration::from_secs(60));
        assert_eq!(g.delay, Duration::from_millis(120));
        assert_eq!(g.limits.bytes_read, Some(10 << 30));
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            ("version = 2", "version 2"),
            ("version = 1\ndefault = \"maybe\"", "default: effect \"maybe\""),
            (
                "version = 1\n[[rule]]\neffect = \"allow\"\nuser = [1]",
                "unknown field",
            ),
            (
                "version = 1\n[[rule]]\nusers = [\"no-such-user-kmsfs\"]\neffect = \"allow\"",
                "no user named",
            ),
            (
                "version = 1\n[[rule]]\nprograms = [\"bin/sh\"]\neffect = \"allow\"",
                "absolute path",
            ),
            (
                "version = 1\n[[rule]]\nprograms = [\"/nonexistent/x\"]\neffect = \"allow\"",
                "/nonexistent/x",
            ),
            (
                "version = 1\n[[rule]]\nusers = []\neffect = \"allow\"",
                "matches nobody",
            ),
            (
                "version = 1\n[[rule]]\nname = \"a\"\neffect = \"allow\"\n[[rule]]\nname = \"a\"\neffect = \"deny\"",
                "unique",
            ),
            ("version = 1\n[[guard]]\nwindow = \"1m\"", "at least one of"),
            (
                "version = 1\n[[guard]]\nwindow = \"1m\"\nopens = 0",
                "threshold of 0",
            ),
            (
                "version = 1\n[[guard]]\nwindow = \"1m\"\nopens = 5\naction = \"explode\"",
                "action \"explode\"",
            ),
            ("version = 1\n[[guard]]\nwindow = \"soon\"\nopens = 5", "window"),
            (
                "version = 1\n[[guard]]\nwindow = \"1m\"\nbytes_read = \"lots\"",
                "bytes_read",
            ),
            ("version = [", "version"),
        ];
        for (text, want) in cases {
            let e = parse(text)
                .err()
                .unwrap_or_else(|| panic!("{text:?} was accepted"));
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(duration("10m").unwrap(), Duration::from_secs(600));
        assert!(duration("1.5h").is_err());
        assert_eq!(size("64 KiB").unwrap(), 65536);
        assert!(size("1 GB").is_err());
        assert!(size("99999999999 TiB").is_err());
    }
}
