//! The services as real, separate processes, for the tests that crash or stop them (a SIGKILL
//! cannot be simulated in-process): the `ingest`, `normalizer` and `deliverer` binaries built next
//! to the running executable, started with an environment, stopped with SIGKILL or SIGTERM, paused,
//! and started again on the same ports. Also a paced webhook sender that records what the ingest
//! answered, and the delivery tallies the fault and SIGTERM tests assert on. Every wait has a
//! deadline.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};
use serde_json::Value;
use tokio::process::{Child, Command};

use crate::{free_port, order_created, Receiver};

/// How long a process gets to answer `/readyz` after it was started.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// One of the three service binaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    Ingest,
    Normalizer,
    Deliverer,
    Poller,
}

impl Service {
    pub fn name(self) -> &'static str {
        match self {
            Service::Ingest => "ingest",
            Service::Normalizer => "normalizer",
            Service::Deliverer => "deliverer",
            Service::Poller => "poller",
        }
    }
}

/// The folder holding the workspace's binaries of the profile the running executable was built
/// with: a test runs from `target/<profile>/deps/`, a binary (the bench) from `target/<profile>/`.
pub fn binary_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the path of the running executable");
    let mut dir = exe
        .parent()
        .expect("the executable lives in a folder")
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir
}

/// The path of the workspace binary `name` of the running profile. Panics, saying how to build
/// it, when it is missing: `cargo test -p integration-tests` builds the tests, not the services'
/// binaries.
pub fn binary(name: &str) -> PathBuf {
    let dir = binary_dir();
    let path = dir.join(name);
    if !path.is_file() {
        let profile = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let flag = if profile == "release" {
            " --release"
        } else {
            ""
        };
        panic!(
            "{} is missing: these tests run the service binaries as real processes. \
             Build them first with `cargo build{flag} --workspace --bins` \
             (`make test` builds them first).",
            path.display()
        );
    }
    path
}

/// The environment the tests run a service process with: the same settings as the in-process
/// harness ([`crate::test_vars`]), then `overrides`. An empty override value means "unset" (the
/// service's own default). The process sees nothing else of the test's environment but
/// `RUST_LOG` (default `info`) and `RUST_BACKTRACE`; `NO_COLOR` keeps the logs plain.
pub fn process_env(nats_url: &str, overrides: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut map: BTreeMap<String, String> = crate::TEST_SETTINGS
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    map.insert("NATS_URL".into(), nats_url.into());
    map.insert(
        "RUST_LOG".into(),
        std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
    );
    // Plain text in the log files.
    map.insert("NO_COLOR".into(), "1".into());
    if let Ok(v) = std::env::var("RUST_BACKTRACE") {
        map.insert("RUST_BACKTRACE".into(), v);
    }
    for (k, v) in overrides {
        map.insert((*k).to_owned(), (*v).to_owned());
    }
    crate::add_event_log_database(&mut map, nats_url);
    map.into_iter().filter(|(_, v)| !v.is_empty()).collect()
}

/// Sends `signal` to process `pid`.
pub fn send_signal(pid: u32, signal: Signal) -> std::io::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| std::io::Error::other(format!("not a process id: {pid}")))?;
    kill_process(pid, signal).map_err(std::io::Error::from)
}

