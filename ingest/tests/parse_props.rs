//! Property tests for what the ingest reads of a request body: no input panics
//! [`parse::detect_format`], [`parse::parse_v3`] or [`parse::parse_ion`], and every refusal is a
//! 4xx (Ecwid would retry a 5xx for 24 hours; input no retry can fix must be a 4xx). And what the
//! ingest accepts (answers 200 for), the normalizer can normalize: otherwise Ecwid is told "stored"
//! for an event that ends in the dead-letter stream.
//!
//! More cases: `PROPTEST_CASES=20000 cargo test -p ingest --test parse_props`.

use ingest::error::ApiError;
use ingest::parse::{self, Format};
use normalizer::normalize;
use proptest::prelude::*;
use serde_json::{Map, Value};
use shared::strategies::{any_json, webhook_like};

const ION_NAMES: &[&str] = &[
    "owner_id",
    "event_type",
    "date",
    "order_id",
    "payment_status",
    "fulfillment_status",
    "old_payment_status",
    "old_fulfillment_status",
];

/// A value: digits, a known event type, anything printable, or anything at all.
fn form_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{1,22}",
        prop::sample::select(&["new_order", "order_status_change", "2026-11-22 10:15:00"][..])
            .prop_map(str::to_owned),
        "[ -~]{0,16}",
        ".{0,16}",
    ]
}

/// Form bodies: known and unknown names (repeated at times), encoded as a browser would.
fn form_like() -> impl Strategy<Value = String> {
    let name = prop_oneof![
        4 => prop::sample::select(ION_NAMES).prop_map(str::to_owned),
        1 => ".{0,8}",
    ];
    prop::collection::vec((name, form_value()), 0..10)
        .prop_map(|pairs| serde_urlencoded::to_string(&pairs).unwrap_or_default())
}

/// Form-ish text written by hand: `=`, `&`, `%`, `+` anywhere.
fn form_text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            prop::sample::select(&["=", "&", "%", "%2", "%zz", "%C3%A9", "+", "owner_id=1003"][..])
                .prop_map(str::to_owned),
            ".{0,6}",
        ],
        0..12,
    )
    .prop_map(|parts| parts.concat())
}

fn content_type() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        prop::sample::select(
            &[
                "application/json",
                "application/json; charset=utf-8",
                "APPLICATION/JSON",
                "text/json",
                "application/vnd.ecwid+json",
                "application/x-www-form-urlencoded",
                "application/x-www-form-urlencoded; charset=UTF-8",
                "text/plain",
                "multipart/form-data; boundary=x",
                "",
                ";",
            ][..]
        )
        .prop_map(|s| Some(s.to_owned())),
        "[ -~]{0,40}".prop_map(Some),
    ]
}

fn is_4xx(e: &ApiError) -> Result<(), TestCaseError> {
    let status = e.status();
    prop_assert!(status.is_client_error(), "{status} for {e}");
    prop_assert!(!e.to_string().is_empty());
    Ok(())
}

/// What every outcome of `parse_v3` must satisfy: a 4xx refusal or routable fields.
fn check_v3(body: &[u8]) -> Result<(), TestCaseError> {
    match parse::parse_v3(body) {
        Err(e) => is_4xx(&e)?,
        Ok(head) => {
            prop_assert!(
                !head.store_id.is_empty() && head.store_id.bytes().all(|b| b.is_ascii_digit())
            );
            prop_assert!(head.event_created >= 0);
            prop_assert!(!head.event_id.trim().is_empty() && !head.event_type.trim().is_empty());
        }
    }
    Ok(())
}

/// What every outcome of `parse_ion` must satisfy: a 4xx refusal, or a store, an event type, an
/// order and a body for the normalizer that is an object of strings, with a stable message id.
fn check_ion(body: &[u8]) -> Result<(), TestCaseError> {
    match parse::parse_ion(body) {
        Err(e) => is_4xx(&e)?,
        Ok(ion) => {
            prop_assert!(
                !ion.store_id.is_empty() && ion.store_id.bytes().all(|b| b.is_ascii_digit())
            );
            prop_assert!(!ion.event_type.is_empty() && !ion.order_id.is_empty());
            let object: Map<String, Value> = serde_json::from_slice(&ion.to_json())
                .map_err(|e| TestCaseError::fail(format!("published body not an object: {e}")))?;
            prop_assert!(object.values().all(Value::is_string));
            let again = parse::parse_ion(body)
                .map(|i| i.msg_id())
                .unwrap_or_default();
            prop_assert_eq!(ion.msg_id(), again);
        }
    }
    Ok(())
}

