//! The instance API on the admin listener, behind `Authorization: Bearer $ADMIN_TOKEN` (or
//! `$ADMIN_READ_TOKEN`, which may only read). Instances live in the `ECWID_INSTANCES` bucket;
//! reads here go to the bucket (not the watched copy) so a client reads its own writes. Secret
//! values never leave in full. The console's files and the OpenAPI document ([`crate::console`])
//! are mounted here too, outside the token check: they hold no data.

use async_nats::jetstream::kv;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::StreamExt;
use model::instance::{new_instance_id, Instance, InstancePatch};
use serde::{Deserialize, Serialize};
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::state::AppState;
use crate::stored::{existing, load};
use shared::http::{self as error, parse_json, ApiError, ApiId, ApiQuery};

/// The largest admin request body. An instance within its field limits
/// ([`model::instance::limits`]) fits well inside; a larger body gets 413.
pub const MAX_BODY_BYTES: usize = 512 * 1024;

pub fn router(state: AppState) -> Router {
    let panics = state.inner.ctx.common.http_panics.clone();
    let router = Router::new()
        .route("/whoami", get(whoami))
        .route("/instances", get(list).post(create))
        .route("/instances/{id}", get(show).patch(update).delete(remove))
        .merge(crate::dead_letters::routes())
        .merge(crate::events::routes())
        .merge(crate::control::routes())
        .merge(crate::backfill::routes())
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        // Added after the token layer, so not behind it: static files and the API's description.
        .merge(crate::console::routes())
        .layer(middleware::from_fn(error::json_errors))
        .with_state(state);
    shared::ops::catch_panics(router, panics)
}

/// Who a bearer token makes the caller; `GET /whoami` tells the console which actions to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// `ADMIN_TOKEN`: everything.
    Admin,
    /// `ADMIN_READ_TOKEN`: every `GET`, nothing else.
    Read,
}

impl Role {
    /// Whether this role may make a request with `method`.
    pub fn may(self, method: &Method) -> bool {
        self == Role::Admin || method == Method::GET || method == Method::HEAD
    }
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is matched in any case
/// (RFC 9110 §11.1: `bearer`, `BEARER` are the same scheme).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn token_matches(given: &str, expected: &str) -> bool {
    bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
}

async fn require_token(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    let Some(given) = given else {
        return ApiError::Unauthorized("send Authorization: Bearer <ADMIN_TOKEN>".into())
            .into_response();
    };
    let config = &state.inner.config;
    // Both comparisons always run, so the time taken does not say which token was close.
    let admin = token_matches(given, config.admin_token.expose());
    let read = config
        .admin_read_token
        .as_ref()
        .is_some_and(|t| token_matches(given, t.expose()));
    let role = match (admin, read) {
        (true, _) => Role::Admin,
        (false, true) => Role::Read,
        (false, false) => {
            return ApiError::Unauthorized("the bearer token is wrong".into()).into_response()
        }
    };
    if !role.may(request.method()) {
        return forbidden(request.method());
    }
    request.extensions_mut().insert(role);
    next.run(request).await
}

/// 403 for the read-only token asking to change something. Built here rather than as an
/// [`ApiError`] variant: it is the only place that refuses a known caller.
fn forbidden(method: &Method) -> Response {
    (
        StatusCode::FORBIDDEN,
        Json(json!({
            "error": "forbidden",
            "message": format!(
                "the read-only token (ADMIN_READ_TOKEN) may only GET; {method} needs ADMIN_TOKEN"
            ),
        })),
    )
        .into_response()
}

/// `GET /whoami`: `{"role": "admin" | "read"}`.
async fn whoami(axum::Extension(role): axum::Extension<Role>) -> Json<serde_json::Value> {
    Json(json!({ "role": role }))
}

const WHAT: &str = "An instances bucket operation";

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::unavailable(WHAT, e)
}

