//! The ingest against a real nats-server: signatures, bad input, duplicates, headers on the raw
//! message, and NATS outages (503, then recovery without a restart).

use std::time::Duration;

use async_nats::jetstream;
use integration_tests::*;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(15);

async fn raw_stream(nats: &NatsServer) -> jetstream::stream::Stream {
    jetstream::new(nats.client().await)
        .get_stream("ECWID_RAW")
        .await
        .expect("ECWID_RAW")
}

async fn raw_count(nats: &NatsServer) -> u64 {
    raw_stream(nats)
        .await
        .info()
        .await
        .expect("info")
        .state
        .messages
}

#[tokio::test]
async fn signatures_are_checked_against_every_instance_secret() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    pipeline
        .create_instance(
            "3001",
            &receiver.url(),
            &[("ecwid.client.secret", "first-secret")],
        )
        .await;
    pipeline
        .create_instance(
            "3001",
            &receiver.url(),
            &[("ecwid.client.secret", "second-secret")],
        )
        .await;

    let event = order_created(3001, "signed-1");
    let (status, body) = pipeline.post_json(&event, None).await;
    assert_eq!(status, 401, "missing signature: {body}");
    assert_eq!(body["error"], "unauthorized");

    let mut tampered = ecwid_signature("second-secret", &event);
    tampered.replace_range(0..1, if tampered.starts_with('A') { "B" } else { "A" });
    let (status, _) = pipeline.post_json(&event, Some(&tampered)).await;
    assert_eq!(status, 401, "tampered signature");
    let (status, _) = pipeline
        .post_json(&event, Some(&ecwid_signature("another-secret", &event)))
        .await;
    assert_eq!(status, 401, "wrong secret");
    assert_eq!(raw_count(&nats).await, 0, "nothing refused was stored");

    let (status, body) = pipeline
        .post_json(&event, Some(&ecwid_signature("second-secret", &event)))
        .await;
    assert_eq!(status, 200, "{body}");
    let stored = raw_stream(&nats)
        .await
        .get_raw_message(1)
        .await
        .expect("stored");
    assert_eq!(
        stored.headers.get("Ecwid-Verified").map(|v| v.as_str()),
        Some("true")
    );
    // Both instances get it.
    receiver.wait_for(2, WAIT).await;
    let metrics = pipeline.metrics_text(pipeline.admin).await;
    assert_eq!(
        metric(
            &metrics,
            r#"ecwid_ingest_requests_total{format="v3",outcome="unauthorized"}"#
        ),
        Some(3.0)
    );
    pipeline.stop().await;
}

