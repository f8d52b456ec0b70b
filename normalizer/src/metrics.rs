//! The normalizer's metrics.

use prometheus::{Histogram, IntCounterVec, Registry};
use shared::metrics::{counter_vec, histogram};

pub const MESSAGES_TOTAL: &str = "ecwid_normalizer_messages_total";
pub const ENVELOPES_TOTAL: &str = "ecwid_normalizer_envelopes_total";
pub const DURATION: &str = "ecwid_normalizer_duration_seconds";

#[derive(Debug, Clone)]
pub struct Metrics {
    /// outcome: normalized, filtered, no_instance (a poll message of a store with no instance
    /// left: dropped), dead_lettered, retried, order_wait.
    pub messages: IntCounterVec,
    /// event_type: CREATED, UPDATED, DELETED, UNKNOWN.
    pub envelopes: IntCounterVec,
    pub duration: Histogram,
}

impl Metrics {
    pub fn register(reg: &Registry) -> Self {
        Self {
            messages: counter_vec(
                reg,
                MESSAGES_TOTAL,
                "Raw messages by outcome.",
                &["outcome"],
            ),
            envelopes: counter_vec(
                reg,
                ENVELOPES_TOTAL,
                "Envelopes published, by event type.",
                &["event_type"],
            ),
            duration: histogram(
                reg,
                DURATION,
                "Time to normalize and store one raw message, seconds.",
            ),
        }
    }
}
