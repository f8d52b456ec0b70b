//! What the deliverer writes to the event log ([`shared::eventlog`]): after every attempt, and
//! when an envelope is dead-lettered without one, the record's new snapshot. It is written
//! before the message is settled: a deliverer that dies before writing leaves the message to be
//! redelivered, and the next attempt's snapshot says what really happened.
//!
//! Every snapshot is a compare-and-set write onto the stored one
//! ([`EventLog::update`](shared::eventlog::EventLog::update)), and an attempt is numbered from
//! the stored record at that moment (its count plus one), not from what this message was told
//! when it was published: copies of one envelope delivered at once (concurrent redeliveries and
//! replays) then neither lose each other's attempts nor repeat a number. That costs the first
//! attempt a read it once skipped; a write it could not make exact was not worth the saving.

use std::borrow::Cow;
use std::time::Duration;

use async_nats::jetstream;
use model::envelope::EventType;
use model::record::{Record, Status};
use model::time_fmt::{now_unix_ms, unix_ms_to_rfc3339};
use serde::Deserialize;
use shared::eventlog::EventLog;
use shared::nats::{header, headers, subject_tail};

use crate::dispatch::Attempt;
use crate::outcome::{MessageHead, Outcome};

/// A write that fails is tried this many times before the attempt moves on without it.
const TRIES: usize = 3;

/// An attempt that was made: when, how long, and how it went.
#[derive(Debug)]
pub struct Sent {
    pub started_at_ms: i64,
    pub duration: Duration,
    pub result: Attempt,
}

/// What the record takes from an envelope's event: borrowed from the body where no escape
/// forces a copy, the event's other fields skipped unread.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LoggedEvent<'a> {
    event_type: EventType,
    #[serde(borrow)]
    object_type: Cow<'a, str>,
    #[serde(borrow)]
    object_id: Cow<'a, str>,
}

/// The record of `message` (whose body's head is `head`) as the envelope and its headers
/// describe it, before any attempt.
fn base_record(message: &jetstream::Message, head: &MessageHead<'_>) -> Option<Record> {
    let events: Vec<LoggedEvent<'_>> = serde_json::from_str(head.events?.get()).ok()?;
    let event = events.into_iter().next()?;
    let h = message.headers.as_ref();
    Some(Record {
        id: head.event_id.clone(),
        instance_id: Some(subject_tail(message.subject.as_str()).to_owned()),
        store_id: header(h, headers::STORE_ID).unwrap_or_default().to_owned(),
        object_type: event.object_type.into_owned(),
        object_id: event.object_id.into_owned(),
        event_type: event.event_type.as_str().to_owned(),
        ecwid_event_id: header(h, headers::ECWID_EVENT_ID)
            .unwrap_or_default()
            .to_owned(),
        format: header(h, headers::FORMAT).unwrap_or("v3").to_owned(),
        verified: header(h, headers::VERIFIED) == Some("true"),
        request_id: header(h, headers::REQUEST_ID)
            .unwrap_or_default()
            .to_owned(),
        received_at: header(h, headers::RECEIVED_AT)
            .and_then(|v| v.parse::<i64>().ok())
            .map(unix_ms_to_rfc3339)
            .unwrap_or_default(),
        envelope_seq: message.info().ok().map(|i| i.stream_sequence),
        ..Record::default()
    })
}

/// The log entry of attempt `number`.
fn attempt_entry(number: u64, sent: &Sent) -> model::record::Attempt {
    let answer = sent.result.answer();
    let (error_class, error) = match &sent.result {
        Attempt::Delivered(_) | Attempt::Gone(_) => (None, None),
        Attempt::Refused(why) => (Some("refused_address"), Some(why.clone())),
        Attempt::Failed { class, error, .. } => {
            ((answer.is_none()).then_some(*class), Some(error.clone()))
        }
    };
    model::record::Attempt {
        number,
        started_at: unix_ms_to_rfc3339(sent.started_at_ms),
        duration_ms: u64::try_from(sent.duration.as_millis()).unwrap_or(u64::MAX),
        status: answer.map(|a| a.status),
        error_class: error_class.map(str::to_owned),
        error: error.map(|e| model::record::clip(&e, model::record::MAX_ERROR_CHARS)),
        response: answer.map(|a| a.excerpt.clone()).unwrap_or_default(),
    }
}

/// Writes the snapshot that follows `outcome` for `message`, whose body's head is `head` (`None`
/// when it is not an envelope). A deferral (no attempt) writes nothing. Failures are counted and
/// tried again a few times; the delivery goes on regardless.
pub(crate) async fn record(
    log: &EventLog,
    message: &jetstream::Message,
    head: Option<&MessageHead<'_>>,
    sent: Option<&Sent>,
    outcome: &Outcome,
) {
    if !log.enabled() {
        return;
    }
    let now_ms = now_unix_ms();
    let (status, next_attempt_at) = match outcome {
        Outcome::Ack => (Status::Delivered, None),
        Outcome::Retry {
            spends_attempt: false,
            ..
        } => return,
        Outcome::Retry { delay, .. } => (
            Status::Retrying,
            Some(unix_ms_to_rfc3339(
                now_ms + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 2),
            )),
        ),
        Outcome::Dead { .. } => (Status::Dead, None),
    };
    let Some(base) = head.and_then(|head| base_record(message, head)) else {
        // Not an envelope: it is dead-lettered as unparseable, and has no record to update.
        return;
    };
    let envelope_seq = base.envelope_seq;
    let apply = |mut r: Record| {
        r.status = status;
        r.next_attempt_at = next_attempt_at.clone();
        if let Some(sent) = sent {
            // Numbered on from the snapshot this write replaces: unique however many copies of
            // the envelope are attempted at once.
            r.push_attempt(attempt_entry(r.attempts + 1, sent));
        }
        match outcome {
            Outcome::Ack => r.delivered_at = Some(unix_ms_to_rfc3339(now_ms)),
            Outcome::Dead { error, .. } if sent.is_none() => {
                r.last_error = Some(model::record::clip(error, model::record::MAX_ERROR_CHARS));
            }
            _ => {}
        }
        if r.envelope_seq.is_none() {
            r.envelope_seq = envelope_seq;
        }
        r
    };
    for try_number in 1..=TRIES {
        let written = log
            .update(&base.id, |current| {
                apply(current.unwrap_or_else(|| base.clone()))
            })
            .await
            .map(drop);
        match written {
            Ok(()) => return,
            Err(error) => {
                log.failed(&error);
                if try_number < TRIES {
                    tokio::time::sleep(model::retry::LOG_WRITE_RETRY_WAIT).await;
                }
            }
        }
    }
}
