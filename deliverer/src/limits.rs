//! Per-instance limits across deliverer replicas: `event.notification.max.in.flight` (requests
//! in flight at once) and `event.notification.rate.limit` (requests per second), each for all
//! replicas together.
//!
//! No delivery asks NATS anything. Replicas announce themselves in [`DELIVERERS_BUCKET`] (a put
//! every [`HEARTBEAT`], removed on a graceful stop), each follows the bucket with a watch and
//! counts the replicas whose entry it saw put within [`FORGET_AFTER`], R, and enforces its share
//! locally: the in-flight limit split evenly, the remainder going to some replicas (a
//! different some for each instance), so the shares add up to the limit exactly and a replica's
//! share may be 0; and a token bucket of `rate / R` per second. A replica that joins waits until
//! the others have counted it before it takes any message (they count it as soon as its entry
//! reaches them; it waits [`JOIN_WAIT`]).
//!
//! A delivery of the shared consumer that finds its instance at its in-flight limit waits here
//! for a slot ([`Waiting`]): in the instance's queue, oldest first, each slot that comes free
//! handed to the first in line (no NATS round trip, no polling). The first
//! `DELIVER_QUEUE_PER_INSTANCE` in line (and `DELIVER_QUEUE_TOTAL` for all instances together)
//! give their consumer slot back while they wait ([`Waiting::in_queue`]), so a busy instance
//! holds none of the slots the other instances' deliveries need; the worker decides what the
//! others do ([`crate::worker`]). A delivery that cannot wait (an ordered lane's, one whose
//! instance has a rate limit, or one whose share here is 0) is put back (NAK with a delay)
//! without spending an attempt. Under a rate limit the delay is the time until this replica's
//! next free token, and the put-backs queue up behind each other (1 / rate apart), so a backlog
//! does not come back all at once to be put back again.
//!
//! Bounds (the README's "Limits"): the total holds in steady state. After R grows, requests the
//! old replicas admitted under their larger share may still be in flight (at most the request
//! timeout); after a replica dies unannounced the others keep their smaller share until they
//! forget it ([`FORGET_AFTER`] after its last put). A replica frozen for longer than that is
//! forgotten and comes back with its old share until it counts again. Replicas that pull
//! unevenly leave part of the limit unused. Each token bucket holds up to max(1, rate / R / 10) tokens, so any
//! window of T seconds sees at most `rate × T` plus that burst per replica.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt as _;
use model::instance::Instance;
use prometheus::IntGauge;
use rand::Rng;
use shared::nats::{DEFERRALS_SUBJECT, DELIVERERS_BUCKET};
use shared::service::ServiceContext;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::deferrals::Deferrals;

/// How often a replica puts its entry again. Joins and graceful leaves reach the others at
/// once through their watch; this only bounds how long a replica that died unannounced is
/// counted ([`FORGET_AFTER`]), during which the others keep smaller shares than they could.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// How long a replica still counts another whose entry was not put again: two heartbeats and
/// some, so one late put does not make this replica take too large a share.
pub const FORGET_AFTER: Duration = Duration::from_secs(12);
/// How long a joining replica waits, when others are alive, before it takes its share. The
/// others follow the bucket and count it as soon as its entry arrives (milliseconds); this is
/// the margin for one whose watch is being re-established.
pub const JOIN_WAIT: Duration = Duration::from_millis(3_000);

/// How often the start-up looks for the replicas' bucket before it gives up.
const BUCKET_TRIES: u32 = 8;

/// Joins the deliverer replicas: this replica's [`Deferrals`] (listening before any message is
/// taken) and its [`Membership`] (announced, and counted by the others when this returns).
pub async fn join(
    ctx: &ServiceContext,
    gauge: IntGauge,
    cancel: &CancellationToken,
) -> Result<(Arc<Membership>, Arc<Deferrals>), crate::error::Error> {
    let failed = |what, name: &str, e: String| {
        crate::error::Error::Shared(shared::Error::Topology {
            what,
            name: name.to_owned(),
            message: e,
        })
    };
    let me = replica_id();
    let deferrals = Deferrals::start(me.clone(), ctx.client.clone(), cancel.clone())
        .await
        .map_err(|e| failed("subscription", DEFERRALS_SUBJECT, e.to_string()))?;
    // The topology set-up created the bucket, but NATS may be slow to answer right after it
    // (a server that is just starting, or just came back): ask again for a while.
    let mut wait = Duration::from_millis(200);
    let mut tries = 0;
    let kv = loop {
        match ctx.js.get_key_value(DELIVERERS_BUCKET).await {
            Ok(kv) => break kv,
            Err(e) if tries + 1 >= BUCKET_TRIES => {
                return Err(failed("key-value bucket", DELIVERERS_BUCKET, e.to_string()))
            }
            Err(error) => {
                tracing::warn!(%error, retry_in = ?wait, "The deliverer replicas' bucket is not there yet; retrying.");
            }
        }
        tries += 1;
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = cancel.cancelled() => return Err(crate::error::Error::Shared(shared::Error::Cancelled)),
        }
        wait = (wait * 2).min(Duration::from_secs(5));
    };
    let membership = Membership::join(kv, me, gauge, cancel).await;
    Ok((membership, deferrals))
}

