//! The deliverer against real receivers: signatures checked by independent code, retries with
//! growing waits held by the NATS server, 410, dead letters and replay, timeouts, restarts
//! between attempts, the SSRF guard, one dead endpoint not slowing a healthy one, a receiver
//! answering with an endless body, and callback credentials kept out of dead letters.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use integration_tests::*;
use reqwest::Method;
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(20);

async fn dead_letters(pipeline: &Pipeline, query: &str) -> Vec<Value> {
    let (status, body) = pipeline
        .admin_request(Method::GET, &format!("/dead-letters{query}"), None)
        .await;
    assert_eq!(status, 200, "{body}");
    body["deadLetters"].as_array().cloned().unwrap_or_default()
}

async fn wait_dead_letters(pipeline: &Pipeline, query: &str, n: usize) -> Vec<Value> {
    wait_until(WAIT, &format!("{n} dead letters for {query}"), || async {
        dead_letters(pipeline, query).await.len() >= n
    })
    .await;
    dead_letters(pipeline, query).await
}

fn gaps(received: &[Received]) -> Vec<Duration> {
    received.windows(2).map(|w| w[1].at - w[0].at).collect()
}

#[tokio::test]
async fn signatures_verify_with_independent_implementations() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    let whsec = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let old_whsec = "whsec_b2xkIHNlY3JldCBiZWluZyByb3RhdGVkIG91dA==";
    pipeline
        .create_instance(
            "4001",
            &receiver.url(),
            &[
                (
                    "event.notification.signature.key",
                    "MySecretEventSignatureKey",
                ),
                (
                    "event.notification.webhook.secret",
                    &format!("{old_whsec} {whsec}"),
                ),
            ],
        )
        .await;
    assert_eq!(
        pipeline
            .post_json(&order_created(4001, "sig-1"), None)
            .await
            .0,
        200
    );
    let got = receiver.wait_for(1, WAIT).await;
    let r = &got[0];
    let event_id = r.json()["message"]["eventId"].as_str().unwrap().to_owned();
    assert_eq!(r.header("elements-webhook-id"), Some(event_id.as_str()));

    // Open Connectors: sha256=<base64 HMAC-SHA256(key, body)>, computed here with hmac directly.
    let mut mac = Hmac::<Sha256>::new_from_slice(b"MySecretEventSignatureKey").unwrap();
    mac.update(&r.body);
    let expected = format!(
        "sha256={}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    assert_eq!(
        r.header("elements-webhook-signature"),
        Some(expected.as_str())
    );

    // Standard Webhooks: the reference crate accepts it under the new and the old secret.
    assert_eq!(r.header("webhook-id"), Some(event_id.as_str()));
    assert_eq!(r.header("webhook-signature").unwrap().split(' ').count(), 2);
    for secret in [whsec, old_whsec] {
        standardwebhooks::Webhook::new(secret)
            .unwrap()
            .verify(&r.body, &r.headers)
            .unwrap_or_else(|e| {
                panic!("standardwebhooks rejects the signature under {secret}: {e:?}")
            });
    }
    // Secrets never appear in what the receiver got.
    let all = format!("{:?}{}", r.headers, String::from_utf8_lossy(&r.body));
    assert!(!all.contains("MySecretEventSignatureKey") && !all.contains("MfKQ9r8G"));
    pipeline.stop().await;
}

