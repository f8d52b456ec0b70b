//! The durable pull consumer on `ECWID_EVENTS`: one delivery attempt per message, and its
//! [`Outcome`]: ack, NAK with a delay (the server holds the wait, so it survives restarts), or
//! dead-letter then ack.
//!
//! Each attempt goes in four steps: resolve the target (instance, URL, event id), admit it
//! (breaker, instance limits, host slot), dispatch it, and decide its [`Outcome`] ([`decide`]);
//! `settle` then acks, NAKs or dead-letters.
//!
//! The attempt number is the message's delivery count less the times the replicas put it back
//! without trying (breaker open, host busy, instance at its limit: [`crate::deferrals`]), so a
//! restart loses no retry and repeats no wait. A redelivered envelope (`Ecwid-Attempt-Offset`)
//! gets a fresh budget; its attempts are numbered on in the event log, which gets a snapshot
//! after every attempt ([`crate::journal`]).
//!
//! A test envelope (`Ecwid-Test-Reply-To`, from `POST /instances/{id}/test`) is tried once, its
//! result answered on that subject; it is never retried, dead-lettered or logged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy};
use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use model::instance::Instance;
use model::retry::Stage;
use model::retry::HOST_BUSY_WAIT;
use model::state::{InstanceState, State};
use model::time_fmt::{now_unix_ms, unix_ms_to_rfc3339};
use serde::Deserialize;
use serde_json::value::RawValue;
use shared::dead::{self, DeadLetter};
use shared::nats::{
    header, headers, subject_tail, CALLBACKS_BUCKET, DELIVERER_CONSUMER, EVENTS_PREFIX,
    EVENTS_STREAM, ORDERED_PREFIX,
};
use shared::service::ServiceContext;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::dispatch::{self, Attempt, Dispatcher};
use crate::health::{Admitted, Callbacks};
use crate::hold::Hold;
use crate::journal::{self, Sent};
use crate::limits::{InstanceLimits, InstanceSlot};
use crate::metrics::Metrics;
use crate::policy::{jitter, next_wait, HostLimits};

/// How long a dead letter's publish may wait for JetStream's ack before the envelope is put
/// back to try again.
const DEAD_LETTER_ACK_WAIT: Duration = Duration::from_secs(5);

/// How long a stopping replica tries to remove its entry from the replicas' bucket.
const LEAVE_WAIT: Duration = Duration::from_millis(500);

/// What becomes of one envelope after an attempt (or instead of one).
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Ack,
    /// Try again after `delay`; `spends_attempt` is false for deferrals.
    Retry {
        delay: Duration,
        spends_attempt: bool,
    },
    Dead {
        reason: &'static str,
        error: String,
        last_status: Option<u16>,
        attempts: u64,
    },
}

/// What every attempt needs; shared by the pull loop and the ordered lanes ([`crate::ordered`]).
pub(crate) struct Worker {
    config: Config,
    ctx: ServiceContext,
    metrics: Metrics,
    dispatcher: Dispatcher,
    callbacks: Arc<Callbacks>,
    hold: Hold,
    hosts: HostLimits,
    /// Each instance's `max.in.flight` and `rate.limit`, this replica's share.
    limits: InstanceLimits,
    /// Times each message was put back without an attempt, by any replica.
    deferrals: Arc<crate::deferrals::Deferrals>,
    urls: dispatch::ParsedUrls,
}

