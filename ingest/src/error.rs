//! Every refusal of the ingest: a status code and a JSON body `{"error", "message"}`. 5xx bodies
//! say nothing internal.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
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
    /// 503: JetStream could not take it now; retry later.
    #[error("temporarily unavailable: {0}")]
    Unavailable(String),
}

impl ApiError {
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
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The machine code in the body's `error` field.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest { code, .. } | ApiError::NotFound { code, .. } => code,
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Conflict(_) => "conflict",
            ApiError::TooLarge { .. } => "too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::Unprocessable { .. } => "invalid_field",
            ApiError::Unavailable(_) => "unavailable",
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
            _ => "invalid",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = match &self {
            ApiError::Unavailable(_) => json!({
                "error": self.code(),
                "message": "the event could not be stored right now; retry later",
            }),
            ApiError::Unprocessable { field, message } => json!({
                "error": self.code(),
                "field": field,
                "message": format!("{field}: {message}"),
            }),
            other => json!({"error": other.code(), "message": other.to_string()}),
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
