//! Polling one store: `latest-stats` first, then, for every entity type whose last update is not
//! older than its cursor, the closed window `[cursor, now − POLLER_WINDOW_DELAY_MS]` page by page
//! (`updatedFrom`/`updatedTo`, `offset`/`limit` 100) and its deletions (`/deleted?from_date=&
//! to_date=`). Every entity becomes one `poll` message in `ECWID_RAW` with a dedupe id per
//! version; a cursor moves to the window's end only after every message of the window is
//! acknowledged. The store's outcome is kept in `status.<storeId>` for the admin API.
//!
//! A cycle reads at most `POLLER_CYCLE_MAX_PAGES` pages in `POLLER_CYCLE_MAX_MS` (an API whose
//! `total` keeps growing would otherwise keep it going for ever): cut short, a window keeps where
//! it got to in `resume.<storeId>.<type>` and the next cycle goes on from there, with the status
//! `behind`. Between pages the cycle asks whether it should go on at all (the lease still held,
//! a polling instance of the store still there).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use async_nats::HeaderMap;
use model::ecwid::{self, PollAction, PollEntity};
use model::instance::Instance;
use serde::{Deserialize, Serialize};
use shared::nats::{headers, RAW_STREAM};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::api::EcwidApi;
use crate::budget::token_hash;
use crate::error::PollError;
use crate::metrics::Metrics;

/// Page size of every list request (Ecwid's maximum).
pub const PAGE_LIMIT: usize = 100;

/// What polling a store needs, gathered from its instances.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreJob {
    pub store_id: String,
    pub token: String,
    pub entities: BTreeSet<PollEntity>,
    pub interval: Duration,
    /// Whether entities a webhook already brought are skipped (every polling instance of the
    /// store also takes webhooks: see the README's dedupe rule).
    pub skip_seen: bool,
}

/// The stores to poll, from the instances: those with `event.vendor.type` naming polling, events
/// enabled and a token. A store polled for several instances uses the token of the first by id,
/// the shortest interval, and the union of their `event.objects`.
pub fn jobs(instances: &[Arc<Instance>]) -> BTreeMap<String, StoreJob> {
    let mut sorted: Vec<&Arc<Instance>> = instances
        .iter()
        .filter(|i| i.polls() && i.events_enabled())
        .collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    let mut jobs: BTreeMap<String, StoreJob> = BTreeMap::new();
    for i in sorted {
        let (Some(store), Some(token)) = (i.store_id(), i.api_token()) else {
            continue;
        };
        let entities: BTreeSet<PollEntity> = PollEntity::ALL
            .into_iter()
            .filter(|e| i.accepts_object(&model::normalize::poll_object_type(*e)))
            .collect();
        let job = jobs.entry(store.to_owned()).or_insert_with(|| StoreJob {
            store_id: store.to_owned(),
            token: token.to_owned(),
            entities: BTreeSet::new(),
            interval: i.poll_interval(),
            skip_seen: true,
        });
        job.entities.extend(entities);
        job.interval = job.interval.min(i.poll_interval());
        job.skip_seen &= i.takes_webhooks();
    }
    jobs
}

/// What one window (or a backfill) did.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    /// Entities read.
    pub seen: u64,
    /// New messages stored in `ECWID_RAW`.
    pub stored: u64,
    /// Already stored before (the same version of the same entity).
    pub duplicates: u64,
    /// Not stored because a webhook brought that version already.
    pub skipped: u64,
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, o: Self) {
        self.seen += o.seen;
        self.stored += o.stored;
        self.duplicates += o.duplicates;
        self.skipped += o.skipped;
    }
}

/// What a cycle read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    /// latest-stats said nothing changed.
    Unchanged,
    Changed,
    /// The cycle's allowance was spent: a window was left with a resume point.
    CutShort,
}

