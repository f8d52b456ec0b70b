//! Which entity versions webhooks already brought, for the dedupe rule (README, "Webhooks and
//! polling"): a polled change is not stored again when a webhook about the same entity, at least
//! as new, was received.
//!
//! Read from the webhooks themselves: each store's raw messages in `ECWID_RAW`
//! (`ecwid.raw.<storeId>`, one subject per store), read once, in order, by the replica that polls
//! the store, and kept in memory as entity → newest webhook time. Nothing is written per event
//! (a key per changed entity in a bucket, as before, tied nats-server's memory to the number of
//! entities changed in a week).
//!
//! The read starts at the oldest window the replica is asked about, but never further back than
//! [`Sightings::max_age`] (`POLLER_SIGHTINGS_MAX_AGE`), which also bounds what is kept; a polled
//! change older than that is stored even if a webhook brought it (a receiver may see it twice,
//! as after any missed sighting). Best effort: when `ECWID_RAW` cannot be read the change is
//! stored.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt as _;
use model::ecwid::Format;
use shared::nats::{headers, raw_subject, RAW_STREAM};
use tokio::sync::Mutex;

/// How long a read of one store's new webhooks may take before this window goes without it.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Webhooks arrive a little after the change they announce, and Ecwid's clock is not ours: a
/// window is read from this long before its start.
const SKEW: i64 = 300;

/// The webhook sightings of the stores this replica polls.
#[derive(Debug)]
pub struct Sightings {
    js: jetstream::Context,
    max_age: Duration,
    stores: std::sync::Mutex<HashMap<String, Arc<Mutex<Store>>>>,
}

/// One store's sightings.
#[derive(Debug, Default)]
struct Store {
    /// `ECWID_RAW`'s next sequence to read; 0 before the first read.
    next_seq: u64,
    /// Unix seconds the sightings are complete from (read from then on).
    since: i64,
    /// (object type, object id) → the newest webhook's event time, unix seconds.
    seen: HashMap<(String, String), i64>,
    /// When entries older than `max_age` were last dropped.
    pruned: i64,
}

fn now_secs() -> i64 {
    model::time_fmt::now_unix_ms() / 1000
}

impl Sightings {
    pub fn new(js: jetstream::Context, max_age: Duration) -> Self {
        Self {
            js,
            max_age,
            stores: Default::default(),
        }
    }

    pub fn max_age(&self) -> Duration {
        self.max_age
    }

    fn store(&self, store: &str) -> Arc<Mutex<Store>> {
        let mut stores = self.stores.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(stores.entry(store.to_owned()).or_default())
    }

    /// Reads the store's webhooks received since the last read (from `from` − a margin the
    /// first time, or when `from` is older than what was read), then answers [`Seen`].
    pub async fn of(&self, store: &str, from: i64) -> Seen {
        let entry = self.store(store);
        let mut s = entry.lock_owned().await;
        let now = now_secs();
        let horizon = now - i64::try_from(self.max_age.as_secs()).unwrap_or(i64::MAX / 2);
        let start = (from - SKEW).max(horizon);
        if s.next_seq == 0 || start < s.since {
            *s = Store {
                since: start,
                pruned: now,
                ..Store::default()
            };
        }
        if now - s.pruned >= 60 {
            s.seen.retain(|_, at| *at >= horizon);
            s.since = s.since.max(horizon);
            s.pruned = now;
        }
        match tokio::time::timeout(READ_TIMEOUT, read(&self.js, store, &mut s)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::debug!(store_id = store, %error, "Could not read the store's webhooks; changes are stored without the sighting check.");
            }
            Err(_) => {
                tracing::debug!(
                    store_id = store,
                    "Reading the store's webhooks took too long; the rest is read next time."
                );
            }
        }
        Seen(s)
    }
}

/// A store's sightings, read up to now.
#[derive(Debug)]
pub struct Seen(tokio::sync::OwnedMutexGuard<Store>);

impl Seen {
    /// Whether a webhook about this entity, at least as new as `changed_at` (unix seconds), was
    /// received.
    pub fn since(&self, object_type: &str, object_id: &str, changed_at: i64) -> bool {
        changed_at >= self.0.since
            && self
                .0
                .seen
                .get(&(object_type.to_owned(), object_id.to_owned()))
                .is_some_and(|at| *at >= changed_at)
    }
}

/// Reads the store's raw messages from `s.next_seq` (or from `s.since` by time) to the stream's
/// end, keeping each v3 webhook's entity and event time.
async fn read(
    js: &jetstream::Context,
    store: &str,
    s: &mut Store,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let stream = js.get_stream(RAW_STREAM).await?;
    let deliver_policy = if s.next_seq > 0 {
        consumer::DeliverPolicy::ByStartSequence {
            start_sequence: s.next_seq,
        }
    } else {
        consumer::DeliverPolicy::ByStartTime {
            start_time: time::OffsetDateTime::from_unix_timestamp(s.since)?,
        }
    };
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: raw_subject(store),
            deliver_policy,
            ..Default::default()
        })
        .await?;
    if consumer.cached_info().num_pending == 0 {
        return Ok(());
    }
    let mut messages = consumer.messages().await?;
    while let Some(message) = messages.next().await {
        let message = message?;
        let info = message.info()?;
        s.next_seq = info.stream_sequence + 1;
        let pending = info.pending;
        note(s, &message);
        if pending == 0 {
            break;
        }
    }
    Ok(())
}

/// Keeps a v3 webhook's entity and event time; anything else (a polled change, an ION payload,
/// something unreadable) is not a sighting.
fn note(s: &mut Store, message: &jetstream::Message) {
    let h = message.headers.as_ref();
    let format = h.and_then(|h| h.get(headers::FORMAT)).map(|v| v.as_str());
    if Format::from_header(format).ok() != Some(Format::V3) {
        return;
    }
    let Ok(normalized) = model::normalize::normalize(Format::V3, &message.payload, None) else {
        return;
    };
    let Some(at_ms) = model::time_fmt::rfc3339_to_unix_ms(&normalized.event.date) else {
        return;
    };
    let at = at_ms / 1000;
    let event = normalized.event;
    let newest = s
        .seen
        .entry((event.object_type, event.object_id))
        .or_insert(at);
    *newest = (*newest).max(at);
}
