//! The KMS waiters: a small pool of threads on which opens and creates that need the KMS wait
//! for it, so that no FUSE worker does. A FUSE worker that meets a file whose key is not in
//! memory hands the open (and its reply) to this pool and returns to the kernel at once: files
//! already open, cached keys, metadata, `status` and `lock` carry on while the KMS is slow,
//! refusing or hung.
//!
//! Why threads of our own, not tokio's `spawn_blocking`: the bound is the point. The pool runs
//! at most [`MAX_THREADS`] jobs at once (enough for the KMS batcher to coalesce concurrent
//! unwraps) and queues at most [`MAX_QUEUED`] more; past that a job is refused at once
//! (EAGAIN) rather than made to wait on a FUSE worker, which would freeze the mount again.
//! `spawn_blocking` queues without bound and shares its threads with every other blocking task.
//! Threads start on demand and stay for the life of the mount.

use super::error::{FsError, FsResult};
use crate::kms::KmsError;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long one open may wait for the KMS, from when it was parked, and what ends the wait.
#[derive(Clone, Copy, Debug)]
pub enum Wait {
    /// Not at all: the caller is a FUSE worker. An operation that would need the KMS (or wait
    /// behind another open of the same file) fails with [`FsError::WouldWait`] and is parked.
    No,
    /// Until this instant (with the timeout it came from, for the message), or the lock.
    Until(Instant, Duration),
    /// Until the KMS answers (its own retry budget), or the lock.
    Forever,
}

impl Wait {
    /// A wait of at most `timeout` (if any) from now.
    pub fn from_now(timeout: Option<Duration>) -> Wait {
        match timeout {
            Some(t) => Wait::Until(Instant::now() + t, t),
            None => Wait::Forever,
        }
    }

    pub fn may_wait(self) -> bool {
        !matches!(self, Wait::No)
    }
}

/// Runs a KMS call on `runtime` until it answers, the deadline of `wait` passes (then it is
/// *unreachable*: the caller reports and logs it as such) or the volume is locked (then
/// `Err(Locked)` at once, whatever the KMS is doing). Never called with `Wait::No`.
pub(super) fn wait_kms<T>(
    runtime: &tokio::runtime::Handle,
    locked: &tokio::sync::watch::Receiver<bool>,
    wait: Wait,
    call: impl std::future::Future<Output = Result<T, KmsError>>,
) -> FsResult<Result<T, KmsError>> {
    let mut locked = locked.clone();
    runtime.block_on(async move {
        let deadline = async {
            match wait {
                Wait::Until(at, t) => {
                    tokio::time::sleep_until(at.into()).await;
                    t
                }
                Wait::No | Wait::Forever => std::future::pending().await,
            }
        };
        tokio::select! {
            r = call => Ok(r),
            _ = locked.wait_for(|l| *l) => Err(FsError::Locked),
            t = deadline => Ok(Err(KmsError::Unreachable(format!(
                "no answer within {} s (--open-timeout)",
                t.as_secs_f64()
            )))),
        }
    })
}

/// Jobs waiting on the KMS at once.
pub const MAX_THREADS: usize = 64;
/// Jobs queued behind them before new ones are refused.
pub const MAX_QUEUED: usize = 1024;

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    threads: usize,
    idle: usize,
}

#[derive(Default)]
struct Shared {
    /// The queue and the thread counts. Taken briefly by `submit` (a FUSE worker) and by each
    /// waiter between jobs; never held while a job runs.
    state: Mutex<State>,
    /// Signalled when a job is queued.
    work: Condvar,
}

/// The pool. Cheap to share; its threads run until the process exits.
#[derive(Default)]
pub struct Waiters {
    shared: Arc<Shared>,
}

impl Waiters {
    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `job`; gives it back when the pool is full (or no thread can be started and
    /// none is running), so that the caller can fail it.
    pub fn submit(&self, job: Job) -> Result<(), Job> {
        let mut st = self.state();
        if st.queue.len() >= MAX_QUEUED {
            return Err(job);
        }
        st.queue.push_back(job);
        if st.idle >= st.queue.len() || st.threads >= MAX_THREADS {
            self.shared.work.notify_one();
            return Ok(());
        }
        let shared = self.shared.clone();
        let started = std::thread::Builder::new()
            .name("kmsfs-kms-wait".into())
            .spawn(move || run(&shared));
        match started {
            Ok(_) => st.threads += 1,
            Err(e) => {
                log::error!("cannot start a KMS waiter thread: {e}");
                if st.threads == 0 {
                    return Err(st.queue.pop_back().expect("just queued"));
                }
                self.shared.work.notify_one();
            }
        }
        Ok(())
    }

    /// Jobs queued and not yet started.
    #[cfg(test)]
    pub fn queued(&self) -> usize {
        self.state().queue.len()
    }
}

fn run(shared: &Shared) {
    let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if let Some(job) = st.queue.pop_front() {
            drop(st);
            job();
            st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
            continue;
        }
        st.idle += 1;
        st = shared.work.wait(st).unwrap_or_else(|p| p.into_inner());
        st.idle -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn jobs_run_off_the_caller_and_a_full_pool_refuses() {
        let w = Waiters::default();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Arc::new(Mutex::new(release_rx));
        let (done_tx, done_rx) = mpsc::channel();
        let submit = |n: usize| {
            for _ in 0..n {
                let (rx, tx) = (release_rx.clone(), done_tx.clone());
                let job: Job = Box::new(move || {
                    let _ = rx.lock().unwrap().recv();
                    let _ = tx.send(());
                });
                assert!(w.submit(job).is_ok());
            }
        };
        // Every thread blocked in a job, then the queue full: the next job comes back at once.
        submit(MAX_THREADS);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while w.queued() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        submit(MAX_QUEUED);
        assert!(w.submit(Box::new(|| {})).is_err(), "a full pool refuses");
        for _ in 0..MAX_THREADS + MAX_QUEUED {
            release_tx.send(()).unwrap();
        }
        for _ in 0..MAX_THREADS + MAX_QUEUED {
            done_rx
                .recv_timeout(Duration::from_secs(10))
                .expect("every job ran");
        }
        assert!(w.state().threads <= MAX_THREADS);
        assert!(w.submit(Box::new(|| {})).is_ok(), "room again");
    }
}
