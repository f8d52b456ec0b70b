//! The durable pull consumer on `ECWID_RAW`: normalize, fan out to every subscribed instance,
//! publish the envelopes concurrently, and only then ack. The [`Outcome`] of each message decides
//! what happens to it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy};
use async_nats::jetstream::{self, AckKind};
use async_nats::HeaderMap;
use shared::dead::{self, DeadLetter, Stage};
use shared::instance::Instance;
use shared::nats::{events_subject, headers, subject_tail, NORMALIZER_CONSUMER, RAW_STREAM};
use shared::service::ServiceContext;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::normalize::{self, Normalized};

/// What becomes of one raw message.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every envelope is stored (or none was due): ack.
    Ack { outcome: &'static str },
    /// A transient failure: NAK with this delay; the server redelivers.
    Retry { delay: Duration, error: String },
    /// Can never succeed: dead-letter, then ack.
    Dead { reason: &'static str, error: String },
}

struct Worker {
    config: Config,
    ctx: ServiceContext,
    metrics: Metrics,
}

pub async fn run(
    config: Config,
    ctx: ServiceContext,
    metrics: Metrics,
    cancel: CancellationToken,
) -> Result<(), shared::Error> {
    let consumer = shared::nats::ensure_pull_consumer(
        &ctx.js,
        RAW_STREAM,
        pull::Config {
            durable_name: Some(NORMALIZER_CONSUMER.to_owned()),
            description: Some("ecwid-events normalizer replicas".to_owned()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: config.ack_wait(),
            max_deliver: -1,
            max_ack_pending: 20_000,
            ..Default::default()
        },
    )
    .await?;
    shared::worker::spawn_lag_reporter(
        consumer.clone(),
        NORMALIZER_CONSUMER,
        ctx.common.clone(),
        cancel.clone(),
    );
    let concurrency = config.concurrency;
    let grace = config.common.shutdown_grace;
    let worker = Arc::new(Worker {
        config,
        ctx,
        metrics,
    });
    // Not one message before the instances are known: its store would look unknown.
    if !worker.ctx.directory.loaded(&cancel).await {
        return Ok(());
    }
    tracing::info!(concurrency, "Normalizer consuming.");
    shared::worker::run_pull_loop(consumer, concurrency, cancel, grace, move |message| {
        let worker = Arc::clone(&worker);
        async move { worker.handle(message).await }
    })
    .await;
    Ok(())
}

fn header<'a>(h: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    h.and_then(|h| h.get(name)).map(|v| v.as_str())
}

/// Parses a raw message. The format comes from the ingest's header (v3 when absent).
pub fn parse(
    payload: &[u8],
    h: Option<&HeaderMap>,
) -> Result<Normalized, normalize::NormalizeError> {
    let received_at = header(h, headers::RECEIVED_AT).and_then(|v| v.parse().ok());
    let msg_id = header(h, headers::ORIGINAL_MSG_ID).or_else(|| header(h, headers::MSG_ID));
    match header(h, headers::FORMAT).unwrap_or("v3") {
        "v3" => normalize::normalize_v3(payload),
        "ion" => normalize::normalize_ion(payload, msg_id, received_at),
        other => Err(normalize::NormalizeError::Format(other.to_owned())),
    }
}

impl Worker {
    async fn handle(&self, message: jetstream::Message) {
        let started = Instant::now();
        let outcome = self.process(&message).await;
        self.settle(&message, outcome).await;
        self.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
    }

    async fn process(&self, message: &jetstream::Message) -> Outcome {
        let h = message.headers.as_ref();
        let normalized = match parse(&message.payload, h) {
            Ok(n) => n,
            Err(e) => {
                return Outcome::Dead {
                    reason: e.reason(),
                    error: e.to_string(),
                }
            }
        };
        let raw = match normalize::raw_value(&message.payload) {
            Ok(r) => r,
            Err(e) => {
                return Outcome::Dead {
                    reason: e.reason(),
                    error: e.to_string(),
                }
            }
        };
        let instances = self.ctx.directory.for_store(&normalized.store_id);
        if instances.is_empty() {
            return Outcome::Dead {
                reason: "no_instance",
                error: format!("store {} has no instance", normalized.store_id),
            };
        }
        let targets: Vec<&Arc<Instance>> = instances
            .iter()
            .filter(|i| i.events_enabled() && i.accepts_object(&normalized.event.object_type))
            .collect();
        if targets.is_empty() {
            return Outcome::Ack {
                outcome: "filtered",
            };
        }
        let publishes = targets.iter().map(|instance| {
            let envelope = normalize::envelope(&normalized, &instance.id, raw);
            let mut out = HeaderMap::new();
            out.insert(headers::MSG_ID, envelope.message.event_id.as_str());
            out.insert(headers::INSTANCE_ID, instance.id.as_str());
            out.insert(headers::STORE_ID, normalized.store_id.as_str());
            for name in [
                headers::RECEIVED_AT,
                headers::REQUEST_ID,
                headers::TRACEPARENT,
                headers::VERIFIED,
            ] {
                if let Some(v) = header(h, name) {
                    out.insert(name, v);
                }
            }
            let subject = events_subject(&instance.id);
            let js = &self.ctx.js;
            async move {
                js.publish_with_headers(subject, out, envelope.to_json().into())
                    .await
                    .map_err(|e| e.to_string())?
                    .await
                    .map_err(|e| e.to_string())
            }
        });
        let timeout = self.config.publish_timeout;
        match tokio::time::timeout(timeout, futures::future::join_all(publishes)).await {
            Err(_) => Outcome::Retry {
                delay: retry_delay(message),
                error: format!("envelopes not acknowledged within {timeout:?}"),
            },
            Ok(results) => match results.into_iter().find_map(Result::err) {
                Some(error) => Outcome::Retry {
                    delay: retry_delay(message),
                    error,
                },
                None => {
                    self.metrics
                        .envelopes
                        .with_label_values(&[normalized.event.event_type.as_str()])
                        .inc_by(targets.len() as u64);
                    Outcome::Ack {
                        outcome: "normalized",
                    }
                }
            },
        }
    }

    async fn settle(&self, message: &jetstream::Message, outcome: Outcome) {
        let subject = message.subject.as_str();
        let store_id = subject_tail(subject);
        let label = match outcome {
            Outcome::Ack { outcome } => {
                tracing::debug!(store_id, outcome, "Raw event handled.");
                outcome
            }
            Outcome::Retry { delay, error } => {
                tracing::warn!(store_id, %error, retry_in = ?delay, "Envelopes not stored; will retry.");
                let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
                self.metrics.messages.with_label_values(&["retried"]).inc();
                return;
            }
            Outcome::Dead { reason, error } => {
                let seq = message
                    .info()
                    .map(|i| i.stream_sequence)
                    .unwrap_or_default();
                let letter = DeadLetter {
                    stage: Stage::Normalize,
                    id: store_id,
                    reason,
                    error: error.clone(),
                    original_subject: subject,
                    original_headers: message.headers.as_ref(),
                    source_id: format!("{RAW_STREAM}:{seq}"),
                    payload: message.payload.clone(),
                    extra: Vec::new(),
                };
                if let Err(e) =
                    dead::publish(&self.ctx.js, letter, self.config.publish_timeout).await
                {
                    tracing::error!(store_id, error = %e, "Could not dead-letter a raw event; will retry.");
                    let _ = message
                        .ack_with(AckKind::Nak(Some(retry_delay(message))))
                        .await;
                    return;
                }
                tracing::warn!(store_id, reason, %error, "Raw event dead-lettered.");
                self.ctx
                    .common
                    .dead_letters
                    .with_label_values(&["normalize", reason])
                    .inc();
                "dead_lettered"
            }
        };
        if let Err(error) = message.ack().await {
            tracing::warn!(store_id, %error, "Ack failed; the event will be redelivered and deduplicated.");
        }
        self.metrics.messages.with_label_values(&[label]).inc();
    }
}

/// The wait after a transient failure, by delivery count: [`shared::retry::transient`].
fn retry_delay(message: &jetstream::Message) -> Duration {
    let delivered = message
        .info()
        .map_or(1, |i| u64::try_from(i.delivered).unwrap_or(1));
    shared::retry::transient(Stage::Normalize, delivered)
}
