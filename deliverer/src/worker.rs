//! One envelope's delivery, start to end ([`Worker::handle`]), shared by the pull loop
//! ([`crate::consumer`]) and the ordered lanes ([`crate::ordered`]).
//!
//! Each attempt goes in four steps: resolve the target (instance, URL, event id), admit it
//! (instance limits, breaker, host slot, a request slot of this replica), dispatch it, and
//! decide its [`Outcome`]
//! ([`crate::outcome::decide`]); `settle` then acks, NAKs or dead-letters.
//!
//! The attempt number is the message's delivery count less the times the replicas put it back
//! without trying (breaker open, host busy, instance at its limit and no room to wait for it
//! here: [`crate::deferrals`]), so a
//! restart loses no retry and repeats no wait. A redelivered envelope (`Ecwid-Attempt-Offset`)
//! gets a fresh budget; its attempts are numbered on in the event log, which gets a snapshot
//! after every attempt ([`crate::journal`]).
//!
//! A test envelope (`Ecwid-Test-Reply-To`, from `POST /instances/{id}/test`) is tried once, its
//! result answered on that subject; it is never retried, dead-lettered or logged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use model::instance::Instance;
use model::retry::Stage;
use model::retry::HOST_BUSY_WAIT;
use model::state::{InstanceState, State};
use model::time_fmt::{now_unix_ms, unix_ms_to_rfc3339};
use shared::dead::{self, DeadLetter};
use shared::nats::{header, headers, subject_tail, EVENTS_STREAM, ORDERED_PREFIX};
use shared::service::ServiceContext;
use shared::worker::WorkSlot;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::Config;
use crate::dispatch::{self, Attempt, Dispatcher};
use crate::health::{Admitted, Callbacks};
use crate::hold::Hold;
use crate::journal::{self, Sent};
use crate::limits::{Busy, InstanceLimits, InstanceSlot, Refused, Waiting};
use crate::metrics::Metrics;
use crate::policy::HostLimits;
use model::retry::jitter;

use crate::outcome::{decide, read_head, MessageHead, Outcome};

/// How long a dead letter's publish may wait for JetStream's ack before the envelope is put
/// back to try again.
const DEAD_LETTER_ACK_WAIT: Duration = Duration::from_secs(5);

/// What every attempt needs; shared by the pull loop and the ordered lanes ([`crate::ordered`]).
/// The reason of an envelope whose instance no longer exists: dropped, not dead-lettered.
const NO_INSTANCE: &str = "no_instance";

pub(crate) struct Worker {
    pub(crate) config: Config,
    pub(crate) ctx: ServiceContext,
    pub(crate) metrics: Metrics,
    pub(crate) dispatcher: Dispatcher,
    pub(crate) callbacks: Arc<Callbacks>,
    pub(crate) hold: Hold,
    pub(crate) hosts: HostLimits,
    /// Each instance's `max.in.flight` and `rate.limit`, this replica's share.
    pub(crate) limits: InstanceLimits,
    /// Times each message was put back without an attempt, by any replica.
    pub(crate) deferrals: Arc<crate::deferrals::Deferrals>,
    pub(crate) urls: dispatch::ParsedUrls,
    /// `DELIVER_MAX_IN_FLIGHT` requests of this replica: a delivery that waited for its
    /// instance's slot gave its consumer slot back, so the consumer's slots alone do not bound
    /// the requests.
    pub(crate) requests: Arc<Semaphore>,
    /// The deliverer stops: deliveries waiting for a slot go back at once.
    pub(crate) stop: CancellationToken,
}

/// What a request holds while it is in flight. Dropped in this order: the instance's slot last,
/// so the delivery it is handed to finds the host's and the replica's free.
struct Slots {
    _request: OwnedSemaphorePermit,
    _host: OwnedSemaphorePermit,
    _instance: InstanceSlot,
}

/// Counts a delivery waiting for its instance's slot in `ecwid_deliver_parked` while it lives.
struct Parked(prometheus::IntGauge);