/// A fresh replica id: a subject token and a KV key.
pub fn replica_id() -> String {
    format!("{:016x}", rand::rng().random::<u64>())
}

/// How many deliverer replicas are alive and this one's place among them (its rank in the
/// sorted ids), read together.
#[derive(Debug)]
pub struct View(AtomicU64);

impl View {
    pub fn new(replicas: u32, rank: u32) -> Self {
        Self(AtomicU64::new(pack(replicas, rank)))
    }

    fn set(&self, replicas: u32, rank: u32) -> u32 {
        unpack(self.0.swap(pack(replicas, rank), Ordering::Relaxed)).0
    }

    /// Live replicas (this one included) and this one's rank among them.
    pub fn get(&self) -> (u32, u32) {
        unpack(self.0.load(Ordering::Relaxed))
    }
}

/// This replica among the live deliverer replicas, refreshed every [`HEARTBEAT`].
#[derive(Debug)]
pub struct Membership {
    kv: kv::Store,
    me: String,
    view: Arc<View>,
    gauge: IntGauge,
    /// Replica id → when its entry was last put, as this replica saw it.
    seen: Mutex<HashMap<String, Instant>>,
    /// Whether the watch on the bucket is up; while it is not, nobody is forgotten.
    following: AtomicBool,
}

impl Membership {
    /// Announces replica `me`; when other replicas are alive, waits [`JOIN_WAIT`] so that they
    /// count it before it takes its share. Then keeps announcing and counting until `cancel`.
    pub async fn join(
        kv: kv::Store,
        me: String,
        gauge: IntGauge,
        cancel: &CancellationToken,
    ) -> Arc<Self> {
        let this = Arc::new(Self {
            kv,
            me,
            view: Arc::new(View::new(1, 0)),
            gauge,
            seen: Mutex::new(HashMap::new()),
            following: AtomicBool::new(false),
        });
        // Follow the bucket before announcing: this replica's own entry coming back through the
        // watch then says that every earlier entry has been seen.
        let (caught_up, mut own_entry_seen) = tokio::sync::watch::channel(false);
        tokio::spawn(Arc::clone(&this).follow(caught_up, cancel.clone()));
        this.announce().await;
        let counted = tokio::time::timeout(JOIN_WAIT, own_entry_seen.wait_for(|seen| *seen))
            .await
            .is_ok_and(|r| r.is_ok());
        this.recount();
        // Not caught up leaves the count at 1, the largest share: wait as if others were alive.
        if !counted || this.replicas() > 1 {
            tracing::info!(
                replicas = this.replicas(),
                "Other deliverers are alive; waiting for them to count this one."
            );
            tokio::select! {
                () = tokio::time::sleep(JOIN_WAIT) => {}
                () = cancel.cancelled() => {}
            }
            this.recount();
        }
        let heart = Arc::clone(&this);
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(HEARTBEAT);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                tokio::select! {
                    _ = ticks.tick() => {
                        heart.announce().await;
                        heart.recount();
                    }
                    () = cancel.cancelled() => break,
                }
            }
        });
        this
    }

    async fn announce(&self) {
        if let Err(error) = self.kv.put(&self.me, self.me.clone().into()).await {
            tracing::warn!(%error, "Could not announce this deliverer replica.");
        }
    }

    /// Follows the bucket (each entry as it is put or removed; the current ones first) until
    /// `cancel`, following it again when the watch fails. Says on `caught_up` when this
    /// replica's own entry came by.
    async fn follow(
        self: Arc<Self>,
        caught_up: tokio::sync::watch::Sender<bool>,
        cancel: CancellationToken,
    ) {
        loop {
            match self.kv.watch_with_history(">").await {
                Ok(mut entries) => loop {
                    let next = tokio::select! {
                        e = entries.next() => e,
                        () = cancel.cancelled() => return,
                    };
                    match next {
                        Some(Ok(entry)) => {
                            self.following.store(true, Ordering::Release);
                            let now = Instant::now();
                            {
                                let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
                                match entry.operation {
                                    kv::Operation::Put => {
                                        seen.insert(entry.key.clone(), now);
                                    }
                                    kv::Operation::Delete | kv::Operation::Purge => {
                                        seen.remove(&entry.key);
                                    }
                                }
                            }
                            if entry.key == self.me {
                                caught_up.send_replace(true);
                            }
                            self.recount();
                        }
                        Some(Err(error)) => {
                            tracing::warn!(%error, "Lost the deliverer replicas' bucket; following it again.");
                            break;
                        }
                        None => break,
                    }
                },
                Err(error) => {
                    tracing::warn!(%error, "Cannot follow the deliverer replicas' bucket; retrying.");
                }
            }
            // While not following, nobody is forgotten: counting too few is the unsafe side.
            self.following.store(false, Ordering::Release);
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = cancel.cancelled() => return,
            }
        }
    }

    /// Counts the replicas heard from within [`FORGET_AFTER`] (all known ones while the watch is
    /// down), this one included, and this one's rank among them.
    fn recount(&self) {
        let mut ids = {
            let now = Instant::now();
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            seen.insert(self.me.clone(), now);
            if self.following.load(Ordering::Acquire) {
                seen.retain(|_, at| now.saturating_duration_since(*at) < FORGET_AFTER);
            }
            seen.keys().cloned().collect::<Vec<_>>()
        };
        ids.sort_unstable();
        let rank = ids.iter().position(|id| *id == self.me).unwrap_or(0);
        let replicas = ids.len();
        let before = self.view.set(clamp_u32(replicas), clamp_u32(rank));
        if before != clamp_u32(replicas) {
            tracing::info!(replicas, "Deliverer replicas counted.");
        }
        self.gauge.set(i64::try_from(replicas).unwrap_or(i64::MAX));
    }

    /// What this replica counted, for [`InstanceLimits`].
    pub fn view(&self) -> Arc<View> {
        Arc::clone(&self.view)
    }

    fn replicas(&self) -> u32 {
        self.view.get().0
    }

    /// Removes this replica's entry (graceful shutdown, after the last delivery), so the others
    /// take its share at their next heartbeat instead of after the entry expires.
    pub async fn leave(&self) {
        if let Err(error) = self.kv.purge(&self.me).await {
            tracing::warn!(%error, "Could not remove this deliverer replica's entry.");
        }
    }
}

