//! Property tests: no input panics the normalizer's parsing. Arbitrary bytes, arbitrary JSON and
//! webhook-shaped JSON, with and without the ingest's `Ecwid-Format` header, go through
//! [`consumer::parse`]; what parses yields a well-formed envelope carrying the body byte for byte,
//! what does not is an error the consumer dead-letters (`unparseable`).
//!
//! More cases: `PROPTEST_CASES=20000 cargo test -p normalizer --test props`.

use async_nats::HeaderMap;
use model::ecwid::ParseError;
use model::envelope::EventType;
use model::normalize;
use model::strategies::{any_json, field, webhook_like, EVENT_TYPES};
use normalizer::consumer;
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use shared::nats::headers;

/// Objects shaped like the ingest's ION bodies (form fields as strings), sometimes not.
fn ion_like() -> impl Strategy<Value = Value> {
    let text = || {
        field(
            prop_oneof![
                "[0-9]{1,6}".prop_map(Value::from),
                ".{0,12}".prop_map(Value::from)
            ]
            .boxed(),
        )
    };
    (
        text(),
        field(
            prop::sample::select(&["new_order", "order_status_change", "x", ""][..])
                .prop_map(Value::from)
                .boxed(),
        ),
        text(),
        field(
            prop_oneof![
                "20[0-9]{2}-[01][0-9]-[0-3][0-9] [0-2][0-9]:[0-5][0-9]:[0-6][0-9]"
                    .prop_map(Value::from),
                ".{0,20}".prop_map(Value::from),
            ]
            .boxed(),
        ),
    )
        .prop_map(|(owner, event_type, order, date)| {
            let mut m = Map::new();
            for (k, v) in [
                ("owner_id", owner),
                ("event_type", event_type),
                ("order_id", order),
                ("date", date),
            ] {
                if let Some(v) = v {
                    m.insert(k.to_owned(), v);
                }
            }
            Value::Object(m)
        })
}

/// The headers the ingest sets, in every combination that matters here.
fn headers_strategy() -> impl Strategy<Value = Option<HeaderMap>> {
    let format = prop_oneof![
        Just(None),
        Just(Some("v3".to_owned())),
        Just(Some("ion".to_owned())),
        "[ -~]{0,8}".prop_map(Some),
    ];
    let printable = || prop::option::of("[ -~]{0,24}");
    prop_oneof![
        1 => Just(None),
        4 => (format, printable(), printable()).prop_map(|(format, received_at, msg_id)| {
            let mut h = HeaderMap::new();
            if let Some(f) = format {
                h.insert(headers::FORMAT, f.as_str());
            }
            if let Some(r) = received_at {
                h.insert(headers::RECEIVED_AT, r.as_str());
            }
            if let Some(m) = msg_id {
                h.insert(headers::MSG_ID, m.as_str());
            }
            Some(h)
        }),
    ]
}

fn format_of(h: Option<&HeaderMap>) -> Option<String> {
    h.and_then(|h| h.get(headers::FORMAT))
        .map(|v| v.as_str().to_owned())
}