#[tokio::test]
async fn failures_are_retried_with_growing_waits_then_delivered_once() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    // Two failures (a 500 and a 302: redirects are never followed), then success.
    let receiver = Receiver::start(Behavior::Sequence(vec![500, 302])).await;
    pipeline.create_instance("4002", &receiver.url(), &[]).await;
    assert_eq!(
        pipeline
            .post_json(&order_created(4002, "retry-1"), None)
            .await
            .0,
        200
    );
    let got = receiver.wait_for(3, WAIT).await;
    wait_settled(&nats.url(), WAIT).await;
    assert_eq!(receiver.count(), 3, "one success after N+1 = 3 attempts");
    let ids: Vec<_> = got
        .iter()
        .map(|r| r.header("elements-webhook-id").unwrap().to_owned())
        .collect();
    assert!(
        ids.iter().all(|i| *i == ids[0]),
        "every attempt carries the same id"
    );
    // Schedule 200ms, 400ms ±20%: the server held each wait at least that long.
    let g = gaps(&got);
    assert!(g[0] >= Duration::from_millis(150), "first wait {:?}", g[0]);
    assert!(
        g[1] >= Duration::from_millis(300),
        "second wait {:?} grows past the first's longest",
        g[1]
    );
    let metrics = pipeline.metrics_text(pipeline.deliverer_ops).await;
    assert_eq!(metric(&metrics, "ecwid_deliver_retries_total"), Some(2.0));
    assert_eq!(
        metric(
            &metrics,
            r#"ecwid_deliver_attempts_total{outcome="failure",status_class="3xx"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &metrics,
            r#"ecwid_deliver_attempts_total{outcome="success",status_class="2xx"}"#
        ),
        Some(1.0)
    );
    pipeline.stop().await;
}

#[tokio::test]
async fn gone_is_dead_lettered_at_once() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(410)).await;
    let id = pipeline.create_instance("4003", &receiver.url(), &[]).await;
    assert_eq!(
        pipeline
            .post_json(&order_created(4003, "gone-1"), None)
            .await
            .0,
        200
    );
    let letters = wait_dead_letters(&pipeline, &format!("?stage=deliver&instance={id}"), 1).await;
    assert_eq!(receiver.count(), 1, "no retry after 410");
    assert_eq!(letters[0]["reason"], "gone");
    assert_eq!(letters[0]["attempts"], 1);
    assert_eq!(letters[0]["lastStatus"], "410");
    pipeline.stop().await;
}

#[tokio::test]
async fn exhausted_schedule_is_dead_lettered_and_replayed_once() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(503)).await;
    let id = pipeline.create_instance("4004", &receiver.url(), &[]).await;
    assert_eq!(
        pipeline
            .post_json(&order_created(4004, "dead-1"), None)
            .await
            .0,
        200
    );
    let letters = wait_dead_letters(&pipeline, &format!("?stage=deliver&instance={id}"), 1).await;
    assert_eq!(
        receiver.count(),
        4,
        "1 attempt + 3 retries of the test schedule"
    );
    let letter = &letters[0];
    assert_eq!(letter["reason"], "attempts_exhausted");
    assert_eq!(letter["attempts"], 4);
    assert_eq!(letter["lastStatus"], "503");
    assert!(letter["firstAttemptAt"].is_string() && letter["lastAttemptAt"].is_string());
    assert_eq!(letter["originalSubject"], format!("ecwid.events.{id}"));
    let seq = letter["seq"].as_u64().unwrap();
    let (status, full) = pipeline
        .admin_request(Method::GET, &format!("/dead-letters/{seq}"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(full["payload"]["message"]["raw"]["eventId"], "dead-1");
    let metrics = pipeline.metrics_text(pipeline.deliverer_ops).await;
    assert_eq!(
        metric(
            &metrics,
            r#"ecwid_dead_letters_total{reason="attempts_exhausted",stage="deliver"}"#
        ),
        Some(1.0)
    );

    // The receiver is back: replay twice, delivered once.
    receiver.set_behavior(Behavior::Status(200));
    let (status, first) = pipeline
        .admin_request(
            Method::POST,
            "/dead-letters/replay",
            Some(json!({"seq": seq})),
        )
        .await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["replayed"], json!([seq]));
    let (_, second) = pipeline
        .admin_request(
            Method::POST,
            "/dead-letters/replay",
            Some(json!({"seq": seq})),
        )
        .await;
    assert_eq!(second["replayed"], json!([]));
    assert_eq!(second["failed"][0]["error"], "not_found");
    let got = receiver.wait_for(5, WAIT).await;
    wait_settled(&nats.url(), WAIT).await;
    assert_eq!(receiver.count(), 5, "the replay was delivered exactly once");
    assert_eq!(
        got[4].header("elements-webhook-id"),
        got[0].header("elements-webhook-id")
    );
    assert!(
        dead_letters(&pipeline, "").await.is_empty(),
        "the replayed letter is removed"
    );
    pipeline.stop().await;
}

