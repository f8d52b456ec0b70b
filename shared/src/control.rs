//! Instance control: the state an operator or the deliverer puts an instance in (active, paused,
//! disabled), the health of each callback URL that every deliverer replica shares (breaker,
//! consecutive failures, success counts per minute), and the hold where a paused or disabled
//! instance's envelopes wait.
//!
//! Both live in JetStream KV: `ECWID_INSTANCE_STATE` (key: instance id; no key = active) and
//! `ECWID_CALLBACKS` (key: [`callback_key`] of the URL). Every deliverer replica follows both
//! with a KV watch ([`crate::kvwatch`]), so a change reaches each within a second, and writes
//! with compare-and-set, so two replicas never lose each other's failure.
//!
//! Held envelopes are moved, not spun: a deliverer that takes an envelope of a held instance
//! publishes it to `ecwid.held.<instanceId>` (stream `ECWID_HELD`) and acks it, so nothing
//! touches it while the instance is held. [`release`] moves them back to `ECWID_EVENTS`, in
//! order, when the instance is active again.

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::nats::{
    events_subject, headers, HELD_PREFIX, HELD_STREAM, RETRYING_PREFIX, RETRYING_STREAM,
    WORK_STREAM_MAX_AGE,
};
use crate::time_fmt::unix_ms_to_rfc3339;

/// Where an instance's events go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Delivered as they come.
    #[default]
    Active,
    /// Held by an operator until resumed.
    Paused,
    /// Held since its deliveries failed for `DELIVER_DISABLE_AFTER`; resumed by an operator.
    Disabled,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Active => "active",
            State::Paused => "paused",
            State::Disabled => "disabled",
        }
    }

    /// Whether its envelopes wait in the hold.
    pub fn holds(self) -> bool {
        !matches!(self, State::Active)
    }

    pub const ALL: [State; 3] = [State::Active, State::Paused, State::Disabled];
}

/// The value under an instance id in `ECWID_INSTANCE_STATE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceState {
    pub state: State,
    /// RFC 3339: when it entered this state.
    pub since: String,
    /// Why, in words (for `disabled`: the failure that disabled it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl InstanceState {
    pub fn new(state: State, now_ms: i64, reason: Option<String>) -> Self {
        Self {
            state,
            since: unix_ms_to_rfc3339(now_ms),
            reason,
        }
    }
}

/// A circuit breaker's position.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Breaker {
    #[default]
    Closed,
    Open,
    HalfOpen,
}

impl Breaker {
    pub fn as_str(self) -> &'static str {
        match self {
            Breaker::Closed => "closed",
            Breaker::Open => "open",
            Breaker::HalfOpen => "half_open",
        }
    }
}

/// Minutes of success counts kept for the success rate.
pub const RATE_MINUTES: i64 = 60;
/// The longest `lastError` kept.
pub const MAX_ERROR_CHARS: usize = 300;

/// The value under a callback URL's key in `ECWID_CALLBACKS`: one breaker and one failure count
/// per URL, shared by every replica (and by every instance that uses the URL). Times are Unix
/// milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CallbackHealth {
    pub breaker: Breaker,
    pub consecutive_failures: u32,
    /// While open: when the next probe may go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_until_ms: Option<i64>,
    /// While half open: until when the replica that took the probe holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_until_ms: Option<i64>,
    /// The first failure after the last success (what auto-disable measures from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_since_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// `[minute since the epoch, successes, failures]`, the last [`RATE_MINUTES`] minutes.
    #[serde(default)]
    pub minutes: Vec<[i64; 3]>,
}

/// What a breaker says to a request about to go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Go,
    /// Open, or another replica's probe is out: put the event back for this long.
    Wait(Duration),
    /// The cool-down is over (or the last probe's holder vanished): whoever takes the probe
    /// (a compare-and-set of [`CallbackHealth::take_probe`]) may go.
    Probe,
}

/// Counts not yet written: successes (and failures) since the last write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub ok: i64,
    pub failed: i64,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}

impl CallbackHealth {
    /// Whether a request may go at `now_ms`.
    pub fn admit(&self, now_ms: i64, probe_wait: Duration) -> Admit {
        match self.breaker {
            Breaker::Closed => Admit::Go,
            Breaker::Open => match self.open_until_ms {
                Some(until) if now_ms < until => {
                    Admit::Wait(Duration::from_millis((until - now_ms) as u64))
                }
                _ => Admit::Probe,
            },
            Breaker::HalfOpen => match self.probe_until_ms {
                Some(until) if now_ms < until => Admit::Wait(probe_wait),
                _ => Admit::Probe,
            },
        }
    }

