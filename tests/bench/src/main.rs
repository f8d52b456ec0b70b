//! `make bench`: the pipeline under load, as separate release-built processes on one machine,
//! against floors measured in the same run. See `tests/bench/RESULTS.md` for what it measures,
//! how, and the numbers of the last run.
//!
//! - [`load`]: signed Ecwid v3 webhooks over bounded HTTP/1.1 keep-alive connections, closed loop
//!   (as fast as answered) or open loop (fixed rate).
//! - [`receive`]: callback receivers that verify `Elements-Webhook-Signature` and count deliveries
//!   by `message.eventId`.
//! - [`track`]: per-phase ledgers: sent, answered, delivered, end-to-end latency.
//! - [`floors`]: the floors (a), (b), (c), each in a process of its own.
//! - [`procinfo`]: CPU seconds and peak RSS from `/proc`.
//! - [`cpu`]: `bench cpu`, instructions per event of each service under callgrind.
//! - [`one_instance`]: all the load to one instance with the default limits.
//!
//! Usage: `bench [--quick] [--max-secs S] [--fixed-secs S] [--rates 500,2000] [--floor-secs S]
//! [--floor-fixed-secs S] [--connections N] [--stores N] [--consume-msgs N] [--perf FILE]
//! [--log-records N] [--log-samples N] [--idle-secs S]`; `bench --soak [--soak-gb G]`: see [`soak`];
//! each flag also reads `BENCH_<FLAG>` (for example `BENCH_FIXED_SECS=5`).
//! `bench cpu [--events N] [--rate R] [--warmup N] [--idle-secs S] [--stores N] [--filter EXPR]`:
//! see [`cpu`]. `bench one-instance [flags as above]`: only the four-instance max load and the
//! one-instance phases ([`one_instance`]), for a quick comparison.

mod admin_reads;
mod cpu;
mod eventlog;
mod floors;
mod held;
mod isolation;
mod load;
mod one_instance;
mod procinfo;
mod receive;
mod track;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use integration_tests::procs::{Cluster, ServiceProc};
use load::{LoadResult, Pace, Store, Webhooks};
use procinfo::Usage;
use track::{now_ns, quantile_ms, Summary, Tracker};

/// Most requests a closed-loop phase can send per second of its duration (ledger size).
const MAX_RATE_CAP: f64 = 60_000.0;
const MIB: f64 = 1024.0;

#[derive(Debug, Clone)]
struct Opts {
    max_secs: f64,
    fixed_secs: f64,
    rates: Vec<f64>,
    floor_secs: f64,
    floor_fixed_secs: f64,
    connections: usize,
    stores: usize,
    consume_msgs: u64,
    perf: Option<String>,
    /// Records the event log is filled with before its lookups are timed.
    log_records: u64,
    /// Lookups of each kind timed.
    log_samples: u64,
    /// How long the idle phase (100 instances, no traffic) measures CPU.
    idle_secs: f64,
    /// `--soak`: the soak run instead of the default one.
    soak: bool,
    /// What the soak run fills the streams to, GB (10^9 bytes).
    soak_gb: f64,
    /// `--service-env K=V,K2=V2`: settings the services run with beyond [`PRODUCTION`], to
    /// price one (e.g. `TOKIO_WORKER_THREADS=1`) against the default in the same kind of run.
    service_env: Vec<(String, String)>,
}

impl Opts {
    fn parse() -> anyhow::Result<Self> {
        Self::parse_from(&std::env::args().skip(1).collect::<Vec<_>>())
    }

