//! Regression tests for the classes of defects an adversarial pass found, each against a real
//! nats-server and the real services: values that reach NATS headers, unsigned ION posts around a
//! client secret, bodies the normalizer could not parse, client mistakes answered as 5xx or as
//! text, colliding ION ids, slow clients, credentials in callback URLs, and future-dated events.

use std::time::Duration;

use async_nats::jetstream;
use integration_tests::*;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(15);

async fn raw_count(nats: &NatsServer) -> u64 {
    jetstream::new(nats.client().await)
        .get_stream("ECWID_RAW")
        .await
        .expect("ECWID_RAW")
        .info()
        .await
        .expect("info")
        .state
        .messages
}

/// Posts `body` as JSON; the status and the JSON body (asserting the body is JSON).
async fn post_raw(pipeline: &Pipeline, content_type: &str, body: Vec<u8>) -> (u16, Value) {
    let resp = pipeline
        .http
        .post(pipeline.webhook_url())
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("the ingest answers");
    json_answer(resp).await
}

/// The status and JSON body of an answer, asserting it is JSON.
async fn json_answer(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let text = resp.text().await.unwrap_or_default();
    assert!(
        ct.starts_with("application/json"),
        "{status} answered as {ct:?}: {text}"
    );
    let body: Value = serde_json::from_str(&text).expect("a JSON body");
    assert!(body["error"].is_string() || status < 400, "{body}");
    (status, body)
}

#[tokio::test]
async fn values_bound_for_nats_headers_are_refused_naming_the_field() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    pipeline.create_instance("8001", &receiver.url(), &[]).await;

    // A CR/LF inside eventId once reached the Nats-Msg-Id header, async-nats panicked, and the
    // connection closed without an answer.
    for event_id in ["a\r\nb", "a\nNats-Msg-Id: x", "tab\tin", "\u{0}"] {
        let mut event = order_created(8001, "x");
        event["eventId"] = json!(event_id);
        let (status, body) = post_raw(
            &pipeline,
            "application/json",
            event.to_string().into_bytes(),
        )
        .await;
        assert_eq!(status, 400, "{event_id:?}: {body}");
        assert!(
            body["message"].as_str().unwrap().contains("eventId"),
            "{body}"
        );
    }
    // Repeated members: the ingest and the normalizer once read different ones.
    for repeated in [
        r#"{"eventId":"d-1","eventCreated":1,"storeId":8001,"eventType":"order.created","entityId":1,"entityId":2}"#,
        r#"{"eventId":"d-2","eventCreated":1,"storeId":8001,"eventType":"order.created","data":{},"data":{"orderId":"X"}}"#,
        r#"{"eventId":"d-3","eventCreated":1,"storeId":8001,"storeId":9999,"eventType":"order.created"}"#,
    ] {
        let (status, body) = post_raw(&pipeline, "application/json", repeated.into()).await;
        assert_eq!(status, 400, "{body}");
        let field = ["entityId", "data", "storeId"]
            .into_iter()
            .find(|f| repeated.matches(&format!("\"{f}\"")).count() == 2)
            .unwrap();
        assert!(
            body["message"].as_str().unwrap().contains(field),
            "{body} should name {field}"
        );
    }
    assert_eq!(raw_count(&nats).await, 0, "nothing refused was stored");
    let metrics = pipeline.metrics_text(pipeline.admin).await;
    assert_eq!(
        metric(
            &metrics,
            "ecwid_ingest_requests_total{format=\"v3\",outcome=\"invalid\"}"
        ),
        Some(7.0),
        "every refusal was answered and counted"
    );
    assert_eq!(metric(&metrics, "ecwid_http_panics_total"), Some(0.0));
    // The service still answers.
    let (status, _) = pipeline.post_json(&order_created(8001, "ok-1"), None).await;
    assert_eq!(status, 200);
    receiver.wait_for(1, WAIT).await;
    pipeline.stop().await;
}

