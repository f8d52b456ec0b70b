//! Test harness: a real `nats-server` on a free port with a temp store dir (stoppable and
//! restartable), a nats-server cluster on loopback ([`NatsCluster`]), real HTTP receivers on
//! `127.0.0.1:0`, the three services in-process, and the helpers to drive them. Every wait has a
//! deadline.

pub mod fake_ecwid;
pub mod pg;
pub mod procs;
pub mod receivers;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use serde_json::{json, Value};
use shared::config::Vars;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// Logs for tests: `RUST_LOG=debug cargo test` shows the services' logs.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Waits (at most 10 s) until nats-server `child`, started with `--ports_file_dir ports_dir`,
/// has written its ports file, and returns the port it lists under each of `kinds` (`nats`,
/// `monitoring`): how a server started with `-p -1` / `-m -1` says which ports it took. `Err`
/// when it exits first or does not list them in time.
pub async fn listed_ports(
    child: &mut Child,
    ports_dir: &std::path::Path,
    kinds: &[&str],
) -> Result<Vec<u16>, String> {
    let ports_file = ports_dir.join(format!("nats-server_{}.ports", child.id()));
    let listed = || -> Option<Vec<u16>> {
        let ports: Value = serde_json::from_slice(&std::fs::read(&ports_file).ok()?).ok()?;
        kinds
            .iter()
            .map(|kind| ports[*kind][0].as_str()?.rsplit(':').next()?.parse().ok())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("nats-server exited at start ({status})"));
        }
        if let Some(ports) = listed() {
            return Ok(ports);
        }
        if Instant::now() > deadline {
            return Err("nats-server did not list its ports within 10 s".to_owned());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `nats-server` binary every test, `make run` and the bench start: `NATS_SERVER_BIN` when
/// set, else the release pinned in `scripts/nats-versions.env`, which
/// `scripts/ensure-nats-server.sh` installs into `.tools/` on first use (so a bare `cargo test`
/// runs on the same server as `make test`). `make test` runs the NATS-facing tests a second time
/// with `NATS_SERVER_BIN` set to the oldest supported release.
pub fn nats_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NATS_SERVER_BIN") {
        return p.into();
    }
    static PINNED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PINNED
        .get_or_init(|| {
            let script =
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/ensure-nats-server.sh");
            let out = Command::new(&script)
                .stdin(Stdio::null())
                .stderr(Stdio::inherit())
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
            let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            assert!(
                out.status.success() && !path.is_empty(),
                "{} found no nats-server ({}); set NATS_SERVER_BIN to one",
                script.display(),
                out.status
            );
            PathBuf::from(path)
        })
        .clone()
}

/// A real nats-server with JetStream, for one test.
#[derive(Debug)]
pub struct NatsServer {
    pub port: u16,
    pub store: tempfile::TempDir,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts on a port the server picks itself (`-p -1`, read back from its ports file), so two
    /// tests can never race for one port.
    pub async fn start() -> Self {
        let mut server = Self {
            port: 0,
            store: tempfile::tempdir().expect("temp dir"),
            child: None,
        };
        server.spawn().await;
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let ports_dir = self.store.path().join("ports");
        std::fs::create_dir_all(&ports_dir).expect("ports dir");
        let port = if self.port == 0 {
            "-1".to_owned()
        } else {
            self.port.to_string()
        };
        // Its output goes to a file in the store, so a test can show why it died.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("nats-server log file");
        let mut child = Command::new(nats_server_bin())
            .args(["-a", "127.0.0.1", "-p", &port, "-js", "-sd"])
            .arg(self.store.path().join("js"))
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server must be installed (make test installs it)");
        let port = match listed_ports(&mut child, &ports_dir, &["nats"]).await {
            Ok(ports) => ports[0],
            Err(e) => panic!("{e}; is port {port} taken?"),
        };
        self.port = port;
        self.child = Some(child);
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        wait_until(Duration::from_secs(10), "nats-server to listen", || async {
            tokio::net::TcpStream::connect(addr).await.is_ok()
        })
        .await;
    }

    fn log_path(&self) -> PathBuf {
        self.store.path().join("nats-server.log")
    }

    /// Whether the server is still running (false once it has exited, for whatever reason).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The last `lines` lines the server wrote (its panic, when it died of one).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// SIGKILL: no goodbye to clients, no flush.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the server freezes with every connection open; nothing answers, nothing fails.
    pub fn pause(&self) {
        self.signal(rustix::process::Signal::STOP);
    }