/// The last poll's outcome of a store, as `GET /instances/{id}/poller` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// `ok`, `error` (Ecwid refused: backing off until `retryAt`), `retrying` (a transient
    /// failure; the next cycle tries again) or `behind` (the cycle was cut short at its bound;
    /// the next one goes on from where it stopped).
    pub state: String,
    pub last_poll_at: Option<String>,
    pub last_poll_error: Option<LastError>,
    pub retry_at: Option<String>,
    /// Refusals in a row.
    pub failures: u32,
    /// Unix ms of `retry_at`, for the poller.
    #[serde(default)]
    pub retry_at_ms: i64,
    /// Which token was refused (a hash): a new token is tried at once.
    #[serde(default)]
    pub token_hash: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LastError {
    pub status: Option<u16>,
    pub message: String,
    pub at: String,
}

/// How one cycle of a store ended.
#[derive(Debug, Default, Clone, Copy)]
pub struct CycleEnd {
    /// The oldest cursor of the store afterwards (for the lag gauge).
    pub oldest: Option<i64>,
    /// The cycle failed (a transient error): the store is polled again after a backoff.
    pub failed: bool,
}

/// Where reading a window stopped: the list (0: changed, 1: deleted) and the offset in it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    pub list: usize,
    pub offset: usize,
}

/// A window cut short, kept in `resume.<storeId>.<type>`: the window's end (so the next cycle
/// reads the same window, whose offsets it knows) and where to go on.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct ResumePoint {
    to: i64,
    #[serde(flatten)]
    at: Resume,
}

/// What one cycle (or one backfill) may still read.
#[derive(Debug)]
pub struct Allowance {
    pages_left: u32,
    until: std::time::Instant,
}

impl Allowance {
    pub fn new(pages: u32, time: Duration) -> Self {
        Self {
            pages_left: pages,
            until: std::time::Instant::now() + time,
        }
    }

    /// Takes one page, or says the allowance is spent.
    fn take_page(&mut self) -> bool {
        if self.pages_left == 0 || std::time::Instant::now() >= self.until {
            return false;
        }
        self.pages_left -= 1;
        true
    }
}

/// One window to read: a type of a store, `[from, to]`, from `start` on.
#[derive(Debug, Clone, Copy)]
pub struct Window<'a> {
    pub store: &'a str,
    pub token: &'a str,
    pub entity: PollEntity,
    pub from: i64,
    pub to: i64,
    pub skip_seen: bool,
    /// The instance a backfill is for (its messages carry `Ecwid-Instance-Id` and their own
    /// dedupe ids).
    pub named: Option<&'a str>,
    pub start: Resume,
}

pub fn resume_key(store_id: &str, entity: PollEntity) -> String {
    format!("resume.{store_id}.{}", entity.path())
}

pub fn status_key(store_id: &str) -> String {
    format!("status.{store_id}")
}

pub fn cursor_key(store_id: &str, entity: PollEntity) -> String {
    format!("cursor.{store_id}.{}", entity.path())
}

/// The parts every poll uses.
#[derive(Debug, Clone)]
pub struct Poller {
    pub api: EcwidApi,
    pub js: jetstream::Context,
    pub state: kv::Store,
    /// What webhooks already brought ([`crate::sightings`]).
    pub sightings: Arc<crate::sightings::Sightings>,
    pub metrics: Metrics,
    pub publish_timeout: Duration,
    pub window_delay: Duration,
    pub error_backoff: Duration,
    pub error_backoff_max: Duration,
    /// `POLLER_CYCLE_MAX_PAGES`, `POLLER_CYCLE_MAX_MS`: what one cycle or backfill reads at most.
    pub cycle_max_pages: u32,
    pub cycle_max_time: Duration,
}

fn now_secs() -> i64 {
    model::time_fmt::now_unix_ms() / 1000
}

fn now_rfc3339() -> String {
    model::time_fmt::unix_ms_to_rfc3339(model::time_fmt::now_unix_ms())
}

fn transient(what: &str, e: impl std::fmt::Display) -> PollError {
    PollError::Transient(format!("{what}: {e}"))
}

impl Poller {
    pub async fn status(&self, store_id: &str) -> Option<Status> {
        let bytes = self.state.get(status_key(store_id)).await.ok()??;
        serde_json::from_slice(&bytes).ok()
    }

    async fn put_status(&self, store_id: &str, status: &Status) {
        if let Ok(v) = serde_json::to_vec(status) {
            if let Err(error) = self.state.put(status_key(store_id), v.into()).await {
                tracing::warn!(%error, store_id, "Could not record the poll status.");
            }
        }
    }

