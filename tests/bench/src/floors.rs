//! The floors the pipeline is made of, each measured in its own process (the bench re-executes
//! itself with a subcommand) so that it has a runtime of its own, as a service does:
//! (a) `floor-ingest`: a bare axum endpoint that publishes the body to JetStream and awaits the
//!     ack; the bench loads it exactly as it loads the ingest;
//! (b) `floor-consume`: a bare JetStream pull consumer that acks every message of a pre-filled
//!     stream;
//! (c) `floor-post`: bare reqwest POSTs to a bare axum receiver (in the bench process, like the
//!     callback receivers).
//!
//! The (b) and (c) processes print their own CPU seconds, so the bench can add up what one event
//! costs the machine at the floors.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer::pull, stream};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use futures::StreamExt;
use serde_json::json;

pub(crate) const FLOOR_A_STREAM: &str = "BENCH_FLOOR_A";
pub(crate) const FLOOR_B_STREAM: &str = "BENCH_FLOOR_B";
pub(crate) const NO_ACK_STREAM: &str = "BENCH_NO_ACK";

/// A work stream as the pipeline's are: file storage, limits retention.
fn stream_config(name: &str, subject: &str) -> stream::Config {
    stream::Config {
        name: name.to_owned(),
        subjects: vec![subject.to_owned()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        ..Default::default()
    }
}

/// CPU seconds this process used so far.
fn own_cpu() -> f64 {
    crate::procinfo::read(std::process::id())
        .map(|u| u.cpu_secs)
        .unwrap_or(f64::NAN)
}

/// `bench floor-ingest <listen> <nats-url>`: serves `POST /events/ecwid` until killed.
pub(crate) async fn floor_ingest(listen: SocketAddr, nats_url: &str) -> anyhow::Result<()> {
    let client = async_nats::connect(nats_url).await?;
    let js = jetstream::new(client);
    js.get_or_create_stream(stream_config(FLOOR_A_STREAM, "bench.a.>"))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let app = Router::new()
        .route(
            "/events/ecwid",
            post(
                |State(js): State<jetstream::Context>, body: Bytes| async move {
                    match js.publish("bench.a.1", body).await {
                        Ok(ack) => match ack.await {
                            Ok(_) => StatusCode::OK,
                            Err(_) => StatusCode::SERVICE_UNAVAILABLE,
                        },
                        Err(_) => StatusCode::SERVICE_UNAVAILABLE,
                    }
                },
            ),
        )
        .with_state(js);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

/// Publishes `count` messages of `size` bytes to floor (b)'s stream, `in_flight` acks
/// outstanding; returns messages per second.
pub(crate) async fn fill_floor_b(
    nats_url: &str,
    count: u64,
    size: usize,
    in_flight: usize,
) -> anyhow::Result<f64> {
    let js = jetstream::new(async_nats::connect(nats_url).await?);
    js.get_or_create_stream(stream_config(FLOOR_B_STREAM, "bench.b.>"))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let payload = Bytes::from(vec![b'x'; size]);
    let started = Instant::now();
    publish_acked(&js, "bench.b.1", &payload, count, in_flight).await?;
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// Publishes `payload` `count` times to `subject` with `in_flight` acks outstanding, and waits
/// for the last ack.
async fn publish_acked(
    js: &jetstream::Context,
    subject: &'static str,
    payload: &Bytes,
    count: u64,
    in_flight: usize,
) -> anyhow::Result<()> {
    let mut pending = futures::stream::FuturesUnordered::new();
    for _ in 0..count {
        if pending.len() >= in_flight {
            if let Some(r) = pending.next().await {
                r?;
            }
        }
        let ack = js
            .publish(subject, payload.clone())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        pending.push(async move { ack.await.map_err(|e| anyhow::anyhow!("{e}")) });
    }
    while let Some(r) = pending.next().await {
        r?;
    }
    Ok(())
}

/// The stream [`store_messages`] writes to, created if missing.
pub(crate) async fn no_ack_stream(client: &async_nats::Client) -> anyhow::Result<stream::Stream> {
    jetstream::new(client.clone())
        .get_or_create_stream(stream_config(NO_ACK_STREAM, "bench.n.>"))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Stores `count` messages of `size` bytes in `stream` ([`no_ack_stream`]), with acks (256 in
/// flight, as the publish floor) or without (plain publishes, no reply subject: nats-server
/// stores them and answers nothing), and waits until the stream holds them all. Returns messages
/// per second.
pub(crate) async fn store_messages(
    client: &async_nats::Client,
    stream: &mut stream::Stream,
    acked: bool,
    count: u64,
    size: usize,
) -> anyhow::Result<f64> {
    let js = jetstream::new(client.clone());
    let held_before = held(stream).await?;
    let payload = Bytes::from(vec![b'x'; size]);
    let started = Instant::now();
    if acked {
        publish_acked(&js, "bench.n.1", &payload, count, 256).await?;
    } else {
        for _ in 0..count {
            client.publish("bench.n.1", payload.clone()).await?;
        }
        client.flush().await?;
    }
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        let held = held(stream).await?;
        if held >= held_before + count {
            return Ok(count as f64 / started.elapsed().as_secs_f64());
        }
        anyhow::ensure!(
            Instant::now() < give_up,
            "{NO_ACK_STREAM} took {} of {count} messages",
            held - held_before
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How many messages `stream` holds.
async fn held(stream: &mut stream::Stream) -> anyhow::Result<u64> {
    Ok(stream
        .info()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .state
        .messages)
}

/// `bench floor-consume <nats-url> <count>`: consumes and acks `count` messages of floor (b)'s
/// stream with a durable pull consumer (batches of 256, as the workers pull); prints
/// `{"count":…, "secs":…}`.
pub(crate) async fn floor_consume(nats_url: &str, count: u64) -> anyhow::Result<()> {
    let js = jetstream::new(async_nats::connect(nats_url).await?);
    let stream = js
        .get_stream(FLOOR_B_STREAM)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let consumer = stream
        .get_or_create_consumer(
            "floor",
            pull::Config {
                durable_name: Some("floor".into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                max_ack_pending: 20_000,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(256)
        .messages()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let started = Instant::now();
    let mut n = 0;
    while n < count {
        let message = messages
            .next()
            .await
            .context("the pull subscription ended")?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        message.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        n += 1;
    }
    println!(
        "{}",
        json!({"count": n, "secs": started.elapsed().as_secs_f64(), "cpu_secs": own_cpu()})
    );
    Ok(())
}

/// `bench floor-post <url> <secs> <connections> <size>`: POSTs `size`-byte JSON bodies with one
/// reqwest client (as the deliverer's: rustls, no redirects), `connections` at a time, for `secs`;
/// prints `{"count":…, "secs":…, "p50_ms":…, "p99_ms":…}`.
pub(crate) async fn floor_post(
    url: &str,
    secs: f64,
    connections: usize,
    size: usize,
) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(15))
        .build()?;
    let body = Bytes::from(format!(
        "{{\"pad\":\"{}\"}}",
        "x".repeat(size.saturating_sub(10))
    ));
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let (client, url, body) = (client.clone(), url.to_owned(), body.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < end {
                    let t = Instant::now();
                    let ok = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success());
                    if ok {
                        latencies.push(t.elapsed().as_micros() as u32);
                    }
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    println!(
        "{}",
        json!({
            "count": all.len(),
            "secs": elapsed,
            "p50_ms": crate::track::quantile_ms(&all, 0.5),
            "p99_ms": crate::track::quantile_ms(&all, 0.99),
            "cpu_secs": own_cpu(),
        })
    );
    Ok(())
}