pub async fn run(
    config: Config,
    ctx: ServiceContext,
    metrics: Metrics,
    cancel: CancellationToken,
) -> Result<(), crate::error::Error> {
    let consumer = shared::nats::ensure_pull_consumer(
        &ctx.js,
        EVENTS_STREAM,
        pull::Config {
            durable_name: Some(DELIVERER_CONSUMER.to_owned()),
            description: Some("ecwid-events deliverer replicas".to_owned()),
            // Not the ordered lanes' envelopes (`ecwid.ordered.>`): each has its own consumer.
            filter_subject: format!("{EVENTS_PREFIX}.>"),
            ack_policy: AckPolicy::Explicit,
            ack_wait: config.ack_wait(),
            max_deliver: -1,
            // Envelopes waiting for a retry count here: room for many failing endpoints.
            max_ack_pending: 100_000,
            ..Default::default()
        },
    )
    .await?;
    shared::worker::spawn_lag_reporter(
        consumer.clone(),
        DELIVERER_CONSUMER,
        ctx.common.clone(),
        cancel.clone(),
    );
    let dispatcher = Dispatcher::new(
        config.connect_timeout,
        config.timeout,
        config.allow_networks.clone(),
    )
    .map_err(crate::error::Error::Http)?;
    let concurrency = config.max_in_flight;
    let grace = config.common.shutdown_grace;
    let callbacks_kv =
        ctx.js
            .get_key_value(CALLBACKS_BUCKET)
            .await
            .map_err(|e| shared::Error::Topology {
                what: "key-value bucket",
                name: CALLBACKS_BUCKET.to_owned(),
                message: e.to_string(),
            })?;
    let callbacks = Arc::new(Callbacks::new(
        callbacks_kv,
        config.breaker_failures,
        config.breaker_cooldown,
        config.ack_wait(),
        metrics.breakers_open.clone(),
        metrics.breaker_transitions.clone(),
    ));
    callbacks.spawn(cancel.child_token());
    let hold = Hold::new(ctx.clone(), metrics.clone());
    hold.spawn_keeper(cancel.child_token());
    // Not one message before the other replicas count this one: its share of each instance's
    // limits comes from the count.
    let (membership, deferrals) =
        crate::limits::join(&ctx, metrics.replicas.clone(), &cancel).await?;
    ctx.starting.release();
    let worker = Arc::new(Worker {
        callbacks,
        hold,
        hosts: HostLimits::new(config.max_in_flight_per_host),
        limits: InstanceLimits::new(membership.view()),
        deferrals,
        urls: dispatch::ParsedUrls::default(),
        config,
        ctx,
        metrics,
        dispatcher,
    });
    // Not one message before the instances are known: its store would look unknown.
    if !worker.ctx.directory.loaded(&cancel).await {
        return Ok(());
    }
    tracing::info!(concurrency, "Deliverer consuming.");
    let held: crate::ordered::Held = {
        let ctx = worker.ctx.clone();
        Arc::new(move |id: &str| ctx.state_of(id).holds())
    };
    let lanes = crate::ordered::spawn(Arc::clone(&worker), held, cancel.clone());
    shared::worker::run_pull_loop(consumer, concurrency, cancel, grace, move |message| {
        let worker = Arc::clone(&worker);
        async move { worker.handle(message).await }
    })
    .await;
    let _ = lanes.await;
    // Bounded: NATS may be what is failing, and the shutdown has a budget. Without the goodbye
    // the entry expires on its own.
    let _ = tokio::time::timeout(LEAVE_WAIT, membership.leave()).await;
    Ok(())
}

#[derive(Deserialize)]
struct EnvelopeHead<'a> {
    #[serde(borrow)]
    message: MessageHead<'a>,
}

/// What the deliverer reads of an envelope's body: its id, and its events unread. Read once per
/// message: the envelope's raw payload makes every read a scan of ~1 KB.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct MessageHead<'a> {
    pub(crate) event_id: String,
    /// Only the event log reads them ([`crate::journal`]): a delivery does not depend on them.
    #[serde(borrow, default)]
    pub(crate) events: Option<&'a RawValue>,
}

/// The head of `payload`, or why it is not an envelope.
fn read_head(payload: &[u8]) -> Result<MessageHead<'_>, String> {
    serde_json::from_slice::<EnvelopeHead<'_>>(payload)
        .map(|h| h.message)
        .map_err(|e| format!("not an envelope: {e}"))
}

/// Where and how one envelope is sent, resolved from its instance and its head.
struct Target {
    instance: Arc<Instance>,
    url: reqwest::Url,
    event_id: String,
    /// The instance's own retry schedule, if it has one.
    own_schedule: Option<Vec<Duration>>,
}