    /// SIGCONT after [`Self::pause`].
    pub fn resume(&self) {
        self.signal(rustix::process::Signal::CONT);
    }

    fn signal(&self, signal: rustix::process::Signal) {
        let pid = self.child.as_ref().expect("nats-server is running").id();
        procs::send_signal(pid, signal).expect("signal nats-server");
    }

    /// Starts again on the same port and store.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    pub async fn client(&self) -> async_nats::Client {
        connect(&self.url()).await
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One server of a [`NatsCluster`]: its name, client and route ports, store and log.
#[derive(Debug)]
pub struct ClusterNode {
    /// `server_name`, as JetStream reports a stream's leader and replicas.
    pub name: String,
    pub port: u16,
    pub cluster_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl ClusterNode {
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("server.conf")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is still running", self.name);
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(self.config_path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server must be installed (make test installs it)");
        self.child = Some(child);
    }

    /// SIGKILL: no lame-duck mode, no goodbye to clients or to the other servers.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let from = all.len().saturating_sub(lines);
        format!("----- NATS {} -----\n{}", self.name, all[from..].join("\n"))
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Real nats-servers with JetStream, clustered on loopback: each with its own store, client port
/// and route port, every one routing to all the others. Servers are killed and started again
/// (same ports, same store) by name.
#[derive(Debug)]
pub struct NatsCluster {
    pub nodes: Vec<ClusterNode>,
}

impl NatsCluster {
    /// Starts `size` servers `n1`, `n2` … and waits until JetStream answers through them (a meta
    /// leader is elected). Their ports come from [`free_port`], and another process may take one
    /// before a server binds it: then the servers start again on fresh ports (a few times).
    pub async fn start(size: usize) -> Self {
        const TRIES: usize = 5;
        for _ in 1..TRIES {
            if let Some(cluster) = Self::try_start(size).await {
                return cluster;
            }
        }
        Self::try_start(size)
            .await
            .expect("the cluster's ports kept being taken by other processes")
    }

    /// [`Self::start`] once; `None` when a server exited because one of its ports was taken.
    async fn try_start(size: usize) -> Option<Self> {
        let mut nodes: Vec<ClusterNode> = (1..=size)
            .map(|i| ClusterNode {
                name: format!("n{i}"),
                port: free_port(),
                cluster_port: free_port(),
                dir: tempfile::tempdir().expect("temp dir"),
                child: None,
            })
            .collect();
        let routes: Vec<String> = nodes
            .iter()
            .map(|n| format!("\"nats-route://127.0.0.1:{}\"", n.cluster_port))
            .collect();
        for node in &nodes {
            // A server ignores the route to itself.
            let config = format!(
                "server_name: {name}\n\
                 listen: \"127.0.0.1:{port}\"\n\
                 log_file: \"{log}\"\n\
                 jetstream {{ store_dir: \"{store}\" }}\n\
                 cluster {{\n  name: ecwid-test\n  listen: \"127.0.0.1:{cluster_port}\"\n  \
                 routes: [{routes}]\n}}\n",
                name = node.name,
                port = node.port,
                log = node.log_path().display(),
                store = node.dir.path().join("js").display(),
                cluster_port = node.cluster_port,
                routes = routes.join(", "),
            );
            std::fs::write(node.config_path(), config).expect("write the server config");
        }
        for node in &mut nodes {
            node.spawn();
        }
        let mut cluster = Self { nodes };
        for i in 0..cluster.nodes.len() {
            if !cluster.wait_listening(i).await {
                return None;
            }
        }
        // A server that cannot bind its route port exits just after its client port opened.
        tokio::time::sleep(Duration::from_millis(200)).await;
        if cluster.port_taken() {
            return None;
        }
        cluster.wait_jetstream().await;
        (!cluster.port_taken()).then_some(cluster)
    }

    /// Whether a server has exited because a port of its was in use; panics when one exited for
    /// another reason.
    fn port_taken(&mut self) -> bool {
        let mut taken = false;
        for node in &mut self.nodes {
            let exited = node
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if !exited {
                continue;
            }
            let log = std::fs::read_to_string(node.log_path()).unwrap_or_default();
            assert!(
                log.contains("address already in use"),
                "NATS {} exited at start:\n{}",
                node.name,
                node.log_tail(15)
            );
            taken = true;
        }
        taken
    }

    /// Every server's client URL, comma-separated: `NATS_URL` for a cluster.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(ClusterNode::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn node(&self, name: &str) -> &ClusterNode {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no server named {name}"))
    }

    fn node_mut(&mut self, name: &str) -> &mut ClusterNode {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no server named {name}"))
    }

    /// SIGKILLs server `name`.
    pub fn kill(&mut self, name: &str) {
        self.node_mut(name).kill();
    }

    /// Starts server `name` again on its ports and store, and waits until it accepts clients.
    pub async fn restart(&mut self, name: &str) {
        let node = self.node_mut(name);
        node.kill();
        node.spawn();
        let i = self
            .nodes
            .iter()
            .position(|n| n.name == name)
            .expect("the node just started");
        assert!(
            self.wait_listening(i).await,
            "NATS {name} could not bind its ports again:\n{}",
            self.logs()
        );
    }

    /// Waits (at most 20 s) until server `i` accepts connections; `false` when a server exited
    /// because one of its ports was taken.
    async fn wait_listening(&mut self, i: usize) -> bool {
        let addr: SocketAddr = ([127, 0, 0, 1], self.nodes[i].port).into();
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if self.port_taken() {
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "NATS {} not listening within 20 s:\n{}",
                self.nodes[i].name,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Waits until JetStream answers account requests: the cluster has a meta leader.
    async fn wait_jetstream(&self) {
        let client = connect(&self.url()).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let answer = tokio::time::timeout(
                Duration::from_secs(2),
                client.request("$JS.API.INFO", "".into()),
            )
            .await;
            let info = match answer {
                Ok(Ok(m)) => serde_json::from_slice::<Value>(&m.payload).ok(),
                _ => None,
            };
            if info.is_some_and(|v| v.get("error").is_none()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "JetStream of the cluster not ready within 30 s:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The server leading `stream` now (`$JS.API.STREAM.INFO.<stream>` → `cluster.leader`), and
    /// the other replicas; `None` while it has no leader or the request fails.
    pub async fn stream_leader(
        client: &async_nats::Client,
        stream: &str,
    ) -> Option<(String, Vec<String>)> {
        let answer = tokio::time::timeout(
            Duration::from_secs(2),
            client.request(format!("$JS.API.STREAM.INFO.{stream}"), "".into()),
        )
        .await
        .ok()?
        .ok()?;
        let info: Value = serde_json::from_slice(&answer.payload).ok()?;
        let leader = info["cluster"]["leader"].as_str()?.to_owned();
        let replicas = info["cluster"]["replicas"]
            .as_array()
            .map(|r| {
                r.iter()
                    .filter_map(|p| p["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Some((leader, replicas))
    }

    /// The end of every server's log, for a failure message.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.log_tail(15))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Polls `check` until it is true; panics with `what` after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait_for(
        timeout,
        || what.to_owned(),
        || {
            let done = check();
            async move { done.await.then_some(()) }
        },
    )
    .await
}

/// Polls `check` until it gives a value, and returns it; after `timeout`, panics with what
/// `what` says then (it may read the state that did not come, or the services' logs).
pub async fn wait_for<T, W, F, Fut>(timeout: Duration, what: W, mut check: F) -> T
where
    W: FnOnce() -> String,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {}", what());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connects to the test's nats-server (or any server of a comma-separated cluster list, as
/// `NATS_URL` takes it), retrying for up to 10 s: a server just started (or restarted) on a
/// loaded machine may reset the first connections.
pub async fn connect(nats_url: &str) -> async_nats::Client {
    let deadline = Instant::now() + Duration::from_secs(10);
    let servers: Vec<&str> = nats_url.split(',').collect();
    loop {
        match async_nats::connect(&servers).await {
            Ok(client) => return client,
            Err(error) if Instant::now() < deadline => {
                tracing::debug!(%error, "Test client cannot connect yet; retrying.");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("connect to {nats_url}: {error}"),
        }
    }
}

/// What a durable consumer still has to do: `(num_pending, num_ack_pending)`, the messages it has
/// not yet handed out, and those handed out but not acknowledged (in flight, or NAKed with a
/// delay and waiting for their retry).
pub async fn consumer_backlog(
    js: &async_nats::jetstream::Context,
    stream: &str,
    consumer: &str,
) -> (u64, u64) {
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream(stream)
        .await
        .unwrap_or_else(|e| panic!("stream {stream}: {e}"))
        .get_consumer(consumer)
        .await
        .unwrap_or_else(|e| panic!("consumer {consumer}: {e}"));
    let info = consumer.info().await.expect("consumer info");
    (info.num_pending, info.num_ack_pending as u64)
}

/// Waits until the pipeline has settled: the `normalizer` and `deliverer` consumers have nothing
/// pending and nothing in flight, so every raw event stored so far was normalized and acked and
/// every envelope was delivered (or dead-lettered) and acked. A test counts what arrived after
/// this instead of sleeping to see whether more comes. A retry still waiting on the server
/// counts as in flight, so this also waits out retries.
///
/// The consumers are read in pipeline order: once the normalizer's shows nothing left, every
/// envelope it published is already stored in `ECWID_EVENTS`, so a deliverer's consumer read
/// afterwards with nothing left means nothing is between the two. Panics after `timeout`.
pub async fn wait_settled(nats_url: &str, timeout: Duration) {
    let js = async_nats::jetstream::new(connect(nats_url).await);
    let stages = [
        (shared::nats::RAW_STREAM, shared::nats::NORMALIZER_CONSUMER),
        (
            shared::nats::EVENTS_STREAM,
            shared::nats::DELIVERER_CONSUMER,
        ),
    ];
    let deadline = Instant::now() + timeout;
    'poll: loop {
        for (stream, consumer) in stages {
            let (pending, in_flight) = consumer_backlog(&js, stream, consumer).await;
            if (pending, in_flight) != (0, 0) {
                assert!(
                    Instant::now() < deadline,
                    "timed out after {timeout:?} waiting for the pipeline to settle: \
                     {consumer} has {pending} pending, {in_flight} in flight"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue 'poll;
            }
        }
        return;
    }
}

/// One request a receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the callback body is JSON")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// How a receiver answers.
#[derive(Debug, Clone)]
pub enum Behavior {
    /// Always this status.
    Status(u16),
    /// These statuses in turn, then 200.
    Sequence(Vec<u16>),
    /// Wait this long, then 200.
    Slow(Duration),
    /// Never answer (hold the connection).
    Hang,
    /// This status for envelopes of the Ecwid event `event_id` (`message.raw.eventId`), 200 for
    /// every other request: one event that keeps failing.
    FailEvent { event_id: String, status: u16 },
}

#[derive(Debug)]
struct ReceiverState {
    behavior: Behavior,
    received: Vec<Received>,
}

/// A real HTTP callback receiver on 127.0.0.1:0 that records what it gets.
#[derive(Debug, Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<Mutex<ReceiverState>>,
    pub cancel: CancellationToken,
}

impl Receiver {
    pub async fn start(behavior: Behavior) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        Self::serve(listener, behavior).await
    }

    /// Serves on `listener` (to bring a receiver back on the same port).
    pub async fn serve(listener: TcpListener, behavior: Behavior) -> Self {
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(ReceiverState {
            behavior,
            received: Vec::new(),
        }));
        let cancel = CancellationToken::new();
        let app = Router::new()
            .fallback(receive)
            .with_state(Arc::clone(&state));
        serve_until(listener, app, &cancel);
        Self {
            addr,
            state,
            cancel,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.addr.port())
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.lock().expect("lock").received.clone()
    }

    pub fn count(&self) -> usize {
        self.state.lock().expect("lock").received.len()
    }

    pub fn set_behavior(&self, behavior: Behavior) {
        self.state.lock().expect("lock").behavior = behavior;
    }

    /// Waits until at least `n` requests arrived.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        wait_until(timeout, &format!("{n} callback requests"), || async {
            self.count() >= n
        })
        .await;
        self.received()
    }
}

/// Serves `app` on `listener` in the background until `cancel` fires (test servers: receivers,
/// the fake Ecwid API).
pub fn serve_until(listener: TcpListener, app: Router, cancel: &CancellationToken) {
    let stop = cancel.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
    });
}

async fn receive(
    State(state): State<Arc<Mutex<ReceiverState>>>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let behavior = {
        let mut s = state.lock().expect("lock");
        let of_event = matches!(s.behavior, Behavior::FailEvent { .. })
            .then(|| serde_json::from_slice::<Value>(&body).ok())
            .flatten()
            .and_then(|v| v["message"]["raw"]["eventId"].as_str().map(str::to_owned));
        s.received.push(Received {
            at: Instant::now(),
            headers,
            body,
        });
        match &mut s.behavior {
            Behavior::Sequence(list) if !list.is_empty() => Behavior::Status(list.remove(0)),
            Behavior::Sequence(_) => Behavior::Status(200),
            Behavior::FailEvent { event_id, status } => {
                Behavior::Status(if of_event.as_deref() == Some(event_id.as_str()) {
                    *status
                } else {
                    200
                })
            }
            other => other.clone(),
        }
    };
    match behavior {
        Behavior::Status(code) => StatusCode::from_u16(code).unwrap_or(StatusCode::OK),
        Behavior::Slow(d) => {
            tokio::time::sleep(d).await;
            StatusCode::OK
        }
        Behavior::Hang => {
            std::future::pending::<()>().await;
            StatusCode::OK
        }
        Behavior::Sequence(_) | Behavior::FailEvent { .. } => StatusCode::OK,
    }
}

/// The three services running in this process against one NATS server.
#[derive(Debug)]
pub struct Pipeline {
    pub nats_url: String,
    pub webhook: SocketAddr,
    pub admin: SocketAddr,
    pub normalizer_ops: SocketAddr,
    pub deliverer_ops: SocketAddr,
    /// Cancels all three.
    pub cancel: CancellationToken,
    pub http: reqwest::Client,
    handles: Vec<tokio::task::JoinHandle<()>>,
    deliverer_vars: Vars,
    deliverer: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
}

/// What the tests change from the defaults: loopback allowed, short timeouts, a short retry
/// schedule. Used by the in-process pipeline and by the service processes.
pub const TEST_SETTINGS: &[(&str, &str)] = &[
    ("ADMIN_TOKEN", ADMIN_TOKEN),
    ("DELIVER_ALLOW_NETWORKS", "127.0.0.0/8,::1/128"),
    ("DELIVER_RETRY_SCHEDULE", "200ms,400ms,800ms"),
    ("DELIVER_TIMEOUT_MS", "2000"),
    ("DELIVER_CONNECT_TIMEOUT_MS", "1000"),
    ("DELIVER_BREAKER_COOLDOWN_MS", "500"),
    ("SHUTDOWN_GRACE_MS", "3000"),
    ("INGEST_PUBLISH_TIMEOUT_MS", "1000"),
    ("NORMALIZER_PUBLISH_TIMEOUT_MS", "2000"),
];

/// With the event log on and no database named, the pipeline on `nats_url` gets its own
/// database on the test binary's PostgreSQL ([`pg::database_for`]).
pub fn add_event_log_database<M>(map: &mut M, nats_url: &str)
where
    M: Extend<(String, String)>,
    for<'a> &'a M: IntoIterator<Item = (&'a String, &'a String)>,
{
    let get = |map: &M, key: &str| {
        map.into_iter()
            .find(|(k, _)| k.as_str() == key)
            .map(|(_, v)| v.clone())
    };
    let off = get(map, "EVENT_LOG").is_some_and(|v| v.eq_ignore_ascii_case("off"));
    if off || get(map, "EVENT_LOG_DATABASE_URL").is_some() {
        return;
    }
    map.extend([(
        "EVENT_LOG_DATABASE_URL".to_owned(),
        pg::database_for(nats_url),
    )]);
}

/// The settings tests run with: [`TEST_SETTINGS`], then `overrides`, and the event log's
/// database ([`add_event_log_database`]).
pub fn test_vars(nats_url: &str, overrides: &[(&str, &str)]) -> Vars {
    let mut map: HashMap<String, String> = TEST_SETTINGS
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    map.insert("NATS_URL".into(), nats_url.into());
    for (k, v) in overrides {
        map.insert((*k).to_owned(), (*v).to_owned());
    }
    add_event_log_database(&mut map, nats_url);
    Vars::from_pairs(map)
}

async fn local() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.expect("bind")
}

async fn wait_ready(http: &reqwest::Client, ops: SocketAddr) {
    wait_until(Duration::from_secs(60), "a service to be ready", || {
        let http = http.clone();
        async move {
            matches!(http.get(format!("http://{ops}/readyz")).send().await, Ok(r) if r.status() == 200)
        }
    })
    .await;
}

impl Pipeline {
    pub async fn start(nats_url: &str, overrides: &[(&str, &str)]) -> Self {
        Self::start_with(nats_url, overrides, &[]).await
    }