#[tokio::test]
async fn unsigned_ion_posts_do_not_get_around_a_client_secret() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    let secret = "store-8002-client-secret";
    let id = pipeline
        .create_instance("8002", &receiver.url(), &[("ecwid.client.secret", secret)])
        .await;
    let form = "owner_id=8002&event_type=new_order&order_id=77&date=2026-11-22+10%3A15%3A00";
    let post_form = |body: &'static str| {
        let http = pipeline.http.clone();
        let url = pipeline.webhook_url();
        async move {
            let resp = http
                .post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body)
                .send()
                .await
                .unwrap();
            json_answer(resp).await
        }
    };
    let (status, body) = post_form(form).await;
    assert_eq!(
        status, 401,
        "a forged ION post for a store with a secret: {body}"
    );
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("ecwid.ion.unsigned.allowed"));
    assert_eq!(raw_count(&nats).await, 0);

    // The instance opts in: the notification is taken, and the envelope says it is unverified.
    let (status, body) = pipeline
        .admin_request(
            Method::PATCH,
            &format!("/instances/{id}"),
            Some(json!({"configuration": {"ecwid.ion.unsigned.allowed": "true"}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    pipeline.wait_instances_seen().await;
    let (status, body) = post_form(form).await;
    assert_eq!(status, 200, "{body}");
    let got = receiver.wait_for(1, WAIT).await;
    let message = &got[0].json()["message"];
    assert_eq!(message["verified"], false);
    assert_eq!(message["events"][0]["objectId"], "77");

    // A signed webhook of the same store is marked verified.
    let event = order_created(8002, "signed-1");
    let (status, _) = pipeline
        .post_json(&event, Some(&ecwid_signature(secret, &event)))
        .await;
    assert_eq!(status, 200);
    let got = receiver.wait_for(2, WAIT).await;
    assert_eq!(got[1].json()["message"]["verified"], true);
    pipeline.stop().await;
}

#[tokio::test]
async fn client_mistakes_are_4xx_json_without_internal_text() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    let id = pipeline.create_instance("8003", &receiver.url(), &[]).await;
    let admin = |method: Method, path: &str| {
        pipeline
            .http
            .request(method, pipeline.admin_url(path))
            .bearer_auth(ADMIN_TOKEN)
    };
    let mut cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        // Path and query parse failures.
        (admin(Method::GET, "/dead-letters/abc"), 400, "invalid_path"),
        (
            admin(Method::GET, "/dead-letters?after=x"),
            400,
            "invalid_query",
        ),
        (
            admin(Method::GET, "/dead-letters?limit=-1"),
            400,
            "invalid_query",
        ),
        (
            admin(Method::GET, "/dead-letters?after=18446744073709551615"),
            400,
            "invalid_query",
        ),
        // Sequence 0: JetStream answers it with an internal error text.
        (admin(Method::GET, "/dead-letters/0"), 404, "not_found"),
        (admin(Method::DELETE, "/dead-letters/0"), 404, "not_found"),
        (
            admin(Method::POST, "/dead-letters/replay").json(&json!({"seq": 0})),
            422,
            "invalid_field",
        ),
        // An id no instance can have: refused before any store sees it.
        (
            admin(Method::GET, &format!("/instances/{}", "a".repeat(5000))),
            400,
            "invalid_path",
        ),
        (
            admin(Method::PATCH, &format!("/instances/{}", "b".repeat(5000)))
                .json(&json!({"name": "x"})),
            400,
            "invalid_path",
        ),
        // A body over the admin limit, and a field over its own.
        (
            admin(Method::PATCH, &format!("/instances/{id}"))
                .json(&json!({"name": "n".repeat(1_000_000)})),
            413,
            "too_large",
        ),
        (
            admin(Method::PATCH, &format!("/instances/{id}"))
                .json(&json!({"name": "n".repeat(300)})),
            422,
            "invalid_field",
        ),
        (
            admin(Method::POST, "/instances")
                .header("content-type", "application/json")
                .body("{\"configuration\": 5}"),
            422,
            "invalid_field",
        ),
    ];
    // The webhook listener too: a body over INGEST_MAX_BODY_BYTES.
    cases.push((
        pipeline
            .http
            .post(pipeline.webhook_url())
            .header("content-type", "application/json")
            .body(vec![b' '; 300_000]),
        413,
        "too_large",
    ));
    for (request, status, code) in cases {
        let request = request.build().unwrap();
        let what = format!(
            "{} {}",
            request.method(),
            &request.url().as_str()[..80.min(request.url().as_str().len())]
        );
        let (got, body) = json_answer(pipeline.http.execute(request).await.unwrap()).await;
        assert_eq!(got, status, "{what}: {body}");
        assert_eq!(body["error"], code, "{what}: {body}");
        let text = body.to_string();
        assert!(
            !text.contains("JetStream") && !text.contains("code 400"),
            "{what} leaks internal text: {text}"
        );
    }
    pipeline.stop().await;
}

#[tokio::test]
async fn ion_ids_cannot_collide_and_padding_is_one_notification() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    pipeline.create_instance("7001", &receiver.url(), &[]).await;
    let pipeline = &pipeline;
    let post = |body: &'static str| async move {
        post_raw(
            pipeline,
            "application/x-www-form-urlencoded",
            body.as_bytes().to_vec(),
        )
        .await
    };
    // A crafted post whose fields, joined with NULs (the old id's separator), read exactly like
    // another, real one: `z1\0a\0z2\0b\0` either way.
    let crafted = "owner_id=7001&event_type=new_order&order_id=5&z1=a%00z2%00b";
    let real = "owner_id=7001&event_type=new_order&order_id=5&z1=a&z2=b";
    let (status, body) = post(crafted).await;
    assert_eq!(
        (status, body["duplicate"].as_bool()),
        (200, Some(false)),
        "{body}"
    );
    let (status, body) = post(real).await;
    assert_eq!(
        (status, body["duplicate"].as_bool()),
        (200, Some(false)),
        "the real notification must be stored, not answered as a duplicate: {body}"
    );
    // White space around a value is what Ecwid would consider the same notification.
    let (status, body) = post("owner_id=7001&event_type=order_status_change&order_id=6").await;
    assert_eq!((status, body["duplicate"].as_bool()), (200, Some(false)));
    let (status, body) =
        post("owner_id=%207001%20&event_type=order_status_change&order_id=%206").await;
    assert_eq!(
        (status, body["duplicate"].as_bool()),
        (200, Some(true)),
        "{body}"
    );
    // A control character in a field the pipeline reads is refused, naming it.
    let (status, body) = post("owner_id=7001&event_type=new_order&order_id=5%00").await;
    assert_eq!(status, 400);
    assert!(
        body["message"].as_str().unwrap().contains("order_id"),
        "{body}"
    );
    assert_eq!(raw_count(&nats).await, 3);
    receiver.wait_for(3, WAIT).await;
}

