//! The event log: every envelope's journey (one record per Ecwid event × instance), and the
//! raw-stage outcome of every accepted Ecwid event that reached no envelope.
//!
//! Storage is JetStream, two streams (names and subjects are constants here):
//! - `ECWID_LOG`, subject `ecwid.log.<id>`, one message per subject (`max_msgs_per_subject = 1`):
//!   the record's latest snapshot, attempts included. A lookup by id is one direct get of a
//!   literal subject.
//! - `ECWID_LOG_INDEX`, subject `ecwid.logidx.<instanceId|_>.<storeId>.<objectIdHash>.<id>`, one
//!   small entry per record written when it is created: searches by instance and store read only
//!   the entries whose subject matches, newest first by walking stream sequences back. A search
//!   by objectId reads no entries to find its records: the server keeps every subject of a stream
//!   in memory, so the subjects matching `ecwid.logidx.*.*.<objectIdHash>.*` (a stream info
//!   request) name the records' ids, which are then read by direct gets, concurrently.
//!
//! Who writes: the normalizer creates the record (`pending`) once the envelope is stored, only if
//! none exists yet (`Nats-Expected-Last-Subject-Sequence: 0`, so a late creation cannot overwrite
//! what the deliverer wrote), and the raw-stage outcomes; the deliverer writes a new snapshot
//! after every attempt, before it settles the message, so after a crash the message is
//! redelivered and the record converges. A failed write never fails a delivery: it is counted
//! (`ecwid_event_log_write_failures_total`) and retried (the normalizer NAKs the raw message, the
//! deliverer retries the write a few times).

use std::time::Duration;

use async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE as EXPECTED_LAST_SUBJECT_SEQUENCE;
use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use prometheus::{IntCounter, IntCounterVec, Registry};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub mod search;

use model::record::{Record, NO_INSTANCE};

use crate::nats::PublishError;

/// Record snapshots, one per subject.
pub const LOG_STREAM: &str = "ECWID_LOG";
/// Search entries.
pub const INDEX_STREAM: &str = "ECWID_LOG_INDEX";
pub const LOG_PREFIX: &str = "ecwid.log";
pub const INDEX_PREFIX: &str = "ecwid.logidx";
/// The largest record snapshot the stream takes.
pub const MAX_RECORD_BYTES: i32 = 128 * 1024;

pub const WRITES_TOTAL: &str = "ecwid_event_log_writes_total";
pub const WRITE_FAILURES_TOTAL: &str = "ecwid_event_log_write_failures_total";

/// `ecwid.log.<id>`
pub fn record_subject(id: &str) -> String {
    format!("{LOG_PREFIX}.{id}")
}

/// `ecwid.logidx.<instance>.<store>.<objectIdHash>.<id>`; `*` in any place for a search.
pub fn index_subject(instance: &str, store: &str, object_hash: &str, id: &str) -> String {
    format!("{INDEX_PREFIX}.{instance}.{store}.{object_hash}.{id}")
}

/// The record id an index subject names (its last token).
pub fn id_of_index_subject(subject: &str) -> &str {
    subject.rsplit('.').next().unwrap_or_default()
}

/// A subject token for an objectId (any text): 16 hex digits of its SHA-256.
pub fn object_hash(object_id: &str) -> String {
    model::hex::lower(&Sha256::digest(object_id.as_bytes())[..8])
}

/// What an index entry holds: enough to filter on without reading the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    pub id: String,
    #[serde(rename = "t")]
    pub received_at_ms: i64,
    #[serde(rename = "ot")]
    pub object_type: String,
    #[serde(rename = "oid")]
    pub object_id: String,
    #[serde(rename = "et")]
    pub event_type: String,
    #[serde(rename = "eid")]
    pub ecwid_event_id: String,
}

/// The index entry written when `record` is created.
pub fn index_entry(record: &Record) -> IndexEntry {
    IndexEntry {
        id: record.id.clone(),
        received_at_ms: model::time_fmt::rfc3339_to_unix_ms(&record.received_at).unwrap_or(0),
        object_type: record.object_type.clone(),
        object_id: record.object_id.clone(),
        event_type: record.event_type.clone(),
        ecwid_event_id: record.ecwid_event_id.clone(),
    }
}

pub fn record_index_subject(record: &Record) -> String {
    index_subject(
        record.instance_id.as_deref().unwrap_or(NO_INSTANCE),
        &record.store_id,
        &object_hash(&record.object_id),
        &record.id,
    )
}

