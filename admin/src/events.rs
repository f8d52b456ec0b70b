//! The event log API (admin listener, bearer token): search the records, show one with its
//! attempts and its envelope, redeliver one, replay an instance's time window, and send an
//! instance a test event. Records are written by the normalizer and the deliverer and read by
//! the log's queries ([`shared::eventlog::search`]); this module holds the HTTP and publishes
//! envelopes again.

use std::time::Duration;

use async_nats::HeaderMap;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use model::envelope::{Envelope, Event, EventType, Message, ELEMENT_KEY};
use model::record::{Record, Status};
use model::time_fmt::Rfc3339Time;
use model::time_fmt::{now_unix_ms, unix_ms_to_rfc3339};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use shared::eventlog::search::{self, search, Page, Query, Reads, Search, SearchError};
use shared::eventlog::{AttemptRow, Rows};
use shared::nats::{envelope_subject, events_subject, headers, EVENTS_STREAM};
use tracing::Instrument;

use crate::state::AdminState;
use shared::http::{self as error, ApiError, ApiId, ApiQuery, JS_TIMEOUT};

const DEFAULT_PAGE: usize = 50;
/// Events one replay call sends again; `more` says when the window holds more.
const MAX_REPLAY: usize = 1000;
/// How long `POST /instances/{id}/test` waits for a deliverer to make the attempt.
const TEST_TIMEOUT: Duration = Duration::from_secs(45);

/// The event log routes, mounted by [`crate::router`] behind the token.
pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/events", get(list))
        .route("/events/{id}", get(show))
        .route("/events/{id}/redeliver", post(redeliver))
        .route("/instances/{id}/replay", post(replay))
        .route("/instances/{id}/test", post(test))
}

/// A record as a list shows it: without its attempts and internal pointers.
fn summary(record: &Record) -> Value {
    let mut v = serde_json::to_value(record).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.remove("attemptLog");
        o.remove("envelopeSeq");
    }
    v
}

/// What the log's queries read, from the handler's state.
fn reads(state: &AdminState) -> Reads<'_> {
    Reads {
        js: &state.inner.ctx.js,
        log: &state.inner.ctx.log,
    }
}

/// A query's failure as the API answers it: a filter that cannot match is 400 `invalid_query`,
/// a store that did not answer 503.
fn searched(e: SearchError) -> ApiError {
    match e {
        SearchError::Invalid(message) => ApiError::bad_request("invalid_query", message),
        SearchError::Unavailable(cause) => ApiError::Unavailable(cause),
    }
}

async fn record(state: &AdminState, id: &str) -> Result<Record, ApiError> {
    search::record(&state.inner.ctx.log, id)
        .await
        .map_err(searched)?
        .ok_or_else(|| not_found(id))
}

async fn envelope_of(
    state: &AdminState,
    record: &Record,
) -> Result<Option<(HeaderMap, Bytes)>, ApiError> {
    search::envelope_of(reads(state), record)
        .await
        .map_err(searched)
}

/// Searches run at once by this process; more wait their turn (for at most [`SEARCH_QUEUE_WAIT`],
/// then 503). A search may walk `EVENT_SEARCH_SCAN_BUDGET` index entries: run six at once on a
/// two-core machine and the webhooks this process also serves slowed from 0.8 to 5 ms at p50
/// (`make bench-admin-reads`). Process-wide: one process serves one admin API.
static SEARCHES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);
/// How long a search waits for its turn before it answers 503 (retry later).
const SEARCH_QUEUE_WAIT: Duration = Duration::from_secs(10);

async fn list(
    State(state): State<AdminState>,
    ApiQuery(search_query): ApiQuery<Search>,
) -> Result<Json<Value>, ApiError> {
    let limit = error::page_limit(search_query.limit, DEFAULT_PAGE)?;
    let budget = state.inner.config.search_scan_budget;
    let q = Query::new(search_query, limit, budget).map_err(searched)?;
    let _turn = tokio::time::timeout(SEARCH_QUEUE_WAIT, SEARCHES.acquire())
        .await
        .map_err(|_| ApiError::unavailable("An event log search", "other searches took its turn"))?
        .map_err(|e| ApiError::unavailable("An event log search", e))?;
    let page = search(reads(&state), &q).await.map_err(searched)?;
    Ok(Json(json!({
        "events": page.hits.iter().map(|(_, r)| summary(r)).collect::<Vec<_>>(),
        "next": page.next,
    })))
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound {
        code: "not_found",
        message: format!(
            "no event {}; it may be older than EVENT_LOG_RETENTION",
            id.chars().take(64).collect::<String>()
        ),
    }
}

