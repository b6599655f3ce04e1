//! Which callers a rule or a guard is about.

use super::identity::Identity;
use std::path::PathBuf;

/// Which callers a rule or guard is about; a missing list matches everyone.
#[derive(Debug, Default)]
pub struct Selector {
    pub users: Option<Vec<u32>>,
    pub groups: Option<Vec<u32>>,
    /// (device, inode, path as written).
    pub programs: Option<Vec<(u64, u64, PathBuf)>>,
}

impl Selector {
    pub fn matches(&self, who: &Identity) -> bool {
        // Cheapest first: a program is one stat of /proc/PID/exe, groups a read of
        // /proc/PID/status (about 0.1 ms), made only when the rest matched.
        self.users.as_ref().is_none_or(|u| u.contains(&who.uid))
            && self.programs.as_ref().is_none_or(|ps| {
                who.program()
                    .is_some_and(|p| ps.iter().any(|&(dev, ino, _)| p.dev == dev && p.ino == ino))
            })
            && self
                .groups
                .as_ref()
                .is_none_or(|g| g.iter().any(|&g| who.in_group(g)))
    }
}
