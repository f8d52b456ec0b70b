//! Graceful operation: each service, running as a real process under load, gets SIGTERM. It must
//! stop taking new work, finish what it has, drain NATS and exit 0, all within one budget
//! (`SHUTDOWN_GRACE_MS`, plus a small tolerance for process exit on a busy machine), even when
//! the work in hand cannot finish (a callback that never answers), and lose nothing it
//! acknowledged: every webhook the ingest answered 200 is delivered once the service (or a
//! replacement on the same ports) runs again. Build the binaries first
//! (`cargo build --workspace --bins`, which `make test` does).
//!
//! `cargo test -p integration-tests --test it sigterm:: -- --nocapture` prints each case's tally.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use integration_tests::procs::*;
use integration_tests::*;

const GRACE_MS: &str = "3000";
const GRACE: Duration = Duration::from_millis(3000);
/// Beyond the budget: signal delivery, process exit and scheduling on a busy 2-core machine. The
/// budget covers the drain too, so this is not a second grace period.
const EXIT_MARGIN: Duration = Duration::from_millis(1000);
const WAIT: Duration = Duration::from_secs(20);

/// Sends SIGTERM and asserts the process exits 0 within its budget.
async fn terminate_cleanly(proc: &mut ServiceProc) -> Duration {
    let name = proc.service.name();
    let started = Instant::now();
    proc.terminate();
    let status = proc.wait_exit(GRACE + EXIT_MARGIN).await;
    let took = started.elapsed();
    match status {
        None => panic!(
            "{name} still running {took:?} after SIGTERM (grace {GRACE:?}):\n{}",
            proc.log_tail(30)
        ),
        Some(status) => assert!(
            status.success(),
            "{name} exited with {status} after SIGTERM:\n{}",
            proc.log_tail(30)
        ),
    }
    took
}

#[tokio::test]
async fn ingest_sigterm_under_load_exits_0_and_loses_nothing_acknowledged() {
    let nats = NatsServer::start().await;
    let mut cluster = Cluster::start(&nats.url(), &[("SHUTDOWN_GRACE_MS", GRACE_MS)], 1).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    cluster.create_instance("5001", &receiver.url(), &[]).await;
    let url = cluster.webhook_url();
    let webhooks = order_webhooks(5001, "sigterm-ingest", 600);
    let all: Vec<String> = webhooks.iter().map(|w| w.event_id.clone()).collect();

    let load = Load::start(cluster.http.clone(), &url, webhooks, 8, Some(300.0));
    wait_until(WAIT, "100 webhooks acknowledged", || async {
        load.acked() >= 100
    })
    .await;
    let took = terminate_cleanly(&mut cluster.ingest).await;
    let report = load.finish(Duration::from_secs(60)).await;
    assert!(
        !report.refused.is_empty(),
        "the load must still be running when the ingest stops: {:?}",
        report.outcomes
    );
    let acked = report.acked.clone();

    // A replacement on the same ports; Ecwid sends the refused ones again.
    cluster.ingest.spawn();
    cluster.ingest.wait_ready().await;
    let resent = resend_until_accepted(&cluster.http, &url, report.refused, WAIT).await;
    let done = wait_delivered(&[&receiver], &acked, WAIT, || cluster.logs()).await;
    let everything = wait_delivered(&[&receiver], &all, WAIT, || cluster.logs()).await;
    eprintln!(
        "ingest SIGTERM: exited 0 after {took:?}; before the stop {:?}; resends {:?}; \
         acknowledged before the stop: {done}; all: {everything}",
        report.outcomes, resent.outcomes
    );
    assert_eq!(done.delivered, acked.len(), "{done}");
}

#[tokio::test]
async fn normalizer_sigterm_under_load_exits_0_and_loses_nothing_acknowledged() {
    let nats = NatsServer::start().await;
    let mut cluster = Cluster::start(
        &nats.url(),
        &[
            ("SHUTDOWN_GRACE_MS", GRACE_MS),
            // ack_wait 21 s: how long messages the old process held may take to come back.
            ("NORMALIZER_PUBLISH_TIMEOUT_MS", "500"),
        ],
        1,
    )
    .await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    cluster.create_instance("5002", &receiver.url(), &[]).await;
    let webhooks = order_webhooks(5002, "sigterm-normalizer", 600);

    let load = Load::start(
        cluster.http.clone(),
        &cluster.webhook_url(),
        webhooks,
        8,
        Some(300.0),
    );
    receiver.wait_for(100, WAIT).await;
    let at_stop = load.sent();
    let took = terminate_cleanly(&mut cluster.normalizers[0]).await;
    let report = load.finish(Duration::from_secs(60)).await;
    assert_eq!(
        report.acked.len(),
        600,
        "the ingest took every webhook: {report:?}"
    );
    assert!(
        at_stop < 600,
        "the load must still be running when the normalizer stops"
    );

    cluster.normalizers[0].spawn();
    cluster.normalizers[0].wait_ready().await;
    let restarted = Instant::now();
    let done = wait_delivered(&[&receiver], &report.acked, Duration::from_secs(50), || {
        cluster.logs()
    })
    .await;
    eprintln!(
        "normalizer SIGTERM: exited 0 after {took:?}, {at_stop} webhooks sent at the signal; \
         all delivered {:?} after the restart: {done}",
        restarted.elapsed()
    );
    assert_eq!(done.delivered, 600, "{done}");
}

