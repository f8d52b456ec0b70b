//! `bench cpu` (`make bench-cpu`): the instructions each service executes per event, counted by
//! valgrind's callgrind on a fixed workload. Unlike CPU seconds under load, an instruction count
//! does not depend on what else the machine runs, so a change of a few percent shows.
//!
//! The workload: nats-server (not counted) and the three release binaries, each under
//! `valgrind --tool=callgrind`, four stores with one instance each and a signature-checking
//! receiver per instance; a warm-up of [`CpuOpts::warmup`] webhooks, then [`CpuOpts::events`]
//! signed ~1 KB webhooks of the bench's eight event types at a fixed, low rate (well below what
//! the services manage under valgrind, so every event is handled on its own rather than in
//! batches whose size depends on timing). The counters are zeroed after the warm-up and dumped
//! when the last event was delivered (`callgrind_control`); then the services stand idle for
//! [`CpuOpts::idle_secs`] and are dumped again. The idle window gives each service's cost per
//! second with no traffic (timers: pull expiries and heartbeats, consumer-info polling); that rate
//! times the load window's length is subtracted, so the figure is the cost of the events alone.
//!
//! `--filter EXPR` gives every instance that `event.notification.filter` (one that lets every
//! event through, such as `objectType != ''`): the normalizer's figure with it, less the figure
//! without it, is what evaluating a payload filter costs per event.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use integration_tests::procs::{binary, process_env, Service};

use crate::load::{self, Pace, Store, Webhooks};
use crate::receive;
use crate::track::{now_ns, Tracker};

/// `bench cpu` flags: `--events N` (2000), `--rate R` per second (100), `--warmup N` (200),
/// `--idle-secs S` (20), `--stores N` (4), `--service-env K=V,…`, `--filter EXPR`.
#[derive(Debug, Clone)]
pub(crate) struct CpuOpts {
    pub(crate) events: u64,
    pub(crate) rate: f64,
    pub(crate) warmup: u64,
    pub(crate) idle_secs: f64,
    pub(crate) stores: usize,
    /// `--service-env K=V,K2=V2`, as for `make bench` (e.g. `EVENT_LOG=off` prices the log).
    pub(crate) service_env: Vec<(String, String)>,
    /// `--filter EXPR`: every instance gets this `event.notification.filter`. It must let every
    /// event of the workload through (the run waits for all deliveries): the normalizer's
    /// instructions per event with and without it are the cost of evaluating it.
    pub(crate) filter: Option<String>,
}

impl CpuOpts {
    pub(crate) fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut opts = Self {
            events: 2000,
            rate: 100.0,
            warmup: 200,
            idle_secs: 20.0,
            stores: 4,
            service_env: Vec::new(),
            filter: None,
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let (name, value) = match flag.split_once('=') {
                Some((n, v)) => (n.to_owned(), v.to_owned()),
                None => (
                    flag.clone(),
                    it.next()
                        .with_context(|| format!("{flag} needs a value"))?
                        .clone(),
                ),
            };
            let num = |v: &str| {
                v.parse::<f64>()
                    .with_context(|| format!("{name}: not a number: {v}"))
            };
            match name.as_str() {
                "--events" => opts.events = num(&value)?.max(1.0) as u64,
                "--rate" => opts.rate = num(&value)?.max(1.0),
                "--warmup" => opts.warmup = num(&value)?.max(1.0) as u64,
                "--idle-secs" => opts.idle_secs = num(&value)?.max(1.0),
                "--stores" => opts.stores = num(&value)?.max(1.0) as usize,
                "--service-env" => opts.service_env = crate::parse_service_env(&value)?,
                "--filter" => {
                    model::filter::Filter::parse(&value)
                        .map_err(|e| anyhow::anyhow!("--filter {e}"))?;
                    opts.filter = Some(value);
                }
                other => bail!(
                    "unknown flag {other} (known: --events, --rate, --warmup, --idle-secs, --stores, --service-env, --filter)"
                ),
            }
        }
        Ok(opts)
    }
}

/// One service running under callgrind.
struct Grind {
    service: Service,
    child: tokio::process::Child,
    pid: u32,
    ops: SocketAddr,
    webhook: Option<SocketAddr>,
    /// `--callgrind-out-file`; a dump adds `.<n>`.
    out: PathBuf,
    log: PathBuf,
}

impl Grind {
    fn spawn(service: Service, env: &[(String, String)], dir: &Path) -> anyhow::Result<Self> {
        let ops: SocketAddr = ([127, 0, 0, 1], integration_tests::free_port()).into();
        let webhook: Option<SocketAddr> = (service == Service::Ingest)
            .then(|| ([127, 0, 0, 1], integration_tests::free_port()).into());
        let mut env = env.to_vec();
        match webhook {
            Some(w) => {
                env.push(("INGEST_LISTEN".into(), w.to_string()));
                env.push(("ADMIN_LISTEN".into(), ops.to_string()));
            }
            None => env.push(("OPS_LISTEN".into(), ops.to_string())),
        }
        let out = dir.join(format!("callgrind.{}", service.name()));
        let log = dir.join(format!("{}.log", service.name()));
        let log_file = std::fs::File::create(&log)?;
        let child = tokio::process::Command::new("valgrind")
            .arg("--tool=callgrind")
            .arg(format!("--callgrind-out-file={}", out.display()))
            // Totals only: no per-instruction or per-line tables to write at each dump.
            .args(["--dump-instr=no", "--dump-line=no", "--vgdb=yes"])
            .arg(binary(service.name()))
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .context(
                "start valgrind (Debian package valgrind; scripts/bench-cpu.sh installs it)",
            )?;
        let pid = child.id().context("valgrind's pid")?;
        Ok(Self {
            service,
            child,
            pid,
            ops,
            webhook,
            out,
            log,
        })
    }