async fn within<T, E: std::fmt::Display>(
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, ApiError> {
    error::within(WHAT, f).await
}

fn check(state: &AppState, instance: &Instance) -> Result<(), ApiError> {
    let config = &state.inner.config;
    let retention = config
        .common
        .event_log
        .then_some(config.common.event_log_retention);
    instance
        .validate(&config.allow_networks)
        .and_then(|()| instance.validate_log_retention(retention))
        .map_err(|e| ApiError::unprocessable(e.field, e.message))
}

fn now() -> String {
    model::time_fmt::unix_ms_to_rfc3339(model::time_fmt::now_unix_ms())
}

async fn create(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let mut instance: Instance = parse_json(&body)?;
    check(&state, &instance)?;
    instance.id = new_instance_id();
    instance.created_date = Some(now());
    instance.updated_date = instance.created_date.clone();
    let value = serde_json::to_vec(&instance).map_err(unavailable)?;
    within(state.inner.ctx.kv.create(&instance.id, value.into())).await?;
    tracing::info!(instance_id = %instance.id, store_id = instance.store_id().unwrap_or(""), "Instance created.");
    let location = format!("/instances/{}", instance.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(instance.redacted()),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    store_id: Option<String>,
}

async fn list(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let store = &state.inner.ctx.kv;
    let keys: Vec<String> = within(store.keys())
        .await?
        .filter_map(|k| async move { k.ok() })
        .collect()
        .await;
    let mut instances = Vec::with_capacity(keys.len());
    for key in keys {
        if let Some(instance) = load(store, &key).await?.map(|(i, _)| i) {
            if q.store_id
                .as_deref()
                .is_none_or(|s| instance.store_id() == Some(s))
            {
                instances.push(instance);
            }
        }
    }
    instances.sort_by(|a, b| a.created_date.cmp(&b.created_date).then(a.id.cmp(&b.id)));
    let mut shown = Vec::with_capacity(instances.len());
    for instance in instances {
        shown.push(with_state(&state, &instance).await?);
    }
    Ok(Json(json!({"instances": shown})))
}

/// The instance as the API shows it: redacted, with its `state` (active, paused, disabled).
async fn with_state(state: &AppState, instance: &Instance) -> Result<serde_json::Value, ApiError> {
    let (current, _) = crate::control::state_of(state, instance).await?;
    let mut shown = serde_json::to_value(instance.redacted()).map_err(unavailable)?;
    if let Some(map) = shown.as_object_mut() {
        map.insert("state".to_owned(), json!(current.state));
    }
    Ok(shown)
}

async fn show(
    State(state): State<AppState>,
    ApiId(id): ApiId,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (instance, _) = existing(&state.inner.ctx.kv, &id).await?;
    Ok(Json(with_state(&state, &instance).await?))
}

async fn update(
    State(state): State<AppState>,
    ApiId(id): ApiId,
    body: Bytes,
) -> Result<Json<Instance>, ApiError> {
    let patch: InstancePatch = parse_json(&body)?;
    let store = &state.inner.ctx.kv;
    // Optimistic concurrency: apply to the revision we read; retry if another writer won.
    for _ in 0..5 {
        let (mut instance, revision) = existing(store, &id).await?;
        instance.apply(patch.clone());
        check(&state, &instance)?;
        instance.updated_date = Some(now());
        let value = serde_json::to_vec(&instance).map_err(unavailable)?;
        match tokio::time::timeout(error::JS_TIMEOUT, store.update(&id, value.into(), revision))
            .await
        {
            Ok(Ok(_)) => {
                tracing::info!(instance_id = %id, "Instance updated.");
                return Ok(Json(instance.redacted()));
            }
            Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
            Ok(Err(e)) => return Err(unavailable(e)),
            Err(_) => return Err(unavailable("the instances bucket did not answer in time")),
        }
    }
    Err(ApiError::Conflict(format!(
        "instance {id} kept changing; try again"
    )))
}

async fn remove(State(state): State<AppState>, ApiId(id): ApiId) -> Result<StatusCode, ApiError> {
    let store = &state.inner.ctx.kv;
    existing(store, &id).await?;
    within(store.delete(&id)).await?;
    // Its state goes with it: an instance created again under this id starts active. Its held
    // envelopes are released by the deliverers and dead-lettered there (no instance).
    if let Err(error) = state.inner.ctx.states_kv.purge(&id).await {
        tracing::warn!(instance_id = %id, %error, "Could not remove the state of a deleted instance.");
    }
    tracing::info!(instance_id = %id, "Instance deleted.");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_matched_in_any_case() {
        for value in ["Bearer abc", "bearer abc", "BEARER  abc ", "bEaReR abc"] {
            assert_eq!(bearer_token(value), Some("abc"), "{value}");
        }
        for value in ["Basic abc", "Bearer", "Bearer ", "Bearerabc", ""] {
            assert_eq!(bearer_token(value), None, "{value}");
        }
    }
}