    /// Shows on the store's status that its cycle ended without a word (it panicked): the
    /// next cycle, after a backoff, writes over it.
    pub async fn record_crash(&self, store_id: &str, message: String) {
        let previous = self.status(store_id).await.unwrap_or_default();
        let status = Status {
            state: "retrying".into(),
            last_poll_at: Some(now_rfc3339()),
            last_poll_error: Some(LastError {
                status: None,
                message,
                at: now_rfc3339(),
            }),
            token_hash: previous.token_hash,
            ..Status::default()
        };
        self.metrics.cycles.with_label_values(&["failed"]).inc();
        self.put_status(store_id, &status).await;
    }

    /// One cycle of a store this replica holds. `keep_going` (the lease still held, a polling
    /// instance of the store still there) is asked between pages and before a cursor moves.
    pub async fn cycle(
        &self,
        job: &StoreJob,
        keep_going: impl Fn() -> bool + Sync,
        cancel: &CancellationToken,
    ) -> CycleEnd {
        let store = job.store_id.as_str();
        let span = tracing::trace_span!(
            target: shared::otel::TARGET,
            "poll cycle",
            otel.name = "poll cycle",
            ecwid.store_id = store,
        );
        self.cycle_traced(job, keep_going, cancel)
            .instrument(span)
            .await
    }

    async fn cycle_traced(
        &self,
        job: &StoreJob,
        keep_going: impl Fn() -> bool + Sync,
        cancel: &CancellationToken,
    ) -> CycleEnd {
        let store = job.store_id.as_str();
        let previous = self.status(store).await.unwrap_or_default();
        let hash = token_hash(&job.token);
        if previous.state == "error"
            && previous.token_hash == hash
            && previous.retry_at_ms > model::time_fmt::now_unix_ms()
        {
            self.metrics
                .cycles
                .with_label_values(&["backing_off"])
                .inc();
            return CycleEnd::default();
        }
        let result = self.poll_store(job, &keep_going, cancel).await;
        let mut status = Status {
            last_poll_at: Some(now_rfc3339()),
            token_hash: hash,
            ..Status::default()
        };
        let end = match result {
            Ok((oldest, Read::CutShort)) => {
                let message = format!(
                    "the cycle was cut short at its bound ({} pages, POLLER_CYCLE_MAX_PAGES, or \
                     {} s, POLLER_CYCLE_MAX_MS); the next cycle goes on from there",
                    self.cycle_max_pages,
                    self.cycle_max_time.as_secs()
                );
                tracing::warn!(
                    store_id = store,
                    "Poll cycle cut short at its bound; the next one goes on."
                );
                status.state = "behind".into();
                status.last_poll_error = Some(LastError {
                    status: None,
                    message,
                    at: now_rfc3339(),
                });
                self.metrics.cycles.with_label_values(&["cut_short"]).inc();
                CycleEnd {
                    oldest,
                    failed: false,
                }
            }
            Ok((oldest, read)) => {
                status.state = "ok".into();
                let outcome = if read == Read::Changed {
                    "ok"
                } else {
                    "unchanged"
                };
                self.metrics.cycles.with_label_values(&[outcome]).inc();
                CycleEnd {
                    oldest,
                    failed: false,
                }
            }
            Err(PollError::Cancelled) => return CycleEnd::default(),
            Err(PollError::Refused {
                status: code,
                message,
            }) => {
                let failures =
                    if previous.state == "error" && previous.token_hash == status.token_hash {
                        previous.failures + 1
                    } else {
                        1
                    };
                let wait = self
                    .error_backoff
                    .saturating_mul(1u32 << (failures - 1).min(16))
                    .min(self.error_backoff_max);
                let retry_ms = model::time_fmt::now_unix_ms() + wait.as_millis() as i64;
                tracing::warn!(store_id = store, status = code, message, retry_in = ?wait, "Ecwid refused the store's token; backing off.");
                status.state = "error".into();
                status.failures = failures;
                status.retry_at_ms = retry_ms;
                status.retry_at = Some(model::time_fmt::unix_ms_to_rfc3339(retry_ms));
                status.last_poll_error = Some(LastError {
                    status: Some(code),
                    message,
                    at: now_rfc3339(),
                });
                self.metrics.cycles.with_label_values(&["refused"]).inc();
                // Its own backoff (retryAt) applies, not the failed cycles'.
                CycleEnd::default()
            }
            Err(PollError::Transient(message)) => {
                tracing::warn!(
                    store_id = store,
                    error = message,
                    "Poll failed; the next cycle tries again."
                );
                status.state = "retrying".into();
                status.last_poll_error = Some(LastError {
                    status: None,
                    message,
                    at: now_rfc3339(),
                });
                self.metrics.cycles.with_label_values(&["failed"]).inc();
                CycleEnd {
                    oldest: None,
                    failed: true,
                }
            }
        };
        self.put_status(store, &status).await;
        end
    }

