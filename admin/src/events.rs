//! The event log API (admin listener, bearer token): search the records, show one with its
//! attempts and its envelope, redeliver one, replay an instance's time window, and send an
//! instance a test event. Records are written by the normalizer and the deliverer
//! ([`shared::eventlog`]); this module only reads them and publishes envelopes again.
//!
//! A search reads `ECWID_LOG_INDEX` newest first: the subject filter picks the instance, store
//! and objectId (`ecwid.logidx.<instance>.<store>.<objectIdHash>.<id>`), the entries carry the
//! other fields, and the status is read from the records themselves. Pages go back in stream
//! sequence: `next` is the sequence to pass as `after`. An objectId's records are found without
//! scanning: the stream's subject index (in the server's memory) lists the subjects matching its
//! hash, and so the records' ids; entries and records are then read by direct gets.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::stream::Stream;
use async_nats::HeaderMap;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use model::envelope::{notification_id, Envelope, Event, EventType, Message, ELEMENT_KEY};
use model::record::{Record, Status};
use model::time_fmt::{now_unix_ms, rfc3339_to_unix_ms, unix_ms_to_rfc3339};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use shared::eventlog::{self, IndexEntry, INDEX_STREAM};
use shared::nats::{envelope_subject, events_subject, headers, EVENTS_STREAM};

use crate::state::AdminState;
use shared::http::{self as error, ApiError, ApiId, ApiQuery, JS_TIMEOUT, MAX_PAGE};

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

/// `GET /events` filters; every one combinable.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Search {
    pub store: Option<String>,
    pub instance: Option<String>,
    pub object_type: Option<String>,
    pub object_id: Option<String>,
    pub event_type: Option<String>,
    pub ecwid_event_id: Option<String>,
    pub status: Option<String>,
    /// RFC 3339: received at or after.
    pub since: Option<String>,
    /// RFC 3339: received before.
    pub until: Option<String>,
    /// Page cursor: only index entries older than this sequence.
    pub after: Option<u64>,
    pub limit: Option<usize>,
}

/// A [`Search`], checked.
#[derive(Debug, Clone)]
struct Query {
    store: Option<String>,
    instance: Option<String>,
    object_type: Option<String>,
    object_id: Option<String>,
    event_type: Option<String>,
    ecwid_event_id: Option<String>,
    status: Option<Status>,
    since_ms: Option<i64>,
    until_ms: Option<i64>,
    after: Option<u64>,
    limit: usize,
    /// Index entries (stream sequences) one call walks back through at most.
    budget: u64,
}

/// A page of a search: its hits (with their index sequences) and the cursor to go on from, when
/// older entries may match.
#[derive(Debug)]
struct Page {
    hits: Vec<(u64, Record)>,
    next: Option<u64>,
}

impl Page {
    fn full(hits: Vec<(u64, Record)>) -> Self {
        Self { hits, next: None }
    }

    /// `hits` filled the page: go on below the last one.
    fn more(hits: Vec<(u64, Record)>) -> Self {
        let next = hits.last().map(|(seq, _)| *seq);
        Self { hits, next }
    }
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_query", message)
}

fn time(raw: Option<&str>, name: &str) -> Result<Option<i64>, ApiError> {
    raw.map(|s| {
        rfc3339_to_unix_ms(s).ok_or_else(|| {
            bad(format!(
                "{name} must be an RFC 3339 time such as 2026-11-22T10:00:00Z"
            ))
        })
    })
    .transpose()
}

impl TryFrom<Search> for Query {
    type Error = ApiError;

    fn try_from(s: Search) -> Result<Self, ApiError> {
        if let Some(store) = &s.store {
            if !model::ecwid::is_store_id(store) {
                return Err(bad("store must be the numeric store id"));
            }
        }
        if let Some(instance) = &s.instance {
            if !shared::nats::is_subject_token(instance) {
                return Err(bad("instance is not a valid instance id"));
            }
        }
        let status = s
            .status
            .as_deref()
            .map(|v| {
                Status::parse(v).ok_or_else(|| {
                    bad("status must be pending, retrying, delivered, dead or filtered")
                })
            })
            .transpose()?;
        let limit = error::page_limit(s.limit, DEFAULT_PAGE)?;
        Ok(Self {
            since_ms: time(s.since.as_deref(), "since")?,
            until_ms: time(s.until.as_deref(), "until")?,
            store: s.store,
            instance: s.instance,
            object_type: s.object_type,
            object_id: s.object_id,
            event_type: s.event_type,
            ecwid_event_id: s.ecwid_event_id,
            status,
            after: s.after,
            limit,
            budget: u64::MAX,
        })
    }
}

