//! Ordered delivery: one lane per instance with `event.notification.ordered=true`.
//!
//! A lane is the instance's durable consumer on `ecwid.ordered.<instanceId>`
//! ([`shared::ordered::consumer_config`], `max_ack_pending = 1`), which every replica pulls from.
//! The server hands its one message to one replica at a time and the next only after that one is
//! acked, so the envelopes go out one at a time in the order they were stored (the normalizer
//! stores them in acceptance order). Each message takes exactly the path of the shared consumer
//! ([`Worker::handle`]: resolve, admit, dispatch, decide, journal, settle): a failure is NAKed
//! with its retry wait and, being the one message in flight, holds the lane until it is
//! delivered or dead-lettered. A replica that dies holding it gives it back after `ack_wait`,
//! to whichever replica pulls next, and it is still first.
//!
//! Every replica follows the instance directory and runs the lanes of the ordered instances; a
//! lane of an instance that is no longer ordered runs on until its consumer is empty (what was
//! stored in order is delivered in order), and the consumer of a deleted instance is removed once
//! empty. A lane does not pull while its instance is held (`held`, the pause state).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use futures::StreamExt;
use shared::nats::{EVENTS_STREAM, ORDERED_CONSUMER_PREFIX};
use shared::ordered::{consumer_config, consumer_name, instance_of_consumer};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::worker::Worker;
use model::retry::HELD_RECHECK;

/// "Is this instance held?" (paused): its lane then pulls nothing.
pub type Held = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// How long one pull waits for the lane's message; also how often a lane looks at whether it
/// should stop or is held.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// How often the lanes of instances no longer ordered (or deleted) are looked for, to drain.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Runs the lanes until `cancel` fires. Call once the directory is loaded.
pub(crate) fn spawn(worker: Arc<Worker>, held: Held, cancel: CancellationToken) -> JoinHandle<()> {
    tokio::spawn(async move { manage(worker, held, cancel).await })
}

async fn manage(worker: Arc<Worker>, held: Held, cancel: CancellationToken) {
    let directory = worker.ctx().directory.clone();
    let mut changes = directory.changes();
    let mut lanes: HashMap<String, (CancellationToken, JoinHandle<()>)> = HashMap::new();
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    let mut draining: Vec<String> = Vec::new();
    loop {
        lanes.retain(|_, (_, task)| !task.is_finished());
        let ordered = directory
            .all()
            .into_iter()
            .filter(|i| i.ordered())
            .map(|i| i.id.clone());
        for id in ordered.chain(draining.drain(..)) {
            if let std::collections::hash_map::Entry::Vacant(slot) = lanes.entry(id) {
                let id = slot.key().clone();
                let stop = cancel.child_token();
                let task = tokio::spawn(
                    lane(Arc::clone(&worker), id.clone(), held.clone(), stop.clone())
                        .instrument(tracing::info_span!("lane", instance_id = %id)),
                );
                slot.insert((stop, task));
            }
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            changed = changes.changed() => if changed.is_err() { break },
            _ = sweep.tick() => draining = lane_consumers(&worker).await,
        }
    }
    // Each lane finishes the message it holds (it only stops between messages).
    for (stop, task) in lanes.into_values() {
        stop.cancel();
        let _ = task.await;
    }
}

/// The instance ids of every lane consumer on the stream (those of ordered instances included).
async fn lane_consumers(worker: &Worker) -> Vec<String> {
    let Ok(stream) = worker.ctx().js.get_stream_no_info(EVENTS_STREAM).await else {
        return Vec::new();
    };
    let names: Vec<String> = stream
        .consumer_names()
        .filter_map(|n| async move { n.ok() })
        .collect()
        .await;
    names
        .iter()
        .filter(|n| n.starts_with(ORDERED_CONSUMER_PREFIX))
        .filter_map(|n| instance_of_consumer(n).map(str::to_owned))
        .collect()
}

/// One instance's lane: pulls its messages one at a time and hands each to the shared attempt
/// code. Stops on `stop`, or once its instance is no longer ordered and nothing is left.
async fn lane(worker: Arc<Worker>, instance_id: String, held: Held, stop: CancellationToken) {
    let ack_wait = worker.config().ack_wait();
    let js = worker.ctx().js.clone();
    let mut wait = Duration::from_millis(200);
    let consumer: PullConsumer = loop {
        let config = consumer_config(&instance_id, ack_wait);
        match shared::nats::ensure_pull_consumer(&js, EVENTS_STREAM, config).await {
            Ok(c) => break c,
            Err(error) => {
                tracing::warn!(%error, retry_in = ?wait, "Cannot set up the ordered lane; retrying.");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    };
    tracing::debug!("Ordered lane running.");
    let _counted = Counted::new(&worker.metrics().ordered_lanes);
    loop {
        if stop.is_cancelled() {
            return;
        }
        if held(&instance_id) {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(HELD_RECHECK) => continue,
            }
        }
        let instance = worker.ctx().directory.get(&instance_id);
        if !instance.as_ref().is_some_and(|i| i.ordered()) && drained(&consumer).await {
            if instance.is_none() {
                forget(&worker, &instance_id).await;
            }
            tracing::debug!("Ordered lane drained; stopping.");
            return;
        }
        let batch = consumer
            .batch()
            .max_messages(1)
            .expires(PULL_EXPIRES)
            .messages()
            .await;
        let mut messages = match batch {
            Ok(m) => m,
            Err(error) => {
                tracing::debug!(%error, "Cannot pull from the ordered lane; retrying.");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        let next = tokio::select! {
            () = stop.cancelled() => return,
            next = messages.next() => next,
        };
        match next {
            Some(Ok(message)) => {
                let span = shared::nats::message_span(&message);
                worker.handle(message, None).instrument(span).await;
            }
            Some(Err(error)) => {
                tracing::debug!(%error, "The ordered lane's pull reported an error.")
            }
            None => {}
        }
    }
}

/// Whether the lane's consumer has nothing left: none waiting, none in flight or in retry.
async fn drained(consumer: &PullConsumer) -> bool {
    matches!(
        consumer.get_info().await,
        Ok(info) if info.num_pending == 0 && info.num_ack_pending == 0
    )
}

/// Removes the drained lane consumer of a deleted instance.
async fn forget(worker: &Worker, instance_id: &str) {
    let Ok(stream) = worker.ctx().js.get_stream_no_info(EVENTS_STREAM).await else {
        return;
    };
    if let Err(error) = stream.delete_consumer(&consumer_name(instance_id)).await {
        tracing::debug!(%error, "Could not remove the lane of a deleted instance.");
    }
}

/// Counts a running lane in `ecwid_deliver_ordered_lanes` for as long as it lives.
struct Counted(prometheus::IntGauge);

impl Counted {
    fn new(gauge: &prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}
