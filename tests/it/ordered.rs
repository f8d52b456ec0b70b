//! Ordered delivery (`event.notification.ordered=true`) with real processes: 3 normalizer and 3
//! deliverer replicas, a real nats-server and real receivers. An ordered instance gets its events
//! one at a time in the order the ingest accepted them (their `ECWID_RAW` sequence), even when
//! the webhooks arrive concurrently and several normalizers handle them; a head event that keeps
//! failing holds the ones after it (and shows as the blocked head) while an unordered instance of
//! the same store gets everything at once; a SIGKILL of the replica delivering the head gives it
//! to another replica after `ack_wait`, still first; turned off while blocked, the lane still
//! delivers what it holds in order while new events go unordered. Build the binaries first
//! (`cargo build --workspace --bins`).
//!
//! `cargo test -p integration-tests --test it ordered:: -- --nocapture` prints the timings.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use integration_tests::procs::*;
use integration_tests::*;
use shared::ordered::blocked_head;

/// Generous bound for anything that takes no retry or redelivery.
const WAIT: Duration = Duration::from_secs(30);

/// Ecwid event id → its `ECWID_RAW` sequence: the order the ingest accepted the events in.
async fn acceptance_order(js: &jetstream::Context) -> HashMap<String, u64> {
    let mut stream = js
        .get_stream(shared::nats::RAW_STREAM)
        .await
        .expect("raw stream");
    let state = stream.info().await.expect("raw stream info").state.clone();
    let mut order = HashMap::new();
    for seq in state.first_sequence..=state.last_sequence {
        let message = stream.get_raw_message(seq).await.expect("a raw message");
        let body: serde_json::Value =
            serde_json::from_slice(&message.payload).expect("a v3 webhook body");
        if let Some(id) = body["eventId"].as_str() {
            order.insert(id.to_owned(), seq);
        }
    }
    order
}

/// The Ecwid event ids of what `receiver` got, in arrival order (every request, retries too).
fn arrivals(receiver: &Receiver) -> Vec<String> {
    receiver
        .received()
        .iter()
        .map(|r| {
            r.json()["message"]["raw"]["eventId"]
                .as_str()
                .expect("the raw payload's eventId")
                .to_owned()
        })
        .collect()
}

/// Panics unless `arrived` (ids, arrival order) never goes back in acceptance order: an event
/// may arrive again (a retry, a redelivery) only before the next one.
fn assert_in_acceptance_order(arrived: &[String], order: &HashMap<String, u64>) {
    let seqs: Vec<u64> = arrived
        .iter()
        .map(|id| {
            *order
                .get(id)
                .unwrap_or_else(|| panic!("{id} was never accepted"))
        })
        .collect();
    for (i, pair) in seqs.windows(2).enumerate() {
        assert!(
            pair[0] <= pair[1],
            "arrival {} ({}, raw seq {}) came after {} (raw seq {}): out of order\n{arrived:?}",
            i + 1,
            arrived[i + 1],
            pair[1],
            arrived[i],
            pair[0]
        );
    }
}

/// The one among `ids` the ingest accepted first.
fn first_accepted<'a>(ids: &'a [String], order: &HashMap<String, u64>) -> &'a str {
    ids.iter()
        .min_by_key(|id| order[*id])
        .expect("at least one id")
}

fn ids(webhooks: &[Webhook]) -> Vec<String> {
    webhooks.iter().map(|w| w.event_id.clone()).collect()
}

/// A `deliverer` consumer created before the ordered lanes existed has no filter and would also
/// hand out the lanes' envelopes: start-up narrows it to `ecwid.events.>`.
#[tokio::test]
async fn an_unfiltered_deliverer_consumer_is_narrowed_at_start_up() {
    let nats = NatsServer::start().await;
    let js = jetstream::new(connect(&nats.url()).await);
    let topology = shared::topology::TopologyConfig {
        replicas: 1,
        duplicate_window: Duration::from_secs(60),
        log_retention: Duration::from_secs(3600),
        limits: Default::default(),
    };
    shared::topology::setup_topology(&js, &topology, &Default::default())
        .await
        .expect("topology");
    let config = |filter: &str| jetstream::consumer::pull::Config {
        durable_name: Some(shared::nats::DELIVERER_CONSUMER.to_owned()),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        filter_subject: filter.to_owned(),
        ..Default::default()
    };
    let old = shared::nats::ensure_pull_consumer(&js, shared::nats::EVENTS_STREAM, config(""))
        .await
        .expect("the old, unfiltered consumer");
    assert_eq!(old.cached_info().config.filter_subject, "");
    let mut new = shared::nats::ensure_pull_consumer(
        &js,
        shared::nats::EVENTS_STREAM,
        config("ecwid.events.>"),
    )
    .await
    .expect("the consumer narrowed");
    assert_eq!(
        new.info()
            .await
            .expect("consumer info")
            .config
            .filter_subject,
        "ecwid.events.>"
    );
}