/// The two streams' settings. Records and index entries live `retention`.
pub fn stream_configs(replicas: usize, retention: Duration) -> [stream::Config; 2] {
    [
        stream::Config {
            name: LOG_STREAM.to_owned(),
            description: Some("ecwid-events event log: each record's latest snapshot".to_owned()),
            subjects: vec![format!("{LOG_PREFIX}.*")],
            storage: stream::StorageType::File,
            num_replicas: replicas,
            max_age: retention,
            max_messages_per_subject: 1,
            max_message_size: MAX_RECORD_BYTES,
            discard: stream::DiscardPolicy::Old,
            allow_direct: true,
            ..Default::default()
        },
        stream::Config {
            name: INDEX_STREAM.to_owned(),
            description: Some("ecwid-events event log: search entries".to_owned()),
            // `>`: entries of releases before the record id joined the subject stay readable
            // until they age out.
            subjects: vec![format!("{INDEX_PREFIX}.>")],
            storage: stream::StorageType::File,
            num_replicas: replicas,
            max_age: retention,
            max_message_size: 8 * 1024,
            discard: stream::DiscardPolicy::Old,
            // No deduplication by message id (a window of ids costs the server memory and work
            // on every write): a retried creation's second entry has the same subject, and
            // readers keep one entry per record id.
            allow_direct: true,
            ..Default::default()
        },
    ]
}

/// Why a log operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("event log write failed")]
    Publish(#[from] PublishError),
    #[error("event log read failed: {0}")]
    Read(String),
    #[error("the record kept changing under concurrent writers")]
    Conflict,
}

/// The event log's metrics.
#[derive(Debug, Clone)]
pub struct LogMetrics {
    /// kind: create, update, index, outcome.
    pub writes: IntCounterVec,
    pub failures: IntCounter,
}

impl LogMetrics {
    pub fn register(reg: &Registry) -> Self {
        Self {
            writes: crate::metrics::counter_vec(
                reg,
                WRITES_TOTAL,
                "Event log writes that JetStream acknowledged, by kind.",
                &["kind"],
            ),
            failures: crate::metrics::counter(
                reg,
                WRITE_FAILURES_TOTAL,
                "Event log writes that failed (each is retried; deliveries go on).",
            ),
        }
    }
}

/// Reads and writes the log. Cheap to clone. With the log off (`EVENT_LOG=off`) writes do
/// nothing and reads find nothing.
#[derive(Debug, Clone)]
pub struct EventLog {
    js: jetstream::Context,
    /// Connections reads take turns on (the first is `js`'s): nats-server works through one
    /// connection's requests one after another, so the reads of one search, spread over
    /// several, are served in parallel.
    readers: std::sync::Arc<[jetstream::Context]>,
    next_reader: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    enabled: bool,
    timeout: Duration,
    metrics: LogMetrics,
}

impl EventLog {
    pub fn new(js: jetstream::Context, enabled: bool, metrics: LogMetrics) -> Self {
        Self {
            readers: std::sync::Arc::new([js.clone()]),
            next_reader: Default::default(),
            js,
            enabled,
            timeout: Duration::from_secs(5),
            metrics,
        }
    }

    /// The same log (settings, metrics) over another connection, and reading only there.
    pub fn on(&self, js: jetstream::Context) -> Self {
        Self {
            readers: std::sync::Arc::new([js.clone()]),
            next_reader: Default::default(),
            js,
            ..self.clone()
        }
    }

    /// Reads also go over `more` connections, in turn.
    pub fn with_readers(mut self, more: impl IntoIterator<Item = jetstream::Context>) -> Self {
        self.readers = std::iter::once(self.js.clone()).chain(more).collect();
        self
    }

