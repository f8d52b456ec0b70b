//! What every service does at start-up once it has a NATS client: set up the topology (retrying
//! while JetStream is not ready), start following the instances bucket, register the common
//! metrics. The result, [`ServiceContext`] (NATS handles, the instance directory, the metrics
//! registry), is what every service's `run` builds on.

use async_nats::jetstream::{self, kv};
use backon::Retryable;
use prometheus::Registry;
use tokio_util::sync::CancellationToken;

use crate::config::CommonConfig;
use crate::directory::Directory;
use crate::eventlog::{EventLog, LogMetrics};
use crate::kvwatch::KvView;
use crate::metrics::CommonMetrics;
use crate::nats::STATE_BUCKET;
use crate::ops::OpsState;
use crate::topology::{setup_topology, TopologyConfig, TopologyReport};
use crate::Error;
use model::state::{InstanceState, State};

/// How many times start-up retries setting up the topology (75 to 150 s of waits with
/// [`crate::nats::startup_backoff`]) before the service gives up and exits.
const TOPOLOGY_TRIES: usize = 20;

/// A started service's shared parts.
#[derive(Debug, Clone)]
pub struct ServiceContext {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub kv: kv::Store,
    pub directory: Directory,
    pub registry: Registry,
    pub common: CommonMetrics,
    /// The event log (writes do nothing with `EVENT_LOG=off`).
    pub log: EventLog,
    /// `ECWID_INSTANCE_STATE` and its live copy: which instances are paused or disabled.
    pub states_kv: kv::Store,
    pub states: KvView<InstanceState>,
    /// Bumped on every change of `states`: wait on it to act on a pause or resume at once.
    pub state_changes: tokio::sync::watch::Receiver<u64>,
    /// Held by a service whose own start-up work `/readyz` must wait for.
    pub starting: crate::ops::StartGate,
    /// What setting up the topology wrote (shown on `/readyz`).
    pub topology: std::sync::Arc<TopologyReport>,
}

/// What every HTTP handler of a listener shares, cheap to clone: the listener's configuration
/// `C`, the started service's NATS handles and instance directory, and its metrics `M`.
#[derive(Debug)]
pub struct HandlerState<C, M> {
    pub inner: std::sync::Arc<HandlerInner<C, M>>,
}

#[derive(Debug)]
pub struct HandlerInner<C, M> {
    pub config: C,
    pub ctx: ServiceContext,
    pub metrics: M,
}

impl<C, M> HandlerState<C, M> {
    pub fn new(config: C, ctx: ServiceContext, metrics: M) -> Self {
        Self {
            inner: std::sync::Arc::new(HandlerInner {
                config,
                ctx,
                metrics,
            }),
        }
    }
}

impl<C, M> Clone for HandlerState<C, M> {
    fn clone(&self) -> Self {
        Self {
            inner: std::sync::Arc::clone(&self.inner),
        }
    }
}

impl ServiceContext {
    pub async fn start(
        client: async_nats::Client,
        config: &CommonConfig,
        service: &str,
        cancel: &CancellationToken,
    ) -> Result<Self, Error> {
        let js = crate::nats::jetstream(client.clone());
        let topology = TopologyConfig::from(config);
        let report = std::sync::Mutex::new(TopologyReport::default());
        let setup = || setup_topology(&js, &topology, &report);
        let kv = tokio::select! {
            result = setup
                .retry(crate::nats::startup_backoff().with_max_times(TOPOLOGY_TRIES))
                .notify(|error, wait| {
                    tracing::warn!(%error, retry_in = ?wait, "JetStream topology not ready; retrying.");
                }) => result?,
            () = cancel.cancelled() => return Err(Error::Cancelled),
        };
        let report = report
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let registry = Registry::new();
        let common = CommonMetrics::register(&registry, service);
        crate::otel::register_metrics(&registry);
        for (action, n) in [("create", &report.created), ("update", &report.updated)] {
            common
                .topology_writes
                .with_label_values(&[action])
                .inc_by(n.len() as u64);
        }
        let directory = Directory::with_revision_gauge(common.instances_revision.clone());
        directory.spawn_watch(kv.clone(), cancel.child_token());
        let states_kv = js
            .get_key_value(STATE_BUCKET)
            .await
            .map_err(|e| Error::Topology {
                what: "key-value bucket",
                name: STATE_BUCKET.to_owned(),
                message: e.to_string(),
            })?;
        let (changed, state_changes) = tokio::sync::watch::channel(0u64);
        let states = KvView::with_hook(move |_, _, _| changed.send_modify(|n| *n += 1));
        states.spawn_follow(states_kv.clone(), cancel.child_token());
        spawn_state_gauges(
            directory.clone(),
            states.clone(),
            common.instances.clone(),
            cancel.child_token(),
        );
        let log_metrics = LogMetrics::register(&registry);
        let log = match (&config.event_log_database, config.event_log) {
            (Some(database), true) => EventLog::start(
                database,
                js.clone(),
                service,
                config.event_log_retention,
                log_metrics,
                cancel,
            )
            .await
            .map_err(|e| Error::Database(e.to_string()))?,
            _ => EventLog::off(log_metrics),
        };
        Ok(Self {
            client,
            js,
            kv,
            directory,
            registry,
            common,
            log,
            states_kv,
            states,
            state_changes,
            starting: crate::ops::StartGate::default(),
            topology: std::sync::Arc::new(report),
        })
    }

