//! The ingest: the one part Ecwid talks to. It answers 200 only after JetStream has stored the
//! webhook, 503 (never 4xx) when it cannot, and 4xx only for input no retry can fix.
//!
//! - [`config`]: the ingest's environment variables.
//! - [`state`]: [`state::AppState`], what every handler shares.
//! - [`metrics`]: request, publish and verification metrics.
//! - [`verify`]: Ecwid's signature and who may send events for a store (pure). Parsing the
//!   bodies is [`model::ecwid`]'s, shared with the normalizer.
//! - [`routes`]: the webhook endpoints and the publish to `ECWID_RAW`.
//! - [`install`]: app mode's install routes (to Ecwid's authorization page and back).
//!
//! The binary also mounts the admin API (the `admin` crate) on `ADMIN_LISTEN`, beside the ops
//! endpoints, with a NATS connection of its own.

pub mod config;
pub mod install;
pub mod metrics;
pub mod routes;
pub mod state;
pub mod verify;

use shared::service::ServiceContext;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use state::AppState;

/// The name of the admin API's own NATS connection (in nats-server's `connz`).
pub const ADMIN_CONNECTION: &str = "ecwid-ingest-admin";

/// The two listeners: webhooks (public) and admin + ops (internal).
#[derive(Debug)]
pub struct Listeners {
    pub webhooks: TcpListener,
    pub admin: TcpListener,
}

/// Runs the ingest until `cancel` fires, then stops accepting, finishes open requests and drains
/// the NATS connection, all within one shutdown budget (`SHUTDOWN_GRACE_MS`, see
/// [`shared::shutdown`]).
pub async fn run(
    config: Config,
    listeners: Listeners,
    client: async_nats::Client,
    cancel: CancellationToken,
) -> Result<(), shared::Error> {
    let ctx = ServiceContext::start(client.clone(), &config.common, "ingest", &cancel).await?;
    // The admin API has a connection of its own: nats-server serves one connection's requests in
    // order and closes a connection that sends it something it refuses, so a burst of admin
    // reads (or a bad one) must never queue behind, or break, the webhooks' publishes.
    let admin_client =
        shared::nats::connect(&config.common.nats_url, ADMIN_CONNECTION, &cancel).await?;
    let admin_ctx = ctx.on_connection(admin_client.clone()).await?;
    let metrics = metrics::Metrics::register(&ctx.registry);
    metrics::spawn_stream_usage(
        ctx.js.clone(),
        config.common.stream_limits.clone(),
        metrics.stream_usage.clone(),
        cancel.child_token(),
    );
    let grace = config.common.shutdown_grace;
    let limits = config.server_limits;
    let ops = shared::ops::router(ctx.ops_state());
    let admin_metrics = admin::metrics::Metrics::register(&ctx.registry);
    let admin_state = admin::AdminState::new(config.admin.clone(), admin_ctx, admin_metrics);
    // App mode: the install routes on the public listener, app events acted on, due purges run.
    let app = admin_state
        .inner
        .config
        .app
        .is_some()
        .then(|| admin_state.clone());
    if let Some(app) = &app {
        admin::lifecycle::spawn_purger(app.clone(), cancel.child_token());
    }
    let state = AppState::new(config, ctx, metrics);
    let webhooks = routes::router(state, app);
    // After the merge, so that the ops routes answer a wrong method with JSON too.
    let admin = admin::router(admin_state)
        .merge(ops)
        .method_not_allowed_fallback(shared::http::method_not_allowed);
    tracing::info!(
        webhooks = %listeners.webhooks.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        admin = %listeners.admin.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        "Ingest listening."
    );
    let servers = async {
        let (a, b) = tokio::join!(
            shared::ops::serve_with(listeners.webhooks, webhooks, limits, cancel.clone()),
            shared::ops::serve_with(listeners.admin, admin, limits, cancel.clone()),
        );
        a.and(b)
    };
    let (deadline, result) = shared::shutdown::run_bounded(servers, &cancel, grace).await;
    if let Some(Err(error)) = result {
        tracing::error!(%error, "HTTP server failed.");
    }
    shared::shutdown::drain_nats(&client, &deadline).await;
    shared::shutdown::drain_nats(&admin_client, &deadline).await;
    Ok(())
}