fn clamp_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn pack(replicas: u32, rank: u32) -> u64 {
    (u64::from(replicas) << 32) | u64::from(rank)
}

fn unpack(v: u64) -> (u32, u32) {
    ((v >> 32) as u32, v as u32)
}

/// This replica's share of an in-flight `limit` among `replicas`, where it has rank `rank`:
/// `limit / replicas`, plus one for `limit % replicas` of the replicas, chosen by rotating the
/// ranks by `spread` (a hash of the instance), so that small limits do not all land on the
/// replica that sorts first. The shares of all ranks add up to `limit`. Pure.
pub fn share(limit: u32, replicas: u32, rank: u32, spread: u32) -> u32 {
    let replicas = replicas.max(1);
    let base = limit / replicas;
    let extra = limit % replicas;
    let place = (rank % replicas + spread % replicas) % replicas;
    base + u32::from(place < extra)
}

/// A cheap, stable hash of an instance id (FNV-1a), to spread remainders.
fn spread(instance_id: &str) -> u32 {
    instance_id.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// One instance's state in this replica.
#[derive(Debug)]
struct Entry {
    /// The instance id, shared with its slots.
    key: Arc<str>,
    in_flight: u32,
    /// The instance's `max.in.flight` at its last admission, for the slots handed on.
    max_in_flight: u32,
    spread: u32,
    tokens: f64,
    refilled: Instant,
    /// When the next put-back under the rate limit is asked to come back.
    next_ticket: Instant,
    /// Deliveries waiting here for a slot, oldest first.
    waiting: VecDeque<oneshot::Sender<InstanceSlot>>,
}

impl Entry {
    fn share(&self, view: &View) -> u32 {
        let (replicas, rank) = view.get();
        share(self.max_in_flight, replicas, rank, self.spread)
    }
}

/// Why a delivery was put back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// This replica's share of `max.in.flight` is taken.
    InFlight,
    /// This replica's share of `rate.limit` is spent for now.
    Rate,
}