#[tokio::test]
async fn ordered_instances_keep_acceptance_order_across_a_failing_head_a_sigkill_and_a_switch_off()
{
    let nats = NatsServer::start().await;
    // ack_wait = 2 s host slot + 5 s request + 15 s: how long a killed replica's head waits.
    let mut cluster = Cluster::start(&nats.url(), &[("DELIVER_TIMEOUT_MS", "5000")], 3).await;
    let js = jetstream::new(connect(&nats.url()).await);
    let log = integration_tests::pg::event_log_for(&nats.url()).await;

    // The ordered receiver fails its first three requests; the unordered one takes everything.
    let ordered_rx = Receiver::start(Behavior::Sequence(vec![503, 503, 503])).await;
    let unordered_rx = Receiver::start(Behavior::Status(200)).await;
    let ordered = cluster
        .create_instance(
            "5001",
            &ordered_rx.url(),
            &[
                ("event.notification.ordered", "true"),
                // Four attempts 2 s apart: the head is retried three times, then delivered.
                ("event.notification.retry.schedule", "2s,2s,2s"),
            ],
        )
        .await;
    cluster
        .create_instance("5001", &unordered_rx.url(), &[])
        .await;

    // 1. Thirty webhooks sent 8 at a time: the ingest accepts them in some order, three
    //    normalizers work on them at once, and the ordered instance must get that order.
    let first = order_webhooks(5001, "ordered-a", 30);
    let first_ids = ids(&first);
    let sent = send_all(&cluster.http, &cluster.webhook_url(), first, 8).await;
    assert_eq!(
        sent.acked.len(),
        30,
        "the ingest took every webhook: {sent:?}"
    );

    // The unordered instance is not held by the ordered one's failing head.
    let started = Instant::now();
    wait_delivered(&[&unordered_rx], &first_ids, WAIT, || cluster.logs()).await;
    // The head is blocked, visibly: failed at least once, the other 29 waiting behind it.
    // Read through the instance's health, as an operator would.
    let last = std::cell::RefCell::new(serde_json::Value::Null);
    let blocked = wait_for(
        WAIT,
        || format!("a blocked head with 29 waiting: {}", last.borrow()),
        || {
            let (cluster, last, ordered) = (&cluster, &last, &ordered);
            async move {
                let (status, health) = cluster
                    .admin_request(
                        reqwest::Method::GET,
                        &format!("/instances/{ordered}/health"),
                        None,
                    )
                    .await;
                assert_eq!(status, 200, "{health}");
                assert_eq!(health["ordered"], true, "{health}");
                let head = health["blockedEvent"].clone();
                *last.borrow_mut() = health;
                (head["waiting"].as_u64() == Some(29)).then_some(head)
            }
        },
    )
    .await;
    assert!(blocked["attempts"].as_u64() >= Some(1), "{blocked}");
    assert!(blocked["eventId"].is_string(), "{blocked}");
    let so_far = arrivals(&ordered_rx);
    assert!(
        so_far.iter().all(|id| *id == so_far[0]),
        "only the head may reach the ordered receiver while it fails: {so_far:?}"
    );
    eprintln!(
        "unordered instance had all 30 and the ordered head showed blocked ({blocked}) after {:?}",
        started.elapsed()
    );

    let done = wait_delivered(&[&ordered_rx], &first_ids, WAIT, || cluster.logs()).await;
    eprintln!("ordered instance: {done} after {:?}", started.elapsed());
    let order = acceptance_order(&js).await;
    let arrived = arrivals(&ordered_rx);
    assert_in_acceptance_order(&arrived, &order);
    let head = first_accepted(&first_ids, &order);
    assert_eq!(
        &arrived[..4],
        [head, head, head, head],
        "the first accepted event is tried four times before any other goes"
    );
    assert_eq!(arrived.len(), 33, "each event once, the head four times");
    assert_eq!(
        ordered_rx.received()[0].json()["message"]["eventId"],
        blocked["eventId"],
        "the blocked head named the event that was failing"
    );
    wait_until(WAIT, "the blocked head to clear", || {
        let (js, log, ordered) = (js.clone(), log.clone(), ordered.clone());
        async move {
            blocked_head(&js, &log, &ordered)
                .await
                .expect("blocked_head reads")
                .is_none()
        }
    })
    .await;

    // 2. The replica delivering the head is SIGKILLed mid-request: after ack_wait another
    //    replica delivers it, still first, and the rest follow in order.
    ordered_rx.set_behavior(Behavior::Hang);
    let before = ordered_rx.count();
    let second = order_webhooks(5001, "ordered-b", 10);
    let second_ids = ids(&second);
    let sent = send_all(&cluster.http, &cluster.webhook_url(), second, 8).await;
    assert_eq!(
        sent.acked.len(),
        10,
        "the ingest took every webhook: {sent:?}"
    );
    wait_delivered(&[&unordered_rx], &second_ids, WAIT, || cluster.logs()).await;
    ordered_rx.wait_for(before + 1, WAIT).await;
    // The replica whose request hangs: the only one with a request in flight, once the
    // unordered deliveries' gauges (decremented after their answers) have settled.
    let holder = wait_for(
        Duration::from_secs(3),
        || "one request in flight in one replica".to_owned(),
        || async {
            let mut in_flight = Vec::new();
            for deliverer in &cluster.deliverers {
                in_flight.push(sample_sum(
                    &deliverer.metrics().await,
                    "ecwid_deliver_in_flight",
                    &[],
                ));
            }
            (in_flight.iter().sum::<f64>() == 1.0)
                .then(|| in_flight.iter().position(|n| *n == 1.0))
                .flatten()
        },
    )
    .await;
    let killed_at = Instant::now();
    cluster.deliverers[holder].kill().await;
    ordered_rx.set_behavior(Behavior::Status(200));

    let done = wait_delivered(&[&ordered_rx], &second_ids, Duration::from_secs(60), || {
        cluster.logs()
    })
    .await;
    eprintln!(
        "after the SIGKILL of deliverer {holder}: {done} within {:?}",
        killed_at.elapsed()
    );
    let order = acceptance_order(&js).await;
    let arrived = arrivals(&ordered_rx);
    assert_in_acceptance_order(&arrived, &order);
    let head = first_accepted(&second_ids, &order);
    assert_eq!(
        &arrived[before..before + 2],
        [head, head],
        "the head that hung is delivered again before any later event"
    );
    assert_eq!(
        arrived.len(),
        before + 11,
        "each event once, the head twice"
    );

    // 3. What ordering costs, with the killed replica back: 200 events sent 8 at a time. The
    //    head fails three times (~6 s), long enough for the normalizers to store the other 199 in the
    //    lane (timed with blocked_head); then the lane drains at its own pace (timed at the
    //    receiver). The unordered instance is timed from the first send to its last delivery.
    cluster.deliverers[holder].spawn();
    cluster.deliverers[holder].wait_ready().await;
    ordered_rx.set_behavior(Behavior::Sequence(vec![503, 503, 503]));
    let before = ordered_rx.count();
    let third = order_webhooks(5001, "ordered-c", 200);
    let third_ids = ids(&third);
    let started = Instant::now();
    let sent = send_all(&cluster.http, &cluster.webhook_url(), third, 8).await;
    assert_eq!(
        sent.acked.len(),
        200,
        "the ingest took every webhook: {sent:?}"
    );
    let ingest_took = started.elapsed();
    wait_delivered(&[&unordered_rx], &third_ids, WAIT, || cluster.logs()).await;
    let unordered_took = started.elapsed();
    let mut all_in_lane = None;
    while all_in_lane.is_none() && ordered_rx.count() < before + 4 {
        let head = blocked_head(&js, &log, &ordered)
            .await
            .expect("blocked_head reads");
        if head.is_some_and(|b| b.waiting == 199) {
            all_in_lane = Some(started.elapsed());
        }
        assert!(started.elapsed() < WAIT, "the lane never held all 200");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all_in_lane = all_in_lane.expect("all 200 stored in the lane while the head failed");
    wait_delivered(&[&ordered_rx], &third_ids, Duration::from_secs(60), || {
        cluster.logs()
    })
    .await;
    let order = acceptance_order(&js).await;
    let arrived = arrivals(&ordered_rx);
    assert_in_acceptance_order(&arrived, &order);
    assert_eq!(
        arrived.len(),
        before + 203,
        "each event once, the head four times"
    );
    let received = ordered_rx.received();
    let drain = received[received.len() - 1].at - received[before + 3].at;
    let mut order_waits = 0.0;
    for normalizer in &cluster.normalizers {
        order_waits += sample_sum(
            &normalizer.metrics().await,
            "ecwid_normalizer_messages_total",
            &[("outcome", "order_wait")],
        );
    }
    eprintln!(
        "200 events: ingest took {ingest_took:?}; the unordered instance had all after \
         {unordered_took:?}; the ordered lane held all after {all_in_lane:?} ({:.0} events/s \
         through the normalizers' ordering) and delivered the 199 behind the head in {drain:?} \
         ({:.0} events/s); raw messages put back to wait for their turn: {order_waits}",
        200.0 / all_in_lane.as_secs_f64(),
        199.0 / drain.as_secs_f64(),
    );

    // 4. Ordered delivery turned off while the lane is blocked: what the lane holds is still
    //    delivered in order once the head goes through; new events go unordered at once.
    let d = order_webhooks(5001, "ordered-d", 5);
    let d_ids = ids(&d);
    ordered_rx.set_behavior(Behavior::FailEvent {
        event_id: d_ids[0].clone(),
        status: 503,
    });
    let before = ordered_rx.count();
    // One at a time: the ingest accepts them in this order, the first is the head.
    let sent = send_all(&cluster.http, &cluster.webhook_url(), d, 1).await;
    assert_eq!(
        sent.acked.len(),
        5,
        "the ingest took every webhook: {sent:?}"
    );
    wait_until(WAIT, "the d events to queue behind their head", || async {
        blocked_head(&js, &log, &ordered)
            .await
            .expect("blocked_head reads")
            .is_some_and(|b| b.waiting == 4)
    })
    .await;
    let (status, body) = cluster
        .admin_request(
            reqwest::Method::PATCH,
            &format!("/instances/{ordered}"),
            Some(serde_json::json!({"configuration": {
                "event.notification.ordered": "false",
                // Room for the head to wait out this phase without being dead-lettered.
                "event.notification.retry.schedule": "5s,5s,5s,5s",
            }})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    cluster.wait_instances_seen().await;
    let e = order_webhooks(5001, "ordered-e", 5);
    let e_ids = ids(&e);
    let sent = send_all(&cluster.http, &cluster.webhook_url(), e, 5).await;
    assert_eq!(
        sent.acked.len(),
        5,
        "the ingest took every webhook: {sent:?}"
    );
    wait_delivered(&[&ordered_rx], &e_ids, WAIT, || cluster.logs()).await;
    let held = tally(&[&ordered_rx], &d_ids[1..]);
    assert_eq!(
        held.delivered, 0,
        "the lane still holds the d events: {held}"
    );
    ordered_rx.set_behavior(Behavior::Status(200));
    wait_delivered(&[&ordered_rx], &d_ids, WAIT, || cluster.logs()).await;
    let arrived: Vec<String> = arrivals(&ordered_rx)[before..]
        .iter()
        .filter(|id| id.starts_with("ordered-d"))
        .cloned()
        .collect();
    let order = acceptance_order(&js).await;
    assert_in_acceptance_order(&arrived, &order);
    // The lane, drained and no longer wanted, stops on every replica.
    wait_until(WAIT, "the drained lane to stop", || async {
        let mut lanes = 0.0;
        for deliverer in &cluster.deliverers {
            lanes += sample_sum(
                &deliverer.metrics().await,
                "ecwid_deliver_ordered_lanes",
                &[],
            );
        }
        lanes == 0.0
    })
    .await;
}
