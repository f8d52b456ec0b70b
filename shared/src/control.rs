//! Instance control at run time: reading and writing an instance's state in
//! `ECWID_INSTANCE_STATE` (the states and their rules: `model::state`; a callback's shared
//! health and breaker: `model::health`), the markers of envelopes waiting for a retry
//! (`ECWID_RETRYING`), and the hold where a paused or disabled instance's envelopes wait.
//!
//! States and callback health live in JetStream KV; every deliverer replica follows both with a
//! KV watch ([`crate::kvwatch`]), so a change reaches each within a second, and writes with
//! compare-and-set, so two replicas never lose each other's failure.
//!
//! Held envelopes are moved, not spun: a deliverer that takes an envelope of a held instance
//! publishes it to `ecwid.held.<instanceId>` (stream `ECWID_HELD`) and acks it, so nothing
//! touches it while the instance is held. [`release`] moves them back to `ECWID_EVENTS`, in
//! order, when the instance is active again.

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use model::retry::WORK_STREAM_MAX_AGE;
use model::state::InstanceState;

use crate::nats::{
    events_subject, headers, HELD_PREFIX, HELD_STREAM, RETRYING_PREFIX, RETRYING_STREAM,
};

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

/// `ECWID_RETRYING`: how many envelopes of each instance wait for a retry, as two counts per
/// instance: an empty message on `ecwid.retrying.<instanceId>.in` when an envelope's first
/// attempt fails, one on `….out` when an envelope that failed before is settled (delivered,
/// dead-lettered, dropped or held). Waiting = in − out. Two subjects per instance, however many
/// envelopes fail: nats-server keeps every subject in memory, so a marker subject per envelope
/// (as before) tied its memory to a receiver's outage (one day down at 100 events/s: 8.6
/// million). Kept no longer than envelopes are; at the limits the oldest go.
pub fn retrying_stream_config(replicas: usize) -> stream::Config {
    stream::Config {
        name: RETRYING_STREAM.to_owned(),
        description: Some("Envelopes waiting for a retry, counted per instance".to_owned()),
        subjects: vec![format!("{RETRYING_PREFIX}.>")],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        max_age: WORK_STREAM_MAX_AGE,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    }
}

/// Which count a message of `ECWID_RETRYING` adds to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retrying {
    /// An envelope's first attempt failed: it waits for a retry.
    In,
    /// An envelope that failed before was settled.
    Out,
}

impl Retrying {
    fn token(self) -> &'static str {
        match self {
            Self::In => "in",
            Self::Out => "out",
        }
    }
}

/// The subject counting `side` for `instance_id`.
pub fn retrying_subject(instance_id: &str, side: Retrying) -> String {
    format!("{RETRYING_PREFIX}.{instance_id}.{}", side.token())
}

/// Counts envelope `seq` (its `ECWID_EVENTS` sequence) of `instance_id` in or out of those
/// waiting for a retry. Sent again after a failure, it is counted once (its message id is the
/// envelope's, within the duplicate window).
pub async fn count_retrying(
    js: &jetstream::Context,
    instance_id: &str,
    seq: u64,
    side: Retrying,
    timeout: Duration,
) -> Result<(), ControlError> {
    let mut h = HeaderMap::new();
    h.insert(
        async_nats::header::NATS_MESSAGE_ID,
        format!("retry-{}:{seq}", side.token()).as_str(),
    );
    crate::nats::publish(
        js,
        retrying_subject(instance_id, side),
        h,
        Bytes::new(),
        timeout,
    )
    .await
    .map(drop)
    .map_err(nats)
}

/// How many envelopes of `instance_id` wait for a retry.
pub async fn retrying_count(
    js: &jetstream::Context,
    instance_id: &str,
) -> Result<u64, ControlError> {
    let (subject_in, subject_out) = (
        retrying_subject(instance_id, Retrying::In),
        retrying_subject(instance_id, Retrying::Out),
    );
    let (counted_in, counted_out) = tokio::try_join!(
        count_subject(js, RETRYING_STREAM, &subject_in),
        count_subject(js, RETRYING_STREAM, &subject_out),
    )?;
    // An out without its in: the in was not written, or aged out first.
    Ok(counted_in.saturating_sub(counted_out))
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
