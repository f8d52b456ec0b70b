//! Instance control against a real nats-server, the real services and two deliverer replicas (the
//! in-process one and a process): pause holds events with no attempt spent and resume delivers
//! them; the breaker and failure counts are one state every replica shares, surviving a
//! restart; an instance failing for `DELIVER_DISABLE_AFTER` is disabled and resumed; the
//! health answers what happened.

use std::time::Duration;

use integration_tests::procs::{process_env, Service, ServiceProc};
use integration_tests::*;
use reqwest::Method;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

async fn health(pipeline: &Pipeline, id: &str) -> Value {
    let (status, body) = pipeline
        .admin_request(Method::GET, &format!("/instances/{id}/health"), None)
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn wait_health(
    pipeline: &Pipeline,
    id: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let check = &check;
    wait_until(WAIT, what, || async move {
        let h = health(pipeline, id).await;
        let ok = check(&h);
        if !ok {
            tracing::debug!(%h, "The health does not say it yet.");
        }
        ok
    })
    .await;
    health(pipeline, id).await
}

async fn send(pipeline: &Pipeline, store: u64, event_id: &str) {
    let (status, body) = pipeline
        .post_json(&order_created(store, event_id), None)
        .await;
    assert_eq!(status, 200, "{body}");
}

/// The event log records of instance `id`.
async fn records(pipeline: &Pipeline, id: &str) -> Vec<Value> {
    let (status, body) = pipeline
        .admin_request(
            Method::GET,
            &format!("/events?instance={id}&limit=500"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["events"].as_array().cloned().unwrap_or_default()
}

async fn second_deliverer(nats: &NatsServer, env: &[(&str, &str)]) -> ServiceProc {
    ServiceProc::start(Service::Deliverer, process_env(&nats.url(), env)).await
}

#[tokio::test]
async fn pause_holds_events_without_attempts_and_resume_delivers_them() {
    let nats = NatsServer::start().await;
    let mut pipeline = Pipeline::start(&nats.url(), &[]).await;
    let other = second_deliverer(&nats, &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    let id = pipeline.create_instance("7301", &receiver.url(), &[]).await;

    let (status, paused) = pipeline
        .admin_request(Method::POST, &format!("/instances/{id}/pause"), None)
        .await;
    assert_eq!(status, 200, "{paused}");
    assert_eq!(paused["state"], "paused");
    assert_eq!(paused["held"], 0);
    for n in 0..10 {
        send(&pipeline, 7301, &format!("paused-{n}")).await;
    }
    let h = wait_health(&pipeline, &id, "10 events held", |h| h["held"] == 10).await;
    assert_eq!(h["state"], "paused");
    assert_eq!(h["backlog"], 10, "{h}");
    assert_eq!(h["retrying"], 0);
    // Held means moved aside: nothing waits in the deliverer's consumer, so nothing is put back
    // again and again while the instance is paused.
    wait_settled(&nats.url(), WAIT).await;

    // The pause survives a deliverer restart; events arriving after it are held too.
    pipeline.stop_deliverer().await;
    pipeline.start_deliverer().await;
    for n in 10..15 {
        send(&pipeline, 7301, &format!("paused-{n}")).await;
    }
    wait_health(&pipeline, &id, "15 events held", |h| h["held"] == 15).await;
    assert_eq!(receiver.count(), 0, "a paused instance gets nothing");
    // The normalizer writes the records of an envelope after publishing it, so the deliverer
    // may hold one before its record is written.
    let (pipeline_ref, id_ref) = (&pipeline, &id);
    wait_until(WAIT, "the 15 records written", || async move {
        records(pipeline_ref, id_ref).await.len() == 15
    })
    .await;
    let held = records(&pipeline, &id).await;
    assert_eq!(held.len(), 15);
    assert!(
        held.iter().all(|r| r["attempts"] == 0),
        "holding spends no attempt: {held:?}"
    );
    let (_, listed) = pipeline
        .admin_request(Method::GET, "/instances", None)
        .await;
    assert_eq!(listed["instances"][0]["state"], "paused", "{listed}");
    for ops in [pipeline.deliverer_ops, other.ops] {
        let ops = &ops;
        let pipeline = &pipeline;
        wait_until(
            WAIT,
            "every replica to count the paused instance",
            || async move {
                let text = pipeline.metrics_text(*ops).await;
                metric(&text, "ecwid_instances{state=\"paused\"}") == Some(1.0)
            },
        )
        .await;
    }

    let (status, resumed) = pipeline
        .admin_request(Method::POST, &format!("/instances/{id}/resume"), None)
        .await;
    assert_eq!(status, 200, "{resumed}");
    assert_eq!(resumed["state"], "active");
    let got = receiver.wait_for(15, WAIT).await;
    wait_settled(&nats.url(), WAIT).await;
    let mut ids: Vec<String> = got
        .iter()
        .map(|r| {
            r.json()["message"]["raw"]["eventId"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 15, "each held event delivered once: {ids:?}");
    let h = wait_health(&pipeline, &id, "the hold empty", |h| h["held"] == 0).await;
    assert_eq!(h["state"], "active");
    assert_eq!(h["backlog"], 0);
    let delivered = records(&pipeline, &id).await;
    assert!(
        delivered
            .iter()
            .all(|r| r["status"] == "delivered" && r["attempts"] == 1),
        "one attempt each, numbered from 1: {delivered:?}"
    );
    // Pausing an unknown instance is a 404 in JSON.
    let (status, body) = pipeline
        .admin_request(Method::POST, "/instances/nope/pause", None)
        .await;
    assert_eq!(
        (status, body["error"].as_str().is_some()),
        (404, true),
        "{body}"
    );
    pipeline.stop().await;
}

#[tokio::test]
async fn the_breaker_is_one_state_shared_by_replicas_and_survives_a_restart() {
    let nats = NatsServer::start().await;
    let settings = [
        ("DELIVER_BREAKER_FAILURES", "3"),
        ("DELIVER_BREAKER_COOLDOWN_MS", "8000"),
        ("DELIVER_RETRY_SCHEDULE", "100ms,100ms,100ms,100ms"),
    ];
    let mut pipeline = Pipeline::start(&nats.url(), &settings).await;
    let other = second_deliverer(&nats, &settings).await;
    let receiver = Receiver::start(Behavior::Status(503)).await;
    let id = pipeline.create_instance("7302", &receiver.url(), &[]).await;

    // One event: its attempts go to whichever replica the server hands the retry to, and the
    // third failure, counted across both, opens the breaker.
    send(&pipeline, 7302, "breaker-1").await;
    let h = wait_health(&pipeline, &id, "the breaker to open", |h| {
        h["breaker"] == "open"
    })
    .await;
    assert_eq!(h["consecutiveFailures"], 3, "{h}");
    assert_eq!(h["lastError"], "HTTP 503", "{h}");
    assert!(
        h["lastFailureAt"].is_string() && h["lastSuccessAt"].is_null(),
        "{h}"
    );
    assert_eq!(h["retrying"], 1, "{h}");
    assert_eq!(h["successRate1h"], 0.0, "{h}");
    for ops in [pipeline.deliverer_ops, other.ops] {
        let (ops, pipeline) = (&ops, &pipeline);
        wait_until(
            WAIT,
            "every replica to see the open breaker",
            || async move {
                let text = pipeline.metrics_text(*ops).await;
                metric(&text, "ecwid_deliver_breakers_open") == Some(1.0)
            },
        )
        .await;
    }
    // A restarted replica learns it from the bucket, not from failures of its own.
    pipeline.stop_deliverer().await;
    pipeline.start_deliverer().await;
    wait_until(
        WAIT,
        "the restarted replica to see the open breaker",
        || async {
            let text = pipeline.metrics_text(pipeline.deliverer_ops).await;
            metric(&text, "ecwid_deliver_breakers_open") == Some(1.0)
        },
    )
    .await;
    // While it is open, new events wait without an attempt.
    send(&pipeline, 7302, "breaker-2").await;
    send(&pipeline, 7302, "breaker-3").await;
    let h = health(&pipeline, &id).await;
    assert_eq!(h["breaker"], "open", "still within the cool-down: {h}");
    assert_eq!(
        receiver.count(),
        3,
        "three attempts opened it; nothing went since"
    );

    // The receiver recovers; after the cool-down one probe goes, closes it, and the rest follow.
    receiver.set_behavior(Behavior::Status(200));
    receiver.wait_for(6, WAIT).await;
    wait_settled(&nats.url(), WAIT).await;
    let h = wait_health(&pipeline, &id, "the success counts written", |h| {
        h["successRate1h"] == 0.5
    })
    .await;
    assert_eq!(h["breaker"], "closed", "{h}");
    assert_eq!(h["consecutiveFailures"], 0);
    assert!(h["lastSuccessAt"].is_string(), "{h}");
    assert_eq!(
        (
            h["retrying"].as_u64(),
            h["backlog"].as_u64(),
            h["dead"].as_u64()
        ),
        (Some(0), Some(0), Some(0)),
        "{h}"
    );
    let mut attempts: Vec<u64> = records(&pipeline, &id)
        .await
        .iter()
        .map(|r| r["attempts"].as_u64().unwrap_or(0))
        .collect();
    attempts.sort_unstable();
    assert_eq!(attempts, [1, 1, 4], "deferrals are not attempts");
    pipeline.stop().await;
}

/// Subjects of stream `name` (nats-server keeps each in memory).
async fn subjects_of(nats_url: &str, name: &str) -> u64 {
    let js = async_nats::jetstream::new(connect(nats_url).await);
    let mut stream = js.get_stream(name).await.expect("the stream");
    stream.info().await.expect("its info").state.subjects_count
}

#[tokio::test]
async fn retrying_envelopes_are_counted_on_two_subjects_however_many_fail() {
    let nats = NatsServer::start().await;
    // No breaker within the test, so that every envelope spends its first attempt and waits.
    let settings = [
        ("DELIVER_BREAKER_FAILURES", "1000"),
        ("DELIVER_RETRY_SCHEDULE", "1s,1s,1s,1s,1s,1s,1s,1s,1s,1s"),
    ];
    let pipeline = Pipeline::start(&nats.url(), &settings).await;
    let receiver = Receiver::start(Behavior::Status(503)).await;
    let id = pipeline.create_instance("7305", &receiver.url(), &[]).await;
    const N: usize = 30;
    for i in 0..N {
        send(&pipeline, 7305, &format!("retrying-{i}")).await;
    }
    let h = wait_health(&pipeline, &id, "every envelope counted as retrying", |h| {
        h["retrying"] == N
    })
    .await;
    assert_eq!(h["dead"], 0, "{h}");
    // Two subjects (`.in`, `.out`) for the instance, not one per envelope.
    let subjects = subjects_of(&nats.url(), shared::nats::RETRYING_STREAM).await;
    assert!(subjects <= 2, "{subjects} subjects in ECWID_RETRYING");
    // Webhook sightings are no longer a bucket with a key per entity.
    let js = async_nats::jetstream::new(connect(&nats.url()).await);
    assert!(
        js.get_stream("KV_ECWID_POLL_SEEN").await.is_err(),
        "no sightings bucket"
    );

    receiver.set_behavior(Behavior::Status(200));
    let (pipeline_ref, id_ref) = (&pipeline, &id);
    wait_until(WAIT, "every envelope delivered in the end", || async move {
        records(pipeline_ref, id_ref)
            .await
            .iter()
            .filter(|r| r["status"] == "delivered")
            .count()
            == N
    })
    .await;
    let h = wait_health(&pipeline, &id, "nothing retrying once delivered", |h| {
        h["retrying"] == 0
    })
    .await;
    assert_eq!(
        (h["backlog"].as_u64(), h["dead"].as_u64()),
        (Some(0), Some(0)),
        "{h}"
    );
    assert!(subjects_of(&nats.url(), shared::nats::RETRYING_STREAM).await <= 2);
    pipeline.stop().await;
}

#[tokio::test]
async fn an_instance_failing_for_too_long_is_disabled_and_resumed() {
    let nats = NatsServer::start().await;
    let settings = [
        ("DELIVER_DISABLE_AFTER", "2s"),
        ("DELIVER_BREAKER_FAILURES", "1000"),
        ("DELIVER_RETRY_SCHEDULE", "300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms"),
    ];
    let pipeline = Pipeline::start(&nats.url(), &settings).await;
    let other = second_deliverer(&nats, &settings).await;
    let receiver = Receiver::start(Behavior::Status(500)).await;
    let id = pipeline.create_instance("7303", &receiver.url(), &[]).await;
    send(&pipeline, 7303, "disable-1").await;
    let h = wait_health(&pipeline, &id, "the instance disabled", |h| {
        h["state"] == "disabled"
    })
    .await;
    assert!(
        h["reason"].as_str().is_some_and(|r| r.contains("HTTP 500")),
        "the reason names the failure: {h}"
    );
    let h = wait_health(&pipeline, &id, "its event held", |h| h["held"] == 1).await;
    assert_eq!(h["retrying"], 0, "held, not retrying: {h}");
    let tried = receiver.count();
    assert!(tried >= 3, "failing for 2 s at 300 ms waits: {tried}");
    let (ops, p) = (&other.ops, &pipeline);
    wait_until(WAIT, "the disabled state in the metrics", || async move {
        let text = p.metrics_text(*ops).await;
        metric(&text, "ecwid_instances{state=\"disabled\"}") == Some(1.0)
            && metric(&text, "ecwid_instances{state=\"active\"}") == Some(0.0)
    })
    .await;
    let transitions = pipeline.metrics_text(pipeline.deliverer_ops).await;
    let other_transitions = pipeline.metrics_text(other.ops).await;
    let disabled =
        |t: &str| metric(t, "ecwid_instance_transitions_total{to=\"disabled\"}").unwrap_or(0.0);
    assert_eq!(
        disabled(&transitions) + disabled(&other_transitions),
        1.0,
        "one replica disabled it"
    );

    receiver.set_behavior(Behavior::Status(200));
    let (status, resumed) = pipeline
        .admin_request(Method::POST, &format!("/instances/{id}/resume"), None)
        .await;
    assert_eq!(
        (status, &resumed["state"]),
        (200, &Value::from("active")),
        "{resumed}"
    );
    receiver.wait_for(tried + 1, WAIT).await;
    wait_settled(&nats.url(), WAIT).await;
    let record = &records(&pipeline, &id).await[0];
    assert_eq!(record["status"], "delivered", "{record}");
    assert_eq!(
        record["attempts"].as_u64(),
        Some(tried as u64 + 1),
        "attempts numbered on after the hold: {record}"
    );
    let h = health(&pipeline, &id).await;
    assert_eq!(
        (h["state"].as_str(), h["held"].as_u64()),
        (Some("active"), Some(0)),
        "{h}"
    );
    pipeline.stop().await;
}

#[tokio::test]
async fn a_paused_ordered_instance_keeps_its_lane_in_order_and_resumes_it() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    let id = pipeline
        .create_instance(
            "7304",
            &receiver.url(),
            &[("event.notification.ordered", "true")],
        )
        .await;
    let (status, _) = pipeline
        .admin_request(Method::POST, &format!("/instances/{id}/pause"), None)
        .await;
    assert_eq!(status, 200);
    // Sent one after another: the ingest accepts them in this order.
    let sent: Vec<String> = (0..10).map(|n| format!("lane-{n}")).collect();
    for event_id in &sent {
        send(&pipeline, 7304, event_id).await;
    }
    let h = wait_health(&pipeline, &id, "all 10 waiting in the lane", |h| {
        h["backlog"] == 10
    })
    .await;
    assert_eq!(
        (
            h["ordered"].as_bool(),
            h["held"].as_u64(),
            &h["blockedEvent"]
        ),
        (Some(true), Some(0), &Value::Null),
        "a lane is held by not pulling, not moved aside: {h}"
    );
    assert_eq!(receiver.count(), 0, "a paused instance gets nothing");

    let (status, _) = pipeline
        .admin_request(Method::POST, &format!("/instances/{id}/resume"), None)
        .await;
    assert_eq!(status, 200);
    let got: Vec<String> = receiver
        .wait_for(10, WAIT)
        .await
        .iter()
        .map(|r| {
            r.json()["message"]["raw"]["eventId"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(got, sent, "delivered after the resume, in acceptance order");
    pipeline.stop().await;
}

/// A burst of results for one URL from one replica (a receiver going down under 200 requests in
/// flight): every failure lands in the shared health, however many arrive at once, when the
/// cool-down ends exactly one request takes the probe, and only that request can give it back.
/// Before a replica wrote one change per URL at a time, its own requests raced each other's
/// compare-and-set out of tries; the changes that lost stayed in that replica's memory, each of
/// those requests took the probe, and a probe whose result was lost held the URL's events until
/// its lease ran out.
#[tokio::test]
async fn a_burst_of_results_lands_whole_and_one_request_takes_the_probe() {
    use deliverer::health::{Admitted, Callbacks};
    use model::health::{Breaker, CallbackHealth};

    const BURST: usize = 200;
    let nats = NatsServer::start().await;
    let js = async_nats::jetstream::new(nats.client().await);
    let kv = shared::topology::ensure_bucket(
        &js,
        shared::topology::Bucket {
            name: shared::nats::CALLBACKS_BUCKET,
            description: "test",
            history: 1,
            max_age: Duration::ZERO,
        },
        1,
        &Default::default(),
    )
    .await
    .expect("callbacks bucket");
    let cooldown = Duration::from_millis(300);
    let replica = || {
        std::sync::Arc::new(Callbacks::new(
            kv.clone(),
            5,
            cooldown,
            Duration::from_secs(60),
            prometheus::IntGauge::new("open", "open").unwrap(),
            prometheus::IntCounterVec::new(prometheus::Opts::new("moves", "moves"), &["to"])
                .unwrap(),
        ))
    };
    let callbacks = replica();
    let cancel = tokio_util::sync::CancellationToken::new();
    callbacks.spawn(cancel.clone());
    let url = "http://127.0.0.1:9/hook";
    let key = model::health::callback_key(url);
    let stored = || async {
        let entry = kv.entry(&key).await.expect("read").expect("an entry");
        serde_json::from_slice::<CallbackHealth>(&entry.value).expect("health")
    };

    let failures = futures::future::join_all(
        (0..BURST).map(|_| callbacks.record(url, Err("connection refused"))),
    )
    .await;
    assert!(failures.iter().all(Option::is_some));
    let health = stored().await;
    assert_eq!(health.consecutive_failures, BURST as u32, "{health:?}");
    let failed: i64 = health.minutes.iter().map(|m| m[2]).sum();
    assert_eq!(failed, BURST as i64, "{health:?}");
    assert_eq!(health.breaker, Breaker::Open, "{health:?}");

    tokio::time::sleep(cooldown + Duration::from_millis(100)).await;
    let admitted = futures::future::join_all((0..BURST).map(|_| callbacks.admit(url))).await;
    let probes = admitted
        .iter()
        .filter(|a| **a == Ok(Admitted::Probe))
        .count();
    assert_eq!(probes, 1, "requests that took the probe");
    assert!(admitted
        .iter()
        .all(|a| a.is_err() || *a == Ok(Admitted::Probe)));
    assert_eq!(stored().await.breaker, Breaker::HalfOpen);

    // Another replica's request that was let through before the breaker opened and then not
    // sent (its host busy) gives back nothing: the probe out is not its own.
    let other = replica();
    other.spawn(cancel.clone());
    other.not_sent(url, Admitted::Request).await;
    let health = stored().await;
    assert!(health.probe_until_ms.is_some(), "{health:?}");
    // The probe itself, not sent, is given back: the next request probes.
    callbacks.not_sent(url, Admitted::Probe).await;
    let health = stored().await;
    assert_eq!(health.probe_until_ms, None, "{health:?}");
    assert_eq!(callbacks.admit(url).await, Ok(Admitted::Probe));

    // The probe went through: the URL is closed for every replica at once.
    callbacks.record(url, Ok(())).await;
    let health = stored().await;
    assert_eq!(health.breaker, Breaker::Closed, "{health:?}");
    assert_eq!(health.consecutive_failures, 0, "{health:?}");
    assert_eq!(callbacks.admit(url).await, Ok(Admitted::Request));
    cancel.cancel();
}
