//! Who may decrypt: the mount-side access policy, beyond file permissions.
//!
//! An admin's file (`--policy`, TOML; docs/policy.md) lists rules matched in order on the
//! caller's uid, groups and program; the first that matches decides whether an open or create
//! of a regular file goes ahead (`allow`), goes ahead and is audited (`audit`), or fails with
//! EACCES before any KMS call (`deny`: the file stays listed, as with a chmod). Guards watch
//! each identity's usage and act on a burst (`guard`). No policy file: everything the
//! permission bits allow is allowed, as before.
//!
//! Decisions are made at open: a descriptor keeps working after its process execs another
//! program or changes uid, as it does after a chmod.

mod file;
pub mod guard;
pub mod identity;
mod rules;
mod selector;

pub use identity::Identity;
pub use rules::{Effect, Policy, Rule};
pub use selector::Selector;

use guard::{Action, Counter, Crossing, Gate, Usage};
use serde_json::{Map, Value, json};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// A caller, with what the policy decided for it: carried from the open to its KMS call and
/// its audit events.
#[derive(Debug)]
pub struct Asker {
    pub who: Identity,
    /// The rule that decided (`None`: no policy).
    pub rule: Option<Arc<str>>,
    /// The rule asks for opens to be audited.
    pub audit: bool,
}

impl Asker {
    /// Work no caller asked for (files made ahead of creates).
    pub fn daemon() -> Asker {
        Asker {
            who: Identity::daemon(),
            rule: None,
            audit: false,
        }
    }

    /// The identity fields of an audit event, and the rule.
    pub fn fields(&self) -> Map<String, Value> {
        let mut m = match self.who.audit_fields() {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        if let Some(r) = &self.rule {
            m.insert("rule".into(), json!(r.as_ref()));
        }
        m
    }
}

/// The policy's answer to an open or create.
#[derive(Debug)]
pub enum Verdict {
    Go,
    /// Go, but answer only after this long (throttled).
    After(Duration),
    /// EACCES.
    Denied,
    /// EAGAIN: too many throttled opens of this identity are waiting already.
    Busy,
    /// A `lock` guard fired: the whole mount locks, for this reason.
    Lock(String),
}

/// The policy in force on a mount, its guards' counts, and reloading.
pub struct Access {
    /// Where the policy comes from; `None`: no policy.
    source: Option<PathBuf>,
    current: RwLock<Option<Arc<(Policy, Usage)>>>,
    /// Programs run from inside the mount are not named in the log.
    mountpoint: Option<PathBuf>,
    pub denials: AtomicU64,
    pub alerts: AtomicU64,
    loaded: AtomicU64,
}

impl Access {
    /// No policy: everything the permission bits allow.
    pub fn none(mountpoint: Option<&Path>) -> Access {
        Access {
            source: None,
            current: RwLock::new(None),
            mountpoint: mountpoint.map(Path::to_path_buf),
            denials: AtomicU64::new(0),
            alerts: AtomicU64::new(0),
            loaded: AtomicU64::new(0),
        }
    }

    /// The policy at `path`, checked; an error is one line saying what is wrong.
    pub fn load(path: &Path, mountpoint: Option<&Path>) -> Result<Access, String> {
        let policy = file::load(path)?;
        let a = Access {
            source: Some(path.to_path_buf()),
            ..Access::none(mountpoint)
        };
        a.install(policy);
        Ok(a)
    }

    /// Reads the policy file again. A bad file keeps the policy in force and says why (and
    /// the error is returned for `kmsfs reload`). Guards' counts start afresh.
    pub fn reload(&self) -> Result<Value, String> {
        let Some(path) = &self.source else {
            return Ok(json!({"policy": null}));
        };
        match file::load(path) {
            Ok(p) => {
                let summary = summary(&p);
                self.install(p);
                log::info!("policy {} reloaded", path.display());
                crate::audit::event("policy_loaded", summary.clone());
                Ok(summary)
            }
            Err(e) => {
                log::error!("{e}; keeping the policy loaded before");
                crate::audit::event("policy_rejected", json!({"reason": e}));
                Err(e)
            }
        }
    }

