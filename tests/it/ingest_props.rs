//! Property test of the whole ingest, over HTTP against a real nats-server and the real
//! normalizer and deliverer: arbitrary text in every string field of v3 and ION bodies, and in
//! the headers the ingest reads, never panics a handler, never gets a 5xx, always gets a JSON
//! answer, and whatever is answered 200 (not a duplicate) is delivered to the callback.
//!
//! Each case is one request to one pipeline started once; the deliveries are counted at the end.
//! More cases: `PROPTEST_CASES=2000 cargo test -p integration-tests --test it ingest_props::`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use integration_tests::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{json, Map, Value};

const STORE: u64 = 9100;

/// Any text at all (control characters, CR/LF, NUL, non-ASCII), or something plausible.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => ".{0,24}",
        2 => "[ -~]{1,24}",
        1 => prop::collection::vec(any::<char>(), 0..12).prop_map(|c| c.into_iter().collect()),
        1 => Just("a\r\nNats-Msg-Id: x".to_owned()),
        1 => Just("\u{0}".to_owned()),
    ]
}

/// A value for a JSON field: text, or a number, or anything.
fn json_field(plausible: BoxedStrategy<Value>) -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        1 => Just(None),
        16 => plausible.prop_map(Some),
        2 => text().prop_map(|t| Some(Value::String(t))),
        1 => model::strategies::any_json().prop_map(Some),
    ]
}

/// A v3 webhook for [`STORE`] with any field replaced by anything.
fn v3_body() -> impl Strategy<Value = Value> {
    (
        // Any printable text is a valid event id: non-ASCII, quotes, spaces.
        json_field("\\PC{1,24}".prop_map(Value::from).boxed()),
        json_field((0i64..4_000_000_000).prop_map(Value::from).boxed()),
        json_field(Just(Value::from(STORE)).boxed()),
        json_field(
            prop::sample::select(model::strategies::EVENT_TYPES)
                .prop_map(Value::from)
                .boxed(),
        ),
        json_field(any::<u32>().prop_map(Value::from).boxed()),
        json_field(Just(json!({"orderId": "XJ12H"})).boxed()),
    )
        .prop_map(|(id, created, store, event_type, entity, data)| {
            let mut m = Map::new();
            for (k, v) in [
                ("eventId", id),
                ("eventCreated", created),
                ("storeId", store),
                ("eventType", event_type),
                ("entityId", entity),
                ("data", data),
            ] {
                if let Some(v) = v {
                    m.insert(k.to_owned(), v);
                }
            }
            Value::Object(m)
        })
}

/// An ION form for [`STORE`] with any field replaced by anything.
fn ion_body() -> impl Strategy<Value = String> {
    let field = |plausible: &'static str| {
        prop_oneof![
            1 => Just(None),
            12 => Just(Some(plausible.to_owned())),
            3 => text().prop_map(Some),
        ]
    };
    (
        field("9100"),
        field("new_order"),
        field("2026-11-22 10:15:00"),
        field("42"),
        field("PAID"),
        prop::collection::vec((text(), text()), 0..3),
    )
        .prop_map(|(owner, event_type, date, order, payment, extra)| {
            let mut pairs: Vec<(String, String)> = Vec::new();
            for (k, v) in [
                ("owner_id", owner),
                ("event_type", event_type),
                ("date", date),
                ("order_id", order),
                ("payment_status", payment),
            ] {
                if let Some(v) = v {
                    pairs.push((k.to_owned(), v));
                }
            }
            pairs.extend(extra);
            serde_urlencoded::to_string(&pairs).unwrap_or_default()
        })
}

/// Header values the ingest reads: any bytes a client can send in a header.
fn header_value() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        Just(None),
        prop::collection::vec(
            any::<u8>().prop_filter("a header byte", |b| *b == b'\t'
                || (*b >= 0x20 && *b != 0x7f)),
            0..40
        )
        .prop_map(Some),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    body: Vec<u8>,
    content_type: Option<&'static str>,
    signature: Option<Vec<u8>>,
    request_id: Option<Vec<u8>>,
    traceparent: Option<Vec<u8>>,
}

