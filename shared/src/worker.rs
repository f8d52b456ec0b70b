//! The pull loop both workers run: take messages from a durable pull consumer with at most
//! `concurrency` in work, hand each to a handler, and on cancellation stop pulling and give the
//! work in hand the grace period to finish. Also the consumer-lag reporter.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, Consumer};
use async_nats::jetstream::{AckKind, Message};
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::metrics::CommonMetrics;

/// One of the pull loop's `concurrency` slots, held by a message in work. The handler may give
/// it back ([`WorkSlot::give_back`]) while its message waits for something that is not this
/// loop's to give (the deliverer's envelope waiting for a slot of its instance), so that the loop
/// pulls other messages meanwhile; otherwise it is given back when the handler returns.
#[derive(Debug)]
pub struct WorkSlot(Option<OwnedSemaphorePermit>);

impl WorkSlot {
    /// Frees the slot now: the loop may pull one more message.
    pub fn give_back(&mut self) {
        self.0 = None;
    }
}

/// Runs until `cancel` fires; then waits for handlers in progress until the work's share of the
/// shutdown budget `grace` (`SHUTDOWN_GRACE_MS`, less the drain's reserve: see
/// [`crate::shutdown::Deadline`]) is spent, and aborts the rest. Messages a handler did not settle
/// are redelivered by the server after `ack_wait`: nothing is lost.
pub async fn run_pull_loop<F, Fut>(
    consumer: Consumer<pull::Config>,
    concurrency: usize,
    cancel: CancellationToken,
    grace: Duration,
    handle: F,
) where
    F: Fn(Message) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    run_pull_loop_with_slots(
        consumer,
        concurrency,
        cancel,
        grace,
        move |message, slot| {
            let work = handle(message);
            async move {
                work.await;
                drop(slot);
            }
        },
    )
    .await;
}

/// [`run_pull_loop`] whose handler holds its message's [`WorkSlot`] and may give it back early.
pub async fn run_pull_loop_with_slots<F, Fut>(
    consumer: Consumer<pull::Config>,
    concurrency: usize,
    cancel: CancellationToken,
    grace: Duration,
    handle: F,
) where
    F: Fn(Message, WorkSlot) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    let batch = concurrency.clamp(1, 1024);
    'pull: loop {
        let messages = consumer
            .stream()
            .max_messages_per_batch(batch)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await;
        let mut messages = match messages {
            Ok(m) => m,
            Err(error) => {
                tracing::warn!(%error, "Cannot pull from the consumer; retrying.");
                tokio::select! {
                    () = cancel.cancelled() => break 'pull,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue 'pull,
                }
            }
        };
        // While every permit is taken, pulled messages wait in the client's buffer and their
        // ack_wait runs: a message taken after such a wait gets a "work in progress" first, so
        // the server does not hand it to another replica while this one starts on it.
        let mut last_unsaturated = Instant::now();
        loop {
            let permit = match Arc::clone(&permits).try_acquire_owned() {
                Ok(p) => {
                    last_unsaturated = Instant::now();
                    p
                }
                Err(_) => tokio::select! {
                    () = cancel.cancelled() => break 'pull,
                    p = Arc::clone(&permits).acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break 'pull,
                    },
                },
            };
            let next = tokio::select! {
                () = cancel.cancelled() => break 'pull,
                n = messages.next() => n,
            };
            while tasks.try_join_next().is_some() {}
            match next {
                None => {
                    tracing::warn!("The pull subscription ended; subscribing again.");
                    continue 'pull;
                }
                Some(Err(error)) => {
                    tracing::debug!(%error, "Pull subscription reported an error.");
                    drop(permit);
                    tokio::select! {
                        () = cancel.cancelled() => break 'pull,
                        () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
                Some(Ok(message)) => {
                    if last_unsaturated.elapsed() > Duration::from_secs(1) {
                        let _ = message.ack_with(AckKind::Progress).await;
                    }
                    let handle = handle.clone();
                    let span = crate::nats::message_span(&message);
                    tasks.spawn(handle(message, WorkSlot(Some(permit))).instrument(span));
                }
            }
        }
    }
    // The budget counts from here, a moment after the signal; `run_worker` bounds the same work
    // from the signal itself, so this is the bound for callers that run the loop on their own.
    let deadline = crate::shutdown::Deadline::from_now(grace);
    let in_work = tasks.len();
    if in_work > 0 {
        tracing::info!(
            in_work,
            ?grace,
            "Stopped pulling; finishing the messages in work."
        );
    }
    let finished = tokio::time::timeout_at(deadline.work_until(), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::warn!(
            left = tasks.len(),
            "Grace period over; unfinished messages will be redelivered."
        );
        tasks.abort_all();
    }
}

/// Every 5 s, exports the consumer's lag (`ecwid_consumer_pending_messages`) and the messages in
/// work or waiting for a retry (`ecwid_consumer_ack_pending_messages`).
pub fn spawn_lag_reporter(
    mut consumer: Consumer<pull::Config>,
    name: &'static str,
    metrics: CommonMetrics,
    cancel: CancellationToken,
) {
    tokio::spawn(async move {
        loop {
            if let Ok(Ok(info)) =
                tokio::time::timeout(Duration::from_secs(5), consumer.info()).await
            {
                metrics
                    .consumer_pending
                    .with_label_values(&[name])
                    .set(i64::try_from(info.num_pending).unwrap_or(i64::MAX));
                metrics
                    .consumer_ack_pending
                    .with_label_values(&[name])
                    .set(i64::try_from(info.num_ack_pending).unwrap_or(i64::MAX));
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    });
}
