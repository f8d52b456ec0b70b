//! A real 3-node NATS cluster under faults: the services run as real processes with
//! `STREAM_REPLICAS=3` and the cluster's servers in a comma-separated `NATS_URL`. While a paced
//! sender posts webhooks, the server leading `ECWID_RAW` is SIGKILLed, then a follower (the stream
//! has no quorum), then both come back. Every webhook the ingest answered 200 must reach the
//! receiver; while there is no quorum the ingest answers 503 (never 4xx); the services reconnect
//! on their own, nobody restarts them. Duplicates are allowed (at-least-once) and reported.
//! Build the binaries first (`cargo build --workspace --bins`, which `make test` does).
//!
//! `cargo test -p integration-tests --test it cluster:: -- --nocapture` prints the figures
//! (tests/bench/RESULTS.md keeps a run's).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use integration_tests::procs::*;
use integration_tests::*;

/// Generous: an election on a loaded 2-core machine can take several seconds.
const RECOVER: Duration = Duration::from_secs(45);
const WAIT: Duration = Duration::from_secs(20);

fn ids(webhooks: &[Webhook]) -> Vec<String> {
    webhooks.iter().map(|w| w.event_id.clone()).collect()
}

/// Waits until `ECWID_RAW` has a leader that is not one of `not`; returns it and its replicas.
async fn wait_leader(
    client: &async_nats::Client,
    not: &[&str],
    nats: &NatsCluster,
) -> (String, Vec<String>) {
    wait_for(
        RECOVER,
        || format!("a leader of ECWID_RAW outside {not:?}:\n{}", nats.logs()),
        || async {
            NatsCluster::stream_leader(client, shared::nats::RAW_STREAM)
                .await
                .filter(|(leader, _)| !not.contains(&leader.as_str()))
        },
    )
    .await
}

