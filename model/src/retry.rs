//! How long anything waits before it tries again, in one place: every put-back, retry and
//! backoff wait of every service, the waits after a transient failure of each stage, and the bounds a delivery retry
//! schedule must keep so that no retry outlives its message; a server's `Retry-After`, read once
//! for every client (the poller's Ecwid requests, the deliverer's callbacks).
//!
//! Waits after a message failed are held by the NATS server (NAK with a delay), never by a sleep
//! in the worker, so they survive restarts and cost nothing while they run.

use std::time::Duration;

use rand::Rng;

/// The first wait of the start-up backoff (connecting to NATS, setting up the topology: the
/// runtime's `shared::nats::startup_backoff`).
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest wait of the start-up backoff before jitter.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How long raw messages and envelopes are kept at least (the work streams' `max_age`): longer
/// than any retry schedule may last. Envelopes are kept as long as the event log's records too
/// (a record points to its envelope for redelivery), when that is longer.
pub const WORK_STREAM_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// The stage that gave up on a message (or waits before it tries again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Normalize,
    Deliver,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Normalize => "normalize",
            Stage::Deliver => "deliver",
        }
    }
}

/// The normalizer's first wait after its envelopes (or its dead letter) were not stored.
pub const NORMALIZE_FIRST_WAIT: Duration = Duration::from_secs(1);
/// The normalizer's longest such wait.
pub const NORMALIZE_MAX_WAIT: Duration = Duration::from_secs(30);

/// The deliverer's wait after it could not publish a dead letter. Flat, not growing: an
/// envelope's delivery count mostly counts callback attempts, so it says nothing about how long
/// NATS has been failing.
pub const DEAD_LETTER_RETRY: Duration = Duration::from_secs(5);

/// How long a delivery whose callback host had no free slot is put back for (before jitter;
/// the attempt is not spent).
pub const HOST_BUSY_WAIT: Duration = Duration::from_secs(1);

/// The longest wait a poller cycle sits through (a 429's `Retry-After`, a token paused by another
/// replica's 429). A longer one ends the cycle at once, so a store Ecwid asks to wait does not
/// keep one of the `POLLER_CONCURRENCY` slots; the paused budget keeps every replica from asking
/// before the wait is over.
pub const POLL_MAX_IN_CYCLE_WAIT: Duration = Duration::from_secs(5);

/// How long a delivery waits for a slot of its host before it is put back (without spending an
/// attempt).
pub const HOST_SLOT_WAIT: Duration = Duration::from_secs(2);

/// How long a delivery whose instance's queue in the deliverer is full waits for its slot behind
/// that queue, holding its consumer slot, before it is put back (without spending an attempt).
/// Short: while it waits, the pull loop has one slot fewer for the other instances.
pub const QUEUE_WAIT: Duration = Duration::from_secs(1);

/// The first put-back of a delivery whose instance has no free in-flight slot here; each further
/// put-back of the same message doubles it, up to [`BUSY_WAIT_MAX`].
pub const BUSY_WAIT_MIN: Duration = Duration::from_millis(200);

/// The longest such put-back.
pub const BUSY_WAIT_MAX: Duration = Duration::from_secs(5);

/// The longest put-back under a rate limit; a longer queue comes back and queues again.
pub const RATE_WAIT_MAX: Duration = Duration::from_secs(60);

/// The shortest put-back under a rate limit: long enough for the note that tells the other
/// replicas about it (the deliverer's deferrals) to arrive before the message can.
pub const RATE_WAIT_MIN: Duration = Duration::from_millis(100);

/// How long an ordered lane's envelope pulled just before its instance was held goes back for,
/// and how often a held lane looks again.
pub const HELD_RECHECK: Duration = Duration::from_secs(1);

/// The wait before a message whose event log row could be written neither to PostgreSQL nor to
/// the log's spool is offered again (it is not settled without its row).
pub const LOG_WRITE_RETRY_WAIT: Duration = Duration::from_secs(2);

/// The wait before a message whose move failed is offered again.
pub const HOLD_MOVE_RETRY: Duration = Duration::from_secs(2);

/// How long one message waits for its turn while the floor does not move before it is put back
/// (NAK with [`ORDER_RETRY_WAIT`]); bounded so that waiters never hold every work slot while the
/// message they wait for sits in this replica's buffer or waits for a retry.
pub const ORDER_WAIT: Duration = Duration::from_secs(1);