    /// The same service over another NATS connection: its JetStream handles, buckets and event
    /// log go over `client`, while the watched copies (directory, states) and the metrics stay
    /// shared. The ingest's admin API works on one, so its reads never queue behind, or close,
    /// the connection the webhooks publish on.
    pub async fn on_connection(&self, client: async_nats::Client) -> Result<Self, Error> {
        let js = crate::nats::jetstream(client.clone());
        let bucket = |name: &'static str| {
            let js = js.clone();
            async move {
                js.get_key_value(name).await.map_err(|e| Error::Topology {
                    what: "key-value bucket",
                    name: name.to_owned(),
                    message: e.to_string(),
                })
            }
        };
        let kv = bucket(crate::nats::INSTANCES_BUCKET).await?;
        let states_kv = bucket(STATE_BUCKET).await?;
        Ok(Self {
            client,
            js,
            kv,
            states_kv,
            ..self.clone()
        })
    }

    /// The state of `instance_id` as this replica knows it (active when none is stored).
    pub fn state_of(&self, instance_id: &str) -> State {
        self.states
            .get(instance_id)
            .map_or(State::Active, |(s, _)| s.state)
    }

    pub fn ops_state(&self) -> OpsState {
        OpsState {
            registry: self.registry.clone(),
            common: self.common.clone(),
            nats: self.client.clone(),
            directory: self.directory.clone(),
            starting: self.starting.clone(),
            topology: self.topology.clone(),
        }
    }
}

/// How often `ecwid_instances{state}` is counted again.
const STATE_GAUGE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Keeps `ecwid_instances{state}` current: the instances of the directory, by their state.
fn spawn_state_gauges(
    directory: Directory,
    states: KvView<InstanceState>,
    gauge: prometheus::IntGaugeVec,
    cancel: CancellationToken,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(STATE_GAUGE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let mut counts = [0i64; 3];
            for instance in directory.all() {
                let state = states
                    .get(&instance.id)
                    .map_or(State::Active, |(s, _)| s.state);
                counts[state as usize] += 1;
            }
            for (state, count) in State::ALL.into_iter().zip(counts) {
                gauge.with_label_values(&[state.as_str()]).set(count);
            }
        }
    });
}

/// What a binary reads and exports, as `--print-contract` prints it: the README's tables, the
/// manifests and the deploy checks are held against it instead of keeping lists of their own.
#[derive(Debug, serde::Serialize)]
pub struct Contract {
    pub service: String,
    /// Every environment variable the binary reads, by name.
    pub variables: std::collections::BTreeMap<String, crate::config::VarRead>,
    /// Every metric it exports, name → type.
    pub metrics: std::collections::BTreeMap<String, &'static str>,
}

/// A service binary's contract: its configuration read from nothing (every variable it asks for
/// is noted), and its metrics registered into a registry of its own.
pub fn contract<C>(
    service: &str,
    ops_var: &str,
    ops_default: &str,
    parse: fn(&crate::config::Vars) -> Result<C, crate::config::ConfigError>,
    metrics: fn(&Registry),
) -> Contract {
    let vars = crate::config::Vars::for_contract();
    // The values are not used: reading them notes the names.
    let _ = parse(&vars);
    let _ = crate::config::worker_threads(&vars);
    let _ = vars.addr_or(ops_var, ops_default);
    let _ = crate::otel::TraceConfig::from_vars(&vars, service);
    let mut variables = vars.read();
    variables.insert(
        crate::telemetry::FILTER_VAR.to_owned(),
        crate::config::VarRead {
            default: Some(crate::telemetry::DEFAULT_FILTER.to_owned()),
            required: false,
        },
    );
    let registry = Registry::new();
    CommonMetrics::register(&registry, service);
    crate::otel::register_metrics(&registry);
    LogMetrics::register(&registry);
    metrics(&registry);
    Contract {
        service: service.to_owned(),
        variables,
        metrics: crate::metrics::declared(),
    }
}

