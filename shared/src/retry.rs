//! How long anything waits before it tries again, in one place: the start-up backoff against
//! NATS and the waits after a transient failure of each stage.
//!
//! Waits after a message failed are held by the NATS server (NAK with a delay), never by a sleep
//! in the worker, so they survive restarts and cost nothing while they run.

use std::time::Duration;

use backon::ExponentialBuilder;

use crate::dead::Stage;

/// The first wait of the start-up backoff ([`backoff`]).
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest wait of the start-up backoff before jitter.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The backoff for start-up steps against NATS (connecting, setting up the topology): 100 ms
/// doubling to 5 s, each wait stretched by up to 100 % (backon's jitter) so that replicas started
/// together do not retry in step. The caller says how many times (connect: until cancelled;
/// topology: a bounded number).
pub fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(BACKOFF_MIN)
        .with_max_delay(BACKOFF_MAX)
        .with_jitter()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_waits_double_to_thirty_seconds() {
        let waits: Vec<u64> = (0..=8)
            .map(|d| transient(Stage::Normalize, d).as_secs())
            .collect();
        assert_eq!(waits, [1, 1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(transient(Stage::Normalize, u64::MAX), NORMALIZE_MAX_WAIT);
    }

    #[test]
    fn deliver_waits_flat_after_a_failed_dead_letter() {
        assert_eq!(transient(Stage::Deliver, 1), DEAD_LETTER_RETRY);
        assert_eq!(transient(Stage::Deliver, 40), DEAD_LETTER_RETRY);
    }
}
