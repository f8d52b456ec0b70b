//! The event log against a real nats-server and the real services: every envelope gets a record
//! with its attempts, raw-stage outcomes are found by Ecwid event id, every search filter works
//! alone and combined with paging, and events can be redelivered, replayed and tested.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream;
use integration_tests::*;
use reqwest::Method;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

/// `GET /events?{query}`: the page's events and its `next`.
async fn search(pipeline: &Pipeline, query: &str) -> (Vec<Value>, Option<u64>) {
    let (status, body) = pipeline
        .admin_request(Method::GET, &format!("/events?{query}"), None)
        .await;
    assert_eq!(status, 200, "{query}: {body}");
    (
        body["events"].as_array().cloned().unwrap_or_default(),
        body["next"].as_u64(),
    )
}

/// Every event matching `query`, following `next` with pages of `limit`.
async fn search_all(pipeline: &Pipeline, query: &str, limit: usize) -> Vec<Value> {
    let mut all = Vec::new();
    let mut after: Option<u64> = None;
    for _ in 0..100 {
        let page_query = match after {
            Some(a) => format!("{query}&limit={limit}&after={a}"),
            None => format!("{query}&limit={limit}"),
        };
        let (events, next) = search(pipeline, &page_query).await;
        assert!(events.len() <= limit);
        all.extend(events);
        match next {
            Some(n) => after = Some(n),
            None => return all,
        }
    }
    panic!("paging did not end");
}

fn ecwid_ids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["ecwidEventId"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn webhook(
    store: u64,
    event_id: &str,
    event_type: &str,
    entity: u64,
    order: Option<&str>,
) -> Value {
    let mut v = json!({"eventId": event_id, "eventCreated": 1_764_000_000, "storeId": store,
                       "entityId": entity, "eventType": event_type});
    if let Some(o) = order {
        v["data"] = json!({"orderId": o});
    }
    v
}

/// Waits until `GET /events?{query}` finds `n` events.
async fn wait_found(pipeline: &Pipeline, query: &str, n: usize) -> Vec<Value> {
    wait_until(WAIT, &format!("{n} events for {query}"), || async {
        search(pipeline, &format!("{query}&limit=500"))
            .await
            .0
            .len()
            >= n
    })
    .await;
    search(pipeline, &format!("{query}&limit=500")).await.0
}

#[tokio::test]
async fn every_filter_alone_and_combined_and_pages_newest_first() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    let a = pipeline.create_instance("9201", &receiver.url(), &[]).await;
    let b = pipeline
        .create_instance("9201", &receiver.url(), &[("event.objects", "orders")])
        .await;
    let c = pipeline.create_instance("9202", &receiver.url(), &[]).await;
    let sent = [
        webhook(9201, "e1", "order.created", 1, Some("XJ1")),
        webhook(9201, "e2", "order.updated", 1, Some("XJ1")),
        webhook(9201, "e3", "product.updated", 55, None),
        webhook(9202, "e4", "order.created", 2, Some("XJ2")),
        webhook(9202, "e5", "customer.deleted", 7, None),
    ];
    for event in &sent {
        assert_eq!(pipeline.post_json(event, None).await.0, 200);
    }
    // e1, e2 to a and b; e3 to a (b wants orders only); e4, e5 to c: 7 records.
    let all = wait_found(&pipeline, "", 7).await;
    assert_eq!(all.len(), 7, "{all:#?}");
    receiver.wait_for(7, WAIT).await;

    let count = |query: &'static str| {
        let pipeline = &pipeline;
        async move { search_all(pipeline, query, 500).await.len() }
    };
    assert_eq!(count("store=9201").await, 5);
    assert_eq!(count("store=9202").await, 2);
    assert_eq!(
        search_all(&pipeline, &format!("instance={a}"), 500)
            .await
            .len(),
        3
    );
    assert_eq!(
        search_all(&pipeline, &format!("instance={b}"), 500)
            .await
            .len(),
        2
    );
    assert_eq!(
        search_all(&pipeline, &format!("instance={c}"), 500)
            .await
            .len(),
        2
    );
    assert_eq!(count("objectType=orders").await, 5);
    assert_eq!(count("objectId=XJ1").await, 4);
    assert_eq!(count("objectId=55").await, 1);
    assert_eq!(count("eventType=CREATED").await, 3);
    assert_eq!(count("eventType=DELETED").await, 1);
    assert_eq!(count("ecwidEventId=e2").await, 2);
    assert_eq!(count("store=9201&ecwidEventId=e2").await, 2);
    // Combined.
    assert_eq!(
        search_all(&pipeline, &format!("instance={a}&objectType=orders"), 500)
            .await
            .len(),
        2
    );
    assert_eq!(count("store=9201&objectId=XJ1&eventType=UPDATED").await, 2);
    assert_eq!(count("store=9202&objectType=orders").await, 1);
    assert_eq!(count("store=9202&objectType=products").await, 0);
    let far_past = "2001-01-01T00:00:00Z";
    let far_future = "2099-01-01T00:00:00Z";
    assert_eq!(
        search_all(
            &pipeline,
            &format!("since={far_past}&until={far_future}"),
            500
        )
        .await
        .len(),
        7
    );
    assert_eq!(
        search_all(&pipeline, &format!("since={far_future}"), 500)
            .await
            .len(),
        0
    );
    assert_eq!(
        search_all(&pipeline, &format!("until={far_past}"), 500)
            .await
            .len(),
        0
    );

    // Newest first, and paging by 2 returns each record once.
    let paged = search_all(&pipeline, "store=9201", 2).await;
    let ids: BTreeSet<&str> = paged.iter().filter_map(|e| e["id"].as_str()).collect();
    assert_eq!((paged.len(), ids.len()), (5, 5), "{paged:#?}");
    let order = ecwid_ids(&paged);
    assert_eq!(order.first().map(String::as_str), Some("e3"), "{order:?}");
    assert_eq!(order.last().map(String::as_str), Some("e1"), "{order:?}");

    // A record carries what the issue lists.
    let record = &search(&pipeline, &format!("instance={c}&objectId=XJ2"))
        .await
        .0[0];
    for field in [
        "id",
        "instanceId",
        "storeId",
        "objectType",
        "objectId",
        "eventType",
        "ecwidEventId",
        "format",
        "verified",
        "requestId",
        "receivedAt",
        "status",
        "attempts",
    ] {
        assert!(!record[field].is_null(), "{field} missing: {record}");
    }
    assert_eq!(record["instanceId"], c.as_str());
    assert_eq!(record["format"], "v3");

    // Bad filters are 400s.
    for query in [
        "status=lost",
        "since=yesterday",
        "limit=0",
        "store=x1",
        "instance=a.b",
    ] {
        let (status, body) = pipeline
            .admin_request(Method::GET, &format!("/events?{query}"), None)
            .await;
        assert_eq!(status, 400, "{query}: {body}");
    }
    pipeline.stop().await;
}

