//! Backoff between attempts of a network KMS request, for every network backend: the pause
//! doubles per attempt (50 ms, 100 ms, 200 ms … up to 1.6 s) and is jittered by ±50 % so
//! that many clients throttled at once do not come back at once.

use crate::crypto::fill_random;
use std::time::Duration;

/// The pause before attempt `attempt + 1`: a random point in [base/2, base * 3/2).
pub(in crate::kms) fn backoff_delay(attempt: u32) -> Duration {
    let base = 50u64 << attempt.min(5);
    let mut r = [0u8; 2];
    fill_random(&mut r);
    let jitter = u64::from(u16::from_le_bytes(r)) % base;
    Duration::from_millis(base / 2 + jitter)
}

/// The pause after attempt `attempt` (from 0) of `attempts`: none after the last one, whose
/// failure is final at once (a pause there only delays the error).
pub(in crate::kms) fn pause_after(attempt: u32, attempts: u32) -> Option<Duration> {
    (attempt + 1 < attempts).then(|| backoff_delay(attempt))
}

/// Sleeps for [`backoff_delay`]`(attempt)`.
pub(in crate::kms) async fn backoff(attempt: u32) {
    tokio::time::sleep(backoff_delay(attempt)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_and_stay_within_their_jitter() {
        for attempt in 0..10 {
            let base = 50u64 << attempt.min(5);
            for _ in 0..50 {
                let d = backoff_delay(attempt).as_millis() as u64;
                assert!((base / 2..base * 3 / 2).contains(&d), "attempt {attempt}: {d} ms");
            }
        }
    }

    #[test]
    fn no_pause_after_the_last_attempt() {
        for attempts in 1..8 {
            for attempt in 0..attempts {
                let pause = pause_after(attempt, attempts);
                assert_eq!(
                    pause.is_none(),
                    attempt + 1 == attempts,
                    "{attempt} of {attempts}"
                );
            }
        }
    }
}
