//! The poller's part of the admin API: `POST /instances/{id}/backfill` polls a past window once
//! (asked of a poller replica over NATS request/reply, see the poller's `backfill` module: only
//! the poller talks to Ecwid), and `GET /instances/{id}/poller` shows the store's last poll
//! (`pollerStatus`, `lastPollError`) and its cursors.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use model::ecwid::PollEntity;
use model::instance::keys;
use model::time_fmt::Rfc3339Time;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::state::AdminState;
use shared::http::{ApiError, ApiId, JS_TIMEOUT};

/// How long a backfill may take before the answer is 504 (the poller finishes it anyway; asking
/// again stores nothing twice).
pub const BACKFILL_TIMEOUT: Duration = Duration::from_secs(300);
/// The objectTypes the poller can read (the normalizer's names of [`PollEntity`]).
pub const POLLED_OBJECTS: [&str; 6] = [
    "orders",
    "abandonedCarts",
    "products",
    "customers",
    "discountCoupons",
    "reviews",
];

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/instances/{id}/backfill", post(backfill))
        .route("/instances/{id}/poller", get(poller_status))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackfillBody {
    since: Rfc3339Time,
    until: Rfc3339Time,
    #[serde(default)]
    objects: Option<Objects>,
}

/// `objects` as a list or a comma-separated string, like `event.objects`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Objects {
    List(Vec<String>),
    Csv(String),
}

const WHAT: &str = "Backfill or poller status";

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::unavailable(WHAT, e)
}

async fn backfill(
    State(state): State<AdminState>,
    ApiId(id): ApiId,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let body: BackfillBody = shared::http::parse_json(&body)?;
    let (instance, _) = crate::stored::existing(&state.inner.ctx.kv, &id).await?;
    if instance.api_token().is_none() {
        return Err(ApiError::unprocessable(
            format!("configuration.{}", keys::API_TOKEN),
            "is required to backfill: the poller reads Ecwid's REST API with it",
        ));
    }
    let since = body.since.unix_ms().div_euclid(1000);
    let until = body.until.unix_ms().div_euclid(1000);
    let now = model::time_fmt::now_unix_ms() / 1000;
    if since >= until {
        return Err(ApiError::unprocessable("until", "must be later than since"));
    }
    if until > now {
        return Err(ApiError::unprocessable(
            "until",
            "must not be in the future",
        ));
    }
    let objects = match body.objects {
        None => None,
        Some(o) => {
            let list: Vec<String> = match o {
                Objects::List(l) => l,
                Objects::Csv(s) => s.split(',').map(|p| p.trim().to_owned()).collect(),
            };
            if list.is_empty() {
                return Err(ApiError::unprocessable(
                    "objects",
                    "is empty: name at least one object type, or leave objects out for all",
                ));
            }
            if let Some(bad) = list.iter().find(|o| !POLLED_OBJECTS.contains(&o.as_str())) {
                return Err(ApiError::unprocessable(
                    "objects",
                    format!("`{bad}` is not polled; use {}", POLLED_OBJECTS.join(", ")),
                ));
            }
            Some(list)
        }
    };
    let request = json!({"instanceId": id, "since": since, "until": until, "objects": objects});
    let ask = async_nats::Request::new()
        .payload(request.to_string().into())
        .timeout(Some(BACKFILL_TIMEOUT));
    let answer = state
        .inner
        .ctx
        .client
        .send_request(shared::nats::BACKFILL_SUBJECT, ask)
        .await
        .map_err(|e| match e.kind() {
            async_nats::client::RequestErrorKind::TimedOut => ApiError::Timeout(
                "the backfill did not finish in time; it goes on, and asking again stores nothing twice"
                    .into(),
            ),
            async_nats::client::RequestErrorKind::NoResponders => {
                ApiError::Unavailable("no poller is running".into())
            }
            _ => unavailable(e),
        })?;
    let reply: Value = serde_json::from_slice(&answer.payload).map_err(unavailable)?;
    match reply["kind"].as_str() {
        None => Ok(Json(json!({
            "instanceId": id,
            "since": body.since,
            "until": body.until,
            "stored": reply["counts"]["stored"],
            "duplicates": reply["counts"]["duplicates"],
            "skipped": reply["counts"]["skipped"],
            "seen": reply["counts"]["seen"],
        }))),
        Some("refused") => Err(ApiError::unprocessable(
            format!("configuration.{}", keys::API_TOKEN),
            reply["error"]
                .as_str()
                .unwrap_or("Ecwid refused the token")
                .to_owned(),
        )),
        Some("invalid") => Err(ApiError::unprocessable(
            "instance",
            reply["error"]
                .as_str()
                .unwrap_or("cannot be backfilled")
                .to_owned(),
        )),
        Some(_) => Err(unavailable(
            reply["error"].as_str().unwrap_or("backfill failed"),
        )),
    }
}

async fn poller_status(
    State(state): State<AdminState>,
    ApiId(id): ApiId,
) -> Result<Json<Value>, ApiError> {
    let (instance, _) = crate::stored::existing(&state.inner.ctx.kv, &id).await?;
    let store = instance.store_id().unwrap_or_default().to_owned();
    let bucket = shared::http::within(
        WHAT,
        state
            .inner
            .ctx
            .js
            .get_key_value(shared::nats::POLL_STATE_BUCKET),
    )
    .await?;
    let get = |key: String| {
        let bucket = bucket.clone();
        async move {
            tokio::time::timeout(JS_TIMEOUT, bucket.get(key))
                .await
                .ok()
                .and_then(Result::ok)
                .flatten()
        }
    };
    let status: Value = get(format!("status.{store}"))
        .await
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    let mut cursors = serde_json::Map::new();
    for entity in PollEntity::ALL {
        if let Some(v) = get(format!("cursor.{store}.{}", entity.path())).await {
            let at = std::str::from_utf8(&v)
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
                .and_then(model::time_fmt::unix_secs_to_rfc3339);
            cursors.insert(entity.path().to_owned(), json!(at));
        }
    }
    Ok(Json(json!({
        "instanceId": id,
        "storeId": store,
        "polling": instance.polls(),
        "pollerStatus": status["state"],
        "lastPollAt": status["lastPollAt"],
        "lastPollError": status["lastPollError"],
        "retryAt": status["retryAt"],
        "cursors": cursors,
    })))
}
