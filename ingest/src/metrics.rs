//! The ingest's metrics.

use std::time::Duration;

use prometheus::{GaugeVec, Histogram, HistogramVec, IntCounterVec, Registry};
use shared::config::StreamLimits;
use shared::metrics::{counter_vec, histogram, histogram_vec};
use tokio_util::sync::CancellationToken;

pub const REQUESTS_TOTAL: &str = "ecwid_ingest_requests_total";
pub const REQUEST_DURATION: &str = "ecwid_ingest_request_duration_seconds";
pub const PUBLISH_DURATION: &str = "ecwid_ingest_publish_duration_seconds";
pub const UNVERIFIED_TOTAL: &str = "ecwid_ingest_unverified_total";
pub const STREAM_USAGE: &str = "ecwid_stream_usage_ratio";

/// How often the ingest reads the limited streams' sizes.
pub const STREAM_USAGE_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Metrics {
    /// outcome: accepted, duplicate, unauthorized, invalid, unknown_store, too_large,
    /// unsupported_media_type, unavailable; format: v3, ion, unknown.
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub publish_duration: Histogram,
    pub unverified: IntCounterVec,
    /// stream: each stream with a `STREAM_MAX_BYTES` or `STREAM_MAX_MSGS` limit.
    pub stream_usage: GaugeVec,
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
            stream_usage: shared::metrics::float_gauge_vec(
                reg,
                STREAM_USAGE,
                "How full a limited stream is: the larger of bytes / STREAM_MAX_BYTES and messages / STREAM_MAX_MSGS.",
                &["stream"],
            ),
        }
    }
}

/// Reads the size of every stream with a limit every [`STREAM_USAGE_EVERY`] into
/// `ecwid_stream_usage_ratio`, until `cancel`. Nothing runs when no limit is set.
pub fn spawn_stream_usage(
    js: async_nats::jetstream::Context,
    limits: StreamLimits,
    gauge: GaugeVec,
    cancel: CancellationToken,
) {
    let streams: Vec<String> = limits
        .max_bytes
        .keys()
        .chain(limits.max_msgs.keys())
        .cloned()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if streams.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(STREAM_USAGE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            for name in &streams {
                let info = match js.get_stream(name).await {
                    Ok(mut stream) => stream
                        .info()
                        .await
                        .map(|i| (i.state.bytes, i.state.messages)),
                    Err(e) => {
                        tracing::debug!(stream = %name, error = %e, "Stream size unreadable.");
                        continue;
                    }
                };
                let Ok((bytes, messages)) = info else {
                    continue;
                };
                let (max_bytes, max_msgs) = limits.of(name);
                let ratio = |used: u64, max: i64| {
                    if max > 0 {
                        used as f64 / max as f64
                    } else {
                        0.0
                    }
                };
                let usage = ratio(bytes, max_bytes).max(ratio(messages, max_msgs));
                gauge.with_label_values(&[name]).set(usage);
            }
        }
    });
}
