//! The admin API's metrics.

use prometheus::{IntCounterVec, Registry};
use shared::metrics::counter_vec;

#[derive(Debug, Clone)]
pub struct Metrics {
    /// to: paused, active (the admin API's pause and resume).
    pub instance_transitions: IntCounterVec,
}

impl Metrics {
    pub fn register(reg: &Registry) -> Self {
        Self {
            instance_transitions: counter_vec(
                reg,
                shared::metrics::INSTANCE_TRANSITIONS_TOTAL,
                "Instance state changes, by new state.",
                &["to"],
            ),
        }
    }
}
