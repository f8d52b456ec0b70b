//! Callback health shared by every deliverer replica ([`model::health::CallbackHealth`] in
//! `ECWID_CALLBACKS`): the circuit breaker per callback URL, its consecutive failures, the last
//! success and failure, and success counts per minute.
//!
//! Reads come from the live copy (a KV watch), so admitting a request costs no round trip.
//! Writes are compare-and-set: every failure, every breaker change, and at most one success
//! per URL each [`FLUSH_EVERY`] (successes of a healthy URL are counted in memory and written
//! with the next write, so a busy URL costs one KV write per replica per interval). A replica
//! writes one URL's health one change at a time (its requests queue for their [`Turn`]), so
//! compare-and-set only ever races other replicas: hundreds of requests failing at once no
//! longer race each other out of tries. When NATS cannot take a write, the change is kept in
//! this replica's copy and the delivery goes on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use model::health::{callback_key, Admit, Breaker, CallbackHealth, Counts};
use model::time_fmt::now_unix_ms;
use prometheus::{IntCounterVec, IntGauge};
use shared::kvwatch::KvView;
use tokio_util::sync::CancellationToken;

/// How often a healthy URL's success counts are written.
pub const FLUSH_EVERY: Duration = Duration::from_secs(10);
/// Compare-and-set tries before a write gives up (and keeps the change in memory).
const CAS_TRIES: usize = 8;

/// What [`Callbacks::admit`] let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    /// The breaker is closed.
    Request,
    /// The one request that tests a URL whose cool-down is over (its breaker now half open).
    Probe,
}

/// What this replica has not written yet for one URL.
#[derive(Debug, Default, Clone, Copy)]
struct Unwritten {
    counts: Counts,
    last_success_ms: Option<i64>,
    last_write_ms: i64,
}

#[derive(Debug)]
pub struct Callbacks {
    kv: kv::Store,
    view: KvView<CallbackHealth>,
    unwritten: Mutex<HashMap<String, Unwritten>>,
    /// The URLs this replica is writing, each with the queue of its requests waiting to.
    writers: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    failures_to_open: u32,
    cooldown: Duration,
    /// How long the replica that takes a probe holds it (the longest an attempt can take).
    probe_lease: Duration,
    transitions: IntCounterVec,
}

impl Callbacks {
    pub fn new(
        kv: kv::Store,
        failures_to_open: u32,
        cooldown: Duration,
        probe_lease: Duration,
        open_gauge: IntGauge,
        transitions: IntCounterVec,
    ) -> Self {
        let view = KvView::with_hook({
            let open = Arc::new(Mutex::new(std::collections::HashSet::new()));
            move |key: &str, _old: Option<&CallbackHealth>, new: Option<&CallbackHealth>| {
                let mut open = open.lock().unwrap_or_else(|p| p.into_inner());
                if new.is_some_and(|h| h.breaker != Breaker::Closed) {
                    open.insert(key.to_owned());
                } else {
                    open.remove(key);
                }
                open_gauge.set(open.len() as i64);
            }
        });
        Self {
            kv,
            view,
            unwritten: Mutex::new(HashMap::new()),
            writers: Mutex::new(HashMap::new()),
            failures_to_open,
            cooldown,
            probe_lease,
            transitions,
        }
    }