    /// This replica takes the probe until `now_ms + lease`.
    pub fn take_probe(&mut self, now_ms: i64, lease: Duration) {
        self.breaker = Breaker::HalfOpen;
        self.probe_until_ms = Some(now_ms + ms(lease));
        self.open_until_ms = None;
    }

    /// The probe taken was not sent after all: the next request may probe at once.
    pub fn give_back_probe(&mut self) {
        if self.breaker == Breaker::HalfOpen {
            self.probe_until_ms = None;
        }
    }

    /// Adds counts for the minute of `now_ms`, dropping minutes older than [`RATE_MINUTES`].
    pub fn add_counts(&mut self, now_ms: i64, counts: Counts) {
        let minute = now_ms.div_euclid(60_000);
        self.minutes.retain(|m| m[0] > minute - RATE_MINUTES);
        if counts == Counts::default() {
            return;
        }
        match self.minutes.iter_mut().find(|m| m[0] == minute) {
            Some(m) => {
                m[1] += counts.ok;
                m[2] += counts.failed;
            }
            None => self.minutes.push([minute, counts.ok, counts.failed]),
        }
    }

    /// Successes over all attempts in the last hour, `None` without attempts.
    pub fn success_rate(&self, now_ms: i64) -> Option<f64> {
        let minute = now_ms.div_euclid(60_000);
        let (ok, all) = self
            .minutes
            .iter()
            .filter(|m| m[0] > minute - RATE_MINUTES)
            .fold((0, 0), |(ok, all), m| (ok + m[1], all + m[1] + m[2]));
        (all > 0).then(|| ok as f64 / all as f64)
    }

    /// A request to this URL succeeded at `now_ms`: the breaker closes, the failures end.
    pub fn succeeded(&mut self, now_ms: i64) {
        self.breaker = Breaker::Closed;
        self.consecutive_failures = 0;
        self.open_until_ms = None;
        self.probe_until_ms = None;
        self.failing_since_ms = None;
        self.last_success_at_ms = Some(now_ms);
    }

    /// A request failed at `now_ms` with `error`. The breaker opens for `cooldown` after
    /// `failures_to_open` consecutive failures, or at once when a probe failed. Returns whether
    /// this failure opened it.
    pub fn failed(
        &mut self,
        now_ms: i64,
        error: &str,
        failures_to_open: u32,
        cooldown: Duration,
    ) -> bool {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.last_failure_at_ms = Some(now_ms);
        self.failing_since_ms.get_or_insert(now_ms);
        self.last_error = Some(crate::eventlog::clip(error, MAX_ERROR_CHARS));
        let opens = match self.breaker {
            Breaker::Closed => self.consecutive_failures >= failures_to_open,
            Breaker::HalfOpen => true,
            Breaker::Open => false,
        };
        if opens {
            self.breaker = Breaker::Open;
            self.open_until_ms = Some(now_ms + ms(cooldown));
            self.probe_until_ms = None;
        }
        opens
    }

    /// How long its requests have failed without a success in between, at `now_ms`.
    pub fn failing_for(&self, now_ms: i64) -> Option<Duration> {
        self.failing_since_ms
            .map(|since| Duration::from_millis(u64::try_from(now_ms - since).unwrap_or(0)))
    }
}

/// The key of a callback URL in `ECWID_CALLBACKS`: a hash, so a URL's secrets (user info, query)
/// never become a key anyone can list.
pub fn callback_key(url: &str) -> String {
    crate::hex::lower(&Sha256::digest(url.as_bytes())[..16])
}

pub fn held_subject(instance_id: &str) -> String {
    format!("{HELD_PREFIX}.{instance_id}")
}

/// `ECWID_HELD`: envelopes of paused and disabled instances. They stay until released, however
/// long the instance is held.
pub fn held_stream_config(replicas: usize, duplicate_window: Duration) -> stream::Config {
    stream::Config {
        name: HELD_STREAM.to_owned(),
        description: Some("Envelopes of paused and disabled instances, held".to_owned()),
        subjects: vec![format!("{HELD_PREFIX}.>")],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        duplicate_window,
        discard: stream::DiscardPolicy::New,
        allow_direct: true,
        ..Default::default()
    }
}

