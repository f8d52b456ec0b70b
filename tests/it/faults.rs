//! Faults: parts of the pipeline crash, restart or go away while events flow, and every event is
//! still delivered at least once. Each case sends a known set of webhooks and checks, at the
//! callback receivers, that every one the ingest acknowledged arrived; duplicates are allowed
//! (at-least-once) and reported in the messages. The services run as real processes (a SIGKILL
//! cannot be simulated in-process): build them first (`cargo build --workspace --bins`, which
//! `make test` does).
//!
//! `cargo test -p integration-tests --test it faults:: -- --nocapture` prints each case's tally.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use integration_tests::procs::*;
use integration_tests::*;
use tokio::net::TcpListener;

/// Generous bound for anything that takes no retry or redelivery.
const WAIT: Duration = Duration::from_secs(20);

fn ids(webhooks: &[Webhook]) -> Vec<String> {
    webhooks.iter().map(|w| w.event_id.clone()).collect()
}

/// Messages delivered to a consumer and not acknowledged yet.
async fn ack_pending(nats_url: &str, stream: &str, consumer: &str) -> u64 {
    let js = jetstream::new(integration_tests::connect(nats_url).await);
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_stream(stream)
        .await
        .expect("stream")
        .get_consumer(consumer)
        .await
        .expect("consumer");
    consumer
        .info()
        .await
        .expect("consumer info")
        .num_ack_pending as u64
}

/// Messages in the dead-letter stream.
async fn dead_letters(nats_url: &str) -> u64 {
    let js = jetstream::new(integration_tests::connect(nats_url).await);
    let mut stream = js
        .get_stream(shared::nats::DEAD_STREAM)
        .await
        .expect("dead-letter stream");
    stream.info().await.expect("stream info").state.messages
}

#[tokio::test]
async fn a_deliverer_killed_mid_stream_and_restarted_loses_nothing() {
    let nats = NatsServer::start().await;
    // A short request timeout keeps the consumer's ack_wait (when a dead replica's messages come
    // back) at 18 s.
    let mut cluster = Cluster::start(&nats.url(), &[("DELIVER_TIMEOUT_MS", "1000")], 1).await;
    // Slow answers keep deliveries in flight: 16 at a time (the per-host limit), ~160/s.
    let receiver = Receiver::start(Behavior::Slow(Duration::from_millis(100))).await;
    cluster.create_instance("4001", &receiver.url(), &[]).await;
    let webhooks = order_webhooks(4001, "kill-deliverer", 200);
    let expected = ids(&webhooks);
    let sent = send_all(&cluster.http, &cluster.webhook_url(), webhooks, 8).await;
    assert_eq!(
        sent.acked.len(),
        200,
        "the ingest took every webhook: {sent:?}"
    );

    receiver.wait_for(40, WAIT).await;
    cluster.deliverers[0].kill().await;
    let at_kill = tally(&[&receiver], &expected);
    assert!(
        at_kill.delivered < expected.len(),
        "the deliverer must die mid-stream, not after the last event: {at_kill}"
    );

    cluster.deliverers[0].spawn();
    cluster.deliverers[0].wait_ready().await;
    // What the dead process held comes back after the consumer's ack_wait (18 s).
    let done = wait_delivered(&[&receiver], &expected, Duration::from_secs(50), || {
        cluster.logs()
    })
    .await;
    eprintln!("deliverer SIGKILL: at the kill {at_kill}; in the end {done}");
    assert_eq!(done.delivered, 200, "{done}");
}

