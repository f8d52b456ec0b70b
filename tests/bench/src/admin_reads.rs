//! `bench admin-reads`: admin reads at full speed must not slow the webhooks (hardening, item 7).
//! Webhooks are sent at a fixed rate and each answer timed, first with the admin API quiet, then
//! while six readers search the event log back to back with a filter its index cannot narrow
//! (`eventType` alone: each search walks `EVENT_SEARCH_SCAN_BUDGET` index entries) and read one
//! record by id in between. The webhooks' p50 with the readers must stay within 2 × the quiet
//! p50, and no webhook may be refused (the integration suite asserts only the latter).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use integration_tests::procs::{order_webhooks, post_webhook, Cluster};
use integration_tests::{Behavior, Receiver};

use crate::{Nats, PRODUCTION};

const RATE: f64 = 200.0;
const SECS: f64 = 15.0;
const READERS: usize = 6;

/// Sends `RATE`/s webhooks for `SECS`; each answer's time in ms (sorted) and how many were not 200.
async fn send_timed(cluster: &Cluster, store: u64, prefix: &str) -> (Vec<f64>, usize) {
    let count = (RATE * SECS) as usize;
    let http = reqwest::Client::new();
    let url = cluster.webhook_url();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / RATE));
    let mut tasks = Vec::with_capacity(count);
    for webhook in order_webhooks(store, prefix, count) {
        tick.tick().await;
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let at = Instant::now();
            let status = post_webhook(&http, &url, &webhook).await;
            (
                at.elapsed().as_secs_f64() * 1000.0,
                matches!(status, Ok(200)),
            )
        }));
    }
    let mut ms = Vec::with_capacity(count);
    let mut refused = 0;
    for t in tasks {
        match t.await {
            Ok((elapsed, true)) => ms.push(elapsed),
            _ => refused += 1,
        }
    }
    ms.sort_by(f64::total_cmp);
    (ms, refused)
}

fn quantile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub(crate) async fn run() -> anyhow::Result<()> {
    let nats = Nats::start().await?;
    let cluster = Cluster::start(&nats.url(), PRODUCTION, 1).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    cluster.create_instance("7701", &receiver.url(), &[]).await;
    println!("## Admin reads beside the webhooks ({RATE}/s for {SECS} s, {READERS} readers)");
    // Warm, and a log to search.
    send_timed(&cluster, 7701, "warm").await;
    let (quiet, quiet_refused) = send_timed(&cluster, 7701, "quiet").await;
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let http = reqwest::Client::new();
    let admin = cluster.ingest.ops;
    let readers: Vec<_> = (0..READERS)
        .map(|_| {
            let (stop, reads, http) = (Arc::clone(&stop), Arc::clone(&reads), http.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    for path in ["/events?eventType=zzz&limit=500", "/events/no-such-event"] {
                        let _ = integration_tests::admin_request(
                            &http,
                            admin,
                            reqwest::Method::GET,
                            path,
                            None,
                        )
                        .await;
                        reads.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let (loaded, loaded_refused) = send_timed(&cluster, 7701, "loaded").await;
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        let _ = r.await;
    }
    let (q50, q99) = (quantile(&quiet, 0.5), quantile(&quiet, 0.99));
    let (l50, l99) = (quantile(&loaded, 0.5), quantile(&loaded, 0.99));
    println!("webhooks quiet: p50 {q50:.2} ms, p99 {q99:.2} ms, {quiet_refused} not 200");
    println!(
        "webhooks beside the readers: p50 {l50:.2} ms, p99 {l99:.2} ms, {loaded_refused} not 200; {} admin reads",
        reads.load(Ordering::Relaxed)
    );
    let ratio = l50 / q50.max(0.001);
    println!(
        "ADMIN_READS quiet_p50_ms={q50:.2} loaded_p50_ms={l50:.2} ratio={ratio:.2} refused={} target={}",
        quiet_refused + loaded_refused,
        if ratio <= 2.0 && quiet_refused + loaded_refused == 0 {
            "met"
        } else {
            "MISSED"
        }
    );
    drop(cluster);
    drop(nats);
    Ok(())
}
