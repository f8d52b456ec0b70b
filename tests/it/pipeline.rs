//! The pipeline end to end on a real nats-server: Ecwid → ingest → JetStream → normalizer →
//! JetStream → deliverer → callback.

use std::time::Duration;

use integration_tests::*;
use reqwest::Method;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test]
async fn order_created_travels_the_whole_way() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    let instance_id = pipeline.create_instance("1003", &receiver.url(), &[]).await;

    let event = order_created(1003, "80aece08-40e8-4145-8764-6c2f0d38678");
    let (status, body) = pipeline.post_json(&event, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "accepted");

    let got = receiver.wait_for(1, WAIT).await;
    let envelope = got[0].json();
    assert_eq!(
        envelope["message"]["events"][0],
        json!({"eventType": "CREATED", "objectType": "orders", "objectId": "XJ12H",
               "elementKey": "ecwid", "date": "2025-11-24T16:00:00Z"})
    );
    assert_eq!(envelope["message"]["raw"], event);
    assert_eq!(envelope["message"]["instanceId"], instance_id);
    assert_eq!(
        got[0].header("elements-webhook-id"),
        envelope["message"]["eventId"].as_str()
    );
    assert_eq!(got[0].header("content-type"), Some("application/json"));
    assert!(got[0]
        .header("user-agent")
        .unwrap_or_default()
        .starts_with("ecwid-events/"));

    // Nothing more arrives: once the pipeline has settled, it still got one.
    wait_settled(&nats.url(), WAIT).await;
    assert_eq!(receiver.count(), 1);
    pipeline.stop().await;
}

#[tokio::test]
async fn the_same_webhook_twice_is_delivered_once() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    pipeline.create_instance("1003", &receiver.url(), &[]).await;
    let event = order_created(1003, "dup-1");
    let (s1, b1) = pipeline.post_json(&event, None).await;
    let (s2, b2) = pipeline.post_json(&event, None).await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(b1["duplicate"], false);
    assert_eq!(b2["duplicate"], true);
    assert_eq!(b2["status"], "duplicate");
    // A different event after the duplicate proves the pipeline kept flowing.
    pipeline
        .post_json(&order_created(1003, "dup-2"), None)
        .await;
    let got = receiver.wait_for(2, WAIT).await;
    wait_settled(&nats.url(), WAIT).await;
    assert_eq!(receiver.count(), 2, "dup-1 once, dup-2 once");
    let ids: Vec<_> = got
        .iter()
        .map(|r| r.json()["message"]["raw"]["eventId"].clone())
        .collect();
    assert!(ids.contains(&json!("dup-1")) && ids.contains(&json!("dup-2")));
    pipeline.stop().await;
}