/// One service running as its own process, its output appended to a log file that outlives
/// restarts. Dropping it kills the process.
#[derive(Debug)]
pub struct ServiceProc {
    pub service: Service,
    /// `INGEST_LISTEN` (the ingest only).
    pub webhook: Option<SocketAddr>,
    /// Where `/metrics` and `/readyz` answer: the ingest's `ADMIN_LISTEN`, a worker's `OPS_LISTEN`.
    pub ops: SocketAddr,
    /// How many times it was started.
    pub starts: u32,
    /// Whether it was ready once: from then on it keeps its ports, which tests hold on to.
    ready_once: bool,
    env: Vec<(String, String)>,
    child: Option<Child>,
    log: PathBuf,
    _log_dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl ServiceProc {
    /// A process of `service` on fresh ports with `env` (see [`process_env`]); not started yet.
    pub fn new(service: Service, env: Vec<(String, String)>) -> Self {
        let log_dir = tempfile::Builder::new()
            .prefix(&format!("{}-", service.name()))
            .tempdir()
            .expect("a temp dir for the process log");
        let mut proc = Self {
            service,
            webhook: None,
            ops: ([127, 0, 0, 1], 0).into(),
            starts: 0,
            ready_once: false,
            env,
            child: None,
            log: log_dir.path().join("output.log"),
            _log_dir: log_dir,
            http: reqwest::Client::new(),
        };
        proc.take_fresh_ports();
        proc
    }

    /// Picks free ports for its listeners and sets them in its environment.
    fn take_fresh_ports(&mut self) {
        self.ops = ([127, 0, 0, 1], free_port()).into();
        self.webhook =
            (self.service == Service::Ingest).then(|| ([127, 0, 0, 1], free_port()).into());
        let mut listen = vec![];
        match self.webhook {
            Some(webhook) => {
                listen.push(("INGEST_LISTEN", webhook.to_string()));
                listen.push(("ADMIN_LISTEN", self.ops.to_string()));
            }
            None => listen.push(("OPS_LISTEN", self.ops.to_string())),
        }
        self.env
            .retain(|(k, _)| !listen.iter().any(|(l, _)| l == k));
        self.env
            .extend(listen.into_iter().map(|(k, v)| (k.to_owned(), v)));
    }

    /// What the process wrote since it was last started.
    fn this_start_output(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let marker = format!("===== start #{} =====", self.starts);
        match text.rfind(&marker) {
            Some(at) => text[at..].to_owned(),
            None => text,
        }
    }

    /// Creates and starts it, and waits until it is ready.
    pub async fn start(service: Service, env: Vec<(String, String)>) -> Self {
        let mut proc = Self::new(service, env);
        proc.spawn();
        proc.wait_ready().await;
        proc
    }

    /// Starts the process (on the same ports as before) without waiting for it to be ready.
    pub fn spawn(&mut self) {
        assert!(
            !self.is_running(),
            "{} is still running; stop it before starting it again",
            self.service.name()
        );
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the process log");
        let _ = writeln!(log, "===== start #{} =====", self.starts);
        let stderr = log.try_clone().expect("clone the log handle");
        let child = Command::new(binary(self.service.name()))
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.service.name()));
        self.child = Some(child);
    }

    /// Waits until `/readyz` answers 200; panics with the log when the process exits first or
    /// [`READY_TIMEOUT`] passes. Before it was ever ready, a port [`free_port`] found free may
    /// have been taken by another process before the service bound it: then it starts again on
    /// fresh ports (a few times) instead of failing the test.
    pub async fn wait_ready(&mut self) {
        const PORT_RETRIES: u32 = 5;
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut retries = 0;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    let port_taken = self.this_start_output().contains("Address already in use");
                    if port_taken && !self.ready_once && retries < PORT_RETRIES {
                        retries += 1;
                        self.take_fresh_ports();
                        self.spawn();
                        continue;
                    }
                    panic!(
                        "{} exited with {status} before it was ready:\n{}",
                        self.service.name(),
                        self.log_tail(40)
                    );
                }
            }
            let url = format!("http://{}/readyz", self.ops);
            let ready = matches!(
                self.http.get(&url).timeout(Duration::from_secs(2)).send().await,
                Ok(r) if r.status() == 200
            );
            if ready {
                self.ready_once = true;
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} not ready within {READY_TIMEOUT:?}:\n{}",
                    self.service.name(),
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Whether the process was started and has not been seen exiting.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn signal(&self, signal: Signal) {
        let pid = self
            .pid()
            .unwrap_or_else(|| panic!("{} is not running", self.service.name()));
        send_signal(pid, signal)
            .unwrap_or_else(|e| panic!("cannot signal {}: {e}", self.service.name()));
    }

    /// SIGKILL, and waits for the process to be gone: no shutdown, no goodbye to NATS.
    pub async fn kill(&mut self) {
        if self.child.is_some() {
            self.signal(Signal::KILL);
            let status = self.wait_exit(Duration::from_secs(10)).await;
            assert!(
                status.is_some(),
                "{} did not die of SIGKILL",
                self.service.name()
            );
        }
    }

    /// SIGTERM: asks for a graceful shutdown; see [`Self::wait_exit`].
    pub fn terminate(&self) {
        self.signal(Signal::TERM);
    }

    /// SIGSTOP: the process freezes, its connections stay open.
    pub fn pause(&self) {
        self.signal(Signal::STOP);
    }

    /// SIGCONT after [`Self::pause`].
    pub fn resume(&self) {
        self.signal(Signal::CONT);
    }

    /// Waits up to `timeout` for the process to exit; `None` when it is still running.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(Ok(status)) => {
                self.child = None;
                Some(status)
            }
            Ok(Err(e)) => panic!("waiting for {}: {e}", self.service.name()),
            Err(_) => None,
        }
    }

    /// Kills it when running, starts it again on the same ports and waits until it is ready.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn();
        self.wait_ready().await;
    }

    /// Its `/metrics` text (empty when it does not answer).
    pub async fn metrics(&self) -> String {
        match self
            .http
            .get(format!("http://{}/metrics", self.ops))
            .timeout(Duration::from_secs(5))
            .send()
            .await
        {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// The last `lines` lines the process (and its earlier runs) wrote.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let from = all.len().saturating_sub(lines);
        format!(
            "----- {} log (last {} lines) -----\n{}",
            self.service.name(),
            all.len() - from,
            all[from..].join("\n")
        )
    }
}

