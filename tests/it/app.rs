//! App mode against a fake Ecwid OAuth server (tests/src/fake_ecwid.rs, Ecwid's documented
//! authorize and token exchange): an install provisions the store and the poller reads with its
//! token; the app's secret verifies the store's webhooks; forged and replayed states are
//! refused; a reinstall updates the token and resumes; an uninstall disables at once and the
//! purge follows when due; a declined install and a code Ecwid refuses provision nothing.

use std::time::Duration;

use integration_tests::fake_ecwid::FakeEcwid;
use integration_tests::{
    connect, ecwid_signature, metric, order_created, test_vars, wait_until, Behavior, NatsServer,
    Pipeline, Receiver,
};
use reqwest::Method;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const CLIENT_ID: &str = "ecwid-events-test-app";
const APP_SECRET: &str = "app-client-secret-0123456789";
const REDIRECT: &str = "https://events.example.com/ecwid/oauth/callback";
const WAIT: Duration = Duration::from_secs(30);

fn template(receiver: &Receiver) -> String {
    json!({
        "element": {"key": "ecwid"},
        "configuration": {
            "event.notification.enabled": "true",
            "event.notification.callback.url": format!("{}/{{storeId}}", receiver.url()),
            "event.notification.signature.key": "app-signature-key",
            "event.vendor.type": "webhooks,polling",
            "event.poller.refresh_interval": "0.05",
        },
        "tags": ["app"],
        "name": "Store {storeId}",
    })
    .to_string()
}

async fn start(
    nats: &NatsServer,
    fake: &FakeEcwid,
    receiver: &Receiver,
    purge_after: &str,
) -> Pipeline {
    fake.register_app(CLIENT_ID, APP_SECRET);
    let (oauth, template) = (fake.oauth_url(), template(receiver));
    Pipeline::start(
        &nats.url(),
        &[
            ("ECWID_APP_CLIENT_ID", CLIENT_ID),
            ("ECWID_APP_CLIENT_SECRET", APP_SECRET),
            ("ECWID_APP_REDIRECT_URL", REDIRECT),
            ("ECWID_OAUTH_URL", &oauth),
            ("ECWID_APP_INSTANCE_TEMPLATE", &template),
            ("ECWID_APP_PURGE_AFTER", purge_after),
        ],
    )
    .await
}

/// A client that follows no redirect, as a test of where each one points must.
fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

fn location(r: &reqwest::Response) -> String {
    r.headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .expect("a Location")
        .to_owned()
}

/// A merchant's way from `GET /ecwid/install` through Ecwid's authorization page: the callback
/// URL Ecwid sends them back to, on this pipeline's listener.
async fn authorize(pipeline: &Pipeline, fake: &FakeEcwid) -> String {
    let http = browser();
    let r = http
        .get(format!("http://{}/ecwid/install", pipeline.webhook))
        .send()
        .await
        .expect("install");
    assert_eq!(r.status().as_u16(), 303);
    let to_ecwid = url::Url::parse(&location(&r)).expect("a URL");
    assert!(to_ecwid
        .as_str()
        .starts_with(&format!("{}/authorize?", fake.oauth_url())));
    let q: std::collections::HashMap<_, _> = to_ecwid.query_pairs().into_owned().collect();
    assert_eq!(q["client_id"], CLIENT_ID);
    assert_eq!(q["redirect_uri"], REDIRECT);
    assert_eq!(q["response_type"], "code");
    assert!(!q["scope"].is_empty() && !q["state"].is_empty());
    assert!(!to_ecwid.as_str().contains(APP_SECRET));
    let r = http.get(to_ecwid).send().await.expect("Ecwid's authorize");
    assert_eq!(r.status().as_u16(), 302);
    let back = location(&r);
    assert!(back.starts_with(REDIRECT), "{back}");
    back.replacen(
        "https://events.example.com",
        &format!("http://{}", pipeline.webhook),
        1,
    )
}

/// Opens the callback URL: its status and page.
async fn open(url: &str) -> (u16, String) {
    let r = browser().get(url).send().await.expect("callback");
    let status = r.status().as_u16();
    (status, r.text().await.unwrap_or_default())
}

async fn instance(pipeline: &Pipeline, id: &str) -> Value {
    let (status, shown) = pipeline
        .admin_request(Method::GET, &format!("/instances/{id}"), None)
        .await;
    assert_eq!(status, 200, "{shown}");
    shown
}

async fn admin_metric(pipeline: &Pipeline, sample: &str) -> f64 {
    metric(&pipeline.metrics_text(pipeline.admin).await, sample).unwrap_or(0.0)
}

