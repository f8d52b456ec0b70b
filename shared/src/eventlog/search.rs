//! The event log's queries, beside its writer ([`super`]): search the records, read one, read
//! the envelope it points to. The admin API's handlers ask these and hold only HTTP.
//!
//! A search reads `ECWID_LOG_INDEX` newest first: the subject filter picks the instance, store
//! and objectId (`ecwid.logidx.<instance>.<store>.<objectIdHash>.<id>`), the entries carry the
//! other fields, and the status is read from the records themselves. Pages go back in stream
//! sequence: `next` is the sequence to pass as `after`. An objectId's records are found without
//! scanning: the stream's subject index (in the server's memory) lists the subjects matching its
//! hash, and so the records' ids; entries and records are then read by direct gets.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::stream::Stream;
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use model::envelope::notification_id;
use model::record::{Record, Status};
use model::time_fmt::Rfc3339Time;
use serde::Deserialize;

use super::{EventLog, IndexEntry, INDEX_STREAM};
use crate::directory::Directory;
use crate::nats::{headers, EVENTS_STREAM};

/// How long one read waits for JetStream before the search answers unavailable.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a query could not be answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SearchError {
    /// A filter that can never match anything as given (the caller's mistake).
    #[error("{0}")]
    Invalid(String),
    /// JetStream failed or did not answer in time; asking again later may work.
    #[error("the event log could not be read: {0}")]
    Unavailable(String),
}

/// What a query reads: the JetStream context, the log (and its reading connections), and the
/// instance directory (an Ecwid event's records' ids follow from its store's instances).
#[derive(Debug, Clone, Copy)]
pub struct Reads<'a> {
    pub js: &'a jetstream::Context,
    pub log: &'a EventLog,
    pub directory: &'a Directory,
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
    /// Page cursor: only index entries older than this sequence.
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
    /// Index entries (stream sequences) one call walks back through at most.
    pub budget: u64,
}

/// A page of a search: its hits (with their index sequences) and the cursor to go on from, when
/// older entries may match.
#[derive(Debug)]
pub struct Page {
    pub hits: Vec<(u64, Record)>,
    pub next: Option<u64>,
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

