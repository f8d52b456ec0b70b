//! Acceptance order for ordered instances: the envelopes of an instance with ordered delivery
//! must be stored on its lane in the order the ingest accepted their events, which is the
//! `ECWID_RAW` stream sequence. The normalizer works on many raw messages at once (and runs as
//! several replicas), so two events of one store accepted a millisecond apart could otherwise be
//! stored the other way round, and the deliverer's lane would faithfully deliver them in that
//! wrong order.
//!
//! The rule: the ordered envelopes of raw message `seq` are published only once every raw
//! message of the same store with a lower sequence is done (acked: its envelopes are stored, or it
//! was dead-lettered or filtered). The normalizer consumer's ack floor says that for all stores at
//! once (every sequence at or below it is acked), and usually reaches `seq - 1` within
//! milliseconds. When it lags because of another store (a raw message waiting for a retry), a
//! direct read of the store's next raw message after the floor tells whether the same store has
//! anything pending in between. One task per process refreshes the floor while somebody waits,
//! so waiting costs the server a few requests a second, not one per waiter.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer};
use shared::nats::RAW_STREAM;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often the floor is read while somebody waits.
const FLOOR_REFRESH: Duration = Duration::from_millis(5);
/// How long a waiter trusts the floor alone before it checks its own store directly.
const STORE_CHECK_AFTER: Duration = Duration::from_millis(50);

/// The normalizer consumer's ack floor, shared by every message of this process that waits.
#[derive(Debug)]
pub struct Gate {
    js: jetstream::Context,
    floor: watch::Sender<u64>,
    waiters: AtomicUsize,
    wake: Notify,
}

impl Gate {
    /// Starts the floor refresher for `consumer` (the normalizer's), until `cancel` fires.
    pub fn start(
        js: jetstream::Context,
        consumer: PullConsumer,
        cancel: CancellationToken,
    ) -> Arc<Self> {
        let gate = Arc::new(Self {
            js,
            floor: watch::Sender::new(0),
            waiters: AtomicUsize::new(0),
            wake: Notify::new(),
        });
        let refresher = Arc::clone(&gate);
        tokio::spawn(async move { refresher.refresh(consumer, cancel).await });
        gate
    }

    async fn refresh(&self, consumer: PullConsumer, cancel: CancellationToken) {
        loop {
            if self.waiters.load(Ordering::SeqCst) == 0 {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = self.wake.notified() => {}
                }
            }
            match tokio::time::timeout(Duration::from_secs(2), consumer.get_info()).await {
                Ok(Ok(info)) => {
                    let floor = info.ack_floor.stream_sequence;
                    self.floor.send_if_modified(|f| {
                        let newer = floor > *f;
                        *f = (*f).max(floor);
                        newer
                    });
                }
                Ok(Err(error)) => tracing::debug!(%error, "Cannot read the ack floor."),
                Err(_) => tracing::debug!("The ack floor did not come in time."),
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(FLOOR_REFRESH) => {}
            }
        }
    }

    /// Waits until raw message `seq` of `raw_subject` (its store's subject) may publish its
    /// ordered envelopes: every earlier raw message of that store is done. `false` when the floor
    /// stood still for [`model::retry::ORDER_WAIT`], or [`model::retry::MAX_TURN_WAIT`] passed: the message is to be put back.
    pub async fn wait_turn(&self, raw_subject: &str, seq: u64) -> bool {
        let before = seq.saturating_sub(1);
        if *self.floor.borrow() >= before {
            return true;
        }
        let _waiting = Waiting::new(self);
        self.wait(raw_subject, seq).await
    }

    async fn wait(&self, raw_subject: &str, seq: u64) -> bool {
        let mut floor = self.floor.subscribe();
        let mut seen = *floor.borrow();
        // Given up only when the floor stands still that long: a long backlog of one store
        // moves it one message at a time, and each of those steps is progress.
        let give_up = Instant::now() + model::retry::MAX_TURN_WAIT;
        let mut deadline = Instant::now() + model::retry::ORDER_WAIT;
        loop {
            // The floor alone, for a moment: in a steady flow it passes `seq - 1` quickly.
            let check_at = (Instant::now() + STORE_CHECK_AFTER).min(deadline);
            let passed = tokio::time::timeout_at(check_at, floor.wait_for(|f| *f + 1 >= seq))
                .await
                .is_ok_and(|r| r.is_ok());
            if passed {
                return true;
            }
            let now_floor = *floor.borrow();
            if now_floor > seen {
                // Moving: our turn is coming, and nothing is read meanwhile (in a burst of one
                // store every waiter would otherwise read at every step).
                seen = now_floor;
                deadline = (Instant::now() + model::retry::ORDER_WAIT).min(give_up);
                continue;
            }
            // The floor stands still: is it this store that has something pending before `seq`,
            // or another store's message that holds the floor back?
            let next = self.next_of_store(raw_subject, now_floor + 1).await;
            match next {
                Some(next) if next >= seq => return true,
                _ if Instant::now() >= deadline => {
                    tracing::debug!(
                        seq,
                        floor = now_floor,
                        ?next,
                        "Not this message's turn yet."
                    );
                    return false;
                }
                _ => {}
            }
        }
    }

    /// The sequence of the first raw message on `raw_subject` at or after `from` (`u64::MAX`
    /// when there is none; `None` when it could not be read: then the floor decides).
    async fn next_of_store(&self, raw_subject: &str, from: u64) -> Option<u64> {
        let stream = self.js.get_stream_no_info(RAW_STREAM).await.ok()?;
        match stream
            .direct_get_next_for_subject(raw_subject, Some(from))
            .await
        {
            Ok(message) => Some(message.sequence),
            Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => Some(u64::MAX),
            Err(error) => {
                tracing::debug!(%error, "Cannot read the store's next raw message.");
                None
            }
        }
    }
}

/// Counts one waiter while it lives (the refresher reads the floor while there are any), also
/// when its message's work is aborted at shutdown.
struct Waiting<'a>(&'a Gate);

impl<'a> Waiting<'a> {
    fn new(gate: &'a Gate) -> Self {
        gate.waiters.fetch_add(1, Ordering::SeqCst);
        gate.wake.notify_one();
        Self(gate)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, Ordering::SeqCst);
    }
}