/// What the result of attempt number `attempt` (1-based) means for its envelope, under
/// `schedule`.
pub fn decide(result: &Attempt, schedule: &[Duration], attempt: u64) -> Outcome {
    match result {
        Attempt::Delivered(_) => Outcome::Ack,
        Attempt::Gone(_) => Outcome::Dead {
            reason: "gone",
            error: "the callback answered 410 Gone".into(),
            last_status: Some(410),
            attempts: attempt,
        },
        Attempt::Refused(why) => Outcome::Dead {
            reason: "refused_address",
            error: why.clone(),
            last_status: None,
            attempts: attempt,
        },
        Attempt::Failed {
            answer,
            error,
            retry_after,
            ..
        } => match next_wait(schedule, attempt, *retry_after) {
            Some(delay) => Outcome::Retry {
                delay,
                spends_attempt: true,
            },
            None => Outcome::Dead {
                reason: "attempts_exhausted",
                error: error.clone(),
                last_status: answer.as_ref().map(|a| a.status),
                attempts: attempt,
            },
        },
    }
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
    /// its settlement (ack, NAK with the retry wait, or dead letter then ack).
    pub(crate) async fn handle(&self, message: jetstream::Message) {
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
                .ack_with(AckKind::Nak(Some(crate::ordered::HELD_RECHECK)))
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
            .attempt(&message, &head, &instance_id, attempt, deferred)
            .await;
        journal::record(
            &self.ctx.log,
            &message,
            head.as_ref().ok(),
            sent.as_ref(),
            &outcome,
        )
        .await;
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
        match self.ctx.log.get(&head.event_id).await {
            Ok(Some((record, _))) if record.attempts >= offset => record.attempts - offset + 1,
            Ok(_) => local,
            Err(error) => {
                tracing::debug!(seq, %error, "Event log unreadable; counting attempts from deliveries.");
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
    ) -> (Outcome, Option<Sent>) {
        let target = match self.resolve(head, instance_id, attempt) {
            Ok(target) => target,
            Err(dead) => return (dead, None),
        };
        let (admitted, _slots) = match self.admit(instance_id, &target, deferred).await {
            Ok(admitted) => admitted,
            Err(deferral) => return (deferral, None),
        };
        let started_at_ms = now_unix_ms();
        let started = Instant::now();
        let result = self.dispatch(message, &target, admitted).await;
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
                let result = self.dispatch(message, &target, Admitted::Request).await;
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
                "no_instance",
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

    /// Slots to send to `target` now: its breaker lets the request through (as the probe or
    /// not), its instance is within its limits ([`crate::limits`]) and its host has a free slot.
    /// Otherwise the deferral that puts the envelope back without spending an attempt.
    async fn admit(
        &self,
        instance_id: &str,
        target: &Target,
        deferred: u64,
    ) -> Result<(Admitted, (InstanceSlot, OwnedSemaphorePermit)), Outcome> {
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
        // Not waited for: a delivery of a busy instance must not hold a consumer slot.
        let instance_slot = match self.limits.admit(instance_id, &target.instance, deferred) {
            Ok(slot) => slot,
            Err((busy, delay)) => {
                self.metrics
                    .deferred
                    .with_label_values(&[busy.label()])
                    .inc();
                self.callbacks.not_sent(url.as_str(), admitted).await;
                return Err(Outcome::Retry {
                    delay,
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
        Ok((admitted, (instance_slot, slot)))
    }

    /// Signs and POSTs the envelope; counts the attempt and tells the breaker how it went.
    async fn dispatch(
        &self,
        message: &jetstream::Message,
        target: &Target,
        admitted: Admitted,
    ) -> Attempt {
        let body = message.payload.clone();
        let headers = dispatch::request_headers(
            &target.instance,
            &target.event_id,
            &body,
            now_unix_ms() / 1000,
        );
        self.metrics.in_flight.inc();
        let started = Instant::now();
        let result = self.dispatcher.post(&target.url, headers, body).await;
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

    /// Removes envelope `seq`'s retry marker, which only an envelope that failed before has.
    async fn unmark_retrying(&self, instance_id: &str, seq: u64, attempt: u64) {
        if attempt <= 1 {
            return;
        }
        if let Err(error) = shared::control::unmark_retrying(&self.ctx.js, instance_id, seq).await {
            tracing::warn!(instance_id, seq, %error, "Could not remove a retry marker; the instance's health overcounts it.");
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
                } else if let Err(error) = shared::control::mark_retrying(
                    &self.ctx.js,
                    instance_id,
                    seq,
                    DEAD_LETTER_ACK_WAIT,
                )
                .await
                {
                    tracing::warn!(instance_id, seq, %error, "Could not mark an envelope as retrying; the instance's health undercounts it.");
                }
                if let Err(error) = message.ack_with(AckKind::Nak(Some(delay))).await {
                    tracing::warn!(instance_id, seq, %error, "NAK failed; the server redelivers after ack_wait.");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::Answer;
    use model::envelope::Event;

    fn answer(status: u16) -> Option<Answer> {
        Some(Answer {
            status,
            excerpt: String::new(),
        })
    }

    fn failed(answer: Option<Answer>, retry_after: Option<Duration>) -> Attempt {
        Attempt::Failed {
            answer,
            class: "5xx",
            error: "HTTP 503".into(),
            retry_after,
        }
    }

    #[test]
    fn a_delivery_needs_only_the_envelopes_id() {
        let head = read_head(br#"{"message":{"eventId":"e1","events":[{"eventType":"CREATED","objectType":"order","objectId":"7","elementKey":"ecwid","date":"2026-01-01T00:00:00Z"}],"raw":{"a":[1,{"b":"}"}]}}}"#).unwrap();
        assert_eq!(head.event_id, "e1");
        let events: Vec<Event> = serde_json::from_str(head.events.unwrap().get()).unwrap();
        assert_eq!(events[0].object_id, "7");
        // Events the log could not read do not stop the delivery.
        let odd = read_head(br#"{"message":{"eventId":"e2","events":"?"}}"#).unwrap();
        assert_eq!(
            (odd.event_id.as_str(), odd.events.map(RawValue::get)),
            ("e2", Some(r#""?""#))
        );
        assert!(read_head(br#"{"message":{"events":[]}}"#)
            .unwrap_err()
            .starts_with("not an envelope"));
    }

    #[test]
    fn each_result_decides_the_envelopes_fate() {
        let schedule = [Duration::from_secs(10), Duration::from_secs(60)];
        let delivered = Attempt::Delivered(Answer {
            status: 204,
            excerpt: String::new(),
        });
        assert_eq!(decide(&delivered, &schedule, 1), Outcome::Ack);
        let gone = Attempt::Gone(Answer {
            status: 410,
            excerpt: "bye".into(),
        });
        assert!(matches!(
            decide(&gone, &schedule, 2),
            Outcome::Dead {
                reason: "gone",
                last_status: Some(410),
                attempts: 2,
                ..
            }
        ));
        let refused = Attempt::Refused("loopback".into());
        assert!(matches!(
            decide(&refused, &schedule, 1),
            Outcome::Dead {
                reason: "refused_address",
                last_status: None,
                ..
            }
        ));
        // A failure within the schedule waits its entry; Retry-After is clamped to it.
        let Outcome::Retry {
            delay,
            spends_attempt: true,
        } = decide(&failed(answer(503), None), &schedule, 2)
        else {
            panic!("the second failure is retried");
        };
        assert!(delay >= Duration::from_secs(48) && delay <= Duration::from_secs(72));
        assert_eq!(
            decide(
                &failed(answer(429), Some(Duration::from_secs(1))),
                &schedule,
                1
            ),
            Outcome::Retry {
                delay: Duration::from_secs(10),
                spends_attempt: true
            }
        );
        // After the last wait: dead, with the last status, or none for a connection error.
        assert_eq!(
            decide(&failed(answer(503), None), &schedule, 3),
            Outcome::Dead {
                reason: "attempts_exhausted",
                error: "HTTP 503".into(),
                last_status: Some(503),
                attempts: 3
            }
        );
        assert!(matches!(
            decide(&failed(None, None), &schedule, 3),
            Outcome::Dead {
                last_status: None,
                attempts: 3,
                ..
            }
        ));
    }
}
