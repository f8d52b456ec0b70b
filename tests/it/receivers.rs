//! Reaching real receivers (issue 29), each against a real counterpart on loopback: a receiver
//! that demands a custom header, an HTTP CONNECT proxy (with the SSRF guard still refusing a
//! loopback target through it), an HTTPS receiver that demands a client certificate, an OAuth2
//! token endpoint (one token shared, a 401 refreshing it, a failing endpoint as `auth_error`),
//! and payload filters that pass, drop and fail to parse. The last suite runs the services as
//! processes and reads every line they logged for the secrets they were given.

use std::time::Duration;

use integration_tests::procs::{sample_sum, Cluster};
use integration_tests::receivers::{
    ConnectProxy, GuardedReceiver, Pki, TlsReceiver, TokenEndpoint,
};
use integration_tests::*;
use reqwest::Method;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

const HEADERS: &str = "event.notification.headers";
const PROXY_URL: &str = "event.notification.proxy.url";
const TLS_CERT: &str = "event.notification.tls.client.certificate";
const TLS_KEY: &str = "event.notification.tls.client.key";
const TLS_CA: &str = "event.notification.tls.ca";
const TOKEN_URL: &str = "event.notification.oauth2.token.url";
const CLIENT_ID: &str = "event.notification.oauth2.client.id";
const CLIENT_SECRET: &str = "event.notification.oauth2.client.secret";
const SCOPE: &str = "event.notification.oauth2.scope";
const FILTER: &str = "event.notification.filter";

/// An `order.updated` webhook whose payment status became `payment`.
fn payment(store: u64, event_id: &str, payment: &str) -> Value {
    json!({"eventId": event_id, "eventCreated": 1_764_000_000, "storeId": store,
           "entityId": 77, "eventType": "order.updated",
           "data": {"orderId": "XJ77", "newPaymentStatus": payment, "oldPaymentStatus": "AWAITING_PAYMENT"}})
}

fn product_updated(store: u64, event_id: &str) -> Value {
    json!({"eventId": event_id, "eventCreated": 1_764_000_000, "storeId": store,
           "entityId": 55, "eventType": "product.updated"})
}

async fn post(pipeline: &Pipeline, event: &Value) {
    let (status, body) = pipeline.post_json(event, None).await;
    assert_eq!(status, 200, "{body}");
}

/// `POST /instances/{id}/test`'s answer.
async fn test_event(pipeline: &Pipeline, id: &str) -> Value {
    let (status, answer) = pipeline
        .admin_request(Method::POST, &format!("/instances/{id}/test"), None)
        .await;
    assert_eq!(status, 200, "{answer}");
    answer
}

/// The event log's records for `query`, once there are `n`.
async fn records(pipeline: &Pipeline, query: &str, n: usize) -> Vec<Value> {
    wait_for(
        WAIT,
        || format!("{n} records for {query}"),
        || async {
            let (status, body) = pipeline
                .admin_request(Method::GET, &format!("/events?{query}&limit=100"), None)
                .await;
            let events = body["events"].as_array().cloned().unwrap_or_default();
            (status == 200 && events.len() >= n).then_some(events)
        },
    )
    .await
}

/// The first record for `query` once `ready` holds for it.
async fn record_where(pipeline: &Pipeline, query: &str, ready: impl Fn(&Value) -> bool) -> Value {
    wait_for(
        WAIT,
        || format!("a record for {query} as expected"),
        || async {
            let (_, body) = pipeline
                .admin_request(Method::GET, &format!("/events?{query}&limit=100"), None)
                .await;
            body["events"]
                .as_array()
                .and_then(|events| events.iter().find(|r| ready(r)).cloned())
        },
    )
    .await
}

async fn create_refused(pipeline: &Pipeline, config: &[(&str, &str)]) -> Value {
    let mut configuration = json!({"ecwid.store.id": "9990", "event.notification.enabled": "true",
                                   "event.notification.callback.url": "https://hooks.example.com/x"});
    for (k, v) in config {
        configuration[*k] = json!(v);
    }
    let (status, body) = pipeline
        .admin_request(
            Method::POST,
            "/instances",
            Some(json!({"configuration": configuration})),
        )
        .await;
    assert_eq!(status, 422, "{config:?}: {body}");
    body
}

