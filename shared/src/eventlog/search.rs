//! The event log's queries, beside its writer ([`super`]): search the records, read one, read
//! the envelope it points to. The admin API's handlers ask these and hold only HTTP.
//!
//! A search reads `event_log_events` newest first (by `seq`, the order rows were written), each
//! filter answered by an index; a record's status is its newest attempt row's. Pages go back in
//! `seq`: `next` is the value to pass as `after`. A status filter is checked row by row, so a
//! search with one walks back through at most its budget of rows and answers what it found, with
//! `next` where it stopped.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::HeaderMap;
use bytes::Bytes;
use model::record::{Attempt, Record, Status};
use model::time_fmt::{unix_ms_to_rfc3339, Rfc3339Time};
use serde::Deserialize;
use tokio_postgres::types::ToSql;

use super::EventLog;
use crate::nats::{headers, EVENTS_STREAM};

/// How long one query waits for PostgreSQL (or JetStream) before the search answers unavailable.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a query could not be answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SearchError {
    /// A filter that can never match anything as given (the caller's mistake).
    #[error("{0}")]
    Invalid(String),
    /// PostgreSQL or JetStream failed or did not answer in time; asking again later may work.
    #[error("the event log could not be read: {0}")]
    Unavailable(String),
}

/// What a query reads: the JetStream context (envelopes) and the log.
#[derive(Debug, Clone, Copy)]
pub struct Reads<'a> {
    pub js: &'a jetstream::Context,
    pub log: &'a EventLog,
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
    /// Received at or after.
    pub since: Option<Rfc3339Time>,
    /// Received before.
    pub until: Option<Rfc3339Time>,
    /// Page cursor: only records written before this one (`next` of the previous page).
    pub after: Option<u64>,
    pub limit: Option<usize>,
}

/// A [`Search`], checked.
#[derive(Debug, Clone)]
pub struct Query {
    pub store: Option<String>,
    pub instance: Option<String>,
    pub object_type: Option<String>,
    pub object_id: Option<String>,
    pub event_type: Option<String>,
    pub ecwid_event_id: Option<String>,
    pub status: Option<Status>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub after: Option<u64>,
    pub limit: usize,
    /// Rows a search with a status filter walks back through at most per call.
    pub budget: u64,
}

/// A page of a search: its hits (with their `seq`) and the cursor to go on from, when older
/// records may match.
#[derive(Debug)]
pub struct Page {
    pub hits: Vec<(u64, Record)>,
    pub next: Option<u64>,
}

fn bad(message: impl Into<String>) -> SearchError {
    SearchError::Invalid(message.into())
}