/// The longest one message waits for its turn at all, well within the consumer's `ack_wait`
/// (at least 20 s), so the server never hands it to another replica while it waits here.
pub const MAX_TURN_WAIT: Duration = Duration::from_secs(10);

/// The wait of a message put back because its turn had not come.
pub const ORDER_RETRY_WAIT: Duration = Duration::from_millis(200);

/// The first wait before a store whose cycle failed is polled again (never shorter than its
/// refresh interval).
pub const POLL_FAILED_BACKOFF_MIN: Duration = Duration::from_secs(1);

/// The longest such wait.
pub const POLL_FAILED_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// The wait after a 429 without a readable `Retry-After` (before the clamp).
pub const POLL_DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(60);

/// How long a message of `stage` waits after a transient failure (NATS did not store what the
/// stage produced), given the message's delivery count (1 on the first delivery).
///
/// - normalize: 1 s, 2 s, 4 s … capped at 30 s: the raw message is redelivered only for such
///   failures, so its delivery count measures how long they have lasted.
/// - deliver: [`DEAD_LETTER_RETRY`], flat.
pub fn transient(stage: Stage, delivered: u64) -> Duration {
    match stage {
        Stage::Normalize => {
            let doublings = delivered.clamp(1, 6) - 1;
            (NORMALIZE_FIRST_WAIT * (1u32 << doublings)).min(NORMALIZE_MAX_WAIT)
        }
        Stage::Deliver => DEAD_LETTER_RETRY,
    }
}

/// How far a planned retry wait may be stretched by jitter (±20 %).
pub const JITTER_FRACTION: f64 = 0.2;

/// The longest `DELIVER_TIMEOUT_MS` the deliverer accepts.
pub const MAX_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(600);

/// What one attempt may add to a message's life beyond the schedule's waits: the deliverer's
/// longest `ack_wait` (a host slot wait, [`MAX_ATTEMPT_TIMEOUT`], a margin) rounded up.
pub const ATTEMPT_ALLOWANCE: Duration = Duration::from_secs(11 * 60);

/// The longest wait a NATS server honours: it holds a NAK delay in signed 64-bit nanoseconds
/// and redelivers at once when the delay does not fit.
pub const MAX_WAIT: Duration = Duration::from_nanos(i64::MAX as u64);

/// A server's `Retry-After` in seconds, as a wait of at most `max`; `None` when absent from the
/// value's shape (the HTTP-date form, a negative or non-numeric value). The server is not
/// trusted: any number of seconds, however large (`1e20`, twenty digits), becomes `max` rather
/// than an overflow; fractions (`1.5`) are kept, as some servers send them.
pub fn parse_retry_after(value: &str, max: Duration) -> Option<Duration> {
    let secs: f64 = value.trim().parse().ok()?;
    if secs.is_nan() || secs < 0.0 {
        return None;
    }
    if secs >= max.as_secs_f64() {
        return Some(max);
    }
    // Below `max`, so it fits a Duration.
    Some(Duration::from_secs_f64(secs))
}

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

/// Parses a delivery retry schedule (`5s,30s,2m`: the waits between attempts, so one attempt
/// more than waits) and checks that it can be kept: every wait above zero and one the NATS
/// server can hold, and the whole schedule, stretched by jitter and with [`ATTEMPT_ALLOWANCE`]
/// per attempt, shorter than the retention of `ECWID_EVENTS`, so the last retry still finds
/// its message.
///
/// The deliverer's `DELIVER_RETRY_SCHEDULE` and an instance's
/// `event.notification.retry.schedule` both go through here.
pub fn parse_schedule(raw: &str) -> Result<Vec<Duration>, String> {
    let schedule = crate::units::parse_duration_list(raw)?;
    for wait in &schedule {
        if wait.is_zero() {
            return Err("every wait must be longer than zero".into());
        }
        if *wait > MAX_WAIT {
            return Err(format!("a wait of {wait:?} is longer than NATS can hold"));
        }
    }
    let worst = schedule
        .iter()
        .try_fold(Duration::ZERO, |total, wait| {
            total.checked_add(wait.mul_f64(1.0 + JITTER_FRACTION))
        })
        .and_then(|waits| {
            let attempts = u32::try_from(schedule.len() + 1).ok()?;
            waits.checked_add(ATTEMPT_ALLOWANCE.checked_mul(attempts)?)
        });
    match worst {
        Some(worst) if worst < WORK_STREAM_MAX_AGE => Ok(schedule),
        _ => Err(format!(
            "the schedule with its jitter (+{:.0} %) and {} min per attempt must take less than \
             the {} days events are kept",
            JITTER_FRACTION * 100.0,
            ATTEMPT_ALLOWANCE.as_secs() / 60,
            WORK_STREAM_MAX_AGE.as_secs() / 86_400
        )),
    }
}

