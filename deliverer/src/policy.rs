//! When to try again: the retry schedule with jitter and `Retry-After`; the limit of requests in
//! flight per callback host (each replica's own). The circuit breaker every replica shares is
//! [`crate::health`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use model::retry::JITTER_FRACTION;
use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long a delivery waits for a slot of its host before it is put back (without spending an
/// attempt).
pub const HOST_SLOT_WAIT: Duration = Duration::from_secs(2);

/// `delay` ± [`JITTER_FRACTION`] (20 %), so retries of many events that failed together do not
/// arrive together.
pub fn jitter(delay: Duration) -> Duration {
    let factor = rand::rng().random_range(1.0 - JITTER_FRACTION..=1.0 + JITTER_FRACTION);
    delay.mul_f64(factor)
}

/// The wait after failed attempt number `attempt` (1-based), or `None` when the schedule is spent
/// and the event goes to the dead-letter stream. A receiver's `Retry-After` is honoured, clamped
/// to the schedule's shortest and longest waits.
pub fn next_wait(
    schedule: &[Duration],
    attempt: u64,
    retry_after: Option<Duration>,
) -> Option<Duration> {
    let index = usize::try_from(attempt).ok()?.checked_sub(1)?;
    let planned = *schedule.get(index)?;
    let min = schedule.iter().min().copied().unwrap_or(planned);
    let max = schedule.iter().max().copied().unwrap_or(planned);
    Some(match retry_after {
        Some(asked) => asked.clamp(min, max),
        None => jitter(planned),
    })
}

/// At most `per_host` requests in flight to one host.
#[derive(Debug)]
pub struct HostLimits {
    per_host: usize,
    hosts: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl HostLimits {
    pub fn new(per_host: usize) -> Self {
        Self {
            per_host,
            hosts: Mutex::new(HashMap::new()),
        }
    }

    /// A slot for `host`, waiting at most [`HOST_SLOT_WAIT`].
    pub async fn acquire(&self, host: &str) -> Option<OwnedSemaphorePermit> {
        let semaphore = {
            let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(
                hosts
                    .entry(host.to_owned())
                    .or_insert_with(|| Arc::new(Semaphore::new(self.per_host))),
            )
        };
        tokio::time::timeout(HOST_SLOT_WAIT, semaphore.acquire_owned())
            .await
            .ok()
            .and_then(Result::ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_has_jitter_and_an_end() {
        let schedule = [Duration::from_secs(10), Duration::from_secs(100)];
        for _ in 0..100 {
            let w = next_wait(&schedule, 1, None).unwrap();
            assert!(
                w >= Duration::from_secs(8) && w <= Duration::from_secs(12),
                "{w:?}"
            );
        }
        assert!(next_wait(&schedule, 2, None).unwrap() >= Duration::from_secs(80));
        assert_eq!(next_wait(&schedule, 3, None), None);
        assert_eq!(next_wait(&schedule, 0, None), None);
    }

    #[test]
    fn retry_after_is_clamped_to_the_schedule() {
        let schedule = [Duration::from_secs(10), Duration::from_secs(100)];
        assert_eq!(
            next_wait(&schedule, 1, Some(Duration::from_secs(50))),
            Some(Duration::from_secs(50))
        );
        assert_eq!(
            next_wait(&schedule, 1, Some(Duration::from_secs(1))),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            next_wait(&schedule, 1, Some(Duration::from_secs(9999))),
            Some(Duration::from_secs(100))
        );
    }

    #[tokio::test]
    async fn host_limits_bound_each_host() {
        let limits = HostLimits::new(1);
        let first = limits.acquire("a").await;
        assert!(first.is_some());
        assert!(limits.acquire("b").await.is_some());
        tokio::time::pause();
        assert!(
            limits.acquire("a").await.is_none(),
            "second slot for a times out"
        );
        drop(first);
        assert!(limits.acquire("a").await.is_some());
    }
}
