//! Retrying failed calls: consecutive failures since the last progress, the backoff with
//! jitter before the next attempt, and when to give up.

use std::time::{Duration, Instant};

use tonic::Status;

use super::{ClientError, ReconnectPolicy};

/// Consecutive failures since the last progress.
pub(super) struct Retry<'a> {
    policy: &'a ReconnectPolicy,
    failures: u32,
    since: Instant,
}

impl<'a> Retry<'a> {
    pub(super) fn new(policy: &'a ReconnectPolicy) -> Self {
        Self {
            policy,
            failures: 0,
            since: Instant::now(),
        }
    }

    pub(super) fn progress(&mut self) {
        self.failures = 0;
        self.since = Instant::now();
    }

    /// The wait before the next attempt, or the error to give up with.
    pub(super) fn after_failure(
        &mut self,
        status: Status,
        endpoint: &str,
    ) -> Result<Duration, ClientError> {
        self.failures += 1;
        let elapsed = self.since.elapsed();
        let delay = jitter(self.policy.backoff(self.failures));
        let out_of_attempts = self
            .policy
            .max_attempts
            .is_some_and(|max| self.failures >= max);
        let out_of_time = self
            .policy
            .give_up_after
            .is_some_and(|limit| elapsed + delay > limit);
        if out_of_attempts || out_of_time {
            return Err(ClientError::RetriesExhausted {
                attempts: self.failures,
                elapsed,
                last: Box::new(status),
            });
        }
        tracing::warn!(
            endpoint,
            code = ?status.code(),
            message = status.message(),
            attempt = self.failures,
            delay_ms = delay.as_millis() as u64,
            "loader call failed; retrying"
        );
        Ok(delay)
    }
}

/// Scales `d` by a factor in [0.8, 1.2), so clients that lost the same server do not all come
/// back in the same instant. The clock's sub-second digits are random enough for that.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.subsec_nanos());
    d.mul_f64(0.8 + 0.4 * f64::from(nanos % 1_000_000) / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_a_fifth() {
        for _ in 0..20 {
            let j = jitter(Duration::from_millis(1000)).as_millis();
            assert!((800..1200).contains(&j), "{j}");
        }
    }
}
