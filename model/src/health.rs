//! The health of a callback URL that every deliverer replica shares (stored in
//! `ECWID_CALLBACKS` under [`callback_key`]): its circuit breaker, consecutive failures and
//! success counts per minute, and the rules that move them. Times are Unix milliseconds.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A circuit breaker's position.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Breaker {
    #[default]
    Closed,
    Open,
    HalfOpen,
}

impl Breaker {
    pub fn as_str(self) -> &'static str {
        match self {
            Breaker::Closed => "closed",
            Breaker::Open => "open",
            Breaker::HalfOpen => "half_open",
        }
    }
}

/// Minutes of success counts kept for the success rate.
pub const RATE_MINUTES: i64 = 60;
/// The longest `lastError` kept.
pub const MAX_ERROR_CHARS: usize = 300;

/// The value under a callback URL's key in `ECWID_CALLBACKS`: one breaker and one failure count
/// per URL, shared by every replica (and by every instance that uses the URL). Times are Unix
/// milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CallbackHealth {
    pub breaker: Breaker,
    pub consecutive_failures: u32,
    /// While open: when the next probe may go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_until_ms: Option<i64>,
    /// While half open: until when the replica that took the probe holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_until_ms: Option<i64>,
    /// The first failure after the last success (what auto-disable measures from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_since_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// `[minute since the epoch, successes, failures]`, the last [`RATE_MINUTES`] minutes.
    #[serde(default)]
    pub minutes: Vec<[i64; 3]>,
}

/// What a breaker says to a request about to go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Go,
    /// Open, or another replica's probe is out: put the event back for this long.
    Wait(Duration),
    /// The cool-down is over (or the last probe's holder vanished): whoever takes the probe
    /// (a compare-and-set of [`CallbackHealth::take_probe`]) may go.
    Probe,
}

/// Counts not yet written: successes (and failures) since the last write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub ok: i64,
    pub failed: i64,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}

impl CallbackHealth {
    /// Whether a request may go at `now_ms`.
    pub fn admit(&self, now_ms: i64, probe_wait: Duration) -> Admit {
        match self.breaker {
            Breaker::Closed => Admit::Go,
            Breaker::Open => match self.open_until_ms {
                Some(until) if now_ms < until => {
                    Admit::Wait(Duration::from_millis((until - now_ms) as u64))
                }
                _ => Admit::Probe,
            },
            Breaker::HalfOpen => match self.probe_until_ms {
                Some(until) if now_ms < until => Admit::Wait(probe_wait),
                _ => Admit::Probe,
            },
        }
    }

    /// This replica takes the probe until `now_ms + lease`.
    pub fn take_probe(&mut self, now_ms: i64, lease: Duration) {
        self.breaker = Breaker::HalfOpen;
        self.probe_until_ms = Some(now_ms + ms(lease));
        self.open_until_ms = None;
    }

    /// The probe taken was not sent after all: the next request may probe at once.
    pub fn give_back_probe(&mut self) {
        if self.breaker == Breaker::HalfOpen {
            self.probe_until_ms = None;
        }
    }

    /// Adds counts for the minute of `now_ms`, dropping minutes older than [`RATE_MINUTES`].
    pub fn add_counts(&mut self, now_ms: i64, counts: Counts) {
        let minute = now_ms.div_euclid(60_000);
        self.minutes.retain(|m| m[0] > minute - RATE_MINUTES);
        if counts == Counts::default() {
            return;
        }
        match self.minutes.iter_mut().find(|m| m[0] == minute) {
            Some(m) => {
                m[1] += counts.ok;
                m[2] += counts.failed;
            }
            None => self.minutes.push([minute, counts.ok, counts.failed]),
        }
    }

    /// Successes over all attempts in the last hour, `None` without attempts.
    pub fn success_rate(&self, now_ms: i64) -> Option<f64> {
        let minute = now_ms.div_euclid(60_000);
        let (ok, all) = self
            .minutes
            .iter()
            .filter(|m| m[0] > minute - RATE_MINUTES)
            .fold((0, 0), |(ok, all), m| (ok + m[1], all + m[1] + m[2]));
        (all > 0).then(|| ok as f64 / all as f64)
    }

    /// A request to this URL succeeded at `now_ms`: the breaker closes, the failures end.
    pub fn succeeded(&mut self, now_ms: i64) {
        self.breaker = Breaker::Closed;
        self.consecutive_failures = 0;
        self.open_until_ms = None;
        self.probe_until_ms = None;
        self.failing_since_ms = None;
        self.last_success_at_ms = Some(now_ms);
    }

