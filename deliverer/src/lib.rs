//! The deliverer: envelopes from `ECWID_EVENTS` → signed HTTP POSTs to each instance's callback
//! URL. Retries wait on the NATS server (NAK with delay) so they survive restarts; what cannot be
//! delivered ends in `ECWID_DEAD` for an operator to replay.
//!
//! - [`config`]: the deliverer's environment variables.
//! - [`error`]: the deliverer's error type.
//! - [`metrics`]: attempts, latencies, retries, dead letters, breakers, in-flight requests.
//! - [`dispatch`]: signing (Open Connectors and Standard Webhooks), the instance's own headers and
//!   OAuth2 token, and the HTTP POST, with the SSRF guard at connect time.
//! - [`guard`]: the SSRF guard at connect time (names resolved, only allowed addresses kept).
//! - [`route`]: the way to receivers that need a proxy (HTTP CONNECT), a client certificate or
//!   their own CA; the SSRF guard judges the target before the CONNECT.
//! - [`oauth2`]: OAuth2 access tokens (client credentials), cached and shared by the workers.
//! - [`policy`]: the retry schedule, jitter and `Retry-After`, and the per-host limits.
//! - [`health`]: the callback health every replica shares (breaker, failures, success counts).
//! - [`hold`]: envelopes of paused and disabled instances moved aside, and released on resume.
//! - [`limits`]: per-instance `max.in.flight` and `rate.limit` across replicas (each replica
//!   enforces its share; replicas count each other in a KV bucket).
//! - [`deferrals`]: how often each message was put back without an attempt, shared by replicas.
//! - [`journal`]: the event log snapshot written after every attempt.
//! - [`consumer`]: the durable pull consumer on `ECWID_EVENTS`: set-up and the pull loop.
//! - [`worker`]: one envelope's delivery, start to end, for the pull loop and the lanes.
//! - [`outcome`]: what becomes of an envelope after an attempt, and what is read of its body.
//! - [`ordered`]: the lanes of instances with ordered delivery, one envelope in flight each.

pub mod config;
pub mod consumer;
pub mod deferrals;
pub mod dispatch;
pub mod error;
pub mod guard;
pub mod health;
pub mod hold;
pub mod journal;
pub mod limits;
pub mod metrics;
pub mod oauth2;
pub mod ordered;
pub mod outcome;
pub mod policy;
pub mod route;
pub mod worker;

use shared::service::ServiceContext;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// Runs the deliverer until `cancel` fires, then lets the requests in flight finish within the
/// grace period and drains the NATS connection.
pub async fn run(
    config: Config,
    ops_listener: TcpListener,
    client: async_nats::Client,
    cancel: CancellationToken,
) -> Result<(), error::Error> {
    let common = config.common.clone();
    let stop = cancel.clone();
    let work = |ctx: ServiceContext| {
        // Not ready before it joined the other replicas ([`limits::join`]).
        ctx.starting.hold();
        async move {
            let metrics = metrics::Metrics::register(&ctx.registry);
            consumer::run(config, ctx, metrics, stop).await?;
            Ok::<(), error::Error>(())
        }
    };
    shared::service::run_worker(&common, "deliverer", ops_listener, client, cancel, work).await
}