async fn show(State(state): State<AdminState>, ApiId(id): ApiId) -> Result<Json<Value>, ApiError> {
    let record = record(&state, &id).await?;
    let envelope = envelope_of(&state, &record)
        .await?
        .and_then(|(_, body)| serde_json::from_slice::<Box<RawValue>>(&body).ok());
    Ok(Json(json!({
        "event": summary(&record),
        "attempts": record.attempt_log,
        "envelope": envelope,
    })))
}

/// Publishes `record`'s envelope again, with the same body (so the same `Elements-Webhook-Id`
/// and `webhook-id`) and a fresh attempt budget; its attempts number on from the record's.
async fn send_again(state: &AdminState, record: &Record) -> Result<Record, ApiError> {
    let Some(instance_id) = record.instance_id.as_deref() else {
        return Err(ApiError::unprocessable(
            "id",
            format!(
                "this record is the raw-stage outcome ({}) of an event that reached no envelope; \
                 replay its dead letter or fix the instance's event.objects instead",
                record.status.as_str()
            ),
        ));
    };
    let (original, body) = envelope_of(state, record)
        .await?
        .ok_or_else(|| ApiError::NotFound {
            code: "not_found",
            message: format!(
                "the envelope of {} is no longer stored (past retention)",
                record.id
            ),
        })?;
    // The record says `pending` before the envelope goes, not after: the deliverer may take it
    // at once, and its row must be the last word, not be undone by this one.
    let log = &state.inner.ctx.log;
    let mut pending = record.clone();
    let marked = log
        .append(Rows {
            events: Vec::new(),
            attempts: vec![AttemptRow::status_change(record, Status::Pending, None)],
        })
        .await;
    match marked {
        Ok(()) => {
            pending.status = Status::Pending;
            pending.next_attempt_at = None;
        }
        // Not marked; the deliverer's next row says where it stands.
        Err(error) => log.failed(&error),
    }
    let mut h = HeaderMap::new();
    headers::carry(&original, &mut h);
    h.insert(
        headers::MSG_ID,
        format!("redeliver:{}:{}", record.id, uuid::Uuid::new_v4().simple()),
    );
    h.insert(headers::ATTEMPT_OFFSET, pending.attempts.to_string());
    // An ordered instance's redelivery joins the end of its lane, so the order still holds.
    let ordered = state
        .inner
        .ctx
        .directory
        .get(instance_id)
        .is_some_and(|i| i.ordered());
    let subject = envelope_subject(instance_id, ordered);
    // The operator's redelivery is a trace of its own, linked to the event's; the envelope
    // keeps the event's context, so its attempts go on in the event's trace.
    let span = shared::nats::publish_root_span(EVENTS_STREAM, &subject, &record.id);
    shared::otel::link_to_headers(&span, Some(&original));
    let published = shared::nats::publish(&state.inner.ctx.js, subject, h, body, JS_TIMEOUT)
        .instrument(span)
        .await;
    if let Err(e) = published {
        // Nothing was sent: put the status back (best effort) and say so.
        if pending.status != record.status {
            let _ = log
                .append(Rows {
                    events: Vec::new(),
                    attempts: vec![AttemptRow::status_change(
                        record,
                        record.status,
                        record.last_error.clone(),
                    )],
                })
                .await;
        }
        return Err(ApiError::Unavailable(shared::http::error_chain(&e)));
    }
    Ok(pending)
}