impl Query {
    /// `s` checked, to return at most `limit` records (the caller applies the paging rule), each
    /// call walking back through at most `budget` index entries.
    pub fn new(s: Search, limit: usize, budget: u64) -> Result<Self, SearchError> {
        if let Some(store) = &s.store {
            if !model::ecwid::is_store_id(store) {
                return Err(bad("store must be the numeric store id"));
            }
        }
        if let Some(instance) = &s.instance {
            if !crate::nats::is_subject_token(instance) {
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
        Ok(Self {
            since_ms: s.since.map(Rfc3339Time::unix_ms),
            until_ms: s.until.map(Rfc3339Time::unix_ms),
            store: s.store,
            instance: s.instance,
            object_type: s.object_type,
            object_id: s.object_id,
            event_type: s.event_type,
            ecwid_event_id: s.ecwid_event_id,
            status,
            after: s.after,
            limit,
            budget,
        })
    }
}

fn unavailable(e: impl std::fmt::Display) -> SearchError {
    tracing::warn!(error = %e, "An event log read failed.");
    SearchError::Unavailable(e.to_string())
}

/// `call` within [`READ_TIMEOUT`]; its failure, or no answer in time, is
/// [`SearchError::Unavailable`].
async fn within<T, E: std::fmt::Display>(
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, SearchError> {
    match tokio::time::timeout(READ_TIMEOUT, call).await {
        Ok(result) => result.map_err(unavailable),
        Err(_) => Err(unavailable("PostgreSQL did not answer in time")),
    }
}

/// The event row's columns, in [`EventCols::from_row`]'s order.
const EVENT_COLS: &str = "e.seq, e.id, (extract(epoch FROM e.received_at) * 1000)::bigint, \
     e.instance_id, e.store_id, e.object_type, e.object_id, e.event_type, e.ecwid_event_id, \
     e.format, e.verified, e.request_id, e.status, e.error, e.envelope_seq";

/// The newest attempt row's status, else the event row's: the record's status.
const STATUS_OF_E: &str = "coalesce((SELECT a.status FROM event_log_attempts a \
     WHERE a.event_id = e.id AND a.received_at = e.received_at \
     ORDER BY a.settled_at DESC, a.key DESC LIMIT 1), e.status)";

const ATTEMPT_COLS: &str = "a.event_id, (extract(epoch FROM a.received_at) * 1000)::bigint, \
     a.attempted, (extract(epoch FROM a.started_at) * 1000)::bigint, \
     (extract(epoch FROM a.settled_at) * 1000)::bigint, a.duration_ms, a.status, a.http_status, \
     a.error_class, a.error, a.response, (extract(epoch FROM a.next_attempt_at) * 1000)::bigint, \
     a.envelope_seq";

/// An event row as read.
struct EventCols {
    seq: i64,
    record: Record,
    received_at_ms: i64,
}

impl EventCols {
    fn from_row(row: &tokio_postgres::Row) -> Self {
        let received_at_ms: i64 = row.get(2);
        let status: String = row.get(12);
        Self {
            seq: row.get(0),
            received_at_ms,
            record: Record {
                id: row.get(1),
                instance_id: row.get(3),
                store_id: row.get(4),
                object_type: row.get(5),
                object_id: row.get(6),
                event_type: row.get(7),
                ecwid_event_id: row.get(8),
                format: row.get(9),
                verified: row.get(10),
                request_id: row.get(11),
                received_at: unix_ms_to_rfc3339(received_at_ms),
                status: Status::parse(&status).unwrap_or_default(),
                last_error: row.get(13),
                envelope_seq: row
                    .get::<_, Option<i64>>(14)
                    .and_then(|s| u64::try_from(s).ok()),
                ..Record::default()
            },
        }
    }
}

/// Applies an attempt row (in order) to its record.
fn apply_attempt(r: &mut Record, row: &tokio_postgres::Row) {
    let attempted: bool = row.get(2);
    let settled_at_ms: i64 = row.get(4);
    let status = Status::parse(row.get::<_, &str>(6)).unwrap_or_default();
    let error: Option<String> = row.get(9);
    if attempted {
        r.push_attempt(Attempt {
            number: r.attempts + 1,
            started_at: unix_ms_to_rfc3339(row.get(3)),
            duration_ms: u64::try_from(row.get::<_, i32>(5)).unwrap_or(0),
            status: row
                .get::<_, Option<i32>>(7)
                .and_then(|s| u16::try_from(s).ok()),
            error_class: row.get(8),
            error,
            response: row.get(10),
        });
    } else if error.is_some() {
        r.last_error = error;
    }
    r.status = status;
    r.next_attempt_at = (status == Status::Retrying)
        .then(|| row.get::<_, Option<i64>>(11).map(unix_ms_to_rfc3339))
        .flatten();
    if status == Status::Delivered {
        r.delivered_at = Some(unix_ms_to_rfc3339(settled_at_ms));
    }
    if r.envelope_seq.is_none() {
        r.envelope_seq = row
            .get::<_, Option<i64>>(12)
            .and_then(|s| u64::try_from(s).ok());
    }
}

/// The records of `events`, their attempts read in one query.
async fn with_attempts(
    client: &deadpool_postgres::Client,
    events: Vec<EventCols>,
) -> Result<Vec<(u64, Record)>, SearchError> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<&str> = events.iter().map(|e| e.record.id.as_str()).collect();
    let received: Vec<i64> = events.iter().map(|e| e.received_at_ms).collect();
    let sql = format!(
        "SELECT {ATTEMPT_COLS} FROM event_log_attempts a \
         WHERE (a.event_id, a.received_at) IN \
           (SELECT i, to_timestamp(r / 1000.0) FROM unnest($1::text[], $2::bigint[]) AS t(i, r)) \
         ORDER BY a.settled_at, a.key"
    );
    // Prepared once per connection: the same text every time.
    let statement = within(client.prepare_cached(&sql)).await?;
    let rows = within(client.query(&statement, &[&ids, &received])).await?;
    let mut out: Vec<(u64, Record)> = events
        .into_iter()
        .map(|e| (u64::try_from(e.seq).unwrap_or(0), e.record))
        .collect();
    let index: std::collections::HashMap<String, usize> = out
        .iter()
        .enumerate()
        .map(|(i, (_, r))| (r.id.clone(), i))
        .collect();
    for row in &rows {
        if let Some(&i) = index.get(row.get::<_, &str>(0)) {
            apply_attempt(&mut out[i].1, row);
        }
    }
    Ok(out)
}

/// The smallest `seq` of a row received at `ms` (`event_log_events.seq`: the receipt in
/// milliseconds, shifted 20 bits, then a sequence's low bits).
fn seq_at(ms: i64) -> i64 {
    ms.max(0).saturating_mul(1 << 20)
}

/// Rows read per query of a search with a status filter.
const CHUNK: i64 = 500;

/// Searches newest first: up to `limit` records, and a cursor when older ones may match. With a
/// status filter, walks back through at most `q.budget` rows and answers what it found, with
/// `next` at the point it reached.
pub async fn search(reads: Reads<'_>, q: &Query) -> Result<Page, SearchError> {
    let pool = reads.log.pool().map_err(unavailable)?;
    let client = within(pool.get()).await?;
    let mut clauses: Vec<String> = Vec::new();
    let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    let mut filter = |clause: &str, value: Box<dyn ToSql + Sync + Send>| {
        params.push(value);
        clauses.push(clause.replace('?', &format!("${}", params.len())));
    };
    if let Some(v) = &q.store {
        filter("e.store_id = ?", Box::new(v.clone()));
    }
    if let Some(v) = &q.instance {
        filter("e.instance_id = ?", Box::new(v.clone()));
    }
    if let Some(v) = &q.object_type {
        filter("e.object_type = ?", Box::new(v.clone()));
    }
    if let Some(v) = &q.object_id {
        filter("e.object_id = ?", Box::new(v.clone()));
    }
    if let Some(v) = &q.event_type {
        filter("e.event_type = ?", Box::new(v.to_ascii_uppercase()));
    }
    if let Some(v) = &q.ecwid_event_id {
        filter("e.ecwid_event_id = ?", Box::new(v.clone()));
    }
    // `seq` starts with the receipt's milliseconds: a window is a range of it (the indexes on
    // (…, seq) answer it), and of `received_at` (the partitions outside it are not read).
    if let Some(v) = q.since_ms {
        filter(
            "e.received_at >= to_timestamp(?::bigint / 1000.0)",
            Box::new(v),
        );
        filter("e.seq >= ?::bigint", Box::new(seq_at(v)));
    }
    if let Some(v) = q.until_ms {
        filter(
            "e.received_at < to_timestamp(?::bigint / 1000.0)",
            Box::new(v),
        );
        filter("e.seq < ?::bigint", Box::new(seq_at(v)));
    }
    let cursor = params.len() + 1;
    clauses.push(format!("e.seq < ${cursor}"));
    let filters = clauses.join(" AND ");
    let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
    let mut after = q
        .after
        .map_or(i64::MAX, |a| i64::try_from(a).unwrap_or(i64::MAX));
    let Some(status) = q.status else {
        // The text depends only on which filters are set (a few dozen shapes), so each is
        // prepared once per connection.
        let sql = format!(
            "SELECT {EVENT_COLS} FROM event_log_events e WHERE {filters} ORDER BY e.seq DESC LIMIT ${}",
            cursor + 1
        );
        let statement = within(client.prepare_cached(&sql)).await?;
        let mut args: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as _).collect();
        args.push(&after);
        args.push(&limit);
        let rows = within(client.query(&statement, &args)).await?;
        let events: Vec<EventCols> = rows.iter().map(EventCols::from_row).collect();
        let full = events.len() as i64 == limit;
        let hits = with_attempts(&client, events).await?;
        let next = if full {
            hits.last().map(|(seq, _)| *seq)
        } else {
            None
        };
        return Ok(Page { hits, next });
    };
    let sql = format!(
        "SELECT {EVENT_COLS}, {STATUS_OF_E} FROM event_log_events e WHERE {filters} \
         ORDER BY e.seq DESC LIMIT ${}",
        cursor + 1
    );
    let statement = within(client.prepare_cached(&sql)).await?;
    let mut matched: Vec<EventCols> = Vec::new();
    let mut walked: u64 = 0;
    loop {
        let chunk = i64::try_from(q.budget.saturating_sub(walked))
            .unwrap_or(CHUNK)
            .min(CHUNK);
        let mut args: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as _).collect();
        args.push(&after);
        args.push(&chunk);
        let rows = within(client.query(&statement, &args)).await?;
        let read = rows.len();
        for row in &rows {
            let event = EventCols::from_row(row);
            after = event.seq;
            walked += 1;
            if row.get::<_, &str>(15) == status.as_str() {
                matched.push(event);
                if matched.len() as i64 == limit {
                    let next = Some(u64::try_from(after).unwrap_or(0));
                    return Ok(Page {
                        hits: with_attempts(&client, matched).await?,
                        next,
                    });
                }
            }
        }
        if (read as i64) < chunk {
            return Ok(Page {
                hits: with_attempts(&client, matched).await?,
                next: None,
            });
        }
        if walked >= q.budget {
            // The budget ran out before the log did: go on from where this call stopped.
            return Ok(Page {
                hits: with_attempts(&client, matched).await?,
                next: Some(u64::try_from(after).unwrap_or(0)),
            });
        }
    }
}

