//! Instance control on the admin listener: `GET /instances/{id}/health`, `POST
//! /instances/{id}/pause` and `POST /instances/{id}/resume` ([`shared::control`]).
//!
//! Pause and resume write the instance's state with compare-and-set; every deliverer replica
//! follows it. Paused (and disabled) instances' envelopes are moved into `ECWID_HELD` by the
//! deliverer as they come; after a resume the deliverers move them back. The health is read
//! fresh from JetStream on each call: the state, the callback's shared health, and four counts
//! read as throwaway consumers' pending counts (a handful of requests, however large the
//! streams).

use async_nats::jetstream::kv;
use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use model::health::CallbackHealth;
use model::instance::Instance;
use model::state::{InstanceState, State as Mode};
use model::time_fmt::{now_unix_ms, unix_ms_to_rfc3339};
use serde_json::{json, Value};
use shared::control::{self};
use shared::nats::{
    dead_subject, events_subject, CALLBACKS_BUCKET, DEAD_STREAM, DELIVERER_CONSUMER, EVENTS_STREAM,
};

use crate::state::AdminState;
use crate::stored::existing;
use shared::http::{self as error, ApiError, ApiId, JS_TIMEOUT};
/// Compare-and-set tries before a pause or resume answers 409.
const TRIES: usize = 5;

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/instances/{id}/health", get(health))
        .route("/instances/{id}/pause", post(pause))
        .route("/instances/{id}/resume", post(resume))
}

const WHAT: &str = "Instance control's JetStream call";

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::unavailable(WHAT, e)
}

async fn within<T, E: std::fmt::Display>(
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, ApiError> {
    error::within(WHAT, f).await
}

/// The stored state of `id`: active since its creation when nothing is stored.
pub async fn state_of(
    state: &AdminState,
    instance: &Instance,
) -> Result<(InstanceState, u64), ApiError> {
    let (stored, revision) = within(control::read_state(
        &state.inner.ctx.states_kv,
        &instance.id,
    ))
    .await?;
    Ok((
        stored.unwrap_or_else(|| InstanceState {
            state: Mode::Active,
            since: instance.created_date.clone().unwrap_or_default(),
            reason: None,
        }),
        revision,
    ))
}

/// Moves `id` to `to` (with `reason`) unless it is there already, counting and logging the
/// change; answers whether it changed. Retries a write that lost to another at the same moment.
pub(crate) async fn transition(
    state: &AdminState,
    id: &str,
    to: Mode,
    reason: Option<&str>,
) -> Result<bool, ApiError> {
    let store = &state.inner.ctx.states_kv;
    for _ in 0..TRIES {
        let (current, revision) = within(control::read_state(store, id)).await?;
        let from = current.map_or(Mode::Active, |c| c.state);
        if from == to {
            return Ok(false);
        }
        let next = InstanceState::new(to, now_unix_ms(), reason.map(str::to_owned));
        let written = within(async {
            match control::write_state(store, id, &next, revision).await {
                Err(control::ControlError::Conflict) => Ok(false),
                other => other.map(|()| true),
            }
        })
        .await?;
        if written {
            state
                .inner
                .metrics
                .instance_transitions
                .with_label_values(&[to.as_str()])
                .inc();
            tracing::info!(instance_id = %id, state = to.as_str(), from = from.as_str(), reason, "Instance state changed.");
            return Ok(true);
        }
    }
    Err(ApiError::Conflict(format!(
        "the state of instance {id} kept changing; try again"
    )))
}

/// Moves `id` to `to` (from any other state), answering the new state and what is held.
async fn set(state: &AdminState, id: &str, to: Mode) -> Result<Json<Value>, ApiError> {
    let (instance, _) = existing(&state.inner.ctx.kv, id).await?;
    transition(state, id, to, None).await?;
    let (next, _) = state_of(state, &instance).await?;
    let held = within(control::held_count(&state.inner.ctx.js, id)).await?;
    Ok(Json(json!({
        "id": id,
        "state": next.state,
        "since": next.since,
        "reason": next.reason,
        "held": held,
    })))
}

async fn pause(State(state): State<AdminState>, ApiId(id): ApiId) -> Result<Json<Value>, ApiError> {
    set(&state, &id, Mode::Paused).await
}

async fn resume(
    State(state): State<AdminState>,
    ApiId(id): ApiId,
) -> Result<Json<Value>, ApiError> {
    set(&state, &id, Mode::Active).await
}

async fn callback_health(state: &AdminState, url: &str) -> Result<CallbackHealth, ApiError> {
    let store: kv::Store = within(state.inner.ctx.js.get_key_value(CALLBACKS_BUCKET)).await?;
    let entry = within(store.entry(model::health::callback_key(url))).await?;
    Ok(entry
        .filter(|e| e.operation == kv::Operation::Put)
        .and_then(|e| serde_json::from_slice(&e.value).ok())
        .unwrap_or_default())
}

/// Envelopes of `id` no deliverer has taken yet: those past the deliverer consumer's delivered
/// sequence, or, for an ordered instance, those its lane has not handed out.
async fn waiting(state: &AdminState, instance: &Instance) -> Result<u64, ApiError> {
    let id = instance.id.as_str();
    let js = &state.inner.ctx.js;
    if instance.ordered() {
        let stream = within(js.get_stream_no_info(EVENTS_STREAM)).await?;
        return Ok(
            match tokio::time::timeout(
                JS_TIMEOUT,
                stream.consumer_info(shared::ordered::consumer_name(id)),
            )
            .await
            {
                // Waiting, and the one handed out (in flight, or back in line after a pause).
                Ok(Ok(info)) => info.num_pending + info.num_ack_pending as u64,
                // No lane yet: no deliverer has seen the instance as ordered.
                Ok(Err(_)) => 0,
                Err(_) => return Err(unavailable("JetStream did not answer in time")),
            },
        );
    }
    let delivered = match within(
        js.get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
            DELIVERER_CONSUMER,
            EVENTS_STREAM,
        ),
    )
    .await
    {
        Ok(mut consumer) => within(consumer.info()).await?.delivered.stream_sequence,
        // No deliverer has started yet: nothing was taken.
        Err(_) => 0,
    };
    within(control::count_subject_from(
        js,
        EVENTS_STREAM,
        &events_subject(id),
        Some(delivered + 1),
    ))
    .await
}

