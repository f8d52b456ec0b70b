//! The deliverer's metrics.

use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, Registry};
use shared::metrics::{counter, counter_vec, gauge, histogram};

pub const ATTEMPTS_TOTAL: &str = "ecwid_deliver_attempts_total";
pub const ATTEMPT_DURATION: &str = "ecwid_deliver_attempt_duration_seconds";
pub const END_TO_END: &str = "ecwid_deliver_end_to_end_seconds";
pub const RETRIES_TOTAL: &str = "ecwid_deliver_retries_total";
pub const DEFERRED_TOTAL: &str = "ecwid_deliver_deferred_total";
pub const IN_FLIGHT: &str = "ecwid_deliver_in_flight";
pub const PARKED: &str = "ecwid_deliver_parked";
pub const PARKED_TOTAL: &str = "ecwid_deliver_parked_total";
pub const BREAKERS_OPEN: &str = "ecwid_deliver_breakers_open";
pub const BREAKER_TRANSITIONS: &str = "ecwid_deliver_breaker_transitions_total";
pub const HELD_TOTAL: &str = "ecwid_deliver_held_total";
pub const RELEASED_TOTAL: &str = "ecwid_deliver_released_total";
pub const ORDERED_LANES: &str = "ecwid_deliver_ordered_lanes";
pub const REPLICAS: &str = "ecwid_deliver_replicas";
pub const DROPPED_TOTAL: &str = "ecwid_deliver_dropped_total";
pub const OAUTH2_TOKEN_REQUESTS_TOTAL: &str = "ecwid_deliver_oauth2_token_requests_total";
pub const CLIENT_CERTIFICATES_EXPIRING: &str = "ecwid_deliver_client_certificates_expiring";

#[derive(Debug, Clone)]
pub struct Metrics {
    /// outcome: success, failure; status_class: 2xx, 3xx, 4xx, 5xx, timeout, connect_error,
    /// refused, proxy_error, auth_error, tls_error.
    pub attempts: IntCounterVec,
    pub attempt_duration: Histogram,
    /// From the ingest's receipt of the webhook to the callback's 2xx.
    pub end_to_end: Histogram,
    pub retries: IntCounter,
    /// reason: breaker_open, host_busy, instance_in_flight, instance_rate, instance_changed,
    /// stopping.
    pub deferred: IntCounterVec,
    pub in_flight: IntGauge,
    /// Deliveries waiting in this replica for a slot of their instance.
    pub parked: IntGauge,
    /// Deliveries that waited for a slot of their instance instead of being put back.
    pub parked_total: IntCounter,
    pub breakers_open: IntGauge,
    /// to: open, half_open, closed.
    pub breaker_transitions: IntCounterVec,
    /// Envelopes of paused or disabled instances moved into the hold.
    pub held: IntCounter,
    /// Held envelopes moved back for delivery.
    pub released: IntCounter,
    /// to: disabled (the deliverer's auto-disable; pause and resume count at the admin API).
    pub instance_transitions: IntCounterVec,
    /// Ordered lanes this replica pulls from (one per ordered instance, and those draining).
    pub ordered_lanes: IntGauge,
    /// Live deliverer replicas as this one counts them (the instance limits are split by it).
    pub replicas: IntGauge,
    /// reason: no_instance (the envelope's instance was deleted; nothing can deliver it).
    pub dropped: IntCounterVec,
    /// outcome: ok, error. Requests to OAuth2 token endpoints (cached tokens make none).
    pub oauth2_token_requests: IntCounterVec,
    /// Instances whose client certificate expires within 14 days, or has expired.
    pub client_certificates_expiring: IntGauge,
}

impl Metrics {
    pub fn register(reg: &Registry) -> Self {
        Self {
            attempts: counter_vec(
                reg,
                ATTEMPTS_TOTAL,
                "Delivery attempts by outcome and status class.",
                &["outcome", "status_class"],
            ),
            attempt_duration: histogram(
                reg,
                ATTEMPT_DURATION,
                "Duration of one delivery attempt, seconds.",
            ),
            end_to_end: histogram(
                reg,
                END_TO_END,
                "From the ingest receiving the webhook to the callback answering 2xx, seconds.",
            ),
            retries: counter(reg, RETRIES_TOTAL, "Failed attempts scheduled for a retry."),
            deferred: counter_vec(
                reg,
                DEFERRED_TOTAL,
                "Deliveries put back without spending an attempt, by reason.",
                &["reason"],
            ),
            in_flight: gauge(reg, IN_FLIGHT, "Requests to callbacks in flight."),
            parked: gauge(
                reg,
                PARKED,
                "Deliveries waiting in this replica for a slot of their instance (event.notification.max.in.flight).",
            ),
            parked_total: counter(
                reg,
                PARKED_TOTAL,
                "Deliveries that waited in this replica for a slot of their instance instead of being put back.",
            ),
            breakers_open: gauge(
                reg,
                BREAKERS_OPEN,
                "Callback URLs whose circuit breaker is open or probing.",
            ),
            breaker_transitions: counter_vec(
                reg,
                BREAKER_TRANSITIONS,
                "Circuit breaker state changes, by new state.",
                &["to"],
            ),
            held: counter(
                reg,
                HELD_TOTAL,
                "Envelopes of paused or disabled instances moved into the hold (ECWID_HELD).",
            ),
            released: counter(
                reg,
                RELEASED_TOTAL,
                "Held envelopes moved back for delivery after a resume.",
            ),
            instance_transitions: counter_vec(
                reg,
                shared::metrics::INSTANCE_TRANSITIONS_TOTAL,
                "Instance state changes, by new state.",
                &["to"],
            ),
            ordered_lanes: gauge(
                reg,
                ORDERED_LANES,
                "Ordered-delivery lanes this replica pulls from.",
            ),
            replicas: gauge(
                reg,
                REPLICAS,
                "Live deliverer replicas this one counts; instance limits are shared among them.",
            ),
            dropped: counter_vec(
                reg,
                DROPPED_TOTAL,
                "Envelopes dropped instead of dead-lettered, by reason (no_instance: the instance was deleted).",
                &["reason"],
            ),
            oauth2_token_requests: counter_vec(
                reg,
                OAUTH2_TOKEN_REQUESTS_TOTAL,
                "Requests to OAuth2 token endpoints, by outcome (ok, error).",
                &["outcome"],
            ),
            client_certificates_expiring: gauge(
                reg,
                CLIENT_CERTIFICATES_EXPIRING,
                "Instances whose client certificate (event.notification.tls.client.certificate) expires within 14 days or has expired.",
            ),
        }
    }
}
