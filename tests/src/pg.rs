//! A private PostgreSQL for the tests: Debian's server binaries, a data directory of its own in
//! a temporary directory, a free port on 127.0.0.1: never the machine's own server. One server
//! serves the whole test binary, a database per NATS server (so per pipeline); a test that stops
//! and restarts PostgreSQL starts its own ([`Postgres::start`]).
//!
//! As root the server runs as the `postgres` user (PostgreSQL refuses root). It dies with the
//! test binary (a parent-death signal), so an aborted run leaves nothing behind.

use std::collections::HashMap;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The server binaries: `PG_BIN_DIR`, else the newest `/usr/lib/postgresql/<major>/bin`
/// (`scripts/ensure-postgres.sh` installs Debian's package when none is there).
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").is_file().then_some((major, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p).unwrap_or_else(|| {
        panic!("no PostgreSQL server binaries: run scripts/ensure-postgres.sh (make tools) or set PG_BIN_DIR")
    })
}

/// The uid and gid to run the server as: `postgres` when we are root, else ourselves.
fn run_as() -> Option<(u32, u32)> {
    if !rustix::process::geteuid().is_root() {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .expect("running as root needs a `postgres` user to run PostgreSQL as");
    let fields: Vec<&str> = line.split(':').collect();
    Some((
        fields[2].parse().expect("uid"),
        fields[3].parse().expect("gid"),
    ))
}

fn command(bin: &Path, tool: &str) -> Command {
    let mut c = Command::new(bin.join(tool));
    if let Some((uid, gid)) = run_as() {
        c.uid(uid).gid(gid);
    }
    c.env_remove("PGDATA").env("LC_ALL", "C");
    c
}

/// The prefix of the servers' temporary directories.
const DIR_PREFIX: &str = "ecwid-pg-";

/// Removes the directories of servers no longer running: the test binary's shared server is
/// never dropped (a static), so its directory outlives the run; the next run clears it.
fn remove_stale() {
    let tmp = std::env::temp_dir();
    let Ok(entries) = std::fs::read_dir(&tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(DIR_PREFIX) {
            continue;
        }
        let dir = entry.path();
        // The server's pid, and the test process's that made it (`owner`): either alive, the
        // directory is in use (a server a test stopped for a while included).
        let alive = |file: PathBuf| {
            std::fs::read_to_string(file)
                .ok()
                .and_then(|text| text.lines().next().map(str::trim).map(str::to_owned))
                .is_some_and(|pid| !pid.is_empty() && Path::new("/proc").join(pid).exists())
        };
        let running = alive(dir.join("data").join("postmaster.pid")) || alive(dir.join("owner"));
        // A directory just made by another binary's start (initdb not done yet) has no pid file
        // either: only those older than a minute go.
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(60));
        if !running && old {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// `ECWID_TEST_PG_DURABLE=1` (the bench's make targets set it): the server commits durably, as a
/// deployment's does, so that its CPU and latency are what production would see.
fn durable() -> bool {
    std::env::var("ECWID_TEST_PG_DURABLE").is_ok_and(|v| v == "1")
}

/// A running PostgreSQL of this test binary.
#[derive(Debug)]
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    /// The server's pid and the thread that started it and waits for it.
    child: Option<(u32, std::thread::JoinHandle<()>)>,
}

impl Postgres {
    /// initdb, then the server; returns once it accepts connections.
    pub fn start() -> Self {
        remove_stale();
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir()
            .expect("temp dir");
        std::fs::write(dir.path().join("owner"), std::process::id().to_string())
            .expect("write the owner file");
        if let Some((uid, gid)) = run_as() {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown data dir");
        }
        let data = dir.path().join("data");
        let out = command(&bin, "initdb")
            .args(["-D"])
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync"])
            .stdout(Stdio::null())
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pg = Self {
            dir,
            bin,
            port: crate::free_port(),
            child: None,
        };
        pg.spawn();
        pg
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("postgres.log")).expect("log file");
        // Through util-linux's setpriv, which asks for SIGQUIT (PostgreSQL's immediate
        // shutdown) when this process dies, then becomes the server.
        let mut c = Command::new("setpriv");
        if let Some((uid, gid)) = run_as() {
            c.uid(uid).gid(gid);
        }
        c.env_remove("PGDATA").env("LC_ALL", "C");
        c.args(["--pdeathsig", "QUIT", "--"])
            .arg(self.bin.join("postgres"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(self.dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=400",
            ])
            .args(if durable() {
                // The bench: PostgreSQL as deployed (durable commits), with room for its cache.
                ["-c", "shared_buffers=1GB", "-c", "max_wal_size=8GB"].as_slice()
            } else {
                // Tests: durability across a machine crash is not what they check, a process
                // crash is: commits reach the WAL (synchronous_commit stays on, so a killed
                // server recovers every acknowledged row), but are not flushed to disk.
                [
                    "-c",
                    "fsync=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "shared_buffers=64MB",
                ]
                .as_slice()
            })
            .stdout(Stdio::null())
            .stderr(log);
        // Started by a thread that lives as long as the server: the parent-death signal follows
        // the thread that forked, not the process.
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || match c.spawn() {
            Ok(mut child) => {
                let _ = tx.send(Some(child.id()));
                let _ = child.wait();
            }
            Err(_) => {
                let _ = tx.send(None);
            }
        });
        let pid = rx
            .recv()
            .ok()
            .flatten()
            .expect("start postgres (util-linux's setpriv and the server binaries)");
        self.child = Some((pid, waiter));
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.accepts() {
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not start: {}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn accepts(&self) -> bool {
        Command::new(self.bin.join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .status()
            .is_ok_and(|s| s.success())
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// `postgres://postgres@127.0.0.1:<port>/<db>`
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    /// Runs `sql` in `db` with psql; its output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1"])
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            // The statement on stdin: a long one (thousands of rows) would not fit in argv.
            .args(["-d", db, "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write as _;
                if let Some(mut stdin) = child.stdin.take() {
                    stdin.write_all(sql.as_bytes())?;
                }
                child.wait_with_output()
            })
            .expect("run psql");
        let shown: String = sql.chars().take(300).collect();
        assert!(
            out.status.success(),
            "psql `{shown}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A new empty database; its URL.
    pub fn new_database(&self) -> String {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "t{}_{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url(&name)
    }

    /// Stops the server at once (as a crash would: `immediate`), keeping its data.
    pub fn stop(&mut self) {
        if let Some((pid, waiter)) = self.child.take() {
            let _ = crate::procs::send_signal(pid, rustix::process::Signal::QUIT);
            let _ = waiter.join();
        }
    }

    /// Starts it again on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_ref().is_some_and(|(_, w)| !w.is_finished())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The shared server's pid, when this process started it (the bench counts its CPU).
pub fn running_pid() -> Option<u32> {
    SHARED
        .get()
        .and_then(|pg| pg.child.as_ref().map(|(pid, _)| *pid))
}

static SHARED: OnceLock<Postgres> = OnceLock::new();

/// The test binary's server, started on first use.
pub fn shared() -> &'static Postgres {
    SHARED.get_or_init(Postgres::start)
}

/// The event log database of the pipeline on `nats_url`: one per NATS server, made on first use.
pub fn database_for(nats_url: &str) -> String {
    static BY_NATS: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    let map = BY_NATS.get_or_init(Default::default);
    let mut map = map
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    map.entry(nats_url.to_owned())
        .or_insert_with(|| shared().new_database())
        .clone()
}

/// The name of [`database_for`]'s database.
pub fn database_name_for(nats_url: &str) -> String {
    let url = database_for(nats_url);
    let path = url.rsplit('/').next().unwrap_or_default();
    path.split('?').next().unwrap_or_default().to_owned()
}

/// Runs `sql` in the event log database of the pipeline on `nats_url`.
pub fn psql_for(nats_url: &str, sql: &str) -> String {
    shared().psql(&database_name_for(nats_url), sql)
}

/// An event log over the database of the pipeline on `nats_url`, as a service holds it (to
/// call what a service would).
pub async fn event_log_for(nats_url: &str) -> shared::eventlog::EventLog {
    let database = shared::config::DatabaseConfig {
        url: database_for(nats_url),
        pool: 2,
        ca_file: None,
    };
    let js = async_nats::jetstream::new(crate::connect(nats_url).await);
    let metrics = shared::eventlog::LogMetrics::register(&prometheus::Registry::new());
    shared::eventlog::EventLog::start(
        &database,
        js,
        "test",
        Duration::from_secs(7 * 86_400),
        metrics,
        &tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect("event log")
}