#[tokio::test]
async fn dead_letters_filter_page_and_delete() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(410)).await;
    let a = pipeline.create_instance("4005", &receiver.url(), &[]).await;
    for i in 0..5 {
        assert_eq!(
            pipeline
                .post_json(&order_created(4005, &format!("p-{i}")), None)
                .await
                .0,
            200
        );
    }
    wait_dead_letters(&pipeline, "", 5).await;
    let (_, page) = pipeline
        .admin_request(Method::GET, "/dead-letters?limit=2", None)
        .await;
    assert_eq!(page["deadLetters"].as_array().unwrap().len(), 2);
    let next = page["next"].as_u64().expect("a next cursor");
    let (_, rest) = pipeline
        .admin_request(
            Method::GET,
            &format!("/dead-letters?limit=10&after={next}"),
            None,
        )
        .await;
    assert_eq!(rest["deadLetters"].as_array().unwrap().len(), 3);
    assert!(rest["next"].is_null());
    assert_eq!(dead_letters(&pipeline, "?stage=normalize").await.len(), 0);
    assert_eq!(
        dead_letters(&pipeline, &format!("?instance={a}"))
            .await
            .len(),
        5
    );
    assert_eq!(
        dead_letters(&pipeline, "?until=2000-01-01T00:00:00Z")
            .await
            .len(),
        0
    );
    let (status, body) = pipeline
        .admin_request(Method::GET, "/dead-letters?stage=bogus", None)
        .await;
    assert_eq!(status, 400, "{body}");
    let seq = rest["deadLetters"][0]["seq"].as_u64().unwrap();
    let (status, _) = pipeline
        .admin_request(Method::DELETE, &format!("/dead-letters/{seq}"), None)
        .await;
    assert_eq!(status, 204);
    let (status, _) = pipeline
        .admin_request(Method::DELETE, &format!("/dead-letters/{seq}"), None)
        .await;
    assert_eq!(status, 404);
    assert_eq!(dead_letters(&pipeline, "").await.len(), 4);
    // Replay by filter: all four go back, with the receiver now healthy.
    receiver.set_behavior(Behavior::Status(200));
    let (_, replayed) = pipeline
        .admin_request(
            Method::POST,
            "/dead-letters/replay",
            Some(json!({"stage": "deliver"})),
        )
        .await;
    assert_eq!(
        replayed["replayed"].as_array().unwrap().len(),
        4,
        "{replayed}"
    );
    receiver.wait_for(5 + 4, WAIT).await;
    pipeline.stop().await;
}

#[tokio::test]
async fn a_receiver_slower_than_the_timeout_is_retried() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[("DELIVER_TIMEOUT_MS", "300")]).await;
    let receiver = Receiver::start(Behavior::Slow(Duration::from_secs(2))).await;
    pipeline.create_instance("4006", &receiver.url(), &[]).await;
    assert_eq!(
        pipeline
            .post_json(&order_created(4006, "slow-1"), None)
            .await
            .0,
        200
    );
    receiver.wait_for(1, WAIT).await;
    receiver.set_behavior(Behavior::Status(200));
    let got = receiver.wait_for(2, WAIT).await;
    assert_eq!(
        got[0].header("elements-webhook-id"),
        got[1].header("elements-webhook-id")
    );
    let metrics = pipeline.metrics_text(pipeline.deliverer_ops).await;
    assert_eq!(
        metric(
            &metrics,
            r#"ecwid_deliver_attempts_total{outcome="failure",status_class="timeout"}"#
        ),
        Some(1.0)
    );
    pipeline.stop().await;
}