/// `ECWID_RETRYING`: one empty marker per envelope waiting for a retry, gone when it is settled.
/// Kept no longer than envelopes are.
pub fn retrying_stream_config(replicas: usize) -> stream::Config {
    stream::Config {
        name: RETRYING_STREAM.to_owned(),
        description: Some("Envelopes waiting for a retry, one marker each".to_owned()),
        subjects: vec![format!("{RETRYING_PREFIX}.>")],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        max_messages_per_subject: 1,
        max_age: WORK_STREAM_MAX_AGE,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    }
}

/// The marker of envelope `seq` (its `ECWID_EVENTS` sequence) of `instance_id`.
pub fn retrying_subject(instance_id: &str, seq: u64) -> String {
    format!("{RETRYING_PREFIX}.{instance_id}.{seq}")
}

/// Marks envelope `seq` as waiting for a retry (idempotent: one marker per subject).
pub async fn mark_retrying(
    js: &jetstream::Context,
    instance_id: &str,
    seq: u64,
    timeout: Duration,
) -> Result<(), ControlError> {
    crate::nats::publish(
        js,
        retrying_subject(instance_id, seq),
        HeaderMap::new(),
        Bytes::new(),
        timeout,
    )
    .await
    .map(drop)
    .map_err(nats)
}

/// Removes envelope `seq`'s marker, if it has one.
pub async fn unmark_retrying(
    js: &jetstream::Context,
    instance_id: &str,
    seq: u64,
) -> Result<(), ControlError> {
    let stream = js.get_stream(RETRYING_STREAM).await.map_err(nats)?;
    stream
        .purge()
        .filter(retrying_subject(instance_id, seq))
        .await
        .map(drop)
        .map_err(nats)
}

/// How many envelopes of `instance_id` wait for a retry.
pub async fn retrying_count(
    js: &jetstream::Context,
    instance_id: &str,
) -> Result<u64, ControlError> {
    count_subject(
        js,
        RETRYING_STREAM,
        &format!("{RETRYING_PREFIX}.{instance_id}.*"),
    )
    .await
}

/// Errors of the control store and the hold.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("JetStream: {0}")]
    Nats(String),
    #[error("someone else changed it at the same time; try again")]
    Conflict,
}

fn nats(e: impl std::fmt::Display) -> ControlError {
    ControlError::Nats(e.to_string())
}

/// The instance's state as stored (absent: active since it was created), with its revision
/// (0 when absent).
pub async fn read_state(
    store: &kv::Store,
    instance_id: &str,
) -> Result<(Option<InstanceState>, u64), ControlError> {
    match store.entry(instance_id).await.map_err(nats)? {
        Some(entry) if entry.operation == kv::Operation::Put => {
            Ok((serde_json::from_slice(&entry.value).ok(), entry.revision))
        }
        Some(entry) => Ok((None, entry.revision)),
        None => Ok((None, 0)),
    }
}

/// Writes `next` if the stored state is still at `revision` (0: none stored).
pub async fn write_state(
    store: &kv::Store,
    instance_id: &str,
    next: &InstanceState,
    revision: u64,
) -> Result<(), ControlError> {
    let value = Bytes::from(serde_json::to_vec(next).map_err(nats)?);
    let written = if revision == 0 {
        store
            .create(instance_id, value)
            .await
            .map(drop)
            .map_err(|e| {
                if e.kind() == kv::CreateErrorKind::AlreadyExists {
                    ControlError::Conflict
                } else {
                    nats(e)
                }
            })
    } else {
        store
            .update(instance_id, value, revision)
            .await
            .map(drop)
            .map_err(|e| {
                if e.kind() == kv::UpdateErrorKind::WrongLastRevision {
                    ControlError::Conflict
                } else {
                    nats(e)
                }
            })
    };
    written
}

/// The headers a held envelope keeps: all but JetStream's own (a fresh message id is set).
fn carried(
    from: Option<&HeaderMap>,
    msg_id: &str,
    extra: &[(async_nats::HeaderName, &str)],
) -> HeaderMap {
    let mut out = HeaderMap::new();
    if let Some(from) = from {
        for (name, values) in from.iter() {
            let name: &str = name.as_ref();
            if name.starts_with("Nats-") {
                continue;
            }
            for value in values {
                out.append(name, value.as_str());
            }
        }
    }
    out.insert(async_nats::header::NATS_MESSAGE_ID, msg_id);
    for (name, value) in extra {
        out.insert(name.clone(), *value);
    }
    out
}