#[tokio::test]
async fn deliverer_sigterm_under_load_exits_0_and_loses_nothing_acknowledged() {
    let nats = NatsServer::start().await;
    let mut cluster = Cluster::start(
        &nats.url(),
        &[
            ("SHUTDOWN_GRACE_MS", GRACE_MS),
            // ack_wait 18 s: how long messages the old process held may take to come back.
            ("DELIVER_TIMEOUT_MS", "1000"),
        ],
        1,
    )
    .await;
    // Slow answers: deliveries are in flight when SIGTERM comes, and must finish.
    let receiver = Receiver::start(Behavior::Slow(Duration::from_millis(100))).await;
    cluster.create_instance("5003", &receiver.url(), &[]).await;
    let webhooks = order_webhooks(5003, "sigterm-deliverer", 400);

    let load = Load::start(
        cluster.http.clone(),
        &cluster.webhook_url(),
        webhooks,
        8,
        Some(200.0),
    );
    receiver.wait_for(50, WAIT).await;
    let at_stop = load.sent();
    let delivered_at_stop = receiver.count();
    let took = terminate_cleanly(&mut cluster.deliverers[0]).await;
    let report = load.finish(Duration::from_secs(60)).await;
    assert_eq!(
        report.acked.len(),
        400,
        "the ingest took every webhook: {report:?}"
    );
    assert!(
        at_stop < 400,
        "the load must still be running when the deliverer stops"
    );

    cluster.deliverers[0].spawn();
    cluster.deliverers[0].wait_ready().await;
    let restarted = Instant::now();
    let done = wait_delivered(&[&receiver], &report.acked, Duration::from_secs(50), || {
        cluster.logs()
    })
    .await;
    eprintln!(
        "deliverer SIGTERM: exited 0 after {took:?}; {delivered_at_stop} requests received at \
         the signal; all delivered {:?} after the restart: {done}",
        restarted.elapsed()
    );
    assert_eq!(done.delivered, 400, "{done}");
}

/// Event ids of the requests `receiver` got at or after `since`.
fn delivered_since(receiver: &Receiver, since: Instant) -> HashSet<String> {
    receiver
        .received()
        .iter()
        .filter(|r| r.at >= since)
        .filter_map(|r| {
            r.json()["message"]["raw"]["eventId"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test]
async fn deliverer_sigterm_with_callbacks_hanging_and_nats_frozen_exits_0_within_its_budget() {
    let nats = NatsServer::start().await;
    let mut cluster = Cluster::start(
        &nats.url(),
        &[
            ("SHUTDOWN_GRACE_MS", GRACE_MS),
            // Longer than the budget: the requests in flight cannot end before it is spent.
            // ack_wait 22 s: when what the old process held comes back.
            ("DELIVER_TIMEOUT_MS", "5000"),
        ],
        1,
    )
    .await;
    // Takes the requests and never answers.
    let receiver = Receiver::start(Behavior::Hang).await;
    cluster.create_instance("5004", &receiver.url(), &[]).await;
    let webhooks = order_webhooks(5004, "sigterm-hang", 20);
    let sent = send_all(&cluster.http, &cluster.webhook_url(), webhooks, 8).await;
    assert_eq!(
        sent.acked.len(),
        20,
        "the ingest took every webhook: {sent:?}"
    );
    receiver.wait_for(10, WAIT).await;

    // NATS freezes too: the drain cannot finish either, and must not get a budget of its own.
    nats.pause();
    let took = terminate_cleanly(&mut cluster.deliverers[0]).await;
    nats.resume();
    // The work in hand got its share of the budget before it was abandoned.
    let work_share = GRACE - shared::shutdown::drain_reserve(GRACE);
    assert!(
        took >= work_share,
        "the deliverer exited after {took:?}, before the requests in flight had their \
         {work_share:?}:\n{}",
        cluster.deliverers[0].log_tail(30)
    );
    let hanging = receiver.count();

    // The callback recovers; a replacement delivers what the old process left unsettled.
    let recovered = Instant::now();
    receiver.set_behavior(Behavior::Status(200));
    cluster.deliverers[0].spawn();
    cluster.deliverers[0].wait_ready().await;
    wait_until(
        Duration::from_secs(50),
        "every webhook delivered after the restart",
        || async { delivered_since(&receiver, recovered).len() == 20 },
    )
    .await;
    eprintln!(
        "deliverer SIGTERM with {hanging} callbacks hanging and NATS frozen: exited 0 after {took:?} (budget \
         {GRACE:?}, work share {work_share:?}); all 20 delivered {:?} after the callback \
         recovered",
        recovered.elapsed(),
    );
}
