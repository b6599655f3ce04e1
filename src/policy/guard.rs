//! The usage guard: per identity (a user running a program), sliding-window counts of opens,
//! KMS unwraps and bytes read, and what happens when one crosses its threshold.
//!
//! A crossing always raises one alert (until the count falls back under the threshold), then
//! the guard's action applies to that identity alone: nothing more (`alert`), its further
//! opens spaced out (`throttle`: the replies are parked, no FUSE worker sleeps), its opens
//! refused for a cool-down (`deny`, the default), or the whole mount locked (`lock`, which
//! applies only where an admin wrote it). The guard acts on opens: reads through descriptors
//! already open carry on, as they do after a chmod.

use super::identity::{Identity, UsageKey};
use super::selector::Selector;
use lru::LruCache;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Alert,
    Throttle,
    Deny,
    Lock,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Alert => "alert",
            Action::Throttle => "throttle",
            Action::Deny => "deny",
            Action::Lock => "lock",
        }
    }
}

/// Thresholds per window; `None` is not watched.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub opens: Option<u64>,
    pub unwraps: Option<u64>,
    pub bytes_read: Option<u64>,
}

#[derive(Debug)]
pub struct GuardRule {
    pub name: std::sync::Arc<str>,
    pub select: Selector,
    pub window: Duration,
    pub limits: Limits,
    pub action: Action,
    /// How long `deny` refuses the identity's opens.
    pub cooldown: Duration,
    /// How far apart `throttle` spaces the identity's opens.
    pub delay: Duration,
}

/// What is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    Opens,
    Unwraps,
    BytesRead,
}

impl Counter {
    pub fn as_str(self) -> &'static str {
        match self {
            Counter::Opens => "opens",
            Counter::Unwraps => "unwraps",
            Counter::BytesRead => "bytes_read",
        }
    }
}

/// A threshold crossed: one alert.
#[derive(Debug, Clone)]
pub struct Crossing {
    pub guard: std::sync::Arc<str>,
    pub counter: Counter,
    pub count: u64,
    pub limit: u64,
    pub window: Duration,
    pub action: Action,
}

/// What the guard says of an open.
#[derive(Debug)]
pub enum Gate {
    Go,
    /// Answer the open after this long.
    After(Duration),
    /// Refused: the identity is in a `deny` cool-down of this guard.
    Refused(std::sync::Arc<str>),
    /// Refused: so many opens of this identity are waiting out their throttle already.
    Busy,
}

/// Buckets per window: counts are exact to 1/16 of the window.
const BUCKETS: usize = 16;

/// A count over the last window, in buckets: bounded memory whatever the rate.
#[derive(Debug, Clone)]
struct Window {
    width: Duration,
    counts: [u64; BUCKETS],
    /// The bucket last added to, counted from `epoch`.
    head: u64,
}

impl Window {
    fn new(window: Duration) -> Window {
        Window {
            width: (window / BUCKETS as u32).max(Duration::from_millis(1)),
            counts: [0; BUCKETS],
            head: 0,
        }
    }

    /// Adds `n` at `at` and returns the count over the window.
    fn add(&mut self, at: Duration, n: u64) -> u64 {
        let slot = (at.as_nanos() / self.width.as_nanos()) as u64;
        let stale = slot.saturating_sub(self.head).min(BUCKETS as u64);
        for s in 0..stale {
            self.counts[((slot - s) % BUCKETS as u64) as usize] = 0;
        }
        self.head = self.head.max(slot);
        self.counts[(slot % BUCKETS as u64) as usize] += n;
        self.counts.iter().sum()
    }
}

/// One identity under one guard.
struct State {
    windows: [Window; 3],
    /// Above a threshold now (alerted once for this crossing).
    over: bool,
    denied_until: Option<Instant>,
    /// Throttling: when the next open may be answered.
    next_open: Instant,
}

/// Identities watched at once; the least recently active is forgotten past this.
const IDENTITIES: usize = 4096;

/// The guards' counts, for the policy in force (a reload starts them afresh).
pub struct Usage {
    epoch: Instant,
    states: Mutex<LruCache<(usize, UsageKey), State>>,
}

