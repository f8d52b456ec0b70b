//! What the deliverer writes to the event log ([`shared::eventlog`]): after every attempt, and
//! when an envelope is dead-lettered without one, an attempt row (the record's status after it,
//! and the attempt itself). It is written, and durable (in PostgreSQL or the log's spool),
//! before the message is settled: a deliverer that dies before writing leaves the message to be
//! redelivered, and the next attempt's row says what really happened.
//!
//! Rows are appended, never read first: an attempt's number is its place among the record's
//! attempt rows, counted when the record is read, so copies of one envelope delivered at once
//! (concurrent redeliveries and replays) neither lose each other's attempts nor repeat a number.

use std::borrow::Cow;
use std::time::Duration;

use async_nats::jetstream;
use model::envelope::EventType;
use model::record::{Record, Status};
use model::time_fmt::{now_unix_ms, unix_ms_to_rfc3339};
use serde::Deserialize;
use shared::eventlog::{AttemptRow, EventLog, LogError, Rows};
use shared::nats::{header, headers, subject_tail};

use crate::dispatch::Attempt;
use crate::outcome::{MessageHead, Outcome};

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

/// Writes the attempt row that follows `outcome` for `message`, whose body's head is `head`
/// (`None` when it is not an envelope). A deferral (no attempt) writes nothing. `Err` when the
/// row could be made durable neither in PostgreSQL nor in the spool (counted): the caller puts
/// the message back instead of settling it.
pub(crate) async fn record(
    log: &EventLog,
    message: &jetstream::Message,
    head: Option<&MessageHead<'_>>,
    sent: Option<&Sent>,
    outcome: &Outcome,
) -> Result<(), LogError> {
    if !log.enabled() {
        return Ok(());
    }
    let now_ms = now_unix_ms();
    let (status, next_attempt_at_ms) = match outcome {
        Outcome::Ack => (Status::Delivered, None),
        Outcome::Retry {
            spends_attempt: false,
            ..
        } => return Ok(()),
        Outcome::Retry { delay, .. } => (
            Status::Retrying,
            Some(now_ms + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 2)),
        ),
        Outcome::Dead { .. } => (Status::Dead, None),
    };
    let Some(base) = head.and_then(|head| base_record(message, head)) else {
        // Not an envelope: it is dead-lettered as unparseable, and has no record.
        return Ok(());
    };
    let mut row = AttemptRow::status_change(&base, status, None);
    row.settled_at_ms = now_ms;
    row.next_attempt_at_ms = next_attempt_at_ms;
    row.envelope_seq = base.envelope_seq.and_then(|s| i64::try_from(s).ok());
    match sent {
        Some(sent) => {
            let entry = attempt_entry(0, sent);
            row.attempted = true;
            row.started_at_ms = sent.started_at_ms;
            row.duration_ms = i32::try_from(entry.duration_ms).unwrap_or(i32::MAX);
            row.http_status = entry.status.map(i32::from);
            row.error_class = entry.error_class;
            row.error = entry.error;
            row.response = entry.response;
        }
        None => {
            if let Outcome::Dead { error, .. } = outcome {
                row.error = Some(model::record::clip(error, model::record::MAX_ERROR_CHARS));
            }
        }
    }
    let rows = Rows {
        events: Vec::new(),
        attempts: vec![row],
    };
    log.append(rows).await.inspect_err(|e| log.failed(e))
}
