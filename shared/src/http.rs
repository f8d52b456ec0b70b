//! The HTTP vocabulary of every listener the product serves (webhooks, admin API): one refusal
//! shape, a status code and a JSON body `{"error", "message"}` ([`ApiError`]; 5xx bodies say
//! nothing internal), one path-id extractor ([`ApiId`]), one query extractor ([`ApiQuery`]), one
//! JSON body parse ([`parse_json`]), one paging rule ([`page_limit`]). [`ApiId`] and [`ApiQuery`] answer their parse failures the same way,
//! and [`json_errors`] turns any other error a layer below us writes as text into that shape.

use axum::body::Body;
use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the body is not what the endpoint takes.
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    /// 401: a signature or token is missing or wrong.
    #[error("{0}")]
    Unauthorized(String),
    /// 404
    #[error("{message}")]
    NotFound { code: &'static str, message: String },
    /// 405
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 408: the body did not arrive in time.
    #[error("the request body did not arrive within {0:?}")]
    RequestTimeout(std::time::Duration),
    /// 409: a concurrent change won.
    #[error("{0}")]
    Conflict(String),
    /// 413: the body is over the limit.
    #[error("the body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// 415
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 422: well-formed, but a field is missing or wrong.
    #[error("{field}: {message}")]
    Unprocessable { field: String, message: String },
    /// 504: the work was handed on but its answer did not come back in time.
    #[error("{0}")]
    Timeout(String),
    /// 503: JetStream could not take it now; retry later.
    #[error("temporarily unavailable: {0}")]
    Unavailable(String),
    /// 503: the stream is at the limit the operator set (`STREAM_MAX_BYTES`,
    /// `STREAM_MAX_MSGS`); nothing was stored; retry later.
    #[error("{0} is at its configured limit")]
    StreamFull(&'static str),
}

/// How long an admin call waits for JetStream (a bucket, a stream, a read) before it answers 503.
pub const JS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// `call` within [`JS_TIMEOUT`]; its failure, or no answer in time, is a 503
/// ([`ApiError::unavailable`], logged as `what` failing).
pub async fn within<T, E: std::fmt::Display>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, ApiError> {
    match tokio::time::timeout(JS_TIMEOUT, call).await {
        Ok(result) => result.map_err(|e| ApiError::unavailable(what, e)),
        Err(_) => Err(ApiError::unavailable(
            what,
            "JetStream did not answer in time",
        )),
    }
}

impl ApiError {
    /// 503 for a JetStream call that failed: logged here as `what` failing, with its cause; the
    /// client's body says nothing internal.
    pub fn unavailable(what: &str, cause: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %cause, "{what} failed.");
        ApiError::Unavailable(cause.to_string())
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            code,
            message: message.into(),
        }
    }

    pub fn unprocessable(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Unprocessable {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Unavailable(_) | ApiError::StreamFull(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The machine code in the body's `error` field.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest { code, .. } | ApiError::NotFound { code, .. } => code,
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::RequestTimeout(_) => "request_timeout",
            ApiError::Conflict(_) => "conflict",
            ApiError::TooLarge { .. } => "too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::Unprocessable { .. } => "invalid_field",
            ApiError::Timeout(_) => "timeout",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::StreamFull(_) => "stream_full",
        }
    }

    /// The message a response body carries: the error's own text for a client mistake, nothing
    /// internal for a 5xx.
    pub fn public_message(&self) -> String {
        match self {
            ApiError::Unavailable(_) => {
                "temporarily unavailable; nothing was changed or stored; retry later".to_owned()
            }
            ApiError::StreamFull(stream) => format!(
                "{stream} is at the limit its operator set (STREAM_MAX_BYTES / STREAM_MAX_MSGS); \
                 nothing was stored; retry later"
            ),
            ApiError::Unprocessable { field, message } => format!("{field}: {message}"),
            other => other.to_string(),
        }
    }

    /// The `outcome` label of `ecwid_ingest_requests_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::NotFound {
                code: "unknown_store",
                ..
            } => "unknown_store",
            ApiError::TooLarge { .. } => "too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::StreamFull(_) => "stream_full",
            _ => "invalid",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = match &self {
            ApiError::Unprocessable { field, .. } => json!({
                "error": self.code(),
                "field": field,
                "message": self.public_message(),
            }),
            other => json!({"error": other.code(), "message": other.public_message()}),
        };
        let mut response = (status, Json(body)).into_response();
        match &self {
            ApiError::Unavailable(_) => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
            }
            ApiError::Unauthorized(_) => {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
            }
            _ => {}
        }
        response
    }
}

/// Parses a JSON body: malformed → 400, well-formed with wrong types → 422.
/// The field a 422 names is the path of the value that was wrong (`since`,
/// `configuration.event.objects`), or `body` when the body as a whole was.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let malformed = |e: serde_json::Error| {
        ApiError::bad_request("invalid_json", format!("the body is not valid JSON: {e}"))
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if !inner.is_data() {
            return malformed(inner);
        }
        let field = if path == "." || path.is_empty() {
            "body".to_owned()
        } else {
            path
        };
        ApiError::unprocessable(field, inner.to_string())
    })?;
    // Characters after the value make the body malformed.
    de.end().map_err(malformed)?;
    Ok(value)
}