impl Default for Usage {
    fn default() -> Self {
        Usage {
            epoch: Instant::now(),
            states: Mutex::new(LruCache::new(
                NonZeroUsize::new(IDENTITIES).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }
}

impl Usage {
    /// An open by `who`: refused during a cool-down, else counted; spaced out while
    /// throttled. Crossings found are pushed to `crossed`.
    pub fn open(&self, guards: &[GuardRule], who: &Identity, crossed: &mut Vec<Crossing>) -> Gate {
        let now = Instant::now();
        let mut gate = Gate::Go;
        self.each(guards, who, |g, st| {
            if let Some(until) = st.denied_until {
                if now < until {
                    gate = Gate::Refused(g.name.clone());
                    return;
                }
                st.denied_until = None;
            }
            if let Some(c) = self.count(g, st, Counter::Opens, 1, now) {
                if g.action == Action::Deny {
                    gate = Gate::Refused(g.name.clone());
                }
                crossed.push(c);
            }
            if st.over && g.action == Action::Throttle && !matches!(gate, Gate::Refused(_)) {
                st.next_open = st.next_open.max(now) + g.delay;
                let wait = st.next_open - now;
                // A backlog of more than a window's worth is refused rather than queued.
                if wait > g.window {
                    st.next_open -= g.delay;
                    gate = Gate::Busy;
                } else if !matches!(gate, Gate::Busy) {
                    gate = match gate {
                        Gate::After(w) => Gate::After(w.max(wait)),
                        _ => Gate::After(wait),
                    };
                }
            }
        });
        gate
    }

    /// `n` of `counter` by `who` (an unwrap, bytes read); crossings pushed to `crossed`.
    pub fn add(
        &self,
        guards: &[GuardRule],
        who: &Identity,
        counter: Counter,
        n: u64,
        crossed: &mut Vec<Crossing>,
    ) {
        let now = Instant::now();
        self.each(guards, who, |g, st| {
            if let Some(c) = self.count(g, st, counter, n, now) {
                crossed.push(c);
            }
        });
    }

    /// Identities in a cool-down or throttled now, for `kmsfs status`.
    pub fn restricted(&self) -> Vec<(UsageKey, &'static str)> {
        let now = Instant::now();
        let states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        states
            .iter()
            .filter_map(|((_, key), st)| {
                if st.denied_until.is_some_and(|u| u > now) {
                    Some((*key, "denied"))
                } else if st.next_open > now {
                    Some((*key, "throttled"))
                } else {
                    None
                }
            })
            .collect()
    }

    fn each(&self, guards: &[GuardRule], who: &Identity, mut f: impl FnMut(&GuardRule, &mut State)) {
        let mut states = None;
        for (i, g) in guards.iter().enumerate() {
            if !g.select.matches(who) {
                continue;
            }
            let states = states.get_or_insert_with(|| self.states.lock().unwrap_or_else(|p| p.into_inner()));
            let st = states.get_or_insert_mut((i, who.usage_key()), || State {
                windows: [
                    Window::new(g.window),
                    Window::new(g.window),
                    Window::new(g.window),
                ],
                over: false,
                denied_until: None,
                next_open: Instant::now(),
            });
            f(g, st);
        }
    }

    /// Counts `n`, and returns the crossing if this is the one that crossed a threshold.
    fn count(
        &self,
        g: &GuardRule,
        st: &mut State,
        counter: Counter,
        n: u64,
        now: Instant,
    ) -> Option<Crossing> {
        let at = now - self.epoch;
        let (i, limit) = match counter {
            Counter::Opens => (0, g.limits.opens),
            Counter::Unwraps => (1, g.limits.unwraps),
            Counter::BytesRead => (2, g.limits.bytes_read),
        };
        let total = st.windows[i].add(at, n);
        // Still over any threshold? (Counters not added to now are read by adding nothing.)
        let over = [
            (0, g.limits.opens),
            (1, g.limits.unwraps),
            (2, g.limits.bytes_read),
        ]
        .iter()
        .any(|&(j, l)| l.is_some_and(|l| st.windows[j].add(at, 0) > l));
        let crossed = over && !st.over;
        st.over = over;
        let limit = limit?;
        if !crossed || total <= limit {
            return None;
        }
        match g.action {
            Action::Deny => st.denied_until = Some(now + g.cooldown),
            Action::Throttle => st.next_open = st.next_open.max(now),
            Action::Alert | Action::Lock => {}
        }
        Some(Crossing {
            guard: g.name.clone(),
            counter,
            count: total,
            limit,
            window: g.window,
            action: g.action,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(action: Action, opens: Option<u64>, bytes: Option<u64>) -> GuardRule {
        GuardRule {
            name: "g".into(),
            select: Selector::default(),
            window: Duration::from_secs(60),
            limits: Limits {
                opens,
                unwraps: None,
                bytes_read: bytes,
            },
            action,
            cooldown: Duration::from_secs(600),
            delay: Duration::from_millis(100),
        }
    }

    fn me() -> Identity {
        Identity::new(1000, 1000, std::process::id(), None)
    }

    #[test]
    fn a_window_forgets_what_slid_out() {
        let mut w = Window::new(Duration::from_secs(16));
        assert_eq!(w.add(Duration::from_secs(0), 5), 5);
        assert_eq!(w.add(Duration::from_secs(10), 1), 6);
        assert_eq!(w.add(Duration::from_secs(16), 1), 2, "the first second slid out");
        assert_eq!(w.add(Duration::from_secs(100), 0), 0);
    }

    #[test]
    fn deny_refuses_from_the_crossing_open_for_the_cooldown() {
        let gs = [guard(Action::Deny, Some(3), None)];
        let u = Usage::default();
        let mut crossed = Vec::new();
        for _ in 0..3 {
            assert!(matches!(u.open(&gs, &me(), &mut crossed), Gate::Go));
        }
        assert!(crossed.is_empty());
        assert!(matches!(u.open(&gs, &me(), &mut crossed), Gate::Refused(_)));
        assert_eq!(crossed.len(), 1, "one alert per crossing");
        assert!(matches!(u.open(&gs, &me(), &mut crossed), Gate::Refused(_)));
        assert_eq!(crossed.len(), 1);
        // Another identity is not affected.
        let other = Identity::new(1001, 1000, std::process::id(), None);
        assert!(matches!(u.open(&gs, &other, &mut crossed), Gate::Go));
        assert_eq!(u.restricted().len(), 1);
    }

    #[test]
    fn alert_only_alerts_once() {
        let gs = [guard(Action::Alert, Some(2), None)];
        let u = Usage::default();
        let mut crossed = Vec::new();
        for _ in 0..10 {
            assert!(matches!(u.open(&gs, &me(), &mut crossed), Gate::Go));
        }
        assert_eq!(crossed.len(), 1);
        assert_eq!(crossed[0].count, 3);
    }

    #[test]
    fn throttle_spaces_opens_and_refuses_a_backlog() {
        let gs = [guard(Action::Throttle, Some(2), None)];
        let u = Usage::default();
        let mut crossed = Vec::new();
        let mut delays = Vec::new();
        for _ in 0..700 {
            match u.open(&gs, &me(), &mut crossed) {
                Gate::Go => delays.push(Duration::ZERO),
                Gate::After(d) => delays.push(d),
                Gate::Busy => break,
                Gate::Refused(_) => panic!("throttle refuses no one"),
            }
        }
        assert_eq!(&delays[..2], &[Duration::ZERO, Duration::ZERO]);
        assert!(
            delays[3] > delays[2] && delays[2] >= Duration::from_millis(90),
            "{delays:?}"
        );
        assert!(delays.len() < 700, "a backlog past the window is refused");
    }

    #[test]
    fn bytes_read_cross_on_reads() {
        let gs = [guard(Action::Deny, None, Some(1000))];
        let u = Usage::default();
        let mut crossed = Vec::new();
        u.add(&gs, &me(), Counter::BytesRead, 600, &mut crossed);
        assert!(crossed.is_empty());
        u.add(&gs, &me(), Counter::BytesRead, 600, &mut crossed);
        assert_eq!(crossed[0].counter, Counter::BytesRead);
        assert!(matches!(u.open(&gs, &me(), &mut crossed), Gate::Refused(_)));
    }
}
