//! When to try again: the retry schedule with jitter and `Retry-After`; the circuit breaker per
//! callback URL; the limit of requests in flight per callback host.
//!
//! Breaker state and host slots live in each deliverer replica's memory: replicas learn about a
//! dead endpoint on their own, each after `DELIVER_BREAKER_FAILURES` failures.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{IntCounterVec, IntGauge};
use rand::Rng;
use shared::retry::JITTER_FRACTION;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

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

/// `Retry-After` in seconds (the HTTP-date form is read as absent).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen,
}

/// Whether a delivery may go now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Go,
    /// The breaker is open (or a probe is out): put the event back for this long.
    Wait(Duration),
}

/// Circuit breakers by callback URL: `failures_to_open` consecutive failures open one for
/// `cooldown`; then one probe goes; its success closes the breaker, its failure opens it again.
#[derive(Debug)]
pub struct Breakers {
    states: Mutex<HashMap<String, State>>,
    failures_to_open: u32,
    cooldown: Duration,
    open_gauge: IntGauge,
    transitions: IntCounterVec,
}

impl Breakers {
    pub fn new(
        failures_to_open: u32,
        cooldown: Duration,
        open_gauge: IntGauge,
        transitions: IntCounterVec,
    ) -> Self {
        Self {
            states: Mutex::new(HashMap::new()),
            failures_to_open,
            cooldown,
            open_gauge,
            transitions,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, State>) -> T) -> T {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let out = f(&mut states);
        let open = states
            .values()
            .filter(|s| !matches!(s, State::Closed { .. }))
            .count();
        self.open_gauge.set(open as i64);
        out
    }

    pub fn admit(&self, url: &str) -> Admit {
        let now = Instant::now();
        let probe_wait =
            (self.cooldown / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        self.with(|states| match states.get(url).copied() {
            None | Some(State::Closed { .. }) => Admit::Go,
            Some(State::Open { until }) if now < until => Admit::Wait(until - now),
            Some(State::Open { .. }) => {
                states.insert(url.to_owned(), State::HalfOpen);
                self.transitions.with_label_values(&["half_open"]).inc();
                Admit::Go
            }
            Some(State::HalfOpen) => Admit::Wait(probe_wait),
        })
    }

    /// A request [`Breakers::admit`] let through was not sent after all (its host had no free
    /// slot, or its address was refused). When it was the probe, the next delivery may probe
    /// instead: a probe whose result never comes would hold the URL's events forever.
    pub fn not_sent(&self, url: &str) {
        self.with(|states| {
            if states.get(url) == Some(&State::HalfOpen) {
                states.insert(
                    url.to_owned(),
                    State::Open {
                        until: Instant::now(),
                    },
                );
            }
        });
    }

    pub fn record(&self, url: &str, success: bool) {
        self.with(|states| {
            let state = states
                .get(url)
                .copied()
                .unwrap_or(State::Closed { failures: 0 });
            if success {
                if state != (State::Closed { failures: 0 }) {
                    if !matches!(state, State::Closed { .. }) {
                        self.transitions.with_label_values(&["closed"]).inc();
                    }
                    states.remove(url);
                }
                return;
            }
            let next = match state {
                State::Closed { failures } if failures + 1 < self.failures_to_open => {
                    State::Closed {
                        failures: failures + 1,
                    }
                }
                // A late result while already open changes nothing.
                State::Open { until } => State::Open { until },
                _ => {
                    self.transitions.with_label_values(&["open"]).inc();
                    State::Open {
                        until: Instant::now() + self.cooldown,
                    }
                }
            };
            states.insert(url.to_owned(), next);
        });
    }
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
    use prometheus::Opts;

    fn breakers(n: u32, cooldown_ms: u64) -> Breakers {
        Breakers::new(
            n,
            Duration::from_millis(cooldown_ms),
            IntGauge::new("g", "g").unwrap(),
            IntCounterVec::new(Opts::new("t", "t"), &["to"]).unwrap(),
        )
    }

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
        assert_eq!(parse_retry_after(" 120 "), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn breaker_opens_probes_and_closes() {
        let b = breakers(3, 1000);
        for _ in 0..2 {
            b.record("u", false);
            assert_eq!(b.admit("u"), Admit::Go);
        }
        b.record("u", false);
        assert!(matches!(b.admit("u"), Admit::Wait(_)));
        assert_eq!(b.admit("other"), Admit::Go);
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert_eq!(b.admit("u"), Admit::Go, "one probe after the cool-down");
        assert!(
            matches!(b.admit("u"), Admit::Wait(_)),
            "only one probe at a time"
        );
        b.record("u", false);
        assert!(
            matches!(b.admit("u"), Admit::Wait(_)),
            "a failed probe opens it again"
        );
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert_eq!(b.admit("u"), Admit::Go);
        b.record("u", true);
        assert_eq!(b.admit("u"), Admit::Go);
        assert_eq!(b.open_gauge.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_not_sent_lets_the_next_one_probe() {
        let b = breakers(1, 1000);
        b.record("u", false);
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert_eq!(b.admit("u"), Admit::Go, "the probe");
        b.not_sent("u");
        assert_eq!(b.admit("u"), Admit::Go, "another probe, at once");
        b.record("u", true);
        assert_eq!(b.open_gauge.get(), 0);
        // Closed: a request not sent changes nothing.
        b.not_sent("u");
        assert_eq!(b.admit("u"), Admit::Go);
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
