//! The round trips a network backend measured lately, for what sizes and times itself to the
//! KMS's distance: how many batches to keep in flight and how long to gather one (the unwrap
//! batcher), how early to refill the pool of new-file keys, and when a request is late enough
//! to be re-sent to another node (hedging).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

/// Samples kept: enough for a stable median, few enough to follow a change within seconds.
const SAMPLES: usize = 32;

/// The latest [`SAMPLES`] round trips.
#[derive(Default)]
pub(crate) struct RecentRtt {
    /// Taken briefly by whoever records or reads a sample.
    samples: Mutex<VecDeque<Duration>>,
}

impl RecentRtt {
    /// Records one round trip (of an exchange that was answered: a timeout is no sample).
    pub(crate) fn record(&self, rtt: Duration) {
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if s.len() == SAMPLES {
            s.pop_front();
        }
        s.push_back(rtt);
    }

    /// The median of the recent round trips; `None` before the first.
    pub(crate) fn p50(&self) -> Option<Duration> {
        let mut v: Vec<Duration> = self
            .samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        v.sort_unstable();
        v.get(v.len() / 2).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_follows_the_latest_samples() {
        let r = RecentRtt::default();
        assert_eq!(r.p50(), None);
        for ms in [1, 50, 2] {
            r.record(Duration::from_millis(ms));
        }
        assert_eq!(r.p50(), Some(Duration::from_millis(2)));
        for _ in 0..SAMPLES {
            r.record(Duration::from_millis(25));
        }
        assert_eq!(r.p50(), Some(Duration::from_millis(25)));
    }
}
