//! `bench isolation`: a stalled instance must not slow the others (issue 12, per-instance
//! limits). A healthy instance gets events at a fixed rate, first alone, then beside an instance
//! of another store whose receiver never answers (each request held until the deliverer's
//! timeout) and that gets the same rate. The healthy instance's end-to-end p99 (webhook sent →
//! callback received) beside the stalled one must stay within 2 × its solo p99.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use integration_tests::procs::{order_webhooks, post_webhook, Cluster};
use integration_tests::{Behavior, Receiver};

use crate::{Nats, PRODUCTION};

const RATE: f64 = 100.0;
const SECS: f64 = 20.0;

/// Sends `RATE`/s of webhooks of `stores` for `SECS` (one after another per tick, each in its own
/// task); the send instant of each event id.
async fn send_paced(
    cluster: &Cluster,
    stores: &[u64],
    prefix: &str,
) -> anyhow::Result<HashMap<String, Instant>> {
    let count = (RATE * SECS) as usize;
    let sent = Arc::new(Mutex::new(HashMap::new()));
    let http = reqwest::Client::new();
    let url = cluster.webhook_url();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / RATE));
    let mut tasks = Vec::new();
    let batches: Vec<_> = stores
        .iter()
        .map(|s| order_webhooks(*s, &format!("{prefix}-{s}"), count))
        .collect();
    for i in 0..count {
        tick.tick().await;
        for batch in &batches {
            let webhook = batch[i].clone();
            let (http, url, sent) = (http.clone(), url.clone(), Arc::clone(&sent));
            tasks.push(tokio::spawn(async move {
                let at = Instant::now();
                let status = post_webhook(&http, &url, &webhook).await;
                if matches!(status, Ok(200)) {
                    sent.lock().expect("lock").insert(webhook.event_id, at);
                }
                status.is_ok_and(|s| s == 200)
            }));
        }
    }
    let mut refused = 0;
    for t in tasks {
        if !t.await.unwrap_or(false) {
            refused += 1;
        }
    }
    if refused > 0 {
        bail!("{refused} webhooks not accepted");
    }
    let sent = sent.lock().expect("lock").clone();
    Ok(sent)
}

/// p50 and p99 (ms) from each sent event of `prefix` to its arrival at `receiver`.
async fn latencies(
    receiver: &Receiver,
    sent: &HashMap<String, Instant>,
    prefix: &str,
) -> anyhow::Result<(f64, f64)> {
    let mine: Vec<&String> = sent.keys().filter(|k| k.starts_with(prefix)).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let got = receiver.received();
        let arrived: HashMap<String, Instant> = got
            .iter()
            .filter_map(|r| {
                let id = r.json()["message"]["raw"]["eventId"].as_str()?.to_owned();
                id.starts_with(prefix).then_some((id, r.at))
            })
            .collect();
        if mine.iter().all(|id| arrived.contains_key(*id)) {
            let mut ms: Vec<f64> = mine
                .iter()
                .map(|id| (arrived[*id] - sent[*id]).as_secs_f64() * 1000.0)
                .collect();
            ms.sort_by(f64::total_cmp);
            let q = |p: f64| ms[((ms.len() as f64 - 1.0) * p).round() as usize];
            return Ok((q(0.5), q(0.99)));
        }
        if Instant::now() > deadline {
            bail!("{} of {} arrived", arrived.len(), mine.len());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub(crate) async fn run() -> anyhow::Result<()> {
    let nats = Nats::start().await?;
    let cluster = Cluster::start(&nats.url(), PRODUCTION, 1).await;
    let healthy = Receiver::start(Behavior::Status(200)).await;
    let stalled = Receiver::start(Behavior::Hang).await;
    cluster.create_instance("7601", &healthy.url(), &[]).await;
    cluster.create_instance("7602", &stalled.url(), &[]).await;
    println!("## A stalled instance beside a healthy one ({RATE}/s each, {SECS} s)");
    // Warm: connections and streams.
    let warm = send_paced(&cluster, &[7601], "warm").await?;
    latencies(&healthy, &warm, "warm-7601").await?;
    let solo = send_paced(&cluster, &[7601], "solo").await?;
    let (solo_p50, solo_p99) = latencies(&healthy, &solo, "solo-7601").await?;
    println!("healthy alone: p50 {solo_p50:.1} ms, p99 {solo_p99:.1} ms");
    let both = send_paced(&cluster, &[7601, 7602], "beside").await?;
    let (p50, p99) = latencies(&healthy, &both, "beside-7601").await?;
    println!(
        "healthy beside the stalled one: p50 {p50:.1} ms, p99 {p99:.1} ms; the stalled receiver got {} requests in all (at most its max.in.flight, 16, open at once; each held until DELIVER_TIMEOUT_MS)",
        stalled.count()
    );
    let ratio = p99 / solo_p99.max(0.001);
    println!(
        "ISOLATION solo_p99_ms={solo_p99:.1} beside_p99_ms={p99:.1} ratio={ratio:.2} target={}",
        if ratio <= 2.0 { "met" } else { "MISSED" }
    );
    drop(cluster);
    drop(nats);
    Ok(())
}