fn app_event(store: u64, event_id: &str, event_type: &str, data: Value) -> Value {
    json!({"eventId": event_id, "eventCreated": 1_764_000_100, "storeId": store,
           "entityId": CLIENT_ID, "eventType": event_type, "data": data})
}

async fn events(pipeline: &Pipeline, store: &str, ecwid_event_id: &str) -> Vec<Value> {
    let (status, page) = pipeline
        .admin_request(
            Method::GET,
            &format!("/events?store={store}&ecwidEventId={ecwid_event_id}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{page}");
    page["events"].as_array().cloned().unwrap_or_default()
}

async fn event_count(pipeline: &Pipeline, store: &str, ecwid_event_id: &str) -> usize {
    events(pipeline, store, ecwid_event_id).await.len()
}

/// Waits until the event's record says it was delivered: nothing more is written for it.
async fn wait_logged_delivered(pipeline: &Pipeline, store: &str, ecwid_event_id: &str) {
    wait_until(
        WAIT,
        &format!("{ecwid_event_id} logged as delivered"),
        || async {
            events(pipeline, store, ecwid_event_id)
                .await
                .iter()
                .any(|e| e["status"] == "delivered")
        },
    )
    .await;
}

struct Poller {
    cancel: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

async fn start_poller(nats_url: &str, api: &str) -> Poller {
    let vars = test_vars(
        nats_url,
        &[("ECWID_API_URL", api), ("POLLER_WINDOW_DELAY_MS", "0")],
    );
    let config = poller::Config::from_vars(&vars).expect("poller config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let cancel = CancellationToken::new();
    let (client, token) = (connect(nats_url).await, cancel.clone());
    let handle = tokio::spawn(async move {
        poller::run(config, listener, client, token)
            .await
            .expect("poller runs");
    });
    Poller { cancel, handle }
}

async fn wait_polled_with(fake: &FakeEcwid, store: &str, token: &str) {
    wait_until(
        WAIT,
        &format!("the poller to read with {token}"),
        || async {
            fake.requests_for(store)
                .iter()
                .any(|r| r.token == token && r.status == 200)
        },
    )
    .await;
}

#[tokio::test]
async fn install_webhooks_replays_reinstall_and_uninstall_with_an_immediate_purge() {
    let nats = NatsServer::start().await;
    let fake = FakeEcwid::start().await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    let pipeline = start(&nats, &fake, &receiver, "0").await;
    let poller = start_poller(&nats.url(), &fake.url()).await;
    let store = "4242";

    // The install: a new instance from the template, with the store's id and token.
    fake.approve_next_install(store, "secret_first_token");
    let callback = authorize(&pipeline, &fake).await;
    let (status, page) = open(&callback).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("The app is installed."), "{page}");
    assert!(!page.contains("secret_first_token") && !page.contains(APP_SECRET));
    assert_eq!(fake.token_requests(), vec![200]);
    pipeline.wait_instances_seen().await;
    let shown = instance(&pipeline, "app-4242").await;
    assert_eq!(shown["provisionedBy"], "app", "{shown}");
    assert_eq!(shown["state"], "active");
    assert!(shown["app"]["installedAt"].is_string(), "{shown}");
    assert_eq!(shown["name"], "Store 4242");
    let config = &shown["configuration"];
    assert_eq!(config["ecwid.store.id"], "4242");
    assert_eq!(config["ecwid.api.token"], "********");
    assert_eq!(
        config["event.notification.callback.url"],
        format!("{}/4242", receiver.url())
    );
    assert_eq!(
        admin_metric(&pipeline, "ecwid_app_installs_total{outcome=\"installed\"}").await,
        1.0
    );
    // The poller reads the store with the token the install got.
    wait_polled_with(&fake, store, "secret_first_token").await;

    // The state is good once: the same callback again is refused, and Ecwid is not asked.
    let (status, page) = open(&callback).await;
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("already used"), "{page}");
    assert_eq!(fake.token_requests(), vec![200]);
    // A state changed on the way is refused.
    let forged = {
        let mut url = url::Url::parse(&callback).expect("URL");
        let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
        url.query_pairs_mut().clear();
        for (k, v) in pairs {
            let v = if k == "state" {
                let (body, sig) = v.split_once('.').expect("body.signature");
                format!("{body}A.{sig}")
            } else {
                v
            };
            url.query_pairs_mut().append_pair(&k, &v);
        }
        url.to_string()
    };
    let (status, page) = open(&forged).await;
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("not made by this app"), "{page}");
    let (status, _) = open(&format!(
        "http://{}/ecwid/oauth/callback?code=x&state=made-up",
        pipeline.webhook
    ))
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        admin_metric(
            &pipeline,
            "ecwid_app_installs_total{outcome=\"replayed_state\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        admin_metric(
            &pipeline,
            "ecwid_app_installs_total{outcome=\"forged_state\"}"
        )
        .await,
        2.0
    );

    // Webhooks of the store are signed with the app's secret.
    let order = order_created(4242, "app-order-1");
    let (status, body) = pipeline
        .post_json(&order, Some(&ecwid_signature("another-secret", &order)))
        .await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = pipeline
        .post_json(&order, Some(&ecwid_signature(APP_SECRET, &order)))
        .await;
    assert_eq!(status, 200, "{body}");
    let got = receiver.wait_for(1, WAIT).await;
    assert_eq!(got[0].json()["message"]["raw"]["eventId"], "app-order-1");
    assert_eq!(got[0].json()["message"]["verified"], true);
    wait_logged_delivered(&pipeline, store, "app-order-1").await;

    // The uninstall: disabled at once, the token dropped, and (purge after 0) the data gone.
    let uninstalled = app_event(
        4242,
        "app-uninstall-1",
        "application.uninstalled",
        json!({}),
    );
    let (status, body) = pipeline
        .post_json(
            &uninstalled,
            Some(&ecwid_signature(APP_SECRET, &uninstalled)),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let shown = instance(&pipeline, "app-4242").await;
    assert_eq!(shown["state"], "disabled", "{shown}");
    assert!(shown["app"]["uninstalledAt"].is_string(), "{shown}");
    assert!(shown["app"]["purgedAt"].is_string(), "{shown}");
    assert!(
        shown["configuration"].get("ecwid.api.token").is_none(),
        "{shown}"
    );
    assert_eq!(event_count(&pipeline, store, "app-order-1").await, 0);
    assert_eq!(
        admin_metric(&pipeline, "ecwid_app_uninstalls_total").await,
        1.0
    );
    // Ecwid sending it again changes nothing.
    let (status, _) = pipeline
        .post_json(
            &uninstalled,
            Some(&ecwid_signature(APP_SECRET, &uninstalled)),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        admin_metric(&pipeline, "ecwid_app_uninstalls_total").await,
        1.0
    );
    // Nothing more is delivered: a new order is held (once the deliverer follows the state,
    // which every replica does within a second).
    wait_until(
        WAIT,
        "the deliverer to see the instance disabled",
        || async {
            let text = pipeline.metrics_text(pipeline.deliverer_ops).await;
            metric(&text, "ecwid_instances{state=\"disabled\"}") == Some(1.0)
        },
    )
    .await;
    let order = order_created(4242, "app-order-2");
    let (status, _) = pipeline
        .post_json(&order, Some(&ecwid_signature(APP_SECRET, &order)))
        .await;
    assert_eq!(status, 200);
    let js = async_nats::jetstream::new(connect(&nats.url()).await);
    let held = js
        .get_stream(shared::nats::HELD_STREAM)
        .await
        .expect("the hold");
    wait_until(WAIT, "the new order to be held", || async {
        held.direct_get_last_for_subject(shared::control::held_subject("app-4242"))
            .await
            .is_ok_and(|m| String::from_utf8_lossy(&m.payload).contains("app-order-2"))
    })
    .await;
    let delivered = |id: &str| {
        receiver
            .received()
            .iter()
            .any(|r| r.json()["message"]["raw"]["eventId"] == id)
    };
    assert!(!delivered("app-order-2"));

    // The reinstall: the same instance, the new token, resumed; what was held flows again.
    fake.approve_next_install(store, "secret_second_token");
    let (status, page) = open(&authorize(&pipeline, &fake).await).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("installed again"), "{page}");
    let shown = instance(&pipeline, "app-4242").await;
    assert_eq!(shown["state"], "active", "{shown}");
    assert!(shown["app"].get("uninstalledAt").is_none(), "{shown}");
    assert!(shown["app"].get("purgedAt").is_none(), "{shown}");
    assert_eq!(shown["configuration"]["ecwid.api.token"], "********");
    let (_, list) = pipeline
        .admin_request(Method::GET, "/instances?storeId=4242", None)
        .await;
    assert_eq!(
        list["instances"].as_array().map(Vec::len),
        Some(1),
        "{list}"
    );
    wait_polled_with(&fake, store, "secret_second_token").await;
    wait_until(WAIT, "the held order to be delivered", || async {
        delivered("app-order-2")
    })
    .await;
    assert_eq!(
        admin_metric(
            &pipeline,
            "ecwid_app_installs_total{outcome=\"reinstalled\"}"
        )
        .await,
        1.0
    );

    poller.cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), poller.handle).await;
    pipeline.stop().await;
}