#[tokio::test]
async fn slow_clients_are_cut_off_and_connections_are_capped() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(
        &nats.url(),
        &[
            ("INGEST_HEADER_TIMEOUT_MS", "1000"),
            ("INGEST_BODY_TIMEOUT_MS", "1000"),
            ("INGEST_MAX_CONNECTIONS", "4"),
        ],
    )
    .await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    pipeline.create_instance("8005", &receiver.url(), &[]).await;

    // Slowloris: every slot taken by a client sending one header byte at a time.
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(pipeline.webhook).await.unwrap();
        s.write_all(b"POST /events/ecwid HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        slow.push(s);
    }
    let trickle = tokio::spawn(async move {
        // Each stays open as long as the server lets it, sending a byte every 200 ms; the
        // server must close every one of them (read returns 0 or an error).
        let mut closed = 0;
        for mut s in slow {
            let mut buf = [0u8; 256];
            let ended = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    if s.write_all(b"X").await.is_err() {
                        return;
                    }
                    tokio::select! {
                        r = s.read(&mut buf) => if matches!(r, Ok(0) | Err(_)) { return },
                        () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
            })
            .await;
            if ended.is_ok() {
                closed += 1;
            }
        }
        closed
    });
    // A real webhook waits for a slot, then is answered: the cap holds the line, the header
    // timeout frees it.
    let (status, _) = pipeline
        .post_json(&order_created(8005, "after-slowloris"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        trickle.await.unwrap(),
        4,
        "every slow connection was closed"
    );

    // A body that never completes: 408 as JSON, nothing stored.
    let mut s = TcpStream::connect(pipeline.webhook).await.unwrap();
    s.write_all(
        b"POST /events/ecwid HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"eventId\":",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&answer).contains("request_timeout") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the server answers a stalled body");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("application/json"), "{answer}");
    assert_eq!(raw_count(&nats).await, 1);
    pipeline.stop().await;
}