#[tokio::test]
async fn a_restart_between_attempts_keeps_the_schedule() {
    let nats = NatsServer::start().await;
    // Waits of 1 s then 3 s: after a restart, the third attempt must still wait the *second*
    // entry, which proves the attempt number came from the server's delivery count.
    let mut pipeline =
        Pipeline::start(&nats.url(), &[("DELIVER_RETRY_SCHEDULE", "1s,3s,3s")]).await;
    let receiver = Receiver::start(Behavior::Sequence(vec![500, 500])).await;
    pipeline.create_instance("4007", &receiver.url(), &[]).await;
    assert_eq!(
        pipeline
            .post_json(&order_created(4007, "restart-1"), None)
            .await
            .0,
        200
    );
    receiver.wait_for(1, WAIT).await;
    pipeline.stop_deliverer().await;
    pipeline.start_deliverer().await;
    let got = receiver.wait_for(3, WAIT).await;
    let g = gaps(&got);
    assert!(
        g[0] >= Duration::from_millis(800),
        "the first wait survived the restart: {:?}",
        g[0]
    );
    assert!(
        g[1] >= Duration::from_millis(2400),
        "the second wait is the schedule's second entry: {:?}",
        g[1]
    );
    wait_settled(&nats.url(), WAIT).await;
    assert_eq!(receiver.count(), 3);
    pipeline.stop().await;
}

#[tokio::test]
async fn internal_callback_addresses_are_refused() {
    let nats = NatsServer::start().await;
    // No allow-list: the admin API refuses literal internal addresses with 422.
    let pipeline = Pipeline::start(&nats.url(), &[("DELIVER_ALLOW_NETWORKS", "")]).await;
    for url in [
        "http://127.0.0.1:9000/x",
        "http://10.1.2.3/x",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:9000/x",
        "http://[::ffff:10.0.0.1]/x",
        "http://localhost:9000/x",
    ] {
        let body = json!({"configuration": {"ecwid.store.id": "4008", "event.notification.enabled": "true", "event.notification.callback.url": url}});
        let (status, err) = pipeline
            .admin_request(Method::POST, "/instances", Some(body))
            .await;
        assert_eq!(status, 422, "{url}: {err}");
        assert!(
            err["message"]
                .as_str()
                .unwrap()
                .contains("DELIVER_ALLOW_NETWORKS"),
            "{err}"
        );
    }
    pipeline.stop().await;

    // A name that resolves to loopback passes the admin API (names are checked at connect
    // time) but the deliverer, without an allow-list, refuses to connect: dead letter, no request.
    let pipeline = Pipeline::start_with(&nats.url(), &[], &[("DELIVER_ALLOW_NETWORKS", "")]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    let callback = format!("http://localhost:{}/hook", receiver.addr.port());
    // The ingest allows loopback here, so the instance is accepted.
    let id = pipeline.create_instance("4009", &callback, &[]).await;
    assert_eq!(
        pipeline
            .post_json(&order_created(4009, "ssrf-1"), None)
            .await
            .0,
        200
    );
    let letters = wait_dead_letters(&pipeline, &format!("?instance={id}"), 1).await;
    assert_eq!(letters[0]["reason"], "refused_address");
    assert!(
        letters[0]["error"].as_str().unwrap().contains("loopback"),
        "{}",
        letters[0]
    );
    assert_eq!(
        receiver.count(),
        0,
        "no request reached the internal address"
    );
    pipeline.stop().await;
}

#[tokio::test]
async fn a_hanging_endpoint_does_not_slow_a_healthy_one() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(
        &nats.url(),
        &[
            ("DELIVER_TIMEOUT_MS", "500"),
            ("DELIVER_RETRY_SCHEDULE", "300ms,300ms"),
            ("DELIVER_BREAKER_FAILURES", "3"),
            ("DELIVER_BREAKER_COOLDOWN_MS", "300"),
            ("DELIVER_MAX_IN_FLIGHT_PER_HOST", "4"),
        ],
    )
    .await;
    let healthy = Receiver::start(Behavior::Status(200)).await;
    let hanging = Receiver::start(Behavior::Hang).await;
    pipeline.create_instance("4010", &healthy.url(), &[]).await;
    let dead_id = pipeline.create_instance("4011", &hanging.url(), &[]).await;

    // Alone: the healthy receiver's latency from accepted webhook to delivery.
    let n = 20;
    let alone = deliver_and_time(&pipeline, &healthy, 4010, "alone", n).await;
    // Shared: the same load while every event of store 4011 hangs until the timeout.
    let hanging_events = 8;
    for i in 0..hanging_events {
        assert_eq!(
            pipeline
                .post_json(&order_created(4011, &format!("hang-{i}")), None)
                .await
                .0,
            200
        );
    }
    let shared = deliver_and_time(&pipeline, &healthy, 4010, "shared", n).await;
    let (alone_p50, shared_p50) = (median(alone), median(shared));
    // A loose bound on purpose (the machine is noisy): hanging requests time out after 500 ms
    // each; if they blocked the healthy endpoint its latency would be seconds.
    assert!(
        shared_p50 < (alone_p50 * 10).max(Duration::from_millis(400)),
        "healthy p50 alone {alone_p50:?}, next to a hanging endpoint {shared_p50:?}"
    );
    // Every event for the hanging endpoint ends as a dead letter after its schedule. With the
    // breaker open its attempts go one probe at a time, so this takes a while.
    let query = format!("?instance={dead_id}");
    wait_until(
        Duration::from_secs(50),
        "every hanging event to be dead-lettered",
        || async { dead_letters(&pipeline, &query).await.len() >= hanging_events },
    )
    .await;
    let metrics = pipeline.metrics_text(pipeline.deliverer_ops).await;
    assert!(
        metric(
            &metrics,
            r#"ecwid_deliver_breaker_transitions_total{to="open"}"#
        )
        .unwrap_or(0.0)
            >= 1.0,
        "the breaker opened"
    );
    pipeline.stop().await;
}