    /// Like [`Pipeline::start`], with settings that only the deliverer gets.
    pub async fn start_with(
        nats_url: &str,
        overrides: &[(&str, &str)],
        deliverer_overrides: &[(&str, &str)],
    ) -> Self {
        init_logs();
        let vars = test_vars(nats_url, overrides);
        let all: Vec<(&str, &str)> = overrides
            .iter()
            .chain(deliverer_overrides)
            .copied()
            .collect();
        let deliverer_vars = test_vars(nats_url, &all);
        let cancel = CancellationToken::new();
        let (webhooks, admin, n_ops, d_ops) =
            (local().await, local().await, local().await, local().await);
        let addrs = (
            webhooks.local_addr().expect("addr"),
            admin.local_addr().expect("addr"),
            n_ops.local_addr().expect("addr"),
            d_ops.local_addr().expect("addr"),
        );
        let mut handles = Vec::new();
        let ingest_config = ingest::Config::from_vars(&vars).expect("ingest config");
        let (c, k) = (connect(nats_url).await, cancel.clone());
        handles.push(tokio::spawn(async move {
            ingest::run(ingest_config, ingest::Listeners { webhooks, admin }, c, k)
                .await
                .expect("ingest runs");
        }));
        // The ingest first, as a deployment's rollout would: its start-up creates the streams
        // and buckets the workers then only find. Three services creating them at once on one
        // server make nats-server 2.9 time requests out for many seconds.
        let probe = reqwest::Client::new();
        wait_ready(&probe, addrs.1).await;
        let normalizer_config = normalizer::Config::from_vars(&vars).expect("normalizer config");
        let (c, k) = (connect(nats_url).await, cancel.clone());
        handles.push(tokio::spawn(async move {
            normalizer::run(normalizer_config, n_ops, c, k)
                .await
                .expect("normalizer runs");
        }));
        let mut pipeline = Self {
            nats_url: nats_url.to_owned(),
            webhook: addrs.0,
            admin: addrs.1,
            normalizer_ops: addrs.2,
            deliverer_ops: addrs.3,
            cancel,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
            handles,
            deliverer_vars,
            deliverer: None,
        };
        pipeline.spawn_deliverer(d_ops).await;
        for ops in [pipeline.admin, pipeline.normalizer_ops] {
            wait_ready(&pipeline.http, ops).await;
        }
        pipeline
    }