#[tokio::test]
async fn two_replicas_of_each_worker_share_the_work_and_lose_nothing() {
    let nats = NatsServer::start().await;
    // Small batches and a slow receiver: one replica alone cannot take every message.
    let cluster = Cluster::start(
        &nats.url(),
        &[
            ("NORMALIZER_CONCURRENCY", "2"),
            ("DELIVER_MAX_IN_FLIGHT", "4"),
            ("DELIVER_MAX_IN_FLIGHT_PER_HOST", "4"),
        ],
        2,
    )
    .await;
    let receiver = Receiver::start(Behavior::Slow(Duration::from_millis(10))).await;
    cluster.create_instance("4002", &receiver.url(), &[]).await;
    let webhooks = order_webhooks(4002, "replicas", 200);
    let expected = ids(&webhooks);
    let sent = send_all(&cluster.http, &cluster.webhook_url(), webhooks, 8).await;
    assert_eq!(
        sent.acked.len(),
        200,
        "the ingest took every webhook: {sent:?}"
    );

    let done = wait_delivered(&[&receiver], &expected, Duration::from_secs(40), || {
        cluster.logs()
    })
    .await;

    // The receiver counts a request when it arrives, a deliverer when the answer is back: wait
    // until the deliverers' counters have caught up with what the receiver saw.
    let counts = |procs: &'static str| {
        let cluster = &cluster;
        async move {
            let (list, name, labels): (&Vec<ServiceProc>, &str, &[(&str, &str)]) = match procs {
                "normalizer" => (
                    &cluster.normalizers,
                    "ecwid_normalizer_messages_total",
                    &[("outcome", "normalized")],
                ),
                _ => (
                    &cluster.deliverers,
                    "ecwid_deliver_attempts_total",
                    &[("outcome", "success"), ("status_class", "2xx")],
                ),
            };
            let mut out = Vec::new();
            for p in list {
                out.push(sample_sum(&p.metrics().await, name, labels));
            }
            out
        }
    };
    wait_until(WAIT, "the workers' counters to reach 200", || async {
        counts("normalizer").await.iter().sum::<f64>() >= 200.0
            && counts("deliverer").await.iter().sum::<f64>() >= 200.0
    })
    .await;
    let normalized = counts("normalizer").await;
    let delivered = counts("deliverer").await;
    eprintln!(
        "two replicas: {done}; normalized per replica {normalized:?}, delivered {delivered:?}"
    );
    assert!(
        normalized.iter().all(|n| *n > 0.0),
        "each normalizer replica normalized some events: {normalized:?}"
    );
    assert!(
        delivered.iter().all(|n| *n > 0.0),
        "each deliverer replica delivered some events: {delivered:?}"
    );
    assert!(
        normalized.iter().sum::<f64>() >= 200.0,
        "every raw event was normalized: {normalized:?}"
    );
    assert!(
        delivered.iter().sum::<f64>() >= 200.0,
        "every envelope was delivered: {delivered:?}"
    );
}

#[tokio::test]
async fn nats_killed_mid_stream_and_restarted_loses_nothing_acknowledged() {
    let mut nats = NatsServer::start().await;
    // A short publish timeout: refusals (503) come fast while NATS is gone. Slow answers, 4 at a
    // time: ~40 deliveries/s, so NATS dies while they are under way.
    let cluster = Cluster::start(
        &nats.url(),
        &[
            ("INGEST_PUBLISH_TIMEOUT_MS", "300"),
            ("DELIVER_MAX_IN_FLIGHT_PER_HOST", "4"),
        ],
        1,
    )
    .await;
    let receiver = Receiver::start(Behavior::Slow(Duration::from_millis(100))).await;
    cluster.create_instance("4003", &receiver.url(), &[]).await;
    let url = cluster.webhook_url();

    let before = order_webhooks(4003, "nats-before", 100);
    let during = order_webhooks(4003, "nats-during", 100);
    let expected: Vec<String> = ids(&before).into_iter().chain(ids(&during)).collect();

    let sent = send_all(&cluster.http, &url, before, 8).await;
    assert_eq!(sent.acked.len(), 100, "NATS is up: {sent:?}");
    // Deliveries are still under way when NATS dies.
    nats.kill();
    let at_kill = tally(&[&receiver], &expected);
    assert!(
        at_kill.delivered < 100,
        "NATS must die mid-stream, not after the last delivery: {at_kill}"
    );

    let refused = send_all(&cluster.http, &url, during, 8).await;
    assert_eq!(
        refused.count("503"),
        100,
        "with NATS gone, every webhook is refused with 503 (Ecwid retries those): {:?}",
        refused.outcomes
    );

    nats.restart().await;
    // As Ecwid would: send the refused ones again until they are taken.
    let resent = resend_until_accepted(&cluster.http, &url, refused.refused, WAIT).await;
    let done = wait_delivered(&[&receiver], &expected, Duration::from_secs(50), || {
        cluster.logs()
    })
    .await;
    eprintln!(
        "NATS SIGKILL: at the kill {at_kill}; refused during the outage {:?}; \
         resends {:?}; in the end {done}",
        refused.outcomes, resent.outcomes
    );
    assert_eq!(done.delivered, 200, "{done}");
}

