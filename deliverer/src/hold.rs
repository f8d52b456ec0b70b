//! The hold: envelopes of paused and disabled instances wait in `ECWID_HELD`
//! ([`shared::control`]) instead of being put back again and again. A deliverer that takes one
//! moves it there and acks it; nothing touches it while the instance stays held, so a held
//! backlog costs no CPU however large it grows.
//!
//! The keeper releases them: when a state change arrives (an operator resumed the instance),
//! and every [`SWEEP_EVERY`] as a safety net (a replica that died while releasing, an envelope
//! taken by a replica that had not yet seen the resume). Releasing is idempotent, so every
//! replica may do it at once.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use model::state::State;
use shared::control::{self};
use shared::nats::{subject_tail, HELD_PREFIX, HELD_STREAM};
use shared::service::ServiceContext;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// How often the keeper looks for held envelopes of active instances without being asked.
pub const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// How long moving one envelope may wait for JetStream's ack.
const MOVE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct Hold {
    ctx: ServiceContext,
    metrics: Metrics,
    wake: Arc<Notify>,
    /// Instances this replica is releasing now.
    releasing: Arc<Mutex<HashSet<String>>>,
}

impl Hold {
    pub fn new(ctx: ServiceContext, metrics: Metrics) -> Self {
        Self {
            ctx,
            metrics,
            wake: Arc::new(Notify::new()),
            releasing: Arc::default(),
        }
    }

    /// Moves `message` of held `instance_id` into the hold and acks it; `attempts_made` goes
    /// with it. Returns whether it was moved (if not, it is put back to be taken again soon).
    pub async fn take(
        &self,
        message: &jetstream::Message,
        instance_id: &str,
        seq: u64,
        attempts_made: u64,
    ) -> bool {
        let moved = control::hold(
            &self.ctx.js,
            instance_id,
            seq,
            attempts_made,
            message.headers.as_ref(),
            message.payload.clone(),
            MOVE_TIMEOUT,
        )
        .await;
        if let Err(error) = moved {
            tracing::warn!(instance_id, seq, %error, "Could not hold an envelope; it is offered again shortly.");
            let _ = message
                .ack_with(AckKind::Nak(Some(model::retry::HOLD_MOVE_RETRY)))
                .await;
            return false;
        }
        self.metrics.held.inc();
        if let Err(error) = message.ack().await {
            // Redelivered, it is held again under the same message id: JetStream drops the copy.
            tracing::warn!(instance_id, seq, %error, "Ack of a held envelope failed.");
        }
        if !self.ctx.state_of(instance_id).holds() {
            // Resumed while it moved: the release may have run before it arrived.
            self.wake.notify_one();
        }
        true
    }

    /// Releases held envelopes of active instances on every state change and every
    /// [`SWEEP_EVERY`], until `cancel`.
    pub fn spawn_keeper(&self, cancel: CancellationToken) {
        let this = self.clone();
        let mut changes = self.ctx.state_changes.clone();
        tokio::spawn(async move {
            let mut sweep = tokio::time::interval(SWEEP_EVERY);
            sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    _ = sweep.tick() => {}
                    () = this.wake.notified() => {}
                    changed = changes.changed() => if changed.is_err() { return },
                }
                if let Err(error) = this.sweep(&cancel).await {
                    tracing::warn!(%error, "Looking for held envelopes to release failed; trying again later.");
                }
            }
        });
    }

    async fn sweep(&self, cancel: &CancellationToken) -> Result<(), String> {
        let mut stream = self
            .ctx
            .js
            .get_stream(HELD_STREAM)
            .await
            .map_err(|e| e.to_string())?;
        if stream
            .info()
            .await
            .map_err(|e| e.to_string())?
            .state
            .messages
            == 0
        {
            return Ok(());
        }
        let subjects: Vec<String> = stream
            .info_with_subjects(format!("{HELD_PREFIX}.>"))
            .await
            .map_err(|e| e.to_string())?
            .filter_map(|s| async move { s.ok().map(|(subject, _)| subject) })
            .collect()
            .await;
        for subject in subjects {
            if cancel.is_cancelled() {
                break;
            }
            let instance_id = subject_tail(&subject).to_owned();
            if self.ctx.state_of(&instance_id).holds() {
                continue;
            }
            if !self.releasing_lock().insert(instance_id.clone()) {
                continue;
            }
            let this = self.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let still =
                    || !cancel.is_cancelled() && this.ctx.state_of(&instance_id) == State::Active;
                match control::release(&this.ctx.js, &instance_id, MOVE_TIMEOUT, still).await {
                    Ok(released) if released.moved > 0 => {
                        this.metrics.released.inc_by(released.moved);
                        tracing::info!(
                            instance_id,
                            released = released.moved,
                            "Held envelopes released."
                        );
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(instance_id, %error, "Releasing held envelopes failed; the next sweep goes on.");
                    }
                }
                this.releasing_lock().remove(&instance_id);
            });
        }
        Ok(())
    }

    fn releasing_lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.releasing.lock().unwrap_or_else(|p| p.into_inner())
    }
}
