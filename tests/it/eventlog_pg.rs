//! The event log's PostgreSQL side against a real PostgreSQL started by the tests: deliveries go
//! on while PostgreSQL is down (the rows spooled, written when it is back, nothing lost), a
//! partition past retention is dropped by the services themselves, a purge removes what it says,
//! and the migrations apply to an empty database and to one at the previous version.

use std::time::Duration;

use integration_tests::pg::{self, Postgres};
use integration_tests::*;
use reqwest::Method;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

fn webhook(store: u64, event_id: &str, order: &str) -> Value {
    json!({"eventId": event_id, "eventCreated": 1_764_000_000, "storeId": store,
           "entityId": 1, "eventType": "order.updated", "data": {"orderId": order}})
}

async fn events(pipeline: &Pipeline, query: &str) -> Vec<Value> {
    let (status, body) = pipeline
        .admin_request(Method::GET, &format!("/events?{query}&limit=500"), None)
        .await;
    assert_eq!(status, 200, "{query}: {body}");
    body["events"].as_array().cloned().unwrap_or_default()
}

/// PostgreSQL stopped for a minute while webhooks keep coming: each is delivered while it is
/// down (its rows spooled), and once it is back every record is complete: nothing lost.
#[tokio::test]
async fn postgres_down_for_a_minute_holds_no_delivery_back_and_loses_no_record() {
    let mut postgres = Postgres::start();
    let url = postgres.new_database();
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[("EVENT_LOG_DATABASE_URL", &url)]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    pipeline.create_instance("9401", &receiver.url(), &[]).await;
    let mut sent = 0;
    for i in 0..3 {
        assert_eq!(
            pipeline
                .post_json(&webhook(9401, &format!("up-{i}"), "UP"), None)
                .await
                .0,
            200
        );
        sent += 1;
    }
    receiver.wait_for(sent, WAIT).await;

    postgres.stop();
    let down_since = std::time::Instant::now();
    // Webhooks all through the minute; each must be delivered while PostgreSQL is still down.
    while down_since.elapsed() < Duration::from_secs(60) {
        let (status, body) = pipeline
            .post_json(&webhook(9401, &format!("down-{sent}"), "DOWN"), None)
            .await;
        assert_eq!(status, 200, "the ingest takes webhooks: {body}");
        sent += 1;
        receiver.wait_for(sent, WAIT).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    assert!(!postgres.is_running(), "PostgreSQL stayed down throughout");
    let metrics = pipeline.metrics_text(pipeline.deliverer_ops).await;
    assert!(
        metric(&metrics, "ecwid_event_log_writes_total{to=\"spool\"}").unwrap_or(0.0) > 0.0,
        "rows went to the spool: {metrics}"
    );
    assert!(
        metric(&metrics, "ecwid_event_log_lag_seconds").unwrap_or(0.0) > 0.0,
        "the lag shows"
    );

    postgres.restart();
    assert_eq!(
        postgres.psql("postgres", "SELECT 1"),
        "1",
        "{}",
        postgres.log_tail()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let found = events(&pipeline, "store=9401").await;
        if found.len() == sent && found.iter().all(|e| e["status"] == "delivered") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "every record delivered in the log: {} of {sent} found; PostgreSQL running: {}; its log ends:\n{}",
            found.len(),
            postgres.is_running(),
            postgres.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_until(WAIT, "the spool to be empty and the lag 0", || async {
        let m = pipeline.metrics_text(pipeline.deliverer_ops).await;
        metric(&m, "ecwid_event_log_spooled") == Some(0.0)
            && metric(&m, "ecwid_event_log_lag_seconds") == Some(0.0)
    })
    .await;
    assert_eq!(receiver.count(), sent, "each delivered once");
    pipeline.stop().await;
}

/// A day older than `EVENT_LOG_RETENTION` is dropped whole when a service keeps the partitions
/// (at its start, then hourly).
#[tokio::test]
async fn a_partition_past_retention_is_dropped() {
    let nats = NatsServer::start().await;
    let mut pipeline = Pipeline::start(&nats.url(), &[]).await;
    for table in ["event_log_events", "event_log_attempts"] {
        pg::psql_for(
            &nats.url(),
            &format!(
                "CREATE TABLE {table}_p20200101 PARTITION OF {table} \
                 FOR VALUES FROM ('2020-01-01 00:00:00+00') TO ('2020-01-02 00:00:00+00')"
            ),
        );
    }
    pg::psql_for(
        &nats.url(),
        "INSERT INTO event_log_events (id, received_at, instance_id, store_id, object_type, \
         object_id, event_type, ecwid_event_id, format, verified, request_id, status, seq) \
         VALUES ('old-1', '2020-01-01 12:00:00+00', 'i', '1', 'orders', 'o', 'UPDATED', 'e', \
         'v3', true, 'r', 'pending', 1577880000000::bigint << 20)",
    );
    let today = pg::psql_for(
        &nats.url(),
        "SELECT count(*) FROM pg_class WHERE relname = 'event_log_events_p' || to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDD')",
    );
    assert_eq!(today, "1", "today's partition was made ahead");
    // A restarted deliverer keeps the partitions at its start.
    pipeline.stop_deliverer().await;
    pipeline.start_deliverer().await;
    wait_until(WAIT, "the old partitions to be dropped", || async {
        pg::psql_for(
            &nats.url(),
            "SELECT count(*) FROM pg_class WHERE relname LIKE 'event_log_%_p20200101'",
        ) == "0"
    })
    .await;
    assert_eq!(
        pg::psql_for(
            &nats.url(),
            "SELECT count(*) FROM event_log_events WHERE id = 'old-1'"
        ),
        "0"
    );
    pipeline.stop().await;
}

/// `DELETE /stores/{storeId}/data`: one object's records, then the whole store's with its dead
/// letters; a read token may not; what it says it removed is gone.
#[tokio::test]
async fn a_purge_removes_what_it_says() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(
        &nats.url(),
        &[("ADMIN_READ_TOKEN", "read-token-0123456789")],
    )
    .await;
    let ok = Receiver::start(Behavior::Status(200)).await;
    let failing = Receiver::start(Behavior::Status(500)).await;
    pipeline.create_instance("9402", &ok.url(), &[]).await;
    pipeline.create_instance("9402", &failing.url(), &[]).await;
    pipeline.create_instance("9403", &ok.url(), &[]).await;
    for (store, id, order) in [
        (9402, "p1", "KEEP"),
        (9402, "p2", "FORGET"),
        (9403, "p3", "FORGET"),
    ] {
        assert_eq!(
            pipeline.post_json(&webhook(store, id, order), None).await.0,
            200
        );
    }
    wait_until(WAIT, "four delivered and two dead records", || async {
        let found = events(&pipeline, "store=9402").await;
        let n = |s: &str| found.iter().filter(|e| e["status"] == s).count();
        n("delivered") == 2 && n("dead") == 2 && events(&pipeline, "store=9403").await.len() == 1
    })
    .await;

    let read_only = pipeline
        .http
        .delete(pipeline.admin_url("/stores/9402/data"))
        .bearer_auth("read-token-0123456789")
        .send()
        .await
        .expect("request");
    assert_eq!(read_only.status(), 403);
    let (status, body) = pipeline
        .admin_request(Method::DELETE, "/stores/9402/data?objectType=orders", None)
        .await;
    assert_eq!(status, 400, "{body}");

    let (status, body) = pipeline
        .admin_request(
            Method::DELETE,
            "/stores/9402/data?objectType=orders&objectId=FORGET",
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["removed"]["eventLogRecords"], 2, "{body}");
    assert_eq!(body["removed"]["deadLetters"], 1, "{body}");
    assert!(events(&pipeline, "store=9402&objectId=FORGET")
        .await
        .is_empty());
    assert_eq!(events(&pipeline, "store=9402&objectId=KEEP").await.len(), 2);
    assert_eq!(
        events(&pipeline, "store=9403").await.len(),
        1,
        "another store's record of the same object stays"
    );

    let (status, body) = pipeline
        .admin_request(Method::DELETE, "/stores/9402/data", None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["removed"]["eventLogRecords"], 2, "{body}");
    assert!(
        body["removed"]["eventLogAttempts"].as_u64().unwrap() >= 2,
        "{body}"
    );
    assert_eq!(body["removed"]["deadLetters"], 1, "{body}");
    assert!(events(&pipeline, "store=9402").await.is_empty());
    let (_, again) = pipeline
        .admin_request(Method::DELETE, "/stores/9402/data", None)
        .await;
    assert_eq!(again["removed"]["eventLogRecords"], 0, "{again}");
    assert_eq!(again["removed"]["deadLetters"], 0, "{again}");
    pipeline.stop().await;
}

/// The migrations apply to an empty database, and to one the previous version left (here: at
/// the first migration), each once, also when run again.
#[tokio::test]
async fn migrations_apply_to_an_empty_database_and_to_the_previous_version() {
    use shared::eventlog::pg::{migrate, pool, MIGRATIONS};
    let all: Vec<i32> = MIGRATIONS.iter().map(|m| m.0).collect();
    let database = |url: String| shared::config::DatabaseConfig {
        url,
        pool: 1,
        ca_file: None,
    };
    let empty = pool(&database(pg::shared().new_database())).expect("pool");
    assert_eq!(migrate(&empty, i32::MAX).await.expect("migrate"), all);
    assert_eq!(
        migrate(&empty, i32::MAX).await.expect("again"),
        Vec::<i32>::new()
    );

    let previous = pool(&database(pg::shared().new_database())).expect("pool");
    assert_eq!(migrate(&previous, 1).await.expect("to 1"), vec![1]);
    assert_eq!(
        migrate(&previous, i32::MAX).await.expect("the rest"),
        all[1..].to_vec()
    );
    let client = previous.get().await.expect("client");
    let indexes: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'event_log_events_object'",
            &[],
        )
        .await
        .expect("query")
        .get(0);
    assert_eq!(indexes, 1, "the later migration's index exists");
}
