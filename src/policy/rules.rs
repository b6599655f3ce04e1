//! A compiled policy: its rules in order, the default, and its guards.

use super::guard::GuardRule;
use super::identity::Identity;
use super::selector::Selector;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Allow,
    Deny,
    /// Allow, and write the open to the audit log.
    Audit,
}

#[derive(Debug)]
pub struct Rule {
    pub name: Arc<str>,
    pub select: Selector,
    pub effect: Effect,
}

/// A checked, compiled policy file.
#[derive(Debug)]
pub struct Policy {
    pub rules: Vec<Rule>,
    /// When no rule matches.
    pub default: Effect,
    pub guards: Vec<GuardRule>,
}

impl Policy {
    /// The first rule that matches, or the default.
    pub fn decide(&self, who: &Identity) -> (Effect, Arc<str>) {
        self.rules.iter().find(|r| r.select.matches(who)).map_or_else(
            || (self.default, "default".into()),
            |r| (r.effect, r.name.clone()),
        )
    }
}