/// How long a delivery retry schedule lasts, as the event log's retention must cover it: the sum
/// of its waits. A record that expires sooner vanishes from the log while its event is still
/// retried. The deliverer's `DELIVER_RETRY_SCHEDULE` (at start-up) and an instance's
/// `event.notification.retry.schedule` (in the admin API) are both held to it.
pub fn schedule_span(schedule: &[Duration]) -> Duration {
    schedule.iter().sum()
}

/// Whether the event log, keeping records for `retention`, keeps one as long as `schedule`
/// retries its event ([`schedule_span`]).
pub fn log_outlasts(schedule: &[Duration], retention: Duration) -> bool {
    retention >= schedule_span(schedule)
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

    #[test]
    fn normalize_waits_double_to_thirty_seconds() {
        let waits: Vec<u64> = (0..=8)
            .map(|d| transient(Stage::Normalize, d).as_secs())
            .collect();
        assert_eq!(waits, [1, 1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(transient(Stage::Normalize, u64::MAX), NORMALIZE_MAX_WAIT);
    }

    #[test]
    fn retry_after_is_read_once_and_clamped() {
        let max = Duration::from_secs(120);
        for (raw, want) in [
            ("5", Some(Duration::from_secs(5))),
            (" 120 ", Some(max)),
            ("1.5", Some(Duration::from_millis(1500))),
            ("0", Some(Duration::ZERO)),
            ("1e20", Some(max)),
            ("99999999999999999999999", Some(max)),
            ("inf", Some(max)),
            ("-5", None),
            ("NaN", None),
            ("", None),
            ("Wed, 21 Oct 2015 07:28:00 GMT", None),
        ] {
            assert_eq!(parse_retry_after(raw, max), want, "{raw:?}");
        }
        assert_eq!(parse_retry_after("1e300", MAX_WAIT), Some(MAX_WAIT));
    }

    #[test]
    fn deliver_waits_flat_after_a_failed_dead_letter() {
        assert_eq!(transient(Stage::Deliver, 1), DEAD_LETTER_RETRY);
        assert_eq!(transient(Stage::Deliver, 40), DEAD_LETTER_RETRY);
    }

    #[test]
    fn the_default_schedule_and_short_test_schedules_are_accepted() {
        let default = parse_schedule("5s,30s,2m,10m,30m,1h,2h,4h,8h,9h").unwrap();
        assert_eq!(default.len(), 10);
        assert_eq!(
            parse_schedule("200ms, 400ms,800ms").unwrap(),
            [200, 400, 800].map(Duration::from_millis)
        );
    }

    #[test]
    fn schedules_that_cannot_be_kept_are_refused() {
        for (raw, why) in [
            ("5s,0s", "longer than zero"),
            ("0", "longer than zero"),
            ("3000000000h", "longer than NATS can hold"),
            ("7d", "days events are kept"),
            // 6 days: under the retention, but not with +20 % jitter.
            ("3d,3d", "days events are kept"),
            ("5s,soon", "not a duration"),
        ] {
            let err = parse_schedule(raw).unwrap_err();
            assert!(err.contains(why), "{raw}: {err}");
        }
    }

    #[test]
    fn the_longest_schedule_accepted_still_fits_the_retention() {
        // 5 days and 4 hours with jitter is 6 days and ~5 h; two attempts' allowance fits.
        assert!(parse_schedule("124h").is_ok());
        assert!(parse_schedule("140h").is_err());
        // Many tiny waits: the allowance per attempt adds up.
        let many = vec!["1s"; 1000].join(",");
        assert!(parse_schedule(&many).is_err());
    }
}
