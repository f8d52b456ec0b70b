//! NATS names and plumbing: every stream, subject, consumer, bucket and header name is a constant
//! here; [`connect`] retries until NATS answers; [`ensure_pull_consumer`] gets or creates a
//! consumer. The streams and buckets themselves are set up by [`crate::topology`].

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use backon::Retryable;
use tokio_util::sync::CancellationToken;

use crate::config::NatsServers;
use crate::Error;

/// Raw Ecwid payloads, as the ingest received them.
pub const RAW_STREAM: &str = "ECWID_RAW";
/// Normalized envelopes, one per (event, instance).
pub const EVENTS_STREAM: &str = "ECWID_EVENTS";
/// What any stage could not process, kept for inspection and replay.
pub const DEAD_STREAM: &str = "ECWID_DEAD";
/// Connector instances, keyed by instance id.
pub const INSTANCES_BUCKET: &str = "ECWID_INSTANCES";
/// The poller's leases: `lease.<storeId>` (which replica polls a store) and `replica.<id>`
/// (which replicas are alive). Values carry their own expiry (Unix ms): a lease is held
/// until then, whatever the bucket keeps.
pub const POLL_LEASES_BUCKET: &str = "ECWID_POLL_LEASES";
/// The poller's lasting state: `cursor.<storeId>.<entity>` (where the next window starts),
/// `status.<storeId>` (the last poll's outcome, shown by the admin API) and `budget.<hash>`
/// (the shared request budget of one API token; the key is a hash, never the token).
pub const POLL_STATE_BUCKET: &str = "ECWID_POLL_STATE";
/// Live deliverer replicas: key = a replica's id, put again every few seconds and removed on a
/// graceful stop. The replicas follow it with a watch and forget one whose entry was not put
/// again for a while; the bucket's `max_age` ([`DELIVERERS_MAX_AGE`]) keeps a newcomer from
/// reading long-dead entries (nats-server 2.9 has no per-key TTL). Each replica takes its
/// share of every instance's limits from the count.
pub const DELIVERERS_BUCKET: &str = "ECWID_DELIVERERS";
/// How long a deliverer replica's entry lives without being put again.
pub const DELIVERERS_MAX_AGE: Duration = Duration::from_secs(15);
/// Core NATS subject on which deliverer replicas tell each other which messages they put back
/// without an attempt (and when such a message is settled), so that whichever replica gets it
/// next does not count those put-backs as attempts. Payload: `<replicaId> +<seq>` | `-<seq>`.
pub const DEFERRALS_SUBJECT: &str = "ecwid.deliverer.deferrals";

/// Core NATS subject of on-demand backfills (request/reply; the poller replicas answer in
/// the [`POLLER_QUEUE`] group, so exactly one of them runs each request).
pub const BACKFILL_SUBJECT: &str = "ecwid.poller.backfill";
pub const POLLER_QUEUE: &str = "poller";

/// Envelopes of paused and disabled instances, held until resumed ([`crate::control`]).
pub const HELD_STREAM: &str = "ECWID_HELD";
/// Envelopes waiting for a retry, counted per instance on two subjects
/// (`ecwid.retrying.<instanceId>.in` and `.out`), for the instance's health ([`crate::control`]).
pub const RETRYING_STREAM: &str = "ECWID_RETRYING";
/// The Ecwid app's installs (app mode): the nonce of every OAuth `state` a callback took, so a
/// state is good once across replicas. Entries go after [`APP_STATES_MAX_AGE`], by which time
/// the state they stand for has expired.
pub const APP_STATES_BUCKET: &str = "ECWID_APP_STATES";
/// How long a taken nonce is remembered: longer than a state is valid (ten minutes).
pub const APP_STATES_MAX_AGE: Duration = Duration::from_secs(20 * 60);
/// Instance states (`active`, `paused`, `disabled`), keyed by instance id; no key = active.
pub const STATE_BUCKET: &str = "ECWID_INSTANCE_STATE";
/// Callback health shared by the deliverer replicas (breaker, failures, success counts), keyed
/// by a hash of the callback URL ([`model::health::callback_key`]).
pub const CALLBACKS_BUCKET: &str = "ECWID_CALLBACKS";