async fn redeliver(
    State(state): State<AdminState>,
    ApiId(id): ApiId,
) -> Result<Response, ApiError> {
    let record = record(&state, &id).await?;
    let record = send_again(&state, &record).await?;
    tracing::info!(event_id = %id, "Event redelivery requested.");
    Ok((StatusCode::ACCEPTED, Json(summary(&record))).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ReplayRequest {
    since: Rfc3339Time,
    until: Rfc3339Time,
    status: Option<String>,
    object_type: Option<String>,
}

async fn replay(
    State(state): State<AdminState>,
    ApiId(instance_id): ApiId,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let request: ReplayRequest = shared::http::parse_json(&body)?;
    // The bucket, not the watched copy: an instance created a moment ago exists.
    crate::stored::existing(&state.inner.ctx.kv, &instance_id).await?;
    // Not budgeted: the window (since, until) bounds it, and a replay must not stop part-way
    // through one and be asked again from the newest end.
    let q = Query::new(
        Search {
            instance: Some(instance_id.clone()),
            since: Some(request.since),
            until: Some(request.until),
            status: request.status,
            object_type: request.object_type,
            ..Default::default()
        },
        MAX_REPLAY,
        u64::MAX,
    )
    .map_err(searched)?;
    let Page { mut hits, next } = search(reads(&state), &q).await.map_err(searched)?;
    let more = next.is_some();
    // Oldest first: a receiver restoring a backup gets them in the order they happened.
    hits.reverse();
    let mut replayed = Vec::new();
    let mut failed = Vec::new();
    for (_, record) in &hits {
        match send_again(&state, record).await {
            Ok(_) => replayed.push(record.id.clone()),
            Err(e) => failed
                .push(json!({"id": record.id, "error": e.code(), "message": e.public_message()})),
        }
    }
    tracing::info!(
        instance_id,
        replayed = replayed.len(),
        failed = failed.len(),
        "Instance window replayed."
    );
    Ok(Json(
        json!({"replayed": replayed, "failed": failed, "more": more}),
    ))
}

async fn test(
    State(state): State<AdminState>,
    ApiId(instance_id): ApiId,
) -> Result<Json<Value>, ApiError> {
    let ctx = &state.inner.ctx;
    // The bucket, not the watched copy: an instance created a moment ago can be tested.
    let (instance, _) = crate::stored::existing(&ctx.kv, &instance_id).await?;
    let event_id = uuid::Uuid::new_v4().to_string();
    let now = now_unix_ms();
    let raw = json!({"test": true, "instanceId": instance.id, "sentAt": unix_ms_to_rfc3339(now)});
    let envelope = Envelope {
        message: Message {
            event_id: event_id.clone(),
            instance_id: instance.id.clone(),
            element_key: ELEMENT_KEY.to_owned(),
            verified: true,
            events: vec![Event {
                event_type: EventType::Created,
                object_type: "test".to_owned(),
                object_id: "test".to_owned(),
                element_key: ELEMENT_KEY.to_owned(),
                date: unix_ms_to_rfc3339(now),
            }],
            raw: RawValue::from_string(raw.to_string())
                .map_err(|e| ApiError::Unavailable(e.to_string()))?,
        },
    };
    let inbox = ctx.client.new_inbox();
    let mut answers = ctx
        .client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    let mut h = HeaderMap::new();
    h.insert(headers::MSG_ID, format!("test:{event_id}"));
    h.insert(headers::TEST_REPLY_TO, inbox.as_str());
    h.insert(headers::INSTANCE_ID, instance.id.as_str());
    h.insert(headers::RECEIVED_AT, now.to_string());
    // Never on an ordered lane: a test checks the receiver now, not behind a blocked event.
    shared::nats::publish(
        &ctx.js,
        events_subject(&instance.id),
        h,
        envelope.to_json().into(),
        JS_TIMEOUT,
    )
    .await
    .map_err(|e| ApiError::Unavailable(shared::http::error_chain(&e)))?;
    let answer = tokio::time::timeout(TEST_TIMEOUT, answers.next())
        .await
        .ok()
        .flatten()
        .ok_or_else(|| {
            ApiError::Timeout(format!(
                "no deliverer made the attempt within {} s; is a deliverer running?",
                TEST_TIMEOUT.as_secs()
            ))
        })?;
    let mut result: Value = serde_json::from_slice(&answer.payload)
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    result["eventId"] = json!(event_id);
    Ok(Json(result))
}