/// An error and its causes, for a log line.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// 404 for unknown paths, as JSON.
pub async fn not_found() -> ApiError {
    ApiError::NotFound {
        code: "not_found",
        message: "no such endpoint".into(),
    }
}

/// 405 for a known path with the wrong method, as JSON.
pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

impl From<model::ecwid::ParseError> for ApiError {
    fn from(e: model::ecwid::ParseError) -> Self {
        ApiError::bad_request(e.code(), e.to_string())
    }
}

/// The id in an admin route's path (`/instances/{id}`, `/events/{id}`, `/dead-letters/{seq}`),
/// checked before any store sees it: 1 to [`crate::nats::MAX_TOKEN_BYTES`] letters, digits,
/// `-` or `_` (every id becomes part of a subject or a key), then parsed as `T`. Anything else is
/// 400 `invalid_path` as JSON, so an id of thousands of characters never reaches NATS.
#[derive(Debug)]
pub struct ApiId<T = String>(pub T);

impl<S: Send + Sync, T: std::str::FromStr + Send> FromRequestParts<S> for ApiId<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Path(raw) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|e| ApiError::bad_request("invalid_path", e.body_text()))?;
        let invalid = |what: &str| {
            ApiError::bad_request(
                "invalid_path",
                format!(
                    "the id in the path {what}; ids are 1 to {} letters, digits, '-' or '_'",
                    crate::nats::MAX_TOKEN_BYTES
                ),
            )
        };
        if raw.len() > crate::nats::MAX_TOKEN_BYTES {
            return Err(invalid(&format!("is {} bytes long", raw.len())));
        }
        if !crate::nats::is_subject_token(&raw) {
            return Err(invalid("holds characters no id has"));
        }
        raw.parse()
            .map(ApiId)
            .map_err(|_| invalid(&format!("`{raw}` is not of the kind this route takes")))
    }
}

/// The largest page any list answers.
pub const MAX_PAGE: usize = 500;

/// The one paging rule of every list: `limit` is 1 to [`MAX_PAGE`] (`default` when absent);
/// anything else is 400 `invalid_query`, never silently clamped.
pub fn page_limit(limit: Option<usize>, default: usize) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(default);
    if (1..=MAX_PAGE).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::bad_request(
            "invalid_query",
            format!("limit must be between 1 and {MAX_PAGE}"),
        ))
    }
}

/// `axum::extract::Query`, refusing a malformed query with 400 `invalid_query` as JSON.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))
    }
}

/// The last word on error bodies: an error answer that is not JSON (a body-limit 413 from a
/// layer, an extractor's text rejection) is rewritten into `{"error", "message"}`. A 4xx keeps
/// its text (it describes the client's mistake); a 5xx says nothing internal.
pub async fn json_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "too_large".to_owned(),
        StatusCode::BAD_REQUEST => "bad_request".to_owned(),
        s => s
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase()
            .replace([' ', '-'], "_"),
    };
    let message = if status.is_client_error() {
        let bytes = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes).trim().to_owned();
        if text.is_empty() {
            status.canonical_reason().unwrap_or("error").to_owned()
        } else {
            text
        }
    } else {
        "internal error; it was logged".to_owned()
    };
    let body = json!({"error": code, "message": message}).to_string();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::DefaultBodyLimit;
    use axum::routing::{get, post};
    use axum::Router;
    use tower::ServiceExt as _;

    #[derive(Debug, serde::Deserialize)]
    struct Page {
        #[allow(dead_code)]
        after: u64,
    }

    fn router() -> Router {
        Router::new()
            .route(
                "/items/{seq}",
                get(|ApiId(seq): ApiId<u64>| async move { seq.to_string() }),
            )
            .route("/items", get(|ApiQuery(_p): ApiQuery<Page>| async { "ok" }))
            .route(
                "/upload",
                post(|_body: axum::body::Bytes| async { "stored" }),
            )
            .layer(DefaultBodyLimit::max(16))
            .layer(axum::middleware::from_fn(json_errors))
    }

    async fn answer(request: Request) -> (StatusCode, serde_json::Value) {
        let response = router().oneshot(request).await.unwrap();
        let status = response.status();
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/json",
            "{status}"
        );
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }

    fn get_req(uri: &str) -> Request {
        Request::builder().uri(uri).body(Body::empty()).unwrap()
    }

    #[tokio::test]
    async fn every_client_mistake_is_answered_as_json() {
        let (status, body) = answer(get_req("/items/abc")).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_path"))
        );
        let long = format!("/items/{}", "9".repeat(4000));
        let (status, body) = answer(get_req(&long)).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_path"))
        );
        let (status, body) = answer(get_req("/items?after=x")).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_query"))
        );
        let too_big = Request::builder()
            .method("POST")
            .uri("/upload")
            .body(Body::from(vec![b'x'; 64]))
            .unwrap();
        let (status, body) = answer(too_big).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::PAYLOAD_TOO_LARGE, Some("too_large"))
        );
        assert!(!body["message"].as_str().unwrap().is_empty());
    }

    #[test]
    fn a_5xx_body_says_nothing_internal() {
        let e = ApiError::Unavailable("JetStream error: bad request (code 400)".into());
        assert!(!e.public_message().contains("JetStream"));
        let e = ApiError::unprocessable("seq", "sequences start at 1");
        assert_eq!(e.public_message(), "seq: sequences start at 1");
    }
}