    fn install(&self, p: Policy) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new((p, Usage::default())));
        self.loaded.store(crate::time::now_secs(), Ordering::Relaxed);
    }

    fn current(&self) -> Option<Arc<(Policy, Usage)>> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn enabled(&self) -> bool {
        self.source.is_some()
    }

    /// The caller of a request, as the kernel names it.
    pub fn asker(&self, uid: u32, gid: u32, pid: u32) -> Asker {
        Asker {
            who: Identity::new(uid, gid, pid, self.mountpoint.as_deref()),
            rule: None,
            audit: false,
        }
    }

    /// Decides an open or create by `asker` (and records the rule in it); `what` and
    /// `fields` say what was asked for, for the audit log.
    pub fn check(&self, asker: &mut Asker, what: &str, fields: impl FnOnce() -> Value) -> Verdict {
        let Some(current) = self.current() else {
            return Verdict::Go;
        };
        let (policy, usage) = &*current;
        let (effect, rule) = policy.decide(&asker.who);
        asker.rule = Some(rule);
        asker.audit = effect == Effect::Audit;
        if effect == Effect::Deny {
            self.denied(asker, what, fields, "policy");
            return Verdict::Denied;
        }
        let mut crossed = Vec::new();
        let gate = usage.open(&policy.guards, &asker.who, &mut crossed);
        let lock = self.alert(asker, &crossed);
        if let Some(why) = lock {
            return Verdict::Lock(why);
        }
        match gate {
            Gate::Go => Verdict::Go,
            Gate::After(d) => Verdict::After(d),
            Gate::Busy => Verdict::Busy,
            Gate::Refused(guard) => {
                self.denied(asker, what, fields, &format!("guard {guard}"));
                Verdict::Denied
            }
        }
    }

    /// Whether the rules let `asker` open files at all (and records the rule in it), for work
    /// done on its behalf before it asks (prefetch): no guard counts an open, nothing is
    /// audited, and a denied identity gets nothing done for it.
    pub fn permits(&self, asker: &mut Asker) -> bool {
        let Some(current) = self.current() else {
            return true;
        };
        let (effect, rule) = current.0.decide(&asker.who);
        asker.rule = Some(rule);
        asker.audit = effect == Effect::Audit;
        effect != Effect::Deny
    }

    /// Counts a KMS unwrap made for `asker`; `Some(reason)` if a `lock` guard fired.
    pub fn unwrapped(&self, asker: &Asker) -> Option<String> {
        self.count(asker, Counter::Unwraps, 1)
    }

    /// Counts bytes read by `asker`; `Some(reason)` if a `lock` guard fired.
    pub fn read(&self, asker: &Asker, bytes: u64) -> Option<String> {
        self.count(asker, Counter::BytesRead, bytes)
    }

    fn count(&self, asker: &Asker, counter: Counter, n: u64) -> Option<String> {
        let current = self.current()?;
        let (policy, usage) = &*current;
        if policy.guards.is_empty() {
            return None;
        }
        let mut crossed = Vec::new();
        usage.add(&policy.guards, &asker.who, counter, n, &mut crossed);
        self.alert(asker, &crossed)
    }

    fn denied(&self, asker: &Asker, what: &str, fields: impl FnOnce() -> Value, by: &str) {
        self.denials.fetch_add(1, Ordering::Relaxed);
        let mut m = asker.fields();
        m.insert("request".into(), json!(what));
        m.insert("decided_by".into(), json!(by));
        if let Value::Object(f) = fields() {
            m.extend(f);
        }
        crate::audit::event("denied", Value::Object(m));
    }

    /// Raises one alert per crossing: audit event, log line, systemd status. Returns the
    /// reason to lock the mount if a `lock` guard crossed.
    fn alert(&self, asker: &Asker, crossed: &[Crossing]) -> Option<String> {
        let mut lock = None;
        for c in crossed {
            self.alerts.fetch_add(1, Ordering::Relaxed);
            let exe = asker.who.exe().unwrap_or("unknown program");
            let line = format!(
                "guard {}: uid {} running {exe}: {} {} in {} s (threshold {}); action {}",
                c.guard,
                asker.who.uid,
                c.count,
                c.counter.as_str(),
                c.window.as_secs(),
                c.limit,
                c.action.as_str()
            );
            log::warn!("{line}");
            crate::notify::notify(&format!("STATUS=alert: {line}"));
            let mut m = asker.fields();
            m.insert("guard".into(), json!(c.guard.as_ref()));
            m.insert("counter".into(), json!(c.counter.as_str()));
            m.insert("count".into(), json!(c.count));
            m.insert("threshold".into(), json!(c.limit));
            m.insert("window_secs".into(), json!(c.window.as_secs_f64()));
            m.insert("action".into(), json!(c.action.as_str()));
            crate::audit::event("alert", Value::Object(m));
            if c.action == Action::Lock {
                lock = Some(format!("usage guard {}", c.guard));
            }
        }
        lock
    }

    /// For `kmsfs status`.
    pub fn status(&self) -> Value {
        let Some(path) = &self.source else {
            return Value::Null;
        };
        let current = self.current();
        let restricted: Vec<Value> = current
            .as_ref()
            .map(|c| c.1.restricted())
            .unwrap_or_default()
            .into_iter()
            .map(|(k, how)| json!({"uid": k.uid, "program_inode": k.ino, "state": how}))
            .collect();
        let mut s = current.as_ref().map(|c| summary(&c.0)).unwrap_or(json!({}));
        if let Value::Object(m) = &mut s {
            m.insert("file".into(), json!(path));
            m.insert(
                "loaded".into(),
                json!(crate::time::utc_rfc3339(self.loaded.load(Ordering::Relaxed))),
            );
            m.insert("denials".into(), json!(self.denials.load(Ordering::Relaxed)));
            m.insert("alerts".into(), json!(self.alerts.load(Ordering::Relaxed)));
            m.insert("restricted".into(), json!(restricted));
        }
        s
    }
}

fn summary(p: &Policy) -> Value {
    json!({"rules": p.rules.len(), "guards": p.guards.len()})
}
