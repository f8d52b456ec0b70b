//! The ingest's metrics.

use prometheus::{Histogram, HistogramVec, IntCounterVec, Registry};
use shared::metrics::{counter_vec, histogram, histogram_vec};

pub const REQUESTS_TOTAL: &str = "ecwid_ingest_requests_total";
pub const REQUEST_DURATION: &str = "ecwid_ingest_request_duration_seconds";
pub const PUBLISH_DURATION: &str = "ecwid_ingest_publish_duration_seconds";
pub const UNVERIFIED_TOTAL: &str = "ecwid_ingest_unverified_total";

#[derive(Debug, Clone)]
pub struct Metrics {
    /// outcome: accepted, duplicate, unauthorized, invalid, unknown_store, too_large,
    /// unsupported_media_type, unavailable; format: v3, ion, unknown.
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub publish_duration: Histogram,
    pub unverified: IntCounterVec,
    /// to: paused, active (the admin API's pause and resume).
    pub instance_transitions: IntCounterVec,
}

impl Metrics {
    pub fn register(reg: &Registry) -> Self {
        Self {
            requests: counter_vec(
                reg,
                REQUESTS_TOTAL,
                "Webhook requests by outcome and format.",
                &["outcome", "format"],
            ),
            request_duration: histogram_vec(
                reg,
                REQUEST_DURATION,
                "Time from request to answer, seconds.",
                &["format"],
            ),
            publish_duration: histogram(
                reg,
                PUBLISH_DURATION,
                "Time from publish to JetStream's ack, seconds.",
            ),
            unverified: counter_vec(
                reg,
                UNVERIFIED_TOTAL,
                "Accepted events whose signature could not be checked (no client secret, or ION).",
                &["format"],
            ),
            instance_transitions: counter_vec(
                reg,
                shared::metrics::INSTANCE_TRANSITIONS_TOTAL,
                "Instance state changes, by new state.",
                &["to"],
            ),
        }
    }
}
