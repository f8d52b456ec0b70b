//! `DELETE /stores/{storeId}/data` (admin token only): removes what ecwid-events keeps of a
//! store, for a data-protection request or a merchant who left: its event log records with
//! their attempts, its dead letters, and its instances' held envelopes. With
//! `?objectType=&objectId=` only that object's (a customer's removal request).
//!
//! What it cannot reach, and says so in the README: envelopes and raw webhooks still in the work
//! streams (`ECWID_RAW`, `ECWID_EVENTS`: at most 7 days, or `EVENT_LOG_RETENTION` if longer),
//! which the pipeline needs until they are delivered; and rows written after the purge by work
//! still in flight (a retry, a spooled batch).

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use axum::extract::{Path, State};
use axum::routing::delete;
use axum::{Extension, Json, Router};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shared::http::{ApiError, ApiQuery};
use shared::nats::{dead_subject, DEAD_STREAM, HELD_STREAM};

use crate::auth::Role;
use crate::state::AdminState;

pub fn routes() -> Router<AdminState> {
    Router::new().route("/stores/{storeId}/data", delete(purge))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PurgeQuery {
    object_type: Option<String>,
    object_id: Option<String>,
}

/// How long the JetStream side of one purge may take.
const JS_WAIT: Duration = Duration::from_secs(30);

async fn purge(
    State(state): State<AdminState>,
    Extension(role): Extension<Role>,
    Path(store_id): Path<String>,
    ApiQuery(q): ApiQuery<PurgeQuery>,
) -> Result<Json<Value>, ApiError> {
    if !model::ecwid::is_store_id(&store_id) {
        return Err(ApiError::bad_request(
            "invalid_store",
            "storeId must be the numeric Ecwid store id",
        ));
    }
    let object =
        match (q.object_type, q.object_id) {
            (None, None) => None,
            (Some(t), Some(id)) if !t.is_empty() && !id.is_empty() => Some((t, id)),
            _ => return Err(ApiError::bad_request(
                "invalid_query",
                "objectType and objectId go together: give both, or neither for the whole store",
            )),
        };
    let removed = purge_store(&state.inner.ctx, &store_id, object.as_ref()).await?;
    let (object_type, object_id) = object.clone().unzip();
    tracing::info!(
        store_id,
        object_type,
        object_id,
        role = ?role,
        log_events = removed.event_log_records,
        log_attempts = removed.event_log_attempts,
        dead_letters = removed.dead_letters,
        held = removed.held_envelopes,
        "Store data purged."
    );
    Ok(Json(json!({
        "storeId": store_id,
        "objectType": object_type,
        "objectId": object_id,
        "removed": removed,
    })))
}

/// What one purge removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Removed {
    pub event_log_records: u64,
    pub event_log_attempts: u64,
    pub dead_letters: u64,
    pub held_envelopes: u64,
}

/// Removes what ecwid-events keeps of `store_id` (with `object`, only what is about that
/// object): event log records and attempts, dead letters, held envelopes of its instances.
/// The admin API's purge and the app's purge after an uninstall both go through here.
pub async fn purge_store(
    ctx: &shared::service::ServiceContext,
    store_id: &str,
    object: Option<&(String, String)>,
) -> Result<Removed, ApiError> {
    let (events, attempts) = if ctx.log.enabled() {
        shared::eventlog::purge(&ctx.log, store_id, object)
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))?
    } else {
        (0, 0)
    };
    let instances: Vec<String> = ctx
        .directory
        .for_store(store_id)
        .iter()
        .map(|i| i.id.clone())
        .collect();
    let mut dead_subjects = vec![dead_subject("normalize", store_id)];
    dead_subjects.extend(instances.iter().map(|i| dead_subject("deliver", i)));
    let held_subjects: Vec<String> = instances
        .iter()
        .map(|i| shared::control::held_subject(i))
        .collect();
    let js_side = async {
        let dead = remove(ctx, DEAD_STREAM, &dead_subjects, object).await?;
        let held = remove(ctx, HELD_STREAM, &held_subjects, object).await?;
        Ok::<_, String>((dead, held))
    };
    let (dead, held) = tokio::time::timeout(JS_WAIT, js_side)
        .await
        .map_err(|_| ApiError::Timeout("JetStream did not finish the purge in time; the log rows are gone, run it again for the rest".to_owned()))?
        .map_err(ApiError::Unavailable)?;
    Ok(Removed {
        event_log_records: events,
        event_log_attempts: attempts,
        dead_letters: dead,
        held_envelopes: held,
    })
}

/// Removes the messages of `subjects` in `stream`: all of them, or with `object` those whose
/// envelope is about that object. How many went.
async fn remove(
    ctx: &shared::service::ServiceContext,
    stream: &str,
    subjects: &[String],
    object: Option<&(String, String)>,
) -> Result<u64, String> {
    let stream = ctx.js.get_stream(stream).await.map_err(|e| e.to_string())?;
    let mut removed = 0;
    for subject in subjects {
        let Some((object_type, object_id)) = object else {
            let purged = stream
                .purge()
                .filter(subject.clone())
                .await
                .map_err(|e| e.to_string())?;
            removed += purged.purged;
            continue;
        };
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: subject.clone(),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        if consumer.cached_info().num_pending == 0 {
            continue;
        }
        let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
        while let Some(message) = messages.next().await {
            let message = message.map_err(|e| e.to_string())?;
            let info = message.info().map_err(|e| e.to_string())?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            if about(&message.payload, object_type, object_id) {
                stream
                    .delete_message(seq)
                    .await
                    .map_err(|e| e.to_string())?;
                removed += 1;
            }
            if pending == 0 {
                break;
            }
        }
    }
    Ok(removed)
}

/// Whether `payload` (an envelope, or a raw Ecwid webhook) is about `object_type`/`object_id`.
fn about(payload: &[u8], object_type: &str, object_id: &str) -> bool {
    let Ok(v) = serde_json::from_slice::<Value>(payload) else {
        return false;
    };
    let envelope = v["message"]["events"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|e| e["objectType"] == object_type && e["objectId"] == object_id);
    // A raw v3 webhook names its entity by `entityId`; its type by `eventType`'s prefix.
    let raw = v["entityId"].to_string().trim_matches('"') == object_id
        && v["eventType"]
            .as_str()
            .and_then(|t| t.split('.').next())
            .is_some_and(|t| object_type.trim_end_matches('s') == t);
    envelope || raw
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_and_raw_webhooks_are_matched_by_their_object() {
        let envelope =
            json!({"message": {"events": [{"objectType": "orders", "objectId": "XJ7"}]}});
        let bytes = serde_json::to_vec(&envelope).unwrap();
        assert!(about(&bytes, "orders", "XJ7"));
        assert!(!about(&bytes, "orders", "XJ8"));
        let raw = json!({"eventType": "customer.updated", "entityId": 42});
        let bytes = serde_json::to_vec(&raw).unwrap();
        assert!(about(&bytes, "customers", "42"));
        assert!(!about(&bytes, "orders", "42"));
        assert!(!about(b"not json", "orders", "1"));
    }
}
