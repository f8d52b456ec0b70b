//! The poller's metrics. Labels are bounded: outcomes, object types, event types.

use prometheus::{IntCounterVec, IntGauge, Registry};
use shared::metrics::{counter_vec, gauge};

pub const REQUESTS: &str = "ecwid_poller_requests_total";
pub const ENTITIES: &str = "ecwid_poller_entities_seen_total";
pub const EVENTS: &str = "ecwid_poller_events_emitted_total";
pub const SKIPPED: &str = "ecwid_poller_events_skipped_total";
pub const CYCLES: &str = "ecwid_poller_cycles_total";
pub const LAG: &str = "ecwid_poller_lag_seconds";
pub const LEASES: &str = "ecwid_poller_leases_held";

#[derive(Debug, Clone)]
pub struct Metrics {
    /// REST requests by outcome: `ok`, `rate_limited` (429), `refused` (401/402/403/404),
    /// `server_error` (5xx), `timeout`, `too_large` (a body above `POLLER_MAX_PAGE_BYTES`),
    /// `error` (connection, other statuses).
    pub requests: IntCounterVec,
    /// Entities read from the REST API, by objectType.
    pub entities: IntCounterVec,
    /// Poll events stored in `ECWID_RAW` (not duplicates), by eventType.
    pub events: IntCounterVec,
    /// Entities not stored, by reason: `webhook_seen`, `duplicate`, `unreadable`.
    pub skipped: IntCounterVec,
    /// Store cycles by outcome: `ok`, `unchanged` (latest-stats said nothing changed), `refused`,
    /// `backing_off`, `failed`.
    pub cycles: IntCounterVec,
    /// Now − the oldest cursor of the stores this replica holds, seconds.
    pub lag: IntGauge,
    pub leases: IntGauge,
}

impl Metrics {
    pub fn register(reg: &Registry) -> Self {
        Self {
            requests: counter_vec(
                reg,
                REQUESTS,
                "Ecwid REST requests by outcome.",
                &["outcome"],
            ),
            entities: counter_vec(reg, ENTITIES, "Entities read from Ecwid.", &["object_type"]),
            events: counter_vec(reg, EVENTS, "Poll events stored.", &["event_type"]),
            skipped: counter_vec(reg, SKIPPED, "Entities not stored, by reason.", &["reason"]),
            cycles: counter_vec(reg, CYCLES, "Store poll cycles by outcome.", &["outcome"]),
            lag: gauge(reg, LAG, "Now minus the oldest cursor of the held stores."),
            leases: gauge(reg, LEASES, "Stores this replica holds the lease of."),
        }
    }
}