#[tokio::test]
async fn a_purge_follows_when_due_and_an_operators_store_is_left_alone() {
    let nats = NatsServer::start().await;
    let fake = FakeEcwid::start().await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    let pipeline = start(&nats, &fake, &receiver, "3s").await;

    // A store an operator set up by hand keeps its instance.
    let own = pipeline.create_instance("5151", &receiver.url(), &[]).await;
    fake.approve_next_install("5151", "secret_admin_store");
    let (status, page) = open(&authorize(&pipeline, &fake).await).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("already connected"), "{page}");
    let shown = instance(&pipeline, &own).await;
    assert_eq!(shown["provisionedBy"], "admin");
    assert!(
        shown["configuration"].get("ecwid.api.token").is_none(),
        "{shown}"
    );
    let (_, list) = pipeline
        .admin_request(Method::GET, "/instances?storeId=5151", None)
        .await;
    assert_eq!(
        list["instances"].as_array().map(Vec::len),
        Some(1),
        "{list}"
    );
    assert_eq!(
        admin_metric(
            &pipeline,
            "ecwid_app_installs_total{outcome=\"admin_instance\"}"
        )
        .await,
        1.0
    );
    // The operator's instance is not signed with the app's secret: it has none of its own.
    let order = order_created(5151, "admin-order-1");
    assert_eq!(pipeline.post_json(&order, None).await.0, 200);

    // A merchant who declines, and a code Ecwid does not know, are refused and counted.
    let (status, page) = open(&authorize(&pipeline, &fake).await).await;
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("Ecwid did not authorize the app"), "{page}");
    fake.approve_next_install("7373", "secret_never_used");
    let callback = authorize(&pipeline, &fake).await;
    let mut bogus = url::Url::parse(&callback).expect("URL");
    let state: String = bogus
        .query_pairs()
        .find(|(k, _)| k == "state")
        .map(|(_, v)| v.into_owned())
        .expect("a state");
    bogus
        .query_pairs_mut()
        .clear()
        .append_pair("code", "a-code-ecwid-never-gave")
        .append_pair("state", &state);
    let (status, page) = open(bogus.as_str()).await;
    assert_eq!(status, 400, "{page}");
    assert_eq!(fake.token_requests().last(), Some(&400));
    assert_eq!(
        admin_metric(
            &pipeline,
            "ecwid_app_installs_total{outcome=\"refused_code\"}"
        )
        .await,
        2.0
    );
    let (_, list) = pipeline
        .admin_request(Method::GET, "/instances?storeId=7373", None)
        .await;
    assert_eq!(
        list["instances"].as_array().map(Vec::len),
        Some(0),
        "{list}"
    );

    // An app store: installed, an event logged, uninstalled; the purge comes when due.
    fake.approve_next_install("6262", "secret_app_store");
    let (status, page) = open(&authorize(&pipeline, &fake).await).await;
    assert_eq!(status, 200, "{page}");
    pipeline.wait_instances_seen().await;
    let order = order_created(6262, "due-order-1");
    let (status, _) = pipeline
        .post_json(&order, Some(&ecwid_signature(APP_SECRET, &order)))
        .await;
    assert_eq!(status, 200);
    receiver.wait_for(2, WAIT).await;
    wait_logged_delivered(&pipeline, "6262", "due-order-1").await;
    let uninstalled = app_event(
        6262,
        "due-uninstall-1",
        "application.uninstalled",
        json!({}),
    );
    let (status, _) = pipeline
        .post_json(
            &uninstalled,
            Some(&ecwid_signature(APP_SECRET, &uninstalled)),
        )
        .await;
    assert_eq!(status, 200);
    let shown = instance(&pipeline, "app-6262").await;
    assert_eq!(shown["state"], "disabled", "{shown}");
    assert!(shown["app"]["purgeDueAt"].is_string(), "{shown}");
    wait_until(WAIT, "the due purge", || async {
        instance(&pipeline, "app-6262").await["app"]["purgedAt"].is_string()
    })
    .await;
    assert_eq!(event_count(&pipeline, "6262", "due-order-1").await, 0);
    assert!(instance(&pipeline, "app-6262").await["app"]
        .get("purgeDueAt")
        .is_none());

    // A subscription change is shown on the instance.
    let changed = app_event(
        6262,
        "due-subscription-1",
        "application.subscriptionStatusChanged",
        json!({"newSubscriptionStatus": "ACTIVE"}),
    );
    let (status, _) = pipeline
        .post_json(&changed, Some(&ecwid_signature(APP_SECRET, &changed)))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        instance(&pipeline, "app-6262").await["app"]["subscriptionStatus"],
        "ACTIVE"
    );
    pipeline.stop().await;
}