impl Parked {
    fn new(gauge: &prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Where and how one envelope is sent, resolved from its instance and its head.
struct Target {
    instance: Arc<Instance>,
    url: reqwest::Url,
    event_id: String,
    /// The instance's own retry schedule, if it has one.
    own_schedule: Option<Vec<Duration>>,
}

impl Worker {
    pub(crate) fn ctx(&self) -> &ServiceContext {
        &self.ctx
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// One message, whichever consumer it came from: its attempt, the event log snapshot, and
    /// its settlement (ack, NAK with the retry wait, or dead letter then ack). `work`: the
    /// shared consumer's slot the message holds, which it gives back while it waits for its
    /// instance's slot; an ordered lane's message has none and never waits for one (its lane
    /// has one message in flight).
    pub(crate) async fn handle(&self, message: jetstream::Message, mut work: Option<WorkSlot>) {
        let Ok(info) = message.info() else {
            tracing::warn!("A message without JetStream metadata; leaving it to redelivery.");
            return;
        };
        let seq = info.stream_sequence;
        let delivered = u64::try_from(info.delivered).unwrap_or(1).max(1);
        let queued_at = info.published.unix_timestamp_nanos() / 1_000_000;
        let deferred = self.deferrals.of(seq);
        let instance_id = subject_tail(message.subject.as_str()).to_owned();
        let h = message.headers.as_ref();
        let head = read_head(&message.payload);
        if let Some(reply_to) = header(h, headers::TEST_REPLY_TO).map(str::to_owned) {
            self.test(&message, &head, &instance_id, reply_to).await;
            return;
        }
        let offset = header(h, headers::ATTEMPT_OFFSET)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let attempt = self
            .attempt_number(head.as_ref().ok(), seq, delivered, deferred, offset)
            .await;
        let in_lane = message
            .subject
            .as_str()
            .strip_prefix(ORDERED_PREFIX)
            .is_some_and(|rest| rest.starts_with('.'));
        if in_lane && self.ctx.state_of(&instance_id).holds() {
            // An ordered lane holds its instance by not pulling: moving its head aside would let
            // the next event overtake it. This one was pulled just before the pause; it goes
            // back, first in line, without an attempt.
            self.deferrals.note(seq).await;
            let _ = message
                .ack_with(AckKind::Nak(Some(model::retry::HELD_RECHECK)))
                .await;
            return;
        }
        if self.ctx.state_of(&instance_id).holds() {
            // Attempts made so far go with it; this take is not one.
            let made = offset + attempt - 1;
            if self.hold.take(&message, &instance_id, seq, made).await {
                self.deferrals.forget(seq).await;
                self.unmark_retrying(&instance_id, seq, attempt).await;
            }
            return;
        }
        let (outcome, sent) = self
            .attempt(&message, &head, &instance_id, attempt, deferred, &mut work)
            .await;
        let logged = journal::record(
            &self.ctx.log,
            &message,
            head.as_ref().ok(),
            sent.as_ref(),
            &outcome,
        )
        .await;
        if logged.is_err() {
            // Not settled without its row: the message comes back, and its next attempt (or a
            // receiver's deduplication by webhook-id) says what happened.
            let _ = message
                .ack_with(AckKind::Nak(Some(model::retry::LOG_WRITE_RETRY_WAIT)))
                .await;
            return;
        }
        self.settle(
            &message,
            &instance_id,
            seq,
            attempt,
            queued_at as i64,
            outcome,
        )
        .await;
    }

    /// This message's attempt number: the attempts its event log record counts (less those made
    /// before it was redelivered or held), plus one. The record is written after every attempt
    /// and never for a deferral, so a deferral spends nothing, also when another replica or a
    /// restarted one made it. Without the log (`EVENT_LOG=off`), or before a redelivery, the
    /// server's delivery count less the put-backs the replicas told each other of
    /// ([`crate::deferrals`]).
    async fn attempt_number(
        &self,
        head: Option<&MessageHead<'_>>,
        seq: u64,
        delivered: u64,
        deferred: u64,
        offset: u64,
    ) -> u64 {
        let local = delivered.saturating_sub(deferred).max(1);
        if delivered <= 1 || !self.ctx.log.enabled() {
            return local;
        }
        let Some(head) = head else {
            return local;
        };
        match self.ctx.log.attempts_of(&head.event_id).await {
            Some(attempts) if attempts >= offset => attempts - offset + 1,
            Some(_) => local,
            None => {
                tracing::debug!(
                    seq,
                    "Event log unreadable; counting attempts from deliveries."
                );
                local
            }
        }
    }

    /// Attempt number `attempt` for `message`: resolve where it goes, wait to be admitted,
    /// send it, and decide what becomes of it. Also what was sent, when something was.
    /// `deferred`: how often the message was put back without an attempt before.
    async fn attempt(
        &self,
        message: &jetstream::Message,
        head: &Result<MessageHead<'_>, String>,
        instance_id: &str,
        attempt: u64,
        deferred: u64,
        work: &mut Option<WorkSlot>,
    ) -> (Outcome, Option<Sent>) {
        let target = match self.resolve(head, instance_id, attempt) {
            Ok(target) => target,
            Err(dead) => return (dead, None),
        };
        let admission = self
            .admit(message, instance_id, &target, deferred, work)
            .await;
        let (admitted, _slots) = match admission {
            Ok(admitted) => admitted,
            Err(deferral) => return (deferral, None),
        };
        let started_at_ms = now_unix_ms();
        let started = Instant::now();
        let result = self.dispatch(message, &target, admitted, attempt).await;
        let duration = started.elapsed();
        let schedule = target
            .own_schedule
            .as_deref()
            .unwrap_or(&self.config.schedule);
        let outcome = decide(&result, schedule, attempt);
        let event_id = target.event_id.as_str();
        match (&result, &outcome) {
            (Attempt::Delivered(answer), _) => {
                if let Some(received) = header(message.headers.as_ref(), headers::RECEIVED_AT)
                    .and_then(|v| v.parse::<i64>().ok())
                {
                    let ms = (now_unix_ms() - received).max(0);
                    self.metrics.end_to_end.observe(ms as f64 / 1000.0);
                }
                let status = answer.status;
                tracing::debug!(instance_id, event_id, attempt, status, "Delivered.");
            }
            (Attempt::Failed { class, error, .. }, Outcome::Retry { delay, .. }) => {
                tracing::info!(instance_id, event_id, attempt, class, %error, retry_in = ?delay, "Delivery failed; will retry.");
                self.metrics.retries.inc();
            }
            _ => {}
        }
        let sent = Sent {
            started_at_ms,
            duration,
            result,
        };
        (outcome, Some(sent))
    }

    /// A test envelope: one attempt (past the breaker: the operator is checking the receiver),
    /// its result answered on `reply_to`, then acked whatever happened.
    async fn test(
        &self,
        message: &jetstream::Message,
        head: &Result<MessageHead<'_>, String>,
        instance_id: &str,
        reply_to: String,
    ) {
        let answer = match self.resolve(head, instance_id, 1) {
            Err(Outcome::Dead { error, .. }) => {
                serde_json::json!({"delivered": false, "error": error})
            }
            Err(_) => serde_json::json!({"delivered": false, "error": "not sent"}),
            Ok(target) => {
                let started = Instant::now();
                // Past the breaker: a refusal gives back no probe.
                let result = self.dispatch(message, &target, Admitted::Request, 1).await;
                let answer = result.answer();
                let error = match &result {
                    Attempt::Delivered(_) => None,
                    Attempt::Gone(_) => Some("the callback answered 410 Gone".to_owned()),
                    Attempt::Refused(why) => Some(why.clone()),
                    Attempt::Failed { error, .. } => Some(error.clone()),
                };
                serde_json::json!({
                    "delivered": matches!(result, Attempt::Delivered(_)),
                    "status": answer.map(|a| a.status),
                    "errorClass": answer.is_none().then(|| result.class()),
                    "durationMs": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    "response": answer.map(|a| a.excerpt.as_str()).unwrap_or_default(),
                    "error": error,
                })
            }
        };
        if let Err(error) = self
            .ctx
            .client
            .publish(reply_to, answer.to_string().into())
            .await
        {
            tracing::warn!(instance_id, %error, "Could not answer a test event.");
        }
        if let Err(error) = message.ack().await {
            tracing::warn!(instance_id, %error, "Ack of a test event failed.");
        }
    }

    /// The instance, callback URL and event id of `message`, or the dead letter it becomes when
    /// one of them is missing (the attempt is not spent: nothing was sent).
    fn resolve(
        &self,
        head: &Result<MessageHead<'_>, String>,
        instance_id: &str,
        attempt: u64,
    ) -> Result<Target, Outcome> {
        let dead = |reason, error: String| Outcome::Dead {
            reason,
            error,
            last_status: None,
            attempts: attempt - 1,
        };
        let Some(instance) = self.ctx.directory.get(instance_id) else {
            return Err(dead(
                NO_INSTANCE,
                format!("instance {instance_id} does not exist (any more)"),
            ));
        };
        if !instance.events_enabled() {
            return Err(dead(
                "disabled",
                format!("instance {instance_id} has events disabled"),
            ));
        }
        let url = match instance.callback_url().map(|url| self.urls.parse(url)) {
            Some(Ok(url)) if matches!(url.scheme(), "http" | "https") => url,
            _ => {
                return Err(dead(
                    "bad_callback",
                    "the instance has no valid callback URL".into(),
                ))
            }
        };
        let event_id = match head {
            Ok(head) => head.event_id.clone(),
            Err(e) => return Err(dead("unparseable", e.clone())),
        };
        Ok(Target {
            own_schedule: instance.retry_schedule(),
            instance,
            url,
            event_id,
        })
    }

    /// Slots to send to `target` now: its instance is within its limits ([`crate::limits`]),
    /// waiting for a slot if need be ([`Worker::wait_for_slot`]); its breaker lets the request
    /// through (as the probe or not); its host has a free slot; and so does this replica.
    /// Otherwise the deferral that puts the envelope back without spending an attempt.
    async fn admit(
        &self,
        message: &jetstream::Message,
        instance_id: &str,
        target: &Target,
        deferred: u64,
        work: &mut Option<WorkSlot>,
    ) -> Result<(Admitted, Slots), Outcome> {
        let park = work.is_some().then_some(self.config.queue);
        let instance_slot = match self
            .limits
            .admit(instance_id, &target.instance, deferred, park)
        {
            Ok(slot) => slot,
            Err(Refused::Wait(waiting)) => {
                self.wait_for_slot(message, target, waiting, work, deferred)
                    .await?
            }
            Err(Refused::Busy(busy, delay)) => {
                self.metrics
                    .deferred
                    .with_label_values(&[busy.label()])
                    .inc();
                return Err(Outcome::Retry {
                    delay,
                    spends_attempt: false,
                });
            }
        };
        let url = &target.url;
        let admitted = match self.callbacks.admit(url.as_str()).await {
            Ok(admitted) => admitted,
            Err(wait) => {
                self.metrics
                    .deferred
                    .with_label_values(&["breaker_open"])
                    .inc();
                return Err(Outcome::Retry {
                    delay: jitter(wait),
                    spends_attempt: false,
                });
            }
        };
        let host = format!(
            "{}:{}",
            url.host_str().unwrap_or(""),
            url.port_or_known_default().unwrap_or(0)
        );
        let Some(slot) = self.hosts.acquire(&host).await else {
            self.metrics
                .deferred
                .with_label_values(&["host_busy"])
                .inc();
            self.callbacks.not_sent(url.as_str(), admitted).await;
            return Err(Outcome::Retry {
                delay: jitter(HOST_BUSY_WAIT),
                spends_attempt: false,
            });
        };
        let request = match Arc::clone(&self.requests).try_acquire_owned() {
            Ok(request) => request,
            Err(_) => {
                // Every request of this replica is taken; they end within the request timeout.
                let started = Instant::now();
                let Ok(request) = Arc::clone(&self.requests).acquire_owned().await else {
                    self.callbacks.not_sent(url.as_str(), admitted).await;
                    return Err(Outcome::Retry {
                        delay: jitter(HOST_BUSY_WAIT),
                        spends_attempt: false,
                    });
                };
                if started.elapsed() > Duration::from_secs(1) {
                    let _ = message.ack_with(AckKind::Progress).await;
                }
                request
            }
        };
        Ok((
            admitted,
            Slots {
                _request: request,
                _host: slot,
                _instance: instance_slot,
            },
        ))
    }

    /// Waits in the instance's queue until a slot is handed to this delivery. Within the
    /// queue's bounds (`DELIVER_QUEUE_PER_INSTANCE`, `DELIVER_QUEUE_TOTAL`) the consumer slot is
    /// given back meanwhile, so the pull loop takes other instances' messages, and the message
    /// is kept from redelivery with in-progress acks (every third of `ack_wait`, not one NATS
    /// message per wait). Behind the queue it waits at most [`model::retry::QUEUE_WAIT`],
    /// holding its consumer slot (a backlog that outruns the queue slows the pulling instead of
    /// cycling through the server), then is put back. Put back too when this replica's share
    /// of the instance drops to 0 (a replica joined), when the deliverer stops, and when its
    /// turn comes after its instance changed, was paused, disabled or deleted (taken from the
    /// start again, it is sent as the instance is now, or held).
    async fn wait_for_slot(
        &self,
        message: &jetstream::Message,
        target: &Target,
        waiting: Waiting,
        work: &mut Option<WorkSlot>,
        deferred: u64,
    ) -> Result<InstanceSlot, Outcome> {
        let instance_id = target.instance.id.as_str();
        let Waiting { mut slot, in_queue } = waiting;
        if in_queue {
            if let Some(work) = work.as_mut() {
                work.give_back();
            }
        }
        self.metrics.parked_total.inc();
        let _parked = Parked::new(&self.metrics.parked);
        let started = Instant::now();
        let put_back = |reason: &str, delay: Duration| {
            self.metrics.deferred.with_label_values(&[reason]).inc();
            Outcome::Retry {
                delay,
                spends_attempt: false,
            }
        };
        let give_up = tokio::time::sleep(model::retry::QUEUE_WAIT);
        tokio::pin!(give_up);
        let every = self.config.ack_wait() / 3;
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                handed = &mut slot => {
                    let Ok(handed) = handed else {
                        return Err(put_back(Busy::InFlight.label(), crate::limits::busy_wait(deferred)));
                    };
                    let now = self.ctx.directory.get(instance_id);
                    if !now.is_some_and(|now| Arc::ptr_eq(&now, &target.instance))
                        || self.ctx.state_of(instance_id).holds()
                    {
                        return Err(put_back("instance_changed", jitter(model::retry::BUSY_WAIT_MIN)));
                    }
                    // The host's and this replica's slots and the request come next: their
                    // whole ack_wait is theirs.
                    if started.elapsed() > Duration::from_secs(1) {
                        let _ = message.ack_with(AckKind::Progress).await;
                    }
                    return Ok(handed);
                }
                () = &mut give_up, if !in_queue => {
                    return Err(put_back(Busy::InFlight.label(), crate::limits::busy_wait(deferred)));
                }
                _ = ticks.tick() => {
                    if !self.limits.can_wait(instance_id) {
                        return Err(put_back(Busy::InFlight.label(), crate::limits::busy_wait(deferred)));
                    }
                    let _ = message.ack_with(AckKind::Progress).await;
                }
                () = self.stop.cancelled() => {
                    // To another replica soon; after the note on the put-back (100 ms and more).
                    return Err(put_back("stopping", jitter(model::retry::BUSY_WAIT_MIN)));
                }
            }
        }
    }

    /// Signs and POSTs the envelope; counts the attempt and tells the breaker how it went.
    async fn dispatch(
        &self,
        message: &jetstream::Message,
        target: &Target,
        admitted: Admitted,
        attempt: u64,
    ) -> Attempt {
        let body = message.payload.clone();
        let mut headers = dispatch::request_headers(
            &target.instance,
            &target.event_id,
            &body,
            now_unix_ms() / 1000,
        );
        let span =
            dispatch::attempt_span(&target.url, &target.instance.id, &target.event_id, attempt);
        // The receiver's own spans join the event's trace under this attempt.
        shared::otel::inject_http(&span, &mut headers);
        self.metrics.in_flight.inc();
        let started = Instant::now();
        let result = self
            .dispatcher
            .deliver(&target.instance, &target.url, headers, body)
            .instrument(span.clone())
            .await;
        dispatch::record_attempt(&span, &result);
        self.metrics.in_flight.dec();
        self.metrics
            .attempt_duration
            .observe(started.elapsed().as_secs_f64());
        let success = matches!(result, Attempt::Delivered(_));
        self.metrics
            .attempts
            .with_label_values(&[if success { "success" } else { "failure" }, result.class()])
            .inc();
        match &result {
            // Refused before a request went: says nothing about the receiver.
            Attempt::Refused(_) => {
                self.callbacks.not_sent(target.url.as_str(), admitted).await;
            }
            Attempt::Delivered(_) => {
                self.callbacks.record(target.url.as_str(), Ok(())).await;
            }
            Attempt::Gone(_) | Attempt::Failed { .. } => {
                let error = match &result {
                    Attempt::Failed { error, .. } => error.as_str(),
                    _ => "the callback answered 410 Gone",
                };
                if let Some(health) = self.callbacks.record(target.url.as_str(), Err(error)).await {
                    self.disable_if_failing(&target.instance.id, &health).await;
                }
            }
        }
        result
    }

    /// Moves the instance to `disabled` when its callback has failed without a success for
    /// `DELIVER_DISABLE_AFTER` (unless an operator paused or disabled it already).
    async fn disable_if_failing(&self, instance_id: &str, health: &model::health::CallbackHealth) {
        let Some(after) = self.config.disable_after else {
            return;
        };
        let now = now_unix_ms();
        if health
            .failing_for(now)
            .is_none_or(|failing| failing < after)
        {
            return;
        }
        if self.ctx.state_of(instance_id) != State::Active {
            return;
        }
        let reason = format!(
            "deliveries failed for {} s without a success; last error: {}",
            health.failing_for(now).unwrap_or_default().as_secs(),
            health.last_error.as_deref().unwrap_or("unknown")
        );
        let next = InstanceState::new(State::Disabled, now, Some(reason));
        let written = match shared::control::read_state(&self.ctx.states_kv, instance_id).await {
            Ok((current, _)) if current.as_ref().is_some_and(|s| s.state != State::Active) => {
                return;
            }
            Ok((_, revision)) => {
                shared::control::write_state(&self.ctx.states_kv, instance_id, &next, revision)
                    .await
            }
            Err(e) => Err(e),
        };
        match written {
            Ok(()) => {
                self.metrics
                    .instance_transitions
                    .with_label_values(&["disabled"])
                    .inc();
                tracing::error!(instance_id, "Instance disabled: its deliveries kept failing. Its events are held; resume it when the receiver is back.");
            }
            // Another replica disabled it (or an operator acted) at the same moment.
            Err(shared::control::ControlError::Conflict) => {}
            Err(error) => {
                tracing::warn!(instance_id, %error, "Could not disable the instance; will try again at its next failure.");
            }
        }
    }

    /// Counts envelope `seq` out of those waiting for a retry, which only an envelope that failed
    /// before was counted in.
    async fn unmark_retrying(&self, instance_id: &str, seq: u64, attempt: u64) {
        if attempt <= 1 {
            return;
        }
        if let Err(error) = shared::control::count_retrying(
            &self.ctx.js,
            instance_id,
            seq,
            shared::control::Retrying::Out,
            DEAD_LETTER_ACK_WAIT,
        )
        .await
        {
            tracing::warn!(instance_id, seq, %error, "Could not count a settled envelope out of the retrying; the instance's health overcounts it.");
        }
    }

    async fn settle(
        &self,
        message: &jetstream::Message,
        instance_id: &str,
        seq: u64,
        attempt: u64,
        queued_at_ms: i64,
        outcome: Outcome,
    ) {
        match outcome {
            Outcome::Ack => {
                self.deferrals.forget(seq).await;
                self.unmark_retrying(instance_id, seq, attempt).await;
                if let Err(error) = message.ack().await {
                    tracing::warn!(instance_id, seq, %error, "Ack failed; the event may be delivered again.");
                }
            }
            Outcome::Retry {
                delay,
                spends_attempt,
            } => {
                if !spends_attempt {
                    self.deferrals.note(seq).await;
                } else if attempt == 1 {
                    // Counted in at its first failure only, out when it is settled.
                    if let Err(error) = shared::control::count_retrying(
                        &self.ctx.js,
                        instance_id,
                        seq,
                        shared::control::Retrying::In,
                        DEAD_LETTER_ACK_WAIT,
                    )
                    .await
                    {
                        tracing::warn!(instance_id, seq, %error, "Could not count an envelope as retrying; the instance's health undercounts it.");
                    }
                }
                if let Err(error) = message.ack_with(AckKind::Nak(Some(delay))).await {
                    tracing::warn!(instance_id, seq, %error, "NAK failed; the server redelivers after ack_wait.");
                }
            }
            Outcome::Dead {
                reason: NO_INSTANCE,
                error,
                ..
            } => {
                // The instance was deleted: its envelope can never be delivered (instance ids are
                // never reused), and a dead letter of it could only be replayed into the same
                // answer. Dropped and counted instead of kept for ever; its record says why.
                self.deferrals.forget(seq).await;
                self.unmark_retrying(instance_id, seq, attempt).await;
                tracing::warn!(instance_id, seq, %error, "Envelope of a deleted instance dropped.");
                self.metrics.dropped.with_label_values(&[NO_INSTANCE]).inc();
                if let Err(error) = message.ack().await {
                    tracing::warn!(instance_id, seq, %error, "Ack failed; the envelope may be dropped again.");
                }
            }
            Outcome::Dead {
                reason,
                error,
                last_status,
                attempts,
            } => {
                let now = unix_ms_to_rfc3339(now_unix_ms());
                let mut extra = vec![
                    (headers::DEAD_ATTEMPTS, attempts.to_string()),
                    (
                        headers::DEAD_FIRST_ATTEMPT_AT,
                        unix_ms_to_rfc3339(queued_at_ms),
                    ),
                ];
                if attempts > 0 {
                    extra.push((headers::DEAD_LAST_ATTEMPT_AT, now));
                }
                if let Some(s) = last_status {
                    extra.push((headers::DEAD_LAST_STATUS, s.to_string()));
                }
                let letter = DeadLetter {
                    stage: Stage::Deliver,
                    id: instance_id,
                    reason,
                    error: error.clone(),
                    original_subject: message.subject.as_str(),
                    original_headers: message.headers.as_ref(),
                    source_id: format!("{EVENTS_STREAM}:{seq}"),
                    payload: Bytes::clone(&message.payload),
                    extra,
                };
                if let Err(e) = dead::publish(&self.ctx.js, letter, DEAD_LETTER_ACK_WAIT).await {
                    tracing::error!(instance_id, seq, error = %e, "Could not dead-letter an envelope; will try again.");
                    let delivered = message
                        .info()
                        .map_or(1, |i| u64::try_from(i.delivered).unwrap_or(1));
                    let wait = model::retry::transient(Stage::Deliver, delivered);
                    let _ = message.ack_with(AckKind::Nak(Some(wait))).await;
                    return;
                }
                self.deferrals.forget(seq).await;
                self.unmark_retrying(instance_id, seq, attempt).await;
                tracing::warn!(instance_id, seq, attempt, reason, %error, "Envelope dead-lettered.");
                self.ctx
                    .common
                    .dead_letters
                    .with_label_values(&["deliver", reason])
                    .inc();
                if let Err(error) = message.ack().await {
                    tracing::warn!(instance_id, seq, %error, "Ack after dead-lettering failed; a duplicate dead letter is dropped by JetStream.");
                }
            }
        }
    }
}
