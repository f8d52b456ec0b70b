//! The durable pull consumer on `ECWID_RAW`: normalize, fan out to every subscribed instance,
//! publish the envelopes concurrently, and only then ack. The [`Outcome`] of each message decides
//! what happens to it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy};
use async_nats::jetstream::{self, AckKind};
use async_nats::HeaderMap;
use model::ecwid::{Format, ParseError};
use model::instance::Instance;
use model::record::{Record, Status};
use model::retry::Stage;
use shared::dead::{self, DeadLetter};
use shared::nats::{
    envelope_subject, header, headers, subject_tail, EVENTS_STREAM, NORMALIZER_CONSUMER, RAW_STREAM,
};
use shared::service::ServiceContext;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::order::Gate;
use model::normalize::{self, Normalized};
use model::retry::ORDER_RETRY_WAIT;

/// What becomes of one raw message. `records` are the event log records to create before the
/// message is acked: one per envelope, or the raw-stage outcome.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every envelope is stored (or none was due): ack.
    Ack {
        outcome: &'static str,
        records: Vec<Record>,
    },
    /// A transient failure: NAK with this delay; the server redelivers.
    Retry { delay: Duration, error: String },
    /// An ordered instance's envelope must wait for an earlier event of the store that is not
    /// normalized yet ([`crate::order`]): NAK with this delay, no error.
    OrderWait { delay: Duration },
    /// Can never succeed: dead-letter, then ack.
    Dead {
        reason: &'static str,
        error: String,
        record: Option<Box<Record>>,
    },
}

