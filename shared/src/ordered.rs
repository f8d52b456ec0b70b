//! Ordered delivery (`event.notification.ordered`): the contract between the normalizer, which
//! stores an ordered instance's envelopes on [`ordered_subject`] in the order the ingest accepted
//! their events, and the deliverer, whose replicas share one durable consumer per ordered
//! instance with `max_ack_pending = 1`, so the NATS server itself keeps one envelope in flight
//! across every replica and hands out the next only when the one before is acked (delivered, or
//! dead-lettered). A failing envelope is NAKed with its retry wait and stays the only one in
//! flight: it holds the ones after it.
//!
//! [`blocked_head`] says cheaply (a consumer info and two direct reads) which event holds an
//! instance's lane, for the health an operator reads.

use std::time::Duration;

use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy, consumer::DeliverPolicy};
use serde::{Deserialize, Serialize};

use crate::eventlog::EventLog;
use crate::nats::{ordered_subject, EVENTS_STREAM, ORDERED_CONSUMER_PREFIX};
use crate::Error;
use model::record::Status;

/// `ordered-<instanceId>`: the durable consumer of one ordered instance's lane.
pub fn consumer_name(instance_id: &str) -> String {
    format!("{ORDERED_CONSUMER_PREFIX}-{instance_id}")
}

/// The instance id of a lane's consumer name, if `name` is one.
pub fn instance_of_consumer(name: &str) -> Option<&str> {
    name.strip_prefix(ORDERED_CONSUMER_PREFIX)
        .and_then(|rest| rest.strip_prefix('-'))
        .filter(|id| crate::nats::is_subject_token(id))
}

/// The lane consumer of `instance_id`. `ack_wait` is the deliverer's (longer than an attempt
/// can take): a replica that dies holding the head gives it back to another after that, and it
/// is still the head.
pub fn consumer_config(instance_id: &str, ack_wait: Duration) -> pull::Config {
    pull::Config {
        durable_name: Some(consumer_name(instance_id)),
        description: Some("ecwid-events ordered delivery of one instance".to_owned()),
        filter_subject: ordered_subject(instance_id),
        // The subject is new when the instance turns ordered: everything on it is for the lane.
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait,
        max_deliver: -1,
        // The whole point: one envelope in flight, across all replicas, waiting retries included.
        max_ack_pending: 1,
        ..Default::default()
    }
}

/// The event an ordered instance's lane is stuck on: in flight, attempted and failed at least
/// once, waiting for its next attempt while the ones after it wait too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockedHead {
    /// The envelope's `message.eventId` (`Elements-Webhook-Id`; the event log record's id).
    pub event_id: String,
    /// Its sequence in `ECWID_EVENTS`.
    pub envelope_seq: u64,
    /// Attempts made so far (from the event log; at least 1).
    pub attempts: u64,
    /// The last HTTP status or error class, from the event log.
    pub last_status: Option<String>,
    pub next_attempt_at: Option<String>,
    /// Envelopes of the instance waiting behind it.
    pub waiting: u64,
}

#[derive(Deserialize)]
struct Head {
    message: HeadMessage,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HeadMessage {
    event_id: String,
}

/// The event holding `instance_id`'s lane, or `None` when nothing holds it (no lane, nothing in
/// flight, or the one in flight has not failed yet). Reads the lane consumer's info (what is in
/// flight, how many wait), the envelope at that sequence (its event id) and its event log record
/// (its attempts). With `EVENT_LOG=off` the attempts are only known to be at least 1 once the
/// server redelivered the head.
pub async fn blocked_head(
    js: &jetstream::Context,
    log: &EventLog,
    instance_id: &str,
) -> Result<Option<BlockedHead>, Error> {
    let stream = js
        .get_stream_no_info(EVENTS_STREAM)
        .await
        .map_err(Error::jetstream)?;
    let info = match stream.consumer_info(consumer_name(instance_id)).await {
        Ok(info) => info,
        Err(e) => match e.kind() {
            ConsumerInfoErrorKind::NotFound => return Ok(None),
            ConsumerInfoErrorKind::JetStream(js_error)
                if js_error.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND =>
            {
                return Ok(None)
            }
            _ => return Err(Error::jetstream(e)),
        },
    };
    if info.num_ack_pending == 0 {
        return Ok(None);
    }
    // One in flight at most, and nothing is handed out after it: the last delivered is the head.
    let seq = info.delivered.stream_sequence;
    let envelope = match stream.direct_get(seq).await {
        Ok(m) => m,
        Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::jetstream(e)),
    };
    let Ok(head) = serde_json::from_slice::<Head>(&envelope.payload) else {
        return Ok(None);
    };
    let event_id = head.message.event_id;
    // The log unreadable (down, or off) counts as no record: the lane's state still shows.
    let record = crate::eventlog::search::record(log, &event_id)
        .await
        .ok()
        .flatten();
    let (attempts, last_status, next_attempt_at) = match record {
        Some(r) if r.status == Status::Retrying && r.attempts > 0 => {
            (r.attempts, r.last_status, r.next_attempt_at)
        }
        Some(_) => return Ok(None),
        None if info.num_redelivered > 0 => (1, None, None),
        None => return Ok(None),
    };
    Ok(Some(BlockedHead {
        event_id,
        envelope_seq: seq,
        attempts,
        last_status,
        next_attempt_at,
        waiting: info.num_pending,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_names_round_trip() {
        let name = consumer_name("0b6e-11");
        assert_eq!(name, "ordered-0b6e-11");
        assert_eq!(instance_of_consumer(&name), Some("0b6e-11"));
        assert_eq!(instance_of_consumer("deliverer"), None);
        assert_eq!(instance_of_consumer("ordered-"), None);
        let config = consumer_config("0b6e-11", Duration::from_secs(30));
        assert_eq!(config.filter_subject, "ecwid.ordered.0b6e-11");
        assert_eq!(config.max_ack_pending, 1);
    }
}