/// Durable pull consumer of the normalizer replicas on [`RAW_STREAM`].
pub const NORMALIZER_CONSUMER: &str = "normalizer";
/// Durable pull consumer of the deliverer replicas on [`EVENTS_STREAM`]: every envelope of the
/// unordered instances (`ecwid.events.>`), never those of ordered ones.
pub const DELIVERER_CONSUMER: &str = "deliverer";
/// Durable pull consumers of ordered instances, one each: `<prefix>-<instanceId>`, filtered to
/// [`ordered_subject`] (see [`crate::ordered`]).
pub const ORDERED_CONSUMER_PREFIX: &str = "ordered";

/// Subject prefixes: `<prefix>.<token>`; a stream's subjects are `<prefix>.>`.
pub const RAW_PREFIX: &str = "ecwid.raw";
pub const EVENTS_PREFIX: &str = "ecwid.events";
/// Envelopes of instances with ordered delivery, in `ECWID_EVENTS` too.
pub const ORDERED_PREFIX: &str = "ecwid.ordered";
pub const DEAD_PREFIX: &str = "ecwid.dead";
pub const HELD_PREFIX: &str = "ecwid.held";
pub const RETRYING_PREFIX: &str = "ecwid.retrying";

/// `ecwid.raw.<storeId>`
pub fn raw_subject(store_id: &str) -> String {
    format!("{RAW_PREFIX}.{store_id}")
}

/// `ecwid.events.<instanceId>`
pub fn events_subject(instance_id: &str) -> String {
    format!("{EVENTS_PREFIX}.{instance_id}")
}

/// `ecwid.ordered.<instanceId>`: the envelopes of an instance with ordered delivery, stored in
/// the order the ingest accepted their events.
pub fn ordered_subject(instance_id: &str) -> String {
    format!("{ORDERED_PREFIX}.{instance_id}")
}

/// Where the envelopes of `instance_id` go: its ordered lane or the shared subject.
pub fn envelope_subject(instance_id: &str, ordered: bool) -> String {
    if ordered {
        ordered_subject(instance_id)
    } else {
        events_subject(instance_id)
    }
}

/// `ecwid.dead.<stage>.<id>`
pub fn dead_subject(stage: &str, id: &str) -> String {
    format!("{DEAD_PREFIX}.{stage}.{id}")
}

/// Whether `subject` is one a dead letter may be replayed to: a raw event or an envelope (an
/// ordered one goes back to the end of its lane).
pub fn is_work_subject(subject: &str) -> bool {
    [RAW_PREFIX, EVENTS_PREFIX, ORDERED_PREFIX].iter().any(|p| {
        subject
            .strip_prefix(p)
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(is_subject_token)
    })
}

/// A publish that JetStream did not acknowledge. The cause is kept.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("JetStream did not take the message")]
    Rejected(#[source] jetstream::context::PublishError),
    #[error("JetStream did not acknowledge within {0:?}")]
    Timeout(Duration),
}

/// Whether a publish failed because the stream is at its byte or message limit (JetStream's
/// `maximum bytes exceeded`, `maximum messages exceeded`).
pub fn is_stream_full(error: &str) -> bool {
    error.contains("maximum bytes exceeded") || error.contains("maximum messages exceeded")
}

/// Publishes `payload` with `headers` to `subject` and waits up to `timeout` for JetStream's ack:
/// nothing counts as stored before the ack. The ack says whether the message id was a duplicate.
pub async fn publish(
    js: &jetstream::Context,
    subject: String,
    headers: async_nats::HeaderMap,
    payload: bytes::Bytes,
    timeout: Duration,
) -> Result<jetstream::publish::PublishAck, PublishError> {
    let acked = async {
        js.publish_with_headers(subject, headers, payload)
            .await?
            .await
    };
    match tokio::time::timeout(timeout, acked).await {
        Ok(result) => result.map_err(PublishError::Rejected),
        Err(_) => Err(PublishError::Timeout(timeout)),
    }
}