struct Worker {
    config: Config,
    ctx: ServiceContext,
    metrics: Metrics,
    /// Acceptance order for the envelopes of ordered instances.
    order: Arc<Gate>,
    /// Parsed `event.notification.filter` expressions.
    filters: model::filter::FilterCache,
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
    let order = Gate::start(ctx.js.clone(), consumer.clone(), cancel.child_token());
    let worker = Arc::new(Worker {
        config,
        ctx,
        metrics,
        order,
        filters: Default::default(),
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

/// Normalizes a raw message. The format comes from the ingest's header (v3 when absent).
pub fn parse<'a>(payload: &'a [u8], h: Option<&HeaderMap>) -> Result<Normalized<'a>, ParseError> {
    let received_at = header(h, headers::RECEIVED_AT).and_then(|v| v.parse().ok());
    let format = Format::from_header(header(h, headers::FORMAT))?;
    normalize::normalize(format, payload, received_at)
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
                    reason: "unparseable",
                    error: e.to_string(),
                    record: None,
                }
            }
        };
        let instances = self.ctx.directory.for_store(&normalized.store_id);
        if instances.is_empty() {
            let error = format!("store {} has no instance", normalized.store_id);
            let mut record = log_record(
                &normalized,
                raw_stage_id(&normalized),
                None,
                h,
                Status::Dead,
            );
            record.last_error = Some(error.clone());
            if normalized.format == Format::Poll {
                // The poller read it for an instance that is gone (deleted, or no longer
                // polling, while a cycle or backfill was under way): the user asked for no more
                // of this store, so it is dropped, not dead-lettered (nothing would ever expire
                // such letters). A webhook still dead-letters: Ecwid sent it, and it can be
                // replayed once the store has an instance.
                record.status = Status::Filtered;
                return Outcome::Ack {
                    outcome: "no_instance",
                    records: vec![record],
                };
            }
            return Outcome::Dead {
                reason: "no_instance",
                error,
                record: Some(Box::new(record)),
            };
        }
        let verified = header(h, headers::VERIFIED) == Some("true");
        let named = header(h, headers::INSTANCE_ID);
        let subscribed = instances.iter().filter(|i| {
            i.events_enabled()
                && i.accepts_object(&normalized.event.object_type)
                && (verified || i.accepts_unverified())
                && normalize::takes(normalized.format, i, named)
        });
        // Payload filters: each instance's expression over the envelope. An event one of them
        // keeps out gets a record of its own for that instance, saying why.
        let mut raw: Option<serde_json::Value> = None;
        let mut filtered = Vec::new();
        let targets: Vec<&Arc<Instance>> = subscribed
            .filter(|i| {
                let Some(source) = i.filter() else {
                    return true;
                };
                let raw = raw.get_or_insert_with(|| {
                    serde_json::from_str(normalized.raw.get()).unwrap_or_default()
                });
                let subject = model::filter::Subject {
                    object_type: &normalized.event.object_type,
                    event_type: normalized.event.event_type.as_str(),
                    object_id: &normalized.event.object_id,
                    store_id: &normalized.store_id,
                    raw,
                };
                match self.filters.check(source, &subject) {
                    Ok(()) => true,
                    Err(model::filter::Dropped(reason)) => {
                        tracing::debug!(instance_id = %i.id, %reason, "Event filtered out.");
                        if self.ctx.log.enabled() {
                            let id = normalize::notification_id(&normalized.event_key, &i.id);
                            let mut record =
                                log_record(&normalized, id, Some(&i.id), h, Status::Filtered);
                            record.last_error = Some(reason);
                            filtered.push(record);
                        }
                        false
                    }
                }
            })
            .collect();
        if targets.is_empty() && !filtered.is_empty() {
            return Outcome::Ack {
                outcome: "filtered",
                records: filtered,
            };
        }
        if targets.is_empty() {
            return Outcome::Ack {
                outcome: "filtered",
                records: vec![log_record(
                    &normalized,
                    raw_stage_id(&normalized),
                    None,
                    h,
                    Status::Filtered,
                )],
            };
        }
        let timeout = self.config.publish_timeout;
        let publish = |instance: &Instance| {
            let envelope = normalize::envelope(&normalized, &instance.id, verified);
            let mut out = HeaderMap::new();
            out.insert(headers::MSG_ID, envelope.message.event_id.as_str());
            out.insert(headers::INSTANCE_ID, instance.id.as_str());
            out.insert(headers::STORE_ID, normalized.store_id.as_str());
            out.insert(headers::ECWID_EVENT_ID, normalized.ecwid_event_id());
            out.insert(headers::FORMAT, normalized.format.as_str());
            for name in [
                headers::RECEIVED_AT,
                headers::REQUEST_ID,
                headers::TRACEPARENT,
                headers::VERIFIED,
            ] {
                if let Some(v) = header(h, name.clone()) {
                    out.insert(name, v);
                }
            }
            let subject = envelope_subject(&instance.id, instance.ordered());
            let span =
                shared::nats::publish_span(EVENTS_STREAM, &subject, &envelope.message.event_id);
            if !span.is_disabled() {
                span.record("instance.id", instance.id.as_str());
                span.record("envelope.id", envelope.message.event_id.as_str());
            }
            // With traces on, each envelope carries its own publish span's context, under the
            // raw message's trace.
            shared::otel::inject_nats(&span, &mut out);
            let stored = shared::nats::publish(
                &self.ctx.js,
                subject,
                out,
                envelope.to_json().into(),
                timeout,
            )
            .instrument(span);
            // The id goes on to the log record: computing it costs a SHA-256.
            let id = envelope.message.event_id;
            async move { (id, stored.await) }
        };
        // Unordered instances first and at once; ordered ones when the store's earlier events
        // are all stored, so that their lanes hold the envelopes in acceptance order.
        let (ordered, unordered): (Vec<&Arc<Instance>>, Vec<&Arc<Instance>>) =
            targets.iter().copied().partition(|i| i.ordered());
        let mut results = futures::future::join_all(unordered.iter().map(|i| publish(i))).await;
        if !ordered.is_empty() {
            let seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
            if !self.order.wait_turn(message.subject.as_str(), seq).await {
                return Outcome::OrderWait {
                    delay: ORDER_RETRY_WAIT,
                };
            }
            results.extend(futures::future::join_all(ordered.iter().map(|i| publish(i))).await);
        }
        let targets: Vec<&Arc<Instance>> = unordered.into_iter().chain(ordered).collect();
        let mut records = Vec::with_capacity(targets.len());
        for (instance, (id, result)) in targets.iter().zip(results) {
            match result {
                Err(error) => {
                    return Outcome::Retry {
                        delay: retry_delay(message),
                        error: error.to_string(),
                    }
                }
                // A duplicate's ack carries the sequence of the envelope stored first.
                // With `EVENT_LOG=off` no record is built: nothing would write it.
                Ok(_) if !self.ctx.log.enabled() => {}
                Ok(ack) => {
                    let mut record =
                        log_record(&normalized, id, Some(&instance.id), h, Status::Pending);
                    record.envelope_seq = Some(ack.sequence);
                    records.push(record);
                }
            }
        }
        records.extend(filtered);
        self.metrics
            .envelopes
            .with_label_values(&[normalized.event.event_type.as_str()])
            .inc_by(targets.len() as u64);
        Outcome::Ack {
            outcome: "normalized",
            records,
        }
    }

    /// Creates the log records (their event rows); `false` (counted) when they could be written
    /// neither to the database nor to its spool, and the raw message is then NAK-ed so that it
    /// comes back: its envelopes are deduplicated, its records written.
    async fn write_log(&self, message: &jetstream::Message, records: &[Record]) -> bool {
        let log = &self.ctx.log;
        let rows = shared::eventlog::Rows {
            events: records.iter().map(shared::eventlog::EventRow::of).collect(),
            attempts: Vec::new(),
        };
        match log.append(rows).await {
            Ok(()) => true,
            Err(error) => {
                log.failed(&error);
                let _ = message
                    .ack_with(AckKind::Nak(Some(retry_delay(message))))
                    .await;
                false
            }
        }
    }

    async fn settle(&self, message: &jetstream::Message, outcome: Outcome) {
        let subject = message.subject.as_str();
        let store_id = subject_tail(subject);
        let label = match outcome {
            Outcome::Ack { outcome, records } => {
                if !self.write_log(message, &records).await {
                    return;
                }
                tracing::debug!(store_id, outcome, "Raw event handled.");
                outcome
            }
            Outcome::OrderWait { delay } => {
                tracing::debug!(store_id, retry_in = ?delay, "An earlier event of the store is not normalized yet; ordered envelopes wait.");
                let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
                self.metrics
                    .messages
                    .with_label_values(&["order_wait"])
                    .inc();
                return;
            }
            Outcome::Retry { delay, error } => {
                tracing::warn!(store_id, %error, retry_in = ?delay, "Envelopes not stored; will retry.");
                let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
                self.metrics.messages.with_label_values(&["retried"]).inc();
                return;
            }
            Outcome::Dead {
                reason,
                error,
                record,
            } => {
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
                if !self
                    .write_log(
                        message,
                        record
                            .as_deref()
                            .map(std::slice::from_ref)
                            .unwrap_or_default(),
                    )
                    .await
                {
                    return;
                }
                "dead_lettered"
            }
        };
        if let Err(error) = message.ack().await {
            tracing::warn!(store_id, %error, "Ack failed; the event will be redelivered and deduplicated.");
        }
        self.metrics.messages.with_label_values(&[label]).inc();
    }
}