    async fn spawn_deliverer(&mut self, listener: TcpListener) {
        let config = deliverer::Config::from_vars(&self.deliverer_vars).expect("deliverer config");
        let token = self.cancel.child_token();
        let (c, k) = (connect(&self.nats_url).await, token.clone());
        let handle = tokio::spawn(async move {
            deliverer::run(config, listener, c, k)
                .await
                .expect("deliverer runs");
        });
        self.deliverer = Some((token, handle));
        wait_ready(&self.http, self.deliverer_ops).await;
    }

    /// Stops the deliverer (as on SIGTERM) and waits until it has.
    pub async fn stop_deliverer(&mut self) {
        if let Some((token, handle)) = self.deliverer.take() {
            token.cancel();
            tokio::time::timeout(Duration::from_secs(15), handle)
                .await
                .expect("the deliverer stops within its grace period")
                .expect("the deliverer task ends cleanly");
        }
    }

    /// Starts a new deliverer on the same ops address.
    pub async fn start_deliverer(&mut self) {
        let listener = TcpListener::bind(self.deliverer_ops)
            .await
            .expect("bind the ops port again");
        self.spawn_deliverer(listener).await;
    }

    /// Cancels and waits for all three to stop.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        self.stop_deliverer().await;
        for h in self.handles {
            let _ = tokio::time::timeout(Duration::from_secs(15), h).await;
        }
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    pub fn webhook_url(&self) -> String {
        format!("http://{}/events/ecwid", self.webhook)
    }