/// The sum of the samples of `name` carrying every label pair in `labels`, in Prometheus text.
pub fn sample_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (sample, value) = l.rsplit_once(' ')?;
            let (sample_name, rest) = match sample.split_once('{') {
                Some((n, rest)) => (n, rest),
                None => (sample, ""),
            };
            if sample_name != name {
                return None;
            }
            labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// The pipeline as separate processes: one ingest, `replicas` normalizers and deliverers.
#[derive(Debug)]
pub struct Cluster {
    pub nats_url: String,
    pub ingest: ServiceProc,
    pub normalizers: Vec<ServiceProc>,
    pub deliverers: Vec<ServiceProc>,
    pub http: reqwest::Client,
}

impl Cluster {
    /// Starts every process with [`process_env`]`(nats_url, overrides)` and waits until all are
    /// ready.
    pub async fn start(nats_url: &str, overrides: &[(&str, &str)], replicas: usize) -> Self {
        crate::init_logs();
        let env = process_env(nats_url, overrides);
        let mut cluster = Self {
            nats_url: nats_url.to_owned(),
            ingest: ServiceProc::new(Service::Ingest, env.clone()),
            normalizers: (0..replicas)
                .map(|_| ServiceProc::new(Service::Normalizer, env.clone()))
                .collect(),
            deliverers: (0..replicas)
                .map(|_| ServiceProc::new(Service::Deliverer, env.clone()))
                .collect(),
            http: reqwest::Client::new(),
        };
        // The ingest first: its start-up creates the topology the others then find.
        cluster.ingest.spawn();
        cluster.ingest.wait_ready().await;
        for p in cluster.workers_mut() {
            p.spawn();
        }
        for p in cluster.workers_mut() {
            p.wait_ready().await;
        }
        cluster
    }

    fn workers_mut(&mut self) -> impl Iterator<Item = &mut ServiceProc> {
        self.normalizers
            .iter_mut()
            .chain(self.deliverers.iter_mut())
    }

    /// Every process, the ingest first.
    pub fn all(&self) -> impl Iterator<Item = &ServiceProc> {
        std::iter::once(&self.ingest)
            .chain(self.normalizers.iter())
            .chain(self.deliverers.iter())
    }

    pub fn webhook_url(&self) -> String {
        let addr = self.ingest.webhook.expect("the ingest has a webhook port");
        format!("http://{addr}/events/ecwid")
    }

    /// The end of every process's log, for a failure message.
    pub fn logs(&self) -> String {
        self.all()
            .map(|p| p.log_tail(15))
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub async fn admin_request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        crate::admin_request(&self.http, self.ingest.ops, method, path, body).await
    }

    /// Creates an instance of `store_id` calling back `callback` with `extra` configuration, and
    /// waits until every running process has seen it.
    pub async fn create_instance(
        &self,
        store_id: &str,
        callback: &str,
        extra: &[(&str, &str)],
    ) -> String {
        let ops = self.running_ops();
        crate::create_instance(
            &self.http,
            self.ingest.ops,
            &self.nats_url,
            &ops,
            store_id,
            callback,
            extra,
        )
        .await
    }

    fn running_ops(&self) -> Vec<SocketAddr> {
        self.all()
            .filter(|p| p.is_running())
            .map(|p| p.ops)
            .collect()
    }

    /// Waits until every running process applied the instances bucket's newest revision.
    pub async fn wait_instances_seen(&self) {
        crate::wait_instances_seen(&self.nats_url, &self.http, &self.running_ops()).await;
    }
}

/// A webhook the tests send: its Ecwid event id and JSON body.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub event_id: String,
    pub body: Value,
}

/// `n` `order.created` webhooks of `store_id`, event ids `<prefix>-0000` …
pub fn order_webhooks(store_id: u64, prefix: &str, n: usize) -> Vec<Webhook> {
    (0..n)
        .map(|i| {
            let event_id = format!("{prefix}-{i:04}");
            Webhook {
                body: order_created(store_id, &event_id),
                event_id,
            }
        })
        .collect()
}