#[tokio::test]
async fn custom_headers_reach_a_receiver_that_demands_them_and_their_values_stay_secret() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = GuardedReceiver::start(|h| {
        h.get("x-api-key").is_some_and(|v| v == "gateway-key-7")
            && h.get("x-tenant").is_some_and(|v| v == "acme")
    })
    .await;
    let headers = r#"{"X-Api-Key":"gateway-key-7","X-Tenant":"acme"}"#;
    let id = pipeline
        .create_instance("9501", &receiver.url(), &[(HEADERS, headers)])
        .await;
    post(&pipeline, &order_created(9501, "hdr-1")).await;
    wait_until(WAIT, "the delivery with the gateway's headers", || async {
        receiver.accepted().len() == 1
    })
    .await;
    assert_eq!(receiver.refused(), 0);
    // The test event carries them too.
    assert_eq!(test_event(&pipeline, &id).await["delivered"], true);

    // Names shown, values not; sent back as shown, the values are kept.
    let (_, shown) = pipeline
        .admin_request(Method::GET, &format!("/instances/{id}"), None)
        .await;
    let value = shown["configuration"][HEADERS].as_str().expect("headers");
    assert!(
        value.contains("X-Api-Key") && value.contains("X-Tenant"),
        "{value}"
    );
    assert!(!shown.to_string().contains("gateway-key-7"), "{shown}");
    let (status, patched) = pipeline
        .admin_request(
            Method::PATCH,
            &format!("/instances/{id}"),
            Some(json!({"configuration": {HEADERS: value}})),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    assert!(!patched.to_string().contains("gateway-key-7"));
    pipeline.wait_instances_seen().await;
    post(&pipeline, &order_created(9501, "hdr-2")).await;
    wait_until(WAIT, "a delivery after the PATCH", || async {
        receiver.accepted().len() == 3
    })
    .await;
    assert_eq!(receiver.refused(), 0, "the stored values were kept");

    // Refused naming the header.
    for (bad, named) in [
        (r#"{"Host":"evil.example"}"#, "Host"),
        (r#"{"Content-Length":"1"}"#, "Content-Length"),
        (
            r#"{"Elements-Webhook-Signature":"x"}"#,
            "Elements-Webhook-Signature",
        ),
        (r#"{"X-Evil":"a\r\nInjected: 1"}"#, "X-Evil"),
    ] {
        let body = create_refused(&pipeline, &[(HEADERS, bad)]).await;
        assert_eq!(body["field"], format!("configuration.{HEADERS}"), "{body}");
        assert!(
            body["message"].as_str().unwrap_or("").contains(named),
            "{body}"
        );
    }
    pipeline.stop().await;
}

#[tokio::test]
async fn deliveries_go_through_a_connect_proxy_that_widens_nothing_for_the_guard() {
    let nats = NatsServer::start().await;
    let proxy = ConnectProxy::start([127, 0, 0, 2], "egress", "proxy-pass-3").await;
    // The admin API takes loopback callbacks; the deliverer lets only 127.0.0.1 through, and the
    // proxy's own address by DELIVER_PROXY_ALLOW_NETWORKS alone.
    let pipeline = Pipeline::start_with(
        &nats.url(),
        &[("DELIVER_ALLOW_NETWORKS", "127.0.0.0/8")],
        &[
            ("DELIVER_ALLOW_NETWORKS", "127.0.0.1/32"),
            ("DELIVER_PROXY_URL", &proxy.url("egress", "proxy-pass-3")),
            ("DELIVER_PROXY_ALLOW_NETWORKS", "127.0.0.2/32"),
        ],
    )
    .await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    let id = pipeline.create_instance("9502", &receiver.url(), &[]).await;
    post(&pipeline, &order_created(9502, "proxy-1")).await;
    receiver.wait_for(1, WAIT).await;
    let tunnelled = format!("127.0.0.1:{}", receiver.addr.port());
    assert_eq!(
        proxy.targets(),
        vec![tunnelled.clone()],
        "through the proxy"
    );
    assert_eq!(test_event(&pipeline, &id).await["delivered"], true);
    assert_eq!(receiver.count(), 2);
    assert!(
        proxy.targets().iter().all(|t| *t == tunnelled),
        "the test event went through the proxy too (on the pooled tunnel): {:?}",
        proxy.targets()
    );

    // A loopback target the deliverer's guard refuses stays refused through the proxy.
    let hidden = Receiver::serve(
        tokio::net::TcpListener::bind("127.0.0.3:0")
            .await
            .expect("bind"),
        Behavior::Status(200),
    )
    .await;
    let hidden_url = format!("http://127.0.0.3:{}/hook", hidden.addr.port());
    let hidden_id = pipeline.create_instance("9503", &hidden_url, &[]).await;
    let answer = test_event(&pipeline, &hidden_id).await;
    assert_eq!(answer["delivered"], false, "{answer}");
    assert_eq!(answer["errorClass"], "refused", "{answer}");
    assert!(
        answer["error"].as_str().unwrap_or("").contains("loopback"),
        "{answer}"
    );
    assert_eq!(hidden.count(), 0);
    assert!(
        proxy.targets().iter().all(|t| t.starts_with("127.0.0.1:")),
        "the proxy was never asked for the refused target: {:?}",
        proxy.targets()
    );

    // The instance's own proxy overrides DELIVER_PROXY_URL; wrong credentials are the proxy's
    // failure, and the health page and the event log say so.
    let wrong_id = pipeline
        .create_instance(
            "9504",
            &receiver.url(),
            &[(PROXY_URL, &proxy.url("egress", "wrong-pass"))],
        )
        .await;
    let answer = test_event(&pipeline, &wrong_id).await;
    assert_eq!(answer["errorClass"], "proxy_error", "{answer}");
    assert!(
        answer["error"].as_str().unwrap_or("").contains("407"),
        "{answer}"
    );
    assert!(proxy.refused() >= 1);
    post(&pipeline, &order_created(9504, "proxy-407")).await;
    record_where(&pipeline, "ecwidEventId=proxy-407", |r| {
        r["lastStatus"] == "proxy_error"
            && r["lastError"].as_str().is_some_and(|e| e.contains("407"))
    })
    .await;
    let health = wait_for(
        WAIT,
        || "the proxy's failure on the health page".to_owned(),
        || async {
            let (_, h) = pipeline
                .admin_request(Method::GET, &format!("/instances/{wrong_id}/health"), None)
                .await;
            h["lastError"]
                .as_str()
                .is_some_and(|e| e.contains("proxy"))
                .then_some(h)
        },
    )
    .await;
    assert!(!health.to_string().contains("wrong-pass"), "{health}");

    // A proxy at an address DELIVER_PROXY_ALLOW_NETWORKS does not name is refused.
    let elsewhere = format!("http://egress:proxy-pass-3@127.0.0.1:{}", proxy.addr.port());
    let elsewhere_id = pipeline
        .create_instance("9505", &receiver.url(), &[(PROXY_URL, &elsewhere)])
        .await;
    let answer = test_event(&pipeline, &elsewhere_id).await;
    assert_eq!(answer["errorClass"], "proxy_error", "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap_or("")
            .contains("DELIVER_PROXY_ALLOW_NETWORKS"),
        "{answer}"
    );
    // The proxy's password is never shown.
    let (_, shown) = pipeline
        .admin_request(Method::GET, &format!("/instances/{wrong_id}"), None)
        .await;
    assert!(!shown.to_string().contains("wrong-pass"), "{shown}");
    pipeline.stop().await;
}

#[tokio::test]
async fn an_https_receiver_demanding_a_client_certificate_gets_one_and_refuses_the_rest() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let server_ca = Pki::new("receiver CA");
    let client_ca = Pki::new("client CA");
    let receiver = TlsReceiver::start(&server_ca.server(), &client_ca).await;
    let erp = client_ca.client("ecwid-events", rcgen::date_time_ymd(2031, 7, 9));
    let ca = server_ca.ca_pem();
    let id = pipeline
        .create_instance(
            "9506",
            &receiver.url(),
            &[
                (TLS_CERT, &erp.cert_pem),
                (TLS_KEY, &erp.key_pem),
                (TLS_CA, &ca),
            ],
        )
        .await;
    post(&pipeline, &order_created(9506, "mtls-1")).await;
    wait_until(WAIT, "the delivery over mutual TLS", || async {
        receiver.requests() == 1
    })
    .await;
    assert_eq!(test_event(&pipeline, &id).await["delivered"], true);

    // Without a certificate the receiver refuses the handshake.
    let anonymous = pipeline
        .create_instance("9507", &receiver.url(), &[(TLS_CA, &ca)])
        .await;
    let answer = test_event(&pipeline, &anonymous).await;
    assert_eq!(answer["delivered"], false, "{answer}");
    assert!(answer["status"].is_null(), "{answer}");
    assert!(receiver.handshakes_refused() >= 1);
    assert_eq!(receiver.requests(), 2, "nothing reached the handler");

    // The expiry on the health page; certificate and key never shown.
    let (_, health) = pipeline
        .admin_request(Method::GET, &format!("/instances/{id}/health"), None)
        .await;
    assert_eq!(health["clientCertificateExpiresAt"], "2031-07-09T00:00:00Z");
    let (_, shown) = pipeline
        .admin_request(Method::GET, &format!("/instances/{id}"), None)
        .await;
    assert_eq!(shown["configuration"][TLS_CERT], "********");
    assert_eq!(shown["configuration"][TLS_KEY], "********");
    assert!(!shown.to_string().contains("PRIVATE KEY"));
    assert!(shown["configuration"][TLS_CA]
        .as_str()
        .unwrap_or("")
        .contains("BEGIN CERTIFICATE"));

    // A certificate that expires within 14 days counts for the alert.
    let soon = client_ca.client(
        "expiring",
        time::OffsetDateTime::now_utc() + time::Duration::days(7),
    );
    pipeline
        .create_instance(
            "9508",
            &receiver.url(),
            &[
                (TLS_CERT, &soon.cert_pem),
                (TLS_KEY, &soon.key_pem),
                (TLS_CA, &ca),
            ],
        )
        .await;
    wait_until(WAIT, "one expiring certificate counted", || async {
        let text = pipeline.metrics_text(pipeline.deliverer_ops).await;
        metric(&text, "ecwid_deliver_client_certificates_expiring") == Some(1.0)
    })
    .await;

    // A key that is not one, a certificate without its key: 422 naming the key.
    let body = create_refused(&pipeline, &[(TLS_CERT, &erp.cert_pem), (TLS_KEY, "nope")]).await;
    assert_eq!(body["field"], format!("configuration.{TLS_KEY}"), "{body}");
    let body = create_refused(&pipeline, &[(TLS_CERT, &erp.cert_pem)]).await;
    assert_eq!(body["field"], format!("configuration.{TLS_KEY}"), "{body}");
    pipeline.stop().await;
}

#[tokio::test]
async fn oauth2_tokens_are_fetched_once_shared_refreshed_on_a_401_and_a_failing_endpoint_is_an_auth_error(
) {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let idp = TokenEndpoint::start("erp-client", "oauth-secret-5", 60).await;
    let checker = idp.clone();
    let receiver = GuardedReceiver::start(move |h| {
        checker.accepts(h.get("authorization").and_then(|v| v.to_str().ok()))
    })
    .await;
    let id = pipeline
        .create_instance(
            "9509",
            &receiver.url(),
            &[
                (TOKEN_URL, &idp.url()),
                (CLIENT_ID, "erp-client"),
                (CLIENT_SECRET, "oauth-secret-5"),
                (SCOPE, "webhooks:write"),
            ],
        )
        .await;
    for n in 0..4 {
        post(&pipeline, &order_created(9509, &format!("oauth-{n}"))).await;
    }
    wait_until(WAIT, "four deliveries with a token", || async {
        receiver.accepted().len() == 4
    })
    .await;
    assert_eq!(idp.requests(), 1, "one token for every delivery");
    assert_eq!(receiver.refused(), 0);

    // The receiver stops taking it: one 401, one new token, delivered in the same attempt.
    idp.revoke_all();
    post(&pipeline, &order_created(9509, "oauth-after-revoke")).await;
    wait_until(WAIT, "the delivery with a fresh token", || async {
        receiver.accepted().len() == 5
    })
    .await;
    assert_eq!((idp.requests(), receiver.refused()), (2, 1));
    let found = records(
        &pipeline,
        "ecwidEventId=oauth-after-revoke&status=delivered",
        1,
    )
    .await;
    assert_eq!(found[0]["attempts"], 1, "{}", found[0]);

    // The token endpoint fails: the attempt fails as auth_error, counted and logged.
    idp.revoke_all();
    idp.set_failing(true);
    let answer = test_event(&pipeline, &id).await;
    assert_eq!(answer["errorClass"], "auth_error", "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap_or("")
            .contains("token endpoint answered 500"),
        "{answer}"
    );
    post(&pipeline, &order_created(9509, "oauth-idp-down")).await;
    record_where(&pipeline, "ecwidEventId=oauth-idp-down", |r| {
        r["lastStatus"] == "auth_error"
    })
    .await;
    let text = pipeline.metrics_text(pipeline.deliverer_ops).await;
    assert!(
        sample_sum(
            &text,
            "ecwid_deliver_attempts_total",
            &[("outcome", "failure"), ("status_class", "auth_error")]
        ) >= 1.0
    );
    assert!(
        sample_sum(
            &text,
            "ecwid_deliver_oauth2_token_requests_total",
            &[("outcome", "error")]
        ) >= 1.0
    );
    // Back up: the next delivery gets a token (a failure is not cached).
    idp.set_failing(false);
    post(&pipeline, &order_created(9509, "oauth-idp-back")).await;
    records(&pipeline, "ecwidEventId=oauth-idp-back&status=delivered", 1).await;

    // Incomplete credentials, or an Authorization header beside them: 422 naming the key.
    let body = create_refused(&pipeline, &[(TOKEN_URL, "https://idp.example/token")]).await;
    assert_eq!(
        body["field"],
        format!("configuration.{CLIENT_ID}"),
        "{body}"
    );
    let body = create_refused(
        &pipeline,
        &[
            (TOKEN_URL, "https://idp.example/token"),
            (CLIENT_ID, "c"),
            (CLIENT_SECRET, "s"),
            (HEADERS, r#"{"Authorization":"Basic eDp5"}"#),
        ],
    )
    .await;
    assert_eq!(body["field"], format!("configuration.{HEADERS}"), "{body}");
    pipeline.stop().await;
}

#[tokio::test]
async fn payload_filters_pass_drop_and_refuse_to_parse() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let paid_only = Receiver::start(Behavior::Status(200)).await;
    let everything = Receiver::start(Behavior::Status(200)).await;
    let filtered_id = pipeline
        .create_instance(
            "9510",
            &paid_only.url(),
            &[(FILTER, "raw.data.newPaymentStatus == 'PAID'")],
        )
        .await;
    pipeline
        .create_instance("9510", &everything.url(), &[])
        .await;
    post(&pipeline, &payment(9510, "flt-paid", "PAID")).await;
    post(&pipeline, &payment(9510, "flt-unpaid", "AWAITING_PAYMENT")).await;
    post(&pipeline, &product_updated(9510, "flt-product")).await;
    everything.wait_for(3, WAIT).await;
    wait_settled(&pipeline.nats_url, WAIT).await;
    let got = paid_only.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].json()["message"]["raw"]["eventId"], "flt-paid");

    // Each dropped event has a record of its own, filtered, saying why.
    let found = records(
        &pipeline,
        &format!("instance={filtered_id}&status=filtered"),
        2,
    )
    .await;
    let mut ids: Vec<&str> = found
        .iter()
        .map(|r| r["ecwidEventId"].as_str().unwrap_or(""))
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["flt-product", "flt-unpaid"]);
    for r in &found {
        let why = r["lastError"].as_str().unwrap_or("");
        assert!(why.contains("event.notification.filter"), "{r}");
    }

    // A malformed filter is a 422 naming the key, with the parser's message.
    let body = create_refused(&pipeline, &[(FILTER, "raw.data.newPaymentStatus ==")]).await;
    assert_eq!(body["field"], format!("configuration.{FILTER}"), "{body}");
    assert!(
        body["message"].as_str().unwrap_or("").contains("CEL"),
        "{body}"
    );
    let (status, body) = pipeline
        .admin_request(
            Method::PATCH,
            &format!("/instances/{filtered_id}"),
            Some(json!({"configuration": {FILTER: "objectType = 'orders'"}})),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["field"], format!("configuration.{FILTER}"));
    pipeline.stop().await;
}

