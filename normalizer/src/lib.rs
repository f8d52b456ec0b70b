//! The normalizer: raw Ecwid payloads from `ECWID_RAW` → one Open Connectors envelope per
//! subscribed instance on `ECWID_EVENTS`. A raw message is acked only after all its envelopes are
//! stored; what can never be normalized goes to `ECWID_DEAD`. The mapping table and the pure
//! payload → envelope functions are `model::normalize`.
//!
//! - [`config`]: the normalizer's environment variables.
//! - [`error`]: the normalizer's error type.
//! - [`metrics`]: messages by outcome, envelopes by event type.
//! - [`consumer`]: the durable pull consumer, fan-out and publishing, outcomes.
//! - [`order`]: ordered instances' envelopes stored in the order the ingest accepted them.

pub mod config;
pub mod consumer;
pub mod error;
pub mod metrics;
pub mod order;

use shared::service::ServiceContext;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// Runs the normalizer until `cancel` fires, then finishes the messages in work within the grace
/// period and drains the NATS connection.
pub async fn run(
    config: Config,
    ops_listener: TcpListener,
    client: async_nats::Client,
    cancel: CancellationToken,
) -> Result<(), error::Error> {
    let common = config.common.clone();
    let stop = cancel.clone();
    let work = |ctx: ServiceContext| async move {
        let metrics = metrics::Metrics::register(&ctx.registry);
        consumer::run(config, ctx, metrics, stop).await?;
        Ok::<(), error::Error>(())
    };
    shared::service::run_worker(&common, "normalizer", ops_listener, client, cancel, work).await
}