impl Busy {
    /// The `reason` label of `ecwid_deliver_deferred_total`.
    pub fn label(self) -> &'static str {
        match self {
            Busy::InFlight => "instance_in_flight",
            Busy::Rate => "instance_rate",
        }
    }
}

/// How many deliveries may wait here for their instance's slot without holding a consumer slot:
/// `DELIVER_QUEUE_PER_INSTANCE` and `DELIVER_QUEUE_TOTAL`.
#[derive(Debug, Clone, Copy)]
pub struct Park {
    pub per_instance: usize,
    pub total: usize,
}

/// A delivery in its instance's queue. The slot arrives on `slot` when it is this one's turn;
/// dropping `slot` leaves the queue (a slot already on its way is handed on).
#[derive(Debug)]
pub struct Waiting {
    pub slot: oneshot::Receiver<InstanceSlot>,
    /// Within the queue's bounds: it may give its consumer slot back while it waits. Otherwise
    /// it waits behind them holding it, briefly ([`model::retry::QUEUE_WAIT`]).
    pub in_queue: bool,
}

/// No slot now.
#[derive(Debug)]
pub enum Refused {
    /// Put the delivery back, for this long.
    Busy(Busy, Duration),
    /// Wait here for a slot.
    Wait(Waiting),
}

/// A request slot of one instance; dropping it frees the slot, or hands it to the first
/// delivery waiting for one.
#[derive(Debug)]
pub struct InstanceSlot(Option<(Arc<Shared>, Arc<str>)>);

impl Drop for InstanceSlot {
    fn drop(&mut self) {
        if let Some((shared, key)) = self.0.take() {
            shared.release(&key);
        }
    }
}

/// What the slots reach back to.
#[derive(Debug)]
struct Shared {
    view: Arc<View>,
    entries: Mutex<Entries>,
}

#[derive(Debug, Default)]
struct Entries {
    by_instance: HashMap<Arc<str>, Entry>,
    /// Deliveries waiting, all instances.
    waiting: usize,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn release(self: &Arc<Self>, key: &str) {
        let mut entries = self.lock();
        let Entries {
            by_instance,
            waiting,
        } = &mut *entries;
        if let Some(entry) = by_instance.get_mut(key) {
            entry.in_flight = entry.in_flight.saturating_sub(1);
            self.hand_on(entry, waiting);
        }
    }

    /// Hands free slots of `entry` to the deliveries waiting for one, oldest first; those that
    /// stopped waiting are dropped from the queue.
    fn hand_on(self: &Arc<Self>, entry: &mut Entry, waiting: &mut usize) {
        let share = entry.share(&self.view);
        while entry.in_flight < share {
            let Some(next) = entry.waiting.pop_front() else {
                break;
            };
            *waiting = waiting.saturating_sub(1);
            entry.in_flight += 1;
            let slot = InstanceSlot(Some((Arc::clone(self), Arc::clone(&entry.key))));
            if let Err(mut slot) = next.send(slot) {
                // Nobody took it: the count goes back here, not through its drop (this lock).
                slot.0 = None;
                entry.in_flight -= 1;
            }
        }
    }
}

/// The per-instance limits of this replica: its shares, sized by the [`View`] of
/// [`Membership`], and the deliveries waiting for a slot.
#[derive(Debug)]
pub struct InstanceLimits {
    shared: Arc<Shared>,
}

impl InstanceLimits {
    pub fn new(view: Arc<View>) -> Self {
        Self {
            shared: Arc::new(Shared {
                view,
                entries: Mutex::new(Entries::default()),
            }),
        }
    }

    /// A slot to send to `instance` now, or a place in its queue (when `park` allows one), or
    /// why not and how long to put the delivery back for. `deferrals` is how often this message
    /// was put back already (the busy wait doubles).
    pub fn admit(
        &self,
        instance_id: &str,
        instance: &Instance,
        deferrals: u64,
        park: Option<Park>,
    ) -> Result<InstanceSlot, Refused> {
        self.admit_with(
            instance_id,
            instance.max_in_flight(),
            instance.rate_limit(),
            deferrals,
            park,
        )
    }