impl Query {
    /// The index subject filter: literal where a filter names the token. `>` at the end also
    /// matches entries of earlier releases, whose subjects ended with the objectId hash.
    fn subject(&self) -> String {
        let token = |t: &Option<String>| t.as_deref().unwrap_or("*").to_owned();
        match self.object_id.as_deref() {
            Some(object) => eventlog::index_subject(
                &token(&self.instance),
                &token(&self.store),
                &eventlog::object_hash(object),
                "*",
            ),
            None => format!(
                "{}.{}.{}.>",
                eventlog::INDEX_PREFIX,
                token(&self.instance),
                token(&self.store)
            ),
        }
    }

    /// Whether an index entry passes the filters the entry can answer.
    fn entry_matches(&self, e: &IndexEntry) -> bool {
        let eq = |want: &Option<String>, got: &str| want.as_deref().is_none_or(|w| w == got);
        eq(&self.object_type, &e.object_type)
            && eq(&self.object_id, &e.object_id)
            && self
                .event_type
                .as_deref()
                .is_none_or(|w| w.eq_ignore_ascii_case(&e.event_type))
            && eq(&self.ecwid_event_id, &e.ecwid_event_id)
            && self.since_ms.is_none_or(|s| e.received_at_ms >= s)
            && self.until_ms.is_none_or(|u| e.received_at_ms < u)
    }

    fn record_matches(&self, r: &Record) -> bool {
        self.status.is_none_or(|s| s == r.status)
    }
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

const WHAT: &str = "An event log read";

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::unavailable(WHAT, e)
}

async fn stream(state: &AdminState, name: &str) -> Result<Stream, ApiError> {
    error::within(WHAT, state.inner.ctx.js.get_stream(name)).await
}

/// The index entries matching `subject` with sequences in `[lo, hi)`, oldest first.
async fn read_window(
    stream: &Stream<()>,
    subject: &str,
    lo: u64,
    hi: u64,
) -> Result<Vec<(u64, IndexEntry)>, ApiError> {
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: subject.to_owned(),
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: lo },
            ..Default::default()
        })
        .await
        .map_err(unavailable)?;
    let mut found = Vec::new();
    if consumer.cached_info().num_pending == 0 {
        return Ok(found);
    }
    let mut messages = consumer.messages().await.map_err(unavailable)?;
    loop {
        let message = match tokio::time::timeout(JS_TIMEOUT, messages.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => return Err(unavailable(e)),
            Ok(None) | Err(_) => return Err(unavailable("reading the event index timed out")),
        };
        let info = message.info().map_err(unavailable)?;
        let (seq, pending) = (info.stream_sequence, info.pending);
        if seq >= hi {
            break;
        }
        if let Ok(entry) = serde_json::from_slice::<IndexEntry>(&message.payload) {
            found.push((seq, entry));
        }
        if pending == 0 {
            break;
        }
    }
    Ok(found)
}

/// The most records of one objectId that a search finds through the stream's subject index;
/// an objectId with more (a hot one) is searched like any other filter, newest window first.
const MAX_LISTED: usize = 1000;
/// Records (or entries) a search reads at once.
const ONE_ROUND: usize = 64;

/// The index subjects matching `filter` (one per record: the record id is the last token),
/// from the stream's subject index, which the server keeps in memory: no entry is read.
/// `None` when more than [`MAX_LISTED`] match.
async fn listed_subjects(
    stream: &Stream<()>,
    filter: &str,
) -> Result<Option<Vec<String>>, ApiError> {
    let mut subjects = error::within(WHAT, stream.info_with_subjects(filter)).await?;
    let mut found = Vec::new();
    while let Some(next) = tokio::time::timeout(JS_TIMEOUT, subjects.next())
        .await
        .map_err(|_| unavailable("JetStream did not answer"))?
    {
        let (subject, _) = next.map_err(unavailable)?;
        if found.len() == MAX_LISTED {
            return Ok(None);
        }
        found.push(subject);
    }
    Ok(Some(found))
}