    /// The connection the next read goes over.
    pub fn reader(&self) -> &jetstream::Context {
        let n = self
            .next_reader
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &self.readers[n % self.readers.len()]
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    async fn publish(
        &self,
        subject: String,
        h: HeaderMap,
        body: Vec<u8>,
        kind: &'static str,
    ) -> Result<jetstream::publish::PublishAck, LogError> {
        match crate::nats::publish(&self.js, subject, h, body.into(), self.timeout).await {
            Ok(ack) => {
                self.metrics.writes.with_label_values(&[kind]).inc();
                Ok(ack)
            }
            Err(e) => Err(LogError::Publish(e)),
        }
    }

    /// Counts a failed write; the caller decides how it is retried.
    pub fn failed(&self, error: &LogError) {
        self.metrics.failures.inc();
        tracing::warn!(%error, "Event log write failed; it will be retried.");
    }

    /// Creates `record` with its index entry, unless a snapshot already exists (the deliverer
    /// got there first, or this is a retry): then only the index entry is (re)written (readers
    /// keep one entry per record id).
    pub async fn create(&self, record: &Record) -> Result<(), LogError> {
        if !self.enabled {
            return Ok(());
        }
        let entry = serde_json::to_vec(&index_entry(record)).unwrap_or_default();
        let index = self.publish(
            record_index_subject(record),
            HeaderMap::new(),
            entry,
            "index",
        );
        let mut h = HeaderMap::new();
        h.insert(EXPECTED_LAST_SUBJECT_SEQUENCE, "0");
        let body = serde_json::to_vec(record).unwrap_or_default();
        let snapshot = self.publish(record_subject(&record.id), h, body, "create");
        let (index, snapshot) = futures::join!(index, snapshot);
        index?;
        match snapshot {
            Ok(_) => Ok(()),
            // "wrong last sequence": a snapshot exists, which is what we wanted to ensure.
            Err(LogError::Publish(PublishError::Rejected(e)))
                if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Writes `record` as the latest snapshot, whatever was there.
    pub async fn put(&self, record: &Record) -> Result<(), LogError> {
        if !self.enabled {
            return Ok(());
        }
        let body = serde_json::to_vec(record).unwrap_or_default();
        self.publish(record_subject(&record.id), HeaderMap::new(), body, "update")
            .await
            .map(drop)
    }

    /// Reads the latest snapshot of `id` and its stream sequence.
    pub async fn get(&self, id: &str) -> Result<Option<(Record, u64)>, LogError> {
        if !self.enabled || !crate::nats::is_subject_token(id) {
            return Ok(None);
        }
        let stream = self
            .reader()
            .get_stream_no_info(LOG_STREAM)
            .await
            .map_err(|e| LogError::Read(e.to_string()))?;
        let read = tokio::time::timeout(
            self.timeout,
            stream.direct_get_last_for_subject(record_subject(id)),
        )
        .await
        .map_err(|_| LogError::Read("no answer in time".into()))?;
        match read {
            Ok(m) => Ok(serde_json::from_slice::<Record>(&m.payload)
                .ok()
                .map(|r| (r, m.sequence))),
            Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(LogError::Read(e.to_string())),
        }
    }

    /// Read-modify-write: applies `change` to the latest snapshot (`None` when there is none)
    /// and writes the result only if nobody wrote in between
    /// (`Nats-Expected-Last-Subject-Sequence`); when someone did, reads again and re-applies,
    /// after a short jittered wait, so many writers of one record at once (concurrent
    /// redeliveries) all get through instead of giving up after a few collisions.
    pub async fn update(
        &self,
        id: &str,
        change: impl Fn(Option<Record>) -> Record,
    ) -> Result<Record, LogError> {
        use backon::BackoffBuilder as _;
        let mut waits = backon::ExponentialBuilder::default()
            .with_min_delay(model::retry::LOG_CONTENTION_WAIT_MIN)
            .with_max_delay(model::retry::LOG_CONTENTION_WAIT_MAX)
            .with_jitter()
            .with_max_times(UPDATE_TRIES)
            .build();
        loop {
            let current = self.get(id).await?;
            let seq = current.as_ref().map_or(0, |(_, s)| *s);
            let next = change(current.map(|(r, _)| r));
            if !self.enabled {
                return Ok(next);
            }
            let mut h = HeaderMap::new();
            h.insert(EXPECTED_LAST_SUBJECT_SEQUENCE, seq.to_string());
            let body = serde_json::to_vec(&next).unwrap_or_default();
            match self
                .publish(record_subject(&next.id), h, body, "update")
                .await
            {
                Ok(_) => return Ok(next),
                Err(LogError::Publish(PublishError::Rejected(e)))
                    if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence =>
                {
                    match waits.next() {
                        Some(wait) => tokio::time::sleep(wait).await,
                        None => return Err(LogError::Conflict),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Compare-and-set tries of one [`EventLog::update`] before it gives up, and the waits between
/// them (`model::retry::LOG_CONTENTION_WAIT_*`, doubling, jittered): enough for dozens of
/// writers of one record at once.
const UPDATE_TRIES: usize = 40;

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            id: "0f3c".into(),
            instance_id: Some("inst".into()),
            store_id: "1003".into(),
            object_type: "orders".into(),
            object_id: "XJ 12.H".into(),
            event_type: "CREATED".into(),
            ecwid_event_id: "e-1".into(),
            format: "v3".into(),
            verified: true,
            request_id: "r".into(),
            received_at: "2026-11-22T10:15:00Z".into(),
            ..Record::default()
        }
    }

    #[test]
    fn subjects_are_tokens_whatever_the_object_id() {
        let r = record();
        let subject = record_index_subject(&r);
        assert_eq!(subject.split('.').count(), 6, "{subject}");
        assert!(subject.starts_with("ecwid.logidx.inst.1003."));
        assert!(subject.ends_with(".0f3c"));
        assert_eq!(id_of_index_subject(&subject), "0f3c");
        assert_eq!(object_hash("XJ 12.H").len(), 16);
        assert_ne!(object_hash("a"), object_hash("b"));
        assert_eq!(record_subject("0f3c"), "ecwid.log.0f3c");
        let mut raw = record();
        raw.instance_id = None;
        assert!(record_index_subject(&raw).starts_with("ecwid.logidx._.1003."));
    }

    #[test]
    fn a_record_with_its_most_attempts_fits_the_stream() {
        let mut r = record();
        for n in 1..=60 {
            r.push_attempt(model::record::Attempt {
                number: n,
                started_at: format!("t{n}"),
                duration_ms: 5,
                status: Some(503),
                error_class: None,
                error: Some("HTTP 503".into()),
                response: model::record::excerpt(&vec![b'x'; 5000]),
            });
        }
        assert!(serde_json::to_vec(&r).unwrap().len() < MAX_RECORD_BYTES as usize);
    }
}
