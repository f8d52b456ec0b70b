//! Shutdown: SIGTERM or SIGINT cancel one token, and from that moment the whole shutdown has one
//! budget, [`crate::config::CommonConfig::shutdown_grace`] (`SHUTDOWN_GRACE_MS`): a
//! [`Deadline`]. HTTP servers stop accepting and workers stop pulling; the work in hand (open
//! requests, handlers, the ops server) gets until [`Deadline::work_until`], which keeps a reserve
//! back; then the NATS connection is drained until [`Deadline::end`], so every pending publish
//! and ack is flushed. The process is gone by the end of the budget: an orchestrator that waits
//! `SHUTDOWN_GRACE_MS` plus a margin before SIGKILL (see `deploy/README.md`) never has to kill.
//!
//! [`run_bounded`] is the one place the work's share is enforced (`run_worker` and the ingest's
//! `run` call it), [`drain_nats`] the one place the drain's.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// At most this much of the budget is kept back from the work in hand for the NATS drain. A
/// drain takes milliseconds while NATS answers; when it does not, waiting longer rarely helps,
/// and what it could not flush (acks) only means redelivery.
pub const DRAIN_RESERVE_MAX: Duration = Duration::from_secs(2);

/// ... and at most a quarter of it, so a short budget still goes mostly to the work in hand.
const DRAIN_RESERVE_DIVISOR: u32 = 4;

/// How long the runtime may take to stop after `run` returned: only blocking threads (a DNS
/// lookup in flight) can hold it, and those are abandoned rather than waited for. Outside the
/// budget, so part of the margin the orchestrator adds.
pub const RUNTIME_STOP: Duration = Duration::from_millis(100);

/// The one shutdown budget, counted from the moment the token was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    work_until: Instant,
    end: Instant,
}

impl Deadline {
    /// A budget of `grace` starting now.
    pub fn from_now(grace: Duration) -> Self {
        let now = Instant::now();
        Self {
            work_until: now + grace.saturating_sub(drain_reserve(grace)),
            end: now + grace,
        }
    }

    /// When the work in hand must be done (or is abandoned): the end less the drain's reserve.
    pub fn work_until(&self) -> Instant {
        self.work_until
    }

    /// When the whole shutdown must be done; the drain runs until then.
    pub fn end(&self) -> Instant {
        self.end
    }

    /// What is left of the whole budget.
    pub fn remaining(&self) -> Duration {
        self.end.saturating_duration_since(Instant::now())
    }
}

/// The part of a budget of `grace` kept for the NATS drain: a quarter, at most
/// [`DRAIN_RESERVE_MAX`].
pub fn drain_reserve(grace: Duration) -> Duration {
    (grace / DRAIN_RESERVE_DIVISOR).min(DRAIN_RESERVE_MAX)
}

/// Cancels `token` on the first SIGTERM or SIGINT.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("Shutdown signal received; draining.");
        token.cancel();
    });
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(error) => {
            tracing::warn!(%error, "Cannot listen for SIGTERM; only SIGINT stops the service.");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

/// Runs `work`, which stops on its own soon after `cancel` fires (servers stop accepting, pull
/// loops stop pulling). From the moment `cancel` fires the shutdown budget `grace` runs: `work`
/// gets until [`Deadline::work_until`] to finish and is dropped (its tasks aborted) after that.
///
/// Returns the budget (started when `cancel` fired, or when `work` ended on its own) for
/// [`drain_nats`], and `work`'s output unless it had to be dropped.
pub async fn run_bounded<F: Future>(
    work: F,
    cancel: &CancellationToken,
    grace: Duration,
) -> (Deadline, Option<F::Output>) {
    tokio::pin!(work);
    tokio::select! {
        output = &mut work => (Deadline::from_now(grace), Some(output)),
        () = cancel.cancelled() => {
            let deadline = Deadline::from_now(grace);
            let output = tokio::time::timeout_at(deadline.work_until(), &mut work).await.ok();
            if output.is_none() {
                tracing::warn!(
                    ?grace,
                    drain_reserve = ?drain_reserve(grace),
                    "Work in hand did not finish within the shutdown budget; abandoned \
                     (unsettled messages are redelivered, unanswered webhooks retried by Ecwid)."
                );
            }
            (deadline, output)
        }
    }
}

/// Flushes and drains the NATS connection, giving up at the end of `deadline`.
pub async fn drain_nats(client: &async_nats::Client, deadline: &Deadline) {
    let drained = async {
        let _ = client.flush().await;
        client.drain().await?;
        // `drain` only queues the request. A flush after it returns once the connection task has
        // written the unsubscribes out (or errs because the task already closed): the process
        // must not exit with the drain still in its buffer.
        let _ = client.flush().await;
        Ok::<(), async_nats::client::DrainError>(())
    };
    match tokio::time::timeout_at(deadline.end(), drained).await {
        Ok(Ok(())) => tracing::info!("NATS connection drained."),
        Ok(Err(error)) => tracing::warn!(%error, "Draining the NATS connection failed."),
        Err(_) => tracing::warn!("Draining the NATS connection did not finish within the budget."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drain_reserve_is_a_quarter_of_the_budget_at_most_two_seconds() {
        assert_eq!(
            drain_reserve(Duration::from_secs(20)),
            Duration::from_secs(2)
        );
        assert_eq!(
            drain_reserve(Duration::from_secs(3)),
            Duration::from_millis(750)
        );
        assert_eq!(drain_reserve(Duration::ZERO), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn work_that_ignores_the_signal_is_dropped_when_its_share_runs_out() {
        let cancel = CancellationToken::new();
        let grace = Duration::from_secs(20);
        let signalled = Instant::now() + Duration::from_secs(5);
        let stop = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(signalled).await;
            stop.cancel();
        });
        let (deadline, output) = run_bounded(std::future::pending::<()>(), &cancel, grace).await;
        assert_eq!(output, None);
        // The budget runs from the signal, not from the start of the work.
        assert_eq!(deadline.end(), signalled + grace);
        assert_eq!(Instant::now(), signalled + Duration::from_secs(18));
        // What is left is the drain's reserve, not a second grace period.
        assert_eq!(deadline.remaining(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn work_that_stops_promptly_leaves_the_rest_of_the_budget_to_the_drain() {
        let cancel = CancellationToken::new();
        let grace = Duration::from_secs(3);
        let started = Instant::now();
        let stop = cancel.clone();
        let work = async move {
            stop.cancelled().await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            "finished"
        };
        let trigger = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            trigger.cancel();
        });
        let (deadline, output) = run_bounded(work, &cancel, grace).await;
        assert_eq!(output, Some("finished"));
        assert_eq!(Instant::now(), started + Duration::from_millis(1500));
        assert_eq!(deadline.remaining(), Duration::from_millis(2500));
    }
}
