//! The event log: every envelope's journey (one record per Ecwid event × instance), and the
//! raw-stage outcome of every accepted Ecwid event that reached no envelope.
//!
//! Storage is PostgreSQL ([`pg`]), append-only: an event row when the normalizer has stored the
//! envelope (or decided the raw-stage outcome), an attempt row after every delivery attempt (and
//! for a status change without one). A record is its event row and its attempt rows; its status
//! is the newest attempt row's. Nothing is read before a write, and nothing is updated.
//!
//! Rows are written in batches ([`writer`]): a writer hands its rows over with [`EventLog::append`]
//! and waits until they are durable, then settles its JetStream message. Whatever is waiting
//! when a batch starts goes in it, so batches grow with the load and a quiet service waits for
//! nothing but its own rows. When PostgreSQL is down or slow, a batch goes to the spool stream
//! `ECWID_LOG_SPOOL` instead (a handful of subjects, not one per record) and deliveries go on; it
//! is written to PostgreSQL when it is back. A write that can be neither made nor spooled fails,
//! and the caller retries its message as it would any transient failure.
//!
//! The queries are [`search`]; partitions and migrations are [`pg`].

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use deadpool_postgres::Pool;
use model::record::{Record, Status};
use prometheus::{Gauge, Histogram, IntCounter, IntCounterVec, IntGauge, Registry};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

pub mod pg;
pub mod search;
mod writer;

use crate::config::DatabaseConfig;
pub use pg::DbError;

/// Log rows waiting for PostgreSQL while it is down: a work stream, one subject per writing
/// service.
pub const SPOOL_STREAM: &str = "ECWID_LOG_SPOOL";
pub const SPOOL_PREFIX: &str = "ecwid.logspool";
/// The durable consumer that writes spooled rows to PostgreSQL (any process with the log).
pub const SPOOL_CONSUMER: &str = "log-spool";

pub const WRITES_TOTAL: &str = "ecwid_event_log_writes_total";
pub const WRITE_FAILURES_TOTAL: &str = "ecwid_event_log_write_failures_total";
pub const LAG_SECONDS: &str = "ecwid_event_log_lag_seconds";
pub const SPOOLED: &str = "ecwid_event_log_spooled";
pub const BATCH_ROWS: &str = "ecwid_event_log_batch_rows";
pub const PARTITION_DROP_SECONDS: &str = "ecwid_event_log_partition_drop_seconds";

/// The spool stream's settings: a work queue (a message goes once PostgreSQL has its rows).
pub fn spool_stream_config(replicas: usize) -> stream::Config {
    stream::Config {
        name: SPOOL_STREAM.to_owned(),
        description: Some(
            "ecwid-events event log rows waiting for PostgreSQL (written when it is back)"
                .to_owned(),
        ),
        subjects: vec![format!("{SPOOL_PREFIX}.>")],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        max_age: model::retry::WORK_STREAM_MAX_AGE,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    }
}

/// An event row: a record's fields as the normalizer knows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRow {
    pub id: String,
    pub received_at_ms: i64,
    pub instance_id: Option<String>,
    pub store_id: String,
    pub object_type: String,
    pub object_id: String,
    pub event_type: String,
    pub ecwid_event_id: String,
    pub format: String,
    pub verified: bool,
    pub request_id: String,
    /// `pending`, or a raw-stage outcome's `filtered` / `dead`.
    pub status: Status,
    pub error: Option<String>,
    pub envelope_seq: Option<i64>,
}

impl EventRow {
    /// The event row of a record as it stands when it is created.
    pub fn of(r: &Record) -> Self {
        Self {
            id: r.id.clone(),
            received_at_ms: received_ms(&r.received_at),
            instance_id: r.instance_id.clone(),
            store_id: r.store_id.clone(),
            object_type: r.object_type.clone(),
            object_id: r.object_id.clone(),
            event_type: r.event_type.clone(),
            ecwid_event_id: r.ecwid_event_id.clone(),
            format: r.format.clone(),
            verified: r.verified,
            request_id: r.request_id.clone(),
            status: r.status,
            error: r.last_error.clone(),
            envelope_seq: r.envelope_seq.and_then(|s| i64::try_from(s).ok()),
        }
    }
}