/// The last token of a subject (`ecwid.raw.42` → `42`).
pub fn subject_tail(subject: &str) -> &str {
    subject.rsplit('.').next().unwrap_or(subject)
}

/// The longest id that may become a subject token. Every id the services make (instance UUIDs,
/// event ids, store ids) is far shorter; a request subject built from a much longer one can pass
/// nats-server's control-line limit (4 KiB), and the server then closes the whole connection.
pub const MAX_TOKEN_BYTES: usize = 128;

/// Whether `token` can stand as one subject token: no dots, wildcards or white space, and no
/// longer than [`MAX_TOKEN_BYTES`].
pub fn is_subject_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= MAX_TOKEN_BYTES
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The stream a work subject ([`is_work_subject`]) is stored in.
pub fn work_stream(subject: &str) -> &'static str {
    if subject.starts_with(RAW_PREFIX) {
        RAW_STREAM
    } else {
        EVENTS_STREAM
    }
}

/// The span a stage handles one message in: the W3C trace id and the ingest's request id from
/// the message's headers, so every stage's log lines for one webhook share them. With traces on
/// it is also the message's OpenTelemetry `process` span (messaging semantic conventions, our
/// `ecwid.*`, `instance.id` and `envelope.id`), a child of the context the headers carry, and the
/// time the message waited in its stream is recorded beside it (on its first delivery).
pub fn message_span(message: &jetstream::Message) -> tracing::Span {
    use tracing::field::Empty;
    let h = message.headers.as_ref();
    let get = |name| header(h, name).map(str::to_owned);
    let trace_id = get(headers::TRACEPARENT)
        .and_then(|t| t.split('-').nth(1).map(str::to_owned))
        .unwrap_or_default();
    let request_id = get(headers::REQUEST_ID).unwrap_or_default();
    if !crate::otel::enabled() {
        // The span the logs have always had, and no field more.
        return tracing::info_span!(target: crate::otel::TARGET, "event", trace_id, request_id);
    }
    let span = tracing::info_span!(
        target: crate::otel::TARGET,
        "event",
        trace_id,
        request_id,
        otel.name = Empty,
        otel.kind = Empty,
        messaging.system = Empty,
        messaging.operation.type = Empty,
        messaging.destination.name = Empty,
        messaging.consumer.group.name = Empty,
        messaging.message.id = Empty,
        messaging.message.delivery_count = Empty,
        ecwid.store_id = Empty,
        ecwid.event_id = Empty,
        instance.id = Empty,
        envelope.id = Empty,
    );
    if !span.is_disabled() {
        let subject = message.subject.as_str();
        let stream = work_stream(subject);
        let consumer = if stream == RAW_STREAM {
            NORMALIZER_CONSUMER
        } else if subject.starts_with(ORDERED_PREFIX) {
            ORDERED_CONSUMER_PREFIX
        } else {
            DELIVERER_CONSUMER
        };
        span.record("otel.name", format!("process {stream}"));
        span.record("otel.kind", "consumer");
        span.record("messaging.system", "nats");
        span.record("messaging.operation.type", "process");
        span.record("messaging.destination.name", subject);
        span.record("messaging.consumer.group.name", consumer);
        if let Some(id) = header(h, headers::MSG_ID) {
            span.record("messaging.message.id", id);
        }
        if let Some(v) = header(h, headers::STORE_ID) {
            span.record("ecwid.store_id", v);
        }
        // An envelope says which Ecwid event it is; a raw message's id names it.
        let event_id = header(h, headers::ECWID_EVENT_ID)
            .or_else(|| header(h, headers::MSG_ID).and_then(model::ecwid::event_id_of_msg_id));
        if let Some(v) = event_id {
            span.record("ecwid.event_id", v);
        }
        if stream == EVENTS_STREAM {
            if let Some(v) = header(h, headers::INSTANCE_ID) {
                span.record("instance.id", v);
            }
            if let Some(v) = header(h, headers::MSG_ID) {
                span.record("envelope.id", v);
            }
        }
        let parent = crate::otel::extract_nats(h);
        if let Ok(info) = message.info() {
            span.record("messaging.message.delivery_count", info.delivered);
            if info.delivered == 1 {
                crate::otel::record_wait(stream, info.published.into(), &parent);
            }
        }
        crate::otel::set_parent(&span, parent);
    }
    span
}