    fn admit_with(
        &self,
        instance_id: &str,
        max_in_flight: u32,
        rate: Option<f64>,
        deferrals: u64,
        park: Option<Park>,
    ) -> Result<InstanceSlot, Refused> {
        let (replicas, _) = self.shared.view.get();
        let now = Instant::now();
        let mut entries = self.shared.lock();
        let Entries {
            by_instance,
            waiting,
        } = &mut *entries;
        // No allocation once the instance is known.
        if !by_instance.contains_key(instance_id) {
            let key: Arc<str> = Arc::from(instance_id);
            by_instance.insert(
                Arc::clone(&key),
                Entry {
                    key,
                    in_flight: 0,
                    max_in_flight,
                    spread: spread(instance_id),
                    tokens: 1.0,
                    refilled: now,
                    next_ticket: now,
                    waiting: VecDeque::new(),
                },
            );
        }
        let Some(entry) = by_instance.get_mut(instance_id) else {
            return Err(Refused::Busy(Busy::InFlight, busy_wait(deferrals)));
        };
        entry.max_in_flight = max_in_flight;
        // The share may have grown (a replica left, the limit was raised) with deliveries
        // waiting: theirs first.
        self.shared.hand_on(entry, waiting);
        let share = entry.share(&self.shared.view);
        if entry.in_flight >= share || !entry.waiting.is_empty() {
            // Waiting only ends with a slot: not where the share is 0 (the other replicas send
            // this instance's deliveries), nor under a rate limit (its put-backs are spaced by
            // the tokens).
            if let Some(park) = park.filter(|_| share > 0 && rate.is_none()) {
                if entry.waiting.len() >= park.per_instance {
                    let before = entry.waiting.len();
                    entry.waiting.retain(|w| !w.is_closed());
                    *waiting = waiting.saturating_sub(before - entry.waiting.len());
                }
                let in_queue = entry.waiting.len() < park.per_instance && *waiting < park.total;
                let (tx, rx) = oneshot::channel();
                entry.waiting.push_back(tx);
                *waiting += 1;
                return Err(Refused::Wait(Waiting { slot: rx, in_queue }));
            }
            return Err(Refused::Busy(Busy::InFlight, busy_wait(deferrals)));
        }
        if let Some(rate) = rate {
            let per_second = rate / f64::from(replicas.max(1));
            let capacity = (per_second / 10.0).max(1.0);
            let elapsed = now.saturating_duration_since(entry.refilled).as_secs_f64();
            entry.tokens = (entry.tokens + elapsed * per_second).min(capacity);
            entry.refilled = now;
            if entry.tokens < 1.0 {
                // Put-backs are spaced at the whole rate, not this replica's share: they come
                // back to any replica, and one that pulled more than its part (replicas pull
                // unevenly) would otherwise hold its backlog to its share alone.
                let interval = Duration::from_secs_f64(1.0 / rate);
                let token_free = now + Duration::from_secs_f64((1.0 - entry.tokens) / per_second);
                let ticket = token_free.max(entry.next_ticket);
                entry.next_ticket = (ticket + interval).min(now + model::retry::RATE_WAIT_MAX);
                let wait =
                    (ticket - now).clamp(model::retry::RATE_WAIT_MIN, model::retry::RATE_WAIT_MAX);
                // Later, never earlier, than the token: a little spread so the queue does not
                // arrive in step.
                let stretch = rand::rng().random_range(0.0..0.2) * interval.as_secs_f64();
                return Err(Refused::Busy(
                    Busy::Rate,
                    wait + Duration::from_secs_f64(stretch),
                ));
            }
            entry.tokens -= 1.0;
        }
        entry.in_flight += 1;
        Ok(InstanceSlot(Some((
            Arc::clone(&self.shared),
            Arc::clone(&entry.key),
        ))))
    }

    /// For a delivery that has waited a while: hands on slots the share gained since (a replica
    /// left), and says whether waiting can still end here (this replica's share of the
    /// instance is not 0: a replica that joined may have taken it).
    pub fn can_wait(&self, instance_id: &str) -> bool {
        let mut entries = self.shared.lock();
        let Entries {
            by_instance,
            waiting,
        } = &mut *entries;
        let Some(entry) = by_instance.get_mut(instance_id) else {
            return false;
        };
        self.shared.hand_on(entry, waiting);
        entry.share(&self.shared.view) > 0
    }
}