#[tokio::test]
async fn a_callback_receiver_down_for_a_while_gets_everything_within_the_retry_schedule() {
    let nats = NatsServer::start().await;
    let schedule = "250ms,500ms,1s,2s,4s,4s";
    let schedule_total = Duration::from_millis(250 + 500 + 1000 + 2000 + 4000 + 4000);
    let cluster = Cluster::start(&nats.url(), &[("DELIVER_RETRY_SCHEDULE", schedule)], 1).await;
    let first = Receiver::start(Behavior::Status(200)).await;
    cluster.create_instance("4004", &first.url(), &[]).await;
    let url = cluster.webhook_url();

    let early = order_webhooks(4004, "receiver-early", 50);
    let late = order_webhooks(4004, "receiver-late", 150);
    let expected: Vec<String> = ids(&early).into_iter().chain(ids(&late)).collect();
    let sent = send_all(&cluster.http, &url, early.clone(), 8).await;
    assert_eq!(sent.acked.len(), 50, "{sent:?}");
    wait_delivered(&[&first], &ids(&early), WAIT, || cluster.logs()).await;

    // The receiver goes away: its port refuses connections.
    first.cancel.cancel();
    let addr = first.addr;
    wait_until(WAIT, "the receiver's port to close", || async move {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    let sent = send_all(&cluster.http, &url, late, 8).await;
    assert_eq!(sent.acked.len(), 150, "{sent:?}");
    // Down for a while: until the deliverer has seen attempts fail.
    let deliverer = &cluster.deliverers[0];
    wait_until(WAIT, "failed delivery attempts", || async move {
        let text = deliverer.metrics().await;
        sample_sum(
            &text,
            "ecwid_deliver_attempts_total",
            &[("outcome", "failure")],
        ) >= 10.0
    })
    .await;

    // Back on the same port.
    let listener = wait_for(
        WAIT,
        || format!("{addr} to be free to bind again"),
        || async {
            TcpListener::bind(addr)
                .await
                .inspect_err(|e| tracing::debug!(%e, "port not free yet"))
                .ok()
        },
    )
    .await;
    let back_at = Instant::now();
    let second = Receiver::serve(listener, Behavior::Status(200)).await;
    let done = wait_delivered(
        &[&first, &second],
        &expected,
        schedule_total + Duration::from_secs(10),
        || cluster.logs(),
    )
    .await;
    eprintln!(
        "receiver down: everything back {:?} after the receiver; {done}",
        back_at.elapsed()
    );
    assert_eq!(done.delivered, 200, "{done}");
    assert_eq!(
        dead_letters(&nats.url()).await,
        0,
        "no event ran out of attempts"
    );
}

#[tokio::test]
async fn a_normalizer_restarted_with_messages_in_flight_loses_nothing() {
    let nats = NatsServer::start().await;
    // A short publish timeout keeps the consumer's ack_wait (when a dead replica's messages come
    // back) at 21 s.
    let mut cluster =
        Cluster::start(&nats.url(), &[("NORMALIZER_PUBLISH_TIMEOUT_MS", "500")], 1).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    cluster.create_instance("4005", &receiver.url(), &[]).await;
    let url = cluster.webhook_url();
    let first = order_webhooks(4005, "normalizer-first", 100);
    let second = order_webhooks(4005, "normalizer-second", 100);
    let expected: Vec<String> = ids(&first).into_iter().chain(ids(&second)).collect();

    let sent = send_all(&cluster.http, &url, first, 8).await;
    assert_eq!(sent.acked.len(), 100, "{sent:?}");
    // Freeze it mid-stream: the server keeps handing it messages it will never finish.
    cluster.normalizers[0].pause();
    let sent = send_all(&cluster.http, &url, second, 8).await;
    assert_eq!(sent.acked.len(), 100, "{sent:?}");
    let nats_url = nats.url();
    wait_until(
        WAIT,
        "the normalizer to hold unacknowledged messages",
        || {
            let nats_url = nats_url.clone();
            async move {
                ack_pending(
                    &nats_url,
                    shared::nats::RAW_STREAM,
                    shared::nats::NORMALIZER_CONSUMER,
                )
                .await
                    > 0
            }
        },
    )
    .await;
    let in_flight = ack_pending(
        &nats_url,
        shared::nats::RAW_STREAM,
        shared::nats::NORMALIZER_CONSUMER,
    )
    .await;

    cluster.normalizers[0].restart().await;
    let done = wait_delivered(&[&receiver], &expected, Duration::from_secs(50), || {
        cluster.logs()
    })
    .await;
    eprintln!("normalizer SIGKILL with {in_flight} messages in flight: {done}");
    assert_eq!(done.delivered, 200, "{done}");
}

#[tokio::test]
async fn workers_started_on_a_backlog_lose_nothing() {
    let nats = NatsServer::start().await;
    let mut cluster = Cluster::start(&nats.url(), &[], 1).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    cluster.create_instance("4006", &receiver.url(), &[]).await;
    // Other stores' instances: loading the directory at start-up takes a while, as in production.
    for store in 10_000..10_200 {
        let body = serde_json::json!({"element": {"key": "ecwid"}, "name": "other", "configuration": {
            "ecwid.store.id": store.to_string(), "event.notification.enabled": "true",
            "event.notification.callback.url": receiver.url()}});
        let (status, created) = cluster
            .admin_request(reqwest::Method::POST, "/instances", Some(body))
            .await;
        assert_eq!(status, 201, "{created}");
    }
    cluster.wait_instances_seen().await;
    // Both workers stopped: what the ingest takes waits in ECWID_RAW.
    cluster.normalizers[0].kill().await;
    cluster.deliverers[0].kill().await;
    let webhooks = order_webhooks(4006, "backlog", 300);
    let expected = ids(&webhooks);
    let sent = send_all(&cluster.http, &cluster.webhook_url(), webhooks, 8).await;
    assert_eq!(sent.acked.len(), 300, "{sent:?}");

    // Started again, each must know the instances before it handles the first message.
    for p in cluster
        .normalizers
        .iter_mut()
        .chain(cluster.deliverers.iter_mut())
    {
        p.spawn();
    }
    for p in cluster
        .normalizers
        .iter_mut()
        .chain(cluster.deliverers.iter_mut())
    {
        p.wait_ready().await;
    }
    // Fails fast: a dead letter means an event was given up.
    let nats_url = nats.url();
    let receivers = [&receiver];
    wait_until(WAIT, "every event delivered or one dead-lettered", || {
        let nats_url = nats_url.clone();
        let expected = &expected;
        async move {
            tally(&receivers, expected).missing_count == 0 || dead_letters(&nats_url).await > 0
        }
    })
    .await;
    assert_eq!(
        dead_letters(&nats_url).await,
        0,
        "events dead-lettered by a worker that had not loaded its instances yet:\n{}",
        cluster.logs()
    );
    let done = tally(&receivers, &expected);
    assert_eq!(done.delivered, 300, "{done}");
    eprintln!("workers started on a backlog: {done}");
}