    /// A request failed at `now_ms` with `error`. The breaker opens for `cooldown` after
    /// `failures_to_open` consecutive failures, or at once when a probe failed. Returns whether
    /// this failure opened it.
    pub fn failed(
        &mut self,
        now_ms: i64,
        error: &str,
        failures_to_open: u32,
        cooldown: Duration,
    ) -> bool {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.last_failure_at_ms = Some(now_ms);
        self.failing_since_ms.get_or_insert(now_ms);
        self.last_error = Some(crate::record::clip(error, MAX_ERROR_CHARS));
        let opens = match self.breaker {
            Breaker::Closed => self.consecutive_failures >= failures_to_open,
            Breaker::HalfOpen => true,
            Breaker::Open => false,
        };
        if opens {
            self.breaker = Breaker::Open;
            self.open_until_ms = Some(now_ms + ms(cooldown));
            self.probe_until_ms = None;
        }
        opens
    }

    /// How long its requests have failed without a success in between, at `now_ms`.
    pub fn failing_for(&self, now_ms: i64) -> Option<Duration> {
        self.failing_since_ms
            .map(|since| Duration::from_millis(u64::try_from(now_ms - since).unwrap_or(0)))
    }
}

/// The key of a callback URL in `ECWID_CALLBACKS`: a hash, so a URL's secrets (user info, query)
/// never become a key anyone can list.
pub fn callback_key(url: &str) -> String {
    crate::hex::lower(&Sha256::digest(url.as_bytes())[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breakers_serialize_as_the_api_names_them() {
        assert_eq!(
            serde_json::to_value(Breaker::HalfOpen).unwrap(),
            serde_json::json!("half_open")
        );
    }

    const COOL: Duration = Duration::from_secs(30);

    #[test]
    fn a_breaker_opens_after_its_failures_and_one_probe_decides() {
        let mut h = CallbackHealth::default();
        let wait = Duration::from_secs(1);
        assert_eq!(h.admit(0, wait), Admit::Go);
        assert!(!h.failed(1_000, "HTTP 503", 3, COOL));
        assert!(!h.failed(2_000, "HTTP 503", 3, COOL));
        assert_eq!(h.admit(2_500, wait), Admit::Go);
        assert!(h.failed(3_000, "HTTP 503", 3, COOL), "the third opens it");
        assert_eq!(h.breaker, Breaker::Open);
        assert_eq!(h.failing_since_ms, Some(1_000));
        assert_eq!(h.admit(13_000, wait), Admit::Wait(Duration::from_secs(20)));
        assert_eq!(h.admit(33_000, wait), Admit::Probe);
        h.take_probe(33_000, Duration::from_secs(10));
        assert_eq!(h.breaker, Breaker::HalfOpen);
        assert_eq!(
            h.admit(34_000, wait),
            Admit::Wait(wait),
            "one probe at a time"
        );
        assert_eq!(
            h.admit(43_001, wait),
            Admit::Probe,
            "a vanished prober's lease ends"
        );
        // A failed probe opens it again at once.
        assert!(h.failed(35_000, "timeout", 3, COOL));
        assert_eq!(h.open_until_ms, Some(65_000));
        assert_eq!(h.failing_for(95_000), Some(Duration::from_secs(94)));
        h.take_probe(66_000, Duration::from_secs(10));
        h.succeeded(67_000);
        assert_eq!(h.breaker, Breaker::Closed);
        assert_eq!(h.consecutive_failures, 0);
        assert_eq!(h.failing_since_ms, None);
        assert_eq!(h.last_success_at_ms, Some(67_000));
        assert_eq!(
            h.last_error.as_deref(),
            Some("timeout"),
            "kept for the health"
        );
    }

    #[test]
    fn a_probe_given_back_lets_the_next_request_probe() {
        let mut h = CallbackHealth::default();
        h.failed(0, "x", 1, COOL);
        h.take_probe(40_000, Duration::from_secs(10));
        h.give_back_probe();
        assert_eq!(h.admit(40_001, Duration::from_secs(1)), Admit::Probe);
    }

    #[test]
    fn the_success_rate_covers_the_last_hour() {
        let mut h = CallbackHealth::default();
        assert_eq!(h.success_rate(0), None);
        let minute = 60_000;
        h.add_counts(0, Counts { ok: 9, failed: 0 });
        h.add_counts(10 * minute, Counts { ok: 1, failed: 2 });
        h.add_counts(10 * minute + 5, Counts { ok: 2, failed: 2 });
        assert_eq!(h.minutes.len(), 2);
        assert_eq!(h.success_rate(10 * minute), Some(12.0 / 16.0));
        // An hour on, the first minute has left the window.
        assert_eq!(h.success_rate(60 * minute), Some(3.0 / 7.0));
        h.add_counts(71 * minute, Counts::default());
        assert!(h.minutes.is_empty(), "old minutes are dropped on write");
    }

    #[test]
    fn callback_keys_hide_the_url() {
        let key = callback_key("https://user:pw@example.com/hook?token=s3cret");
        assert_eq!(key.len(), 32);
        assert!(key.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(key, callback_key("https://example.com/hook"));
        // The first 16 bytes of SHA-256("abc"), lowercase hex.
        assert_eq!(callback_key("abc"), "ba7816bf8f01cfea414140de5dae2223");
    }
}