/// What the ingest answered: a status code, or the client error when there was no answer.
fn outcome_label(result: &Result<u16, reqwest::Error>) -> String {
    match result {
        Ok(status) => status.to_string(),
        Err(e) if e.is_connect() => "connect error".into(),
        Err(e) if e.is_timeout() => "timeout".into(),
        Err(_) => "request error".into(),
    }
}

/// What a batch of webhooks got from the ingest.
#[derive(Debug, Clone, Default)]
pub struct SendReport {
    /// Answered 200: JetStream has them; each must be delivered.
    pub acked: Vec<String>,
    /// Anything else (503, no answer): a real Ecwid would send these again.
    pub refused: Vec<Webhook>,
    /// How many got each outcome (`"200"`, `"503"`, `"connect error"` …).
    pub outcomes: BTreeMap<String, usize>,
}

impl SendReport {
    fn record(&mut self, webhook: Webhook, result: &Result<u16, reqwest::Error>) {
        *self.outcomes.entry(outcome_label(result)).or_default() += 1;
        match result {
            Ok(200) => self.acked.push(webhook.event_id),
            _ => self.refused.push(webhook),
        }
    }

    fn merge(&mut self, other: SendReport) {
        self.acked.extend(other.acked);
        self.refused.extend(other.refused);
        for (k, n) in other.outcomes {
            *self.outcomes.entry(k).or_default() += n;
        }
    }

    /// How many got `outcome`.
    pub fn count(&self, outcome: &str) -> usize {
        self.outcomes.get(outcome).copied().unwrap_or(0)
    }
}

/// POSTs one webhook; the status, or the client error.
pub async fn post_webhook(
    http: &reqwest::Client,
    url: &str,
    webhook: &Webhook,
) -> Result<u16, reqwest::Error> {
    let resp = http
        .post(url)
        .json(&webhook.body)
        .timeout(Duration::from_secs(10))
        .send()
        .await?;
    let status = resp.status().as_u16();
    let _ = resp.bytes().await;
    Ok(status)
}

/// Sends every webhook once, `concurrency` at a time, and reports what the ingest answered.
pub async fn send_all(
    http: &reqwest::Client,
    url: &str,
    webhooks: Vec<Webhook>,
    concurrency: usize,
) -> SendReport {
    Load::start(http.clone(), url, webhooks, concurrency, None)
        .finish(Duration::from_secs(120))
        .await
}

/// Webhooks being sent in the background, each once, optionally paced at a fixed rate, while a
/// test breaks something.
#[derive(Debug)]
pub struct Load {
    sent: Arc<AtomicUsize>,
    acked: Arc<AtomicUsize>,
    total: usize,
    tasks: Vec<tokio::task::JoinHandle<SendReport>>,
}

impl Load {
    /// Starts `concurrency` senders over `webhooks`; with `per_second`, webhook `i` leaves no
    /// earlier than `i / per_second` after the start.
    pub fn start(
        http: reqwest::Client,
        url: &str,
        webhooks: Vec<Webhook>,
        concurrency: usize,
        per_second: Option<f64>,
    ) -> Self {
        let total = webhooks.len();
        let queue = Arc::new(Mutex::new(
            webhooks.into_iter().enumerate().collect::<VecDeque<_>>(),
        ));
        let sent = Arc::new(AtomicUsize::new(0));
        let acked = Arc::new(AtomicUsize::new(0));
        let started = tokio::time::Instant::now();
        let tasks = (0..concurrency.max(1))
            .map(|_| {
                let (queue, sent, acked) = (queue.clone(), sent.clone(), acked.clone());
                let (http, url) = (http.clone(), url.to_owned());
                tokio::spawn(async move {
                    let mut report = SendReport::default();
                    loop {
                        let next = queue.lock().expect("lock").pop_front();
                        let Some((i, webhook)) = next else {
                            return report;
                        };
                        if let Some(rate) = per_second {
                            let at = started + Duration::from_secs_f64(i as f64 / rate);
                            tokio::time::sleep_until(at).await;
                        }
                        let result = post_webhook(&http, &url, &webhook).await;
                        if matches!(result, Ok(200)) {
                            acked.fetch_add(1, Ordering::SeqCst);
                        }
                        sent.fetch_add(1, Ordering::SeqCst);
                        report.record(webhook, &result);
                    }
                })
            })
            .collect();
        Self {
            sent,
            acked,
            total,
            tasks,
        }
    }

