//! The webhook endpoints: `POST /events/ecwid` and its Open Connectors alias. A request is
//! answered 200 only after JetStream acknowledged the publish to `ecwid.raw.<storeId>`.

use std::time::Instant;

use async_nats::HeaderMap as NatsHeaders;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::json;
use shared::nats::{headers, raw_subject};
use tracing::Instrument;

use crate::error::{self, ApiError};
use crate::parse::{self, Format};
use crate::verify;
use crate::AppState;

pub const WEBHOOK_PATH: &str = "/events/ecwid";
pub const OPEN_CONNECTORS_PATH: &str = "/elements/api-v2/events/ecwid";

pub fn router(state: AppState) -> Router {
    Router::new()
        .route(WEBHOOK_PATH, post(receive))
        .route(OPEN_CONNECTORS_PATH, post(receive))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .with_state(state)
}

/// What the ingest learned of a request before publishing it.
struct Accepted {
    format: Format,
    store_id: String,
    msg_id: String,
    verified: bool,
    payload: Bytes,
}

async fn receive(
    State(state): State<AppState>,
    request_headers: HeaderMap,
    body: Body,
) -> Response {
    let request_id = request_id(&request_headers);
    let traceparent = traceparent(&request_headers);
    let trace_id = traceparent.split('-').nth(1).unwrap_or_default().to_owned();
    let span = tracing::info_span!("webhook", trace_id, request_id);
    receive_traced(state, request_headers, body, request_id, traceparent)
        .instrument(span)
        .await
}

async fn receive_traced(
    state: AppState,
    request_headers: HeaderMap,
    body: Body,
    request_id: String,
    traceparent: String,
) -> Response {
    let started = Instant::now();
    let received_at = shared::time_fmt::now_unix_ms();
    let m = &state.inner.metrics;
    let mut format = "unknown";
    let result = async {
        let accepted = accept(&state, &request_headers, body, &mut format).await?;
        publish(&state, accepted, received_at, &request_id, traceparent).await
    }
    .await;
    let (outcome, mut response) = match result {
        Ok(duplicate) => {
            let status = if duplicate { "duplicate" } else { "accepted" };
            tracing::debug!(format, duplicate, "Webhook accepted.");
            (
                status,
                Json(json!({"status": status, "duplicate": duplicate, "requestId": request_id}))
                    .into_response(),
            )
        }
        Err(err) => {
            match &err {
                ApiError::Unavailable(cause) => {
                    tracing::warn!(
                        format,
                        cause,
                        "Webhook refused with 503: JetStream did not take it."
                    );
                }
                other => {
                    tracing::info!(format, status = other.status().as_u16(), error = %other, "Webhook refused.")
                }
            }
            (err.outcome(), err.into_response())
        }
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", v);
    }
    m.requests.with_label_values(&[outcome, format]).inc();
    m.request_duration
        .with_label_values(&[format])
        .observe(started.elapsed().as_secs_f64());
    response
}

/// Reads, parses, routes and verifies the request.
async fn accept(
    state: &AppState,
    request_headers: &HeaderMap,
    body: Body,
    format_label: &mut &'static str,
) -> Result<Accepted, ApiError> {
    let config = &state.inner.config;
    let content_type = request_headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    // With a content type the format is known (or refused) before the body is read; without
    // one it is sniffed from the body.
    let declared = content_type
        .map(|ct| parse::detect_format(Some(ct), &[]))
        .transpose()?;
    if let Some(f) = declared {
        *format_label = f.as_str();
    }
    let body = read_body(request_headers, body, config.max_body_bytes).await?;
    let format = match declared {
        Some(f) => f,
        None => parse::detect_format(None, &body)?,
    };
    *format_label = format.as_str();
    let directory = &state.inner.ctx.directory;
    if !directory.is_loaded() {
        return Err(ApiError::Unavailable("instances not loaded yet".into()));
    }
    let accepted = match format {
        Format::V3 => {
            let head = parse::parse_v3(&body)?;
            if let Some(max_age) = config.max_event_age {
                let age = shared::time_fmt::now_unix_ms() / 1000 - head.event_created;
                if age > max_age.as_secs() as i64 {
                    return Err(ApiError::bad_request(
                        "stale_event",
                        format!(
                            "eventCreated is {age} s old, over INGEST_MAX_EVENT_AGE_SECS ({} s)",
                            max_age.as_secs()
                        ),
                    ));
                }
            }
            let instances = directory.for_store(&head.store_id);
            if instances.is_empty() {
                return Err(unknown_store(&head.store_id));
            }
            let secrets: Vec<&str> = instances.iter().filter_map(|i| i.client_secret()).collect();
            let verified = if secrets.is_empty() {
                false
            } else {
                let signature = request_headers
                    .get(verify::SIGNATURE_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| {
                        ApiError::Unauthorized("X-Ecwid-Webhook-Signature is missing".into())
                    })?;
                if !verify::verify(
                    secrets,
                    &head.event_created.to_string(),
                    &head.event_id,
                    signature,
                ) {
                    return Err(ApiError::Unauthorized(
                        "X-Ecwid-Webhook-Signature does not match the store's client secret".into(),
                    ));
                }
                true
            };
            Accepted {
                format,
                msg_id: parse::v3_msg_id(&head),
                store_id: head.store_id,
                verified,
                payload: body,
            }
        }
        Format::Ion => {
            let ion = parse::parse_ion(&body)?;
            if directory.for_store(&ion.store_id).is_empty() {
                return Err(unknown_store(&ion.store_id));
            }
            Accepted {
                format,
                msg_id: ion.msg_id(),
                payload: Bytes::from(ion.to_json()),
                store_id: ion.store_id,
                verified: false,
            }
        }
    };
    if !accepted.verified {
        if config.require_signature {
            return Err(ApiError::Unauthorized(format!(
                "unsigned events are refused (INGEST_REQUIRE_SIGNATURE=true){}",
                match format {
                    Format::V3 => "; give the store's instance an ecwid.client.secret",
                    Format::Ion => "; Instant Order Notifications carry no signature",
                }
            )));
        }
        state
            .inner
            .metrics
            .unverified
            .with_label_values(&[format.as_str()])
            .inc();
    }
    Ok(accepted)
}

