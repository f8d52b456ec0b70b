//! The log's writer: batches rows into PostgreSQL, spools them to JetStream while PostgreSQL is
//! unavailable, and writes the spool back when it is available again.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy};
use async_nats::jetstream::AckKind;
use deadpool_postgres::Pool;
use futures::StreamExt;
use model::time_fmt::now_unix_ms;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{pg, DbError, Job, LogError, Rows, Store, DOWN_FOR, UPKEEP_EVERY, WRITE_TIMEOUT};

/// Rows one batch takes at most (more wait for the next).
const MAX_BATCH_ROWS: usize = 500;
/// How long a spool publish may take.
const SPOOL_TIMEOUT: Duration = Duration::from_secs(5);

const INSERT_EVENTS: &str =
    "INSERT INTO event_log_events (id, received_at, instance_id, store_id, \
     object_type, object_id, event_type, ecwid_event_id, format, verified, request_id, status, \
     error, envelope_seq, seq) \
     SELECT id, to_timestamp(r / 1000.0), inst, store, ot, oid, et, eid, fmt, v, req, st, err, seq, \
     (r << 20) | (nextval('event_log_seq') & 1048575) \
     FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], \
     $7::text[], $8::text[], $9::text[], $10::bool[], $11::text[], $12::text[], $13::text[], \
     $14::bigint[]) AS t(id, r, inst, store, ot, oid, et, eid, fmt, v, req, st, err, seq) \
     ON CONFLICT DO NOTHING";

const INSERT_ATTEMPTS: &str = "INSERT INTO event_log_attempts (event_id, received_at, key, \
     store_id, attempted, started_at, settled_at, duration_ms, status, http_status, error_class, \
     error, response, next_attempt_at, envelope_seq) \
     SELECT eid, to_timestamp(r / 1000.0), k, store, a, to_timestamp(s / 1000.0), \
     to_timestamp(d / 1000.0), ms, st, hs, ec, err, resp, to_timestamp(n / 1000.0), seq \
     FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::bool[], $6::bigint[], \
     $7::bigint[], $8::int[], $9::text[], $10::int[], $11::text[], $12::text[], $13::text[], \
     $14::bigint[], $15::bigint[]) \
     AS t(eid, r, k, store, a, s, d, ms, st, hs, ec, err, resp, n, seq) \
     ON CONFLICT DO NOTHING";

/// Writes `rows` to PostgreSQL: one statement per table, pipelined on one connection; each
/// statement commits on its own (the rows are independent, and a batch written twice is kept
/// once).
pub(super) async fn insert(pool: &Pool, rows: &Rows) -> Result<(), DbError> {
    let client = pool.get().await?;
    let events = async {
        if rows.events.is_empty() {
            return Ok::<_, DbError>(());
        }
        let e = &rows.events;
        let col = |f: fn(&super::EventRow) -> &str| e.iter().map(f).collect::<Vec<&str>>();
        let statement = client.prepare_cached(INSERT_EVENTS).await?;
        client
            .execute(
                &statement,
                &[
                    &col(|r| &r.id),
                    &e.iter().map(|r| r.received_at_ms).collect::<Vec<_>>(),
                    &e.iter()
                        .map(|r| r.instance_id.as_deref())
                        .collect::<Vec<_>>(),
                    &col(|r| &r.store_id),
                    &col(|r| &r.object_type),
                    &col(|r| &r.object_id),
                    &col(|r| &r.event_type),
                    &col(|r| &r.ecwid_event_id),
                    &col(|r| &r.format),
                    &e.iter().map(|r| r.verified).collect::<Vec<_>>(),
                    &col(|r| &r.request_id),
                    &e.iter().map(|r| r.status.as_str()).collect::<Vec<_>>(),
                    &e.iter().map(|r| r.error.as_deref()).collect::<Vec<_>>(),
                    &e.iter().map(|r| r.envelope_seq).collect::<Vec<_>>(),
                ],
            )
            .await?;
        Ok(())
    };
    let attempts = async {
        if rows.attempts.is_empty() {
            return Ok::<_, DbError>(());
        }
        let a = &rows.attempts;
        let col = |f: fn(&super::AttemptRow) -> &str| a.iter().map(f).collect::<Vec<&str>>();
        let statement = client.prepare_cached(INSERT_ATTEMPTS).await?;
        client
            .execute(
                &statement,
                &[
                    &col(|r| &r.event_id),
                    &a.iter().map(|r| r.received_at_ms).collect::<Vec<_>>(),
                    &col(|r| &r.key),
                    &col(|r| &r.store_id),
                    &a.iter().map(|r| r.attempted).collect::<Vec<_>>(),
                    &a.iter().map(|r| r.started_at_ms).collect::<Vec<_>>(),
                    &a.iter().map(|r| r.settled_at_ms).collect::<Vec<_>>(),
                    &a.iter().map(|r| r.duration_ms).collect::<Vec<_>>(),
                    &a.iter().map(|r| r.status.as_str()).collect::<Vec<_>>(),
                    &a.iter().map(|r| r.http_status).collect::<Vec<_>>(),
                    &a.iter()
                        .map(|r| r.error_class.as_deref())
                        .collect::<Vec<_>>(),
                    &a.iter().map(|r| r.error.as_deref()).collect::<Vec<_>>(),
                    &col(|r| &r.response),
                    &a.iter().map(|r| r.next_attempt_at_ms).collect::<Vec<_>>(),
                    &a.iter().map(|r| r.envelope_seq).collect::<Vec<_>>(),
                ],
            )
            .await?;
        Ok(())
    };
    let (events, attempts) = futures::join!(events, attempts);
    events.and(attempts)
}

