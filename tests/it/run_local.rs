//! The README's first command on a fresh clone: `make run` builds every binary, starts the
//! pipeline with its own nats-server, and the README's "Try it" commands, pasted as written (on
//! this run's ports), bring a signed envelope to the echo receiver; Ctrl-C stops everything.
//!
//! The clone is built with `PROFILE=dev` into `target/run-smoke` (beside this test's own
//! profile folders): empty on CI's fresh clone, so the build really starts from nothing there;
//! reused on a developer's machine.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use integration_tests::{free_port, nats_server_bin, procs::binary_dir};
use rustix::process::{kill_process_group, Pid, Signal};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

/// A cold build of the whole workspace on a busy two-core machine; a warm one takes seconds.
const BUILD_AND_START_TIMEOUT: Duration = Duration::from_secs(40 * 60);
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The addresses the README's example is written for, and the variables that move them.
const README_ADMIN: &str = "127.0.0.1:8081";
const README_WEBHOOKS: &str = "127.0.0.1:8080";
const README_RECEIVER: &str = "127.0.0.1:9999";

/// `make run` in its own process group; dropping it kills the whole group.
struct MakeRun {
    child: Child,
    pgid: Pid,
    output: Arc<Mutex<String>>,
}

impl MakeRun {
    fn output(&self) -> String {
        self.output.lock().map(|o| o.clone()).unwrap_or_default()
    }

    /// Panics with `what` and the end of the output.
    fn fail(&self, what: &str) -> ! {
        let output = self.output();
        let tail: Vec<&str> = output.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        panic!("{what}\n--- make run's output ends:\n{}", tail.join("\n"));
    }

    /// Waits until `found` says yes to the output; fails when `make run` exits first.
    async fn wait_output<T>(
        &mut self,
        timeout: Duration,
        what: &str,
        found: impl Fn(&str) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(t) = found(&self.output()) {
                return t;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // What it printed last may still be in the pipe.
                tokio::time::sleep(Duration::from_millis(200)).await;
                if let Some(t) = found(&self.output()) {
                    return t;
                }
                self.fail(&format!("`make run` exited ({status}) before {what}"));
            }
            if Instant::now() > deadline {
                self.fail(&format!("timed out after {timeout:?} waiting for {what}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for MakeRun {
    fn drop(&mut self) {
        let _ = kill_process_group(self.pgid, Signal::KILL);
    }
}

/// Appends every line of `stream` to `output`.
fn collect(stream: impl AsyncRead + Unpin + Send + 'static, output: Arc<Mutex<String>>) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(mut out) = output.lock() {
                out.push_str(&line);
                out.push('\n');
            }
        }
    });
}

/// The processes of group `pgid` that still run (zombies excluded), as `pid name` lines.
fn group_members(pgid: Pid) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .filter_map(|e| {
            let pid = e.ok()?.file_name().to_str()?.parse::<u32>().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // `pid (comm) state ppid pgrp ...`; comm may hold spaces and parentheses.
            let (head, rest) = stat.rsplit_once(") ")?;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let (state, pgrp) = (*fields.first()?, fields.get(2)?.parse::<i32>().ok()?);
            (pgrp == pgid.as_raw_nonzero().get() && state != "Z")
                .then(|| format!("{pid} {}", head.split_once(" (").map_or("", |h| h.1)))
        })
        .collect()
}

/// The README's "Try it" shell block, moved to this run's addresses.
fn readme_try_it(readme: &Path, admin: &str, webhooks: &str, receiver: &str) -> String {
    let text = std::fs::read_to_string(readme).expect("README.md in the clone");
    let section = text
        .split_once("\n## Try it\n")
        .expect("README has a \"Try it\" section")
        .1;
    let block = section
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("\n```"))
        .expect("\"Try it\" opens with a sh block")
        .0;
    for (from, name) in [
        (README_ADMIN, "ADMIN_LISTEN"),
        (README_WEBHOOKS, "INGEST_LISTEN"),
        (README_RECEIVER, "RECEIVER_LISTEN"),
    ] {
        assert!(
            block.contains(from),
            "the README's example no longer uses {from} ({name}'s default): update this test"
        );
    }
    block
        .replace(README_ADMIN, admin)
        .replace(README_WEBHOOKS, webhooks)
        .replace(README_RECEIVER, receiver)
}

/// The envelope the echo receiver printed after a `--- delivery <id> (signature ok)` line.
fn signed_delivery(output: &str) -> Option<(String, Value)> {
    let mut lines = output.lines();
    while let Some(line) = lines.next() {
        let Some(rest) = line.strip_prefix("--- delivery ") else {
            continue;
        };
        let (id, verdict) = rest.split_once(' ')?;
        // The services log to the same output: the body is the next line that is an envelope.
        let body = lines
            .clone()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v.pointer("/message/events").is_some())?;
        return Some((format!("{id} {verdict}"), body));
    }
    None
}

