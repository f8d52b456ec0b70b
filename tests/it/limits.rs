//! Per-instance limits across deliverer replicas (`event.notification.max.in.flight`,
//! `event.notification.rate.limit`): the deliverers run as real processes (two or three of
//! them) against a real nats-server, and the callbacks are real HTTP servers that record when
//! each request arrived and how many were open at once. Build the binaries first
//! (`cargo build --workspace --bins`, which `make test` does).
//!
//! The cases run one at a time (each starts five to seven processes, and the rate case reads
//! arrival times): `cargo test -p integration-tests --test it limits:: -- --nocapture` prints what
//! each observed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::Router;
use bytes::Bytes;
use integration_tests::procs::*;
use integration_tests::*;
use reqwest::Method;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// One case at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How a [`Recorder`] answers.
#[derive(Debug, Clone)]
enum Answer {
    /// 200 after this long.
    After(Duration),
    /// Never: the request stays open until the deliverer gives up on it.
    Never,
    /// 200 once the gate is open (`true`); until then the request stays open.
    Gate(tokio::sync::watch::Receiver<bool>),
}

#[derive(Debug, Default)]
struct Seen {
    /// Arrival time and Ecwid event id of every request.
    arrivals: Vec<(Instant, String)>,
    open: usize,
    max_open: usize,
}

/// A callback receiver that records arrivals and the most requests it had open at once.
#[derive(Debug)]
struct Recorder {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Seen>>,
    cancel: CancellationToken,
}

/// Counts a request as open until its handler ends, answered or dropped with its connection.
struct Open(Arc<Mutex<Seen>>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.lock().expect("lock").open -= 1;
    }
}