#[tokio::test]
async fn credentials_in_callback_urls_never_come_back() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    let url = format!(
        "http://hookuser:hookpass@127.0.0.1:{}/hook?token=tok3n&v=2",
        receiver.addr.port()
    );
    let id = pipeline.create_instance("8006", &url, &[]).await;
    let leaks = |v: &Value| {
        let text = v.to_string();
        text.contains("hookpass") || text.contains("tok3n") || text.contains("hookuser")
    };
    let (_, shown) = pipeline
        .admin_request(Method::GET, &format!("/instances/{id}"), None)
        .await;
    assert!(!leaks(&shown), "{shown}");
    let (_, list) = pipeline
        .admin_request(Method::GET, "/instances", None)
        .await;
    assert!(!leaks(&list), "{list}");
    // Sending the shown URL back keeps the stored one; the callback still gets its credentials.
    let shown_url = shown["configuration"]["event.notification.callback.url"].clone();
    let (status, patched) = pipeline
        .admin_request(
            Method::PATCH,
            &format!("/instances/{id}"),
            Some(json!({"name": "renamed", "configuration": {"event.notification.callback.url": shown_url}})),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    assert!(!leaks(&patched), "{patched}");
    pipeline.wait_instances_seen().await;
    let (status, _) = pipeline
        .post_json(&order_created(8006, "cred-1"), None)
        .await;
    assert_eq!(status, 200);
    let got = receiver.wait_for(1, WAIT).await;
    // reqwest sends the URL's user info as Basic auth: base64("hookuser:hookpass").
    assert_eq!(
        got[0].header("authorization"),
        Some("Basic aG9va3VzZXI6aG9va3Bhc3M=")
    );
    pipeline.stop().await;
}

#[tokio::test]
async fn future_events_are_refused_when_a_maximum_age_is_set() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(
        &nats.url(),
        &[
            ("INGEST_MAX_EVENT_AGE_SECS", "90000"),
            ("INGEST_MAX_CLOCK_SKEW_SECS", "300"),
        ],
    )
    .await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    pipeline.create_instance("8007", &receiver.url(), &[]).await;
    let now = model::time_fmt::now_unix_ms() / 1000;
    let at = |event_id: &str, created: i64| {
        let mut e = order_created(8007, event_id);
        e["eventCreated"] = json!(created);
        e
    };
    let (status, body) = pipeline
        .post_json(&at("far-future", now + 86_400), None)
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "future_event");
    let (status, body) = pipeline.post_json(&at("old", now - 100_000), None).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("stale_event")));
    // Within the skew, and within the age: taken.
    let (status, _) = pipeline.post_json(&at("skewed", now + 60), None).await;
    assert_eq!(status, 200);
    assert_eq!(raw_count(&nats).await, 1);
    pipeline.stop().await;
}

/// A work stream at its configured limit refuses what it cannot store: the ingest answers 503
/// `stream_full` (Ecwid retries), what was accepted before is all delivered, and the usage
/// gauge shows the stream full.
#[tokio::test]
async fn a_stream_at_its_limit_answers_503_and_loses_nothing() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[("STREAM_MAX_MSGS", "ECWID_RAW=5")]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    pipeline.create_instance("7401", &receiver.url(), &[]).await;
    for n in 0..5 {
        let (status, body) = pipeline
            .post_json(&order_created(7401, &format!("full-{n}")), None)
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = pipeline
        .post_json(&order_created(7401, "full-5"), None)
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "stream_full", "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("ECWID_RAW") && m.contains("STREAM_MAX_MSGS")),
        "{body}"
    );
    receiver.wait_for(5, Duration::from_secs(20)).await;
    wait_settled(&nats.url(), Duration::from_secs(20)).await;
    assert_eq!(receiver.count(), 5, "the five accepted events, once each");
    assert_eq!(
        raw_count(&nats).await,
        5,
        "nothing stored past the limit, nothing dropped"
    );
    let p = &pipeline;
    wait_until(
        Duration::from_secs(15),
        "the usage gauge to show the stream full",
        || async move {
            let text = p.metrics_text(p.admin).await;
            metric(&text, "ecwid_stream_usage_ratio{stream=\"ECWID_RAW\"}") == Some(1.0)
                && metric(
                    &text,
                    "ecwid_ingest_requests_total{format=\"v3\",outcome=\"stream_full\"}",
                ) == Some(1.0)
        },
    )
    .await;
    pipeline.stop().await;
}

