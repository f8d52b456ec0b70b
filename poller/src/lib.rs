//! The poller: asks Ecwid's REST API what changed in the stores whose instances poll
//! (`event.vendor.type` naming `polling`), and stores every changed or deleted entity in
//! `ECWID_RAW` as a `poll` message, which the normalizer turns into the same envelopes as
//! webhooks.
//!
//! - [`config`]: the poller's environment variables.
//! - [`error`]: the poller's error types; [`error::PollError`] says whether a retry helps.
//! - [`metrics`]: requests by outcome, entities, events, cycles, lag, leases.
//! - [`budget`]: the per-token request budget shared by every replica (KV token bucket).
//! - [`api`]: the REST client: budget, 429 `Retry-After`, retries, refusals.
//! - [`lease`]: which replica polls which store (KV leases, rendezvous sharing).
//! - [`poll`]: one store's cycle: latest-stats, windows, paging, dedupe, cursors, status.
//! - [`cycles`]: the cycles in flight; one that fails or panics frees its slot and backs off.
//! - [`backfill`]: on-demand windows, asked over NATS request/reply by the admin API.

pub mod api;
pub mod backfill;
pub mod budget;
pub mod config;
pub mod cycles;
pub mod error;
pub mod lease;
pub mod metrics;
pub mod poll;
pub mod sightings;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shared::service::ServiceContext;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use error::Error;

/// How often the loop looks for stores that are due.
const TICK: Duration = Duration::from_millis(200);

/// Runs the poller until `cancel` fires; then the cycles in flight stop, the leases are given
/// back (so another replica takes over at once) and the NATS connection is drained.
pub async fn run(
    config: Config,
    ops_listener: TcpListener,
    client: async_nats::Client,
    cancel: CancellationToken,
) -> Result<(), Error> {
    let common = config.common.clone();
    let stop = cancel.clone();
    let work = |ctx: ServiceContext| async move { work(config, ctx, stop).await };
    shared::service::run_worker(&common, "poller", ops_listener, client, cancel, work).await
}

async fn bucket(
    ctx: &ServiceContext,
    name: &str,
) -> Result<async_nats::jetstream::kv::Store, Error> {
    ctx.js.get_key_value(name).await.map_err(|e| {
        Error::Shared(shared::Error::Topology {
            what: "key-value bucket",
            name: name.to_owned(),
            message: e.to_string(),
        })
    })
}

async fn work(config: Config, ctx: ServiceContext, cancel: CancellationToken) -> Result<(), Error> {
    let metrics = metrics::Metrics::register(&ctx.registry);
    let leases_kv = bucket(&ctx, shared::nats::POLL_LEASES_BUCKET).await?;
    let state = bucket(&ctx, shared::nats::POLL_STATE_BUCKET).await?;
    let budget = budget::Budget::new(state.clone(), config.rate_limit, config.rate_window);
    let user_agent = format!(
        "ecwid-events-poller/{} ({})",
        shared::VERSION,
        config.replica_id
    );
    let api =
        api::EcwidApi::new(&config, user_agent, budget, metrics.clone()).map_err(Error::Http)?;
    let poller = poll::Poller {
        api,
        js: ctx.js.clone(),
        state,
        sightings: Arc::new(sightings::Sightings::new(
            ctx.js.clone(),
            config.sightings_max_age,
        )),
        metrics: metrics.clone(),
        publish_timeout: config.publish_timeout,
        window_delay: config.window_delay,
        error_backoff: config.error_backoff,
        error_backoff_max: config.error_backoff_max,
        cycle_max_pages: config.cycle_max_pages,
        cycle_max_time: config.cycle_max_time,
    };
    if !ctx.directory.loaded(&cancel).await {
        return Ok(());
    }
    tokio::spawn(backfill::serve(
        ctx.client.clone(),
        poller.clone(),
        ctx.directory.clone(),
        cancel.child_token(),
    ));
    tracing::info!(replica = config.replica_id, "Poller running.");
    let mut leases = lease::Leases::new(leases_kv, config.replica_id.clone(), config.lease_ttl);
    // What the cycles in flight ask before a cursor moves: the leases held, with their expiry.
    let held: Arc<Mutex<HashMap<String, i64>>> = Arc::default();
    let renew_every = config.lease_ttl / 3;
    let mut next_renewal = Instant::now();
    let mut due: HashMap<String, Instant> = HashMap::new();
    let mut oldest_cursor: HashMap<String, i64> = HashMap::new();
    let mut cycles = cycles::Cycles::default();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some((store, ended, backoff)) = cycles.next(), if !cycles.is_empty() => {
                match ended {
                    cycles::Ended::Done(end) => {
                        if let Some(o) = end.oldest {
                            oldest_cursor.insert(store.clone(), o);
                        }
                    }
                    cycles::Ended::Crashed(message) => {
                        tracing::error!(store_id = store, error = message, "A poll cycle crashed; the store is polled again after a backoff.");
                        poller.record_crash(&store, message).await;
                    }
                }
                if let Some(wait) = backoff {
                    // Never sooner than the store's own interval (set when it started).
                    let at = Instant::now() + wait;
                    let next = due.entry(store).or_insert(at);
                    *next = (*next).max(at);
                }
                continue;
            }
            () = cancel.cancelled() => break,
        }
        let jobs = poll::jobs(&ctx.directory.all());
        let now = Instant::now();
        if now >= next_renewal {
            leases.rebalance(&jobs.keys().cloned().collect()).await;
            next_renewal = now + renew_every;
            let expiry = model::time_fmt::now_unix_ms() + config.lease_ttl.as_millis() as i64
                - renew_every.as_millis() as i64;
            let mut map = held.lock().unwrap_or_else(|e| e.into_inner());
            map.clear();
            for store in leases.held() {
                map.insert(store.clone(), expiry);
            }
            metrics.leases.set(map.len() as i64);
        }
        for (store, job) in &jobs {
            if cycles.len() >= config.concurrency {
                break;
            }
            if cycles.is_running(store)
                || !leases.holds(store)
                || due.get(store).is_some_and(|at| *at > now)
            {
                continue;
            }
            due.insert(store.clone(), now + job.interval);
            let (poller, job, held, directory, cancel) = (
                poller.clone(),
                job.clone(),
                Arc::clone(&held),
                ctx.directory.clone(),
                cancel.clone(),
            );
            cycles.spawn(store.clone(), async move {
                let store = job.store_id.clone();
                // Asked between pages: a store whose lease went, or whose last polling
                // instance was deleted or stopped polling, is left at once.
                let keep_going = || {
                    let held = held
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&store)
                        .is_some_and(|exp| *exp > model::time_fmt::now_unix_ms());
                    held && poll::jobs(&directory.for_store(&store)).contains_key(&store)
                };
                poller.cycle(&job, keep_going, &cancel).await
            });
        }
        let now_secs = model::time_fmt::now_unix_ms() / 1000;
        let lag = oldest_cursor
            .iter()
            .filter(|(s, _)| leases.holds(s))
            .map(|(_, c)| now_secs - c)
            .max()
            .unwrap_or(0);
        metrics.lag.set(lag.max(0));
    }
    // The cycles see the cancellation and stop; their cursors stay where the last acked window
    // left them.
    cycles.drain().await;
    leases.release_all().await;
    Ok(())
}