/// Moves an envelope of a held instance into the hold. `source_seq` (its `ECWID_EVENTS`
/// sequence) makes the move idempotent: moved twice, it is held once (within the duplicate
/// window). `attempts_made` (all its attempts so far) goes with it as its attempt offset, so
/// the event log numbers the attempts after its release on. The caller acks the original only
/// after this returns `Ok`.
pub async fn hold(
    js: &jetstream::Context,
    instance_id: &str,
    source_seq: u64,
    attempts_made: u64,
    h: Option<&HeaderMap>,
    payload: Bytes,
    timeout: Duration,
) -> Result<(), ControlError> {
    let seq = source_seq.to_string();
    let offset = attempts_made.to_string();
    let headers = carried(
        h,
        &format!("held-{seq}"),
        &[
            (headers::HELD_FROM, seq.as_str()),
            (headers::ATTEMPT_OFFSET, offset.as_str()),
        ],
    );
    crate::nats::publish(js, held_subject(instance_id), headers, payload, timeout)
        .await
        .map(drop)
        .map_err(nats)
}

/// How many envelopes of `instance_id` are held.
pub async fn held_count(js: &jetstream::Context, instance_id: &str) -> Result<u64, ControlError> {
    count_subject(js, HELD_STREAM, &held_subject(instance_id)).await
}

/// How many messages of `stream` match `filter` now, read from a throwaway consumer's pending
/// count (one request each way; nothing is delivered).
pub async fn count_subject(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
) -> Result<u64, ControlError> {
    count_subject_from(js, stream, filter, None).await
}

/// Like [`count_subject`], counting from stream sequence `from` on.
pub async fn count_subject_from(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
    from: Option<u64>,
) -> Result<u64, ControlError> {
    use jetstream::consumer::{pull, DeliverPolicy};
    let stream = js.get_stream(stream).await.map_err(nats)?;
    let consumer = stream
        .create_consumer(pull::Config {
            filter_subject: filter.to_owned(),
            deliver_policy: match from {
                Some(seq) => DeliverPolicy::ByStartSequence {
                    start_sequence: seq.max(1),
                },
                None => DeliverPolicy::All,
            },
            ack_policy: jetstream::consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(5),
            memory_storage: true,
            ..Default::default()
        })
        .await
        .map_err(nats)?;
    let pending = consumer.cached_info().num_pending;
    let name = consumer.cached_info().name.clone();
    if let Err(error) = stream.delete_consumer(&name).await {
        // It goes by itself after its inactive threshold.
        tracing::debug!(%error, "Could not delete a counting consumer.");
    }
    Ok(pending)
}

/// What [`release`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Released {
    pub moved: u64,
}

/// Held envelopes moved per round: published back to back (JetStream stores them in the order
/// sent), their acks awaited together, then removed from the hold with one purge.
const RELEASE_BATCH: usize = 256;