/// Like [`publish_span`], the first span of a trace of its own: an entity the poller read is an
/// event of its own, linked to the cycle that read it ([`crate::otel::link`]).
pub fn publish_root_span(stream: &'static str, subject: &str, msg_id: &str) -> tracing::Span {
    tracing::trace_span!(
        target: crate::otel::TARGET,
        parent: None,
        "publish",
        otel.name = format!("publish {stream}"),
        otel.kind = "producer",
        messaging.system = "nats",
        messaging.operation.type = "publish",
        messaging.destination.name = subject,
        messaging.message.id = msg_id,
    )
}

/// The `publish` span of a message going to `subject` of `stream` (OpenTelemetry messaging
/// conventions): its context goes into the message's headers ([`crate::otel::inject_nats`]).
/// Disabled while traces are off.
pub fn publish_span(stream: &'static str, subject: &str, msg_id: &str) -> tracing::Span {
    tracing::trace_span!(
        target: crate::otel::TARGET,
        "publish",
        otel.name = format!("publish {stream}"),
        otel.kind = "producer",
        messaging.system = "nats",
        messaging.operation.type = "publish",
        messaging.destination.name = subject,
        messaging.message.id = msg_id,
        instance.id = tracing::field::Empty,
        envelope.id = tracing::field::Empty,
    )
}

/// The value of header `name` in `h`, when there is one.
pub fn header(h: Option<&async_nats::HeaderMap>, name: async_nats::HeaderName) -> Option<&str> {
    h.and_then(|h| h.get(name)).map(|v| v.as_str())
}

/// Header names the pipeline sets. `Nats-Msg-Id` is JetStream's own. They are [`HeaderName`]s
/// built at compile time: a `&str` name is checked and copied into a new allocation on every
/// `HeaderMap::insert` and `get`.
///
/// [`HeaderName`]: async_nats::HeaderName
pub mod headers {
    use async_nats::header::HeaderName;

    pub const MSG_ID: HeaderName = HeaderName::from_static("Nats-Msg-Id");
    /// When the ingest received the webhook, Unix milliseconds.
    pub const RECEIVED_AT: HeaderName = HeaderName::from_static("Ecwid-Received-At");
    /// `v3` (REST webhook, JSON), `ion` (legacy Instant Order Notification, form) or `poll`
    /// (an entity the poller read from the REST API).
    pub const FORMAT: HeaderName = HeaderName::from_static("Ecwid-Format");
    /// `true` when the Ecwid signature was checked and matched.
    pub const VERIFIED: HeaderName = HeaderName::from_static("Ecwid-Verified");
    pub const REQUEST_ID: HeaderName = HeaderName::from_static("Ecwid-Request-Id");
    pub const STORE_ID: HeaderName = HeaderName::from_static("Ecwid-Store-Id");
    /// On an envelope: the id Ecwid knows the event by (v3 `eventId`; for ION its dedupe id).
    pub const ECWID_EVENT_ID: HeaderName = HeaderName::from_static("Ecwid-Event-Id");
    pub const INSTANCE_ID: HeaderName = HeaderName::from_static("Ecwid-Instance-Id");
    /// W3C trace context, so every stage logs under the ingest's trace (and, with traces on,
    /// continues it: [`crate::otel`]).
    pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
    /// W3C trace state, beside `traceparent` when the trace has one.
    pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