/// Every receiver secret, given to services running as processes that log at DEBUG, is then
/// looked for in every answer of the admin API and in every line the processes wrote.
#[tokio::test]
async fn no_receiver_secret_reaches_an_answer_or_a_log_line() {
    let nats = NatsServer::start().await;
    let proxy = ConnectProxy::start([127, 0, 0, 2], "egress", "proxy-secret-91").await;
    let cluster = Cluster::start(
        &nats.url(),
        &[
            ("RUST_LOG", "debug,async_nats=info,hyper=info,hyper_util=info,rustls=info,h2=info,reqwest=info,sqlx=info,tokio_postgres=info"),
            ("DELIVER_PROXY_ALLOW_NETWORKS", "127.0.0.2/32"),
        ],
        1,
    )
    .await;
    let pki = Pki::new("receiver CA");
    let client = pki.client("ecwid-events", rcgen::date_time_ymd(2031, 7, 9));
    let receiver_tls = TlsReceiver::start(&pki.server(), &pki).await;
    let idp = TokenEndpoint::start("erp-client", "oauth-secret-92", 60).await;
    let checker = idp.clone();
    let receiver = GuardedReceiver::start(move |h| {
        checker.accepts(h.get("authorization").and_then(|v| v.to_str().ok()))
            && h.get("x-api-key").is_some_and(|v| v == "header-secret-93")
    })
    .await;
    let key_body: String = client
        .key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let cert_body: String = client
        .cert_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let secrets = [
        "proxy-secret-91",
        "oauth-secret-92",
        "header-secret-93",
        // The private key's middle: its start is the same for every key of its kind.
        &key_body[key_body.len() / 2 - 20..key_body.len() / 2 + 20],
        // The client certificate is kept secret too (its tail: its start is shared with every
        // certificate of the same shape).
        &cert_body[cert_body.len() - 40..],
    ];
    let plain = cluster
        .create_instance(
            "9511",
            &receiver.url(),
            &[
                (HEADERS, r#"{"X-Api-Key":"header-secret-93"}"#),
                (PROXY_URL, &proxy.url("egress", "proxy-secret-91")),
                (TOKEN_URL, &idp.url()),
                (CLIENT_ID, "erp-client"),
                (CLIENT_SECRET, "oauth-secret-92"),
            ],
        )
        .await;
    let tls = cluster
        .create_instance(
            "9512",
            &receiver_tls.url(),
            &[
                (TLS_CERT, &client.cert_pem),
                (TLS_KEY, &client.key_pem),
                (TLS_CA, &pki.ca_pem()),
            ],
        )
        .await;
    for (store, id) in [(9511, "sec-1"), (9512, "sec-2")] {
        let response = cluster
            .http
            .post(cluster.webhook_url())
            .json(&order_created(store, id))
            .send()
            .await
            .expect("webhook");
        assert_eq!(response.status(), 200);
    }
    wait_until(WAIT, "both deliveries", || async {
        receiver.accepted().len() == 1 && receiver_tls.requests() == 1
    })
    .await;
    let mut carried = proxy.targets();
    carried.sort();
    let mut expected = vec![receiver.addr.to_string(), idp.addr.to_string()];
    expected.sort();
    assert_eq!(
        carried, expected,
        "the instance's own proxy carried the token request and the delivery"
    );
    // A refused token and a wrong proxy password put the secrets near error paths too.
    idp.revoke_all();
    let mut answers = Vec::new();
    for id in [&plain, &tls] {
        for (method, path) in [
            (Method::POST, format!("/instances/{id}/test")),
            (Method::GET, format!("/instances/{id}")),
            (Method::GET, format!("/instances/{id}/health")),
            (Method::GET, "/instances".to_owned()),
            (Method::GET, format!("/events?instance={id}&limit=100")),
        ] {
            let (status, body) = cluster.admin_request(method, &path, None).await;
            assert_eq!(status, 200, "{path}: {body}");
            answers.push((path, body.to_string()));
        }
    }
    assert_eq!(idp.requests(), 2, "the 401 refreshed the token once");
    let (status, body) = cluster
        .admin_request(
            Method::PATCH,
            &format!("/instances/{plain}"),
            Some(
                json!({"configuration": {PROXY_URL: proxy.url("egress", "proxy-secret-91-wrong")}}),
            ),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    answers.push(("PATCH".to_owned(), body.to_string()));
    cluster.wait_instances_seen().await;
    let (_, body) = cluster
        .admin_request(Method::POST, &format!("/instances/{plain}/test"), None)
        .await;
    assert_eq!(body["errorClass"], "proxy_error", "{body}");
    answers.push(("test after PATCH".to_owned(), body.to_string()));
    let mut tokens = idp.issued();
    assert!(!tokens.is_empty());
    let mut logs = String::new();
    for p in cluster.all() {
        logs.push_str(&p.log_tail(usize::MAX));
    }
    assert!(logs.contains("DEBUG"), "the services logged at DEBUG");
    tokens.extend(secrets.iter().map(|s| (*s).to_owned()));
    for secret in &tokens {
        for (path, body) in &answers {
            assert!(
                !body.contains(secret.as_str()),
                "{secret} in the answer to {path}: {body}"
            );
        }
        assert!(!logs.contains(secret.as_str()), "{secret} in a log line");
    }
}