#[tokio::test]
async fn unsigned_stores_are_marked_unverified_or_refused_when_required() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    pipeline.create_instance("3002", &receiver.url(), &[]).await;
    let (status, body) = pipeline.post_json(&order_created(3002, "u-1"), None).await;
    assert_eq!(status, 200, "{body}");
    let request_id = body["requestId"].as_str().expect("requestId").to_owned();

    let stored = raw_stream(&nats)
        .await
        .get_raw_message(1)
        .await
        .expect("stored");
    let h = |name: &str| stored.headers.get(name).map(|v| v.as_str().to_owned());
    assert_eq!(h("Ecwid-Verified").as_deref(), Some("false"));
    assert_eq!(h("Ecwid-Format").as_deref(), Some("v3"));
    assert_eq!(h("Ecwid-Request-Id"), Some(request_id));
    assert_eq!(h("Nats-Msg-Id").as_deref(), Some("v3:3002:u-1"));
    assert!(h("Ecwid-Received-At")
        .and_then(|v| v.parse::<i64>().ok())
        .is_some());
    let traceparent = h("traceparent").expect("traceparent");
    assert_eq!(traceparent.split('-').count(), 4, "{traceparent}");
    assert_eq!(
        stored.payload.as_ref(),
        serde_json::to_vec(&order_created(3002, "u-1"))
            .unwrap()
            .as_slice()
    );
    let metrics = pipeline.metrics_text(pipeline.admin).await;
    assert_eq!(
        metric(&metrics, r#"ecwid_ingest_unverified_total{format="v3"}"#),
        Some(1.0)
    );
    pipeline.stop().await;

    let strict = Pipeline::start(&nats.url(), &[("INGEST_REQUIRE_SIGNATURE", "true")]).await;
    let (status, body) = strict.post_json(&order_created(3002, "u-2"), None).await;
    assert_eq!(status, 401, "{body}");
    assert!(body["message"]
        .as_str()
        .unwrap_or_default()
        .contains("INGEST_REQUIRE_SIGNATURE"));
    strict.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_clear_json_error_and_nothing_is_stored() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[("INGEST_MAX_BODY_BYTES", "2048")]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    pipeline.create_instance("3003", &receiver.url(), &[]).await;
    let url = pipeline.webhook_url();
    let http = &pipeline.http;

    let check = |resp: reqwest::Response, status: u16, code: &'static str| async move {
        assert_eq!(resp.status().as_u16(), status);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"));
        let body: Value = resp.json().await.expect("JSON error body");
        assert_eq!(body["error"], code, "{body}");
        body
    };
    let missing = json!({"eventId": "x", "eventCreated": 1, "eventType": "order.created"});
    let body = check(
        http.post(&url).json(&missing).send().await.unwrap(),
        400,
        "invalid_field",
    )
    .await;
    assert!(body["message"].as_str().unwrap().contains("storeId"));
    let wrong = json!({"eventId": "x", "eventCreated": "yesterday", "storeId": 3003, "eventType": "order.created"});
    let body = check(
        http.post(&url).json(&wrong).send().await.unwrap(),
        400,
        "invalid_field",
    )
    .await;
    assert!(body["message"].as_str().unwrap().contains("eventCreated"));
    check(
        http.post(&url)
            .header("content-type", "application/json")
            .body("{\"eventId\":")
            .send()
            .await
            .unwrap(),
        400,
        "invalid_json",
    )
    .await;
    check(
        http.post(&url)
            .header("content-type", "text/plain")
            .body("hi")
            .send()
            .await
            .unwrap(),
        415,
        "unsupported_media_type",
    )
    .await;
    check(
        http.get(&url).send().await.unwrap(),
        405,
        "method_not_allowed",
    )
    .await;
    check(
        http.post(format!("http://{}/nope", pipeline.webhook))
            .send()
            .await
            .unwrap(),
        404,
        "not_found",
    )
    .await;
    check(
        http.post(&url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body("event_type=new_order&order_id=1")
            .send()
            .await
            .unwrap(),
        400,
        "invalid_field",
    )
    .await;

    // Over the limit with a Content-Length, and chunked without one.
    let big = json!({"eventId": "big", "eventCreated": 1, "storeId": 3003, "eventType": "order.created", "data": {"pad": "x".repeat(4000)}});
    check(
        http.post(&url).json(&big).send().await.unwrap(),
        413,
        "too_large",
    )
    .await;
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..8).map(|_| Ok(vec![b' '; 1024])).collect();
    let stream = futures::stream::iter(chunks);
    let resp = http
        .post(&url)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("content-length").is_none() || resp.status() == 413);
    check(resp, 413, "too_large").await;

    // Unknown store: 404 so Ecwid keeps retrying while the instance is provisioned.
    check(
        http.post(&url)
            .json(&order_created(9999, "x"))
            .send()
            .await
            .unwrap(),
        404,
        "unknown_store",
    )
    .await;

    // The Open Connectors path is an alias.
    let resp = http
        .post(format!(
            "http://{}/elements/api-v2/events/ecwid",
            pipeline.webhook
        ))
        .json(&order_created(3003, "alias-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(raw_count(&nats).await, 1, "only the valid event was stored");
    receiver.wait_for(1, WAIT).await;
    let metrics = pipeline.metrics_text(pipeline.admin).await;
    assert_eq!(
        metric(
            &metrics,
            r#"ecwid_ingest_requests_total{format="v3",outcome="too_large"}"#
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &metrics,
            r#"ecwid_ingest_requests_total{format="v3",outcome="unknown_store"}"#
        ),
        Some(1.0)
    );
    pipeline.stop().await;
}

#[tokio::test]
async fn duplicates_are_acknowledged_and_stored_once() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    pipeline.create_instance("3004", &receiver.url(), &[]).await;
    let event = order_created(3004, "same");
    for expected in [false, true, true] {
        let (status, body) = pipeline.post_json(&event, None).await;
        assert_eq!(status, 200);
        assert_eq!(body["duplicate"], expected, "{body}");
    }
    assert_eq!(raw_count(&nats).await, 1);
    // An ION notification sent twice is a duplicate too; a different one is not.
    let form = "owner_id=3004&event_type=order_status_change&date=2026-11-22+10%3A15%3A00&order_id=42&payment_status=PAID&fulfillment_status=SHIPPED&old_payment_status=PAID&old_fulfillment_status=PROCESSING";
    let post_form = |body: String| {
        pipeline
            .http
            .post(pipeline.webhook_url())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
    };
    let first: Value = post_form(form.to_owned())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let again: Value = post_form(form.to_owned())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let other: Value = post_form(form.replace("SHIPPED", "DELIVERED"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (
            first["duplicate"].clone(),
            again["duplicate"].clone(),
            other["duplicate"].clone()
        ),
        (json!(false), json!(true), json!(false))
    );
    assert_eq!(raw_count(&nats).await, 3);
    receiver.wait_for(3, WAIT).await;
    pipeline.stop().await;
}

#[tokio::test]
async fn stale_events_are_refused_when_a_maximum_age_is_set() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[("INGEST_MAX_EVENT_AGE_SECS", "3600")]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    pipeline.create_instance("3005", &receiver.url(), &[]).await;
    let (status, body) = pipeline.post_json(&order_created(3005, "old"), None).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "stale_event");
    let mut fresh = order_created(3005, "fresh");
    fresh["eventCreated"] = json!(model::time_fmt::now_unix_ms() / 1000);
    assert_eq!(pipeline.post_json(&fresh, None).await.0, 200);
    pipeline.stop().await;
}