/// What every outcome of `parse` must satisfy, whatever the input.
fn check(body: &[u8], h: Option<&HeaderMap>) -> Result<(), TestCaseError> {
    match consumer::parse(body, h) {
        Err(e) => {
            // Dead-lettered with a message for a person; the client-error code says which kind.
            prop_assert!(!e.to_string().is_empty());
            prop_assert!(matches!(
                e.code(),
                "invalid_json" | "invalid_form" | "invalid_field"
            ));
            match format_of(h).as_deref() {
                None | Some("v3") | Some("ion") => {}
                Some(other) => {
                    prop_assert_eq!(e, ParseError::Format(other.chars().take(32).collect()))
                }
            }
        }
        Ok(n) => {
            let format = format_of(h);
            prop_assert!(
                matches!(format.as_deref(), None | Some("v3") | Some("ion")),
                "format {:?} accepted",
                format
            );
            // The store id is one subject token: the envelope cannot leak onto another subject.
            prop_assert!(
                shared::nats::is_subject_token(&n.store_id),
                "{:?}",
                n.store_id
            );
            prop_assert!(!n.event.object_type.is_empty());
            prop_assert_eq!(n.event.element_key.as_str(), "ecwid");
            if format.as_deref() == Some("ion") {
                prop_assert_eq!(n.event.object_type.as_str(), "orders");
            } else {
                let prefix = format!("v3:{}:", n.store_id);
                prop_assert!(n.event_key.starts_with(&prefix), "{:?}", n.event_key);
                prop_assert!(model::time_fmt::rfc3339_to_unix_ms(&n.event.date).is_some());
            }
            // The raw value is the body itself, only surrounding white space dropped.
            let trimmed = std::str::from_utf8(body)
                .map(|s| s.trim_matches([' ', '\t', '\n', '\r']))
                .unwrap_or_default();
            prop_assert_eq!(n.raw.get(), trimmed);
            let bytes = normalize::envelope(&n, "inst-1", false).to_json();
            let v: Value = serde_json::from_slice(&bytes)
                .map_err(|e| TestCaseError::fail(format!("envelope is not JSON: {e}")))?;
            let body_value: Value = serde_json::from_slice(body)
                .map_err(|e| TestCaseError::fail(format!("body is not JSON: {e}")))?;
            prop_assert_eq!(&v["message"]["raw"], &body_value);
            prop_assert_eq!(v["message"]["instanceId"].as_str(), Some("inst-1"));
            prop_assert_eq!(v["message"]["eventId"].as_str().map(str::len), Some(36));
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(
        body in prop::collection::vec(any::<u8>(), 0..300),
        h in headers_strategy(),
    ) {
        check(&body, h.as_ref())?;
    }

    #[test]
    fn arbitrary_json_never_panics(value in any_json(), h in headers_strategy()) {
        check(value.to_string().as_bytes(), h.as_ref())?;
    }

    #[test]
    fn webhook_shaped_json_never_panics(value in webhook_like(), h in headers_strategy()) {
        check(value.to_string().as_bytes(), h.as_ref())?;
    }

    #[test]
    fn ion_shaped_json_never_panics(value in ion_like(), h in headers_strategy()) {
        check(value.to_string().as_bytes(), h.as_ref())?;
    }

    /// Valid webhooks with a few bytes overwritten: mostly broken JSON, sometimes valid JSON
    /// with odd values, sometimes invalid UTF-8 inside a string.
    #[test]
    fn corrupted_webhooks_never_panic(
        value in webhook_like(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        h in headers_strategy(),
    ) {
        let mut body = value.to_string().into_bytes();
        for (at, byte) in edits {
            let i = at.index(body.len());
            body[i] = byte;
        }
        check(&body, h.as_ref())?;
    }

    /// A complete, valid webhook always normalizes, whatever the event type and ids.
    #[test]
    fn valid_webhooks_always_normalize(
        event_id in "[ -~]{0,39}[!-~]",
        created in 0i64..253_402_300_799,
        store in 1u64..u64::MAX,
        event_type in prop_oneof![
            // A blank eventType is refused: the ingest never stores one.
            prop::sample::select(EVENT_TYPES).prop_filter("blank", |t| !t.trim().is_empty()).prop_map(str::to_owned),
            "[a-z_]{1,16}\\.[a-zA-Z_]{1,24}",
        ],
        entity in prop_oneof![any::<u64>().prop_map(Value::from), "[ -~]{0,20}".prop_map(Value::from)],
        data in prop::option::of(any_json()),
    ) {
        let mut v = json!({"eventId": event_id, "eventCreated": created, "storeId": store,
                           "entityId": entity, "eventType": event_type});
        if let Some(d) = data {
            v["data"] = d;
        }
        let body = v.to_string();
        let n = consumer::parse(body.as_bytes(), None)
            .map_err(|e| TestCaseError::fail(format!("{body} refused: {e}")))?;
        prop_assert_eq!(n.store_id, store.to_string());
        prop_assert_eq!(n.event_key, format!("v3:{store}:{event_id}"));
        let family_known = normalize::MAPPING.iter().any(|(f, _)| {
            event_type.split('.').next().is_some_and(|fam| fam.replace('_', "").eq_ignore_ascii_case(f))
        });
        let family = event_type.split('.').next().unwrap_or_default();
        if family.is_empty() {
            prop_assert_eq!(n.event.object_type.as_str(), "unknown");
        } else if !family_known {
            prop_assert_eq!(n.event.object_type.as_str(), family);
        }
        if n.event.object_type != "orders" && n.event.object_type != "abandonedCarts" {
            let expected = match &entity {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            prop_assert_eq!(n.event.object_id, expected);
        }
        check(body.as_bytes(), None)?;
    }
}

#[test]
fn the_format_header_picks_the_parser() {
    let v3 = br#"{"eventId":"e-1","eventCreated":1234567,"storeId":1003,"entityId":1,"eventType":"product.updated"}"#;
    let ion = br#"{"owner_id":"1003","event_type":"new_order","order_id":"42","date":"2026-11-22 10:15:00"}"#;
    let with = |pairs: &[(async_nats::HeaderName, &str)]| {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(k.clone(), *v);
        }
        h
    };
    // No headers, or no format header: v3.
    assert_eq!(
        consumer::parse(v3, None).unwrap().event.object_type,
        "products"
    );
    assert_eq!(
        consumer::parse(v3, Some(&with(&[])))
            .unwrap()
            .event
            .object_type,
        "products"
    );
    let h = with(&[(headers::FORMAT, "v3")]);
    assert_eq!(
        consumer::parse(v3, Some(&h)).unwrap().event_key,
        "v3:1003:e-1"
    );
    assert!(consumer::parse(ion, Some(&h)).is_err());
    // ION: keyed by the id the ingest stored it under, computed from the body.
    let h = with(&[(headers::FORMAT, "ion"), (headers::MSG_ID, "replay-1")]);
    let n = consumer::parse(ion, Some(&h)).unwrap();
    assert_eq!(
        n.event_key,
        model::ecwid::parse_ion_json(ion).unwrap().msg_id()
    );
    assert_eq!(n.event.event_type, EventType::Created);
    assert_eq!(n.event.object_id, "42");
    assert_eq!(n.event.date, "2026-11-22T10:15:00Z");
    assert!(consumer::parse(v3, Some(&h)).is_err());
    // Without a date, the receipt time.
    let undated = br#"{"owner_id":"1003","event_type":"order_status_change","order_id":"42"}"#;
    let h = with(&[
        (headers::FORMAT, "ion"),
        (headers::RECEIVED_AT, "1795342500000"),
    ]);
    let n = consumer::parse(undated, Some(&h)).unwrap();
    assert_eq!(n.event.date, "2026-11-22T10:15:00Z");
    assert_eq!(n.event.event_type, EventType::Updated);
    // A format nobody writes.
    let h = with(&[(headers::FORMAT, "xml")]);
    assert_eq!(
        consumer::parse(v3, Some(&h)).unwrap_err(),
        ParseError::Format("xml".into())
    );
}