/// Moves every held envelope of `instance_id` back to `ECWID_EVENTS`, oldest first, while
/// `still_active` says the instance is active. Each is published with a message id from its
/// hold sequence (two replicas releasing at once publish it once), then the hold is purged up
/// to the last one moved. Safe to run again after a crash: what was not purged is moved again,
/// and JetStream drops the duplicate within its window.
pub async fn release(
    js: &jetstream::Context,
    instance_id: &str,
    timeout: Duration,
    still_active: impl Fn() -> bool,
) -> Result<Released, ControlError> {
    let stream = js.get_stream(HELD_STREAM).await.map_err(nats)?;
    let subject = held_subject(instance_id);
    let target = events_subject(instance_id);
    let mut from = 1;
    let mut released = Released::default();
    while still_active() {
        let mut acks = Vec::with_capacity(RELEASE_BATCH);
        let mut last = None;
        while acks.len() < RELEASE_BATCH {
            let message = match stream
                .direct_get_next_for_subject(&subject, Some(from))
                .await
            {
                Ok(m) => m,
                Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => break,
                Err(e) => return Err(nats(e)),
            };
            let seq = message.sequence;
            let headers = carried(
                Some(&message.headers),
                &format!("released-{seq}"),
                &[(headers::HELD_FROM, &format!("{HELD_STREAM}:{seq}"))],
            );
            let ack = js
                .publish_with_headers(target.clone(), headers, message.payload)
                .await
                .map_err(nats)?;
            acks.push(ack);
            last = Some(seq);
            from = seq + 1;
        }
        let Some(last) = last else { break };
        let stored = tokio::time::timeout(
            timeout,
            futures::future::try_join_all(
                acks.into_iter().map(std::future::IntoFuture::into_future),
            ),
        )
        .await
        .map_err(|_| ControlError::Nats(format!("no ack within {timeout:?}")))?
        .map_err(nats)?;
        stream
            .purge()
            .filter(subject.clone())
            .sequence(last + 1)
            .await
            .map_err(nats)?;
        released.moved += stored.len() as u64;
    }
    Ok(released)
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOL: Duration = Duration::from_secs(30);

    #[test]
    fn a_breaker_opens_after_its_failures_and_one_probe_decides() {
        let mut h = CallbackHealth::default();
        let wait = Duration::from_secs(1);
        assert_eq!(h.admit(0, wait), Admit::Go);
        assert!(!h.failed(1_000, "HTTP 503", 3, COOL));
        assert!(!h.failed(2_000, "HTTP 503", 3, COOL));
        assert_eq!(h.admit(2_500, wait), Admit::Go);
        assert!(h.failed(3_000, "HTTP 503", 3, COOL), "the third opens it");
        assert_eq!(h.breaker, Breaker::Open);
        assert_eq!(h.failing_since_ms, Some(1_000));
        assert_eq!(h.admit(13_000, wait), Admit::Wait(Duration::from_secs(20)));
        assert_eq!(h.admit(33_000, wait), Admit::Probe);
        h.take_probe(33_000, Duration::from_secs(10));
        assert_eq!(h.breaker, Breaker::HalfOpen);
        assert_eq!(
            h.admit(34_000, wait),
            Admit::Wait(wait),
            "one probe at a time"
        );
        assert_eq!(
            h.admit(43_001, wait),
            Admit::Probe,
            "a vanished prober's lease ends"
        );
        // A failed probe opens it again at once.
        assert!(h.failed(35_000, "timeout", 3, COOL));
        assert_eq!(h.open_until_ms, Some(65_000));
        assert_eq!(h.failing_for(95_000), Some(Duration::from_secs(94)));
        h.take_probe(66_000, Duration::from_secs(10));
        h.succeeded(67_000);
        assert_eq!(h.breaker, Breaker::Closed);
        assert_eq!(h.consecutive_failures, 0);
        assert_eq!(h.failing_since_ms, None);
        assert_eq!(h.last_success_at_ms, Some(67_000));
        assert_eq!(
            h.last_error.as_deref(),
            Some("timeout"),
            "kept for the health"
        );
    }

    #[test]
    fn a_probe_given_back_lets_the_next_request_probe() {
        let mut h = CallbackHealth::default();
        h.failed(0, "x", 1, COOL);
        h.take_probe(40_000, Duration::from_secs(10));
        h.give_back_probe();
        assert_eq!(h.admit(40_001, Duration::from_secs(1)), Admit::Probe);
    }

    #[test]
    fn the_success_rate_covers_the_last_hour() {
        let mut h = CallbackHealth::default();
        assert_eq!(h.success_rate(0), None);
        let minute = 60_000;
        h.add_counts(0, Counts { ok: 9, failed: 0 });
        h.add_counts(10 * minute, Counts { ok: 1, failed: 2 });
        h.add_counts(10 * minute + 5, Counts { ok: 2, failed: 2 });
        assert_eq!(h.minutes.len(), 2);
        assert_eq!(h.success_rate(10 * minute), Some(12.0 / 16.0));
        // An hour on, the first minute has left the window.
        assert_eq!(h.success_rate(60 * minute), Some(3.0 / 7.0));
        h.add_counts(71 * minute, Counts::default());
        assert!(h.minutes.is_empty(), "old minutes are dropped on write");
    }

    #[test]
    fn callback_keys_hide_the_url() {
        let key = callback_key("https://user:pw@example.com/hook?token=s3cret");
        assert_eq!(key.len(), 32);
        assert!(key.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(key, callback_key("https://example.com/hook"));
        // The first 16 bytes of SHA-256("abc"), lowercase hex.
        assert_eq!(callback_key("abc"), "ba7816bf8f01cfea414140de5dae2223");
    }

    #[test]
    fn states_serialize_as_the_api_names_them() {
        let s = InstanceState::new(State::Disabled, 0, Some("HTTP 503".into()));
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["state"], "disabled");
        assert_eq!(json["since"], "1970-01-01T00:00:00Z");
        assert!(State::Paused.holds() && State::Disabled.holds() && !State::Active.holds());
        assert_eq!(
            serde_json::to_value(Breaker::HalfOpen).unwrap(),
            "half_open"
        );
    }
}
