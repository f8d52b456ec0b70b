//! Normalization and fan-out on a real nats-server: one envelope per enabled instance that wants
//! the object type, nothing for the others, and what cannot be normalized in `ECWID_DEAD`.

use std::time::Duration;

use async_nats::jetstream::{self, message::StreamMessage};
use integration_tests::*;
use reqwest::Method;
use serde_json::{json, Value};
use shared::nats::{dead_subject, headers, raw_subject, DEAD_STREAM};

const WAIT: Duration = Duration::from_secs(15);

fn order_updated(store_id: u64, event_id: &str) -> Value {
    json!({
        "eventId": event_id,
        "eventCreated": 1_795_342_500,
        "storeId": store_id,
        "entityId": 22222,
        "eventType": "order.updated",
        "data": {"orderId": "XJ12H",
                 "oldPaymentStatus": "AWAITING_PAYMENT", "newPaymentStatus": "PAID",
                 "oldFulfillmentStatus": "AWAITING_PROCESSING", "newFulfillmentStatus": "SHIPPED"}
    })
}

fn product_updated(store_id: u64, event_id: &str) -> Value {
    json!({
        "eventId": event_id,
        "eventCreated": 1_795_342_500,
        "storeId": store_id,
        "entityId": 66722487,
        "eventType": "product.updated"
    })
}

async fn jetstream(nats: &NatsServer) -> jetstream::Context {
    jetstream::new(nats.client().await)
}

/// Publishes `payload` to `ecwid.raw.<store_id>` as a raw message from nowhere (not the ingest)
/// and waits for JetStream's ack.
async fn publish_raw(js: &jetstream::Context, store_id: &str, payload: &'static [u8]) {
    js.publish(raw_subject(store_id), payload.into())
        .await
        .expect("publish")
        .await
        .expect("JetStream stores the raw message");
}

/// Waits for the newest dead letter on `subject`.
async fn wait_dead_letter(js: &jetstream::Context, subject: &str) -> StreamMessage {
    let stream = js.get_stream(DEAD_STREAM).await.expect("the dead stream");
    wait_until(WAIT, &format!("a dead letter on {subject}"), || {
        let stream = stream.clone();
        async move {
            stream
                .get_last_raw_message_by_subject(subject)
                .await
                .is_ok()
        }
    })
    .await;
    stream
        .get_last_raw_message_by_subject(subject)
        .await
        .expect("the dead letter")
}

fn dead_header(m: &StreamMessage, name: async_nats::HeaderName) -> Option<&str> {
    shared::nats::header(Some(&m.headers), name)
}

#[tokio::test]
async fn one_envelope_per_enabled_instance_that_wants_the_object_type() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let (a, b, products_only, disabled) = (
        Receiver::start(Behavior::Status(200)).await,
        Receiver::start(Behavior::Status(200)).await,
        Receiver::start(Behavior::Status(200)).await,
        Receiver::start(Behavior::Status(200)).await,
    );
    let id_a = pipeline.create_instance("1003", &a.url(), &[]).await;
    let id_b = pipeline.create_instance("1003", &b.url(), &[]).await;
    let id_products = pipeline
        .create_instance(
            "1003",
            &products_only.url(),
            &[("event.objects", "products")],
        )
        .await;
    pipeline
        .create_instance(
            "1003",
            &disabled.url(),
            &[("event.notification.enabled", "false")],
        )
        .await;

    let order = order_updated(1003, "fan-1");
    let (status, body) = pipeline.post_json(&order, None).await;
    assert_eq!(status, 200, "{body}");
    let got_a = a.wait_for(1, WAIT).await;
    let got_b = b.wait_for(1, WAIT).await;
    let expected_event = json!({"eventType": "UPDATED", "objectType": "orders",
                                "objectId": "XJ12H", "elementKey": "ecwid",
                                "date": "2026-11-22T10:15:00Z"});
    let mut notification_ids = Vec::new();
    for (got, instance_id) in [(&got_a[0], &id_a), (&got_b[0], &id_b)] {
        let envelope = got.json();
        assert_eq!(envelope["message"]["instanceId"], json!(instance_id));
        assert_eq!(envelope["message"]["events"], json!([expected_event]));
        assert_eq!(envelope["message"]["raw"], order);
        assert_eq!(
            got.header("elements-webhook-id"),
            envelope["message"]["eventId"].as_str()
        );
        notification_ids.push(envelope["message"]["eventId"].clone());
    }
    assert_ne!(
        notification_ids[0], notification_ids[1],
        "each notification has its own id"
    );

    // A product event reaches the products-only instance too: it was filtered, not broken.
    let product = product_updated(1003, "fan-2");
    assert_eq!(pipeline.post_json(&product, None).await.0, 200);
    let got = products_only.wait_for(1, WAIT).await;
    a.wait_for(2, WAIT).await;
    b.wait_for(2, WAIT).await;
    wait_settled(&nats.url(), WAIT).await;
    assert_eq!(
        products_only.count(),
        1,
        "the order was not delivered to it"
    );
    let envelope = got[0].json();
    assert_eq!(envelope["message"]["instanceId"], json!(id_products));
    assert_eq!(
        envelope["message"]["events"][0]["objectType"],
        json!("products")
    );
    assert_eq!(
        envelope["message"]["events"][0]["objectId"],
        json!("66722487")
    );
    assert_eq!(envelope["message"]["raw"], product);
    assert_eq!((a.count(), b.count()), (2, 2), "exactly one of each");
    assert_eq!(disabled.count(), 0, "a disabled instance gets nothing");
    pipeline.stop().await;
}