/// The record `id`, when the log holds it.
pub async fn record(log: &EventLog, id: &str) -> Result<Option<Record>, SearchError> {
    let pool = log.pool().map_err(unavailable)?;
    let client = within(pool.get()).await?;
    let sql = format!("SELECT {EVENT_COLS} FROM event_log_events e WHERE e.id = $1 LIMIT 1");
    let statement = within(client.prepare_cached(&sql)).await?;
    let Some(row) = within(client.query_opt(&statement, &[&id])).await? else {
        return Ok(None);
    };
    let found = with_attempts(&client, vec![EventCols::from_row(&row)]).await?;
    Ok(found.into_iter().next().map(|(_, r)| r))
}

/// The envelope of `record` as it was stored (and POSTed), with its headers; `None` once the
/// events stream no longer holds it.
pub async fn envelope_of(
    reads: Reads<'_>,
    record: &Record,
) -> Result<Option<(HeaderMap, Bytes)>, SearchError> {
    let Some(seq) = record.envelope_seq else {
        return Ok(None);
    };
    // A direct get needs no stream info: one round trip.
    let stream = reads
        .js
        .get_stream_no_info(EVENTS_STREAM)
        .await
        .map_err(unavailable)?;
    match tokio::time::timeout(READ_TIMEOUT, stream.direct_get(seq)).await {
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