    /// Returns the oldest cursor after the cycle and what was read.
    async fn poll_store(
        &self,
        job: &StoreJob,
        keep_going: &(impl Fn() -> bool + Sync),
        cancel: &CancellationToken,
    ) -> Result<(Option<i64>, Read), PollError> {
        let store = job.store_id.as_str();
        let to = now_secs() - self.window_delay.as_secs() as i64;
        let stats_body = self
            .api
            .get(store, "latest-stats", &job.token, cancel)
            .await?;
        let stats = ecwid::parse_latest_stats(&stats_body).unwrap_or_default();
        let mut oldest: Option<i64> = None;
        let mut read = Read::Unchanged;
        let mut allowance = Allowance::new(self.cycle_max_pages, self.cycle_max_time);
        // Types with a window cut short go last, so one endless type cannot starve the others.
        let mut entities = Vec::with_capacity(job.entities.len());
        for entity in &job.entities {
            entities.push((*entity, self.resume_point(store, *entity).await?));
        }
        entities.sort_by_key(|(_, resume)| resume.is_some());
        for (entity, resume) in entities {
            let key = cursor_key(store, entity);
            let entry = self
                .state
                .entry(&key)
                .await
                .map_err(|e| transient("cursor", e))?;
            let current = entry
                .as_ref()
                .filter(|e| e.operation == kv::Operation::Put)
                .and_then(|e| {
                    std::str::from_utf8(&e.value)
                        .ok()?
                        .parse::<i64>()
                        .ok()
                        .map(|c| (c, e.revision))
                });
            let Some((from, revision)) = current else {
                // A store seen for the first time starts now; the past is a backfill's.
                self.state
                    .put(&key, to.to_string().into())
                    .await
                    .map_err(|e| transient("cursor", e))?;
                oldest = Some(oldest.map_or(to, |o| o.min(to)));
                continue;
            };
            // A window cut short is finished first, with the end it had.
            let (window_to, start) = match resume {
                Some(r) if r.to > from => (r.to, r.at),
                _ => (to, Resume::default()),
            };
            if from >= window_to {
                oldest = Some(oldest.map_or(from, |o| o.min(from)));
                continue;
            }
            // latest-stats says nothing of this type changed since the cursor: no request.
            let unchanged = resume.is_none() && stats.get(&entity).is_some_and(|t| *t < from);
            if !unchanged {
                if read == Read::CutShort {
                    // The allowance is spent: this type waits for the next cycle.
                    oldest = Some(oldest.map_or(from, |o| o.min(from)));
                    continue;
                }
                read = Read::Changed;
                let window = Window {
                    store,
                    token: &job.token,
                    entity,
                    from,
                    to: window_to,
                    skip_seen: job.skip_seen,
                    named: None,
                    start,
                };
                let (_, cut) = self
                    .poll_window(&window, &mut allowance, keep_going, cancel)
                    .await?;
                if let Some(at) = cut {
                    let point = ResumePoint { to: window_to, at };
                    let value = serde_json::to_vec(&point).unwrap_or_default();
                    self.state
                        .put(resume_key(store, entity), value.into())
                        .await
                        .map_err(|e| transient("resume point", e))?;
                    read = Read::CutShort;
                    oldest = Some(oldest.map_or(from, |o| o.min(from)));
                    continue;
                }
            }
            if !keep_going() {
                return Err(PollError::Transient(
                    "the lease was lost during the cycle".into(),
                ));
            }
            self.state
                .update(&key, window_to.to_string().into(), revision)
                .await
                .map_err(|e| transient("cursor", e))?;
            if resume.is_some() {
                self.state
                    .delete(resume_key(store, entity))
                    .await
                    .map_err(|e| transient("resume point", e))?;
            }
            oldest = Some(oldest.map_or(window_to, |o| o.min(window_to)));
        }
        Ok((oldest, read))
    }