#[tokio::test]
async fn an_event_no_instance_wants_is_counted_as_filtered() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    pipeline
        .create_instance("1004", &receiver.url(), &[("event.objects", "products")])
        .await;
    assert_eq!(
        pipeline
            .post_json(&order_updated(1004, "f-1"), None)
            .await
            .0,
        200
    );
    let http = pipeline.http.clone();
    let ops = pipeline.normalizer_ops;
    wait_until(WAIT, "the normalizer to count a filtered event", || {
        let http = http.clone();
        async move {
            let text = match http.get(format!("http://{ops}/metrics")).send().await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(_) => return false,
            };
            metric(
                &text,
                "ecwid_normalizer_messages_total{outcome=\"filtered\"}",
            ) == Some(1.0)
        }
    })
    .await;
    // Then a product event: delivered, and the only thing delivered.
    assert_eq!(
        pipeline
            .post_json(&product_updated(1004, "f-2"), None)
            .await
            .0,
        200
    );
    let got = receiver.wait_for(1, WAIT).await;
    wait_settled(&nats.url(), WAIT).await;
    assert_eq!(receiver.count(), 1);
    assert_eq!(got[0].json()["message"]["raw"]["eventId"], "f-2");
    pipeline.stop().await;
}

#[tokio::test]
async fn raw_is_delivered_byte_for_byte() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    pipeline.create_instance("1003", &receiver.url(), &[]).await;
    // Key order, white space, `1.50`, an escape and non-ASCII: re-serializing would change them.
    let body = "{ \"storeId\" :1003,\n\t\"eventType\":\"order.updated\",  \"eventId\":\"raw-1\",\"data\":{\"orderId\":\"XJ12H\",\"total\":1.50,\"note\":\"caf\\u00e9 \u{2713}\"},\"eventCreated\":1795342500 , \"entityId\":22222 }";
    let resp = pipeline
        .http
        .post(pipeline.webhook_url())
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = receiver.wait_for(1, WAIT).await;
    let delivered = std::str::from_utf8(&got[0].body).unwrap();
    assert!(
        delivered.contains(&format!("\"raw\":{body}")),
        "raw changed on the way: {delivered}"
    );
    pipeline.stop().await;
}