/// The wait after a transient failure, by delivery count: [`model::retry::transient`].
fn retry_delay(message: &jetstream::Message) -> Duration {
    let delivered = message
        .info()
        .map_or(1, |i| u64::try_from(i.delivered).unwrap_or(1));
    model::retry::transient(Stage::Normalize, delivered)
}

/// The record id of a raw-stage outcome: one per Ecwid event.
fn raw_stage_id(normalized: &Normalized<'_>) -> String {
    normalize::notification_id(&normalized.event_key, "")
}

/// The event log record `id` of `normalized` for `instance_id` (`None`: the raw-stage outcome),
/// as it stands when the normalizer is done with it. `id` is the envelope's eventId, or for the
/// raw-stage outcome [`raw_stage_id`].
fn log_record(
    normalized: &Normalized<'_>,
    id: String,
    instance_id: Option<&str>,
    h: Option<&HeaderMap>,
    status: Status,
) -> Record {
    let received_at = header(h, headers::RECEIVED_AT)
        .and_then(|v| v.parse::<i64>().ok())
        .map(model::time_fmt::unix_ms_to_rfc3339)
        .unwrap_or_default();
    Record {
        id,
        instance_id: instance_id.map(str::to_owned),
        store_id: normalized.store_id.clone(),
        object_type: normalized.event.object_type.clone(),
        object_id: normalized.event.object_id.clone(),
        event_type: normalized.event.event_type.as_str().to_owned(),
        ecwid_event_id: normalized.ecwid_event_id().to_owned(),
        format: normalized.format.as_str().to_owned(),
        verified: header(h, headers::VERIFIED) == Some("true"),
        request_id: header(h, headers::REQUEST_ID)
            .unwrap_or_default()
            .to_owned(),
        received_at,
        status,
        ..Record::default()
    }
}
