//! The durable pull consumer on `ECWID_EVENTS` (every unordered instance's envelopes): sets up
//! what every attempt needs ([`Worker`]), joins the other replicas, starts the ordered lanes
//! ([`crate::ordered`]) and runs the bounded pull loop, each message handled by
//! [`Worker::handle`] (which gives its loop slot back while it waits for its instance's).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy};
use shared::nats::{CALLBACKS_BUCKET, DELIVERER_CONSUMER, EVENTS_PREFIX, EVENTS_STREAM};
use shared::service::ServiceContext;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::dispatch::{self, Dispatcher};
use crate::health::Callbacks;
use crate::hold::Hold;
use crate::limits::InstanceLimits;
use crate::metrics::Metrics;
use crate::policy::HostLimits;

use crate::worker::Worker;

/// How long a stopping replica tries to remove its entry from the replicas' bucket.
const LEAVE_WAIT: Duration = Duration::from_millis(500);

pub async fn run(
    config: Config,
    ctx: ServiceContext,
    metrics: Metrics,
    cancel: CancellationToken,
) -> Result<(), crate::error::Error> {
    let consumer = shared::nats::ensure_pull_consumer(
        &ctx.js,
        EVENTS_STREAM,
        pull::Config {
            durable_name: Some(DELIVERER_CONSUMER.to_owned()),
            description: Some("ecwid-events deliverer replicas".to_owned()),
            // Not the ordered lanes' envelopes (`ecwid.ordered.>`): each has its own consumer.
            filter_subject: format!("{EVENTS_PREFIX}.>"),
            ack_policy: AckPolicy::Explicit,
            ack_wait: config.ack_wait(),
            max_deliver: -1,
            // Envelopes waiting for a retry count here: room for many failing endpoints.
            max_ack_pending: 100_000,
            ..Default::default()
        },
    )
    .await?;
    shared::worker::spawn_lag_reporter(
        consumer.clone(),
        DELIVERER_CONSUMER,
        ctx.common.clone(),
        cancel.clone(),
    );
    let dispatcher = Dispatcher::new(
        config.connect_timeout,
        config.timeout,
        config.allow_networks.clone(),
    )
    .map_err(crate::error::Error::Http)?
    .with_proxy(
        config.proxy_url.as_ref().map(|p| p.expose()),
        config.proxy_allow_networks.clone(),
    )
    .with_token_metric(metrics.oauth2_token_requests.clone());
    let concurrency = config.max_in_flight;
    let grace = config.common.shutdown_grace;
    let callbacks_kv =
        ctx.js
            .get_key_value(CALLBACKS_BUCKET)
            .await
            .map_err(|e| shared::Error::Topology {
                what: "key-value bucket",
                name: CALLBACKS_BUCKET.to_owned(),
                message: e.to_string(),
            })?;
    let callbacks = Arc::new(Callbacks::new(
        callbacks_kv,
        config.breaker_failures,
        config.breaker_cooldown,
        config.ack_wait(),
        metrics.breakers_open.clone(),
        metrics.breaker_transitions.clone(),
    ));
    callbacks.spawn(cancel.child_token());
    crate::route::spawn_certificate_watch(
        ctx.directory.clone(),
        metrics.client_certificates_expiring.clone(),
        cancel.child_token(),
    );
    let hold = Hold::new(ctx.clone(), metrics.clone());
    hold.spawn_keeper(cancel.child_token());
    // Not one message before the other replicas count this one: its share of each instance's
    // limits comes from the count.
    let (membership, deferrals) =
        crate::limits::join(&ctx, metrics.replicas.clone(), &cancel).await?;
    ctx.starting.release();
    let worker = Arc::new(Worker {
        callbacks,
        hold,
        hosts: HostLimits::new(config.max_in_flight_per_host),
        limits: InstanceLimits::new(membership.view()),
        deferrals,
        urls: dispatch::ParsedUrls::default(),
        requests: Arc::new(tokio::sync::Semaphore::new(config.max_in_flight)),
        stop: cancel.clone(),
        config,
        ctx,
        metrics,
        dispatcher,
    });
    // Not one message before the instances are known: its store would look unknown.
    if !worker.ctx.directory.loaded(&cancel).await {
        return Ok(());
    }
    tracing::info!(concurrency, "Deliverer consuming.");
    let held: crate::ordered::Held = {
        let ctx = worker.ctx.clone();
        Arc::new(move |id: &str| ctx.state_of(id).holds())
    };
    let lanes = crate::ordered::spawn(Arc::clone(&worker), held, cancel.clone());
    // A message whose instance is at its limit gives its slot back while it waits for the
    // instance's (`Worker::handle`).
    shared::worker::run_pull_loop_with_slots(
        consumer,
        concurrency,
        cancel,
        grace,
        move |message, slot| {
            let worker = Arc::clone(&worker);
            async move { worker.handle(message, Some(slot)).await }
        },
    )
    .await;
    let _ = lanes.await;
    // Bounded: NATS may be what is failing, and the shutdown has a budget. Without the goodbye
    // the entry expires on its own.
    let _ = tokio::time::timeout(LEAVE_WAIT, membership.leave()).await;
    Ok(())
}