#[tokio::test]
async fn raw_stage_outcomes_are_found_by_ecwid_event_id() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    pipeline
        .create_instance("9203", &receiver.url(), &[("event.objects", "products")])
        .await;
    // Every instance filters it out.
    let order = webhook(9203, "filtered-1", "order.created", 1, Some("XJ9"));
    assert_eq!(pipeline.post_json(&order, None).await.0, 200);
    let found = wait_found(&pipeline, "store=9203&ecwidEventId=filtered-1", 1).await;
    assert_eq!(found[0]["status"], "filtered");
    assert!(found[0]["instanceId"].is_null());
    // Found without the store too (a scan).
    let found = wait_found(&pipeline, "ecwidEventId=filtered-1", 1).await;
    assert_eq!(found[0]["status"], "filtered");

    // Stored for a store that has no instance (it was deleted after the ingest took the event):
    // the normalizer dead-letters it, and the log says so.
    let js = jetstream::new(nats.client().await);
    let body = webhook(9299, "orphan-1", "order.created", 1, Some("XJ0")).to_string();
    let mut h = async_nats::HeaderMap::new();
    h.insert("Nats-Msg-Id", "v3:9299:orphan-1");
    h.insert("Ecwid-Format", "v3");
    js.publish_with_headers(shared::nats::raw_subject("9299"), h, body.into())
        .await
        .unwrap()
        .await
        .unwrap();
    let found = wait_found(&pipeline, "store=9299&ecwidEventId=orphan-1", 1).await;
    assert_eq!(found[0]["status"], "dead");
    assert!(found[0]["lastError"]
        .as_str()
        .unwrap()
        .contains("no instance"));
    let (status, shown) = pipeline
        .admin_request(
            Method::GET,
            &format!("/events/{}", found[0]["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["event"]["status"], "dead");
    assert!(shown["envelope"].is_null(), "no envelope was made");
    pipeline.stop().await;
}

/// `GET /events/{id}` through `admin`.
async fn show(admin: &Pipeline, id: &str) -> Value {
    let (status, body) = admin
        .admin_request(Method::GET, &format!("/events/{id}"), None)
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Waits until the record `id` has `status` and at least `attempts` attempts; returns it.
async fn wait_record(pipeline: &Pipeline, id: &str, status: &str, attempts: u64) -> Value {
    wait_until(
        WAIT,
        &format!("event {id} {status} after {attempts} attempts"),
        || async {
            let (code, body) = pipeline
                .admin_request(Method::GET, &format!("/events/{id}"), None)
                .await;
            code == 200
                && body["event"]["status"] == status
                && body["event"]["attempts"].as_u64() >= Some(attempts)
        },
    )
    .await;
    show(pipeline, id).await
}

#[tokio::test]
async fn attempts_are_recorded_then_delivered_and_can_be_sent_again() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Sequence(vec![500, 503])).await;
    let instance = pipeline
        .create_instance(
            "9204",
            &receiver.url(),
            &[("event.notification.signature.key", "log-signature-key")],
        )
        .await;
    let event = webhook(9204, "three-tries", "order.created", 5, Some("XJ5"));
    assert_eq!(pipeline.post_json(&event, None).await.0, 200);
    let got = receiver.wait_for(3, WAIT).await;
    let id = got[0].json()["message"]["eventId"]
        .as_str()
        .unwrap()
        .to_owned();

    // The record shows 3 attempts with their statuses, then delivered.
    let shown = wait_record(&pipeline, &id, "delivered", 3).await;
    let record = &shown["event"];
    assert_eq!(record["attempts"], 3);
    assert_eq!(record["lastStatus"], "200");
    assert!(record["deliveredAt"].is_string());
    assert_eq!(record["instanceId"], instance.as_str());
    assert_eq!(record["objectId"], "XJ5");
    let statuses: Vec<Value> = shown["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status"].clone())
        .collect();
    assert_eq!(statuses, [json!(500), json!(503), json!(200)]);
    let numbers: Vec<u64> = shown["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["number"].as_u64())
        .collect();
    assert_eq!(numbers, [1, 2, 3]);
    // The envelope exactly as POSTed.
    assert_eq!(
        serde_json::to_vec(&shown["envelope"]).unwrap(),
        serde_json::to_vec(&got[2].json()).unwrap()
    );
    assert_eq!(
        search(&pipeline, &format!("status=delivered&instance={instance}"))
            .await
            .0
            .len(),
        1
    );

    // Redeliver: the same body (same webhook id and signature), a new attempt on the record.
    let (status, body) = pipeline
        .admin_request(Method::POST, &format!("/events/{id}/redeliver"), None)
        .await;
    assert_eq!(status, 202, "{body}");
    let again = receiver.wait_for(4, WAIT).await;
    assert_eq!(again[3].body, got[2].body);
    assert_eq!(again[3].header("elements-webhook-id"), Some(id.as_str()));
    assert_eq!(
        again[3].header("elements-webhook-signature"),
        got[2].header("elements-webhook-signature")
    );
    let shown = wait_record(&pipeline, &id, "delivered", 4).await;
    assert_eq!(shown["attempts"].as_array().unwrap().len(), 4);
    assert_eq!(shown["attempts"][3]["number"], 4);

    // Replay the instance's window: the same envelope once more.
    let (status, body) = pipeline
        .admin_request(
            Method::POST,
            &format!("/instances/{instance}/replay"),
            Some(json!({"since": "2001-01-01T00:00:00Z", "until": "2099-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // The replay answer names what it replayed, as the dead letters' does (a count before).
    assert_eq!(body["replayed"], json!([id]), "{body}");
    assert_eq!(body["more"], false);
    let again = receiver.wait_for(5, WAIT).await;
    assert_eq!(again[4].body, got[2].body);
    wait_record(&pipeline, &id, "delivered", 5).await;

    // Unknown ids and raw-stage records.
    let (status, _) = pipeline
        .admin_request(
            Method::POST,
            "/events/00000000-0000-0000-0000-000000000000/redeliver",
            None,
        )
        .await;
    assert_eq!(status, 404);
    pipeline.stop().await;
}

#[tokio::test]
async fn concurrent_redeliveries_number_every_attempt_once() {
    const N: usize = 24;
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    pipeline.create_instance("9206", &receiver.url(), &[]).await;
    let event = webhook(9206, "many-copies", "order.created", 6, Some("XJ6"));
    assert_eq!(pipeline.post_json(&event, None).await.0, 200);
    let got = receiver.wait_for(1, WAIT).await;
    let id = got[0].json()["message"]["eventId"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_record(&pipeline, &id, "delivered", 1).await;

    // N redeliveries at once: N copies of the envelope, attempted concurrently.
    let path = format!("/events/{id}/redeliver");
    let asks = (0..N).map(|_| pipeline.admin_request(Method::POST, &path, None));
    for (status, body) in futures::future::join_all(asks).await {
        assert_eq!(status, 202, "{body}");
    }
    receiver.wait_for(N + 1, WAIT).await;
    wait_settled(&nats.url(), WAIT).await;
    let total = N as u64 + 1;
    let shown = wait_record(&pipeline, &id, "delivered", total).await;
    assert_eq!(receiver.count(), N + 1);
    assert_eq!(shown["event"]["attempts"], total, "{}", shown["event"]);
    let mut numbers: Vec<u64> = shown["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["number"].as_u64())
        .collect();
    numbers.sort_unstable();
    assert_eq!(numbers, (1..=total).collect::<Vec<_>>());
    pipeline.stop().await;
}

#[tokio::test]
async fn a_test_event_answers_how_the_receiver_took_it() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let good = Receiver::start(Behavior::Status(204)).await;
    let bad = Receiver::start(Behavior::Status(500)).await;
    let good_id = pipeline
        .create_instance(
            "9205",
            &good.url(),
            &[("event.notification.signature.key", "test-key")],
        )
        .await;
    let bad_id = pipeline.create_instance("9206", &bad.url(), &[]).await;

    let (status, answer) = pipeline
        .admin_request(Method::POST, &format!("/instances/{good_id}/test"), None)
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["delivered"], true);
    assert_eq!(answer["status"], 204);
    let got = good.wait_for(1, WAIT).await;
    let message = &got[0].json()["message"];
    assert_eq!(message["events"][0]["objectType"], "test");
    assert_eq!(message["events"][0]["eventType"], "CREATED");
    assert_eq!(message["eventId"], answer["eventId"]);
    assert!(got[0].header("elements-webhook-signature").is_some());

    let (status, answer) = pipeline
        .admin_request(Method::POST, &format!("/instances/{bad_id}/test"), None)
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["delivered"], false);
    assert_eq!(answer["status"], 500);
    // Tried once: no retry follows.
    wait_settled(&pipeline.nats_url, WAIT).await;
    assert_eq!(bad.count(), 1);
    let (status, _) = pipeline
        .admin_request(Method::POST, "/instances/nope/test", None)
        .await;
    assert_eq!(status, 404);
    pipeline.stop().await;
}

#[tokio::test]
async fn a_deliverer_killed_mid_attempt_leaves_a_record_that_converges() {
    use integration_tests::procs::*;
    let nats = NatsServer::start().await;
    let mut cluster = Cluster::start(&nats.url(), &[("DELIVER_TIMEOUT_MS", "1000")], 1).await;
    let receiver = Receiver::start(Behavior::Hang).await;
    cluster.create_instance("9207", &receiver.url(), &[]).await;
    let event = webhook(9207, "killed-mid-attempt", "order.created", 8, Some("XJ8"));
    let resp = cluster
        .http
        .post(cluster.webhook_url())
        .json(&event)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // The attempt is in flight (the receiver holds it), then the deliverer dies.
    let got = receiver.wait_for(1, WAIT).await;
    let id = got[0].json()["message"]["eventId"]
        .as_str()
        .unwrap()
        .to_owned();
    cluster.deliverers[0].kill().await;
    receiver.set_behavior(Behavior::Status(200));
    cluster.deliverers[0].spawn();
    cluster.deliverers[0].wait_ready().await;
    // The message comes back after ack_wait; the record ends delivered, not pending.
    let shown = {
        let http = &cluster.http;
        let admin = cluster.ingest.ops;
        wait_until(
            Duration::from_secs(60),
            "the record to converge",
            || async {
                let (code, body) =
                    admin_request(http, admin, Method::GET, &format!("/events/{id}"), None).await;
                code == 200 && body["event"]["status"] == "delivered"
            },
        )
        .await;
        admin_request(http, admin, Method::GET, &format!("/events/{id}"), None)
            .await
            .1
    };
    assert!(shown["event"]["attempts"].as_u64().unwrap() >= 1, "{shown}");
    assert!(receiver.count() >= 2);
}

/// Inserts `n` event rows numbered `0..n` into the log of the pipeline on `nats_url` (their
/// `seq` in that order), each `fields(i)` giving (id, instanceId, storeId, objectId, eventType,
/// ecwidEventId).
fn fill(nats_url: &str, n: usize, fields: impl Fn(usize) -> [String; 6]) {
    let mut sql = String::from(
        "INSERT INTO event_log_events (id, received_at, instance_id, store_id, object_type, \
         object_id, event_type, ecwid_event_id, format, verified, request_id, status, seq) VALUES ",
    );
    for i in 0..n {
        let [id, instance, store, object, event_type, eid] = fields(i);
        if i > 0 {
            sql.push(',');
        }
        sql.push_str(&format!(
            "('{id}', now(), '{instance}', '{store}', 'orders', '{object}', '{event_type}', \
             '{eid}', 'v3', true, 'r', 'pending', \
             ((extract(epoch FROM now()) * 1000)::bigint << 20) + {i})"
        ));
    }
    pg::psql_for(nats_url, &sql);
}

/// An objectId with a thousand records pages through all of them: every record once, newest
/// first, across pages, also combined with another filter.
#[tokio::test]
async fn an_object_with_thousands_of_records_pages_newest_first() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    const N: usize = 1100;
    fill(&nats.url(), N, |i| {
        [
            format!("hot-{i:05}"),
            "hot-instance".into(),
            if i % 2 == 0 { "9301" } else { "9302" }.into(),
            "HOT 1".into(),
            "UPDATED".into(),
            format!("hot-e{i}"),
        ]
    });
    // A row written twice (a spooled batch written again) is kept once.
    let again = pg::psql_for(
        &nats.url(),
        "INSERT INTO event_log_events (id, received_at, instance_id, store_id, object_type, \
         object_id, event_type, ecwid_event_id, format, verified, request_id, status, seq) \
         SELECT id, received_at, instance_id, store_id, object_type, object_id, event_type, \
         ecwid_event_id, format, verified, request_id, status, seq FROM event_log_events \
         WHERE id = 'hot-00008' ON CONFLICT DO NOTHING RETURNING id",
    );
    assert_eq!(again, "", "the same row again is not stored twice");
    let all = search_all(&pipeline, "objectId=HOT%201", 400).await;
    let ids: Vec<&str> = all.iter().filter_map(|e| e["id"].as_str()).collect();
    let expected: Vec<String> = (0..N).rev().map(|i| format!("hot-{i:05}")).collect();
    assert_eq!(ids, expected, "every record once, newest first");
    let even = search_all(&pipeline, "objectId=HOT%201&store=9301", 500).await;
    assert_eq!(even.len(), N / 2);
    assert!(even.iter().all(|e| e["storeId"] == "9301"));
    let (first, next) = search(&pipeline, "objectId=HOT%201&limit=3").await;
    assert_eq!(ecwid_ids(&first), ["hot-e1099", "hot-e1098", "hot-e1097"]);
    assert!(next.is_some(), "more pages");
    pipeline.stop().await;
}

#[tokio::test]
async fn a_status_search_stops_at_its_budget_and_goes_on() {
    const FILLER: usize = 900;
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[("EVENT_SEARCH_SCAN_BUDGET", "200")]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    pipeline.create_instance("9207", &receiver.url(), &[]).await;
    // One real record, oldest, then many pending records of another instance written after it.
    let event = webhook(9207, "deep-down", "order.created", 7, Some("XJ7"));
    assert_eq!(pipeline.post_json(&event, None).await.0, 200);
    wait_found(&pipeline, "store=9207&status=delivered", 1).await;
    fill(&nats.url(), FILLER, |n| {
        [
            format!("filler-{n}"),
            "filler".into(),
            "9208".into(),
            "f".into(),
            "UPDATED".into(),
            format!("f-{n}"),
        ]
    });

    // A status matching nothing among the newest rows: the first page stops at the budget.
    let (events, next) = search(&pipeline, "status=delivered&limit=10").await;
    assert!(events.is_empty(), "{events:?}");
    let mut next = next.expect("a cursor: the budget ran out before the log did");
    // Following `next` goes on down the log, and ends.
    let mut pages = 1;
    let mut found = Vec::new();
    loop {
        let (events, more) = search(&pipeline, &format!("status=delivered&after={next}")).await;
        found.extend(events);
        pages += 1;
        match more {
            Some(n) => {
                assert!(n < next, "the cursor goes back: {n} after {next}");
                next = n;
            }
            None => break,
        }
        assert!(pages < 50, "paging did not end");
    }
    assert_eq!(ecwid_ids(&found), ["deep-down"]);
    assert!(
        pages >= 4,
        "{FILLER} rows at 200 a call take several calls, not {pages}"
    );
    pipeline.stop().await;
}
