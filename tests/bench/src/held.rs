//! `bench held`: what a paused instance's held backlog costs. The pipeline (real processes,
//! production settings) idles for a window; then an instance is paused, 10,000 webhooks for it
//! are accepted and moved into the hold, and the pipeline idles for the same window again. CPU is
//! summed over nats-server and the three services; the held figure must stay within 1 % of a
//! core of the idle one (issue 12: nothing touches a held envelope). Finally the instance is
//! resumed and every held event must arrive.

use std::time::{Duration, Instant};

use anyhow::bail;
use integration_tests::procs::{order_webhooks, send_all, Cluster};
use integration_tests::{Behavior, Receiver};
use reqwest::Method;

use crate::{cpu_delta, Nats, Pids, PRODUCTION};

const HELD: usize = 10_000;
const WINDOW: Duration = Duration::from_secs(30);

async fn health(cluster: &Cluster, id: &str) -> anyhow::Result<serde_json::Value> {
    let (status, body) = cluster
        .admin_request(Method::GET, &format!("/instances/{id}/health"), None)
        .await;
    if status != 200 {
        bail!("health answered {status}: {body}");
    }
    Ok(body)
}

/// CPU % of one core per process over `WINDOW`, and their sum.
async fn idle_window(pids: &Pids) -> (f64, String) {
    let before = pids.read();
    let started = Instant::now();
    tokio::time::sleep(WINDOW).await;
    let secs = started.elapsed().as_secs_f64();
    let used = cpu_delta(&before, &pids.read());
    let total: f64 = used.values().sum::<f64>() / secs * 100.0;
    let each = used
        .iter()
        .map(|(k, v)| format!("{k} {:.2} %", v / secs * 100.0))
        .collect::<Vec<_>>()
        .join(", ");
    (total, each)
}

pub(crate) async fn run() -> anyhow::Result<()> {
    let nats = Nats::start().await?;
    let cluster = Cluster::start(&nats.url(), PRODUCTION, 1).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    let id = cluster.create_instance("7501", &receiver.url(), &[]).await;
    let pids = Pids(vec![
        ("ingest".into(), cluster.ingest.pid().unwrap_or(0)),
        (
            "normalizer".into(),
            cluster.normalizers[0].pid().unwrap_or(0),
        ),
        ("deliverer".into(), cluster.deliverers[0].pid().unwrap_or(0)),
        ("nats-server".into(), nats.pid()),
    ]);
    println!("## A paused instance's held backlog ({HELD} events)");
    let (idle, idle_each) = idle_window(&pids).await;
    println!("idle, nothing held: {idle:.2} % of a core ({idle_each})");

    let (status, body) = cluster
        .admin_request(Method::POST, &format!("/instances/{id}/pause"), None)
        .await;
    if status != 200 {
        bail!("pause answered {status}: {body}");
    }
    let http = reqwest::Client::new();
    let sent = send_all(
        &http,
        &cluster.webhook_url(),
        order_webhooks(7501, "held", HELD),
        32,
    )
    .await;
    if sent.acked.len() != HELD {
        bail!(
            "the ingest took {} of {HELD}: {:?}",
            sent.acked.len(),
            sent.outcomes
        );
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let h = health(&cluster, &id).await?;
        if h["held"].as_u64() == Some(HELD as u64) {
            break;
        }
        if Instant::now() > deadline {
            bail!("not all held after 300 s: {h}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Settle: the moves' own work is done before the window opens.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (held, held_each) = idle_window(&pids).await;
    println!("paused, {HELD} held: {held:.2} % of a core ({held_each})");
    if receiver.count() != 0 {
        bail!("a paused instance received {} events", receiver.count());
    }

    let (status, body) = cluster
        .admin_request(Method::POST, &format!("/instances/{id}/resume"), None)
        .await;
    if status != 200 {
        bail!("resume answered {status}: {body}");
    }
    let started = Instant::now();
    receiver.wait_for(HELD, Duration::from_secs(300)).await;
    let released_in = started.elapsed().as_secs_f64();
    println!("resumed: {HELD} delivered in {released_in:.1} s");
    let cost = held - idle;
    println!(
        "HELD held={HELD} idle_cpu_pct={idle:.2} held_cpu_pct={held:.2} held_cost_pct={cost:.2} release_secs={released_in:.1} target={}",
        if cost < 1.0 { "met" } else { "MISSED" }
    );
    drop(cluster);
    drop(nats);
    Ok(())
}