impl Store {
    fn postgres_up(&self) -> bool {
        self.ready.load(Ordering::Acquire)
            && self.down_until_ms.load(Ordering::Acquire) <= now_unix_ms()
    }

    fn mark_down(&self) {
        let until = now_unix_ms() + i64::try_from(DOWN_FOR.as_millis()).unwrap_or(5000);
        self.down_until_ms.store(until, Ordering::Release);
    }

    fn update_lag(&self) {
        let oldest = [
            self.waiting_since_ms.load(Ordering::Acquire),
            self.spooled_since_ms.load(Ordering::Acquire),
        ]
        .into_iter()
        .filter(|t| *t > 0)
        .min();
        let lag = oldest.map_or(0.0, |t| (now_unix_ms() - t).max(0) as f64 / 1000.0);
        self.metrics.lag.set(lag);
    }

    /// Makes `rows` durable: PostgreSQL when it is up and answers in time, the spool otherwise.
    async fn write(&self, rows: &Rows) -> Result<(), LogError> {
        self.metrics.batch_rows.observe(rows.len() as f64);
        if self.postgres_up() {
            match tokio::time::timeout(WRITE_TIMEOUT, insert(&self.pool, rows)).await {
                Ok(Ok(())) => {
                    self.metrics
                        .writes
                        .with_label_values(&["postgres"])
                        .inc_by(rows.len() as u64);
                    return Ok(());
                }
                Ok(Err(error)) => {
                    tracing::warn!(error = %crate::http::error_chain(&error), rows = rows.len(), "Event log rows not written to PostgreSQL; spooling them.");
                }
                Err(_) => {
                    tracing::warn!(rows = rows.len(), timeout = ?WRITE_TIMEOUT, "PostgreSQL did not take the event log rows in time; spooling them.");
                }
            }
            self.mark_down();
        }
        self.spool(rows).await
    }