/// The latest index entry on `subject`, with its sequence, read over the log's next reading
/// connection (like the records: a search's reads go out at once).
async fn entry_on(
    state: &AdminState,
    subject: &str,
) -> Result<Option<(u64, IndexEntry)>, ApiError> {
    use async_nats::jetstream::stream::DirectGetErrorKind;
    let stream = state
        .inner
        .ctx
        .log
        .reader()
        .get_stream_no_info(INDEX_STREAM)
        .await
        .map_err(unavailable)?;
    let read = tokio::time::timeout(JS_TIMEOUT, stream.direct_get_last_for_subject(subject))
        .await
        .map_err(|_| unavailable("reading the event index timed out"))?;
    match read {
        Ok(m) => Ok(serde_json::from_slice::<IndexEntry>(&m.payload)
            .ok()
            .map(|e| (m.sequence, e))),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
        Err(e) => Err(unavailable(e)),
    }
}

/// An objectId search through the subject index: `None` when the objectId has too many records
/// for that (then the caller scans). Newest first by index sequence, like every search.
async fn search_listed(
    state: &AdminState,
    reader: &Stream<()>,
    q: &Query,
) -> Result<Option<Page>, ApiError> {
    let Some(subjects) = listed_subjects(reader, &q.subject()).await? else {
        return Ok(None);
    };
    let log = &state.inner.ctx.log;
    let keep = |seq: u64, e: &IndexEntry| q.after.is_none_or(|a| seq < a) && q.entry_matches(e);
    let mut hits: Vec<(u64, Record)> = Vec::new();
    if q.after.is_none() && subjects.len() <= q.limit.min(ONE_ROUND) {
        // One page holds them all, so no cursor is needed: the records alone, read at once,
        // answer every filter, and newest first is by receipt. Half the reads of the path below.
        let reads = subjects
            .iter()
            .map(|subject| log.get(eventlog::id_of_index_subject(subject)));
        for read in futures::future::join_all(reads).await {
            if let Some((r, _)) = read.map_err(unavailable)? {
                if q.entry_matches(&shared::eventlog::index_entry(&r)) && q.record_matches(&r) {
                    hits.push((0, r));
                }
            }
        }
        hits.sort_by(|a, b| (&b.1.received_at, &b.1.id).cmp(&(&a.1.received_at, &a.1.id)));
        return Ok(Some(Page::full(hits)));
    }
    let reads = subjects.iter().map(|subject| entry_on(state, subject));
    let mut entries = Vec::with_capacity(subjects.len());
    for read in futures::future::join_all(reads).await {
        entries.extend(read?.filter(|(seq, e)| keep(*seq, e)));
    }
    entries.sort_by_key(|e| std::cmp::Reverse(e.0));
    for chunk in entries.chunks(ONE_ROUND) {
        for hit in records_of(state, chunk).await? {
            if q.record_matches(&hit.1) {
                hits.push(hit);
                if hits.len() == q.limit {
                    return Ok(Some(Page::more(hits)));
                }
            }
        }
    }
    Ok(Some(Page::full(hits)))
}

/// Reads the records of `entries` (newest first), concurrently; drops those gone.
async fn records_of(
    state: &AdminState,
    entries: &[(u64, IndexEntry)],
) -> Result<Vec<(u64, Record)>, ApiError> {
    let log = &state.inner.ctx.log;
    let reads = entries.iter().map(|(seq, e)| async move {
        log.get(&e.id)
            .await
            .map(|r| r.map(|(record, _)| (*seq, record)))
    });
    let mut out = Vec::with_capacity(entries.len());
    for read in futures::future::join_all(reads).await {
        if let Some(hit) = read.map_err(unavailable)? {
            out.push(hit);
        }
    }
    Ok(out)
}

