//! The nodes of an HA KMS as a client sees them: which one to ask first, how long an exchange
//! may take before it is re-sent to another node (hedging), and which nodes hung lately and
//! are set aside for a while.
//!
//! A node that hangs (SIGSTOP, a GC pause, a stalled disk) accepts connections and answers
//! nothing: without hedging every request waits out its whole timeout before the next node is
//! asked. With it, a request that takes [`HEDGE_RTTS`] times the recent round trip (and at
//! least [`HEDGE_FLOOR`]) goes to another node too, the first answer wins, and the late node
//! is set aside for [`SET_ASIDE`]: no request goes to it meanwhile unless every node is set
//! aside. Re-sending is safe for what the backends hedge: unwraps, wraps and rewraps change
//! nothing on the server, and a duplicate answer is dropped.

use super::rtt::RecentRtt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A request is late after this many recent median round trips …
const HEDGE_RTTS: u32 = 4;
/// … and never before this long (a batch of 249 items, a token renewal, a loaded server).
const HEDGE_FLOOR: Duration = Duration::from_millis(200);
/// How long a late node is left out.
const SET_ASIDE: Duration = Duration::from_secs(30);

/// A node a client stopped asking for a while, for `kmsfs status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetAside {
    pub addr: String,
    /// What it did, in a few words.
    pub why: String,
    /// Seconds until it is asked again.
    pub secs_left: u64,
}

struct Aside {
    until: Instant,
    why: String,
}

/// The nodes of one KMS, in the order they were configured.
pub(crate) struct Nodes {
    addrs: Vec<String>,
    /// Index of the node that answered last: HA clients stick to the active node. Taken briefly
    /// by every exchange, with `aside`.
    preferred: Mutex<usize>,
    /// Nodes set aside (by index) and until when; an entry stays after its time is up until the
    /// node answers again, so that a node that keeps hanging is logged once.
    aside: Mutex<Vec<Option<Aside>>>,
    /// Round trips of answered exchanges, all nodes together.
    rtt: RecentRtt,
}

impl Nodes {
    pub(crate) fn new(addrs: Vec<String>) -> Self {
        let aside = addrs.iter().map(|_| None).collect();
        Nodes {
            addrs,
            preferred: Mutex::new(0),
            aside: Mutex::new(aside),
            rtt: RecentRtt::default(),
        }
    }

    pub(crate) fn addr(&self, i: usize) -> &str {
        &self.addrs[i % self.addrs.len()]
    }

    pub(crate) fn len(&self) -> usize {
        self.addrs.len()
    }

    /// The node to ask on attempt `attempt` (from 0) of a request: the preferred node first, then
    /// the others in turn, skipping those set aside unless every node is.
    pub(crate) fn pick(&self, attempt: u32) -> usize {
        let n = self.addrs.len();
        let first = *self.preferred.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let aside = self.aside.lock().unwrap_or_else(|p| p.into_inner());
        let usable: Vec<usize> = (0..n)
            .map(|k| (first + k) % n)
            .filter(|&i| aside[i].as_ref().is_none_or(|a| a.until <= now))
            .collect();
        let order = if usable.is_empty() {
            (0..n).map(|k| (first + k) % n).collect()
        } else {
            usable
        };
        order[attempt as usize % order.len()]
    }

    /// Another node than `i` to re-send a late request to, if there is one not set aside.
    pub(crate) fn other_than(&self, i: usize) -> Option<usize> {
        let n = self.addrs.len();
        let now = Instant::now();
        let aside = self.aside.lock().unwrap_or_else(|p| p.into_inner());
        (1..n)
            .map(|k| (i + k) % n)
            .find(|&j| aside[j].as_ref().is_none_or(|a| a.until <= now))
    }

    /// How long an exchange may take before it is re-sent to another node.
    pub(crate) fn hedge_after(&self) -> Duration {
        let typical = self.rtt.p50().unwrap_or_default();
        (typical * HEDGE_RTTS).max(HEDGE_FLOOR)
    }

    /// Node `i` answered in `rtt`: it is the one to ask first, and no longer set aside.
    pub(crate) fn answered(&self, i: usize, rtt: Duration) {
        self.rtt.record(rtt);
        *self.preferred.lock().unwrap_or_else(|p| p.into_inner()) = i;
        let mut aside = self.aside.lock().unwrap_or_else(|p| p.into_inner());
        if aside[i].take().is_some() {
            log::info!("KMS node {} answers again", self.addrs[i]);
        }
    }

    /// Node `i` did not answer within `waited`: set it aside (logged the first time only, until
    /// it answers again).
    pub(crate) fn set_aside(&self, i: usize, waited: Duration) {
        let why = format!("no answer within {} ms", waited.as_millis());
        let mut aside = self.aside.lock().unwrap_or_else(|p| p.into_inner());
        if aside[i].is_none() {
            log::warn!(
                "KMS node {} {why} (others answer in {} ms): asking the other nodes, and it not again for {} s",
                self.addrs[i],
                self.rtt.p50().unwrap_or_default().as_millis(),
                SET_ASIDE.as_secs()
            );
        }
        aside[i] = Some(Aside {
            until: Instant::now() + SET_ASIDE,
            why,
        });
    }

    /// The nodes set aside now.
    pub(crate) fn report(&self) -> Vec<SetAside> {
        let now = Instant::now();
        let aside = self.aside.lock().unwrap_or_else(|p| p.into_inner());
        aside
            .iter()
            .enumerate()
            .filter_map(|(i, a)| {
                let a = a.as_ref().filter(|a| a.until > now)?;
                Some(SetAside {
                    addr: self.addrs[i].clone(),
                    why: a.why.clone(),
                    secs_left: a.until.saturating_duration_since(now).as_secs() + 1,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_node_is_skipped_until_it_answers_and_hedging_follows_the_round_trip() {
        let nodes = Nodes::new(vec!["a".into(), "b".into(), "c".into()]);
        assert_eq!(nodes.hedge_after(), HEDGE_FLOOR);
        assert_eq!((0..4).map(|k| nodes.pick(k)).collect::<Vec<_>>(), [0, 1, 2, 0]);
        nodes.set_aside(0, HEDGE_FLOOR);
        assert_eq!((0..3).map(|k| nodes.pick(k)).collect::<Vec<_>>(), [1, 2, 1]);
        assert_eq!(nodes.other_than(1), Some(2));
        assert_eq!(nodes.report().len(), 1);
        assert_eq!(nodes.report()[0].addr, "a");
        nodes.answered(2, Duration::from_millis(100));
        assert_eq!(nodes.pick(0), 2);
        assert_eq!(nodes.hedge_after(), Duration::from_millis(400));
        nodes.answered(0, Duration::from_millis(100));
        assert!(nodes.report().is_empty());
        // Every node set aside: they are all asked again, in turn.
        for i in 0..3 {
            nodes.set_aside(i, HEDGE_FLOOR);
        }
        assert_eq!(nodes.other_than(0), None);
        assert_eq!((0..3).map(|k| nodes.pick(k)).collect::<Vec<_>>(), [0, 1, 2]);
    }
}
