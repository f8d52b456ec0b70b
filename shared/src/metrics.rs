//! Metrics: the names (constants), the metrics every service exports, and small helpers that
//! register into a per-service [`Registry`] (not the global one, so a test can run three services
//! in one process). Labels are bounded sets only: never a URL, store or instance id.

use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub const BUILD_INFO: &str = "ecwid_build_info";
pub const NATS_CONNECTED: &str = "ecwid_nats_connected";
pub const INSTANCES: &str = "ecwid_instances";
pub const INSTANCES_REVISION: &str = "ecwid_instances_revision";
pub const DEAD_LETTERS_TOTAL: &str = "ecwid_dead_letters_total";
pub const CONSUMER_PENDING: &str = "ecwid_consumer_pending_messages";
pub const CONSUMER_ACK_PENDING: &str = "ecwid_consumer_ack_pending_messages";
pub const HTTP_PANICS_TOTAL: &str = "ecwid_http_panics_total";
/// Streams and buckets this process created or updated at start-up, by action (`create`,
/// `update`); a restart with unchanged settings adds nothing.
pub const TOPOLOGY_WRITES_TOTAL: &str = "ecwid_topology_writes_total";
/// Instance state changes by new state: pause and resume at the ingest (admin API), auto-disable
/// at the deliverer.
pub const INSTANCE_TRANSITIONS_TOTAL: &str = "ecwid_instance_transitions_total";

/// Latency buckets from 1 ms to 60 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Every metric this process registered through the helpers below, name → type (`counter`,
/// `gauge`, `histogram`): what `--print-contract` lists. A registry cannot say this itself (it
/// leaves out a labelled metric until it has a series). Bounded by the names in the code.
static DECLARED: Mutex<BTreeMap<String, &'static str>> = Mutex::new(BTreeMap::new());

pub(crate) fn declare(name: &str, kind: &'static str) {
    DECLARED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(name.to_owned(), kind);
}

/// The metrics registered so far in this process, name → type.
pub fn declared() -> BTreeMap<String, &'static str> {
    DECLARED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

/// Registration happens once at start-up with constant names; a clash is a programming error
/// that the unit tests catch, so these helpers panic on it.
pub fn counter_vec(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    declare(name, "counter");
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    reg.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

pub fn counter(reg: &Registry, name: &str, help: &str) -> IntCounter {
    declare(name, "counter");
    let c = IntCounter::new(name, help).expect("valid metric");
    reg.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

pub fn gauge(reg: &Registry, name: &str, help: &str) -> IntGauge {
    declare(name, "gauge");
    let g = IntGauge::new(name, help).expect("valid metric");
    reg.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

pub fn gauge_vec(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    declare(name, "gauge");
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    reg.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

pub fn float_gauge_vec(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    declare(name, "gauge");
    let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    reg.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

pub fn histogram(reg: &Registry, name: &str, help: &str) -> Histogram {
    declare(name, "histogram");
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()))
        .expect("valid metric");
    reg.register(Box::new(h.clone()))
        .expect("metric registered once");
    h
}

pub fn histogram_vec(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    declare(name, "histogram");
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
        labels,
    )
    .expect("valid metric");
    reg.register(Box::new(h.clone()))
        .expect("metric registered once");
    h
}

/// The metrics every service exports.
#[derive(Debug, Clone)]
pub struct CommonMetrics {
    pub nats_connected: IntGauge,
    /// state: active, paused, disabled.
    pub instances: IntGaugeVec,
    pub instances_revision: IntGauge,
    pub dead_letters: IntCounterVec,
    pub consumer_pending: IntGaugeVec,
    pub consumer_ack_pending: IntGaugeVec,
    /// HTTP handlers that panicked (answered 500; the panic is logged).
    pub http_panics: IntCounter,
    pub topology_writes: IntCounterVec,
}

impl CommonMetrics {
    pub fn register(reg: &Registry, service: &str) -> Self {
        let build = gauge_vec(
            reg,
            BUILD_INFO,
            "Build information.",
            &["service", "version"],
        );
        build.with_label_values(&[service, crate::VERSION]).set(1);
        Self {
            nats_connected: gauge(reg, NATS_CONNECTED, "1 while the NATS connection is up."),
            instances: gauge_vec(
                reg,
                INSTANCES,
                "Connector instances known to this process, by state (active, paused, disabled).",
                &["state"],
            ),
            instances_revision: gauge(
                reg,
                INSTANCES_REVISION,
                "Newest revision of the instances bucket this process has applied.",
            ),
            dead_letters: counter_vec(
                reg,
                DEAD_LETTERS_TOTAL,
                "Messages sent to the dead-letter stream, by stage and reason.",
                &["stage", "reason"],
            ),
            consumer_pending: gauge_vec(
                reg,
                CONSUMER_PENDING,
                "Messages in the stream not yet delivered to the consumer (lag).",
                &["consumer"],
            ),
            consumer_ack_pending: gauge_vec(
                reg,
                CONSUMER_ACK_PENDING,
                "Messages delivered to the consumer and not yet acknowledged (in work or waiting for a retry).",
                &["consumer"],
            ),
            http_panics: counter(
                reg,
                HTTP_PANICS_TOTAL,
                "HTTP requests whose handler panicked; each was answered 500 and logged.",
            ),
            topology_writes: counter_vec(
                reg,
                TOPOLOGY_WRITES_TOTAL,
                "Streams and buckets this process created or updated at start-up, by action (create, update).",
                &["action"],
            ),
        }
    }
}

/// The Prometheus text exposition of `reg`.
pub fn encode(reg: &Registry) -> String {
    let mut buf = Vec::new();
    let _ = TextEncoder::new().encode(&reg.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_metrics_register_and_encode() {
        let reg = Registry::new();
        let m = CommonMetrics::register(&reg, "test");
        m.dead_letters.with_label_values(&["deliver", "gone"]).inc();
        let text = encode(&reg);
        assert!(text.contains("ecwid_build_info{service=\"test\""));
        assert!(text.contains("ecwid_dead_letters_total{reason=\"gone\",stage=\"deliver\"} 1"));
    }
}
