//! The ingest: the one part Ecwid talks to. It answers 200 only after JetStream has stored the
//! webhook, 503 (never 4xx) when it cannot, and 4xx only for input no retry can fix.
//!
//! - [`config`]: the ingest's environment variables.
//! - [`error`]: [`error::ApiError`], every refusal as a status code and a JSON body.
//! - [`metrics`]: request, publish and verification metrics.
//! - [`parse`]: Ecwid REST v3 JSON and legacy ION form bodies → what routing needs (pure).
//! - [`verify`]: `X-Ecwid-Webhook-Signature` (pure).
//! - [`routes`]: the webhook endpoints and the publish to `ECWID_RAW`.
//! - [`admin`]: the admin API (bearer token): instances, and the routes of [`dead_letters`].
//! - [`dead_letters`]: list, show, replay and delete dead letters.

pub mod admin;
pub mod config;
pub mod dead_letters;
pub mod error;
pub mod metrics;
pub mod parse;
pub mod routes;
pub mod verify;

use std::sync::Arc;

use shared::service::ServiceContext;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// Shared by every handler.
#[derive(Debug, Clone)]
pub struct AppState {
    pub inner: Arc<Inner>,
}

#[derive(Debug)]
pub struct Inner {
    pub config: Config,
    pub ctx: ServiceContext,
    pub metrics: metrics::Metrics,
}

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
    let metrics = metrics::Metrics::register(&ctx.registry);
    let grace = config.common.shutdown_grace;
    let state = AppState {
        inner: Arc::new(Inner {
            config,
            ctx,
            metrics,
        }),
    };
    let webhooks = routes::router(state.clone());
    let admin =
        admin::router(state.clone()).merge(shared::ops::router(state.inner.ctx.ops_state()));
    tracing::info!(
        webhooks = %listeners.webhooks.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        admin = %listeners.admin.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        "Ingest listening."
    );
    let servers = async {
        let (a, b) = tokio::join!(
            shared::ops::serve(listeners.webhooks, webhooks, cancel.clone()),
            shared::ops::serve(listeners.admin, admin, cancel.clone()),
        );
        a.and(b)
    };
    let (deadline, result) = shared::shutdown::run_bounded(servers, &cancel, grace).await;
    if let Some(Err(error)) = result {
        tracing::error!(%error, "HTTP server failed.");
    }
    shared::shutdown::drain_nats(&client, &deadline).await;
    Ok(())
}
