//! Setting up the streams and buckets when every service starts at the same moment (issue 34):
//! nats-server 2.9.10 panicked on a stream update that arrived while another client's create of
//! the same stream was half done. Every replica now reads first and writes only what is missing
//! or different. These tests run on the pinned release in `cargo test` and on the minimum
//! supported one in `make test-nats-min`.

use std::time::Duration;

use integration_tests::procs::{process_env, sample_sum, Service, ServiceProc};
use integration_tests::{wait_until, NatsServer};
use serde_json::Value;

/// Streams (6) and buckets (7) the services set up.
const TOPOLOGY_STREAMS: usize = 13;
const ALL: [Service; 4] = [
    Service::Ingest,
    Service::Normalizer,
    Service::Deliverer,
    Service::Poller,
];

async fn writes(proc: &ServiceProc, action: &str) -> f64 {
    sample_sum(
        &proc.metrics().await,
        "ecwid_topology_writes_total",
        &[("action", action)],
    )
}

async fn stream_names(nats: &NatsServer) -> Vec<String> {
    use futures::TryStreamExt as _;
    let js = async_nats::jetstream::new(nats.client().await);
    js.stream_names().try_collect().await.expect("stream names")
}

#[tokio::test(flavor = "multi_thread")]
async fn every_service_started_at_once_on_a_fresh_server_becomes_ready_twenty_times() {
    for round in 1..=20 {
        let mut nats = NatsServer::start().await;
        let env = process_env(&nats.url(), &[]);
        let mut procs: Vec<ServiceProc> = ALL
            .iter()
            .map(|s| ServiceProc::new(*s, env.clone()))
            .collect();
        for proc in &mut procs {
            proc.spawn();
        }
        for proc in &mut procs {
            // Panics with the service's log when it exits or is not ready in time.
            proc.wait_ready().await;
        }
        assert!(
            nats.is_running(),
            "round {round}: nats-server died:\n{}",
            nats.log_tail(40)
        );
        let mut created = 0.0;
        for proc in &procs {
            assert_eq!(
                writes(proc, "update").await,
                0.0,
                "round {round}: {} updated a stream nobody had changed:\n{}",
                proc.service.name(),
                proc.log_tail(20)
            );
            created += writes(proc, "create").await;
        }
        // Two replicas that both find a stream missing may both create it (the server answers
        // the second identical create with the stream), but none is left out.
        assert!(
            created >= TOPOLOGY_STREAMS as f64,
            "round {round}: {created} creates"
        );
        assert_eq!(stream_names(&nats).await.len(), TOPOLOGY_STREAMS);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_writes_nothing_and_a_replica_set_otherwise_says_so() {
    let nats = NatsServer::start().await;
    let mut first = ServiceProc::start(Service::Normalizer, process_env(&nats.url(), &[])).await;
    assert_eq!(writes(&first, "create").await, TOPOLOGY_STREAMS as f64);
    assert_eq!(writes(&first, "update").await, 0.0);

    // The same settings again: nothing is created or updated.
    first.restart().await;
    assert_eq!(writes(&first, "create").await, 0.0);
    assert_eq!(writes(&first, "update").await, 0.0);
    let http = reqwest::Client::new();
    let readyz = |proc: &ServiceProc| {
        let url = format!("http://{}/readyz", proc.ops);
        let http = http.clone();
        async move {
            let response = http.get(url).send().await.expect("readyz");
            assert_eq!(response.status(), 200);
            response.json::<Value>().await.expect("readyz JSON")
        }
    };
    let report = readyz(&first).await;
    assert_eq!(report["topology"]["updated"], serde_json::json!([]));
    assert_eq!(report["topology"]["differences"], serde_json::json!([]));

    // A replica with a longer log retention: the envelopes and the log are kept longer, for
    // every replica. It says what differed, in its log, its readiness and its metrics.
    let other = ServiceProc::start(
        Service::Deliverer,
        process_env(&nats.url(), &[("EVENT_LOG_RETENTION", "10d")]),
    )
    .await;
    assert!(writes(&other, "update").await >= 1.0);
    let report = readyz(&other).await;
    let differences = report["topology"]["differences"]
        .as_array()
        .expect("differences")
        .clone();
    assert!(
        differences.iter().any(|d| d["name"] == "ECWID_EVENTS"
            && d["field"] == "max_age"
            && d["stored"] == "604800s"
            && d["wanted"] == "864000s"),
        "{report}"
    );
    assert!(
        other
            .log_tail(200)
            .contains("Stored stream setting differs from this replica's configuration"),
        "{}",
        other.log_tail(40)
    );
    // The stream now has the newer setting.
    let js = async_nats::jetstream::new(nats.client().await);
    wait_until(Duration::from_secs(5), "the update to be stored", || {
        let js = js.clone();
        async move {
            let mut stream = js.get_stream("ECWID_EVENTS").await.expect("stream");
            let info = stream.info().await.expect("info");
            info.config.max_age == Duration::from_secs(10 * 24 * 3600)
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_earlier_version_s_retry_markers_are_removed_at_the_upgrade() {
    let nats = NatsServer::start().await;
    let js = async_nats::jetstream::new(nats.client().await);
    // The earlier version's stream: one marker subject per retrying envelope.
    let mut old = shared::control::retrying_stream_config(1);
    old.max_messages_per_subject = 1;
    js.create_stream(old).await.expect("the old stream");
    for seq in 1..=5 {
        js.publish(format!("ecwid.retrying.i-1.{seq}"), "".into())
            .await
            .expect("publish")
            .await
            .expect("ack");
    }
    let proc = ServiceProc::start(Service::Normalizer, process_env(&nats.url(), &[])).await;
    assert!(writes(&proc, "update").await >= 1.0);
    let mut stream = js.get_stream("ECWID_RETRYING").await.expect("stream");
    let info = stream.info().await.expect("info");
    assert_eq!(
        (
            info.config.max_messages_per_subject,
            info.state.messages,
            info.state.subjects_count
        ),
        (-1, 0, 0),
        "the per-envelope markers are gone"
    );
}