/// Searches newest first: up to `limit` records, and a cursor when older ones may match. Walks
/// back through at most `q.budget` index entries: a filter the index subjects cannot narrow
/// (`eventType` alone) over a large log stops there and answers what it found, with `next` at
/// the point it reached, instead of reading the whole log in one request.
async fn search(state: &AdminState, q: &Query) -> Result<Page, ApiError> {
    if let Some(found) = by_ecwid_event_id(state, q).await? {
        return Ok(Page::full(found));
    }
    let reader = state
        .inner
        .ctx
        .js
        .get_stream_no_info(INDEX_STREAM)
        .await
        .map_err(unavailable)?;
    if q.object_id.is_some() {
        if let Some(found) = search_listed(state, &reader, q).await? {
            return Ok(found);
        }
    }
    // Windows that grow as they go back, so a recent page reads little.
    let subject = q.subject();
    let info = stream(state, INDEX_STREAM).await?;
    let first = info.cached_info().state.first_sequence.max(1);
    let last = info.cached_info().state.last_sequence;
    let mut hi = q
        .after
        .unwrap_or(last.saturating_add(1))
        .min(last.saturating_add(1));
    // Where this call's budget ends; below it is the next call's.
    let floor = hi.saturating_sub(q.budget).max(first);
    let mut window = (q.limit as u64 * 4).max(256);
    let mut hits: Vec<(u64, Record)> = Vec::new();
    // A retried creation may have written a record's entry twice: the newest one counts.
    let mut seen = std::collections::HashSet::new();
    while hi > floor {
        let lo = hi.saturating_sub(window).max(floor);
        let entries = read_window(&reader, &subject, lo, hi).await?;
        let older_than_since = q
            .since_ms
            .is_some_and(|s| entries.first().is_some_and(|(_, e)| e.received_at_ms < s));
        let candidates: Vec<(u64, IndexEntry)> = entries
            .into_iter()
            .rev()
            .filter(|(_, e)| q.entry_matches(e) && seen.insert(e.id.clone()))
            .collect();
        for chunk in candidates.chunks(ONE_ROUND) {
            for (seq, record) in records_of(state, chunk).await? {
                if q.record_matches(&record) {
                    hits.push((seq, record));
                    if hits.len() == q.limit {
                        return Ok(Page::more(hits));
                    }
                }
            }
        }
        if older_than_since {
            return Ok(Page::full(hits));
        }
        hi = lo;
        window = window.saturating_mul(4);
    }
    // The budget ran out before the log did: go on from where this call stopped.
    let next = (floor > first).then_some(floor);
    Ok(Page { hits, next })
}

/// "Ecwid says it sent event E to store S; where did it go?": the records' ids follow from the
/// event and the store's instances, so they are read directly. `None` when that does not apply
/// or finds nothing (an instance since deleted): the caller scans.
async fn by_ecwid_event_id(
    state: &AdminState,
    q: &Query,
) -> Result<Option<Vec<(u64, Record)>>, ApiError> {
    let (Some(eid), Some(store), None) = (&q.ecwid_event_id, &q.store, q.after) else {
        return Ok(None);
    };
    let key = if eid.starts_with("ion:") {
        eid.clone()
    } else {
        format!("v3:{store}:{eid}")
    };
    let mut ids: BTreeSet<String> = [notification_id(&key, "")].into();
    for instance in state.inner.ctx.directory.for_store(store) {
        if q.instance.as_deref().is_none_or(|i| i == instance.id) {
            ids.insert(notification_id(&key, &instance.id));
        }
    }
    let log = &state.inner.ctx.log;
    let mut found = Vec::new();
    for id in ids {
        if let Some((record, _)) = log.get(&id).await.map_err(unavailable)? {
            if q.entry_matches(&shared::eventlog::index_entry(&record))
                && q.record_matches(&record)
                && q.instance
                    .as_deref()
                    .is_none_or(|i| record.instance_id.as_deref() == Some(i))
            {
                found.push((0, record));
            }
        }
    }
    if found.is_empty() {
        return Ok(None);
    }
    found.sort_by(|a, b| b.1.received_at.cmp(&a.1.received_at));
    found.truncate(q.limit);
    Ok(Some(found))
}