/// An attempt row: one delivery attempt, or a status change without one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRow {
    pub event_id: String,
    /// The event's receipt (the partition key).
    pub received_at_ms: i64,
    /// Unique per row: a row written twice is kept once.
    pub key: String,
    pub store_id: String,
    /// `false`: a status change without an attempt.
    pub attempted: bool,
    pub started_at_ms: i64,
    pub settled_at_ms: i64,
    pub duration_ms: i32,
    /// The record's status after this row.
    pub status: Status,
    pub http_status: Option<i32>,
    pub error_class: Option<String>,
    pub error: Option<String>,
    pub response: String,
    pub next_attempt_at_ms: Option<i64>,
    pub envelope_seq: Option<i64>,
}

impl AttemptRow {
    /// A status change of `record` without an attempt, now.
    pub fn status_change(record: &Record, status: Status, error: Option<String>) -> Self {
        let now = model::time_fmt::now_unix_ms();
        Self {
            event_id: record.id.clone(),
            received_at_ms: received_ms(&record.received_at),
            key: new_key(),
            store_id: record.store_id.clone(),
            attempted: false,
            started_at_ms: now,
            settled_at_ms: now,
            duration_ms: 0,
            status,
            http_status: None,
            error_class: None,
            error,
            response: String::new(),
            next_attempt_at_ms: None,
            envelope_seq: None,
        }
    }
}

/// A record's receipt in unix ms; now when it has none (a message without the ingest's header),
/// so that its rows land in today's partition rather than in 1970's.
fn received_ms(received_at: &str) -> i64 {
    model::time_fmt::rfc3339_to_unix_ms(received_at).unwrap_or_else(model::time_fmt::now_unix_ms)
}

/// A fresh row key.
pub fn new_key() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Rows to write together.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rows {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<EventRow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<AttemptRow>,
}

impl Rows {
    pub fn len(&self) -> usize {
        self.events.len() + self.attempts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn extend(&mut self, other: Rows) {
        self.events.extend(other.events);
        self.attempts.extend(other.attempts);
    }

    /// The oldest receipt among the rows (for the lag), in ms.
    fn received_at_min(&self) -> Option<i64> {
        self.events
            .iter()
            .map(|e| e.received_at_ms)
            .chain(self.attempts.iter().map(|a| a.settled_at_ms))
            .min()
    }
}

/// Why a log operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    #[error("event log write failed: PostgreSQL unavailable and the spool refused the rows: {0}")]
    Write(String),
    #[error("event log read failed: {0}")]
    Read(String),
    #[error("the event log is off")]
    Off,
}

/// The event log's metrics.
#[derive(Debug, Clone)]
pub struct LogMetrics {
    /// to: postgres, spool, drained (spooled rows written to PostgreSQL).
    pub writes: IntCounterVec,
    pub failures: IntCounter,
    pub lag: Gauge,
    pub spooled: IntGauge,
    pub batch_rows: Histogram,
    pub partition_drop: Histogram,
}

impl LogMetrics {
    pub fn register(reg: &Registry) -> Self {
        let batch_rows = {
            crate::metrics::declare(BATCH_ROWS, "histogram");
            let h = Histogram::with_opts(
                prometheus::HistogramOpts::new(
                    BATCH_ROWS,
                    "Rows per event log batch written to PostgreSQL or the spool.",
                )
                .buckets(vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0]),
            )
            .expect("valid metric");
            reg.register(Box::new(h.clone()))
                .expect("metric registered once");
            h
        };
        Self {
            writes: crate::metrics::counter_vec(
                reg,
                WRITES_TOTAL,
                "Event log rows made durable, by where: postgres, spool (PostgreSQL was \
                 unavailable), drained (spooled rows written to PostgreSQL since).",
                &["to"],
            ),
            failures: crate::metrics::counter(
                reg,
                WRITE_FAILURES_TOTAL,
                "Event log batches that could be written neither to PostgreSQL nor to the \
                 spool (their messages are retried; deliveries go on).",
            ),
            lag: crate::metrics::float_gauge_vec(
                reg,
                LAG_SECONDS,
                "Age of the oldest event log row this process has not yet written to \
                 PostgreSQL (waiting in a batch or in the spool); 0 when caught up.",
                &[],
            )
            .with_label_values(&[] as &[&str]),
            spooled: crate::metrics::gauge(
                reg,
                SPOOLED,
                "Event log rows waiting in the spool stream for PostgreSQL, as this process \
                 last saw them.",
            ),
            batch_rows,
            partition_drop: crate::metrics::histogram(
                reg,
                PARTITION_DROP_SECONDS,
                "How long a round of partition upkeep that dropped partitions past \
                 EVENT_LOG_RETENTION took.",
            ),
        }
    }
}

