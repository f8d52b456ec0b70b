//! App mode's public routes: `GET /ecwid/install` (to Ecwid's authorization page) and `GET
//! /ecwid/oauth/callback` (back from it). HTTP only: the state, the code exchange and the
//! provisioning are [`admin::install`]'s. The merchant gets a small HTML page saying what
//! happened, or after an install the configured return URL (`ECWID_APP_RETURN_URL`).

use std::collections::HashMap;

use admin::install::{Callback, Outcome};
use admin::AdminState;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

pub const INSTALL_PATH: &str = "/ecwid/install";
pub const CALLBACK_PATH: &str = "/ecwid/oauth/callback";

/// The install routes, with the admin API's state (app mode only).
pub fn routes(state: AdminState) -> Router {
    Router::new()
        .route(INSTALL_PATH, get(install))
        .route(CALLBACK_PATH, get(callback))
        .with_state(state)
}

async fn install(State(state): State<AdminState>) -> Response {
    let Some(app) = state.inner.config.app.as_ref() else {
        return page(StatusCode::NOT_FOUND, "App mode is off.", "").into_response();
    };
    match admin::install::authorize_url(app) {
        Ok(url) => Redirect::to(&url).into_response(),
        Err(error) => {
            tracing::warn!(%error, "Could not send a merchant to Ecwid's authorization page.");
            let (title, text) = Outcome::Error.message();
            page(Outcome::Error.status(), title, text).into_response()
        }
    }
}

async fn callback(
    State(state): State<AdminState>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let Some(app) = state.inner.config.app.as_ref() else {
        return page(StatusCode::NOT_FOUND, "App mode is off.", "").into_response();
    };
    let callback = Callback {
        code: q.get("code").cloned(),
        state: q.get("state").cloned(),
        error: q.get("error").cloned(),
    };
    let (outcome, store_id) = admin::install::complete(&state, app, callback).await;
    if let (Outcome::Installed | Outcome::Reinstalled, Some(url), Some(store)) =
        (outcome, app.return_url.as_deref(), store_id.as_deref())
    {
        if let Ok(mut url) = url::Url::parse(url) {
            url.query_pairs_mut().append_pair("storeId", store);
            return Redirect::to(url.as_str()).into_response();
        }
    }
    let (title, text) = outcome.message();
    page(outcome.status(), title, text).into_response()
}

/// A small HTML page; `title` and `text` are escaped.
fn page(status: StatusCode, title: &str, text: &str) -> (StatusCode, Html<String>) {
    let (title, text) = (escape(title), escape(text));
    (
        status,
        Html(format!(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
             <title>{title}</title></head>\
             <body style=\"font-family: system-ui, sans-serif; max-width: 36rem; margin: 4rem auto; padding: 0 1rem\">\
             <h1>{title}</h1><p>{text}</p></body></html>\n"
        )),
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_escape_what_they_show() {
        let (_, Html(body)) = page(StatusCode::OK, "<b>", "a & \"b\"");
        assert!(body.contains("&lt;b&gt;") && body.contains("a &amp; &quot;b&quot;"));
        assert!(!body.contains("<b>"));
    }
}
