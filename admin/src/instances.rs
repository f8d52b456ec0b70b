//! The instances: create, list, show, update, delete. Instances live in the `ECWID_INSTANCES`
//! bucket; reads here go to the bucket (not the watched copy) so a client reads its own writes.
//! Secret values never leave in full.

use async_nats::jetstream::kv;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use model::instance::{new_instance_id, Instance, InstancePatch, ProvisionedBy};
use serde::Deserialize;
use serde_json::json;

use crate::state::AdminState;
use crate::stored::{existing, load, unavailable, within};
use shared::http::{self as error, parse_json, ApiError, ApiId, ApiQuery};

fn check(state: &AdminState, instance: &Instance) -> Result<(), ApiError> {
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

pub(crate) async fn create(
    State(state): State<AdminState>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let mut instance: Instance = parse_json(&body)?;
    check(&state, &instance)?;
    instance.id = new_instance_id();
    // Only an install of the Ecwid app makes an app instance.
    instance.provisioned_by = ProvisionedBy::Admin;
    instance.app = None;
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
pub(crate) struct ListQuery {
    store_id: Option<String>,
}

pub(crate) async fn list(
    State(state): State<AdminState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let store = &state.inner.ctx.kv;
    let keys = crate::stored::ids(store).await?;
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
async fn with_state(
    state: &AdminState,
    instance: &Instance,
) -> Result<serde_json::Value, ApiError> {
    let (current, _) = crate::control::state_of(state, instance).await?;
    let mut shown = serde_json::to_value(instance.redacted()).map_err(unavailable)?;
    if let Some(map) = shown.as_object_mut() {
        map.insert("state".to_owned(), json!(current.state));
    }
    Ok(shown)
}

pub(crate) async fn show(
    State(state): State<AdminState>,
    ApiId(id): ApiId,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (instance, _) = existing(&state.inner.ctx.kv, &id).await?;
    Ok(Json(with_state(&state, &instance).await?))
}

pub(crate) async fn update(
    State(state): State<AdminState>,
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

pub(crate) async fn remove(
    State(state): State<AdminState>,
    ApiId(id): ApiId,
) -> Result<StatusCode, ApiError> {
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