    /// Follows the bucket and writes success counts every [`FLUSH_EVERY`], until `cancel`.
    pub fn spawn(self: &Arc<Self>, cancel: CancellationToken) {
        self.view.spawn_follow(self.kv.clone(), cancel.clone());
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FLUSH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    _ = tick.tick() => this.flush(now_unix_ms()).await,
                }
            }
        });
    }

    fn probe_wait(&self) -> Duration {
        (self.cooldown / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// Whether a request to `url` may go now; `Err(wait)` when its breaker holds it. A replica
    /// that finds the cool-down over tries to take the probe (one replica wins).
    pub async fn admit(&self, url: &str) -> Result<Admitted, Duration> {
        let key = callback_key(url);
        let now = now_unix_ms();
        let current = self.view.get(&key).map(|(h, _)| h).unwrap_or_default();
        match current.admit(now, self.probe_wait()) {
            Admit::Go => Ok(Admitted::Request),
            Admit::Wait(wait) => Err(wait),
            Admit::Probe => {
                let turn = self.turn(&key).await;
                // Another request of this replica may have taken the probe while this one queued.
                let current = self.view.get(&key).map(|(h, _)| h).unwrap_or_default();
                if !matches!(current.admit(now, Duration::ZERO), Admit::Probe) {
                    return Err(self.probe_wait());
                }
                let lease = self.probe_lease;
                let taken = self
                    .change_in_turn(&turn, |h| match h.admit(now, Duration::ZERO) {
                        Admit::Probe => {
                            h.take_probe(now, lease);
                            true
                        }
                        _ => false,
                    })
                    .await;
                if taken {
                    self.transitions.with_label_values(&["half_open"]).inc();
                    Ok(Admitted::Probe)
                } else {
                    Err(self.probe_wait())
                }
            }
        }
    }

    /// A request [`Callbacks::admit`] let through was not sent after all: if it was the probe,
    /// the next request may probe instead (a probe whose result never comes would hold the
    /// URL's events until the lease ends). Any other request gives nothing back: the half-open
    /// state it may find is another request's probe.
    pub async fn not_sent(&self, url: &str, admitted: Admitted) {
        if admitted != Admitted::Probe {
            return;
        }
        let key = callback_key(url);
        if self
            .view
            .get(&key)
            .is_some_and(|(h, _)| h.breaker == Breaker::HalfOpen)
        {
            self.change(&key, |h| {
                h.give_back_probe();
                true
            })
            .await;
        }
    }

    /// Records a request's result. Returns the URL's health after a failure (the caller checks
    /// it for auto-disable), `None` after a success.
    pub async fn record(&self, url: &str, result: Result<(), &str>) -> Option<CallbackHealth> {
        let key = callback_key(url);
        let now = now_unix_ms();
        match result {
            Ok(()) => {
                let healthy = self.view.get(&key).is_some_and(|(h, _)| {
                    h.breaker == Breaker::Closed && h.consecutive_failures == 0
                });
                {
                    let mut unwritten = self.unwritten.lock().unwrap_or_else(|p| p.into_inner());
                    let u = unwritten.entry(key.clone()).or_default();
                    u.counts.ok += 1;
                    u.last_success_ms = Some(now);
                    if healthy && now - u.last_write_ms < FLUSH_EVERY.as_millis() as i64 {
                        return None;
                    }
                }
                let closes = self
                    .change(&key, |h| {
                        let was = h.breaker;
                        h.succeeded(now);
                        was != Breaker::Closed
                    })
                    .await;
                if closes {
                    self.transitions.with_label_values(&["closed"]).inc();
                }
                None
            }
            Err(error) => {
                let (failures_to_open, cooldown) = (self.failures_to_open, self.cooldown);
                let opens = self
                    .change(&key, |h| {
                        h.add_counts(now, Counts { ok: 0, failed: 1 });
                        h.failed(now, error, failures_to_open, cooldown)
                    })
                    .await;
                if opens {
                    self.transitions.with_label_values(&["open"]).inc();
                }
                self.view.get(&key).map(|(h, _)| h)
            }
        }
    }

    /// Writes the success counts of every URL that has some.
    async fn flush(&self, now: i64) {
        let keys: Vec<String> = {
            let unwritten = self.unwritten.lock().unwrap_or_else(|p| p.into_inner());
            unwritten
                .iter()
                .filter(|(_, u)| u.counts != Counts::default())
                .map(|(k, _)| k.clone())
                .collect()
        };
        for key in keys {
            self.change(&key, |_| true).await;
        }
        // Forget URLs idle for a while, so the map stays the size of the busy ones.
        let mut unwritten = self.unwritten.lock().unwrap_or_else(|p| p.into_inner());
        unwritten.retain(|_, u| {
            u.counts != Counts::default()
                || now - u.last_write_ms < 6 * FLUSH_EVERY.as_millis() as i64
        });
    }

    /// Waits until no other request of this replica is writing `key`'s health.
    async fn turn(&self, key: &str) -> Turn<'_> {
        let writer = {
            let mut writers = self.writers.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(writers.entry(key.to_owned()).or_default())
        };
        Turn {
            writers: &self.writers,
            key: key.to_owned(),
            _held: writer.lock_owned().await,
        }
    }

    /// [`Callbacks::change_in_turn`] once this request's turn to write `key` has come.
    async fn change(&self, key: &str, f: impl FnMut(&mut CallbackHealth) -> bool) -> bool {
        let turn = self.turn(key).await;
        self.change_in_turn(&turn, f).await
    }

    /// Applies `f` to the stored health of the turn's key (with this replica's unwritten counts
    /// added) and writes it by compare-and-set, reading again when another replica wrote first.
    /// `f` returns its verdict (whether the change it made matters to the caller); what it
    /// leaves unchanged is not written. Without NATS, the change lands in this replica's copy
    /// only.
    async fn change_in_turn(
        &self,
        turn: &Turn<'_>,
        mut f: impl FnMut(&mut CallbackHealth) -> bool,
    ) -> bool {
        let key = turn.key.as_str();
        let now = now_unix_ms();
        let pending = {
            let mut unwritten = self.unwritten.lock().unwrap_or_else(|p| p.into_inner());
            let u = unwritten.entry(key.to_owned()).or_default();
            let taken = *u;
            u.counts = Counts::default();
            u.last_write_ms = now;
            taken
        };
        let apply = |h: &mut CallbackHealth, f: &mut dyn FnMut(&mut CallbackHealth) -> bool| {
            h.add_counts(now, pending.counts);
            if let Some(at) = pending.last_success_ms {
                h.last_success_at_ms = Some(h.last_success_at_ms.unwrap_or(0).max(at));
            }
            f(h)
        };
        for _ in 0..CAS_TRIES {
            let (mut health, revision) = match self.kv.entry(key).await {
                Ok(Some(e)) if e.operation == kv::Operation::Put => (
                    serde_json::from_slice::<CallbackHealth>(&e.value).unwrap_or_default(),
                    e.revision,
                ),
                Ok(Some(e)) => (CallbackHealth::default(), e.revision),
                Ok(None) => (CallbackHealth::default(), 0),
                Err(error) => {
                    tracing::warn!(%error, "Callback health unreadable; keeping the change in this replica only.");
                    return self.local_change(key, &mut f, apply);
                }
            };
            let read = health.clone();
            let verdict = apply(&mut health, &mut f);
            if revision != 0 && health == read {
                // Nothing to write (a probe another replica holds, counts already written).
                self.view.note(key, Some(health), revision);
                return verdict;
            }
            let Ok(value) = serde_json::to_vec(&health) else {
                return verdict;
            };
            let written = if revision == 0 {
                self.kv
                    .create(key, Bytes::from(value))
                    .await
                    .map_err(|e| e.kind() == kv::CreateErrorKind::AlreadyExists)
            } else {
                self.kv
                    .update(key, Bytes::from(value), revision)
                    .await
                    .map_err(|e| e.kind() == kv::UpdateErrorKind::WrongLastRevision)
            };
            match written {
                Ok(revision) => {
                    self.view.note(key, Some(health), revision);
                    return verdict;
                }
                // Another replica wrote first: read its value and apply ours to it.
                Err(true) => continue,
                Err(false) => {
                    tracing::warn!(
                        "Callback health not writable; keeping the change in this replica only."
                    );
                    return self.local_change(key, &mut f, apply);
                }
            }
        }
        tracing::warn!(
            "Callback health kept changing under this replica; keeping the change locally."
        );
        self.local_change(key, &mut f, apply)
    }

    fn local_change(
        &self,
        key: &str,
        f: &mut dyn FnMut(&mut CallbackHealth) -> bool,
        apply: impl Fn(&mut CallbackHealth, &mut dyn FnMut(&mut CallbackHealth) -> bool) -> bool,
    ) -> bool {
        let (mut health, revision) = self.view.get(key).unwrap_or_default();
        let verdict = apply(&mut health, f);
        self.view.note(key, Some(health), revision);
        verdict
    }
}

/// One request's turn to write a URL's health ([`Callbacks::turn`]); the next waiting request
/// gets it when this drops, and the last one out forgets the URL.
struct Turn<'a> {
    writers: &'a Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    key: String,
    _held: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut writers = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        // Held by the map and by this turn only: nobody is waiting.
        if writers
            .get(&self.key)
            .is_some_and(|w| Arc::strong_count(w) == 2)
        {
            writers.remove(&self.key);
        }
    }
}