    /// Waits for `/readyz`; valgrind starts a process some 50 times slower than it runs alone.
    async fn wait_ready(&mut self, http: &reqwest::Client) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(180);
        let url = format!("http://{}/readyz", self.ops);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!(
                    "{} exited with {status} under valgrind; see {}",
                    self.service.name(),
                    self.log.display()
                );
            }
            let ready = matches!(
                http.get(&url).timeout(Duration::from_secs(5)).send().await,
                Ok(r) if r.status() == 200
            );
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not ready within 180 s under valgrind; see {}",
                    self.service.name(),
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `callgrind_control ARG pid`: `-z` zeroes the counters, `-d` dumps them (and zeroes them).
    async fn control(&self, arg: &str) -> anyhow::Result<()> {
        let out = tokio::process::Command::new("callgrind_control")
            .arg(arg)
            .arg(self.pid.to_string())
            .stdin(Stdio::null())
            .output()
            .await
            .context("run callgrind_control")?;
        if !out.status.success() {
            bail!(
                "callgrind_control {arg} {} ({}) failed: {}",
                self.pid,
                self.service.name(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Dumps the counters and returns the instructions counted since the last zero or dump.
    async fn dump(&self) -> anyhow::Result<u64> {
        let before = self.dumps();
        self.control("-d").await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let now = self.dumps();
            if let Some(file) = now.iter().find(|f| !before.contains(f)) {
                // The file is written before callgrind_control returns; read until the total
                // is there in case it is not.
                if let Some(ir) = read_total(file) {
                    return Ok(ir);
                }
            }
            if Instant::now() > deadline {
                bail!("no callgrind dump of {} appeared", self.service.name());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn dumps(&self) -> Vec<PathBuf> {
        let prefix = format!(
            "{}.",
            self.out.file_name().unwrap_or_default().to_string_lossy()
        );
        std::fs::read_dir(self.out.parent().unwrap_or(Path::new(".")))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
            })
            .collect()
    }
}

/// The `summary:` (or `totals:`) line of a callgrind output file: instructions executed.
fn read_total(file: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Sends `count` webhooks of `phase` at `rate` per second and waits until all are delivered.
async fn send_and_drain(
    ingest: SocketAddr,
    webhooks: &Arc<Webhooks>,
    trackers: &Arc<Vec<Arc<Tracker>>>,
    phase: usize,
    count: u64,
    rate: f64,
) -> anyhow::Result<()> {
    let tracker = trackers[phase].clone();
    let result = load::run(
        load::Target {
            addr: ingest,
            path: "/events/ecwid",
            webhooks: webhooks.clone(),
            phase,
            tracker: tracker.clone(),
        },
        // Open loop at a low rate: a handful of connections is plenty.
        8,
        Pace::Rate(rate),
        Duration::from_secs_f64(count as f64 / rate + 30.0),
    )
    .await;
    if result.ok != count {
        bail!(
            "{}: {} of {count} webhooks answered 200 ({} other, {} errors)",
            tracker.name,
            result.ok,
            result.non_ok,
            result.errors
        );
    }
    if !crate::drain(&tracker).await {
        bail!(
            "{}: {} of {count} events were not delivered",
            tracker.name,
            tracker.missing()
        );
    }
    let summary = tracker.summary();
    if summary.duplicates > 0 {
        bail!(
            "{}: {} duplicate deliveries (a redelivery would count twice)",
            tracker.name,
            summary.duplicates
        );
    }
    Ok(())
}

pub(crate) async fn run(opts: CpuOpts) -> anyhow::Result<()> {
    now_ns();
    println!("# ecwid-events bench cpu (callgrind)");
    println!("machine: {}", crate::machine());
    println!(
        "valgrind: {}",
        crate::command_line("valgrind", &["--version"])
    );
    println!("options: {opts:?}");

    let dir = integration_tests::procs::binary_dir().join("bench-cpu");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let nats = crate::Nats::start().await?;
    let nats_url = nats.url();

    let stores: Vec<Store> = (0..opts.stores)
        .map(|i| Store {
            id: 7_100_001 + i as u64,
            client_secret: format!("bench-cpu-client-secret-{i}"),
        })
        .collect();
    let webhooks = Arc::new(Webhooks::new(stores.clone()));
    let trackers: Arc<Vec<Arc<Tracker>>> = Arc::new(vec![
        Arc::new(Tracker::new("warm-up", opts.warmup as usize)),
        Arc::new(Tracker::new("measured", opts.events as usize)),
    ]);
    let anomalies = Arc::new(receive::Anomalies::default());

    // Production settings, as `make bench` runs them, with less logging.
    let settings = crate::service_settings(&[("RUST_LOG", "warn")], &opts.service_env, &[]);
    let env = process_env(&nats_url, &settings);
    let http = reqwest::Client::new();
    let started = Instant::now();
    // The ingest first: its start-up creates the topology the workers then find.
    let mut ingest = Grind::spawn(Service::Ingest, &env, &dir)?;
    ingest.wait_ready(&http).await?;
    let mut normalizer = Grind::spawn(Service::Normalizer, &env, &dir)?;
    let mut deliverer = Grind::spawn(Service::Deliverer, &env, &dir)?;
    normalizer.wait_ready(&http).await?;
    deliverer.wait_ready(&http).await?;
    println!(
        "started under valgrind in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let ops = [ingest.ops, normalizer.ops, deliverer.ops];
    for (i, store) in stores.iter().enumerate() {
        let key = format!("bench-cpu-signature-key-{i}");
        let addr = receive::start(&key, trackers.clone(), anomalies.clone()).await?;
        integration_tests::create_instance(
            &http,
            ingest.ops,
            &nats_url,
            &ops,
            &store.id.to_string(),
            &format!("http://{addr}/hook"),
            &[
                ("ecwid.client.secret", store.client_secret.as_str()),
                ("event.notification.signature.key", key.as_str()),
            ]
            .into_iter()
            .chain(
                opts.filter
                    .as_deref()
                    .map(|f| ("event.notification.filter", f)),
            )
            .collect::<Vec<_>>(),
        )
        .await;
    }
    let ingest_addr = ingest.webhook.context("the ingest's webhook address")?;
    let grinds = [&ingest, &normalizer, &deliverer];

    // Warm-up: connections, first-use allocations, lazily built state.
    send_and_drain(ingest_addr, &webhooks, &trackers, 0, opts.warmup, opts.rate).await?;

    // The measured window: zero, send, wait for the last delivery, dump. Each service's window
    // runs from its own zeroing to its own dump.
    let mut zeroed = Vec::new();
    for g in grinds {
        g.control("-z").await?;
        zeroed.push(Instant::now());
    }
    send_and_drain(ingest_addr, &webhooks, &trackers, 1, opts.events, opts.rate).await?;
    let mut load_ir = Vec::new();
    let mut load_secs = Vec::new();
    let mut dumped = Vec::new();
    for (g, from) in grinds.iter().zip(&zeroed) {
        load_ir.push(g.dump().await?);
        dumped.push(Instant::now());
        load_secs.push(from.elapsed().as_secs_f64());
    }

    // The idle window, right after: no traffic for idle_secs, from each service's dump to its
    // next one.
    tokio::time::sleep(Duration::from_secs_f64(opts.idle_secs)).await;
    let mut idle_ir = Vec::new();
    let mut idle_secs = Vec::new();
    for (g, from) in grinds.iter().zip(&dumped) {
        idle_ir.push(g.dump().await?);
        idle_secs.push(from.elapsed().as_secs_f64());
    }

    if anomalies
        .bad_signatures
        .load(std::sync::atomic::Ordering::Relaxed)
        > 0
    {
        bail!("deliveries with a bad signature: the receivers' check failed");
    }

    println!(
        "\nmeasured window: {} events at {}/s in {:.1} s; idle window {:.1} s\n",
        opts.events, opts.rate, load_secs[0], idle_secs[0]
    );
    println!("| service | Ir in the window | idle Ir/s | idle share of the window | Ir per event, raw | Ir per event, idle subtracted |");
    println!("|---|---|---|---|---|---|");
    let mut line = Vec::new();
    for (i, g) in grinds.iter().enumerate() {
        let idle_rate = idle_ir[i] as f64 / idle_secs[i];
        let idle_in_window = idle_rate * load_secs[i];
        let raw = load_ir[i] as f64 / opts.events as f64;
        let net = (load_ir[i] as f64 - idle_in_window) / opts.events as f64;
        println!(
            "| {} | {} | {idle_rate:.0} | {:.1} % | {raw:.0} | {net:.0} |",
            g.service.name(),
            load_ir[i],
            100.0 * idle_in_window / load_ir[i].max(1) as f64,
        );
        line.push(format!("{}_ir_per_event={net:.0}", g.service.name()));
        line.push(format!(
            "{}_idle_ir_per_sec={idle_rate:.0}",
            g.service.name()
        ));
    }
    println!(
        "\ncallgrind output and the services' logs: {}",
        dir.display()
    );
    // The one line to compare: per-event counts first, the idle rates after them.
    let (per_event, idle): (Vec<_>, Vec<_>) =
        line.into_iter().partition(|s| s.contains("_per_event="));
    println!("\nCPU {} {}", per_event.join(" "), idle.join(" "));

    for g in [ingest, normalizer, deliverer] {
        let mut child = g.child;
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
    drop(nats);
    Ok(())
}