    async fn spool(&self, rows: &Rows) -> Result<(), LogError> {
        let body = serde_json::to_vec(rows).map_err(|e| LogError::Write(e.to_string()))?;
        let mut h = async_nats::HeaderMap::new();
        h.insert(crate::nats::headers::MSG_ID, super::new_key());
        crate::nats::publish(
            &self.js,
            self.spool_subject.clone(),
            h,
            body.into(),
            SPOOL_TIMEOUT,
        )
        .await
        .map_err(|e| LogError::Write(crate::http::error_chain(&e)))?;
        self.metrics
            .writes
            .with_label_values(&["spool"])
            .inc_by(rows.len() as u64);
        self.metrics.spooled.inc();
        if let Some(oldest) = rows.received_at_min() {
            let _ = self.spooled_since_ms.compare_exchange(
                0,
                oldest,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
        Ok(())
    }
}

/// Takes the callers' rows, as many as are waiting (up to [`MAX_BATCH_ROWS`]) per batch, writes
/// them and tells each caller. Runs until every sender is gone.
pub(super) async fn write_loop(store: Arc<Store>, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut rows = Rows::default();
        let mut waiting = Vec::new();
        let mut next = Some(first);
        while let Some(job) = next.take() {
            rows.extend(job.rows);
            waiting.push(job.done);
            if rows.len() < MAX_BATCH_ROWS {
                next = rx.try_recv().ok();
            }
        }
        if let Some(oldest) = rows.received_at_min() {
            store.waiting_since_ms.store(oldest, Ordering::Release);
        }
        store.update_lag();
        let result = store.write(&rows).await;
        if let Err(error) = &result {
            store.metrics.failures.inc();
            tracing::warn!(%error, rows = rows.len(), "Event log rows neither written nor spooled; their messages are retried.");
        }
        store.waiting_since_ms.store(0, Ordering::Release);
        store.update_lag();
        for done in waiting {
            let _ = done.send(result.clone());
        }
    }
}

/// Connects and applies the migrations, retrying until they are applied; then keeps the
/// partitions.
pub(super) async fn prepare(store: Arc<Store>, retention: Duration, cancel: CancellationToken) {
    let mut wait = Duration::from_millis(200);
    loop {
        match pg::migrate(&store.pool, i32::MAX).await {
            Ok(applied) => {
                if !applied.is_empty() {
                    tracing::info!(?applied, "Event log migrations applied.");
                }
                break;
            }
            Err(error) => {
                tracing::warn!(error = %crate::http::error_chain(&error), retry_in = ?wait, "The event log's database is not ready; retrying.");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = cancel.cancelled() => return,
        }
        wait = (wait * 2).min(Duration::from_secs(10));
    }
    // Today's partitions before the first write.
    if let Err(error) = pg::upkeep(&store.pool, retention, time::OffsetDateTime::now_utc()).await {
        tracing::warn!(error = %crate::http::error_chain(&error), "Event log partitions not kept; trying again later.");
    }
    store.ready.store(true, Ordering::Release);
    pg::keep_partitions(
        store.pool.clone(),
        retention,
        UPKEEP_EVERY,
        store.metrics.partition_drop.clone(),
        cancel,
    )
    .await;
}

/// Sets `ecwid_event_log_spooled` (batches in the spool) and the spool's part of the lag (its
/// oldest message's age) from the stream's state.
async fn observe_spool(store: &Store) {
    let Ok(Ok(mut stream)) = tokio::time::timeout(
        Duration::from_secs(2),
        store.js.get_stream(super::SPOOL_STREAM),
    )
    .await
    else {
        return;
    };
    let Ok(Ok(info)) = tokio::time::timeout(Duration::from_secs(2), stream.info()).await else {
        return;
    };
    let state = &info.state;
    store
        .metrics
        .spooled
        .set(i64::try_from(state.messages).unwrap_or(i64::MAX));
    let oldest = if state.messages == 0 {
        0
    } else {
        (state.first_timestamp.unix_timestamp_nanos() / 1_000_000) as i64
    };
    store.spooled_since_ms.store(oldest, Ordering::Release);
    store.update_lag();
}

/// Writes spooled rows to PostgreSQL, oldest first, while it is up. Every process with the log
/// runs one on the same durable consumer, so any of them catches up.
pub(super) async fn drain_spool(store: Arc<Store>, cancel: CancellationToken) {
    let consumer = loop {
        let created = async {
            let stream = store
                .js
                .get_stream_no_info(super::SPOOL_STREAM)
                .await
                .map_err(|e| e.to_string())?;
            stream
                .get_or_create_consumer(
                    super::SPOOL_CONSUMER,
                    pull::Config {
                        durable_name: Some(super::SPOOL_CONSUMER.to_owned()),
                        ack_policy: AckPolicy::Explicit,
                        ack_wait: Duration::from_secs(60),
                        max_ack_pending: 64,
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| e.to_string())
        };
        match created.await {
            Ok(c) => break c,
            Err(error) => tracing::debug!(%error, "The spool's consumer is not ready; retrying."),
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
            () = cancel.cancelled() => return,
        }
    };
    let mut last_observed = std::time::Instant::now();
    while !cancel.is_cancelled() {
        if !store.postgres_up() {
            // The spool's state is read once per wait out of PostgreSQL's down time, not at
            // every half-second look.
            if last_observed.elapsed() >= DOWN_FOR {
                observe_spool(&store).await;
                last_observed = std::time::Instant::now();
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(500)) => continue,
                () = cancel.cancelled() => return,
            }
        }
        let batch = consumer
            .fetch()
            .max_messages(16)
            .expires(Duration::from_secs(10))
            .messages()
            .await;
        let mut messages = match batch {
            Ok(m) => m,
            Err(error) => {
                tracing::debug!(%error, "Could not read the spool; retrying.");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    () = cancel.cancelled() => return,
                }
            }
        };
        loop {
            let next = tokio::select! {
                m = messages.next() => m,
                () = cancel.cancelled() => return,
            };
            let Some(Ok(message)) = next else { break };
            let pending = message.info().map(|i| i.pending).unwrap_or(0);
            let rows: Rows = match serde_json::from_slice(&message.payload) {
                Ok(rows) => rows,
                Err(error) => {
                    // Nothing any release writes; kept out of the way rather than retried.
                    tracing::error!(%error, "A spooled event log batch is unreadable; dropped.");
                    let _ = message.ack_with(AckKind::Term).await;
                    continue;
                }
            };
            let written = tokio::time::timeout(WRITE_TIMEOUT, insert(&store.pool, &rows)).await;
            match written {
                Ok(Ok(())) => {
                    let _ = message.double_ack().await;
                    store
                        .metrics
                        .writes
                        .with_label_values(&["drained"])
                        .inc_by(rows.len() as u64);
                    if pending == 0 {
                        observe_spool(&store).await;
                    }
                }
                failed => {
                    if let Ok(Err(error)) = failed {
                        tracing::warn!(error = %crate::http::error_chain(&error), "Spooled event log rows not written yet; PostgreSQL is unavailable.");
                    }
                    store.mark_down();
                    let _ = message.ack_with(AckKind::Nak(Some(DOWN_FOR))).await;
                    break;
                }
            }
        }
        observe_spool(&store).await;
    }
}