async fn list(
    State(state): State<AdminState>,
    ApiQuery(search_query): ApiQuery<Search>,
) -> Result<Json<Value>, ApiError> {
    let q = Query {
        budget: state.inner.config.search_scan_budget,
        ..Query::try_from(search_query)?
    };
    let page = search(&state, &q).await?;
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

async fn record(state: &AdminState, id: &str) -> Result<Record, ApiError> {
    state
        .inner
        .ctx
        .log
        .get(id)
        .await
        .map_err(unavailable)?
        .map(|(r, _)| r)
        .ok_or_else(|| not_found(id))
}

/// The envelope of `record` as it was stored (and POSTed), with its headers; `None` once the
/// events stream no longer holds it.
async fn envelope_of(
    state: &AdminState,
    record: &Record,
) -> Result<Option<(HeaderMap, Bytes)>, ApiError> {
    let Some(seq) = record.envelope_seq else {
        return Ok(None);
    };
    // A direct get needs no stream info: one round trip.
    let stream = state
        .inner
        .ctx
        .js
        .get_stream_no_info(EVENTS_STREAM)
        .await
        .map_err(unavailable)?;
    match tokio::time::timeout(JS_TIMEOUT, stream.direct_get(seq)).await {
        Err(_) => Err(unavailable("JetStream did not answer")),
        Ok(Err(e)) if e.kind() == async_nats::jetstream::stream::DirectGetErrorKind::NotFound => {
            Ok(None)
        }
        Ok(Err(e)) => Err(unavailable(e)),
        Ok(Ok(m)) => {
            let same = m
                .headers
                .get(headers::MSG_ID)
                .is_some_and(|v| v.as_str() == record.id);
            Ok(same.then_some((m.headers, m.payload)))
        }
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
    // at once, and its snapshot must be the last word, not be undone by this one.
    let log = &state.inner.ctx.log;
    let fallback = record.clone();
    let pending = log
        .update(&record.id, |current| {
            let mut r = current.unwrap_or_else(|| fallback.clone());
            r.status = Status::Pending;
            r.next_attempt_at = None;
            r
        })
        .await;
    let pending = match pending {
        Ok(r) => r,
        Err(error) => {
            // Not marked; the deliverer's next snapshot says where it stands.
            log.failed(&error);
            record.clone()
        }
    };
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
    let published = shared::nats::publish(
        &state.inner.ctx.js,
        envelope_subject(instance_id, ordered),
        h,
        body,
        JS_TIMEOUT,
    )
    .await;
    if let Err(e) = published {
        // Nothing was sent: put the status back (best effort) and say so.
        let previous = record.status;
        let _ = log
            .update(&record.id, |current| {
                let mut r = current.unwrap_or_else(|| record.clone());
                if r.status == Status::Pending {
                    r.status = previous;
                }
                r
            })
            .await;
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
    since: String,
    until: String,
    status: Option<String>,
    object_type: Option<String>,
}

async fn replay(
    State(state): State<AdminState>,
    ApiId(instance_id): ApiId,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let request: ReplayRequest = shared::http::parse_json(&body)?;
    if state.inner.ctx.directory.get(&instance_id).is_none() {
        return Err(ApiError::NotFound {
            code: "not_found",
            message: format!(
                "no instance {}",
                instance_id.chars().take(64).collect::<String>()
            ),
        });
    }
    let q = Query::try_from(Search {
        instance: Some(instance_id.clone()),
        since: Some(request.since),
        until: Some(request.until),
        status: request.status,
        object_type: request.object_type,
        limit: Some(MAX_PAGE),
        ..Default::default()
    })?;
    let q = Query {
        limit: MAX_REPLAY,
        ..q
    };
    // Not budgeted: the window (since, until) bounds it, and a replay must not stop part-way
    // through one and be asked again from the newest end.
    let Page { mut hits, next } = search(&state, &q).await?;
    let more = next.is_some();
    // Oldest first: a receiver restoring a backup gets them in the order they happened.
    hits.reverse();
    let mut replayed = 0usize;
    let mut failed = Vec::new();
    for (_, record) in &hits {
        match send_again(&state, record).await {
            Ok(_) => replayed += 1,
            Err(e) => failed
                .push(json!({"id": record.id, "error": e.code(), "message": e.public_message()})),
        }
    }
    tracing::info!(
        instance_id,
        replayed,
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
    let Some(instance) = ctx.directory.get(&instance_id) else {
        return Err(ApiError::NotFound {
            code: "not_found",
            message: format!(
                "no instance {}",
                instance_id.chars().take(64).collect::<String>()
            ),
        });
    };
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