/// Puts a dead letter of `instance` straight into `ECWID_DEAD`, as the deliverer would.
async fn dead_letter(nats: &NatsServer, instance: &str, n: usize) {
    let js = jetstream::new(nats.client().await);
    let mut h = async_nats::HeaderMap::new();
    h.insert("Ecwid-Original-Subject", format!("ecwid.events.{instance}"));
    h.insert("Ecwid-Dead-Reason", "attempts_exhausted");
    js.publish_with_headers(
        format!("ecwid.dead.deliver.{instance}"),
        h,
        format!("{{\"n\": {n}}}").into(),
    )
    .await
    .expect("publish")
    .await
    .expect("ack");
}

#[tokio::test]
async fn a_bulk_replay_must_name_what_it_replays() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    let id = pipeline.create_instance("8010", &receiver.url(), &[]).await;
    for n in 0..3 {
        dead_letter(&nats, &id, n).await;
    }
    // The letters' sequences (a replayed letter is no envelope, so it is dead-lettered again
    // under a new one).
    let seqs = || async {
        let (status, page) = pipeline
            .admin_request(Method::GET, "/dead-letters", None)
            .await;
        assert_eq!(status, 200, "{page}");
        page["deadLetters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["seq"].as_u64())
            .collect::<Vec<u64>>()
    };
    let before = seqs().await;
    assert_eq!(before.len(), 3);
    let count = || async { seqs().await.len() };

    // An empty list, an empty filter, no body: nothing is replayed or removed.
    for body in [
        Some(json!({"seqs": []})),
        Some(json!({})),
        None,
        Some(json!({"all": false})),
        Some(json!({"seqs": [1], "all": true})),
    ] {
        let (status, answer) = pipeline
            .admin_request(Method::POST, "/dead-letters/replay", body.clone())
            .await;
        assert_eq!(status, 422, "{body:?}: {answer}");
        assert_eq!(answer["error"], "invalid_field", "{answer}");
        assert_eq!(count().await, 3, "{body:?} replayed something");
    }
    // Every one, said explicitly.
    let (status, answer) = pipeline
        .admin_request(
            Method::POST,
            "/dead-letters/replay",
            Some(json!({"all": true})),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["replayed"], json!(before));
    let after = seqs().await;
    assert!(before.iter().all(|s| !after.contains(s)), "{after:?}");

    // The same class elsewhere: a backfill naming no object type.
    let (status, answer) = pipeline
        .admin_request(
            Method::POST,
            &format!("/instances/{id}/backfill"),
            Some(json!({"since": "2026-01-01T00:00:00Z", "until": "2026-01-02T00:00:00Z", "objects": []})),
        )
        .await;
    assert!(status == 422 || status == 400, "{status}: {answer}");
    pipeline.stop().await;
}