/// The put-back of a delivery whose instance has no free slot here, after `deferrals` earlier
/// put-backs: [`model::retry::BUSY_WAIT_MIN`] doubling to [`model::retry::BUSY_WAIT_MAX`], ±20 %.
pub fn busy_wait(deferrals: u64) -> Duration {
    let doublings = u32::try_from(deferrals.min(8)).unwrap_or(8);
    model::retry::jitter(
        (model::retry::BUSY_WAIT_MIN * (1 << doublings)).min(model::retry::BUSY_WAIT_MAX),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(replicas: u32, rank: u32) -> (InstanceLimits, Arc<View>) {
        let view = Arc::new(View::new(replicas, rank));
        (InstanceLimits::new(Arc::clone(&view)), view)
    }

    #[test]
    fn shares_add_up_to_the_limit() {
        for limit in [1, 2, 3, 5, 16, 1000] {
            for replicas in 1..=7 {
                for spread in [0, 1, 2, 12345] {
                    let total: u32 = (0..replicas)
                        .map(|rank| share(limit, replicas, rank, spread))
                        .sum();
                    assert_eq!(total, limit, "limit {limit}, {replicas} replicas");
                    for rank in 0..replicas {
                        let s = share(limit, replicas, rank, spread);
                        assert!(s == limit / replicas || s == limit / replicas + 1);
                    }
                }
            }
        }
        // Small limits land on different replicas for different instances.
        let holders = |spread| {
            (0..3)
                .filter(|&r| share(1, 3, r, spread) == 1)
                .collect::<Vec<_>>()
        };
        assert_ne!(holders(0), holders(1));
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_holds_this_replicas_share_and_follows_the_count() {
        let (l, view) = limits(1, 0);
        let mut slots: Vec<_> = (0..4)
            .map(|_| {
                l.admit_with("i", 4, None, 0, None)
                    .expect("within the limit")
            })
            .collect();
        let Err(Refused::Busy(Busy::InFlight, wait)) = l.admit_with("i", 4, None, 0, None) else {
            panic!("the fifth is put back");
        };
        assert!(wait <= model::retry::BUSY_WAIT_MIN.mul_f64(1.2));
        assert!(
            l.admit_with("other", 4, None, 0, None).is_ok(),
            "instances are apart"
        );
        // Two replicas now: this one's share is 2, and it is over it until two finish.
        view.set(2, 0);
        slots.truncate(2);
        assert!(
            l.admit_with("i", 4, None, 0, None).is_err(),
            "2 of 2 in flight"
        );
        slots.truncate(1);
        slots.push(
            l.admit_with("i", 4, None, 0, None)
                .expect("1 of 2 in flight"),
        );
        assert!(l.admit_with("i", 4, None, 0, None).is_err());
        // Three replicas: 4 splits 2, 1, 1; ranked where the share is 1, two in flight is over.
        let spread = spread("i");
        view.set(
            3,
            (0..3).find(|&r| share(4, 3, r, spread) == 1).unwrap_or(0),
        );
        assert!(
            l.admit_with("i", 4, None, 0, None).is_err(),
            "over a share of 1"
        );
        drop(slots);
        let _again = l.admit_with("i", 4, None, 0, None).expect("a freed slot");
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_limit_spaces_requests_and_queues_the_put_backs() {
        // 5/s across two replicas: 2.5/s here, a burst of one.
        let (l, _) = limits(2, 1);
        let mut admitted = 0;
        let mut waits = Vec::new();
        for _ in 0..5 {
            match l.admit_with("i", 100, Some(5.0), 0, None) {
                Ok(_) => admitted += 1,
                Err(Refused::Busy(Busy::Rate, wait)) => waits.push(wait),
                Err(other) => panic!("{other:?}"),
            }
        }
        assert_eq!(admitted, 1, "a burst of one token");
        // The first put-back waits for this replica's next token (0.4 s), each further one
        // 1 / rate (0.2 s) later, stretched by at most a fifth of that, never earlier.
        for (i, wait) in waits.iter().enumerate() {
            let due = 0.4 + 0.2 * i as f64;
            let secs = wait.as_secs_f64();
            assert!(
                secs >= due - 1e-6 && secs <= due + 0.04 + 1e-6,
                "{i}: {wait:?}"
            );
        }
        // Over 10 s no more than 2.5/s get through here.
        let mut count = 0;
        for _ in 0..1000 {
            tokio::time::advance(Duration::from_millis(10)).await;
            if l.admit_with("i", 100, Some(5.0), 0, None).is_ok() {
                count += 1;
            }
        }
        assert!((24..=26).contains(&count), "{count} in 10 s");
    }

    const PARK: Park = Park {
        per_instance: 2,
        total: 3,
    };

    fn wait(refused: Result<InstanceSlot, Refused>) -> Waiting {
        match refused {
            Err(Refused::Wait(waiting)) => waiting,
            other => panic!("expected a place in the queue: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_freed_slot_goes_to_the_first_in_line() {
        let (l, _) = limits(1, 0);
        let first = l
            .admit_with("i", 1, None, 0, Some(PARK))
            .expect("a free slot");
        let mut a = wait(l.admit_with("i", 1, None, 0, Some(PARK)));
        let b = wait(l.admit_with("i", 1, None, 0, Some(PARK)));
        let c = wait(l.admit_with("i", 1, None, 0, Some(PARK)));
        // Two in the queue proper; the third waits behind them (holding its consumer slot).
        assert!(a.in_queue && b.in_queue && !c.in_queue);
        // The queue is the total's too: another instance's first waiter is within it (3).
        let _other = l.admit_with("j", 1, None, 0, Some(PARK)).expect("free");
        let d = wait(l.admit_with("j", 1, None, 0, Some(PARK)));
        assert!(!d.in_queue, "the total is reached");
        assert!(a.slot.try_recv().is_err(), "no slot yet");
        // A lane's delivery (no parking) does not jump the queue either.
        assert!(matches!(
            l.admit_with("i", 1, None, 0, None),
            Err(Refused::Busy(Busy::InFlight, _))
        ));
        // `b` stops waiting; the freed slot goes to `a`, the next one past `b` to `c`.
        drop(b);
        drop(first);
        let a_slot = a.slot.await.expect("a's turn");
        drop(a_slot);
        let _c_slot = c.slot.await.expect("c's turn, b skipped");
        assert!(matches!(
            l.admit_with("i", 1, None, 0, Some(PARK)),
            Err(Refused::Wait(_))
        ));
    }

    #[tokio::test]
    async fn no_waiting_where_it_cannot_end() {
        // Three replicas share 1: two of them hold a share of 0 and put the delivery back.
        let spread = spread("i");
        let zero = (0..3).find(|&r| share(1, 3, r, spread) == 0).unwrap_or(0);
        let (l, view) = limits(3, zero);
        assert!(matches!(
            l.admit_with("i", 1, None, 0, Some(PARK)),
            Err(Refused::Busy(Busy::InFlight, _))
        ));
        // A rate-limited instance is put back for its token, not queued.
        let (r, _) = limits(1, 0);
        let _slot = r
            .admit_with("k", 1, Some(100.0), 0, Some(PARK))
            .expect("free");
        assert!(matches!(
            r.admit_with("k", 1, Some(100.0), 0, Some(PARK)),
            Err(Refused::Busy(Busy::InFlight, _))
        ));
        // One waiting when its share drops to 0 is told to stop waiting; when it comes back,
        // the free slot is handed on.
        view.set(1, 0);
        let held = l.admit_with("i", 1, None, 0, Some(PARK)).expect("free");
        let mut waiting = wait(l.admit_with("i", 1, None, 0, Some(PARK)));
        view.set(3, zero);
        assert!(!l.can_wait("i"));
        drop(held);
        assert!(waiting.slot.try_recv().is_err(), "no share, no slot");
        view.set(1, 0);
        assert!(l.can_wait("i"));
        assert!(
            waiting.slot.try_recv().is_ok(),
            "handed on once the share is back"
        );
    }

    #[test]
    fn busy_waits_grow_and_stop_growing() {
        let first = busy_wait(0);
        assert!(
            first >= model::retry::BUSY_WAIT_MIN.mul_f64(0.8)
                && first <= model::retry::BUSY_WAIT_MIN.mul_f64(1.2)
        );
        assert!(busy_wait(1) >= model::retry::BUSY_WAIT_MIN.mul_f64(1.6));
        assert!(busy_wait(1_000) <= model::retry::BUSY_WAIT_MAX.mul_f64(1.2));
        assert!(busy_wait(1_000) >= model::retry::BUSY_WAIT_MAX.mul_f64(0.8));
    }
}