    /// The options from `BENCH_*` variables and `argv` (without the program and subcommand).
    fn parse_from(argv: &[String]) -> anyhow::Result<Self> {
        let mut flags: BTreeMap<String, String> = BTreeMap::new();
        for (k, v) in std::env::vars() {
            // BENCH_ARGS is the Makefile's: make exports a variable set on its command line, so
            // `make bench BENCH_ARGS=--quick` puts it in our environment as well as in argv.
            if k == "BENCH_ARGS" {
                continue;
            }
            if let Some(name) = k.strip_prefix("BENCH_") {
                flags.insert(name.to_ascii_lowercase().replace('_', "-"), v);
            }
        }
        let mut args = argv.iter().cloned();
        while let Some(arg) = args.next() {
            let Some(flag) = arg.strip_prefix("--") else {
                bail!("unexpected argument `{arg}` (flags start with --)");
            };
            if flag == "quick" || flag == "soak" {
                flags.insert(flag.into(), "true".into());
                continue;
            }
            match flag.split_once('=') {
                Some((k, v)) => flags.insert(k.to_owned(), v.to_owned()),
                None => flags.insert(
                    flag.to_owned(),
                    args.next()
                        .with_context(|| format!("--{flag} needs a value"))?,
                ),
            };
        }
        let quick = flags.get("quick").is_some_and(|v| v == "true" || v == "1");
        let num = |name: &str, default: f64| -> anyhow::Result<f64> {
            match flags.get(name) {
                Some(v) => v
                    .parse::<f64>()
                    .with_context(|| format!("--{name}: not a number: {v}")),
                None => Ok(default),
            }
        };
        let d = |long: f64| if quick { 3.0 } else { long };
        let rates = match flags.get("rates") {
            Some(v) => v
                .split(',')
                .map(|r| {
                    r.trim()
                        .parse::<f64>()
                        .with_context(|| format!("--rates: {r}"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?,
            None => vec![500.0, 2000.0],
        };
        let known = [
            "quick",
            "max-secs",
            "fixed-secs",
            "rates",
            "floor-secs",
            "floor-fixed-secs",
            "connections",
            "stores",
            "consume-msgs",
            "perf",
            "log-records",
            "log-samples",
            "idle-secs",
            "soak",
            "soak-gb",
            "service-env",
        ];
        if let Some(unknown) = flags.keys().find(|k| !known.contains(&k.as_str())) {
            bail!("unknown flag --{unknown} (known: {})", known.join(", --"));
        }
        Ok(Self {
            max_secs: num("max-secs", d(10.0))?,
            fixed_secs: num("fixed-secs", d(20.0))?,
            rates,
            floor_secs: num("floor-secs", d(10.0))?,
            floor_fixed_secs: num("floor-fixed-secs", d(10.0))?,
            connections: num("connections", 64.0)? as usize,
            stores: num("stores", 4.0)?.max(1.0) as usize,
            consume_msgs: num("consume-msgs", if quick { 20_000.0 } else { 100_000.0 })? as u64,
            perf: flags.get("perf").cloned(),
            log_records: num("log-records", if quick { 100_000.0 } else { 1_000_000.0 })? as u64,
            log_samples: num("log-samples", if quick { 100.0 } else { 500.0 })? as u64,
            idle_secs: num("idle-secs", if quick { 10.0 } else { 30.0 })?,
            soak: flags.get("soak").is_some_and(|v| v == "true" || v == "1"),
            soak_gb: num("soak-gb", 3.0)?,
            service_env: match flags.get("service-env") {
                Some(v) => parse_service_env(v)?,
                None => Vec::new(),
            },
        })
    }

    /// The services' settings: [`PRODUCTION`], then `--service-env`, then `more`.
    fn settings<'a>(&'a self, more: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        service_settings(&[], &self.service_env, more)
    }
}

/// [`PRODUCTION`], then `defaults`, then `service_env` (`--service-env`), then `more`: a later
/// setting of the same name wins.
fn service_settings<'a>(
    defaults: &[(&'a str, &'a str)],
    service_env: &'a [(String, String)],
    more: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    PRODUCTION
        .iter()
        .chain(defaults)
        .copied()
        .chain(service_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .chain(more.iter().copied())
        .collect()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the Tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    let result = match arg(1).as_str() {
        "floor-ingest" => runtime.block_on(async {
            floors::floor_ingest(arg(2).parse().context("listen address")?, &arg(3)).await
        }),
        "floor-consume" => runtime.block_on(async {
            floors::floor_consume(&arg(2), arg(3).parse().context("count")?).await
        }),
        "floor-post" => runtime.block_on(async {
            floors::floor_post(
                &arg(2),
                arg(3).parse().context("secs")?,
                arg(4).parse().context("connections")?,
                arg(5).parse().context("size")?,
            )
            .await
        }),
        "cpu" => cpu::CpuOpts::parse(&args[2..]).and_then(|opts| runtime.block_on(cpu::run(opts))),
        "held" => runtime.block_on(held::run()),
        "isolation" => runtime.block_on(isolation::run()),
        "admin-reads" => runtime.block_on(admin_reads::run()),
        "log" => Opts::parse_from(&args[2..]).and_then(|opts| runtime.block_on(log_only(opts))),
        "one-instance" => {
            Opts::parse_from(&args[2..]).and_then(|opts| runtime.block_on(one_instance_only(opts)))
        }
        _ => Opts::parse().and_then(|opts| {
            if opts.soak {
                runtime.block_on(soak(opts))
            } else {
                runtime.block_on(bench(opts))
            }
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The benchmark's own nats-server, with its store on disk under the target folder.
struct Nats {
    child: std::process::Child,
    port: u16,
    /// Its monitoring port (`/connz`: messages per connection).
    monitor: u16,
    _store: tempfile::TempDir,
}

impl Nats {
    /// On ports the server picks itself (`-p -1 -m -1`, read back from its ports file), so
    /// that no other process can take them between a pick and the server's start.
    async fn start() -> anyhow::Result<Self> {
        let store = tempfile::Builder::new()
            .prefix("bench-nats-")
            .tempdir_in(integration_tests::procs::binary_dir())?;
        let ports_dir = store.path().join("ports");
        std::fs::create_dir_all(&ports_dir)?;
        let mut child = std::process::Command::new(integration_tests::nats_server_bin())
            .args(["-a", "127.0.0.1", "-p", "-1", "-m", "-1", "-js", "-sd"])
            .arg(store.path().join("js"))
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start nats-server (make test installs it)")?;
        let (port, monitor) =
            match integration_tests::listed_ports(&mut child, &ports_dir, &["nats", "monitoring"])
                .await
            {
                Ok(ports) => (ports[0], ports[1]),
                Err(e) => {
                    let _ = child.kill();
                    bail!("{e}");
                }
            };
        let nats = Self {
            child,
            port,
            monitor,
            _store: store,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                bail!("nats-server did not listen within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(nats)
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process of the bench itself (a floor), killed on drop.
struct Child(tokio::process::Child);

impl Child {
    fn spawn(args: &[&str]) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let child = tokio::process::Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        Ok(Self(child))
    }

    fn pid(&self) -> u32 {
        self.0.id().unwrap_or(0)
    }

    /// Waits for it to exit and parses the JSON line it printed.
    async fn output(self, timeout: Duration) -> anyhow::Result<serde_json::Value> {
        let out = tokio::time::timeout(timeout, self.0.wait_with_output())
            .await
            .context("the floor process did not finish in time")??;
        if !out.status.success() {
            bail!("the floor process failed: {}", out.status);
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().unwrap_or_default();
        serde_json::from_str(line).with_context(|| format!("floor output: {text}"))
    }
}

/// The processes whose resources are reported, by name.
#[derive(Debug, Clone)]
struct Pids(Vec<(String, u32)>);

/// The name under which PostgreSQL (the postmaster and its backends together) is reported.
const POSTGRES: &str = "postgres";

impl Pids {
    /// The pipeline's processes, with the event log's PostgreSQL when it runs.
    fn pipeline(cluster: &Cluster) -> Self {
        let mut pids = vec![
            ("ingest".into(), cluster.ingest.pid().unwrap_or(0)),
            (
                "normalizer".into(),
                cluster.normalizers[0].pid().unwrap_or(0),
            ),
            ("deliverer".into(), cluster.deliverers[0].pid().unwrap_or(0)),
        ];
        if let Some(pid) = integration_tests::pg::running_pid() {
            pids.push((POSTGRES.into(), pid));
        }
        Self(pids)
    }

    fn with(mut self, more: &[(&str, u32)]) -> Self {
        self.0
            .extend(more.iter().map(|(name, pid)| ((*name).to_owned(), *pid)));
        self
    }

    /// Every pid, PostgreSQL's backends included.
    fn ids(&self) -> Vec<u32> {
        self.0
            .iter()
            .flat_map(|(name, pid)| {
                let mut ids = vec![*pid];
                if name == POSTGRES {
                    ids.extend(procinfo::children(*pid));
                }
                ids
            })
            .collect()
    }

    fn read(&self) -> BTreeMap<String, Usage> {
        self.0
            .iter()
            .map(|(name, pid)| {
                let usage = if name == POSTGRES {
                    procinfo::read_tree(*pid)
                } else {
                    procinfo::read(*pid)
                };
                (name.clone(), usage.unwrap_or_default())
            })
            .collect()
    }
}

/// CPU seconds each process used between two readings.
fn cpu_delta(
    before: &BTreeMap<String, Usage>,
    after: &BTreeMap<String, Usage>,
) -> BTreeMap<String, f64> {
    delta(before, after, |b, a| {
        a.cpu_secs - b.map_or(0.0, |u| u.cpu_secs)
    })
}

/// One pipeline phase, measured.
#[derive(Debug)]
struct Phase {
    name: String,
    rate: Option<f64>,
    load: LoadResult,
    summary: Summary,
    /// Delivered events per second, from the first request (or, for the paused phase, from the
    /// workers' resumption) to the last delivery.
    e2e_eps: f64,
    drained: bool,
    /// CPU seconds per process while the load ran.
    cpu_load: BTreeMap<String, f64>,
    /// CPU seconds per process over the whole phase, the drain included.
    cpu: BTreeMap<String, f64>,
    /// CPU seconds other processes on the machine used while the load ran (other users of a
    /// shared machine make the figures worse).
    other_cpu: f64,
    /// NATS messages each service's connections sent to nats-server and received from it over
    /// the whole phase, the drain included.
    nats_msgs: BTreeMap<String, MsgCount>,
    wall_secs: f64,
}

struct Ctx {
    ingest: SocketAddr,
    webhooks: Arc<Webhooks>,
    trackers: Arc<Vec<Arc<Tracker>>>,
    pids: Pids,
    /// nats-server's monitoring port.
    nats_monitor: u16,
    connections: usize,
    /// `--perf FILE`: `perf record` of the services and nats-server during the two max-load
    /// phases, into `FILE.ingest` and `FILE.e2e`.
    perf: Option<String>,
}

/// Waits until every acknowledged webhook of `tracker` was delivered, or until deliveries stall
/// for 45 s (longer than any ack_wait, so redeliveries are waited for). Returns whether all came.
async fn drain(tracker: &Tracker) -> bool {
    let mut last = (tracker.deliveries(), Instant::now());
    let give_up = Instant::now() + Duration::from_secs(600);
    loop {
        if tracker.missing() == 0 {
            return true;
        }
        let now = tracker.deliveries();
        if now != last.0 {
            last = (now, Instant::now());
        }
        if last.1.elapsed() > Duration::from_secs(45) || Instant::now() > give_up {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// CPU the services and nats-server may use in a second for the pipeline to count as quiet
/// (an idle pipeline with 100 instances uses ~1 % of a core).
const QUIET_CPU_SECS: f64 = 0.05;
/// The longest wait for a quiet pipeline before a phase starts anyway.
const QUIET_WAIT: Duration = Duration::from_secs(60);

/// Waits until nats-server and the services use less than [`QUIET_CPU_SECS`] in a second, so a
/// phase does not pay for work left over from the one before (nats-server removes the acked
/// messages of a drained backlog and compacts their blocks in the background). Says how long
/// it waited and what that work cost, when it was more than a second.
async fn settle(pids: &Pids, phase: &str) {
    let started = Instant::now();
    let used = |a: &BTreeMap<String, Usage>, b: &BTreeMap<String, Usage>| -> f64 {
        cpu_delta(a, b)
            .iter()
            .filter(|(name, _)| name.as_str() != "bench")
            .map(|(_, secs)| secs)
            .sum()
    };
    let first = pids.read();
    let mut last = first.clone();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = pids.read();
        let quiet = used(&last, &now) < QUIET_CPU_SECS;
        if quiet || started.elapsed() >= QUIET_WAIT {
            let waited = started.elapsed().as_secs_f64();
            if waited > 1.5 {
                println!(
                    "{phase}: waited {waited:.0} s for a quiet pipeline{} (nats-server and services used {:.1} CPU s meanwhile)",
                    if quiet { "" } else { ", in vain" },
                    used(&first, &now),
                );
            }
            return;
        }
        last = now;
    }
}

async fn pipeline_phase(
    ctx: &Ctx,
    index: usize,
    pace: Pace,
    secs: f64,
    paused: &[&ServiceProc],
    profile: Option<&str>,
) -> Phase {
    let tracker = ctx.trackers[index].clone();
    settle(&ctx.pids, &tracker.name).await;
    let msgs_before = nats_messages(ctx.nats_monitor).await;
    let before = ctx.pids.read();
    let others_before = procinfo::all_processes();
    let wall = Instant::now();
    for p in paused {
        p.pause();
    }
    let perf = match (&ctx.perf, profile) {
        (Some(file), Some(suffix)) => start_perf(&format!("{file}.{suffix}"), &ctx.pids, secs),
        _ => None,
    };
    let load_start_ns = now_ns();
    let load = load::run(
        load::Target {
            addr: ctx.ingest,
            path: "/events/ecwid",
            webhooks: ctx.webhooks.clone(),
            phase: index,
            tracker: tracker.clone(),
        },
        ctx.connections,
        pace,
        Duration::from_secs_f64(secs),
    )
    .await;
    let at_load_end = ctx.pids.read();
    let others = procinfo::others_cpu(&others_before, &procinfo::all_processes(), &ctx.pids.ids());
    let resumed_ns = now_ns();
    for p in paused {
        p.resume();
    }
    if let Some(mut perf) = perf {
        let _ = tokio::time::timeout(Duration::from_secs(30), perf.wait()).await;
    }
    let drained = drain(&tracker).await;
    let after = ctx.pids.read();
    let nats_msgs = msg_delta(&msgs_before, &nats_messages(ctx.nats_monitor).await);
    let summary = tracker.summary();
    let from = if paused.is_empty() {
        load_start_ns
    } else {
        resumed_ns
    };
    let span = (summary.last_delivery_ns.saturating_sub(from)) as f64 / 1e9;
    Phase {
        name: tracker.name.clone(),
        rate: match pace {
            Pace::Rate(r) => Some(r),
            Pace::Max => None,
        },
        e2e_eps: summary.delivered as f64 / span.max(1e-9),
        load,
        summary,
        drained,
        other_cpu: others,
        nats_msgs,
        cpu_load: cpu_delta(&before, &at_load_end),
        cpu: cpu_delta(&before, &after),
        wall_secs: wall.elapsed().as_secs_f64(),
    }
}

/// `perf record` (software clock, 999 Hz, no call graphs: the release build has no frame
/// pointers) of every process but the bench for `secs`.
fn start_perf(file: &str, pids: &Pids, secs: f64) -> Option<tokio::process::Child> {
    let list: Vec<String> = pids
        .0
        .iter()
        .filter(|(name, _)| name != "bench")
        .map(|(_, pid)| pid.to_string())
        .collect();
    let child = tokio::process::Command::new("perf")
        .args([
            "record",
            "-F",
            "999",
            "-o",
            file,
            "-p",
            &list.join(","),
            "--",
            "sleep",
        ])
        .arg(format!("{secs}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match child {
        Ok(c) => {
            println!("perf record of this phase's load into {file}");
            Some(c)
        }
        Err(e) => {
            println!("perf is not available ({e}); no profile");
            None
        }
    }
}

fn command_line(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.trim().to_owned()
        })
        .unwrap_or_else(|| format!("({cmd} not available)"))
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    let mem = command_line("free", &["-h"]);
    let mem = mem.lines().nth(1).unwrap_or_default().to_owned();
    format!(
        "nproc {} | CPU {cpu} | {mem} | {} | kernel {}",
        command_line("nproc", &[]),
        command_line(
            &integration_tests::nats_server_bin().to_string_lossy(),
            &["--version"]
        ),
        command_line("uname", &["-r"]),
    )
}

fn ms(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1}")
    }
}

fn target(met: bool, note: String) -> String {
    format!("{} {note}", if met { "MET   " } else { "MISSED" })
}

/// What every phase shares: the benchmark's nats-server and the webhooks the load sends.
struct Setup {
    nats: Nats,
    nats_url: String,
    stores: Vec<Store>,
    webhooks: Arc<Webhooks>,
    body_size: usize,
}

/// Floor (a) at one pace: the load's result, its response times sorted, CPU seconds per process.
struct FloorA {
    pace: Pace,
    result: LoadResult,
    latencies_us: Vec<u32>,
    cpu: BTreeMap<String, f64>,
}

/// The floors, measured in this run.
struct Floors {
    /// Floor (a) at max load first, then at each `--rates` pace.
    a: Vec<FloorA>,
    a_usage: Usage,
    a_rps: f64,
    b_rate: f64,
    c_rate: f64,
    /// CPU microseconds per operation, all processes: a JetStream publish (256 acks in flight),
    /// a consume + ack (b), a POST and its receipt (c).
    publish_us: f64,
    consume_us: f64,
    post_us: f64,
}

/// The pipeline's processes and what its phases share.
struct Pipeline {
    cluster: Cluster,
    ctx: Ctx,
    anomalies: Arc<receive::Anomalies>,
    /// Instances created, one per store.
    stores: usize,
    /// A receiver's callback URL, for the idle phase's extra instances.
    idle_callback: String,
}

/// The run: set up, floors, the pipeline at max load, then at fixed rates, then the report.
/// `bench log [--log-records N] [--log-samples N]`: only the event log's lookups at size.
async fn log_only(opts: Opts) -> anyhow::Result<()> {
    let setup = set_up(&opts).await?;
    let pipeline = start_pipeline(&opts, &setup).await?;
    let lookups = event_log_lookups(&opts, &setup, &pipeline).await?;
    let search = quantile_ms(&lookups.by_object_us, 0.99);
    let lookup = quantile_ms(&lookups.by_id_us, 0.99);
    let status = quantile_ms(&lookups.by_status_us, 0.99);
    for (name, v) in [
        ("by id", &lookups.by_id_us),
        ("by objectId", &lookups.by_object_us),
        (
            "by instance, status and a time window",
            &lookups.by_status_us,
        ),
    ] {
        let q = |f| ms(quantile_ms(v, f));
        println!(
            "{name}: p50 {} p90 {} p95 {} p99 {} max {} ms ({} each)",
            q(0.5),
            q(0.9),
            q(0.95),
            q(0.99),
            q(1.0),
            v.len()
        );
    }
    println!(
        "database: {:.0} MB per million records; nats-server RSS {} MB before the fill, {} MB after",
        lookups.bytes_per_million / 1e6,
        lookups.nats_rss_before >> 20,
        lookups.nats_rss_after >> 20
    );
    // One day at 100 events/s is 8.64 million records: the dropped day's figures scaled.
    let scale = 8_640_000.0 / (lookups.day_records.max(1) as f64);
    println!(
        "retention: one day of {} records ({:.0} MB) dropped in {:.1} ms; a day at 100 events/s: 8.64 M records, ~{:.1} GB",
        lookups.day_records,
        lookups.day_bytes as f64 / 1e6,
        lookups.day_drop_ms,
        lookups.day_bytes as f64 * scale / 1e9
    );
    println!(
        "\nLOG lookup_p99_ms={lookup:.1} search_p99_ms={search:.1} status_search_p99_ms={status:.1} log_records={} fill_secs={:.0} db_mb_per_million={:.0} nats_rss_mb_before={} nats_rss_mb_after={} day_records={} day_mb={:.0} day_drop_ms={:.1}",
        lookups.records,
        lookups.fill_secs,
        lookups.bytes_per_million / 1e6,
        lookups.nats_rss_before >> 20,
        lookups.nats_rss_after >> 20,
        lookups.day_records,
        lookups.day_bytes as f64 / 1e6,
        lookups.day_drop_ms
    );
    Ok(())
}

async fn bench(opts: Opts) -> anyhow::Result<()> {
    let setup = set_up(&opts).await?;
    let floors = measure_floors(&opts, &setup).await?;
    let pipeline = start_pipeline(&opts, &setup).await?;
    let mut phases = vec![warm_up(&pipeline.ctx).await];
    phases.extend(max_load(&opts, &pipeline).await);
    phases.extend(paced_runs(&opts, &pipeline.ctx).await);
    let mut pipeline = pipeline;
    let one = one_instance::run(&opts, &mut pipeline).await?;
    let one_fields = format!(
        "{} one_instance_vs_e2e={:.2}",
        one.fields(),
        one.phases[0].e2e_eps / phases[2].e2e_eps
    );
    phases.extend(one.phases);
    let idle_cpu_pct = idle_phase(&opts, &pipeline).await?;
    let usage = pipeline.ctx.pids.read();
    // The log's cost compares two max-load phases on the same store: the log-off one runs
    // before the lookups fill the log with a million records (which grow nats-server's heap
    // and its background work), as the log-on one did. (It has the idle phase's 96 instances
    // more, which no traffic goes to.)
    phases.extend(log_cost_phases(&opts, &setup, &mut pipeline).await?);
    let lookups = event_log_lookups(&opts, &setup, &pipeline).await?;
    let mut line = report(&opts, &floors, &phases, &usage, &pipeline.anomalies);
    line.push_str(&one_fields);
    line.push_str(&format!(" idle_cpu_pct={idle_cpu_pct:.2}"));
    line.push_str(&report_event_log(&phases, &lookups));
    failing_receiver_phase(&opts, &setup, &pipeline).await;
    line.push_str(&format!(
        " nats_subjects_max={}",
        nats_subjects_max(&setup.nats_url).await?
    ));
    println!("\nBENCH {line}");
    drop(pipeline);
    Ok(())
}

/// `bench one-instance`: the four-instance max load (after the warm-up), then the one-instance
/// phases, for a before/after comparison that does not take the whole run.
async fn one_instance_only(opts: Opts) -> anyhow::Result<()> {
    let setup = set_up(&opts).await?;
    let mut pipeline = start_pipeline(&opts, &setup).await?;
    let mut phases = vec![warm_up(&pipeline.ctx).await];
    phases.push(pipeline_phase(&pipeline.ctx, 2, Pace::Max, opts.max_secs, &[], None).await);
    let one = one_instance::run(&opts, &mut pipeline).await?;
    let e2e_eps = phases[1].e2e_eps;
    let (fields, ratio) = (one.fields(), one.phases[0].e2e_eps / e2e_eps);
    phases.extend(one.phases);
    report_phases(&phases);
    let lost: u64 = phases.iter().map(|p| p.summary.lost).sum();
    println!(
        "\nONE_INSTANCE e2e_eps={e2e_eps:.0}{fields} one_instance_vs_e2e={ratio:.2} lost={lost}"
    );
    Ok(())
}

/// Instances the idle phase runs with, in all.
const IDLE_INSTANCES: usize = 100;

/// An idle pipeline: instances added up to [`IDLE_INSTANCES`], no traffic, then `--idle-secs` of
/// CPU of nats-server and the three services, as a percentage of one core.
async fn idle_phase(opts: &Opts, pipeline: &Pipeline) -> anyhow::Result<f64> {
    let cluster = &pipeline.cluster;
    let existing = pipeline.stores;
    for i in existing..IDLE_INSTANCES {
        // Nothing is sent to these stores: the callback is never called.
        cluster
            .create_instance(
                &(900_000 + i).to_string(),
                &pipeline.idle_callback,
                &[("event.notification.signature.key", "idle-key")],
            )
            .await;
    }
    // Let the instance changes, the last deliveries' acks and the breaker flushes settle.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let services = ["ingest", "normalizer", "deliverer", "nats-server"];
    let before = pipeline.ctx.pids.read();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(opts.idle_secs)).await;
    let cpu = cpu_delta(&before, &pipeline.ctx.pids.read());
    let wall = started.elapsed().as_secs_f64();
    let pct = |k: &str| cpu.get(k).copied().unwrap_or(0.0) * 100.0 / wall;
    let all: f64 = services.iter().map(|k| pct(k)).sum();
    println!("\n## Idle ({IDLE_INSTANCES} instances, no traffic, {wall:.0} s)");
    println!("| process | % of one core |");
    println!("|---|---|");
    for k in services {
        println!("| {k} | {:.2} |", pct(k));
    }
    println!(
        "| all four | {all:.2} ({}) |",
        target(all < 2.0, "< 2 %".into())
    );
    Ok(all)
}

/// `--service-env K=V,K2=V2`: settings the services run with beyond [`PRODUCTION`]; separated by
/// `;` instead when a value holds commas (`STREAM_MAX_BYTES=ECWID_LOG=1GiB,ECWID_EVENTS=2GiB;`).
fn parse_service_env(list: &str) -> anyhow::Result<Vec<(String, String)>> {
    let separator = if list.contains(';') { ';' } else { ',' };
    list.split(separator)
        .filter(|kv| !kv.trim().is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
            _ => Err(anyhow::anyhow!("--service-env: not KEY=VALUE: {kv}")),
        })
        .collect()
}

/// The settings the benchmark's services run with: production defaults, only what a local
/// deployment must set.
const PRODUCTION: &[(&str, &str)] = &[
    ("DELIVER_RETRY_SCHEDULE", ""),
    ("DELIVER_TIMEOUT_MS", ""),
    ("DELIVER_CONNECT_TIMEOUT_MS", ""),
    ("DELIVER_BREAKER_COOLDOWN_MS", ""),
    ("SHUTDOWN_GRACE_MS", ""),
    ("INGEST_PUBLISH_TIMEOUT_MS", ""),
    ("NORMALIZER_PUBLISH_TIMEOUT_MS", ""),
    ("RUST_LOG", "info"),
];

/// The event log at size: `--log-records` records, then `--log-samples` lookups by id and
/// searches by objectId through the admin API.
async fn event_log_lookups(
    opts: &Opts,
    setup: &Setup,
    pipeline: &Pipeline,
) -> anyhow::Result<eventlog::Lookups> {
    println!("\n## Event log lookups ({} records)", opts.log_records);
    let lookups = eventlog::measure(
        &setup.nats_url,
        pipeline.cluster.ingest.ops,
        setup.nats.pid(),
        integration_tests::ADMIN_TOKEN,
        opts.log_records,
        opts.log_samples,
    )
    .await?;
    println!(
        "filled in {:.1} s; GET /events/{{id}} {}; GET /events?objectId= {} ({} each)",
        lookups.fill_secs,
        p50_p99(&lookups.by_id_us),
        p50_p99(&lookups.by_object_us),
        lookups.by_id_us.len()
    );
    Ok(lookups)
}

/// `p50 … p99 … ms` of sorted microseconds.
fn p50_p99(sorted_us: &[u32]) -> String {
    format!(
        "p50 {} p99 {} ms",
        ms(quantile_ms(sorted_us, 0.5)),
        ms(quantile_ms(sorted_us, 0.99))
    )
}

const MAX_ON: &str = "end to end (max)";
const WARM_OFF: &str = "warm-up (EVENT_LOG=off)";
const MAX_OFF: &str = "end to end (max, EVENT_LOG=off)";
const MAX_OFF_AGAIN: &str = "end to end (max, EVENT_LOG=off, again)";
const WARM_ON_AGAIN: &str = "warm-up (log on again)";
const MAX_ON_AGAIN: &str = "end to end (max, log on again)";
/// Last: 500/s while one more instance's receiver refuses every delivery.
const FAILING: &str = "500/s, one receiver failing";

/// The phases that price the event log, set against "end to end (max)" (log on): the same
/// pipeline with `EVENT_LOG=off` (new processes, the same instances and receivers), end to end
/// at max load twice, then with the log on again once. Log on, off, off, on: a drift of the
/// machine over the run weighs on both sides alike, and one phase's noise on either is halved.
/// The services are left running with the log on.
async fn log_cost_phases(
    opts: &Opts,
    setup: &Setup,
    pipeline: &mut Pipeline,
) -> anyhow::Result<Vec<Phase>> {
    println!("\n## Pipeline with EVENT_LOG=off, then on again");
    restart_services(setup, pipeline, &opts.settings(&[("EVENT_LOG", "off")])).await?;
    let base = 3 + opts.rates.len();
    let mut phases = warm_then_max(&pipeline.ctx, opts, base, 2).await;
    restart_services(setup, pipeline, &opts.settings(&[])).await?;
    phases.extend(warm_then_max(&pipeline.ctx, opts, base + 3, 1).await);
    Ok(phases)
}

/// A 2 s warm-up at 1,000/s (phase `first`), then `runs` phases of end to end at max load.
async fn warm_then_max(ctx: &Ctx, opts: &Opts, first: usize, runs: usize) -> Vec<Phase> {
    let mut phases = vec![pipeline_phase(ctx, first, Pace::Rate(1000.0), 2.0, &[], None).await];
    for i in 1..=runs {
        phases.push(pipeline_phase(ctx, first + i, Pace::Max, opts.max_secs, &[], None).await);
    }
    phases
}

/// The services stopped and started again with `settings` (the same nats-server, instances and
/// receivers); the bench's load and CPU readings follow the new processes.
async fn restart_services(
    setup: &Setup,
    pipeline: &mut Pipeline,
    settings: &[(&str, &str)],
) -> anyhow::Result<()> {
    let cluster = &mut pipeline.cluster;
    cluster.ingest.kill().await;
    for p in cluster
        .normalizers
        .iter_mut()
        .chain(cluster.deliverers.iter_mut())
    {
        p.kill().await;
    }
    let cluster = Cluster::start(&setup.nats_url, settings, 1).await;
    cluster.wait_instances_seen().await;
    pipeline.ctx.ingest = cluster.ingest.webhook.context("ingest webhook address")?;
    pipeline.ctx.pids = Pids::pipeline(&cluster).with(&[
        ("nats-server", setup.nats.pid()),
        ("bench", std::process::id()),
    ]);
    pipeline.cluster = cluster;
    Ok(())
}

/// The last phase: 500/s for `--fixed-secs` while one more instance of the first store calls a
/// receiver that refuses every connection, so its envelopes pile up waiting for their retries;
/// then what its health counts. The subject count that follows includes them.
async fn failing_receiver_phase(opts: &Opts, setup: &Setup, pipeline: &Pipeline) {
    let cluster = &pipeline.cluster;
    // A port nothing listens on: every attempt fails at connect.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_or(9, |a| a.port());
    let store = setup.stores[0].id.to_string();
    let id = cluster
        .create_instance(
            &store,
            &format!("http://127.0.0.1:{closed}/hook"),
            &[("event.notification.signature.key", "failing-key")],
        )
        .await;
    let index = pipeline
        .ctx
        .trackers
        .iter()
        .position(|t| t.name == FAILING)
        .unwrap_or_else(|| unreachable!("start_pipeline makes the {FAILING} ledger"));
    let phase = pipeline_phase(
        &pipeline.ctx,
        index,
        Pace::Rate(500.0),
        opts.fixed_secs,
        &[],
        None,
    )
    .await;
    let (_, health) = cluster
        .admin_request(
            reqwest::Method::GET,
            &format!("/instances/{id}/health"),
            None,
        )
        .await;
    println!(
        "\n## {FAILING}\n{:.0} events/s delivered to the working receivers; the failing instance's health: retrying {}, breaker {}",
        phase.e2e_eps, health["retrying"], health["breaker"]
    );
}

/// The largest subject count of any stream (a bucket's included) at the end of the run: what
/// nats-server keeps in memory per subject, bounded by instances and stores where state is not
/// per event.
async fn nats_subjects_max(nats_url: &str) -> anyhow::Result<String> {
    let js = async_nats::jetstream::new(integration_tests::connect(nats_url).await);
    let mut names = js.stream_names();
    let mut largest = (0, String::new());
    while let Some(name) = futures::StreamExt::next(&mut names).await {
        let name = name?;
        let mut stream = js.get_stream(&name).await?;
        let subjects = stream.info().await?.state.subjects_count;
        if subjects >= largest.0 {
            largest = (subjects, name);
        }
    }
    println!(
        "\nLargest subject count of any stream: {} ({})",
        largest.0, largest.1
    );
    Ok(format!("{}", largest.0))
}

/// The event log's figures: its cost (end to end at max load, log on against off, same run)
/// and its lookups at size; returns them for the BENCH line.
fn report_event_log(phases: &[Phase], lookups: &eventlog::Lookups) -> String {
    let rate = |name: &str| {
        phases
            .iter()
            .find(|p| p.name == name)
            .map_or(f64::NAN, |p| p.e2e_eps)
    };
    let on = (rate(MAX_ON) + rate(MAX_ON_AGAIN)) / 2.0;
    let off = (rate(MAX_OFF) + rate(MAX_OFF_AGAIN)) / 2.0;
    let cost = on / off;
    // CPU per event of every process of the pipeline, PostgreSQL included, while the load ran.
    let cpu_us = |name: &str| {
        phases
            .iter()
            .find(|p| p.name == name)
            .map_or(f64::NAN, |p| {
                ["ingest", "normalizer", "deliverer", "nats-server", POSTGRES]
                    .iter()
                    .map(|k| p.cpu_load.get(*k).copied().unwrap_or(0.0))
                    .sum::<f64>()
                    * 1e6
                    / p.load.ok.max(1) as f64
            })
    };
    let cpu_on = (cpu_us(MAX_ON) + cpu_us(MAX_ON_AGAIN)) / 2.0;
    let cpu_off = (cpu_us(MAX_OFF) + cpu_us(MAX_OFF_AGAIN)) / 2.0;
    let log_cpu_share = (cpu_on - cpu_off) / cpu_off;
    let lookup = quantile_ms(&lookups.by_id_us, 0.99);
    let search = quantile_ms(&lookups.by_object_us, 0.99);
    let status = quantile_ms(&lookups.by_status_us, 0.99);
    println!("\n## Event log");
    println!("| figure | result | target |");
    println!("|---|---|---|");
    println!(
        "| end to end ev/s at max load, log on / off (means of two phases each: on {:.0} and {:.0}, off {:.0} and {:.0}) | {on:.0} / {off:.0} = {cost:.2} | {} |",
        rate(MAX_ON),
        rate(MAX_ON_AGAIN),
        rate(MAX_OFF),
        rate(MAX_OFF_AGAIN),
        target(cost >= 0.9, "≥ 0.9".into())
    );
    println!(
        "| CPU µs per event at max load, every process (PostgreSQL included), log on / off | {cpu_on:.0} / {cpu_off:.0}: the log adds {:.0} % | {} |",
        log_cpu_share * 100.0,
        target(log_cpu_share <= 0.10, "≤ 10 %".into())
    );
    println!(
        "| GET /events/{{id}} p99, {} records | {} ms | {} |",
        lookups.records,
        ms(lookup),
        target(lookup < 5.0, "< 5 ms".into())
    );
    println!(
        "| GET /events?objectId= p99, {} records | {} ms | {} |",
        lookups.records,
        ms(search),
        target(search < 10.0, "< 10 ms".into())
    );
    println!(
        "| GET /events?instance=&status=&since=&until= p99, {} records | {} ms | {} |",
        lookups.records,
        ms(status),
        target(status < 50.0, "< 50 ms".into())
    );
    println!(
        "| PostgreSQL disk per million records; nats-server RSS before / after the fill | {:.0} MB; {} / {} MB | |",
        lookups.bytes_per_million / 1e6,
        lookups.nats_rss_before >> 20,
        lookups.nats_rss_after >> 20
    );
    format!(
        " log_cost={cost:.2} log_cpu_share={log_cpu_share:.2} lookup_p99_ms={lookup:.1} search_p99_ms={search:.1} status_search_p99_ms={status:.1} log_records={} db_mb_per_million={:.0}",
        lookups.records,
        lookups.bytes_per_million / 1e6
    )
}

/// Prints what runs where, starts nats-server and prepares the webhooks.
async fn set_up(opts: &Opts) -> anyhow::Result<Setup> {
    now_ns();
    println!("# ecwid-events bench");
    println!("machine: {}", machine());
    println!(
        "command: {}",
        std::env::args().collect::<Vec<_>>().join(" ")
    );
    println!("options: {opts:?}");

    let nats = Nats::start().await?;
    let nats_url = nats.url();
    let stores: Vec<Store> = (0..opts.stores)
        .map(|i| Store {
            id: 7_000_001 + i as u64,
            client_secret: format!("bench-client-secret-{i}"),
        })
        .collect();
    let webhooks = Arc::new(Webhooks::new(stores.clone()));
    let body_size = webhooks.typical_size();
    println!(
        "webhook body: {body_size} bytes on average, {} stores",
        opts.stores
    );
    Ok(Setup {
        nats,
        nats_url,
        stores,
        webhooks,
        body_size,
    })
}

/// The floors (a), (b) and (c), each in a process of its own; their streams are deleted after.
async fn measure_floors(opts: &Opts, setup: &Setup) -> anyhow::Result<Floors> {
    println!("\n## Floors");
    let (a, a_usage) = floor_a(opts, setup).await?;
    let a_rps = a[0].result.rps();
    // CPU per operation at the floors: nats-server and the bench process are read around each.
    let shared_pids = Pids(vec![
        ("nats-server".into(), setup.nats.pid()),
        ("bench".into(), std::process::id()),
    ]);
    let (b_rate, publish_us, consume_us) = floor_b(opts, setup, &shared_pids).await?;
    let (c_rate, post_us) = floor_c(opts, setup, &shared_pids).await?;
    {
        let js = async_nats::jetstream::new(async_nats::connect(&setup.nats_url).await?);
        for s in [floors::FLOOR_A_STREAM, floors::FLOOR_B_STREAM] {
            let _ = js.delete_stream(s).await;
        }
    }
    Ok(Floors {
        a,
        a_usage,
        a_rps,
        b_rate,
        c_rate,
        publish_us,
        consume_us,
        post_us,
    })
}

/// Floor (a), a bare axum ingest that publishes, at max load and at each `--rates` pace; and its
/// process's usage.
async fn floor_a(opts: &Opts, setup: &Setup) -> anyhow::Result<(Vec<FloorA>, Usage)> {
    let floor_port = integration_tests::free_port();
    let floor_addr: SocketAddr = ([127, 0, 0, 1], floor_port).into();
    let floor_a = Child::spawn(&["floor-ingest", &floor_addr.to_string(), &setup.nats_url])?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(floor_addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("floor (a) did not listen");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let floor_pids = Pids(vec![
        ("floor-a".into(), floor_a.pid()),
        ("nats-server".into(), setup.nats.pid()),
        ("bench".into(), std::process::id()),
    ]);
    let mut floor_phases = Vec::new();
    let paces: Vec<(Pace, f64)> = std::iter::once((Pace::Max, opts.floor_secs))
        .chain(
            opts.rates
                .iter()
                .map(|r| (Pace::Rate(*r), opts.floor_fixed_secs)),
        )
        .collect();
    for (pace, secs) in &paces {
        let cap = match pace {
            Pace::Max => MAX_RATE_CAP * secs,
            Pace::Rate(r) => r * secs + 16.0,
        };
        let tracker = Arc::new(Tracker::new("floor", cap as usize));
        let before = floor_pids.read();
        let others_before = procinfo::all_processes();
        let result = load::run(
            load::Target {
                addr: floor_addr,
                path: "/events/ecwid",
                webhooks: setup.webhooks.clone(),
                phase: usize::MAX,
                tracker,
            },
            opts.connections,
            *pace,
            Duration::from_secs_f64(*secs),
        )
        .await;
        let cpu = cpu_delta(&before, &floor_pids.read());
        let other = procinfo::others_cpu(
            &others_before,
            &procinfo::all_processes(),
            &floor_pids.ids(),
        );
        let mut lat = result.latencies_us.clone();
        lat.sort_unstable();
        println!(
            "floor (a) {:>10}: {:>8.0} req/s ok, {} non-200, {} errors, p50 {} ms, p99 {} ms, max {} ms; CPU s: {}, other processes {other:.1}",
            pace_name(*pace),
            result.rps(),
            result.non_ok,
            result.errors,
            ms(quantile_ms(&lat, 0.5)),
            ms(quantile_ms(&lat, 0.99)),
            ms(quantile_ms(&lat, 1.0)),
            fmt_cpu(&cpu),
        );
        floor_phases.push(FloorA {
            pace: *pace,
            result,
            latencies_us: lat,
            cpu,
        });
    }
    let floor_a_usage = procinfo::read(floor_a.pid()).unwrap_or_default();
    drop(floor_a);
    Ok((floor_phases, floor_a_usage))
}

fn sum(m: &BTreeMap<String, f64>) -> f64 {
    m.values().sum::<f64>()
}

/// JetStream publish with 256 acks in flight, then floor (b), a pull consumer that acks:
/// `(consume rate, publish µs, consume µs)`.
async fn floor_b(
    opts: &Opts,
    setup: &Setup,
    shared_pids: &Pids,
) -> anyhow::Result<(f64, f64, f64)> {
    let body_size = setup.body_size;
    let before = shared_pids.read();
    let publish_rate =
        floors::fill_floor_b(&setup.nats_url, opts.consume_msgs, body_size, 256).await?;
    let publish_us = sum(&cpu_delta(&before, &shared_pids.read())) * 1e6 / opts.consume_msgs as f64;
    println!(
        "JetStream publish, 256 acks in flight: {publish_rate:.0} msg/s ({} messages of {body_size} bytes)",
        opts.consume_msgs
    );
    ack_cost(&setup.nats_url, opts.consume_msgs, body_size, shared_pids).await?;
    let consumer = Child::spawn(&[
        "floor-consume",
        &setup.nats_url,
        &opts.consume_msgs.to_string(),
    ])?;
    let before = shared_pids.read();
    let out = consumer.output(Duration::from_secs(300)).await?;
    let floor_b_rate = out["count"].as_f64().unwrap_or(0.0) / out["secs"].as_f64().unwrap_or(1.0);
    let consume_us = (sum(&cpu_delta(&before, &shared_pids.read()))
        + out["cpu_secs"].as_f64().unwrap_or(f64::NAN))
        * 1e6
        / out["count"].as_f64().unwrap_or(1.0).max(1.0);
    println!("floor (b) pull consumer + ack: {floor_b_rate:.0} msg/s");
    Ok((floor_b_rate, publish_us, consume_us))
}

/// What an ack costs nats-server: `count` messages stored with acks and `count` without, in four
/// rounds (acked, not, not, acked) so that a drift of the machine during the measurement weighs
/// on both alike; prints nats-server's CPU per stored message each way.
async fn ack_cost(nats_url: &str, count: u64, size: usize, pids: &Pids) -> anyhow::Result<()> {
    let client = async_nats::connect(nats_url).await?;
    let mut stream = floors::no_ack_stream(&client).await?;
    let quarter = (count / 4).max(1);
    let (mut cpu, mut rate) = ([0.0_f64; 2], [0.0_f64; 2]);
    for acked in [true, false, false, true] {
        let before = pids.read();
        let r = floors::store_messages(&client, &mut stream, acked, quarter, size).await?;
        let used = cpu_delta(&before, &pids.read());
        cpu[usize::from(acked)] += used.get("nats-server").copied().unwrap_or(f64::NAN);
        rate[usize::from(acked)] += r / 2.0;
    }
    let per = |secs: f64| secs * 1e6 / (2 * quarter) as f64;
    println!(
        "JetStream publish with and without acks ({} messages each, rounds acked/not/not/acked): {:.0} and {:.0} msg/s; nats-server CPU per stored message {:.1} µs with an ack, {:.1} µs without",
        2 * quarter,
        rate[1],
        rate[0],
        per(cpu[1]),
        per(cpu[0]),
    );
    Ok(())
}

/// Floor (c), reqwest POSTs to a bare axum receiver: `(rate, µs per POST)`.
async fn floor_c(opts: &Opts, setup: &Setup, shared_pids: &Pids) -> anyhow::Result<(f64, f64)> {
    let bare_count = Arc::new(AtomicU64::new(0));
    let bare = receive::start_bare(bare_count.clone()).await?;
    let envelope_size = setup.body_size + 400;
    let poster = Child::spawn(&[
        "floor-post",
        &format!("http://{bare}/hook"),
        &opts.floor_secs.to_string(),
        &opts.connections.to_string(),
        &envelope_size.to_string(),
    ])?;
    let before = shared_pids.read();
    let out = poster
        .output(Duration::from_secs_f64(opts.floor_secs + 60.0))
        .await?;
    let floor_c_rate = out["count"].as_f64().unwrap_or(0.0) / out["secs"].as_f64().unwrap_or(1.0);
    let post_us = (sum(&cpu_delta(&before, &shared_pids.read()))
        + out["cpu_secs"].as_f64().unwrap_or(f64::NAN))
        * 1e6
        / out["count"].as_f64().unwrap_or(1.0).max(1.0);
    println!(
        "floor (c) reqwest POST -> bare axum: {floor_c_rate:.0} req/s, p50 {} ms, p99 {} ms ({} connections, {envelope_size}-byte bodies)",
        ms(out["p50_ms"].as_f64().unwrap_or(f64::NAN)),
        ms(out["p99_ms"].as_f64().unwrap_or(f64::NAN)),
        opts.connections
    );
    Ok((floor_c_rate, post_us))
}

/// NATS messages a connection sent to nats-server (`in`) and received from it (`out`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct MsgCount {
    sent: u64,
    received: u64,
}

/// Messages per open connection, summed by connection name (`ecwid-ingest`, `ecwid-ingest-reads`,
/// `ecwid-normalizer`, ...), read from nats-server's `/connz`. Empty when it does not answer:
/// the figures are then left out, the bench goes on.
async fn nats_messages(monitor: u16) -> BTreeMap<String, MsgCount> {
    let url = format!("http://127.0.0.1:{monitor}/connz?limit=100000");
    let Ok(resp) = reqwest::get(&url).await else {
        return BTreeMap::new();
    };
    let Ok(connz) = resp.json::<serde_json::Value>().await else {
        return BTreeMap::new();
    };
    let mut by_name: BTreeMap<String, MsgCount> = BTreeMap::new();
    for c in connz["connections"].as_array().into_iter().flatten() {
        let name = c["name"].as_str().unwrap_or("(unnamed)").to_owned();
        let count = by_name.entry(name).or_default();
        count.sent += c["in_msgs"].as_u64().unwrap_or(0);
        count.received += c["out_msgs"].as_u64().unwrap_or(0);
    }
    by_name
}

/// What each connection name sent and received between two readings (connections that closed
/// in between are not counted).
fn msg_delta(
    before: &BTreeMap<String, MsgCount>,
    after: &BTreeMap<String, MsgCount>,
) -> BTreeMap<String, MsgCount> {
    delta(before, after, |b, a| {
        let b = b.copied().unwrap_or_default();
        MsgCount {
            sent: a.sent.saturating_sub(b.sent),
            received: a.received.saturating_sub(b.received),
        }
    })
}

/// `diff(before, after)` for every key of `after`.
fn delta<T, U>(
    before: &BTreeMap<String, T>,
    after: &BTreeMap<String, T>,
    diff: impl Fn(Option<&T>, &T) -> U,
) -> BTreeMap<String, U> {
    after
        .iter()
        .map(|(k, a)| (k.clone(), diff(before.get(k), a)))
        .collect()
}

/// Starts the services as release processes with production settings, one instance (and one
/// verifying receiver) per store, and the ledgers of every phase.
async fn start_pipeline(opts: &Opts, setup: &Setup) -> anyhow::Result<Pipeline> {
    let mut names = vec![
        "warm-up".to_owned(),
        "ingest alone (max)".to_owned(),
        MAX_ON.to_owned(),
    ];
    let mut caps = vec![
        2_000.0 + 16.0,
        MAX_RATE_CAP * opts.max_secs,
        MAX_RATE_CAP * opts.max_secs,
    ];
    for r in &opts.rates {
        names.push(format!("fixed {r}/s"));
        caps.push(r * opts.fixed_secs + 16.0);
    }
    // Last, the pipeline again with the event log off, twice, then on again (`log_cost_phases`).
    let (warm_cap, max_cap) = (2_000.0 + 16.0, MAX_RATE_CAP * opts.max_secs);
    for (name, cap) in [
        (WARM_OFF, warm_cap),
        (MAX_OFF, max_cap),
        (MAX_OFF_AGAIN, max_cap),
        (WARM_ON_AGAIN, warm_cap),
        (MAX_ON_AGAIN, max_cap),
        (FAILING, 500.0 * opts.fixed_secs + 16.0),
    ] {
        names.push(name.to_owned());
        caps.push(cap);
    }
    // Then the one instance's phases (`one_instance`).
    names.push(one_instance::ONE_MAX.to_owned());
    caps.push(max_cap);
    names.push(one_instance::ONE_PACED.to_owned());
    caps.push(one_instance::ONE_RATE * opts.fixed_secs + 16.0);
    start_pipeline_with(opts, setup, &names, &caps).await
}

/// The pipeline with one ledger per phase (`names`, each holding up to `caps` events).
async fn start_pipeline_with(
    opts: &Opts,
    setup: &Setup,
    names: &[String],
    caps: &[f64],
) -> anyhow::Result<Pipeline> {
    println!("\n## Pipeline");
    let trackers: Arc<Vec<Arc<Tracker>>> = Arc::new(
        names
            .iter()
            .zip(caps)
            .map(|(n, c)| Arc::new(Tracker::new(n, *c as usize)))
            .collect(),
    );
    let anomalies = Arc::new(receive::Anomalies::default());
    // Production settings: only what a local deployment must set.
    let cluster = Cluster::start(&setup.nats_url, &opts.settings(&[]), 1).await;
    let mut idle_callback = String::new();
    for (i, store) in setup.stores.iter().enumerate() {
        let key = format!("bench-signature-key-{i}");
        let addr = receive::start(&key, trackers.clone(), anomalies.clone()).await?;
        idle_callback = format!("http://{addr}/hook");
        cluster
            .create_instance(
                &store.id.to_string(),
                &format!("http://{addr}/hook"),
                &[
                    ("ecwid.client.secret", &store.client_secret),
                    ("event.notification.signature.key", &key),
                    // The pipeline's capacity is measured, not an instance's limit: at the
                    // default of 16 requests in flight, four instances would cap max load at
                    // 64 callbacks at a time and put the rest back (README, Per-instance limits).
                    ("event.notification.max.in.flight", "1000"),
                ],
            )
            .await;
    }
    let pids = Pids::pipeline(&cluster).with(&[
        ("nats-server", setup.nats.pid()),
        ("bench", std::process::id()),
    ]);
    let ctx = Ctx {
        ingest: cluster.ingest.webhook.context("ingest webhook address")?,
        webhooks: setup.webhooks.clone(),
        trackers,
        pids,
        nats_monitor: setup.nats.monitor,
        connections: opts.connections,
        perf: opts.perf.clone(),
    };
    Ok(Pipeline {
        cluster,
        ctx,
        anomalies,
        stores: setup.stores.len(),
        idle_callback,
    })
}

/// Phase 0: 2 s at 1000/s, so connections, streams and caches are warm.
async fn warm_up(ctx: &Ctx) -> Phase {
    pipeline_phase(ctx, 0, Pace::Rate(1000.0), 2.0, &[], None).await
}

/// Phases 1 and 2, closed loop: the ingest alone (normalizer and deliverer paused, then
/// draining the backlog), then the whole pipeline.
async fn max_load(opts: &Opts, pipeline: &Pipeline) -> [Phase; 2] {
    let (ctx, cluster) = (&pipeline.ctx, &pipeline.cluster);
    let workers = [&cluster.normalizers[0], &cluster.deliverers[0]];
    let ingest_alone =
        pipeline_phase(ctx, 1, Pace::Max, opts.max_secs, &workers, Some("ingest")).await;
    let end_to_end = pipeline_phase(ctx, 2, Pace::Max, opts.max_secs, &[], Some("e2e")).await;
    [ingest_alone, end_to_end]
}

/// Phases 3 and on, open loop: the pipeline at each `--rates` pace.
async fn paced_runs(opts: &Opts, ctx: &Ctx) -> Vec<Phase> {
    let mut phases = Vec::new();
    for (i, r) in opts.rates.iter().enumerate() {
        phases.push(pipeline_phase(ctx, 3 + i, Pace::Rate(*r), opts.fixed_secs, &[], None).await);
    }
    phases
}

fn pace_name(pace: Pace) -> String {
    match pace {
        Pace::Max => "max".to_owned(),
        Pace::Rate(r) => format!("{r}/s"),
    }
}

/// The tables: the phases, CPU per event, the processes, and the figures against the floors.
fn report(
    opts: &Opts,
    floors: &Floors,
    phases: &[Phase],
    usage: &BTreeMap<String, Usage>,
    anomalies: &receive::Anomalies,
) -> String {
    report_phases(phases);
    report_cpu_per_event(floors, phases);
    report_nats_messages(phases);
    println!(
        "signature checks failed: {}; deliveries not from this run: {}",
        anomalies.bad_signatures.load(Ordering::Relaxed),
        anomalies.unparseable.load(Ordering::Relaxed)
    );
    report_processes(floors, usage);
    report_against_floors(opts, floors, phases, usage)
}

fn report_phases(phases: &[Phase]) {
    println!(
        "\n| phase | sent | 200 | non-200 / errors | ingest req/s | ingest p50 / p99 ms | delivered | e2e ev/s | e2e p50 / p90 / p99 / max ms | lost | dup | CPU s during the load: ingest / norm / deliv / nats / bench / other processes | wall s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for p in phases {
        let mut http = p.load.latencies_us.clone();
        http.sort_unstable();
        let lat = &p.summary.latencies_us;
        let e2e_lat = if p.name.starts_with("ingest alone") {
            "(workers paused)".to_owned()
        } else {
            format!(
                "{} / {} / {} / {}",
                ms(quantile_ms(lat, 0.5)),
                ms(quantile_ms(lat, 0.9)),
                ms(quantile_ms(lat, 0.99)),
                ms(quantile_ms(lat, 1.0))
            )
        };
        let c = |k: &str| p.cpu_load.get(k).copied().unwrap_or(0.0);
        println!(
            "| {}{} | {} | {} | {} / {} | {:.0} | {} / {} | {} | {:.0} | {} | {} | {} | {:.1} / {:.1} / {:.1} / {:.1} / {:.1} / {:.1} | {:.1} |",
            p.name,
            if p.drained { "" } else { " (NOT DRAINED)" },
            p.load.sent,
            p.load.ok,
            p.load.non_ok,
            p.load.errors,
            p.load.rps(),
            ms(quantile_ms(&http, 0.5)),
            ms(quantile_ms(&http, 0.99)),
            p.summary.delivered,
            p.e2e_eps,
            e2e_lat,
            p.summary.lost,
            p.summary.duplicates,
            c("ingest"),
            c("normalizer"),
            c("deliverer"),
            c("nats-server"),
            c("bench"),
            p.other_cpu,
            p.wall_secs,
        );
        if let Some(rate) = p.rate.filter(|_| p.load.max_lag > Duration::from_millis(5)) {
            println!(
                "  ({rate}/s: the generator ran up to {:?} behind its schedule)",
                p.load.max_lag
            );
        }
    }
}

/// NATS messages per delivered event, by connection: what each event costs nats-server in
/// messages, at max load against low rates (where each one pays its own wake-ups).
fn report_nats_messages(phases: &[Phase]) {
    let names: std::collections::BTreeSet<&String> = phases
        .iter()
        .flat_map(|p| p.nats_msgs.iter())
        .filter(|(_, c)| c.sent + c.received > 0)
        .map(|(name, _)| name)
        .collect();
    if names.is_empty() {
        println!("\n(nats-server's /connz did not answer: no message counts)");
        return;
    }
    println!("\nNATS messages per delivered event, sent to nats-server / received from it, by connection (drain included):\n");
    let header: Vec<&str> = names.iter().map(|n| n.as_str()).collect();
    println!("| phase | {} | all |", header.join(" | "));
    println!("|---|{}---|", "---|".repeat(names.len()));
    for p in phases {
        let per = |v: u64| v as f64 / p.summary.delivered.max(1) as f64;
        let mut all = MsgCount::default();
        let cells: Vec<String> = names
            .iter()
            .map(|n| {
                let c = p.nats_msgs.get(*n).copied().unwrap_or_default();
                all.sent += c.sent;
                all.received += c.received;
                format!("{:.2} / {:.2}", per(c.sent), per(c.received))
            })
            .collect();
        println!(
            "| {} | {} | {:.2} / {:.2} |",
            p.name,
            cells.join(" | "),
            per(all.sent),
            per(all.received)
        );
    }
}

fn report_cpu_per_event(floors: &Floors, phases: &[Phase]) {
    println!(
        "\nCPU per event while the load ran, microseconds (CPU seconds / requests answered 200):\n"
    );
    println!("| phase | ingest | normalizer | deliverer | nats-server | bench (load + receivers) | all | all, drain included, per delivery |");
    println!("|---|---|---|---|---|---|---|---|");
    for p in phases {
        let per =
            |k: &str| p.cpu_load.get(k).copied().unwrap_or(0.0) * 1e6 / p.load.ok.max(1) as f64;
        let all: f64 = p.cpu_load.values().sum::<f64>() * 1e6 / p.load.ok.max(1) as f64;
        let whole: f64 = p.cpu.values().sum::<f64>() * 1e6 / p.summary.delivered.max(1) as f64;
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {all:.0} | {whole:.0} |",
            p.name,
            per("ingest"),
            per("normalizer"),
            per("deliverer"),
            per("nats-server"),
            per("bench"),
        );
    }
    for FloorA {
        pace, result, cpu, ..
    } in &floors.a
    {
        let per = |k: &str| cpu.get(k).copied().unwrap_or(0.0) * 1e6 / result.ok.max(1) as f64;
        let all: f64 = cpu.values().sum::<f64>() * 1e6 / result.ok.max(1) as f64;
        println!(
            "| floor (a) {} | {:.0} (floor-a) | - | - | {:.0} | {:.0} | {all:.0} | - |",
            pace_name(*pace),
            per("floor-a"),
            per("nats-server"),
            per("bench"),
        );
    }
}

fn report_processes(floors: &Floors, usage: &BTreeMap<String, Usage>) {
    println!("\n| process | CPU s (whole run) | peak RSS MiB | RSS at end MiB |");
    println!("|---|---|---|---|");
    for (name, u) in usage {
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} |",
            u.cpu_secs,
            u.peak_rss_kib as f64 / MIB,
            u.rss_kib as f64 / MIB
        );
    }
    println!(
        "| floor-a (for comparison) | {:.1} | {:.1} | - |",
        floors.a_usage.cpu_secs,
        floors.a_usage.peak_rss_kib as f64 / MIB
    );
}

fn report_against_floors(
    opts: &Opts,
    floors: &Floors,
    phases: &[Phase],
    usage: &BTreeMap<String, Usage>,
) -> String {
    let (floor_a_rps, floor_b_rate, floor_c_rate) = (floors.a_rps, floors.b_rate, floors.c_rate);
    let ingest_phase = &phases[1];
    let e2e_phase = &phases[2];
    let ingest_rps = ingest_phase.load.rps();
    let ingest_vs_floor = ingest_rps / floor_a_rps;
    let e2e_eps = e2e_phase.e2e_eps;
    let at = |rate: f64| phases.iter().find(|p| p.rate == Some(rate));
    let floor_at = |rate: f64| {
        floors
            .a
            .iter()
            .find(|f| matches!(f.pace, Pace::Rate(r) if r == rate))
    };
    let p99_at_2000 = at(2000.0)
        .map(|p| quantile_ms(&p.summary.latencies_us, 0.99))
        .unwrap_or(f64::NAN);
    let lost: u64 = phases.iter().map(|p| p.summary.lost).sum();
    let duplicates: u64 = phases.iter().map(|p| p.summary.duplicates).sum();
    let max_rss_mib = ["ingest", "normalizer", "deliverer"]
        .iter()
        .filter_map(|n| usage.get(*n))
        .map(|u| u.peak_rss_kib as f64 / MIB)
        .fold(0.0, f64::max);

    println!("\n## Against the floors");
    println!("| figure | ours | floor | ratio | target |");
    println!("|---|---|---|---|---|");
    println!(
        "| ingest req/s (workers paused) | {ingest_rps:.0} | (a) {floor_a_rps:.0} | {ingest_vs_floor:.2} | {} |",
        target(ingest_vs_floor >= 0.85, "≥ 0.85".into())
    );
    let e2e_ratio = e2e_eps / floor_a_rps;
    println!(
        "| end-to-end ev/s (max load) | {e2e_eps:.0} | (a) {floor_a_rps:.0} | {e2e_ratio:.2} | {} |",
        target(e2e_ratio >= 0.3 && lost == 0, "≥ 0.3, zero loss".into())
    );
    println!(
        "| end-to-end ev/s (max load) | {e2e_eps:.0} | (b) {floor_b_rate:.0} | {:.2} | - |",
        e2e_eps / floor_b_rate
    );
    println!(
        "| end-to-end ev/s (max load) | {e2e_eps:.0} | (c) {floor_c_rate:.0} | {:.2} | - |",
        e2e_eps / floor_c_rate
    );
    println!(
        "| workers' drain ev/s (backlog after the paused phase) | {:.0} | (b) {floor_b_rate:.0} | {:.2} | - |",
        ingest_phase.e2e_eps,
        ingest_phase.e2e_eps / floor_b_rate
    );
    for r in &opts.rates {
        if let (Some(p), Some(f)) = (at(*r), floor_at(*r)) {
            let mut http = p.load.latencies_us.clone();
            http.sort_unstable();
            let ours = quantile_ms(&p.summary.latencies_us, 0.99);
            let floor = quantile_ms(&f.latencies_us, 0.99);
            println!(
                "| e2e p99 ms at {r}/s | {} | (a) request p99 {} | {:.1}x | {} |",
                ms(ours),
                ms(floor),
                ours / floor,
                if *r == 2000.0 {
                    target(ours < 50.0, "< 50 ms".into())
                } else {
                    "-".into()
                }
            );
            println!(
                "| ingest request p99 ms at {r}/s | {} | (a) {} at {:.0}/s | {:.1}x | - |",
                ms(quantile_ms(&http, 0.99)),
                ms(floor),
                f.result.rps(),
                quantile_ms(&http, 0.99) / floor
            );
        }
    }
    for n in ["ingest", "normalizer", "deliverer"] {
        let mib = usage
            .get(n)
            .map(|u| u.peak_rss_kib as f64 / MIB)
            .unwrap_or(0.0);
        println!(
            "| {n} peak RSS MiB | {mib:.1} | - | - | {} |",
            target(mib < 64.0, "< 64 MiB".into())
        );
    }
    // What one event costs the machine if the pipeline were nothing but its floors: an ingest
    // request with its publish (a), a consume + ack (b), the normalizer's publish, another
    // consume + ack, and the callback POST (c).
    let (publish_us, consume_us, post_us) = (floors.publish_us, floors.consume_us, floors.post_us);
    let floor_a_us = sum(&floors.a[0].cpu) * 1e6 / floors.a[0].result.ok.max(1) as f64;
    let composed_us = floor_a_us + 2.0 * consume_us + publish_us + post_us;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    let ceiling = cores * 1e6 / composed_us;
    let e2e_us = e2e_phase.cpu_load.values().sum::<f64>() * 1e6 / e2e_phase.load.ok.max(1) as f64;
    println!(
        "\nCPU per operation at the floors, all processes, µs: (a) request + publish {floor_a_us:.0}; \
         publish with 256 acks in flight {publish_us:.0}; (b) consume + ack {consume_us:.0}; \
         (c) POST + receive {post_us:.0}. One event through the floors alone: {composed_us:.0} µs, \
         so at most {ceiling:.0} events/s on {cores} cores. The pipeline at max load: {e2e_us:.0} µs \
         per event, {e2e_eps:.0} events/s = {:.2} of that ceiling.",
        e2e_eps / ceiling
    );
    println!(
        "\nLatency is measured from the moment the load generator sent the request to the moment the callback receiver got the delivery (both in the bench process, one monotonic clock); the envelope's NATS header with the ingest's receipt time is not visible to a receiver."
    );
    // CPU per event of nats-server and the three services (the bench's own load generator and
    // receivers left out), while the load ran.
    let pipeline_us = |p: &Phase| {
        ["ingest", "normalizer", "deliverer", "nats-server"]
            .iter()
            .map(|k| p.cpu_load.get(*k).copied().unwrap_or(0.0))
            .sum::<f64>()
            * 1e6
            / p.load.ok.max(1) as f64
    };
    let cpu_max = pipeline_us(e2e_phase);
    let cpu_500 = at(500.0).map(pipeline_us).unwrap_or(f64::NAN);
    println!(
        "\nCPU per event, nats-server and the three services: {cpu_max:.0} µs at max load, {cpu_500:.0} µs at 500/s = {:.1} x ({}).",
        cpu_500 / cpu_max,
        target(cpu_500 <= 2.0 * cpu_max, "≤ 2 x".into())
    );
    let nats_rss_mib = usage
        .get("nats-server")
        .map(|u| u.peak_rss_kib as f64 / MIB)
        .unwrap_or(f64::NAN);
    let opt = |v: f64| {
        if v.is_nan() {
            "-".to_owned()
        } else {
            format!("{v:.1}")
        }
    };
    format!(
        "ingest_rps={ingest_rps:.0} ingest_vs_floor={ingest_vs_floor:.2} e2e_eps={e2e_eps:.0} e2e_vs_floor={e2e_ratio:.2} e2e_p99_ms_at_2000={} cpu_us_per_event_max={cpu_max:.0} cpu_us_per_event_500={} lost={lost} duplicates={duplicates} max_rss_mib={max_rss_mib:.1} nats_rss_mib={nats_rss_mib:.1}",
        opt(p99_at_2000),
        if cpu_500.is_nan() { "-".to_owned() } else { format!("{cpu_500:.0}") },
    )
}

fn fmt_cpu(cpu: &BTreeMap<String, f64>) -> String {
    cpu.iter()
        .map(|(k, v)| format!("{k} {v:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Most fill rounds of a soak run.
const SOAK_ROUNDS: usize = 40;
/// Events sent per fill round (closed loop, as fast as answered).
const SOAK_ROUND_EVENTS: f64 = 100_000.0;

/// `make bench BENCH_ARGS=--soak`: is the pipeline as fast with gigabytes in its streams as
/// with none? Max load and 2,000/s on empty streams; then rounds of max load until the streams
/// hold `--soak-gb` (all streams of the account, from JetStream's account info); then max load
/// and 2,000/s again. Reports both, nats-server's RSS at each point, and a SOAK line.
async fn soak(opts: Opts) -> anyhow::Result<()> {
    let setup = set_up(&opts).await?;
    // Max load twice at each end (the figure is their mean: one 10 s phase moves with the
    // machine's noise by more than the 10 % the target allows), then 2,000/s.
    let mut names = vec![
        "warm-up".to_owned(),
        "start: end to end (max)".to_owned(),
        "start: end to end (max, again)".to_owned(),
        "start: fixed 2000/s".to_owned(),
    ];
    let mut caps = vec![
        2_000.0 + 16.0,
        MAX_RATE_CAP * opts.max_secs,
        MAX_RATE_CAP * opts.max_secs,
        2000.0 * opts.fixed_secs + 16.0,
    ];
    for i in 1..=SOAK_ROUNDS {
        names.push(format!("fill {i}"));
        caps.push(SOAK_ROUND_EVENTS);
    }
    names.push("end: end to end (max)".to_owned());
    caps.push(MAX_RATE_CAP * opts.max_secs);
    names.push("end: end to end (max, again)".to_owned());
    caps.push(MAX_RATE_CAP * opts.max_secs);
    names.push("end: fixed 2000/s".to_owned());
    caps.push(2000.0 * opts.fixed_secs + 16.0);
    let pipeline = start_pipeline_with(&opts, &setup, &names, &caps).await?;
    let ctx = &pipeline.ctx;
    let js = async_nats::jetstream::new(integration_tests::connect(&setup.nats_url).await);
    let stored_gb = || async {
        js.query_account()
            .await
            .map(|a| a.storage as f64 / 1e9)
            .unwrap_or(f64::NAN)
    };
    let nats_rss_mib =
        || procinfo::read(setup.nats.pid()).map_or(f64::NAN, |u| u.rss_kib as f64 / MIB);
    let mut phases = vec![warm_up(ctx).await];
    phases.push(pipeline_phase(ctx, 1, Pace::Max, opts.max_secs, &[], None).await);
    phases.push(pipeline_phase(ctx, 2, Pace::Max, opts.max_secs, &[], None).await);
    phases.push(pipeline_phase(ctx, 3, Pace::Rate(2000.0), opts.fixed_secs, &[], None).await);
    let start = (stored_gb().await, nats_rss_mib());
    println!(
        "start: streams {:.2} GB, nats-server RSS {:.0} MiB",
        start.0, start.1
    );
    let mut filled = start.0;
    let mut round = 0;
    while filled < opts.soak_gb && round < SOAK_ROUNDS {
        round += 1;
        let fill = pipeline_phase(ctx, 3 + round, Pace::Max, 600.0, &[], None).await;
        filled = stored_gb().await;
        println!(
            "fill {round}: {} events at {:.0}/s end to end; streams {filled:.2} GB, nats-server RSS {:.0} MiB",
            fill.summary.delivered,
            fill.e2e_eps,
            nats_rss_mib()
        );
        phases.push(fill);
    }
    let last = 4 + SOAK_ROUNDS;
    // Where the end's phases are in `phases`: max, max again, 2,000/s.
    let end_at = phases.len();
    phases.push(pipeline_phase(ctx, last, Pace::Max, opts.max_secs, &[], None).await);
    phases.push(pipeline_phase(ctx, last + 1, Pace::Max, opts.max_secs, &[], None).await);
    phases.push(
        pipeline_phase(
            ctx,
            last + 2,
            Pace::Rate(2000.0),
            opts.fixed_secs,
            &[],
            None,
        )
        .await,
    );
    let end = (stored_gb().await, nats_rss_mib());
    let peak_rss =
        procinfo::read(setup.nats.pid()).map_or(f64::NAN, |u| u.peak_rss_kib as f64 / MIB);
    report_phases(&phases);
    // The start's phases are 1, 2 (max) and 3 (2,000/s), after the warm-up.
    let (start_at, eps) = (1, |i: usize| phases[i].e2e_eps);
    let (max_start, max_end) = (
        (eps(start_at) + eps(start_at + 1)) / 2.0,
        (eps(end_at) + eps(end_at + 1)) / 2.0,
    );
    let p99 = |i: usize| quantile_ms(&phases[i].summary.latencies_us, 0.99);
    let (p99_start, p99_end) = (p99(start_at + 2), p99(end_at + 2));
    let lost: u64 = phases.iter().map(|p| p.summary.lost).sum();
    let duplicates: u64 = phases.iter().map(|p| p.summary.duplicates).sum();
    let ratio = max_end / max_start;
    println!("\n## Soak ({:.2} GB in the streams at the end)", end.0);
    println!("| figure | start | end | target |");
    println!("|---|---|---|---|");
    println!(
        "| streams, GB | {:.2} | {:.2} | ≥ {} |",
        start.0, end.0, opts.soak_gb
    );
    println!(
        "| end to end ev/s at max load (mean of two phases: {:.0} and {:.0} at the start, {:.0} and {:.0} at the end) | {max_start:.0} | {max_end:.0} ({ratio:.2} x) | {} |",
        eps(start_at),
        eps(start_at + 1),
        eps(end_at),
        eps(end_at + 1),
        target(ratio >= 0.9, "end ≥ 0.9 x start".into())
    );
    println!(
        "| e2e p99 ms at 2000/s | {} | {} | {} |",
        ms(p99_start),
        ms(p99_end),
        target(p99_start < 50.0 && p99_end < 50.0, "< 50 ms".into())
    );
    println!(
        "| nats-server RSS MiB | {:.0} | {:.0} (peak {peak_rss:.0}) | not checked: grows with what is kept (README, Limits) |",
        start.1, end.1
    );
    println!(
        "\nSOAK stream_gb={:.2} e2e_eps_start={max_start:.0} e2e_eps_end={max_end:.0} end_vs_start={ratio:.2} p99_ms_at_2000_start={p99_start:.1} p99_ms_at_2000_end={p99_end:.1} nats_rss_mib_start={:.0} nats_rss_mib_end={:.0} nats_peak_rss_mib={peak_rss:.0} lost={lost} duplicates={duplicates}",
        end.0, start.1, end.1
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_env_splits_on_commas_or_on_semicolons_when_a_value_holds_commas() {
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        assert_eq!(
            parse_service_env("TOKIO_WORKER_THREADS=1, EVENT_LOG=off").unwrap(),
            pairs(&[("TOKIO_WORKER_THREADS", "1"), ("EVENT_LOG", "off")])
        );
        assert_eq!(
            parse_service_env("STREAM_MAX_BYTES=ECWID_LOG=1GiB,ECWID_EVENTS=2GiB;").unwrap(),
            pairs(&[("STREAM_MAX_BYTES", "ECWID_LOG=1GiB,ECWID_EVENTS=2GiB")])
        );
        assert!(parse_service_env("EVENT_LOG").is_err());
        assert!(parse_service_env("=off").is_err());
    }
}