    /// Webhooks answered 200 so far.
    pub fn acked(&self) -> usize {
        self.acked.load(Ordering::SeqCst)
    }

    /// Webhooks answered (any way) so far.
    pub fn sent(&self) -> usize {
        self.sent.load(Ordering::SeqCst)
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Waits for every webhook to be sent (at most `timeout`) and reports.
    pub async fn finish(self, timeout: Duration) -> SendReport {
        let mut report = SendReport::default();
        let all = futures::future::join_all(self.tasks);
        let results = tokio::time::timeout(timeout, all)
            .await
            .unwrap_or_else(|_| panic!("sending the webhooks took over {timeout:?}"));
        for r in results {
            report.merge(r.expect("a sender task"));
        }
        report
    }
}

/// Sends `webhooks` again, as Ecwid retries, until the ingest answers 200 to each; between rounds
/// it backs off 100 ms. Returns what the resends got. Panics after `timeout`.
pub async fn resend_until_accepted(
    http: &reqwest::Client,
    url: &str,
    webhooks: Vec<Webhook>,
    timeout: Duration,
) -> SendReport {
    let deadline = Instant::now() + timeout;
    let mut pending = webhooks;
    let mut all = SendReport::default();
    loop {
        let mut round = SendReport::default();
        for webhook in pending {
            let result = post_webhook(http, url, &webhook).await;
            round.record(webhook, &result);
        }
        pending = std::mem::take(&mut round.refused);
        all.merge(round);
        if pending.is_empty() {
            return all;
        }
        if Instant::now() > deadline {
            panic!(
                "{} webhooks still refused after {timeout:?} of resending; outcomes so far: {:?}",
                pending.len(),
                all.outcomes
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Deliveries per Ecwid event id (the envelope's `message.raw.eventId`), over `receivers`.
pub fn deliveries(receivers: &[&Receiver]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for receiver in receivers {
        for r in receiver.received() {
            let Ok(body) = serde_json::from_slice::<Value>(&r.body) else {
                continue;
            };
            if let Some(id) = body["message"]["raw"]["eventId"].as_str() {
                *counts.entry(id.to_owned()).or_insert(0) += 1;
            }
        }
    }
    counts
}

/// How the deliveries of a set of expected events came out.
#[derive(Debug, Clone)]
pub struct Tally {
    pub expected: usize,
    /// Expected events delivered at least once.
    pub delivered: usize,
    /// Requests the receivers got for expected events.
    pub requests: usize,
    /// Requests beyond the first for each event (at-least-once allows them).
    pub duplicates: usize,
    /// Expected events not delivered (a sample of at most 10 ids, and how many).
    pub missing: Vec<String>,
    pub missing_count: usize,
    /// Requests for events nobody sent.
    pub unexpected: usize,
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} events delivered, {} requests, {} duplicates, {} unexpected; missing {} (e.g. {:?})",
            self.delivered,
            self.expected,
            self.requests,
            self.duplicates,
            self.unexpected,
            self.missing_count,
            self.missing
        )
    }
}

/// Tallies the deliveries of `expected` at `receivers`.
pub fn tally(receivers: &[&Receiver], expected: &[String]) -> Tally {
    let counts = deliveries(receivers);
    let wanted: HashSet<&str> = expected.iter().map(String::as_str).collect();
    let missing: Vec<String> = expected
        .iter()
        .filter(|id| !counts.contains_key(*id))
        .cloned()
        .collect();
    let requests: usize = counts
        .iter()
        .filter(|(id, _)| wanted.contains(id.as_str()))
        .map(|(_, n)| *n)
        .sum();
    let delivered = wanted.len() - missing.len();
    Tally {
        expected: wanted.len(),
        delivered,
        requests,
        duplicates: requests - delivered,
        missing_count: missing.len(),
        missing: missing.into_iter().take(10).collect(),
        unexpected: counts
            .iter()
            .filter(|(id, _)| !wanted.contains(id.as_str()))
            .map(|(_, n)| *n)
            .sum(),
    }
}

/// Waits until every one of `expected` was delivered at least once; panics after `timeout` with
/// the tally and `context()` (say, the processes' logs).
pub async fn wait_delivered(
    receivers: &[&Receiver],
    expected: &[String],
    timeout: Duration,
    context: impl Fn() -> String,
) -> Tally {
    let deadline = Instant::now() + timeout;
    loop {
        let t = tally(receivers, expected);
        if t.missing_count == 0 {
            return t;
        }
        if Instant::now() > deadline {
            panic!(
                "not every event was delivered within {timeout:?}: {t}\n{}",
                context()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