    async fn resume_point(
        &self,
        store: &str,
        entity: PollEntity,
    ) -> Result<Option<ResumePoint>, PollError> {
        let value = self
            .state
            .get(resume_key(store, entity))
            .await
            .map_err(|e| transient("resume point", e))?;
        Ok(value.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Reads `window.entity` changed in `[from, to]` (and deleted, where Ecwid lists deletions)
    /// from `window.start` on, and stores every version not stored before. Stops when
    /// `allowance` is spent (returning where it got to) or when `keep_going` says no
    /// ([`PollError::Cancelled`]).
    pub async fn poll_window(
        &self,
        window: &Window<'_>,
        allowance: &mut Allowance,
        keep_going: &(dyn Fn() -> bool + Sync),
        cancel: &CancellationToken,
    ) -> Result<(Counts, Option<Resume>), PollError> {
        let Window {
            store,
            token,
            entity,
            from,
            to,
            skip_seen,
            named,
            start,
        } = *window;
        let mut counts = Counts::default();
        let lists = [(false, "updatedFrom", "updatedTo", entity.path().to_owned())]
            .into_iter()
            .chain(entity.has_deleted().then(|| {
                (
                    true,
                    "from_date",
                    "to_date",
                    format!("{}/deleted", entity.path()),
                )
            }));
        for (list, (deleted, from_name, to_name, path)) in lists.enumerate().skip(start.list) {
            let mut offset = if list == start.list { start.offset } else { 0 };
            loop {
                if !keep_going() {
                    return Err(PollError::Cancelled);
                }
                if !allowance.take_page() {
                    return Ok((counts, Some(Resume { list, offset })));
                }
                let query = format!(
                    "{path}?{from_name}={from}&{to_name}={to}&offset={offset}&limit={PAGE_LIMIT}"
                );
                let body = self.api.get(store, &query, token, cancel).await?;
                let page = ecwid::parse_page(&body)
                    .map_err(|e| transient("Ecwid's answer is not a page", e))?;
                let n = page.items.len();
                counts += self
                    .store_items(
                        store,
                        entity,
                        deleted,
                        &page.items,
                        skip_seen.then_some(from),
                        named,
                    )
                    .await?;
                offset += n;
                let total = page.total.map(|t| t as usize);
                if n == 0 || n < PAGE_LIMIT && total.is_none() || total.is_some_and(|t| offset >= t)
                {
                    break;
                }
            }
        }
        Ok((counts, None))
    }

    async fn store_items(
        &self,
        store: &str,
        entity: PollEntity,
        deleted: bool,
        items: &[Box<serde_json::value::RawValue>],
        skip_seen_from: Option<i64>,
        named: Option<&str>,
    ) -> Result<Counts, PollError> {
        let object_type = model::normalize::poll_object_type(entity);
        let mut counts = Counts::default();
        let seen = match skip_seen_from {
            Some(from) => Some(self.sightings.of(store, from).await),
            None => None,
        };
        let mut publishes = Vec::new();
        for item in items {
            counts.seen += 1;
            self.metrics
                .entities
                .with_label_values(&[&object_type])
                .inc();
            let body = match ecwid::poll_body(entity, store, deleted, item) {
                Ok(b) => b,
                Err(error) => {
                    tracing::warn!(%error, store_id = store, entity = entity.path(), "An entity Ecwid returned cannot be read; skipped.");
                    self.metrics
                        .skipped
                        .with_label_values(&["unreadable"])
                        .inc();
                    continue;
                }
            };
            let (msg_id, action, object_id, changed_at) = match ecwid::parse_poll(&body) {
                Ok(e) => (e.msg_id(), e.action, e.object_id, e.changed_at),
                Err(_) => continue,
            };
            if seen
                .as_ref()
                .is_some_and(|seen| seen.since(&object_type, &object_id, changed_at))
            {
                counts.skipped += 1;
                self.metrics
                    .skipped
                    .with_label_values(&["webhook_seen"])
                    .inc();
                continue;
            }
            let mut h = HeaderMap::new();
            // A backfill's message is its own (the regular poll may have stored this version
            // for other instances); its envelope still has the regular eventId.
            let msg_id = match named {
                Some(instance) => format!("{msg_id}@{instance}"),
                None => msg_id,
            };
            h.insert(headers::MSG_ID, msg_id.as_str());
            h.insert(headers::FORMAT, ecwid::Format::Poll.as_str());
            // Read from the REST API with the store's own token.
            h.insert(headers::VERIFIED, "true");
            h.insert(headers::STORE_ID, store);
            h.insert(
                headers::RECEIVED_AT,
                model::time_fmt::now_unix_ms().to_string().as_str(),
            );
            if let Some(instance) = named {
                h.insert(headers::INSTANCE_ID, instance);
            }
            let event_type = match action {
                PollAction::Created => "CREATED",
                PollAction::Updated => "UPDATED",
                PollAction::Deleted => "DELETED",
            };
            let subject = shared::nats::raw_subject(store);
            // Each entity is an event, and a trace, of its own, linked to the cycle.
            let span = shared::nats::publish_root_span(RAW_STREAM, &subject, &msg_id);
            if shared::otel::enabled() {
                shared::otel::link(&span, &tracing::Span::current());
                shared::otel::inject_nats(&span, &mut h);
            }
            let js = &self.js;
            let timeout = self.publish_timeout;
            publishes.push(
                async move {
                    let ack = shared::nats::publish(js, subject, h, body.into(), timeout).await;
                    (ack, event_type)
                }
                .instrument(span),
            );
        }
        drop(seen);
        for (ack, event_type) in futures::future::join_all(publishes).await {
            match ack {
                Ok(ack) if ack.duplicate => {
                    counts.duplicates += 1;
                    self.metrics.skipped.with_label_values(&["duplicate"]).inc();
                }
                Ok(_) => {
                    counts.stored += 1;
                    self.metrics.events.with_label_values(&[event_type]).inc();
                }
                Err(e) => return Err(transient("publish", e)),
            }
        }
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: &str, store: &str, config: &[(&str, &str)]) -> Arc<Instance> {
        let mut i: Instance =
            serde_json::from_str(r#"{"configuration":{"event.notification.enabled":"true"}}"#)
                .unwrap();
        i.id = id.into();
        i.configuration
            .insert("ecwid.store.id".into(), store.into());
        for (k, v) in config {
            i.configuration.insert((*k).into(), (*v).into());
        }
        Arc::new(i)
    }

    #[test]
    fn jobs_come_from_polling_instances() {
        let all = vec![
            instance("a", "1", &[]),
            instance(
                "b",
                "2",
                &[
                    ("event.vendor.type", "polling"),
                    ("ecwid.api.token", "secret_b"),
                    ("event.objects", "orders"),
                ],
            ),
            instance(
                "c",
                "2",
                &[
                    ("event.vendor.type", "webhooks,polling"),
                    ("ecwid.api.token", "secret_c"),
                    ("event.objects", "products"),
                    ("event.poller.refresh_interval", "0.05"),
                ],
            ),
            instance(
                "d",
                "3",
                &[
                    ("event.vendor.type", "webhooks,polling"),
                    ("ecwid.api.token", "secret_d"),
                ],
            ),
        ];
        let jobs = jobs(&all);
        assert_eq!(jobs.keys().collect::<Vec<_>>(), ["2", "3"]);
        let two = &jobs["2"];
        assert_eq!(two.token, "secret_b");
        assert_eq!(
            two.entities,
            [PollEntity::Orders, PollEntity::Products].into()
        );
        assert_eq!(two.interval, Duration::from_secs(3));
        assert!(
            !two.skip_seen,
            "b polls only: a webhook must not hide a change from it"
        );
        assert!(jobs["3"].skip_seen);
        assert_eq!(jobs["3"].entities.len(), 6);
    }
}