/// A v3 body the ingest accepts (answers 200 for) is one the normalizer normalizes, for the same
/// store and with the same event key.
fn accepted_v3_normalizes(body: &[u8]) -> Result<(), TestCaseError> {
    let Ok(head) = parse::parse_v3(body) else {
        return Ok(());
    };
    let n = normalize::normalize_v3(body).map_err(|e| {
        TestCaseError::fail(format!(
            "the ingest accepts {:?} but the normalizer refuses it: {e}",
            String::from_utf8_lossy(body)
        ))
    })?;
    prop_assert!(
        normalize::raw_value(body).is_ok(),
        "the ingest accepts {:?} but its raw value is refused",
        String::from_utf8_lossy(body)
    );
    prop_assert_eq!(&n.store_id, &head.store_id);
    prop_assert_eq!(n.event_key, parse::v3_msg_id(&head));
    Ok(())
}

/// An ION form the ingest accepts and routes to `ecwid.raw.<store_id>` is one the normalizer
/// reads as the same store (whose instances it fans out to) and the same order.
fn accepted_ion_normalizes_alike(body: &str) -> Result<(), TestCaseError> {
    let Ok(ion) = parse::parse_ion(body.as_bytes()) else {
        return Ok(());
    };
    let n =
        normalize::normalize_ion(&ion.to_json(), Some(&ion.msg_id()), Some(0)).map_err(|e| {
            TestCaseError::fail(format!("the ingest accepts {body:?}; the normalizer: {e}"))
        })?;
    prop_assert_eq!(&n.store_id, &ion.store_id, "{:?}", body);
    prop_assert_eq!(&n.event.object_id, &ion.order_id, "{:?}", body);
    Ok(())
}

proptest! {
    #[test]
    fn detect_format_never_panics_and_refuses_with_415(
        ct in content_type(),
        body in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        match parse::detect_format(ct.as_deref(), &body) {
            Ok(Format::V3 | Format::Ion) => {}
            Err(e) => {
                is_4xx(&e)?;
                prop_assert_eq!(e.status().as_u16(), 415);
                prop_assert!(ct.is_some(), "refused without a content type");
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_are_refused_with_4xx(
        body in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        check_v3(&body)?;
        check_ion(&body)?;
    }

    #[test]
    fn arbitrary_json_never_panics(value in any_json()) {
        let body = value.to_string();
        check_v3(body.as_bytes())?;
        check_ion(body.as_bytes())?;
    }

    #[test]
    fn webhook_shaped_json_never_panics(value in webhook_like()) {
        check_v3(value.to_string().as_bytes())?;
    }

    #[test]
    fn corrupted_webhooks_never_panic(
        value in webhook_like(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut body = value.to_string().into_bytes();
        for (at, byte) in edits {
            let i = at.index(body.len());
            body[i] = byte;
        }
        check_v3(&body)?;
    }

    #[test]
    fn forms_never_panic(body in form_like()) {
        check_ion(body.as_bytes())?;
        check_v3(body.as_bytes())?;
    }

    #[test]
    fn hand_written_form_text_never_panics(body in form_text()) {
        check_ion(body.as_bytes())?;
    }

    #[test]
    fn accepted_webhooks_always_normalize(
        value in webhook_like(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
    ) {
        let mut body = value.to_string().into_bytes();
        for (at, byte) in edits {
            let i = at.index(body.len());
            body[i] = byte;
        }
        accepted_v3_normalizes(&body)?;
    }

    #[test]
    fn accepted_forms_normalize_to_the_same_store_and_order(body in form_like()) {
        accepted_ion_normalizes_alike(&body)?;
    }
}

/// Each body here once got a 200 from the ingest and was then dead-lettered (or misrouted) by the
/// normalizer: the ingest must refuse it, or read it as the normalizer does.
#[test]
fn what_the_ingest_accepts_the_normalizer_takes() {
    let v3: [&[u8]; 3] = [
        // eventCreated past year 9999: no date for the envelope.
        br#"{"eventId":"e-1","eventCreated":253402300800,"storeId":1003,"eventType":"order.created"}"#,
        // A positional array: serde fills struct fields from a sequence.
        br#"["e-1",1234567,1003,"order.created"]"#,
        // Invalid UTF-8 inside a member the ingest does not read.
        b"{\"eventId\":\"e-1\",\"eventCreated\":1234567,\"storeId\":1003,\"eventType\":\"order.created\",\"note\":\"\xff\"}",
    ];
    let mut failures: Vec<String> = v3
        .into_iter()
        .filter_map(|body| accepted_v3_normalizes(body).err())
        .map(|e| e.to_string())
        .collect();
    // Routed to store 1003 by the ingest, fanned out to store 9999's instances by the normalizer.
    let form = "owner_id=1003&event_type=new_order&order_id=42&owner_id=9999&order_id=43";
    failures.extend(
        accepted_ion_normalizes_alike(form)
            .err()
            .map(|e| e.to_string()),
    );
    assert!(failures.is_empty(), "{failures:#?}");
}