fn case() -> impl Strategy<Value = Case> {
    let body = prop_oneof![
        v3_body().prop_map(|v| (v.to_string().into_bytes(), Some("application/json"))),
        ion_body().prop_map(|f| (f.into_bytes(), Some("application/x-www-form-urlencoded"))),
        ion_body().prop_map(|f| (f.into_bytes(), None)),
    ];
    (body, header_value(), header_value(), header_value()).prop_map(
        |((body, content_type), signature, request_id, traceparent)| Case {
            body,
            content_type,
            signature,
            request_id,
            traceparent,
        },
    )
}

#[test]
fn any_field_any_header_never_5xx_and_every_200_is_delivered() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (nats, pipeline, receiver) = rt.block_on(async {
        let nats = NatsServer::start().await;
        let pipeline = Pipeline::start(&nats.url(), &[]).await;
        let receiver = Receiver::start(Behavior::Status(200)).await;
        pipeline
            .create_instance(&STORE.to_string(), &receiver.url(), &[])
            .await;
        (nats, pipeline, receiver)
    });
    let accepted = Arc::new(Mutex::new(0usize));
    let v3_ids = Arc::new(Mutex::new(BTreeSet::new()));
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&case(), |case| {
        rt.block_on(async {
            let mut request = pipeline
                .http
                .post(pipeline.webhook_url())
                .body(case.body.clone());
            for (name, value) in [
                (
                    "content-type",
                    case.content_type.map(|c| c.as_bytes().to_vec()),
                ),
                ("x-ecwid-webhook-signature", case.signature.clone()),
                ("x-request-id", case.request_id.clone()),
                ("traceparent", case.traceparent.clone()),
            ] {
                if let Some(v) = value {
                    request = request.header(name, v);
                }
            }
            let response = request.send().await.map_err(|e| {
                TestCaseError::fail(format!("no answer (a dropped connection?): {e}"))
            })?;
            let status = response.status().as_u16();
            let text = response.text().await.unwrap_or_default();
            prop_assert!(status < 500, "{} for {:?}: {}", status, case, text);
            let answer: Value = serde_json::from_str(&text)
                .map_err(|e| TestCaseError::fail(format!("not JSON ({e}): {text}")))?;
            if status == 200 && answer["duplicate"] == false {
                *accepted.lock().unwrap() += 1;
                if case.content_type == Some("application/json") {
                    let body: Value = serde_json::from_slice(&case.body).unwrap();
                    v3_ids
                        .lock()
                        .unwrap()
                        .insert(body["eventId"].as_str().unwrap_or_default().to_owned());
                }
            } else {
                prop_assert!(status != 200 || answer["duplicate"] == true, "{}", text);
            }
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let accepted = *accepted.lock().unwrap();
    let v3_ids = v3_ids.lock().unwrap().clone();
    eprintln!("{accepted} of {cases} cases accepted ({} v3)", v3_ids.len());
    assert!(
        accepted > 0,
        "no case was accepted: the strategies miss the valid shape"
    );
    rt.block_on(async {
        let got = receiver.wait_for(accepted, Duration::from_secs(60)).await;
        let delivered: BTreeSet<String> = got
            .iter()
            .filter_map(|r| {
                r.json()["message"]["raw"]["eventId"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
        let missing: Vec<&String> = v3_ids.difference(&delivered).collect();
        assert!(
            missing.is_empty(),
            "answered 200 but not delivered: {missing:?}"
        );
        let metrics = pipeline.metrics_text(pipeline.admin).await;
        assert_eq!(metric(&metrics, "ecwid_http_panics_total"), Some(0.0));
        pipeline.stop().await;
        drop(nats);
    });
}
