//! The poller against a fake Ecwid REST API (tests/src/fake_ecwid.rs), a real nats-server, the
//! pipeline in-process and real receivers. Short intervals come from config: a refresh of 0.05
//! minutes, windows that end now (`POLLER_WINDOW_DELAY_MS=0`), short leases.

use std::time::Duration;

use integration_tests::fake_ecwid::{now_secs, FakeEcwid, Misbehavior};
use integration_tests::procs::{process_env, sample_sum, Service, ServiceProc};
use integration_tests::{
    connect, metric, test_vars, wait_until, Behavior, NatsServer, Pipeline, Receiver,
};
use reqwest::Method;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "secret_good_token";

fn poll_settings(api: &str) -> Vec<(&'static str, String)> {
    vec![
        ("ECWID_API_URL", api.to_owned()),
        ("POLLER_WINDOW_DELAY_MS", "0".into()),
        ("POLLER_LEASE_TTL_MS", "1500".into()),
        ("POLLER_RETRY_MIN_MS", "50".into()),
        ("POLLER_ERROR_BACKOFF_MS", "60000".into()),
    ]
}

struct InProcPoller {
    cancel: CancellationToken,
    ops: std::net::SocketAddr,
    handle: tokio::task::JoinHandle<()>,
}

async fn start_poller(nats_url: &str, api: &str, extra: &[(&str, &str)]) -> InProcPoller {
    let settings = poll_settings(api);
    let mut all: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.extend_from_slice(extra);
    let config = poller::Config::from_vars(&test_vars(nats_url, &all)).expect("poller config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let ops = listener.local_addr().expect("addr");
    let cancel = CancellationToken::new();
    let (c, k) = (connect(nats_url).await, cancel.clone());
    let handle = tokio::spawn(async move {
        poller::run(config, listener, c, k)
            .await
            .expect("poller runs");
    });
    InProcPoller {
        cancel,
        ops,
        handle,
    }
}

impl InProcPoller {
    async fn metrics(&self, http: &reqwest::Client) -> String {
        http.get(format!("http://{}/metrics", self.ops))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    async fn stop(self) {
        self.cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.handle).await;
    }
}

fn polling(vendor: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![
        ("event.vendor.type", vendor),
        ("event.poller.refresh_interval", "0.05"),
        ("ecwid.api.token", TOKEN),
    ]
}

/// `GET /instances/{id}/poller`.
async fn poller_status(pipeline: &Pipeline, id: &str) -> Value {
    let (status, shown) = pipeline
        .admin_request(Method::GET, &format!("/instances/{id}/poller"), None)
        .await;
    assert_eq!(status, 200, "{shown}");
    shown
}

/// Waits until the store's status has a `lastPollError` whose message contains `needle`.
async fn wait_poll_error(pipeline: &Pipeline, id: &str, needle: &str, within: Duration) -> Value {
    wait_until(
        within,
        &format!("lastPollError with `{needle}`"),
        || async {
            poller_status(pipeline, id).await["lastPollError"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(needle))
        },
    )
    .await;
    poller_status(pipeline, id).await
}

fn order(id: &str, created: i64, updated: i64) -> Value {
    json!({"id": id, "internalId": 22222, "total": 10.5,
           "createDate": "", "createTimestamp": created, "updateTimestamp": updated})
}

fn events_of(received: &[integration_tests::Received]) -> Vec<(String, String)> {
    received
        .iter()
        .map(|r| {
            let e = &r.json()["message"]["events"][0];
            (
                e["eventType"].as_str().unwrap_or_default().to_owned(),
                e["objectId"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn an_order_created_updated_and_deleted_arrives_by_polling_alone() {
    let nats = NatsServer::start().await;
    let fake = FakeEcwid::start().await;
    fake.add_store("7001", TOKEN);
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    let poller = start_poller(&nats.url(), &fake.url(), &[]).await;
    let id = pipeline
        .create_instance("7001", &receiver.url(), &polling("polling"))
        .await;
    // The first cycle sets the cursors: wait for it before changing anything.
    wait_until(Duration::from_secs(20), "the first poll", || async {
        fake.requests_for("7001")
            .iter()
            .any(|r| r.path == "latest-stats")
    })
    .await;
    let t = now_secs();
    fake.upsert("7001", "orders", order("XJ12H", t, t));
    receiver.wait_for(1, Duration::from_secs(20)).await;
    let t2 = now_secs().max(t + 1);
    fake.upsert("7001", "orders", order("XJ12H", t, t2));
    receiver.wait_for(2, Duration::from_secs(20)).await;
    fake.delete("7001", "orders", "XJ12H", now_secs().max(t2 + 1));
    let got = receiver.wait_for(3, Duration::from_secs(20)).await;
    assert_eq!(
        events_of(&got),
        [
            ("CREATED", "XJ12H"),
            ("UPDATED", "XJ12H"),
            ("DELETED", "XJ12H")
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
    );
    let first = got[0].json();
    assert_eq!(first["message"]["instanceId"], id.as_str());
    assert_eq!(first["message"]["events"][0]["objectType"], "orders");
    assert_eq!(first["message"]["raw"]["id"], "XJ12H");
    assert_eq!(first["message"]["raw"]["total"], 10.5);
    // Every request carried the store's token.
    assert!(fake.requests().iter().all(|r| r.token == TOKEN));
    let (status, shown) = pipeline
        .admin_request(Method::GET, &format!("/instances/{id}/poller"), None)
        .await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["pollerStatus"], "ok", "{shown}");
    assert!(shown["cursors"]["orders"].is_string(), "{shown}");
    let (_, inst) = pipeline
        .admin_request(Method::GET, &format!("/instances/{id}"), None)
        .await;
    assert_eq!(inst["configuration"]["ecwid.api.token"], "********");
    poller.stop().await;
    pipeline.stop().await;
}

#[tokio::test]
async fn a_change_seen_by_webhook_and_poll_is_delivered_once() {
    let nats = NatsServer::start().await;
    let fake = FakeEcwid::start().await;
    fake.add_store("7002", TOKEN);
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    let poller = start_poller(&nats.url(), &fake.url(), &[]).await;
    pipeline
        .create_instance("7002", &receiver.url(), &polling("webhooks,polling"))
        .await;
    wait_until(Duration::from_secs(20), "the first poll", || async {
        fake.requests_for("7002")
            .iter()
            .any(|r| r.path == "latest-stats")
    })
    .await;
    let t = now_secs();
    let webhook = json!({"eventId": "wh-1", "eventCreated": t, "storeId": 7002, "entityId": 22222,
                         "eventType": "order.updated", "data": {"orderId": "XJ12H"}});
    let (status, _) = pipeline.post_json(&webhook, None).await;
    assert_eq!(status, 200);
    receiver.wait_for(1, Duration::from_secs(20)).await;
    fake.upsert("7002", "orders", order("XJ12H", t - 100, t));
    let http = reqwest::Client::new();
    wait_until(
        Duration::from_secs(20),
        "the poller to skip what the webhook brought",
        || async {
            let text = poller.metrics(&http).await;
            metric(
                &text,
                "ecwid_poller_events_skipped_total{reason=\"webhook_seen\"}",
            )
            .unwrap_or(0.0)
                >= 1.0
        },
    )
    .await;
    // A newer change the webhook did not bring still comes through the poll.
    fake.upsert("7002", "orders", order("XJ12H", t - 100, t + 5));
    let got = receiver.wait_for(2, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 2);
    assert_eq!(
        events_of(&got)[1],
        ("UPDATED".to_owned(), "XJ12H".to_owned())
    );
    assert_eq!(got[0].json()["message"]["raw"]["eventId"], "wh-1");
    poller.stop().await;
    pipeline.stop().await;
}

#[tokio::test]
async fn more_than_a_page_of_changes_is_read_page_by_page() {
    let nats = NatsServer::start().await;
    let fake = FakeEcwid::start().await;
    fake.add_store("7003", TOKEN);
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    let poller = start_poller(&nats.url(), &fake.url(), &[]).await;
    pipeline
        .create_instance("7003", &receiver.url(), &polling("polling"))
        .await;
    wait_until(Duration::from_secs(20), "the first poll", || async {
        fake.requests_for("7003")
            .iter()
            .any(|r| r.path == "latest-stats")
    })
    .await;
    let t = now_secs();
    for n in 0..250 {
        fake.upsert(
            "7003",
            "products",
            json!({"id": 1000 + n, "createTimestamp": t, "updateTimestamp": t}),
        );
    }
    let got = receiver.wait_for(250, Duration::from_secs(60)).await;
    let mut ids: Vec<String> = events_of(&got).into_iter().map(|(_, id)| id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 250);
    let offsets: Vec<String> = fake
        .requests_for("7003")
        .iter()
        .filter(|r| {
            r.path == "products"
                && r.query
                    .get("updatedFrom")
                    .is_some_and(|f| f.parse::<i64>().unwrap() <= t)
        })
        .filter_map(|r| r.query.get("offset").cloned())
        .collect();
    for o in ["0", "100", "200"] {
        assert!(
            offsets.iter().any(|x| x == o),
            "offset {o} requested: {offsets:?}"
        );
    }
    poller.stop().await;
    pipeline.stop().await;
}

#[tokio::test]
async fn a_429_is_waited_out_and_a_refused_token_is_shown_without_a_tight_loop() {
    let nats = NatsServer::start().await;
    let fake = FakeEcwid::start().await;
    fake.add_store("7004", TOKEN);
    fake.add_store("7005", "secret_the_real_one");
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    let poller = start_poller(&nats.url(), &fake.url(), &[]).await;
    // 429 on the very first request, with Retry-After: 2.
    fake.script(429, Some(2));
    pipeline
        .create_instance("7004", &receiver.url(), &polling("polling"))
        .await;
    wait_until(
        Duration::from_secs(20),
        "a request after the 429",
        || async { fake.requests().len() >= 2 },
    )
    .await;
    let r = fake.requests();
    assert_eq!(r[0].status, 429);
    let gap = r[1].at.duration_since(r[0].at);
    assert!(
        gap >= Duration::from_millis(1900),
        "Retry-After honoured: {gap:?}"
    );

    let bad = pipeline
        .create_instance("7005", &receiver.url(), &polling("polling"))
        .await;
    wait_until(
        Duration::from_secs(20),
        "the refusal on the instance",
        || async {
            let (_, s) = pipeline
                .admin_request(Method::GET, &format!("/instances/{bad}/poller"), None)
                .await;
            s["pollerStatus"] == "error"
        },
    )
    .await;
    let (_, shown) = pipeline
        .admin_request(Method::GET, &format!("/instances/{bad}/poller"), None)
        .await;
    assert_eq!(shown["lastPollError"]["status"], 403, "{shown}");
    assert!(shown["retryAt"].is_string(), "{shown}");
    // Two cycles of the refused store later (each one backing off instead of asking), still the
    // one refused request.
    let refused = || fake.requests_for("7005").len();
    let before = refused();
    let http = reqwest::Client::new();
    let backing_off = || async {
        sample_sum(
            &poller.metrics(&http).await,
            "ecwid_poller_cycles_total",
            &[("outcome", "backing_off")],
        )
    };
    let skipped = backing_off().await;
    wait_until(
        Duration::from_secs(30),
        "two cycles backing off",
        || async { backing_off().await >= skipped + 2.0 },
    )
    .await;
    assert_eq!(refused(), before, "no request during the backoff");
    assert!(before <= 2, "{before} requests for a refused token");
    poller.stop().await;
    pipeline.stop().await;
}

#[tokio::test]
async fn a_backfill_stores_a_past_window_once() {
    let nats = NatsServer::start().await;
    let fake = FakeEcwid::start().await;
    fake.add_store("7006", TOKEN);
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    let poller = start_poller(&nats.url(), &fake.url(), &[]).await;
    // Changes from before the instance existed: the poller starts at now and never reads them.
    let past = now_secs() - 3600;
    for n in 0..3 {
        fake.upsert("7006", "orders", order(&format!("OLD{n}"), past, past + n));
    }
    fake.upsert(
        "7006",
        "customers",
        json!({"id": 9, "createTimestamp": past, "updateTimestamp": past}),
    );
    let id = pipeline
        .create_instance("7006", &receiver.url(), &polling("polling"))
        .await;
    // The poller answers backfills once it runs (a 503 "no poller is running" before).
    wait_until(Duration::from_secs(20), "the first poll", || async {
        fake.requests_for("7006")
            .iter()
            .any(|r| r.path == "latest-stats")
    })
    .await;
    let since = model::time_fmt::unix_secs_to_rfc3339(past - 60).unwrap();
    let until = model::time_fmt::unix_secs_to_rfc3339(past + 60).unwrap();
    let body = json!({"since": since, "until": until, "objects": ["orders"]});
    let path = format!("/instances/{id}/backfill");
    let (status, first) = pipeline
        .admin_request(Method::POST, &path, Some(body.clone()))
        .await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["stored"], 3, "{first}");
    let got = receiver.wait_for(3, Duration::from_secs(20)).await;
    let (status, again) = pipeline
        .admin_request(Method::POST, &path, Some(body))
        .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["stored"], 0, "{again}");
    assert_eq!(again["duplicates"], 3, "{again}");
    let (status, bad) = pipeline
        .admin_request(
            Method::POST,
            &path,
            Some(json!({"since": "yesterday", "until": until})),
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(bad["field"], "since", "{bad}");
    // Nothing more arrives: the events of the first backfill only.
    assert_eq!(got.len(), 3);
    assert_eq!(receiver.count(), 3);
    poller.stop().await;
    pipeline.stop().await;
}

#[tokio::test]
async fn many_stores_on_one_token_stay_within_its_rate_limit() {
    let nats = NatsServer::start().await;
    let fake = FakeEcwid::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    let (limit, window_ms) = (10usize, 2000i64);
    // Two replicas share one budget.
    let a = start_poller(
        &nats.url(),
        &fake.url(),
        &[
            ("POLLER_RATE_LIMIT", "10"),
            ("POLLER_RATE_WINDOW_MS", "2000"),
        ],
    )
    .await;
    let b = start_poller(
        &nats.url(),
        &fake.url(),
        &[
            ("POLLER_RATE_LIMIT", "10"),
            ("POLLER_RATE_WINDOW_MS", "2000"),
        ],
    )
    .await;
    for n in 0..8 {
        let store = format!("{}", 7100 + n);
        fake.add_store(&store, TOKEN);
        fake.set_always_changed(&store);
        pipeline
            .create_instance(&store, &receiver.url(), &polling("polling"))
            .await;
    }
    wait_until(
        Duration::from_secs(30),
        "the budget to be used for a while",
        || async { fake.requests().len() >= 40 },
    )
    .await;
    let times: Vec<i64> = fake.requests().iter().map(|r| r.at_ms).collect();
    for (i, start) in times.iter().enumerate() {
        let within = times[i..]
            .iter()
            .take_while(|t| **t < start + window_ms)
            .count();
        assert!(
            within <= limit,
            "{within} requests within {window_ms} ms from {start}"
        );
    }
    a.stop().await;
    b.stop().await;
    pipeline.stop().await;
}

#[tokio::test]
async fn replicas_share_stores_and_take_over_from_a_killed_one() {
    let nats = NatsServer::start().await;
    let fake = FakeEcwid::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    let settings = poll_settings(&fake.url());
    let mut env: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.push(("POLLER_REPLICA_ID", "replica-a"));
    let mut a = ServiceProc::start(Service::Poller, process_env(&nats.url(), &env)).await;
    env.pop();
    env.push(("POLLER_REPLICA_ID", "replica-b"));
    let _b = ServiceProc::start(Service::Poller, process_env(&nats.url(), &env)).await;
    let stores: Vec<String> = (0..8).map(|n| format!("{}", 7200 + n)).collect();
    for store in &stores {
        fake.add_store(store, TOKEN);
        pipeline
            .create_instance(store, &receiver.url(), &polling("polling"))
            .await;
    }
    let replica = |r: &integration_tests::fake_ecwid::ApiRequest| {
        if r.user_agent.contains("replica-a") {
            "a"
        } else {
            "b"
        }
    };
    wait_until(Duration::from_secs(30), "both replicas to poll", || async {
        let r = fake.requests();
        r.iter().any(|x| replica(x) == "a") && r.iter().any(|x| replica(x) == "b")
    })
    .await;
    a.kill().await;
    let killed_at = std::time::Instant::now();
    wait_until(
        Duration::from_secs(30),
        "every store polled by b after the kill",
        || async {
            let r = fake.requests();
            stores.iter().all(|s| {
                r.iter()
                    .any(|x| &x.store == s && x.at > killed_at && replica(x) == "b")
            })
        },
    )
    .await;
    // One replica at a time per store: a store's requests change hands at most twice
    // (a hand-over to its preferred replica after start, the take-over after the kill), never
    // back and forth.
    for store in &stores {
        let owners: Vec<&str> = fake.requests_for(store).iter().map(replica).collect();
        let mut runs = owners.clone();
        runs.dedup();
        assert!(runs.len() <= 3, "store {store} went {runs:?}");
        assert_eq!(runs.last(), Some(&"b"));
    }
    pipeline.stop().await;
}

// Hostile Ecwid API: each case below is a fake that misbehaves on purpose.

#[tokio::test]
async fn a_page_that_never_ends_is_read_to_the_limit_and_shown_on_the_status() {
    let nats = NatsServer::start().await;
    let fake = FakeEcwid::start().await;
    fake.add_store("7301", TOKEN);
    fake.misbehave("7301", Misbehavior::EndlessBody { status: 200 });
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    // A request timeout far beyond the wait below: only the bound can end the read in time.
    let poller = start_poller(
        &nats.url(),
        &fake.url(),
        &[
            ("POLLER_MAX_PAGE_BYTES", "1048576"),
            ("POLLER_REQUEST_TIMEOUT_MS", "120000"),
        ],
    )
    .await;
    let id = pipeline
        .create_instance("7301", &receiver.url(), &polling("polling"))
        .await;
    let shown = wait_poll_error(
        &pipeline,
        &id,
        "POLLER_MAX_PAGE_BYTES",
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(shown["pollerStatus"], "retrying", "{shown}");
    assert!(
        shown["lastPollError"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("1048576")),
        "{shown}"
    );
    // The poller hung up instead of reading on.
    wait_until(
        Duration::from_secs(10),
        "the endless body dropped",
        || async { fake.open_bodies() == 0 },
    )
    .await;
    let http = reqwest::Client::new();
    let text = poller.metrics(&http).await;
    assert!(
        metric(&text, "ecwid_poller_requests_total{outcome=\"too_large\"}").unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    poller.stop().await;
    pipeline.stop().await;
}

#[tokio::test]
async fn an_error_body_that_never_ends_is_read_only_to_its_start() {
    let nats = NatsServer::start().await;
    let fake = FakeEcwid::start().await;
    fake.add_store("7302", TOKEN);
    fake.misbehave("7302", Misbehavior::EndlessBody { status: 403 });
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    let poller = start_poller(
        &nats.url(),
        &fake.url(),
        &[("POLLER_REQUEST_TIMEOUT_MS", "120000")],
    )
    .await;
    let id = pipeline
        .create_instance("7302", &receiver.url(), &polling("polling"))
        .await;
    wait_until(
        Duration::from_secs(30),
        "the refusal on the status",
        || async { poller_status(&pipeline, &id).await["pollerStatus"] == "error" },
    )
    .await;
    let shown = poller_status(&pipeline, &id).await;
    assert_eq!(shown["lastPollError"]["status"], 403, "{shown}");
    let message = shown["lastPollError"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(message.starts_with("{\"errorMessage\":\"aaa"), "{shown}");
    assert!(message.len() <= 200, "{shown}");
    wait_until(
        Duration::from_secs(10),
        "the endless body dropped",
        || async { fake.open_bodies() == 0 },
    )
    .await;
    poller.stop().await;
    pipeline.stop().await;
}

#[tokio::test]
async fn a_huge_retry_after_is_clamped_and_frees_the_slot_for_other_stores() {
    let nats = NatsServer::start().await;
    let fake = FakeEcwid::start().await;
    fake.add_store("7311", TOKEN);
    fake.add_store("7312", "secret_another_token");
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    // One slot: a store that keeps it starves every other.
    let poller = start_poller(
        &nats.url(),
        &fake.url(),
        &[
            ("POLLER_CONCURRENCY", "1"),
            ("POLLER_MAX_RETRY_AFTER_MS", "8000"),
        ],
    )
    .await;
    fake.script_raw(429, Some("1e20"));
    let hostile = pipeline
        .create_instance("7311", &receiver.url(), &polling("polling"))
        .await;
    wait_until(Duration::from_secs(20), "the 429", || async {
        !fake.requests_for("7311").is_empty()
    })
    .await;
    let told_at = fake.requests_for("7311")[0].at;
    let mut other = polling("polling");
    other.retain(|(k, _)| *k != "ecwid.api.token");
    other.push(("ecwid.api.token", "secret_another_token"));
    pipeline
        .create_instance("7312", &receiver.url(), &other)
        .await;
    wait_until(
        Duration::from_secs(20),
        "the other store polled",
        || async {
            fake.requests_for("7312")
                .iter()
                .any(|r| r.path == "latest-stats" && r.status == 200)
        },
    )
    .await;
    let shown = wait_poll_error(&pipeline, &hostile, "Retry-After", Duration::from_secs(20)).await;
    assert_eq!(shown["pollerStatus"], "retrying", "{shown}");
    // The hostile store is polled again, once the clamped wait is over and not before.
    wait_until(
        Duration::from_secs(30),
        "the hostile store polled again",
        || async { fake.requests_for("7311").len() >= 2 },
    )
    .await;
    let again = fake.requests_for("7311")[1].at.duration_since(told_at);
    assert!(
        again >= Duration::from_millis(7900),
        "asked again after {again:?}, within the 8 s pause"
    );
    wait_until(
        Duration::from_secs(20),
        "the hostile store ok again",
        || async { poller_status(&pipeline, &hostile).await["pollerStatus"] == "ok" },
    )
    .await;
    poller.stop().await;
    pipeline.stop().await;
}

/// The list requests (`products`) the fake got for `store`, as (updatedTo, offset).
fn product_pages(fake: &FakeEcwid, store: &str) -> Vec<(String, usize)> {
    fake.requests_for(store)
        .iter()
        .filter(|r| r.path == "products")
        .map(|r| {
            (
                r.query.get("updatedTo").cloned().unwrap_or_default(),
                r.query
                    .get("offset")
                    .and_then(|o| o.parse().ok())
                    .unwrap_or(0),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_total_that_keeps_growing_is_cut_short_and_the_next_cycle_goes_on() {
    let nats = NatsServer::start().await;
    let fake = FakeEcwid::start().await;
    fake.add_store("7321", TOKEN);
    fake.set_always_changed("7321");
    fake.misbehave("7321", Misbehavior::GrowingTotal);
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    let poller = start_poller(&nats.url(), &fake.url(), &[("POLLER_CYCLE_MAX_PAGES", "5")]).await;
    let mut settings = polling("polling");
    settings.push(("event.objects", "products"));
    let id = pipeline
        .create_instance("7321", &receiver.url(), &settings)
        .await;
    let shown = wait_poll_error(
        &pipeline,
        &id,
        "POLLER_CYCLE_MAX_PAGES",
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(shown["pollerStatus"], "behind", "{shown}");
    // The next cycle reads the same window from where the first stopped.
    wait_until(
        Duration::from_secs(30),
        "the second cycle's pages",
        || async { product_pages(&fake, "7321").len() >= 10 },
    )
    .await;
    let pages = product_pages(&fake, "7321");
    let offsets: Vec<usize> = pages.iter().map(|(_, o)| *o).take(10).collect();
    assert_eq!(offsets, [0, 100, 200, 300, 400, 500, 600, 700, 800, 900]);
    assert!(
        pages[..10].iter().all(|(to, _)| *to == pages[0].0),
        "one window: {pages:?}"
    );
    // Each cycle (one latest-stats each) read at most 5 pages.
    let mut in_cycle = 0;
    for r in fake.requests_for("7321") {
        if r.path == "latest-stats" {
            in_cycle = 0;
        } else {
            in_cycle += 1;
            assert!(in_cycle <= 5, "more than 5 pages in one cycle");
        }
    }
    poller.stop().await;
    pipeline.stop().await;
}

#[tokio::test]
async fn an_endless_cycle_stops_when_its_instance_is_deleted_and_its_reads_are_not_dead_lettered() {
    let nats = NatsServer::start().await;
    let fake = FakeEcwid::start().await;
    fake.add_store("7322", TOKEN);
    fake.set_always_changed("7322");
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    // Bounds far away: only the deletion can stop this cycle.
    let poller = start_poller(
        &nats.url(),
        &fake.url(),
        &[
            ("POLLER_CYCLE_MAX_PAGES", "1000000"),
            ("POLLER_CYCLE_MAX_MS", "3600000"),
        ],
    )
    .await;
    let mut settings = polling("polling");
    settings.push(("event.objects", "products"));
    let id = pipeline
        .create_instance("7322", &receiver.url(), &settings)
        .await;
    // The first cycle sets the cursors; the pages grow from the second on.
    wait_until(Duration::from_secs(20), "the first poll", || async {
        fake.requests_for("7322")
            .iter()
            .any(|r| r.path == "latest-stats")
    })
    .await;
    fake.misbehave("7322", Misbehavior::GrowingTotal);
    wait_until(Duration::from_secs(30), "the endless pages", || async {
        product_pages(&fake, "7322").len() >= 10
    })
    .await;
    let (status, _) = pipeline
        .admin_request(Method::DELETE, &format!("/instances/{id}"), None)
        .await;
    assert_eq!(status, 204);
    wait_until(
        Duration::from_secs(15),
        "no request for 2 s after the deletion",
        || async {
            fake.requests_for("7322")
                .last()
                .is_some_and(|r| r.at.elapsed() > Duration::from_secs(2))
        },
    )
    .await;
    // What the poller stored before it stopped is dropped by the normalizer, not dead-lettered
    // as `no_instance` (letters nothing would ever expire).
    integration_tests::wait_settled(&nats.url(), Duration::from_secs(30)).await;
    let js = async_nats::jetstream::new(connect(&nats.url()).await);
    let dead = js
        .get_stream(shared::nats::DEAD_STREAM)
        .await
        .expect("dead stream");
    let normalize = shared::nats::dead_subject("normalize", "7322");
    assert!(
        dead.get_last_raw_message_by_subject(&normalize)
            .await
            .is_err(),
        "a dead letter on {normalize}"
    );
    poller.stop().await;
    pipeline.stop().await;
}

#[tokio::test]
async fn credentials_in_the_api_url_are_not_shown_on_the_status() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    // Nothing listens there: every request fails, and reqwest's error names the URL.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let api = format!("http://apiuser:pw-topsecret@{closed}/api/v3?key=q-topsecret");
    let poller = start_poller(&nats.url(), &api, &[]).await;
    let id = pipeline
        .create_instance("7331", &receiver.url(), &polling("polling"))
        .await;
    let shown = wait_poll_error(&pipeline, &id, "request failed", Duration::from_secs(30)).await;
    let text = shown.to_string();
    assert!(!text.contains("topsecret"), "{text}");
    assert!(!text.contains("apiuser"), "{text}");
    poller.stop().await;
    pipeline.stop().await;
}

#[tokio::test]
async fn a_token_with_control_characters_is_refused_naming_the_key() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    for token in ["secret_abc\u{0}def", "secret_abc\r\nX-Injected: 1"] {
        let body = json!({
            "element": {"key": "ecwid"},
            "name": "hostile token",
            "configuration": {
                "ecwid.store.id": "7341",
                "event.notification.enabled": "true",
                "event.notification.callback.url": receiver.url(),
                "event.vendor.type": "polling",
                "ecwid.api.token": token,
            },
        });
        let (status, shown) = pipeline
            .admin_request(Method::POST, "/instances", Some(body))
            .await;
        assert_eq!(status, 422, "{shown}");
        assert_eq!(shown["field"], "configuration.ecwid.api.token", "{shown}");
        assert!(!shown.to_string().contains("secret_abc"), "{shown}");
    }
    pipeline.stop().await;
}
