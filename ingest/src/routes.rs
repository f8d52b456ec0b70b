//! The webhook endpoints: `POST /events/ecwid` and its Open Connectors alias. A request is
//! read (bounded in size and time), parsed by [`model::ecwid`], routed to its store's
//! instances, checked by [`crate::verify`], and answered 200 only after JetStream acknowledged
//! the publish to `ecwid.raw.<storeId>`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap as NatsHeaders;
use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use model::ecwid::{self, Format};
use model::instance::Instance;
use serde_json::json;
use shared::directory::Directory;
use shared::nats::{headers, raw_subject, RAW_STREAM};
use tracing::Instrument;

use crate::config::Config;
use crate::state::AppState;
use crate::verify::{self, Claim};
use shared::http::{self as error, ApiError};

pub const WEBHOOK_PATH: &str = "/events/ecwid";
pub const OPEN_CONNECTORS_PATH: &str = "/elements/api-v2/events/ecwid";

/// The webhook routes; in app mode (`app` given) also the app's install routes
/// ([`admin::install`]), and app events are handed to [`admin::lifecycle`] once stored.
pub fn router(state: AppState, app: Option<admin::AdminState>) -> Router {
    let panics = state.inner.ctx.common.http_panics.clone();
    let mut router = Router::new()
        .route(WEBHOOK_PATH, post(receive))
        .route(OPEN_CONNECTORS_PATH, post(receive))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(axum::middleware::from_fn(error::json_errors))
        .layer(Extension(AppHooks(app.clone())))
        .with_state(state);
    if let Some(admin) = app {
        router = router.merge(crate::install::routes(admin));
    }
    shared::ops::catch_panics(router, panics)
}

/// App mode's side of the webhook path: the admin state app events are acted on with.
#[derive(Debug, Clone)]
struct AppHooks(Option<admin::AdminState>);

/// An app event (`application.uninstalled`, `application.subscriptionStatusChanged`) to act on
/// once it is stored.
struct AppEvent {
    store_id: String,
    event_type: String,
    data: serde_json::Value,
}

/// What the ingest learned of a request before publishing it.
struct Accepted {
    format: Format,
    store_id: String,
    msg_id: String,
    verified: bool,
    payload: Bytes,
    /// In app mode, an app event of the store.
    app_event: Option<AppEvent>,
}

impl Accepted {
    /// The id Ecwid gave the event (`v3:<storeId>:<eventId>`); none for an ION, which has none.
    fn event_id(&self) -> Option<&str> {
        match self.format {
            Format::V3 => ecwid::event_id_of_msg_id(&self.msg_id),
            _ => None,
        }
    }
}

async fn receive(
    State(state): State<AppState>,
    Extension(hooks): Extension<AppHooks>,
    route: MatchedPath,
    request_headers: HeaderMap,
    body: Body,
) -> Response {
    let request_id = request_id(&request_headers);
    let traceparent = traceparent(&request_headers);
    let trace_id = traceparent.split('-').nth(1).unwrap_or_default().to_owned();
    if !shared::otel::enabled() {
        // The span the logs have always had, and no field more.
        let span = tracing::info_span!(
            target: shared::otel::TARGET,
            "webhook",
            trace_id,
            request_id
        );
        return receive_traced(state, hooks, request_headers, body, request_id, traceparent)
            .instrument(span)
            .await;
    }
    // The OpenTelemetry server span: a child of the caller's context when it sent one, and the
    // trace id the logs and the stored message carry is then the span's own.
    let span = webhook_span(&request_id);
    shared::otel::set_parent(&span, shared::otel::extract_http(&request_headers));
    span.record("otel.name", format!("POST {}", route.as_str()));
    span.record("http.route", route.as_str());
    span.record("url.path", route.as_str());
    if let Some(id) = shared::otel::trace_id(&span) {
        span.record("trace_id", id);
    }
    let response = receive_traced(state, hooks, request_headers, body, request_id, traceparent)
        .instrument(span.clone())
        .await;
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    // A server span is an error for a 5xx only: a 4xx is the caller's.
    if status.is_server_error() {
        span.record("otel.status_code", "error");
        span.record("error.type", status.as_str());
    }
    response
}