    /// The index subject filter: literal where a filter names the token. `>` at the end also
    /// matches entries of earlier releases, whose subjects ended with the objectId hash.
    fn subject(&self) -> String {
        let token = |t: &Option<String>| t.as_deref().unwrap_or("*").to_owned();
        match self.object_id.as_deref() {
            Some(object) => super::index_subject(
                &token(&self.instance),
                &token(&self.store),
                &super::object_hash(object),
                "*",
            ),
            None => format!(
                "{}.{}.{}.>",
                super::INDEX_PREFIX,
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
        Err(_) => Err(unavailable("JetStream did not answer in time")),
    }
}

async fn stream(reads: Reads<'_>, name: &str) -> Result<Stream, SearchError> {
    within(reads.js.get_stream(name)).await
}

/// The index entries matching `subject` with sequences in `[lo, hi)`, oldest first.
async fn read_window(
    stream: &Stream<()>,
    subject: &str,
    lo: u64,
    hi: u64,
) -> Result<Vec<(u64, IndexEntry)>, SearchError> {
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
        let message = match tokio::time::timeout(READ_TIMEOUT, messages.next()).await {
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
) -> Result<Option<Vec<String>>, SearchError> {
    let mut subjects = within(stream.info_with_subjects(filter)).await?;
    let mut found = Vec::new();
    while let Some(next) = tokio::time::timeout(READ_TIMEOUT, subjects.next())
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
    reads: Reads<'_>,
    subject: &str,
) -> Result<Option<(u64, IndexEntry)>, SearchError> {
    use async_nats::jetstream::stream::DirectGetErrorKind;
    let stream = reads
        .log
        .reader()
        .get_stream_no_info(INDEX_STREAM)
        .await
        .map_err(unavailable)?;
    let read = tokio::time::timeout(READ_TIMEOUT, stream.direct_get_last_for_subject(subject))
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
    reads: Reads<'_>,
    reader: &Stream<()>,
    q: &Query,
) -> Result<Option<Page>, SearchError> {
    let Some(subjects) = listed_subjects(reader, &q.subject()).await? else {
        return Ok(None);
    };
    let log = reads.log;
    let keep = |seq: u64, e: &IndexEntry| q.after.is_none_or(|a| seq < a) && q.entry_matches(e);
    let mut hits: Vec<(u64, Record)> = Vec::new();
    if q.after.is_none() && subjects.len() <= q.limit.min(ONE_ROUND) {
        // One page holds them all, so no cursor is needed: the records alone, read at once,
        // answer every filter, and newest first is by receipt. Half the reads of the path below.
        let gets = subjects
            .iter()
            .map(|subject| log.get(super::id_of_index_subject(subject)));
        for read in futures::future::join_all(gets).await {
            if let Some((r, _)) = read.map_err(unavailable)? {
                if q.entry_matches(&super::index_entry(&r)) && q.record_matches(&r) {
                    hits.push((0, r));
                }
            }
        }
        hits.sort_by(|a, b| (&b.1.received_at, &b.1.id).cmp(&(&a.1.received_at, &a.1.id)));
        return Ok(Some(Page::full(hits)));
    }
    let gets = subjects.iter().map(|subject| entry_on(reads, subject));
    let mut entries = Vec::with_capacity(subjects.len());
    for read in futures::future::join_all(gets).await {
        entries.extend(read?.filter(|(seq, e)| keep(*seq, e)));
    }
    entries.sort_by_key(|e| std::cmp::Reverse(e.0));
    for chunk in entries.chunks(ONE_ROUND) {
        for hit in records_of(reads, chunk).await? {
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
    reads: Reads<'_>,
    entries: &[(u64, IndexEntry)],
) -> Result<Vec<(u64, Record)>, SearchError> {
    let log = reads.log;
    let gets = entries.iter().map(|(seq, e)| async move {
        log.get(&e.id)
            .await
            .map(|r| r.map(|(record, _)| (*seq, record)))
    });
    let mut out = Vec::with_capacity(entries.len());
    for read in futures::future::join_all(gets).await {
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
pub async fn search(reads: Reads<'_>, q: &Query) -> Result<Page, SearchError> {
    if let Some(found) = by_ecwid_event_id(reads, q).await? {
        return Ok(Page::full(found));
    }
    let reader = reads
        .js
        .get_stream_no_info(INDEX_STREAM)
        .await
        .map_err(unavailable)?;
    if q.object_id.is_some() {
        if let Some(found) = search_listed(reads, &reader, q).await? {
            return Ok(found);
        }
    }
    // Windows that grow as they go back, so a recent page reads little.
    let subject = q.subject();
    let info = stream(reads, INDEX_STREAM).await?;
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
            for (seq, record) in records_of(reads, chunk).await? {
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
    reads: Reads<'_>,
    q: &Query,
) -> Result<Option<Vec<(u64, Record)>>, SearchError> {
    let (Some(eid), Some(store), None) = (&q.ecwid_event_id, &q.store, q.after) else {
        return Ok(None);
    };
    let key = if eid.starts_with("ion:") {
        eid.clone()
    } else {
        format!("v3:{store}:{eid}")
    };
    let mut ids: BTreeSet<String> = [notification_id(&key, "")].into();
    for instance in reads.directory.for_store(store) {
        if q.instance.as_deref().is_none_or(|i| i == instance.id) {
            ids.insert(notification_id(&key, &instance.id));
        }
    }
    let log = reads.log;
    let mut found = Vec::new();
    for id in ids {
        if let Some((record, _)) = log.get(&id).await.map_err(unavailable)? {
            if q.entry_matches(&super::index_entry(&record))
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

/// The record `id`, when the log holds it.
pub async fn record(reads: Reads<'_>, id: &str) -> Result<Option<Record>, SearchError> {
    Ok(reads
        .log
        .get(id)
        .await
        .map_err(unavailable)?
        .map(|(r, _)| r))
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
