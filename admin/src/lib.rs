//! The admin API: instances, their control (pause, resume, health), dead letters, the event log
//! (search, show, redeliver, replay, test), the poller's backfill, the token roles, and the
//! operators' console with the API's OpenAPI document. A library: the ingest binary mounts it on
//! `ADMIN_LISTEN` ([`router`]); its handlers hold only HTTP, the stores they read are `shared`'s.
//!
//! - [`config`]: the admin API's environment variables (tokens, allowed networks, search budget).
//! - [`state`]: [`state::AdminState`], what every handler shares.
//! - [`auth`]: the token roles, checked before every route but the console's.
//! - [`metrics`]: instance state changes made here.
//! - [`instances`]: create, list, show, update, delete.
//! - [`stored`]: an instance read from the bucket by id, or a 404.
//! - [`control`]: an instance's health, pause and resume.
//! - [`dead_letters`]: list, show, replay and delete dead letters.
//! - [`events`]: the event log: search, show with attempts, redeliver, replay a window, test.
//! - [`backfill`]: the poller's routes: backfill a window, show a store's last poll.
//! - [`purge`]: `DELETE /stores/{storeId}/data`: a store's (or one object's) data removed.
//! - [`oauth_state`]: app mode's signed, expiring OAuth `state` (pure).
//! - [`install`]: app mode's install on the public listener: the redirect to Ecwid, the OAuth
//!   callback, the store's instance provisioned from the template.
//! - [`lifecycle`]: app mode's uninstall (disable, then purge when due) and subscription changes.
//! - [`console`]: the operators' console (`/ui/`) and the OpenAPI document, embedded.

pub mod auth;
pub mod backfill;
pub mod config;
pub mod console;
pub mod control;
pub mod dead_letters;
pub mod events;
pub mod install;
pub mod instances;
pub mod lifecycle;
pub mod metrics;
pub mod oauth_state;
pub mod purge;
pub mod state;
pub mod stored;

use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::get;
use axum::Router;
use shared::http as error;

pub use config::Config;
pub use state::AdminState;

/// The largest admin request body. An instance within its field limits
/// ([`model::instance::limits`]) fits well inside; a larger body gets 413.
pub const MAX_BODY_BYTES: usize = 512 * 1024;

pub fn router(state: AdminState) -> Router {
    let panics = state.inner.ctx.common.http_panics.clone();
    let router = Router::new()
        .route("/whoami", get(auth::whoami))
        .route("/instances", get(instances::list).post(instances::create))
        .route(
            "/instances/{id}",
            get(instances::show)
                .patch(instances::update)
                .delete(instances::remove),
        )
        .merge(crate::dead_letters::routes())
        .merge(crate::events::routes())
        .merge(crate::control::routes())
        .merge(crate::backfill::routes())
        .merge(crate::purge::routes())
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        // Added after the token layer, so not behind it: static files and the API's description.
        .merge(crate::console::routes())
        .layer(middleware::from_fn(error::json_errors))
        .with_state(state);
    shared::ops::catch_panics(router, panics)
}