#[tokio::test]
async fn nats_outage_answers_503_then_recovers_without_a_restart() {
    let mut nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[("INGEST_PUBLISH_TIMEOUT_MS", "500")]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    pipeline.create_instance("3006", &receiver.url(), &[]).await;
    assert_eq!(
        pipeline
            .post_json(&order_created(3006, "before"), None)
            .await
            .0,
        200
    );

    nats.kill();
    let resp = pipeline
        .http
        .post(pipeline.webhook_url())
        .json(&order_created(3006, "during"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "unavailable");
    let ready = pipeline
        .http
        .get(pipeline.admin_url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);

    nats.restart().await;
    // The same ingest recovers: Ecwid's retry of the refused event is accepted.
    wait_until(
        Duration::from_secs(30),
        "the ingest to recover without a restart",
        || async {
            let (status, _) = pipeline
                .post_json(&order_created(3006, "during"), None)
                .await;
            assert!(
                status == 200 || status == 503,
                "only 200 or 503 while recovering, got {status}"
            );
            status == 200
        },
    )
    .await;
    let ready = pipeline
        .http
        .get(pipeline.admin_url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    // Both arrive. "before" may arrive twice: when NATS went away its delivery could be in
    // flight, its ack lost, and the server then delivers it again (at least once; the receiver
    // tells the copies apart by their webhook id).
    let ids = || -> Vec<Value> {
        receiver
            .received()
            .iter()
            .map(|r| r.json()["message"]["raw"]["eventId"].clone())
            .collect()
    };
    integration_tests::wait_until(Duration::from_secs(30), "both events delivered", || {
        let ids = ids();
        async move { ids.contains(&json!("before")) && ids.contains(&json!("during")) }
    })
    .await;
    let got = ids();
    assert!(
        got.iter()
            .all(|id| *id == json!("before") || *id == json!("during")),
        "{got:?}"
    );
    pipeline.stop().await;
}

#[tokio::test]
async fn every_service_exposes_valid_prometheus_metrics() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    pipeline.create_instance("3007", &receiver.url(), &[]).await;
    assert_eq!(
        pipeline
            .post_json(&order_created(3007, "m-1"), None)
            .await
            .0,
        200
    );
    receiver.wait_for(1, WAIT).await;
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (name, ops) in [
        ("ingest", pipeline.admin),
        ("normalizer", pipeline.normalizer_ops),
        ("deliverer", pipeline.deliverer_ops),
    ] {
        let text = pipeline.metrics_text(ops).await;
        assert!(
            text.contains(&format!("ecwid_build_info{{service=\"{name}\"")),
            "{name}"
        );
        assert_eq!(metric(&text, "ecwid_nats_connected"), Some(1.0), "{name}");
        let path = dir.path().join(format!("{name}.prom"));
        std::fs::write(&path, text).unwrap();
        files.push(path);
    }
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/check-metrics.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .args(&files)
        .output()
        .expect("run check-metrics.sh");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    pipeline.stop().await;
}
