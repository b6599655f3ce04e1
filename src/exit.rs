//! How a kmsfs process ends: the one-line error it prints and the exit status it returns.
//!
//! A leaf: every layer may import it, it imports nothing of ours. Exit statuses are part of
//! the interface (systemd units and scripts match on them), so they are all named here.

/// Success.
pub const OK: i32 = 0;
/// A command failed; the message says why and what to do.
pub const FAILURE: i32 = 1;
/// `kmsfs fsck` found problems (repaired or not).
pub const FSCK_PROBLEMS: i32 = 1;
/// `kmsfs fsck` could not run its check at all.
pub const FSCK_FATAL: i32 = 2;
/// The mount was locked (revocation, `kmsfs lock`) or the KMS refused the volume's key at
/// start: systemd units list it in `RestartPreventExitStatus=` so a revoked server is not
/// remounted in a loop. 75 is EX_TEMPFAIL: an admin must act before a retry can succeed.
pub const LOCKED: i32 = 75;

/// What a fatal error means for the exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Anything an admin can fix and retry.
    Failed,
    /// The KMS refuses this volume's key: retrying will not help until access is restored.
    Denied,
}

/// A one-line, actionable error for the person running kmsfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fatal {
    pub message: String,
    pub cause: Cause,
}

impl Fatal {
    pub fn new(message: impl Into<String>) -> Self {
        Fatal {
            message: message.into(),
            cause: Cause::Failed,
        }
    }

    /// The KMS refused the volume's key.
    pub fn denied(message: impl Into<String>) -> Self {
        Fatal {
            message: message.into(),
            cause: Cause::Denied,
        }
    }

    /// The status a process ending with this error exits with.
    pub fn exit_code(&self) -> i32 {
        match self.cause {
            Cause::Failed => FAILURE,
            Cause::Denied => LOCKED,
        }
    }
}

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Fatal {}

impl From<String> for Fatal {
    fn from(message: String) -> Self {
        Fatal::new(message)
    }
}

/// `fatal!("… {x} …")`: a [`Fatal`] with a formatted message.
#[macro_export]
macro_rules! fatal {
    ($($t:tt)*) => { $crate::exit::Fatal::new(format!($($t)*)) };
}
