//! Who may call the admin API: `Authorization: Bearer $ADMIN_TOKEN` (everything) or
//! `$ADMIN_READ_TOKEN` (every `GET`, nothing else); `GET /whoami` says which.

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::json;
use shared::http::ApiError;
use subtle::ConstantTimeEq;

use crate::state::AdminState;

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

pub(crate) async fn require_token(
    State(state): State<AdminState>,
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
pub(crate) async fn whoami(
    axum::Extension(role): axum::Extension<Role>,
) -> Json<serde_json::Value> {
    Json(json!({ "role": role }))
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