fn unknown_store(store_id: &str) -> ApiError {
    ApiError::NotFound {
        code: "unknown_store",
        message: format!("no instance is configured for store {store_id}"),
    }
}

/// Reads the body, refusing it (413) as soon as it passes `limit`: from Content-Length when the
/// client sends one, and while streaming otherwise.
async fn read_body(
    request_headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let declared = request_headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::TooLarge { limit });
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = source {
            if s.is::<http_body_util::LengthLimitError>() {
                return ApiError::TooLarge { limit };
            }
            source = s.source();
        }
        ApiError::bad_request("invalid_body", format!("the body could not be read: {e}"))
    })
}

/// Publishes to `ecwid.raw.<storeId>` and waits for the ack. Returns whether JetStream saw the
/// message id before (a duplicate).
async fn publish(
    state: &AppState,
    accepted: Accepted,
    received_at: i64,
    request_id: &str,
    traceparent: String,
) -> Result<bool, ApiError> {
    let mut h = NatsHeaders::new();
    h.insert(headers::MSG_ID, accepted.msg_id.as_str());
    h.insert(headers::RECEIVED_AT, received_at.to_string());
    h.insert(headers::FORMAT, accepted.format.as_str());
    h.insert(
        headers::VERIFIED,
        if accepted.verified { "true" } else { "false" },
    );
    h.insert(headers::REQUEST_ID, request_id);
    h.insert(headers::STORE_ID, accepted.store_id.as_str());
    h.insert(headers::TRACEPARENT, traceparent);
    let js = &state.inner.ctx.js;
    let timeout = state.inner.config.publish_timeout;
    let started = Instant::now();
    let publish = async {
        js.publish_with_headers(raw_subject(&accepted.store_id), h, accepted.payload)
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())
    };
    let ack = match tokio::time::timeout(timeout, publish).await {
        Ok(Ok(ack)) => ack,
        Ok(Err(cause)) => return Err(ApiError::Unavailable(cause)),
        Err(_) => return Err(ApiError::Unavailable(format!("no ack within {timeout:?}"))),
    };
    state
        .inner
        .metrics
        .publish_duration
        .observe(started.elapsed().as_secs_f64());
    Ok(ack.duplicate)
}

/// The caller's `X-Request-Id` when it is short and printable, otherwise a new one.
fn request_id(request_headers: &HeaderMap) -> String {
    request_headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
}

/// The caller's W3C `traceparent` when valid, otherwise a new trace.
fn traceparent(request_headers: &HeaderMap) -> String {
    let given = request_headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|v| is_traceparent(v));
    match given {
        Some(v) => v.to_owned(),
        None => {
            let trace = uuid::Uuid::new_v4().simple().to_string();
            let span = &uuid::Uuid::new_v4().simple().to_string()[..16];
            format!("00-{trace}-{span}-01")
        }
    }
}

fn is_traceparent(v: &str) -> bool {
    let parts: Vec<&str> = v.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    parts.len() == 4
        && hex(parts[0], 2)
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && parts[1] != "00000000000000000000000000000000"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_kept_or_made() {
        let mut h = HeaderMap::new();
        let made = traceparent(&h);
        assert!(is_traceparent(&made), "{made}");
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        assert_eq!(
            traceparent(&h),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        h.insert("traceparent", HeaderValue::from_static("garbage"));
        assert_ne!(traceparent(&h), "garbage");
    }
}