    pub const DEAD_STAGE: HeaderName = HeaderName::from_static("Ecwid-Dead-Stage");
    pub const DEAD_REASON: HeaderName = HeaderName::from_static("Ecwid-Dead-Reason");
    pub const DEAD_ERROR: HeaderName = HeaderName::from_static("Ecwid-Dead-Error");
    pub const DEAD_AT: HeaderName = HeaderName::from_static("Ecwid-Dead-At");
    pub const DEAD_ATTEMPTS: HeaderName = HeaderName::from_static("Ecwid-Attempts");
    pub const DEAD_FIRST_ATTEMPT_AT: HeaderName = HeaderName::from_static("Ecwid-First-Attempt-At");
    pub const DEAD_LAST_ATTEMPT_AT: HeaderName = HeaderName::from_static("Ecwid-Last-Attempt-At");
    pub const DEAD_LAST_STATUS: HeaderName = HeaderName::from_static("Ecwid-Last-Status");
    pub const ORIGINAL_SUBJECT: HeaderName = HeaderName::from_static("Ecwid-Original-Subject");
    /// The first message id of an event that was dead-lettered and replayed.
    pub const ORIGINAL_MSG_ID: HeaderName = HeaderName::from_static("Ecwid-Original-Msg-Id");
    /// On a replayed message: the dead letter's sequence it came from.
    pub const REPLAYED_FROM: HeaderName = HeaderName::from_static("Ecwid-Replayed-From");
    /// On a redelivered envelope: the attempts made before, so numbering goes on.
    pub const ATTEMPT_OFFSET: HeaderName = HeaderName::from_static("Ecwid-Attempt-Offset");
    /// On a test envelope: where the deliverer answers the one attempt's result (core NATS).
    /// A test envelope is tried once, never retried or dead-lettered.
    pub const TEST_REPLY_TO: HeaderName = HeaderName::from_static("Ecwid-Test-Reply-To");
    /// On a held envelope: its `ECWID_EVENTS` sequence; on a released one: `ECWID_HELD:<seq>`.
    pub const HELD_FROM: HeaderName = HeaderName::from_static("Ecwid-Held-From");

    /// What travels with an event from stage to stage, into a dead letter and back on replay.
    pub const CARRIED: [HeaderName; 10] = [
        RECEIVED_AT,
        FORMAT,
        VERIFIED,
        REQUEST_ID,
        STORE_ID,
        INSTANCE_ID,
        ECWID_EVENT_ID,
        TRACEPARENT,
        TRACESTATE,
        ORIGINAL_MSG_ID,
    ];

    /// Copies the [`CARRIED`] headers of `from` into `to`.
    pub fn carry(from: &async_nats::HeaderMap, to: &mut async_nats::HeaderMap) {
        for name in CARRIED {
            if let Some(v) = from.get(name.clone()) {
                to.insert(name, v.as_str());
            }
        }
    }
}

/// Connects to NATS (any one of `servers`: async-nats tries them in turn, and learns the rest
/// of a cluster from the server), retrying with [`startup_backoff`] until one answers or
/// `cancel` fires. The client reconnects on its own after that, to any server of the cluster.
pub async fn connect(
    servers: &NatsServers,
    name: &str,
    cancel: &CancellationToken,
) -> Result<async_nats::Client, Error> {
    let url = servers.to_string();
    let attempt = || async {
        async_nats::ConnectOptions::new()
            .name(name)
            .connection_timeout(Duration::from_secs(3))
            .max_reconnects(None)
            .connect(servers.addrs())
            .await
    };
    let retried = attempt
        .retry(startup_backoff().without_max_times())
        .notify(|err, wait| {
            tracing::warn!(error = %err, %url, retry_in = ?wait, "NATS is not reachable yet; retrying.");
        });
    tokio::select! {
        result = retried => result.map_err(|source| Error::Connect { url: url.clone(), source }),
        () = cancel.cancelled() => Err(Error::Cancelled),
    }
}

/// The backoff for start-up steps against NATS (connecting, setting up the topology):
/// [`model::retry::BACKOFF_MIN`] doubling to [`model::retry::BACKOFF_MAX`], each wait stretched by
/// up to 100 % (backon's jitter) so that replicas started together do not retry in step. The
/// caller says how many times (connect: until cancelled; topology: a bounded number).
pub fn startup_backoff() -> backon::ExponentialBuilder {
    backon::ExponentialBuilder::default()
        .with_min_delay(model::retry::BACKOFF_MIN)
        .with_max_delay(model::retry::BACKOFF_MAX)
        .with_jitter()
}

