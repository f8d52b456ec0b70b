//! The operators' console at `/ui/` and the admin API's OpenAPI document at `/openapi.json`,
//! both on the admin listener. The console is three plain files (`admin/console/`: HTML, CSS
//! and one JavaScript module, no build step) compiled into the binary, so it works offline and
//! matches the API it ships with. They hold no data and are served without a token; every call
//! the page makes to the API carries the token the operator signs in with.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

use crate::state::AdminState;

/// The OpenAPI 3.1 document of the admin listener, kept by hand beside the code; the tests
/// check it against the routes and an independent validator checks the document.
pub const OPENAPI_JSON: &str = include_str!("../openapi.json");

/// The console's files: path under `/ui/`, content type, body.
const FILES: &[(&str, &str, &str)] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("../console/index.html"),
    ),
    (
        "console.css",
        "text/css; charset=utf-8",
        include_str!("../console/console.css"),
    ),
    (
        "console.js",
        "text/javascript; charset=utf-8",
        include_str!("../console/console.js"),
    ),
];

/// Scripts and styles from the page's own origin only, no inline code, no framing: a page that
/// holds an admin token should run nothing but its own files.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

/// Mounted by [`crate::router`] outside the token check.
pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(|| async { file("index.html") }))
        .route(
            "/ui/{file}",
            get(
                |axum::extract::Path(name): axum::extract::Path<String>| async move { file(&name) },
            ),
        )
        .route("/openapi.json", get(openapi))
}

fn file(name: &str) -> Response {
    let Some((_, content_type, body)) = FILES.iter().find(|(n, _, _)| *n == name) else {
        return shared::http::ApiError::NotFound {
            code: "not_found",
            message: "no such file".into(),
        }
        .into_response();
    };
    let mut response = (*body).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // Small files, and an upgraded binary must not run last version's script.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        // No address elsewhere, no inline script, style or handler (the CSP blocks them too).
        for (name, _, body) in FILES {
            for needle in [
                "http://",
                "https://",
                "//cdn",
                "<script>",
                "style=\"",
                "onclick=\"",
            ] {
                assert!(!body.contains(needle), "{name} contains {needle}");
            }
        }
    }

    #[test]
    fn the_openapi_document_is_json() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI_JSON).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
    }
}