/// Sends `n` events to `store` one after another and returns each one's time from the ingest's
/// 200 to the receiver's receipt.
async fn deliver_and_time(
    pipeline: &Pipeline,
    receiver: &Receiver,
    store: u64,
    tag: &str,
    n: usize,
) -> Vec<Duration> {
    let mut latencies = Vec::with_capacity(n);
    for i in 0..n {
        let before = receiver.count();
        let sent = Instant::now();
        assert_eq!(
            pipeline
                .post_json(&order_created(store, &format!("{tag}-{i}")), None)
                .await
                .0,
            200
        );
        let got = receiver.wait_for(before + 1, WAIT).await;
        latencies.push(got[before].at.saturating_duration_since(sent));
    }
    latencies
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// A callback receiver that answers every request 200 with a chunked body that never ends, and
/// counts the requests, the connections the client closed, and the bytes written until then.
#[derive(Debug, Clone)]
struct EndlessReceiver {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    written: Arc<AtomicUsize>,
}

impl EndlessReceiver {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the endless receiver");
        let receiver = Self {
            addr: listener.local_addr().expect("its address"),
            requests: Arc::default(),
            closed: Arc::default(),
            written: Arc::default(),
        };
        let r = receiver.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(r.clone().answer(conn));
            }
        });
        receiver
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.addr.port())
    }

    async fn answer(self, mut conn: tokio::net::TcpStream) {
        let mut head = Vec::new();
        let mut buf = [0u8; 8192];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        self.requests.fetch_add(1, Ordering::SeqCst);
        let chunk = format!("4000\r\n{}\r\n", "z".repeat(0x4000));
        let mut written = 0;
        let endless = async {
            conn.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                .await?;
            loop {
                conn.write_all(chunk.as_bytes()).await?;
                written += chunk.len();
            }
        };
        let _: std::io::Result<()> = endless.await;
        self.written.fetch_add(written, Ordering::SeqCst);
        self.closed.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn an_endless_response_body_is_cut_short_and_the_event_delivered_once() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let endless = EndlessReceiver::start().await;
    let healthy = Receiver::start(Behavior::Status(200)).await;
    pipeline.create_instance("4012", &endless.url(), &[]).await;
    pipeline.create_instance("4013", &healthy.url(), &[]).await;
    assert_eq!(
        pipeline
            .post_json(&order_created(4012, "endless-1"), None)
            .await
            .0,
        200
    );
    wait_until(
        WAIT,
        "the deliverer to hang up on the endless body",
        || async { endless.closed.load(Ordering::SeqCst) >= 1 },
    )
    .await;
    // The deliverer keeps working: the next event, to another receiver, arrives.
    assert_eq!(
        pipeline
            .post_json(&order_created(4013, "after-endless-1"), None)
            .await
            .0,
        200
    );
    healthy.wait_for(1, WAIT).await;
    let success = r#"ecwid_deliver_attempts_total{outcome="success",status_class="2xx"}"#;
    wait_until(WAIT, "both attempts to count as delivered", || async {
        metric(
            &pipeline.metrics_text(pipeline.deliverer_ops).await,
            success,
        ) == Some(2.0)
    })
    .await;
    let metrics = pipeline.metrics_text(pipeline.deliverer_ops).await;
    assert_eq!(metric(&metrics, "ecwid_deliver_retries_total"), Some(0.0));
    assert_eq!(
        endless.requests.load(Ordering::SeqCst),
        1,
        "the endless answer was a 200: delivered once"
    );
    let written = endless.written.load(Ordering::SeqCst);
    assert!(
        written < 16 << 20,
        "the receiver wrote {written} bytes before the deliverer hung up"
    );
    pipeline.stop().await;
}