#[tokio::test]
async fn an_unparseable_raw_message_is_dead_lettered_and_the_pipeline_keeps_going() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    pipeline.create_instance("1003", &receiver.url(), &[]).await;
    let js = jetstream(&nats).await;

    const GARBAGE: &[u8] = b"\x00\xffnot json {\"eventId\":";
    publish_raw(&js, "1003", GARBAGE).await;
    let dead = wait_dead_letter(&js, &dead_subject("normalize", "1003")).await;
    assert_eq!(dead.payload.as_ref(), GARBAGE, "kept byte for byte");
    assert_eq!(
        dead_header(&dead, headers::DEAD_REASON),
        Some("unparseable")
    );
    assert_eq!(dead_header(&dead, headers::DEAD_STAGE), Some("normalize"));
    assert_eq!(
        dead_header(&dead, headers::ORIGINAL_SUBJECT),
        Some("ecwid.raw.1003")
    );
    assert!(dead_header(&dead, headers::DEAD_ERROR).is_some_and(|e| !e.is_empty()));

    // The next valid event is delivered, and only it.
    assert_eq!(
        pipeline
            .post_json(&order_created(1003, "after-garbage"), None)
            .await
            .0,
        200
    );
    let got = receiver.wait_for(1, WAIT).await;
    wait_settled(&nats.url(), WAIT).await;
    assert_eq!(receiver.count(), 1);
    assert_eq!(got[0].json()["message"]["raw"]["eventId"], "after-garbage");
    let text = pipeline.metrics_text(pipeline.normalizer_ops).await;
    assert_eq!(
        metric(
            &text,
            "ecwid_dead_letters_total{reason=\"unparseable\",stage=\"normalize\"}"
        ),
        Some(1.0),
        "{text}"
    );
    pipeline.stop().await;
}

#[tokio::test]
async fn a_raw_event_of_a_store_whose_instance_was_deleted_is_dead_lettered() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    let id = pipeline.create_instance("2002", &receiver.url(), &[]).await;
    let (status, _) = pipeline
        .admin_request(Method::DELETE, &format!("/instances/{id}"), None)
        .await;
    assert_eq!(status, 204);
    pipeline.wait_instances_seen().await;

    // The ingest now refuses the store (404), so the raw message arrives as one already in the
    // stream would: stored while the instance existed, normalized after it was deleted.
    const EVENT: &[u8] = br#"{"eventId":"orphan-1","eventCreated":1795342500,"storeId":2002,"entityId":1,"eventType":"order.created","data":{"orderId":"XJ12H"}}"#;
    let js = jetstream(&nats).await;
    publish_raw(&js, "2002", EVENT).await;
    let dead = wait_dead_letter(&js, &dead_subject("normalize", "2002")).await;
    assert_eq!(
        dead_header(&dead, headers::DEAD_REASON),
        Some("no_instance")
    );
    assert_eq!(dead.payload.as_ref(), EVENT);
    wait_settled(&nats.url(), WAIT).await;
    assert_eq!(receiver.count(), 0);
    pipeline.stop().await;
}

#[tokio::test]
async fn an_ion_form_post_reaches_the_callback_as_an_order_created_event() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let receiver = Receiver::start(Behavior::Status(200)).await;
    let id = pipeline.create_instance("1003", &receiver.url(), &[]).await;
    let resp = pipeline
        .http
        .post(pipeline.webhook_url())
        .header("content-type", "application/x-www-form-urlencoded")
        .body("owner_id=1003&event_type=new_order&date=2026-11-22+10%3A15%3A00&order_id=42&payment_status=PAID&fulfillment_status=AWAITING_PROCESSING")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = receiver.wait_for(1, WAIT).await;
    let envelope = got[0].json();
    assert_eq!(envelope["message"]["instanceId"], json!(id));
    assert_eq!(
        envelope["message"]["events"],
        json!([{"eventType": "CREATED", "objectType": "orders", "objectId": "42",
                "elementKey": "ecwid", "date": "2026-11-22T10:15:00Z"}])
    );
    assert_eq!(
        envelope["message"]["raw"],
        json!({"owner_id": "1003", "event_type": "new_order", "date": "2026-11-22 10:15:00",
               "order_id": "42", "payment_status": "PAID",
               "fulfillment_status": "AWAITING_PROCESSING"})
    );
    wait_settled(&nats.url(), WAIT).await;
    assert_eq!(receiver.count(), 1);
    pipeline.stop().await;
}