#[tokio::test]
async fn ids_too_long_for_nats_are_400_and_webhooks_go_on() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    let id = pipeline.create_instance("8020", &receiver.url(), &[]).await;
    let admin = |method: Method, path: &str| {
        pipeline
            .http
            .request(method, pipeline.admin_url(path))
            .bearer_auth(ADMIN_TOKEN)
    };
    // About 4,000 characters: a NATS request subject built from it passes nats-server's
    // control-line limit, and the server closes the connection it came on.
    let long = "a".repeat(4000);
    let digits = "9".repeat(4000);
    let window = json!({"since": "2026-01-01T00:00:00Z", "until": "2026-01-02T00:00:00Z"});
    let mut cases = vec![
        (Method::GET, format!("/instances/{long}"), None),
        (
            Method::PATCH,
            format!("/instances/{long}"),
            Some(json!({"name": "x"})),
        ),
        (Method::DELETE, format!("/instances/{long}"), None),
        (Method::GET, format!("/instances/{long}/health"), None),
        (Method::POST, format!("/instances/{long}/pause"), None),
        (Method::POST, format!("/instances/{long}/resume"), None),
        (
            Method::POST,
            format!("/instances/{long}/replay"),
            Some(window.clone()),
        ),
        (Method::POST, format!("/instances/{long}/test"), None),
        (
            Method::POST,
            format!("/instances/{long}/backfill"),
            Some(window.clone()),
        ),
        (Method::GET, format!("/instances/{long}/poller"), None),
        (Method::GET, format!("/events/{long}"), None),
        (Method::POST, format!("/events/{long}/redeliver"), None),
        (Method::GET, format!("/dead-letters/{digits}"), None),
        (Method::DELETE, format!("/dead-letters/{digits}"), None),
        // Filters that become part of a subject.
        (Method::GET, format!("/events?instance={long}"), None),
        (Method::GET, format!("/dead-letters?instance={long}"), None),
        (Method::GET, format!("/dead-letters?store={long}"), None),
    ];
    cases.push((Method::GET, format!("/events/{}", "é".repeat(10)), None));
    for (method, path, body) in &cases {
        let mut request = admin(method.clone(), path);
        if let Some(body) = body {
            request = request.json(body);
        }
        let (status, answer) = json_answer(request.send().await.expect("an answer")).await;
        let shown: String = path.chars().take(40).collect();
        assert_eq!(status, 400, "{method} {shown}…: {answer}");
        assert!(
            answer["message"].as_str().is_some_and(|m| m.len() < 300),
            "{answer}"
        );
    }

    // A burst of them beside a burst of webhooks: every webhook is stored (200), none 503.
    let reads = (0..200).map(|n| {
        let path = if n % 2 == 0 {
            format!("/events/{long}")
        } else {
            format!("/events/{long}/redeliver")
        };
        let method = if n % 2 == 0 {
            Method::GET
        } else {
            Method::POST
        };
        let request = admin(method, &path);
        async move { request.send().await.map(|r| r.status().as_u16()) }
    });
    let hooks = (0..300).map(|n| {
        let event = order_created(8020, &format!("burst-{n}"));
        let pipeline = &pipeline;
        async move { pipeline.post_json(&event, None).await.0 }
    });
    let (reads, hooks) = tokio::join!(
        futures::future::join_all(reads),
        futures::future::join_all(hooks)
    );
    assert!(reads.iter().all(|r| matches!(r, Ok(400))), "{reads:?}");
    let refused: Vec<_> = hooks.iter().filter(|s| **s != 200).collect();
    assert!(refused.is_empty(), "webhooks not stored: {refused:?}");
    // And the admin API still reads: its connection was never closed either.
    let (status, _) = pipeline
        .admin_request(Method::GET, &format!("/instances/{id}"), None)
        .await;
    assert_eq!(status, 200);
    receiver.wait_for(300, WAIT).await;
    pipeline.stop().await;
}

#[tokio::test]
async fn lists_share_one_paging_rule_and_the_bearer_scheme_has_any_case() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    for path in [
        "/dead-letters?limit=0",
        "/dead-letters?limit=501",
        "/events?limit=0",
        "/events?limit=501",
    ] {
        let (status, body) = pipeline.admin_request(Method::GET, path, None).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"], "invalid_query", "{path}: {body}");
    }
    for path in ["/dead-letters?limit=500", "/events?limit=500"] {
        assert_eq!(pipeline.admin_request(Method::GET, path, None).await.0, 200);
    }
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let resp = pipeline
            .http
            .get(pipeline.admin_url("/whoami"))
            .header("authorization", format!("{scheme} {ADMIN_TOKEN}"))
            .send()
            .await
            .expect("an answer");
        let (status, body) = json_answer(resp).await;
        assert_eq!(
            (status, body["role"].as_str()),
            (200, Some("admin")),
            "{scheme}"
        );
    }
    pipeline.stop().await;
}

#[tokio::test]
async fn integer_ids_beyond_f64_stay_exact_in_object_id() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    pipeline.create_instance("8030", &receiver.url(), &[]).await;
    let huge = format!("1{}", "0".repeat(40));
    // The id written as a JSON number, exactly as Ecwid would send a product id.
    let body = format!(
        r#"{{"eventId":"huge-id","eventCreated":1764000000,"storeId":8030,"entityId":{huge},"eventType":"product.updated"}}"#
    );
    let (status, answer) = post_raw(&pipeline, "application/json", body.into_bytes()).await;
    assert_eq!(status, 200, "{answer}");
    let got = receiver.wait_for(1, WAIT).await;
    assert_eq!(
        got[0].json()["message"]["events"][0]["objectId"],
        json!(huge)
    );
    pipeline.stop().await;
}