/// The span of one webhook request while traces are on (HTTP server conventions).
fn webhook_span(request_id: &str) -> tracing::Span {
    use tracing::field::Empty;
    tracing::info_span!(
        target: shared::otel::TARGET,
        "webhook",
        trace_id = Empty,
        request_id,
        otel.name = Empty,
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = "POST",
        http.route = Empty,
        url.path = Empty,
        http.response.status_code = Empty,
        error.type = Empty,
        ecwid.store_id = Empty,
        ecwid.event_id = Empty,
    )
}

async fn receive_traced(
    state: AppState,
    hooks: AppHooks,
    request_headers: HeaderMap,
    body: Body,
    request_id: String,
    traceparent: String,
) -> Response {
    let started = Instant::now();
    let received_at = model::time_fmt::now_unix_ms();
    let m = &state.inner.metrics;
    let mut format = "unknown";
    let result = async {
        let mut accepted = accept(&state, &hooks, &request_headers, body, &mut format).await?;
        if shared::otel::enabled() {
            let span = tracing::Span::current();
            span.record("ecwid.store_id", accepted.store_id.as_str());
            if let Some(event_id) = accepted.event_id() {
                span.record("ecwid.event_id", event_id);
            }
        }
        let app_event = accepted.app_event.take();
        let duplicate = publish(&state, accepted, received_at, &request_id, traceparent).await?;
        // After the publish, and for a duplicate too: an event Ecwid sends again because we
        // answered 503 after storing it is acted on then. Acting is idempotent.
        if let (Some(event), Some(admin)) = (app_event, hooks.0.as_ref()) {
            admin::lifecycle::on_app_event(admin, &event.store_id, &event.event_type, &event.data)
                .await
                .map_err(|e| {
                    ApiError::Unavailable(format!("the app event was stored but not acted on: {e}"))
                })?;
        }
        Ok(duplicate)
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
                ApiError::StreamFull(stream) => {
                    tracing::error!(
                        format,
                        stream,
                        "Webhook refused with 503: the stream is at its configured limit. Raise STREAM_MAX_BYTES / STREAM_MAX_MSGS or let the workers catch up."
                    );
                }
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
    hooks: &AppHooks,
    request_headers: &HeaderMap,
    body: Body,
    format_label: &mut &'static str,
) -> Result<Accepted, ApiError> {
    let config = &state.inner.config;
    let unsupported = |ct: String| {
        ApiError::UnsupportedMediaType(format!(
            "content type `{ct}` is not accepted: send application/json (Ecwid webhooks) or \
             application/x-www-form-urlencoded (Instant Order Notifications)"
        ))
    };
    let content_type = request_headers
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    // With a content type the format is known (or refused) before the body is read; without
    // one it is sniffed from the body.
    let declared = content_type
        .as_deref()
        .map(|ct| Format::of_request(Some(ct), &[]).map_err(unsupported))
        .transpose()?;
    if let Some(f) = declared {
        *format_label = f.as_str();
    }
    let body = read_body(
        request_headers,
        body,
        config.max_body_bytes,
        config.body_timeout,
    )
    .await?;
    let format = match declared {
        Some(f) => f,
        None => Format::of_request(None, &body).map_err(unsupported)?,
    };
    *format_label = format.as_str();
    let directory = &state.inner.ctx.directory;
    if !directory.is_loaded() {
        return Err(ApiError::Unavailable("instances not loaded yet".into()));
    }
    let accepted = match format {
        Format::V3 => {
            let event = ecwid::parse_v3(&body)?;
            check_event_time(config, event.event_created)?;
            let instances = instances_of(directory, &event.store_id)?;
            let signature = request_headers
                .get(verify::SIGNATURE_HEADER)
                .and_then(|v| v.to_str().ok());
            let claim = Claim::V3 {
                event_created: event.event_created,
                event_id: &event.event_id,
                signature,
            };
            let app_secret = config.admin.app.as_ref().map(|a| a.client_secret.expose());
            let verified =
                verify::check_with_app(&instances, claim, app_secret, config.require_signature)?;
            let app_event = (hooks.0.is_some()
                && admin::lifecycle::is_app_event(&event.event_type))
            .then(|| AppEvent {
                store_id: event.store_id.clone(),
                event_type: event.event_type.clone(),
                data: serde_json::from_slice::<serde_json::Value>(&body)
                    .map(|v| v["data"].clone())
                    .unwrap_or_default(),
            });
            let (msg_id, store_id) = (event.msg_id(), event.store_id);
            Accepted {
                format,
                msg_id,
                store_id,
                verified,
                payload: body,
                app_event,
            }
        }
        Format::Ion => {
            let ion = ecwid::parse_ion_form(&body)?;
            let instances = instances_of(directory, &ion.store_id)?;
            let verified = verify::check(&instances, Claim::Ion, config.require_signature)?;
            Accepted {
                format,
                msg_id: ion.msg_id(),
                payload: Bytes::from(ion.to_json()),
                store_id: ion.store_id,
                verified,
                app_event: None,
            }
        }
        // Only the poller writes this format; no request body is ever taken as one.
        Format::Poll => {
            return Err(ApiError::UnsupportedMediaType(
                "poll events come from the poller only".into(),
            ))
        }
    };
    if !accepted.verified {
        state
            .inner
            .metrics
            .unverified
            .with_label_values(&[format.as_str()])
            .inc();
    }
    Ok(accepted)
}

/// With `INGEST_MAX_EVENT_AGE_SECS` set, refuses events older than that, and events dated further
/// in the future than `INGEST_MAX_CLOCK_SKEW_SECS` (a replayed signature cannot dodge the age
/// limit with a future date).
fn check_event_time(config: &Config, event_created: i64) -> Result<(), ApiError> {
    let Some(max_age) = config.max_event_age else {
        return Ok(());
    };
    let now = model::time_fmt::now_unix_ms() / 1000;
    let age = now - event_created;
    if age > max_age.as_secs() as i64 {
        return Err(ApiError::bad_request(
            "stale_event",
            format!(
                "eventCreated is {age} s old, over INGEST_MAX_EVENT_AGE_SECS ({} s)",
                max_age.as_secs()
            ),
        ));
    }
    if -age > config.max_clock_skew.as_secs() as i64 {
        return Err(ApiError::bad_request(
            "future_event",
            format!(
                "eventCreated is {} s in the future, over INGEST_MAX_CLOCK_SKEW_SECS ({} s)",
                -age,
                config.max_clock_skew.as_secs()
            ),
        ));
    }
    Ok(())
}

/// The store's instances, or 404 `unknown_store`.
fn instances_of(directory: &Directory, store_id: &str) -> Result<Vec<Arc<Instance>>, ApiError> {
    let instances = directory.for_store(store_id);
    if instances.is_empty() {
        return Err(ApiError::NotFound {
            code: "unknown_store",
            message: format!("no instance is configured for store {store_id}"),
        });
    }
    Ok(instances)
}

/// Reads the body, refusing it (413) as soon as it passes `limit` (from Content-Length when the
/// client sends one, and while streaming otherwise), and (408) when it has not arrived within
/// `timeout`.
async fn read_body(
    request_headers: &HeaderMap,
    body: Body,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    let declared = request_headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::TooLarge { limit });
    }
    let read = tokio::time::timeout(timeout, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| ApiError::RequestTimeout(timeout))?;
    read.map_err(|e| {
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
    let subject = raw_subject(&accepted.store_id);
    let span = shared::nats::publish_span(RAW_STREAM, &subject, &accepted.msg_id);
    // With traces on, the stored message carries the publish span's context.
    shared::otel::inject_nats(&span, &mut h);
    let started = Instant::now();
    let ack = shared::nats::publish(
        &state.inner.ctx.js,
        subject,
        h,
        accepted.payload,
        state.inner.config.publish_timeout,
    )
    .instrument(span)
    .await
    .map_err(|e| {
        let chain = shared::http::error_chain(&e);
        if shared::nats::is_stream_full(&chain) {
            ApiError::StreamFull(RAW_STREAM)
        } else {
            ApiError::Unavailable(chain)
        }
    })?;
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
