//! Retry policy: bounded attempts, exponential backoff with jitter, stalls.

use std::time::Duration;

/// How hard to try before giving up.
///
/// A request is retried on 5xx, 408, 429, connection errors and timeouts,
/// with `initial_backoff × 2^(n-1)` (capped at `max_backoff`, halved by
/// random jitter, stretched to a server's `Retry-After` up to the cap)
/// between attempts. Mirrors get one attempt each; the last host (the
/// server) gets `max_attempts`.
///
/// A body that breaks (reset, truncated, or no byte for `stall_timeout`) is
/// resumed with a `Range` request from the byte it reached; a read gives
/// up after `max_attempts` failures in a row without progress or
/// `max_resumes` resumes in all.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Attempts per request on the last host (at least 1).
    pub max_attempts: u32,
    /// The first backoff.
    pub initial_backoff: Duration,
    /// The largest backoff.
    pub max_backoff: Duration,
    /// A body that delivers no byte for this long is treated as broken.
    pub stall_timeout: Duration,
    /// How many times one blob or range read may be resumed.
    pub max_resumes: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(30),
            max_resumes: 32,
        }
    }
}

impl RetryPolicy {
    /// The pause before retry number `attempt` (1-based): exponential,
    /// capped, with "equal jitter" (half fixed, half random) so that
    /// parallel readers do not retry in lock step.
    pub(crate) fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let shift = attempt.saturating_sub(1).min(20);
        let exp = self
            .initial_backoff
            .saturating_mul(1u32 << shift)
            .min(self.max_backoff);
        let half = exp / 2;
        let jitter = Duration::from_nanos(fastrand::u64(
            0..=half.as_nanos().min(u64::MAX as u128) as u64,
        ));
        let d = half + jitter;
        match retry_after {
            Some(ra) => d.max(ra.min(self.max_backoff)),
            None => d,
        }
    }

    pub(crate) fn attempts(&self) -> u32 {
        self.max_attempts.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            ..Default::default()
        };
        for _ in 0..100 {
            let b1 = p.backoff(1, None);
            assert!(b1 >= Duration::from_millis(50) && b1 <= Duration::from_millis(100));
            let b3 = p.backoff(3, None);
            assert!(b3 >= Duration::from_millis(200) && b3 <= Duration::from_millis(400));
            assert!(p.backoff(30, None) <= Duration::from_secs(1));
            assert!(p.backoff(1, Some(Duration::from_millis(700))) >= Duration::from_millis(700));
            assert!(p.backoff(1, Some(Duration::from_secs(60))) <= Duration::from_secs(1));
        }
    }
}