#[tokio::test]
async fn credentials_in_a_callback_url_stay_out_of_dead_letters() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let closed_port = free_port();
    let callback = format!("http://user:secret@127.0.0.1:{closed_port}/x?token=abc");
    let id = pipeline.create_instance("4014", &callback, &[]).await;
    assert_eq!(
        pipeline
            .post_json(&order_created(4014, "creds-1"), None)
            .await
            .0,
        200
    );
    let letters = wait_dead_letters(&pipeline, &format!("?instance={id}"), 1).await;
    let letter = &letters[0];
    assert_eq!(letter["reason"], "attempts_exhausted", "{letter}");
    let error = letter["error"].as_str().unwrap();
    assert!(
        error.contains("connect"),
        "the error still says what failed: {error}"
    );
    let seq = letter["seq"].as_u64().unwrap();
    let (status, full) = pipeline
        .admin_request(Method::GET, &format!("/dead-letters/{seq}"), None)
        .await;
    assert_eq!(status, 200);
    for part in ["secret", "abc"] {
        assert!(!error.contains(part), "{part} in {error}");
    }
    // The whole letter holds ids in hex, where "abc" may occur by chance: look for the query.
    let full = full.to_string();
    for part in ["secret", "token=abc"] {
        assert!(!full.contains(part), "{part} in {full}");
    }
    pipeline.stop().await;
}

#[tokio::test]
async fn envelopes_of_a_deleted_instance_are_dropped_not_dead_lettered() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    // Failing, so the envelopes wait for their retries when the instance goes.
    let receiver = Receiver::start(Behavior::Status(503)).await;
    let id = pipeline.create_instance("4011", &receiver.url(), &[]).await;
    for n in 0..3 {
        let (status, _) = pipeline
            .post_json(&order_created(4011, &format!("orphan-{n}")), None)
            .await;
        assert_eq!(status, 200);
    }
    wait_until(WAIT, "a first attempt of each", || async {
        receiver.count() >= 3
    })
    .await;
    let (status, _) = pipeline
        .admin_request(Method::DELETE, &format!("/instances/{id}"), None)
        .await;
    assert_eq!(status, 204);
    let dropped = || async {
        metric(
            &pipeline.metrics_text(pipeline.deliverer_ops).await,
            r#"ecwid_deliver_dropped_total{reason="no_instance"}"#,
        )
        .unwrap_or(0.0)
    };
    wait_until(WAIT, "the three envelopes dropped", || async {
        dropped().await >= 3.0
    })
    .await;
    wait_settled(&nats.url(), WAIT).await;
    // Nothing kept that nothing could deliver: no dead letter of the instance.
    assert!(
        dead_letters(&pipeline, &format!("?stage=deliver&instance={id}"))
            .await
            .is_empty(),
        "dead letters of a deleted instance"
    );
    let metrics = pipeline.metrics_text(pipeline.deliverer_ops).await;
    assert_eq!(
        metric(
            &metrics,
            r#"ecwid_dead_letters_total{reason="no_instance",stage="deliver"}"#
        ),
        None
    );
    pipeline.stop().await;
}