/// The whole of a service's `main`: the `healthcheck` subcommand (GET `/healthz` on the address
/// in `ops_var`) and `--print-contract` ([`contract`], as JSON), then config from the environment
/// (exit 64 naming the variable), telemetry, the runtime (its worker threads:
/// [`crate::config::worker_threads`]), a token cancelled by SIGTERM/SIGINT, and `start`. Exit
/// status 1 when `start` fails. `start` keeps to the shutdown budget ([`crate::shutdown`]); the
/// runtime then gets at most [`crate::shutdown::RUNTIME_STOP`]. `metrics` registers the
/// service's own metrics (for the contract).
pub fn main<C, F, Fut, E>(
    service: &str,
    ops_var: &str,
    ops_default: &str,
    parse: fn(&crate::config::Vars) -> Result<C, crate::config::ConfigError>,
    common: fn(&C) -> &CommonConfig,
    metrics: fn(&Registry),
    start: F,
) -> std::process::ExitCode
where
    F: FnOnce(C, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    use crate::config::{exit_on_error, Vars};
    match std::env::args().nth(1).as_deref() {
        Some("--print-contract") => {
            let contract = contract(service, ops_var, ops_default, parse, metrics);
            return match serde_json::to_string_pretty(&contract) {
                Ok(json) => {
                    println!("{json}");
                    std::process::ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("cannot print the contract: {error}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
        Some("healthcheck") => {
            let vars = Vars::from_env();
            let addr = exit_on_error(vars.addr_or(ops_var, ops_default));
            return std::process::ExitCode::from(crate::ops::healthcheck(addr) as u8);
        }
        _ => {}
    }
    let vars = Vars::from_env();
    let config = exit_on_error(parse(&vars));
    let workers = exit_on_error(crate::config::worker_threads(&vars));
    let traces = exit_on_error(crate::otel::TraceConfig::from_vars(&vars, service));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(error) => {
            crate::telemetry::init(common(&config).log_format, None);
            tracing::error!(%error, "Cannot start the Tokio runtime.");
            return std::process::ExitCode::FAILURE;
        }
    };
    // The exporter sends from the runtime: it starts with it.
    let exporting = crate::telemetry::init(
        common(&config).log_format,
        Some((&traces, runtime.handle().clone())),
    );
    let result = runtime.block_on(async {
        let cancel = CancellationToken::new();
        crate::shutdown::cancel_on_signal(cancel.clone());
        let result = start(config, cancel).await;
        if let Some(exporting) = exporting {
            exporting.shutdown().await;
        }
        result
    });
    // Dropping the runtime would wait for blocking threads (a DNS lookup in flight) without end.
    runtime.shutdown_timeout(crate::shutdown::RUNTIME_STOP);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(
                error = format!("{error:#}"),
                service,
                "Stopped with an error."
            );
            std::process::ExitCode::FAILURE
        }
    }
}

/// A worker's life: start ([`ServiceContext::start`]), serve the ops endpoints on `ops_listener`, run
/// `work` until it returns (it stops when `cancel` fires), then drain the NATS connection. From
/// the moment `cancel` fires, `work` and the ops server share one budget with the drain
/// (`SHUTDOWN_GRACE_MS`, see [`crate::shutdown`]); work still running when its share is spent is
/// dropped, and the service still stops cleanly: what it had not settled is redelivered.
pub async fn run_worker<F, Fut, E>(
    common: &CommonConfig,
    service: &str,
    ops_listener: tokio::net::TcpListener,
    client: async_nats::Client,
    cancel: CancellationToken,
    work: F,
) -> Result<(), E>
where
    F: FnOnce(ServiceContext) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: From<Error>,
{
    let ctx = ServiceContext::start(client.clone(), common, service, &cancel).await?;
    let ops_state = ctx.ops_state();
    // Called before the ops server starts, so that what `work` does before its first await
    // (holding [`ServiceContext::starting`]) is in place for the first `/readyz`.
    let work = work(ctx);
    // Its own token: work that ends on its own (an error) stops the ops server too, instead of
    // leaving the process answering /healthz with nothing behind it.
    let ops_cancel = cancel.child_token();
    let ops = tokio::spawn(crate::ops::serve(
        ops_listener,
        crate::ops::router(ops_state)
            .fallback(crate::http::not_found)
            .method_not_allowed_fallback(crate::http::method_not_allowed),
        ops_cancel.clone(),
    ));
    // A scrape on a kept-alive connection must not hold the process past its budget.
    let ops_abort = ops.abort_handle();
    let everything = async {
        let result = work.await;
        ops_cancel.cancel();
        let _ = ops.await;
        result
    };
    let (deadline, result) =
        crate::shutdown::run_bounded(everything, &cancel, common.shutdown_grace).await;
    ops_abort.abort();
    crate::shutdown::drain_nats(&client, &deadline).await;
    result.unwrap_or(Ok(()))
}