fn time(ms: Option<i64>) -> Value {
    ms.map_or(Value::Null, |ms| Value::String(unix_ms_to_rfc3339(ms)))
}

async fn health(
    State(state): State<AdminState>,
    ApiId(id): ApiId,
) -> Result<Json<Value>, ApiError> {
    let (instance, _) = existing(&state.inner.ctx.kv, &id).await?;
    let (current, _) = state_of(&state, &instance).await?;
    let callback = match instance.callback_url() {
        Some(url) => callback_health(&state, url).await?,
        None => CallbackHealth::default(),
    };
    let js = &state.inner.ctx.js;
    let dead_letters = dead_subject("deliver", &id);
    let (held, retrying, dead, waiting) = tokio::try_join!(
        within(control::held_count(js, &id)),
        within(control::retrying_count(js, &id)),
        within(control::count_subject(js, DEAD_STREAM, &dead_letters)),
        waiting(&state, &instance),
    )?;
    let blocked = if instance.ordered() {
        within(shared::ordered::blocked_head(js, &state.inner.ctx.log, &id)).await?
    } else {
        None
    };
    let now = now_unix_ms();
    Ok(Json(json!({
        "id": id,
        "state": current.state,
        "since": current.since,
        "reason": current.reason,
        "lastSuccessAt": time(callback.last_success_at_ms),
        "lastFailureAt": time(callback.last_failure_at_ms),
        "consecutiveFailures": callback.consecutive_failures,
        "failingSince": time(callback.failing_since_ms),
        "successRate1h": callback.success_rate(now),
        "backlog": waiting + held,
        "held": held,
        "retrying": retrying,
        "dead": dead,
        "breaker": callback.breaker,
        "lastError": callback.last_error,
        "ordered": instance.ordered(),
        "blockedEvent": blocked,
        "clientCertificateExpiresAt": time(
            instance
                .client_certificate_expires_at()
                .map(|secs| secs.saturating_mul(1000))
        ),
    })))
}