impl Recorder {
    async fn start(answer: Answer) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let app = Router::new()
            .fallback(move |State(seen): State<Arc<Mutex<Seen>>>, body: Bytes| {
                let answer = answer.clone();
                async move {
                    let event_id = serde_json::from_slice::<Value>(&body)
                        .ok()
                        .and_then(|v| v["message"]["raw"]["eventId"].as_str().map(str::to_owned))
                        .unwrap_or_default();
                    let _open = {
                        let mut s = seen.lock().expect("lock");
                        s.arrivals.push((Instant::now(), event_id));
                        s.open += 1;
                        s.max_open = s.max_open.max(s.open);
                        Open(Arc::clone(&seen))
                    };
                    match answer {
                        Answer::After(d) => tokio::time::sleep(d).await,
                        Answer::Never => std::future::pending::<()>().await,
                        Answer::Gate(mut gate) => {
                            let _ = gate.wait_for(|open| *open).await;
                        }
                    }
                    StatusCode::OK
                }
            })
            .with_state(Arc::clone(&seen));
        let cancel = CancellationToken::new();
        serve_until(listener, app, &cancel);
        Self { addr, seen, cancel }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.addr.port())
    }

    fn arrivals(&self) -> Vec<(Instant, String)> {
        self.seen.lock().expect("lock").arrivals.clone()
    }

    fn max_open(&self) -> usize {
        self.seen.lock().expect("lock").max_open
    }

    fn open(&self) -> usize {
        self.seen.lock().expect("lock").open
    }

    /// Waits until every one of `ids` arrived at least once.
    async fn wait_all(&self, ids: &[String], timeout: Duration, cluster: &Cluster) {
        wait_for(
            timeout,
            || {
                let arrived: std::collections::HashSet<String> =
                    self.arrivals().into_iter().map(|(_, id)| id).collect();
                let missing = ids.iter().filter(|id| !arrived.contains(*id)).count();
                format!(
                    "every event: {missing} of {} not delivered\n{}",
                    ids.len(),
                    cluster.logs()
                )
            },
            || async {
                let arrived: std::collections::HashSet<String> =
                    self.arrivals().into_iter().map(|(_, id)| id).collect();
                ids.iter().all(|id| arrived.contains(id)).then_some(())
            },
        )
        .await
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Sends `n` webhooks of `store`; all must be taken. Their event ids.
async fn send(cluster: &Cluster, store: u64, prefix: &str, n: usize) -> Vec<String> {
    let webhooks = order_webhooks(store, prefix, n);
    let ids: Vec<String> = webhooks.iter().map(|w| w.event_id.clone()).collect();
    let sent = send_all(&cluster.http, &cluster.webhook_url(), webhooks, 8).await;
    assert_eq!(
        sent.acked.len(),
        n,
        "the ingest took every webhook: {sent:?}"
    );
    ids
}

/// Sends `n` webhooks of `store` one after the other, each once the previous was taken; when
/// each was sent, by event id.
async fn send_timed(
    cluster: &Cluster,
    store: u64,
    prefix: &str,
    n: usize,
) -> std::collections::HashMap<String, Instant> {
    let mut sent = std::collections::HashMap::new();
    for webhook in order_webhooks(store, prefix, n) {
        let at = Instant::now();
        let status = post_webhook(&cluster.http, &cluster.webhook_url(), &webhook).await;
        assert!(
            matches!(status, Ok(200)),
            "{}: {status:?}",
            webhook.event_id
        );
        sent.insert(webhook.event_id, at);
    }
    sent
}

/// The 99th percentile of (first arrival at `recorder` − sent) over the events of `sent`.
fn p99(recorder: &Recorder, sent: &std::collections::HashMap<String, Instant>) -> Duration {
    let mut first: std::collections::HashMap<String, Instant> = std::collections::HashMap::new();
    for (at, id) in recorder.arrivals() {
        first.entry(id).or_insert(at);
    }
    let mut latencies: Vec<Duration> = sent
        .iter()
        .filter_map(|(id, sent_at)| Some(*first.get(id)? - *sent_at))
        .collect();
    latencies.sort();
    let index = (latencies.len() * 99).div_ceil(100).saturating_sub(1);
    latencies.get(index).copied().unwrap_or_default()
}

/// Every event log record of `instance`, waiting until there are `n` and all are delivered.
async fn delivered_records(cluster: &Cluster, instance: &str, n: usize) -> Vec<Value> {
    wait_for(
        Duration::from_secs(20),
        || format!("the event log to show {n} delivered events of {instance}"),
        || async {
            let (status, body) = cluster
                .admin_request(
                    Method::GET,
                    &format!("/events?instance={instance}&limit=500"),
                    None,
                )
                .await;
            assert_eq!(status, 200, "{body}");
            let events = body["events"].as_array().cloned().unwrap_or_default();
            (events.len() == n && events.iter().all(|e| e["status"] == "delivered"))
                .then_some(events)
        },
    )
    .await
}

/// Dead letters of `instance` (the API's first page).
async fn dead_letters(cluster: &Cluster, instance: &str) -> Vec<Value> {
    let (status, body) = cluster
        .admin_request(
            Method::GET,
            &format!("/dead-letters?instance={instance}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["deadLetters"].as_array().cloned().unwrap_or_default()
}

/// `ecwid_deliver_deferred_total{reason}` summed over the deliverers.
async fn deferred(cluster: &Cluster, reason: &str) -> f64 {
    let mut sum = 0.0;
    for d in &cluster.deliverers {
        sum += sample_sum(
            &d.metrics().await,
            "ecwid_deliver_deferred_total",
            &[("reason", reason)],
        );
    }
    sum
}

/// `ecwid_deliver_deferred_total` of every reason, summed over the deliverers: every put-back.
async fn put_backs(cluster: &Cluster) -> f64 {
    let mut sum = 0.0;
    for d in &cluster.deliverers {
        sum += sample_sum(&d.metrics().await, "ecwid_deliver_deferred_total", &[]);
    }
    sum
}

/// `name` (a deliverer metric without labels) summed over the deliverers.
async fn deliverer_sum(cluster: &Cluster, name: &str) -> f64 {
    let mut sum = 0.0;
    for d in &cluster.deliverers {
        sum += sample_sum(&d.metrics().await, name, &[]);
    }
    sum
}

/// Asserts that every record shows exactly one attempt: put-backs were not counted as attempts,
/// whichever replica the message came back to.
fn assert_one_attempt_each(records: &[Value]) {
    let spent: Vec<&Value> = records.iter().filter(|r| r["attempts"] != 1).collect();
    assert!(
        spent.is_empty(),
        "put-backs spent attempts: {} records show more than one: {spent:?}",
        spent.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_holds_across_three_replicas_and_spends_no_attempt() {
    let _one = SERIAL.lock().await;
    let nats = NatsServer::start().await;
    let cluster = Cluster::start(&nats.url(), &[], 3).await;
    // 300 ms an answer: with a limit of 2, 24 events keep both slots busy for ~4 s, and every
    // replica gets messages it must put back (three replicas share 2: one holds none).
    let slow = Recorder::start(Answer::After(Duration::from_millis(300))).await;
    let instance = cluster
        .create_instance(
            "5101",
            &slow.url(),
            &[("event.notification.max.in.flight", "2")],
        )
        .await;
    let ids = send(&cluster, 5101, "in-flight", 24).await;
    slow.wait_all(&ids, Duration::from_secs(60), &cluster).await;

    let put_back = deferred(&cluster, "instance_in_flight").await;
    let waited = deliverer_sum(&cluster, "ecwid_deliver_parked_total").await;
    eprintln!(
        "max.in.flight=2, 3 replicas: at most {} open at once, {} requests for 24 events, {put_back} put-backs, {waited} waits for a slot",
        slow.max_open(),
        slow.arrivals().len()
    );
    assert!(
        slow.max_open() <= 2,
        "{} requests were open at once; the limit is 2 across all replicas",
        slow.max_open()
    );
    // Reached: deliveries waited for a slot, or were put back by the replica whose share of
    // the limit is 0.
    assert!(
        put_back + waited > 0.0,
        "the limit was never reached, so this case tested nothing"
    );
    // Each event was sent once: a put-back is no attempt, and none failed.
    assert_eq!(slow.arrivals().len(), 24);
    let records = delivered_records(&cluster, &instance, 24).await;
    assert_one_attempt_each(&records);
    assert!(dead_letters(&cluster, &instance).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_holds_across_replicas() {
    let _one = SERIAL.lock().await;
    const RATE: f64 = 5.0;
    const REPLICAS: usize = 3;
    const EVENTS: usize = 45;
    let nats = NatsServer::start().await;
    // Small pull batches: every replica gets a part of the events. With the default (256) one
    // replica may take them all, and the case would not show whether the others hold their
    // share.
    let cluster = Cluster::start(
        &nats.url(),
        &[
            ("DELIVER_MAX_IN_FLIGHT", "2"),
            ("DELIVER_MAX_IN_FLIGHT_PER_HOST", "2"),
        ],
        REPLICAS,
    )
    .await;
    let fast = Recorder::start(Answer::After(Duration::ZERO)).await;
    let instance = cluster
        .create_instance(
            "5102",
            &fast.url(),
            &[("event.notification.rate.limit", "5")],
        )
        .await;
    // The events wait in the stream while the deliverers are frozen, then all three start on
    // them at once, each pulling two at a time: every replica has more than its share to send.
    // (Sent while the deliverers run, the events come only as fast as this machine's ingest
    // takes them, which may be under the limit.)
    for d in &cluster.deliverers {
        d.pause();
    }
    let ids = send(&cluster, 5102, "rate", EVENTS).await;
    let js = async_nats::jetstream::new(connect(&nats.url()).await);
    wait_until(Duration::from_secs(20), "the envelopes stored", || async {
        let (pending, in_hand) = consumer_backlog(
            &js,
            shared::nats::EVENTS_STREAM,
            shared::nats::DELIVERER_CONSUMER,
        )
        .await;
        pending + in_hand >= EVENTS as u64
    })
    .await;
    for d in &cluster.deliverers {
        d.resume();
    }
    fast.wait_all(&ids, Duration::from_secs(60), &cluster).await;

    let mut times: Vec<Instant> = fast.arrivals().into_iter().map(|(t, _)| t).collect();
    times.sort();
    // Each replica admits at `RATE / REPLICAS` per second from a bucket of one token, so any
    // window of T seconds holds at most RATE × T + one request per replica (the burst); the
    // requests' own latency on this machine moves an arrival by milliseconds, not by a request.
    let burst = REPLICAS;
    let busiest = times
        .iter()
        .map(|&from| {
            times
                .iter()
                .filter(|&&t| t >= from && t < from + Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0);
    let span = times[times.len() - 1] - times[0];
    let put_back = deferred(&cluster, "instance_rate").await;
    eprintln!(
        "rate.limit=5/s, {REPLICAS} replicas: {EVENTS} events in {span:?}, busiest second {busiest}, {put_back} put-backs"
    );
    assert!(
        busiest <= RATE as usize + burst,
        "{busiest} requests within one second; the limit is {RATE}/s across all replicas (+{burst} burst)"
    );
    // Over the whole run: EVENTS ≤ RATE × span + burst.
    let shortest = Duration::from_secs_f64((EVENTS - burst) as f64 / RATE);
    assert!(
        span >= shortest.mul_f64(0.97),
        "{EVENTS} requests in {span:?}; at {RATE}/s that takes at least {shortest:?}"
    );
    assert!(put_back > 0.0, "the rate limit was never reached");
    assert_eq!(fast.arrivals().len(), EVENTS, "each event sent once");
    let records = delivered_records(&cluster, &instance, EVENTS).await;
    assert_one_attempt_each(&records);
    assert!(dead_letters(&cluster, &instance).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_instance_does_not_hold_up_a_healthy_one() {
    let _one = SERIAL.lock().await;
    let nats = NatsServer::start().await;
    // Eight requests per replica in all, and requests that hang for 30 s before they time out:
    // without the instance limit, the stalled receiver's backlog would take every slot of both
    // replicas for 30 s at a time.
    let cluster = Cluster::start(
        &nats.url(),
        &[
            ("DELIVER_MAX_IN_FLIGHT", "8"),
            ("DELIVER_MAX_IN_FLIGHT_PER_HOST", "8"),
            ("DELIVER_TIMEOUT_MS", "30000"),
        ],
        2,
    )
    .await;
    let stalled = Recorder::start(Answer::Never).await;
    let healthy = Recorder::start(Answer::After(Duration::from_millis(5))).await;
    cluster
        .create_instance(
            "5103",
            &stalled.url(),
            &[("event.notification.max.in.flight", "2")],
        )
        .await;
    cluster.create_instance("5104", &healthy.url(), &[]).await;
    // The healthy instance alone first, for the latency figure printed at the end.
    let solo = send_timed(&cluster, 5104, "solo", 100).await;
    healthy
        .wait_all(
            &solo.keys().cloned().collect::<Vec<_>>(),
            Duration::from_secs(20),
            &cluster,
        )
        .await;
    let solo_p99 = p99(&healthy, &solo);

    let stalled_ids = send(&cluster, 5103, "stalled", 40).await;
    wait_until(
        Duration::from_secs(20),
        "the stalled receiver holding requests",
        || async { stalled.open() >= 2 },
    )
    .await;
    let started = Instant::now();
    let beside = send_timed(&cluster, 5104, "healthy", 100).await;
    let healthy_ids: Vec<String> = beside.keys().cloned().collect();
    // Within the 30 s the stalled requests hang: their slots never came free meanwhile.
    healthy
        .wait_all(&healthy_ids, Duration::from_secs(25), &cluster)
        .await;
    let took = started.elapsed();
    // A figure, not an assertion: the "p99 within 2x of solo" is a performance claim, and
    // this machine (debug builds, shared cores) is no place to hold one.
    eprintln!(
        "stalled beside healthy: 100 healthy events delivered in {took:?} while the stalled receiver held {} of {} events; healthy p99 webhook->callback {:?} beside it, {solo_p99:?} alone",
        stalled.open(),
        stalled_ids.len(),
        p99(&healthy, &beside),
    );
    assert_eq!(
        stalled.arrivals().len(),
        2,
        "only two requests may reach the stalled receiver (its max.in.flight) while they hang"
    );
    assert_eq!(stalled.max_open(), 2);
    // The stalled instance's other events wait in the replicas' queues, without a consumer slot.
    assert!(deliverer_sum(&cluster, "ecwid_deliver_parked").await > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_to_a_busy_instance_waits_for_its_slots_without_put_backs() {
    let _one = SERIAL.lock().await;
    const BURST: usize = 30;
    let nats = NatsServer::start().await;
    // One replica holds the whole limit (no share of 0 to put back for). Eight consumer slots:
    // were the busy instance's waiting deliveries holding them, the other instance's events
    // could not be taken. Requests may hang a minute: the gate opens long before.
    let cluster = Cluster::start(
        &nats.url(),
        &[
            ("DELIVER_MAX_IN_FLIGHT", "8"),
            ("DELIVER_MAX_IN_FLIGHT_PER_HOST", "8"),
            ("DELIVER_TIMEOUT_MS", "60000"),
        ],
        1,
    )
    .await;
    let (open, gate) = tokio::sync::watch::channel(false);
    let busy = Recorder::start(Answer::Gate(gate)).await;
    let other = Recorder::start(Answer::After(Duration::from_millis(5))).await;
    let busy_instance = cluster
        .create_instance(
            "5105",
            &busy.url(),
            &[("event.notification.max.in.flight", "2")],
        )
        .await;
    cluster.create_instance("5106", &other.url(), &[]).await;

    let busy_ids = send(&cluster, 5105, "burst", BURST).await;
    // Two in flight at the receiver, the other 28 waiting in the deliverer (the queue holds
    // 256 an instance by default).
    wait_until(
        Duration::from_secs(20),
        "two requests held and the rest of the burst waiting for a slot",
        || async {
            busy.open() == 2
                && deliverer_sum(&cluster, "ecwid_deliver_parked").await == (BURST - 2) as f64
        },
    )
    .await;
    let other_ids = send(&cluster, 5106, "beside", 20).await;
    other
        .wait_all(&other_ids, Duration::from_secs(20), &cluster)
        .await;
    // Delivered while the busy receiver still holds its two requests and nothing else of it
    // went out: not behind it.
    assert_eq!(busy.open(), 2, "the busy receiver still blocks");
    assert_eq!(
        busy.arrivals().len(),
        2,
        "only the busy instance's two slots were used"
    );
    assert_eq!(put_backs(&cluster).await, 0.0, "nothing was put back");

    open.send_replace(true);
    busy.wait_all(&busy_ids, Duration::from_secs(30), &cluster)
        .await;
    eprintln!(
        "burst of {BURST} at max.in.flight=2 beside another instance: {} requests, at most {} open, {} put-backs, {} waits for a slot",
        busy.arrivals().len(),
        busy.max_open(),
        put_backs(&cluster).await,
        deliverer_sum(&cluster, "ecwid_deliver_parked_total").await,
    );
    assert_eq!(busy.arrivals().len(), BURST, "each event sent once");
    assert_eq!(busy.max_open(), 2);
    assert_eq!(
        put_backs(&cluster).await,
        0.0,
        "the queue (256) is larger than the burst: nothing goes back to the server"
    );
    let records = delivered_records(&cluster, &busy_instance, BURST).await;
    assert_one_attempt_each(&records);
    wait_until(
        Duration::from_secs(10),
        "no delivery left waiting",
        || async { deliverer_sum(&cluster, "ecwid_deliver_parked").await == 0.0 },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_replica_is_ready_only_once_the_others_count_it() {
    let _one = SERIAL.lock().await;
    let nats = NatsServer::start().await;
    let cluster = Cluster::start(&nats.url(), &[], 2).await;
    let replicas_counted = |text: &str| sample_sum(text, "ecwid_deliver_replicas", &[]);
    for d in &cluster.deliverers {
        let text = d.metrics().await;
        assert_eq!(replicas_counted(&text), 2.0, "{}", d.log_tail(10));
    }

    let mut joiner = ServiceProc::new(Service::Deliverer, process_env(&nats.url(), &[]));
    joiner.spawn();
    let http = reqwest::Client::new();
    let readyz = format!("http://{}/readyz", joiner.ops);
    let starting_seen = std::cell::Cell::new(false);
    wait_for(
        READY_TIMEOUT,
        || {
            format!(
                "the joining deliverer to be ready:\n{}",
                joiner.log_tail(20)
            )
        },
        || {
            let (http, readyz, seen) = (http.clone(), readyz.clone(), &starting_seen);
            async move {
                let r = http.get(&readyz).send().await.ok()?;
                if r.status() == 200 {
                    return Some(());
                }
                let body: Value = r.json().await.unwrap_or_default();
                if body["reason"] == "starting" {
                    seen.set(true);
                }
                None
            }
        },
    )
    .await;
    assert!(
        starting_seen.get(),
        "the joiner was never seen waiting for the others (503 starting)"
    );
    // Ready now: the others have shrunk their shares for it already.
    for d in &cluster.deliverers {
        let text = d.metrics().await;
        assert_eq!(
            replicas_counted(&text),
            3.0,
            "a replica did not count the joiner before it got ready:\n{}",
            d.log_tail(10)
        );
    }
    // A graceful stop removes its entry: the others count two again as soon as the removal
    // reaches them through their watch on the bucket.
    joiner.terminate();
    assert!(joiner.wait_exit(Duration::from_secs(10)).await.is_some());
    for d in &cluster.deliverers {
        wait_until(
            Duration::from_secs(10),
            "two replicas counted again",
            || async { replicas_counted(&d.metrics().await) == 2.0 },
        )
        .await;
    }
    // One that dies unannounced is forgotten 12 s after its last put (limits::FORGET_AFTER).
    joiner.spawn();
    joiner.wait_ready().await;
    for d in &cluster.deliverers {
        assert_eq!(replicas_counted(&d.metrics().await), 3.0);
    }
    joiner.kill().await;
    for d in &cluster.deliverers {
        wait_until(
            Duration::from_secs(30),
            "a killed replica forgotten",
            || async { replicas_counted(&d.metrics().await) == 2.0 },
        )
        .await;
    }
}