#[tokio::test(flavor = "multi_thread")]
async fn make_run_on_a_fresh_clone_delivers_the_readme_example() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf();
    let work = tempfile::tempdir().expect("a temp dir");
    let clone = work.path().join("ecwid-events");
    let status = std::process::Command::new("git")
        .args(["clone", "--quiet"])
        .arg(&root)
        .arg(&clone)
        .status()
        .expect("git runs");
    assert!(status.success(), "git clone of {} failed", root.display());

    let target_dir = binary_dir()
        .parent()
        .expect("the target folder")
        .join("run-smoke");
    let addr = || format!("127.0.0.1:{}", free_port());
    let (webhooks, admin, receiver) = (addr(), addr(), addr());
    let ports = [
        ("NATS_PORT", free_port().to_string()),
        ("NATS_MONITOR_PORT", free_port().to_string()),
        ("PG_PORT", free_port().to_string()),
        ("INGEST_LISTEN", webhooks.clone()),
        ("ADMIN_LISTEN", admin.clone()),
        ("NORMALIZER_OPS_LISTEN", addr()),
        ("DELIVERER_OPS_LISTEN", addr()),
        ("POLLER_OPS_LISTEN", addr()),
        ("RECEIVER_LISTEN", receiver.clone()),
    ];

    let mut command = Command::new("make");
    command
        .arg("run")
        .current_dir(&clone)
        // What a developer's shell would not have: cargo's variables for this test, the outer
        // make's jobserver, and any setting `make run` defaults itself.
        .env_clear()
        .envs(std::env::vars().filter(|(k, _)| {
            (!k.starts_with("CARGO") || k == "CARGO_HOME")
                && !k.starts_with("MAKE")
                && ![
                    "MFLAGS",
                    "NATS_URL",
                    "EVENT_LOG",
                    "EVENT_LOG_DATABASE_URL",
                    "DATABASE_URL",
                    "ADMIN_TOKEN",
                    "DELIVER_ALLOW_NETWORKS",
                    "OPS_LISTEN",
                    "RUST_LOG",
                    "PROFILE",
                ]
                .contains(&k.as_str())
        }))
        .envs(ports.iter().map(|(k, v)| (*k, v.as_str())))
        .env("PROFILE", "dev")
        .env("CARGO_TARGET_DIR", &target_dir)
        // The server the other tests use, so the clone installs nothing.
        .env("NATS_SERVER_BIN", nats_server_bin())
        .env("NO_COLOR", "1")
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = command.spawn().expect("make runs");
    let pgid = child
        .id()
        .and_then(|id| Pid::from_raw(i32::try_from(id).ok()?))
        .expect("make's process id");
    let output = Arc::new(Mutex::new(String::new()));
    collect(child.stdout.take().expect("stdout"), Arc::clone(&output));
    collect(child.stderr.take().expect("stderr"), Arc::clone(&output));
    let mut run = MakeRun {
        child,
        pgid,
        output,
    };

    run.wait_output(
        BUILD_AND_START_TIMEOUT,
        "\"ecwid-events is running\"",
        |o| o.contains("Ctrl-C stops everything.").then_some(()),
    )
    .await;
    eprintln!(
        "make run: built and ready in {:.1} s (target dir {})",
        started.elapsed().as_secs_f64(),
        target_dir.display()
    );
    let printed = run.output();
    for shown in [
        format!("http://{webhooks}/events/ecwid"),
        format!("http://{admin}/ui/"),
        format!("http://{receiver}/hook"),
    ] {
        assert!(
            printed.contains(&shown),
            "make run did not print {shown}, on the addresses it was given"
        );
    }

    // The README's two commands, as a user pastes them.
    let script = readme_try_it(&clone.join("README.md"), &admin, &webhooks, &receiver);
    let pasted = tokio::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .output()
        .await
        .expect("bash runs (and curl is installed)");
    let answers = String::from_utf8_lossy(&pasted.stdout).into_owned();
    assert!(
        pasted.status.success(),
        "the README's commands failed: {answers}{}",
        String::from_utf8_lossy(&pasted.stderr)
    );
    let answers: Vec<Value> = serde_json::Deserializer::from_str(&answers)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("the commands' answers are not JSON ({e}): {answers}"));
    let [instance, accepted] = answers.as_slice() else {
        panic!("expected two answers (instance, webhook), got {answers:?}");
    };
    let instance_id = instance["id"]
        .as_str()
        .unwrap_or_else(|| panic!("the instance was not created: {instance}"));
    assert_eq!(accepted["status"], "accepted", "{accepted}");

    let (delivery, envelope) = run
        .wait_output(DELIVERY_TIMEOUT, "the echo receiver's delivery", |o| {
            signed_delivery(o)
        })
        .await;
    assert!(delivery.ends_with("(signature ok)"), "{delivery}");
    assert_eq!(envelope["message"]["instanceId"], instance_id, "{envelope}");
    assert_eq!(
        envelope["message"]["events"][0]["objectId"], "XJ12H",
        "{envelope}"
    );
    assert_eq!(
        envelope["message"]["raw"]["eventId"], "demo-1",
        "{envelope}"
    );

    // Ctrl-C: the terminal sends SIGINT to the whole foreground group.
    kill_process_group(pgid, Signal::INT).expect("signal make run's group");
    let deadline = Instant::now() + STOP_TIMEOUT;
    loop {
        let exited = matches!(run.child.try_wait(), Ok(Some(_)));
        let left = group_members(pgid);
        if exited && left.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            run.fail(&format!(
                "still running {STOP_TIMEOUT:?} after Ctrl-C: {left:?} (make exited: {exited})"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        std::net::TcpStream::connect(&webhooks).is_err(),
        "something still answers on the webhook address {webhooks}"
    );
    eprintln!(
        "make run: whole test {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