/// Sends `request` on a fresh connection to `addr` (while reading: the server may answer before
/// it has read everything) and returns the whole answer the server wrote before closing.
async fn raw_exchange(addr: std::net::SocketAddr, request: Vec<u8>) -> String {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut read, mut write) = stream.into_split();
    // A write the server cut short (it answered and closed) is expected here. The write half
    // stays open until the answer is read, as a client's does: a half-close right after a big
    // head can reach hyper before it parsed the head, and it then closes without an answer.
    let writer = tokio::spawn(async move {
        let written = write.write_all(&request).await;
        std::future::pending::<()>().await;
        (written, write)
    });
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 4096];
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the server answers and closes the connection");
    writer.abort();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn requests_too_broken_for_any_router_get_json_errors_on_every_listener() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let huge_header = [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Huge: ".as_slice(),
        &vec![b'a'; 2048 * 1024],
        b"\r\n\r\n",
    ]
    .concat();
    let many_headers = (0..120).fold(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n".to_vec(),
        |mut r, i| {
            r.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
            r
        },
    );
    let many_headers = [many_headers.as_slice(), b"\r\n"].concat();
    let huge_uri = [
        b"GET /".as_slice(),
        &vec![b'a'; 70 * 1024],
        b" HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
    .concat();
    let cases: &[(&str, &[u8], u16, &str)] = &[
        (
            "a huge header",
            &huge_header,
            431,
            "request_header_too_large",
        ),
        (
            "120 headers",
            &many_headers,
            431,
            "request_header_too_large",
        ),
        ("a huge URI", &huge_uri, 414, "uri_too_long"),
        (
            "a garbage request line",
            b"this is not http\r\n\r\n",
            400,
            "bad_request",
        ),
        (
            "a bad header line",
            b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
            400,
            "bad_request",
        ),
    ];
    // Each with a well-formed request it answers itself, to show the listener still serves.
    let listeners = [
        ("webhook", pipeline.webhook, "/events/ecwid", 405),
        ("admin", pipeline.admin, "/healthz", 200),
        ("normalizer ops", pipeline.normalizer_ops, "/healthz", 200),
        ("deliverer ops", pipeline.deliverer_ops, "/healthz", 200),
    ];
    for (listener, addr, path, sane_status) in listeners {
        for (what, request, status, error) in cases {
            let answer = raw_exchange(addr, request.to_vec()).await;
            let context = format!("{what} on the {listener} listener: {answer:.300}");
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status} ")),
                "{context}"
            );
            let (head, body) = answer.split_once("\r\n\r\n").expect(&context);
            assert!(
                head.to_ascii_lowercase()
                    .contains("content-type: application/json"),
                "{context}"
            );
            let body: Value = serde_json::from_str(body).expect(&context);
            assert_eq!(body["error"], *error, "{context}");
            assert!(
                body["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{context}"
            );
        }
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let answer = raw_exchange(addr, request.into_bytes()).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {sane_status} ")),
            "GET {path} on the {listener} listener: {answer:.300}"
        );
        // A path no router has is a JSON 404 on every listener, the workers' ops ones included
        // (the admin listener asks for its token first: a 401, JSON too).
        let (status, error) = if listener == "admin" {
            (401, "unauthorized")
        } else {
            (404, "not_found")
        };
        let request = "GET /no-such-path HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        let answer = raw_exchange(addr, request.as_bytes().to_vec()).await;
        let context = format!("an unknown path on the {listener} listener: {answer:.300}");
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{context}"
        );
        let (_, body) = answer.split_once("\r\n\r\n").expect(&context);
        let body: Value = serde_json::from_str(body).expect(&context);
        assert_eq!(body["error"], error, "{context}");
    }
    // A method the path does not take is a JSON 405 on the listeners that serve /healthz.
    for (listener, addr) in [
        ("admin", pipeline.admin),
        ("normalizer ops", pipeline.normalizer_ops),
        ("deliverer ops", pipeline.deliverer_ops),
    ] {
        let request = "DELETE /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        let answer = raw_exchange(addr, request.as_bytes().to_vec()).await;
        let context = format!("DELETE /healthz on the {listener} listener: {answer:.300}");
        assert!(answer.starts_with("HTTP/1.1 405 "), "{context}");
        let (_, body) = answer.split_once("\r\n\r\n").expect(&context);
        let body: Value = serde_json::from_str(body).expect(&context);
        assert_eq!(body["error"], "method_not_allowed", "{context}");
    }
    pipeline.stop().await;
}
