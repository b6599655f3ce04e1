//! Whether a file's content may change under a read: the page fill (`fuse::PageFill`) hands
//! the kernel plaintext only if no one could have changed the file since it was read.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Who may change one inode's content now, and how often that moved. Kept by the inode, not
/// by its open content: a file closed and opened again is the same file to the kernel's page
/// cache.
#[derive(Default)]
pub struct Changes {
    /// Write handles open and truncates in progress.
    writers: AtomicUsize,
    /// Bumped whenever `writers` goes up or down.
    moves: AtomicU64,
}

/// Proof that no one could change a file's content from some moment on, taken before its
/// plaintext is read; [`Quiet::holds`] says whether that is still so. A write handle opened or
/// a truncate begun since, even one gone again, voids it.
pub struct Quiet {
    changes: Arc<Changes>,
    moves: u64,
}

impl Changes {
    /// A write handle opens or a truncate begins: the content may change until the matching
    /// [`Changes::end`].
    pub fn begin(&self) {
        // Counted before the bump: a `quiet` that read the old `moves` and then sees no writer
        // is voided by the bump; one that reads the new `moves` sees the writer.
        self.writers.fetch_add(1, Ordering::SeqCst);
        self.moves.fetch_add(1, Ordering::SeqCst);
    }

    pub fn end(&self) {
        self.writers.fetch_sub(1, Ordering::SeqCst);
        self.moves.fetch_add(1, Ordering::SeqCst);
    }

    /// A [`Quiet`] token if no one may change the content now; take it before reading.
    pub fn quiet(self: &Arc<Self>) -> Option<Quiet> {
        let moves = self.moves.load(Ordering::SeqCst);
        (self.writers.load(Ordering::SeqCst) == 0).then(|| Quiet {
            changes: self.clone(),
            moves,
        })
    }
}

impl Quiet {
    /// True while no write handle or truncate came or went since the token was taken.
    pub fn holds(&self) -> bool {
        self.changes.moves.load(Ordering::SeqCst) == self.moves
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writer_that_came_and_went_voids_the_token() {
        let c = Arc::new(Changes::default());
        let q = c.quiet().expect("no writer yet");
        assert!(q.holds());
        c.begin();
        assert!(c.quiet().is_none(), "no token while a writer is open");
        assert!(!q.holds());
        c.end();
        assert!(!q.holds(), "voided for good");
        assert!(c.quiet().expect("writer gone").holds());
    }
}