#[tokio::test]
async fn a_nats_cluster_losing_its_leader_then_its_quorum_loses_nothing_acknowledged() {
    let mut nats = NatsCluster::start(3).await;
    let nats_url = nats.url();
    let cluster = Cluster::start(
        &nats_url,
        &[
            ("STREAM_REPLICAS", "3"),
            // Refusals come within a second while the stream cannot store.
            ("INGEST_PUBLISH_TIMEOUT_MS", "1000"),
        ],
        1,
    )
    .await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    cluster.create_instance("4101", &receiver.url(), &[]).await;
    let url = cluster.webhook_url();
    let client = connect(&nats_url).await;

    // ~48 s of webhooks at 25/s: still flowing when the quorum goes and comes back.
    let webhooks = order_webhooks(4101, "cluster", 1200);
    let probes = order_webhooks(4101, "cluster-probe", 3);
    let outage = order_webhooks(4101, "cluster-no-quorum", 5);
    let mut expected = ids(&webhooks);
    expected.extend(ids(&probes));
    expected.extend(ids(&outage));
    let load = Load::start(cluster.http.clone(), &url, webhooks, 8, Some(25.0));
    wait_until(WAIT, "50 webhooks acknowledged", || async {
        load.acked() >= 50
    })
    .await;

    // 1. The stream's leader dies mid-stream; the two others elect a new one.
    let (leader, _) = wait_leader(&client, &[], &nats).await;
    let killed_leader_at = Instant::now();
    nats.kill(&leader);
    let acked_at_leader_kill = load.acked();
    resend_until_accepted(&cluster.http, &url, vec![probes[0].clone()], RECOVER).await;
    let leader_recovery = killed_leader_at.elapsed();
    let (new_leader, _) = wait_leader(&client, &[&leader], &nats).await;

    // 2. A follower dies too: one server of three, no quorum. The ingest must refuse, with 503.
    let follower = nats
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .find(|n| *n != leader && *n != new_leader)
        .expect("a third server");
    assert!(
        load.sent() < load.total(),
        "the load must still be running when the quorum goes"
    );
    nats.kill(&follower);
    let lost_quorum_at = Instant::now();
    let mut during_outage = Vec::new();
    for webhook in &outage {
        during_outage.push(
            post_webhook(&cluster.http, &url, webhook)
                .await
                .map_err(|e| e.to_string()),
        );
    }
    assert!(
        during_outage.iter().all(|r| matches!(r, Ok(503))),
        "without quorum every webhook is refused with 503 (Ecwid retries those): {during_outage:?}"
    );

    // 3. Both come back; the services were never restarted.
    let outage_len = lost_quorum_at.elapsed();
    let restarted_at = Instant::now();
    nats.restart(&leader).await;
    nats.restart(&follower).await;
    resend_until_accepted(&cluster.http, &url, vec![probes[1].clone()], RECOVER).await;
    let quorum_recovery = restarted_at.elapsed();

    let report = load.finish(Duration::from_secs(90)).await;
    let unexpected: Vec<&String> = report
        .outcomes
        .keys()
        .filter(|k| *k != "200" && *k != "503")
        .collect();
    assert!(
        unexpected.is_empty(),
        "the ingest answers 200 or 503, nothing else: {:?}\n{}",
        report.outcomes,
        cluster.logs()
    );
    assert!(
        report.count("503") > 0,
        "the load saw the outage: {:?}",
        report.outcomes
    );

    // Nothing acknowledged is lost: every 200 reaches the receiver.
    let acked = report.acked.clone();
    let delivered_acked = wait_delivered(&[&receiver], &acked, Duration::from_secs(60), || {
        format!("{}\n{}", cluster.logs(), nats.logs())
    })
    .await;
    assert_eq!(delivered_acked.delivered, acked.len(), "{delivered_acked}");
    // A 503 is not a promise that nothing was stored: a publish the stream took after the
    // ingest stopped waiting is delivered anyway (and a resend is dropped as a duplicate).
    let seen = deliveries(&[&receiver]);
    let stored_though_refused = report
        .refused
        .iter()
        .filter(|w| seen.contains_key(&w.event_id))
        .count();

    // As Ecwid would: what was refused is sent again, and then everything arrives.
    let mut refused = report.refused.clone();
    refused.extend(outage.iter().cloned());
    refused.push(probes[2].clone());
    let resent = resend_until_accepted(&cluster.http, &url, refused, WAIT).await;
    let done = wait_delivered(&[&receiver], &expected, WAIT, || {
        format!("{}\n{}", cluster.logs(), nats.logs())
    })
    .await;

    // The services rode it out on their own connections.
    for p in cluster.all() {
        assert!(
            p.is_running() && p.starts == 1,
            "{} was restarted or died:\n{}",
            p.service.name(),
            p.log_tail(30)
        );
    }
    let mut ready: HashSet<&str> = HashSet::new();
    for p in cluster.all() {
        let ops = p.ops;
        wait_until(WAIT, &format!("{} ready again", p.service.name()), || {
            let http = cluster.http.clone();
            async move {
                matches!(http.get(format!("http://{ops}/readyz")).send().await, Ok(r) if r.status() == 200)
            }
        })
        .await;
        ready.insert(p.service.name());
    }

    eprintln!(
        "NATS cluster: leader {leader} killed with {acked_at_leader_kill} acknowledged, new \
         leader {new_leader} taking webhooks {leader_recovery:?} later; follower {follower} \
         killed, no quorum for {outage_len:?} (every probe 503); both restarted, webhooks \
         taken again {quorum_recovery:?} after the restart began. Load of {}: {:?}; acknowledged: \
         {delivered_acked}; refused yet delivered before any resend: {stored_though_refused}; \
         resends {:?}; in the end {done}; ready again: {ready:?}",
        load_total(&report),
        report.outcomes,
        resent.outcomes
    );
}

fn load_total(report: &SendReport) -> usize {
    report.outcomes.values().sum()
}