#[tokio::test]
async fn admin_api_guards_validates_and_redacts() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;

    let resp = pipeline
        .http
        .get(pipeline.admin_url("/instances"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "unauthorized");
    let resp = pipeline
        .http
        .get(pipeline.admin_url("/instances"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    // The seed as is: its store id is empty.
    let seed = json!({"element":{"key":"ecwid"},"configuration":{"ecwid.order.key":"","ecwid.product.key":"","ecwid.store.id":"","event.notification.enabled":"true","event.notification.callback.url":""},"tags":[""],"name":""});
    let (status, body) = pipeline
        .admin_request(Method::POST, "/instances", Some(seed.clone()))
        .await;
    assert_eq!(status, 422);
    assert_eq!(body["field"], "configuration.ecwid.store.id");
    // Store filled in, callback still empty while enabled.
    let mut no_url = seed.clone();
    no_url["configuration"]["ecwid.store.id"] = json!("1003");
    let (status, body) = pipeline
        .admin_request(Method::POST, "/instances", Some(no_url))
        .await;
    assert_eq!(status, 422);
    assert_eq!(
        body["field"],
        "configuration.event.notification.callback.url"
    );
    // Malformed JSON is 400.
    let resp = pipeline
        .http
        .post(pipeline.admin_url("/instances"))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    // The seed filled in is accepted; secrets never come back.
    let mut good = seed;
    good["configuration"]["ecwid.store.id"] = json!("1003");
    good["configuration"]["event.notification.callback.url"] =
        json!("https://hooks.example.com/ecwid");
    good["configuration"]["ecwid.order.key"] = json!("secret_order_key");
    good["configuration"]["ecwid.client.secret"] = json!("client-secret");
    let (status, created) = pipeline
        .admin_request(Method::POST, "/instances", Some(good))
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let text = created.to_string();
    assert!(
        !text.contains("secret_order_key") && !text.contains("client-secret"),
        "{text}"
    );
    assert_eq!(created["configuration"]["ecwid.order.key"], "********");
    assert_eq!(created["configuration"]["ecwid.product.key"], "");

    let (status, shown) = pipeline
        .admin_request(Method::GET, &format!("/instances/{id}"), None)
        .await;
    assert_eq!(status, 200);
    assert!(!shown.to_string().contains("secret_order_key"));
    let (_, list) = pipeline
        .admin_request(Method::GET, "/instances", None)
        .await;
    assert_eq!(list["instances"].as_array().unwrap().len(), 1);
    assert!(!list.to_string().contains("secret_order_key"));

    // PATCH merges configuration, keeps secrets sent back redacted, replaces name and tags.
    let patch = json!({"configuration": {"ecwid.order.key": "********", "event.objects": "orders"}, "name": "renamed", "tags": ["a"]});
    let (status, patched) = pipeline
        .admin_request(Method::PATCH, &format!("/instances/{id}"), Some(patch))
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["name"], "renamed");
    assert_eq!(patched["configuration"]["event.objects"], "orders");
    assert_eq!(patched["configuration"]["ecwid.store.id"], "1003");
    let (status, _) = pipeline
        .admin_request(
            Method::PATCH,
            &format!("/instances/{id}"),
            Some(json!({"configuration": {"ecwid.store.id": ""}})),
        )
        .await;
    assert_eq!(status, 422);

    let (status, _) = pipeline
        .admin_request(Method::DELETE, &format!("/instances/{id}"), None)
        .await;
    assert_eq!(status, 204);
    let (status, body) = pipeline
        .admin_request(Method::GET, &format!("/instances/{id}"), None)
        .await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "not_found");
    pipeline.stop().await;
}

#[tokio::test]
async fn instance_changes_take_effect_without_restarts() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let first = Receiver::start(Behavior::Status(200)).await;
    let second = Receiver::start(Behavior::Status(200)).await;

    // No instance yet: the store is unknown (Ecwid retries for 24 h).
    let (status, body) = pipeline.post_json(&order_created(2001, "e-0"), None).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "unknown_store");

    let id = pipeline.create_instance("2001", &first.url(), &[]).await;
    assert_eq!(
        pipeline
            .post_json(&order_created(2001, "e-1"), None)
            .await
            .0,
        200
    );
    first.wait_for(1, WAIT).await;

    // Point the instance elsewhere: the next event goes to the new URL.
    let patch = json!({"configuration": {"event.notification.callback.url": second.url()}});
    let (status, _) = pipeline
        .admin_request(Method::PATCH, &format!("/instances/{id}"), Some(patch))
        .await;
    assert_eq!(status, 200);
    pipeline.wait_instances_seen().await;
    assert_eq!(
        pipeline
            .post_json(&order_created(2001, "e-2"), None)
            .await
            .0,
        200
    );
    second.wait_for(1, WAIT).await;
    assert_eq!(first.count(), 1, "the old URL got nothing more");

    // Delete it: the store is unknown again.
    pipeline
        .admin_request(Method::DELETE, &format!("/instances/{id}"), None)
        .await;
    pipeline.wait_instances_seen().await;
    assert_eq!(
        pipeline
            .post_json(&order_created(2001, "e-3"), None)
            .await
            .0,
        404
    );
    pipeline.stop().await;
}