/// Rows handed to the writer, and who waits for them.
struct Job {
    rows: Rows,
    done: oneshot::Sender<Result<(), LogError>>,
}

/// The log's shared state in a process.
#[derive(Debug)]
struct Store {
    pool: Pool,
    /// Migrations applied: PostgreSQL can be written and read.
    ready: AtomicBool,
    /// Until when (unix ms) PostgreSQL counts as down after a failed write: batches go straight
    /// to the spool, without waiting for another timeout each.
    down_until_ms: AtomicI64,
    /// Oldest row waiting in this process's batch, unix ms (0: none).
    waiting_since_ms: AtomicI64,
    /// Oldest spooled row this process last saw, unix ms (0: none).
    spooled_since_ms: AtomicI64,
    js: jetstream::Context,
    spool_subject: String,
    metrics: LogMetrics,
}

/// Writes and reads the log. Cheap to clone. With the log off (`EVENT_LOG=off`) writes do
/// nothing and reads find nothing.
#[derive(Debug, Clone)]
pub struct EventLog {
    store: Option<Arc<Store>>,
    tx: Option<mpsc::Sender<Job>>,
    metrics: LogMetrics,
}

/// Batches waiting for the writer at most (each holds one caller's rows).
const QUEUE: usize = 8192;
/// How long a write to PostgreSQL may take before its batch goes to the spool.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long PostgreSQL counts as down after a failed write.
pub const DOWN_FOR: Duration = Duration::from_secs(5);
/// How often partitions are kept (created ahead, dropped past retention).
pub const UPKEEP_EVERY: Duration = Duration::from_secs(3600);

impl EventLog {
    /// No log: writes succeed doing nothing, reads find nothing.
    pub fn off(metrics: LogMetrics) -> Self {
        Self {
            store: None,
            tx: None,
            metrics,
        }
    }