/// The JetStream context every service uses.
pub fn jetstream(client: async_nats::Client) -> jetstream::Context {
    jetstream::new(client)
}

/// How many times getting or creating a consumer is tried before the service gives up.
const CONSUMER_TRIES: usize = 8;

/// Gets the durable pull consumer `config.durable_name` on `stream`, creating it when missing.
/// An existing consumer whose `ack_wait` is shorter than `config.ack_wait` is an error: a message
/// would be redelivered while still being worked on.
pub async fn ensure_pull_consumer(
    js: &jetstream::Context,
    stream: &str,
    config: pull::Config,
) -> Result<jetstream::consumer::Consumer<pull::Config>, Error> {
    let name = config.durable_name.clone().unwrap_or_default();
    let topology = |message: String| Error::Topology {
        what: "consumer",
        name: name.clone(),
        message,
    };
    let wanted_ack_wait = config.ack_wait;
    let wanted_filter = config.filter_subject.clone();
    // A server that is starting, or busy with every service's set-up at once (nats-server 2.9
    // on a loaded machine), may not answer in time: ask again, as the topology does.
    let got = || async {
        let stream = js
            .get_stream(stream)
            .await
            .map_err(|e| topology(e.to_string()))?;
        let mut consumer = stream
            .get_or_create_consumer(&name, config.clone())
            .await
            .map_err(|e| topology(e.to_string()))?;
        let info = consumer
            .info()
            .await
            .map_err(|e| topology(e.to_string()))?
            .clone();
        Ok::<_, Error>((stream, consumer, info))
    };
    let (stream, mut consumer, mut info) = got
        .retry(startup_backoff().with_max_times(CONSUMER_TRIES))
        .notify(|error, wait| {
            tracing::warn!(%error, retry_in = ?wait, "JetStream consumer not ready; retrying.");
        })
        .await?;
    if info.config.filter_subject != wanted_filter {
        // A consumer created before its filter existed (the deliverer's, before ordered lanes)
        // would also hand out what another consumer owns: narrow it, or refuse to start.
        consumer = stream.update_consumer(config).await.map_err(|e| {
            topology(format!(
                "existing consumer filters {:?}, this version needs {wanted_filter:?} and the \
                 server would not change it ({e}); delete the consumer (nats consumer rm) so it \
                 is created again",
                info.config.filter_subject
            ))
        })?;
        info = consumer
            .info()
            .await
            .map_err(|e| topology(e.to_string()))?
            .clone();
    }
    if info.config.ack_wait < wanted_ack_wait {
        return Err(topology(format!(
            "existing consumer has ack_wait {:?}, shorter than the {:?} this configuration needs; \
             delete the consumer (nats consumer rm) so it is created again",
            info.config.ack_wait, wanted_ack_wait
        )));
    }
    Ok(consumer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_and_tokens() {
        assert_eq!(raw_subject("42"), "ecwid.raw.42");
        assert_eq!(events_subject("ab-1"), "ecwid.events.ab-1");
        assert_eq!(dead_subject("deliver", "ab-1"), "ecwid.dead.deliver.ab-1");
        assert_eq!(subject_tail("ecwid.raw.42"), "42");
        assert!(is_work_subject("ecwid.raw.42"));
        assert!(is_work_subject("ecwid.events.ab-1"));
        assert!(is_work_subject("ecwid.ordered.ab-1"));
        assert_eq!(envelope_subject("ab-1", true), "ecwid.ordered.ab-1");
        assert_eq!(envelope_subject("ab-1", false), "ecwid.events.ab-1");
        assert!(!is_work_subject("ecwid.dead.deliver.ab-1"));
        assert!(!is_work_subject("ecwid.raw.4.2"));
        assert!(!is_work_subject("ecwid.rawx.42"));
        assert!(is_subject_token("1003"));
        assert!(!is_subject_token("a.b"));
        assert!(!is_subject_token("*"));
        assert!(!is_subject_token(""));
        assert!(is_subject_token(&"a".repeat(MAX_TOKEN_BYTES)));
        assert!(!is_subject_token(&"a".repeat(MAX_TOKEN_BYTES + 1)));
    }
}