    pub async fn admin_request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        admin_request(&self.http, self.admin, method, path, body).await
    }

    /// Creates an instance of `store_id` calling back `callback` with `extra` configuration, and
    /// waits until every service has seen it.
    pub async fn create_instance(
        &self,
        store_id: &str,
        callback: &str,
        extra: &[(&str, &str)],
    ) -> String {
        let ops = [self.admin, self.normalizer_ops, self.deliverer_ops];
        create_instance(
            &self.http,
            self.admin,
            &self.nats_url,
            &ops,
            store_id,
            callback,
            extra,
        )
        .await
    }

    /// Waits until the ingest, normalizer and deliverer have all applied the bucket's newest
    /// revision (`ecwid_instances_revision`).
    pub async fn wait_instances_seen(&self) {
        let ops = [self.admin, self.normalizer_ops, self.deliverer_ops];
        wait_instances_seen(&self.nats_url, &self.http, &ops).await;
    }

    pub async fn post_json(&self, body: &Value, signature: Option<&str>) -> (u16, Value) {
        let mut req = self.http.post(self.webhook_url()).json(body);
        if let Some(s) = signature {
            req = req.header("X-Ecwid-Webhook-Signature", s);
        }
        let resp = req.send().await.expect("webhook request");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn metrics_text(&self, ops: SocketAddr) -> String {
        self.http
            .get(format!("http://{ops}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }
}

/// A request to the admin API at `admin` with the test token; the answer's status and JSON body
/// (`null` when it has none).
pub async fn admin_request(
    http: &reqwest::Client,
    admin: SocketAddr,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = http
        .request(method, format!("http://{admin}{path}"))
        .bearer_auth(ADMIN_TOKEN)
        .timeout(Duration::from_secs(10));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("admin request");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Creates an instance (the seed's JSON with `store_id`, `callback` and `extra` configuration)
/// through the admin API at `admin`, and waits until the services at `ops` have seen it.
pub async fn create_instance(
    http: &reqwest::Client,
    admin: SocketAddr,
    nats_url: &str,
    ops: &[SocketAddr],
    store_id: &str,
    callback: &str,
    extra: &[(&str, &str)],
) -> String {
    let mut config = json!({
        "ecwid.order.key": "order-key-secret",
        "ecwid.product.key": "",
        "ecwid.store.id": store_id,
        "event.notification.enabled": "true",
        "event.notification.callback.url": callback,
    });
    for (k, v) in extra {
        config[*k] = json!(v);
    }
    let body = json!({"element": {"key": "ecwid"}, "configuration": config, "tags": ["test"],
                      "name": format!("store {store_id}")});
    let (status, created) =
        admin_request(http, admin, reqwest::Method::POST, "/instances", Some(body)).await;
    assert_eq!(status, 201, "instance created: {created}");
    let id = created["id"].as_str().expect("id").to_owned();
    wait_instances_seen(nats_url, http, ops).await;
    id
}

/// Waits until the services answering `/metrics` at `ops` all report an
/// `ecwid_instances_revision` at least the bucket's last sequence.
pub async fn wait_instances_seen(nats_url: &str, http: &reqwest::Client, ops: &[SocketAddr]) {
    let client = connect(nats_url).await;
    let js = async_nats::jetstream::new(client);
    let mut stream = js
        .get_stream(format!("KV_{}", shared::nats::INSTANCES_BUCKET))
        .await
        .expect("bucket stream");
    let last = stream
        .info()
        .await
        .expect("bucket info")
        .state
        .last_sequence as f64;
    for ops in ops {
        wait_until(
            Duration::from_secs(10),
            "instance changes to reach every service",
            || async move {
                let text = match http.get(format!("http://{ops}/metrics")).send().await {
                    Ok(r) => r.text().await.unwrap_or_default(),
                    Err(_) => return false,
                };
                metric(&text, "ecwid_instances_revision").is_some_and(|r| r >= last)
            },
        )
        .await;
    }
}

/// The value of a sample (`name` or `name{labels}`, exactly as exposed) in Prometheus text.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == sample).then(|| value.parse().ok()).flatten()
    })
}

/// The documented `order.created` webhook of store `store_id`.
pub fn order_created(store_id: u64, event_id: &str) -> Value {
    json!({
        "eventId": event_id,
        "eventCreated": 1_764_000_000,
        "storeId": store_id,
        "entityId": 123456,
        "eventType": "order.created",
        "data": {"orderId": "XJ12H", "newPaymentStatus": "PAID", "newFulfillmentStatus": "AWAITING_PROCESSING"}
    })
}

/// Ecwid's signature for a v3 event.
pub fn ecwid_signature(secret: &str, event: &Value) -> String {
    ingest::verify::sign(
        secret,
        &event["eventCreated"].to_string(),
        event["eventId"].as_str().unwrap_or_default(),
    )
}
