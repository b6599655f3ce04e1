//! A progress line for a person watching a long command (fsck, rewrap): on stderr, only when
//! stderr is a terminal, rewritten in place with `\r`. A pipe or a log gets nothing, so
//! scripts and `--json` readers never see it. Plain std: no progress-bar crate for one line.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// A progress line on stderr when it is a terminal (rewritten in place with `\r`, at most a
/// few times a second); nothing otherwise.
pub struct Progress {
    on: bool,
    last: Option<Instant>,
    width: usize,
}

const PROGRESS_EVERY: Duration = Duration::from_millis(200);

impl Progress {
    pub fn new() -> Self {
        Progress {
            on: std::io::stderr().is_terminal(),
            last: None,
            width: 0,
        }
    }

    /// Shows `line()` unless a line was shown less than [`PROGRESS_EVERY`] ago.
    pub fn update(&mut self, line: impl FnOnce() -> String) {
        if !self.on || self.last.is_some_and(|t| t.elapsed() < PROGRESS_EVERY) {
            return;
        }
        self.last = Some(Instant::now());
        let line = line();
        let pad = self.width.saturating_sub(line.len());
        self.width = line.len();
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{line}{:pad$}", "");
        let _ = err.flush();
    }

    /// Erases the progress line.
    pub fn clear(&mut self) {
        if self.on && self.width > 0 {
            let _ = write!(std::io::stderr().lock(), "\r{:w$}\r", "", w = self.width);
            self.width = 0;
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}