    /// The log in `database`: connects, applies the migrations (waiting up to `wait` for them;
    /// after that they go on in the background, and rows go to the spool until they are done),
    /// and starts the writer, the spool's drain and partition upkeep.
    pub async fn start(
        database: &DatabaseConfig,
        js: jetstream::Context,
        service: &str,
        retention: Duration,
        metrics: LogMetrics,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<Self, DbError> {
        let pool = pg::pool(database)?;
        let store = Arc::new(Store {
            pool,
            ready: AtomicBool::new(false),
            down_until_ms: AtomicI64::new(0),
            waiting_since_ms: AtomicI64::new(0),
            spooled_since_ms: AtomicI64::new(0),
            js,
            spool_subject: format!("{SPOOL_PREFIX}.{service}"),
            metrics: metrics.clone(),
        });
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(writer::write_loop(store.clone(), rx));
        let prepared = tokio::spawn(writer::prepare(store.clone(), retention, cancel.clone()));
        tokio::spawn(writer::drain_spool(store.clone(), cancel.clone()));
        // Start-up waits a little for the schema, so that a healthy deployment's first rows and
        // reads go to PostgreSQL; a database that is down does not keep the service from
        // starting (rows are spooled meanwhile).
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while !store.ready.load(Ordering::Acquire) && !prepared.is_finished() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        if !store.ready.load(Ordering::Acquire) {
            tracing::warn!("The event log's database is not ready; rows are spooled until it is.");
        }
        Ok(Self {
            store: Some(store),
            tx: Some(tx),
            metrics,
        })
    }

    pub fn enabled(&self) -> bool {
        self.store.is_some()
    }

    /// The database, for reads; `None` with the log off or before its schema is ready.
    pub fn pool(&self) -> Result<&Pool, LogError> {
        match &self.store {
            None => Err(LogError::Off),
            Some(s) if !s.ready.load(Ordering::Acquire) => Err(LogError::Read(
                "the event log's database is not ready (unreachable, or its migrations have \
                 not run yet)"
                    .to_owned(),
            )),
            Some(s) => Ok(&s.pool),
        }
    }

    /// Writes `rows`, returning once they are durable (in PostgreSQL or the spool).
    pub async fn append(&self, rows: Rows) -> Result<(), LogError> {
        let Some(tx) = &self.tx else { return Ok(()) };
        if rows.is_empty() {
            return Ok(());
        }
        let (done, wait) = oneshot::channel();
        tx.send(Job { rows, done })
            .await
            .map_err(|_| LogError::Write("the event log writer has stopped".to_owned()))?;
        wait.await
            .map_err(|_| LogError::Write("the event log writer has stopped".to_owned()))?
    }

    /// Counts a failed write; the caller decides how it is retried.
    pub fn failed(&self, error: &LogError) {
        self.metrics.failures.inc();
        tracing::warn!(%error, "Event log write failed; it will be retried.");
    }

    /// Attempts `event_id` has had: its attempt rows in PostgreSQL (`None` when they cannot be
    /// counted now).
    pub async fn attempts_of(&self, event_id: &str) -> Option<u64> {
        let pool = self.pool().ok()?;
        let client = pool.get().await.ok()?;
        let row = tokio::time::timeout(search::READ_TIMEOUT, async {
            let statement = client
                .prepare_cached(
                    "SELECT count(*) FROM event_log_attempts WHERE event_id = $1 AND attempted",
                )
                .await?;
            client.query_one(&statement, &[&event_id]).await
        })
        .await
        .ok()?
        .ok()?;
        u64::try_from(row.get::<_, i64>(0)).ok()
    }
}

/// Deletes `store_id`'s records (with `object`, only that object's): their attempt rows, then
/// their event rows. How many of each went.
pub async fn purge(
    log: &EventLog,
    store_id: &str,
    object: Option<&(String, String)>,
) -> Result<(u64, u64), LogError> {
    let read = |e: &dyn std::fmt::Display| LogError::Read(e.to_string());
    let pool = log.pool()?;
    let mut client = pool.get().await.map_err(|e| read(&e))?;
    let tx = client.transaction().await.map_err(|e| read(&e))?;
    let (object_type, object_id) = object.cloned().unzip();
    let filter =
        "e.store_id = $1 AND ($2::text IS NULL OR (e.object_type = $2 AND e.object_id = $3))";
    let attempts = tx
        .execute(
            &format!(
                "DELETE FROM event_log_attempts a USING event_log_events e \
                 WHERE a.event_id = e.id AND a.received_at = e.received_at AND {filter}"
            ),
            &[&store_id, &object_type, &object_id],
        )
        .await
        .map_err(|e| read(&e))?;
    let events = tx
        .execute(
            &format!("DELETE FROM event_log_events e WHERE {filter}"),
            &[&store_id, &object_type, &object_id],
        )
        .await
        .map_err(|e| read(&e))?;
    tx.commit().await.map_err(|e| read(&e))?;
    Ok((events, attempts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_through_the_spool_format() {
        let record = Record {
            id: "0f3c".into(),
            instance_id: Some("inst".into()),
            store_id: "1003".into(),
            object_type: "orders".into(),
            object_id: "XJ 12.H".into(),
            event_type: "CREATED".into(),
            received_at: "2026-11-22T10:15:00Z".into(),
            envelope_seq: Some(7),
            ..Record::default()
        };
        let rows = Rows {
            events: vec![EventRow::of(&record)],
            attempts: vec![AttemptRow::status_change(
                &record,
                Status::Dead,
                Some("gone".into()),
            )],
        };
        let json = serde_json::to_vec(&rows).unwrap();
        let back: Rows = serde_json::from_slice(&json).unwrap();
        assert_eq!(back, rows);
        assert_eq!(rows.events[0].received_at_ms, 1_795_342_500_000);
        assert_eq!(rows.events[0].envelope_seq, Some(7));
        assert_eq!(rows.len(), 2);
    }
}
