//! Property tests for what the ingest reads of a request body with [`model::ecwid`]: no input
//! panics [`Format::of_request`], [`ecwid::parse_v3`] or [`ecwid::parse_ion_form`], and every
//! refusal is a 4xx (Ecwid would retry a 5xx for 24 hours; input no retry can fix must be a 4xx).
//! What the ingest accepts, the normalizer reads with the same functions; for ION the normalizer
//! reads the canonical JSON the ingest stores, so that round trip must give back the same
//! notification, and any value the ingest puts in a NATS header must be one NATS takes.
//!
//! More cases: `PROPTEST_CASES=20000 cargo test -p ingest --test parse_props`.

use model::ecwid::{self, Format};
use model::strategies::{any_json, webhook_like};
use proptest::prelude::*;
use serde_json::{Map, Value};
use shared::http::ApiError;

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
        4 => prop::sample::select(&ecwid::ION_FIELDS[..]).prop_map(str::to_owned),
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

fn is_4xx(e: ApiError) -> Result<(), TestCaseError> {
    let status = e.status();
    prop_assert!(status.is_client_error(), "{status} for {e}");
    prop_assert!(!e.to_string().is_empty());
    Ok(())
}

/// A value the ingest puts in a NATS header: async-nats panics on CR or LF.
fn header_safe(v: &str) -> bool {
    !v.contains(['\r', '\n'])
}

/// What every outcome of `parse_v3` must satisfy: a 4xx refusal or routable, header-safe fields.
fn check_v3(body: &[u8]) -> Result<(), TestCaseError> {
    match ecwid::parse_v3(body) {
        Err(e) => is_4xx(e.into())?,
        Ok(event) => {
            prop_assert!(ecwid::is_store_id(&event.store_id));
            prop_assert!(shared::nats::is_subject_token(&event.store_id));
            prop_assert!(event.event_created >= 0);
            prop_assert!(!event.event_id.trim().is_empty() && !event.event_type.trim().is_empty());
            prop_assert!(header_safe(&event.msg_id()), "{:?}", event.msg_id());
            prop_assert!(model::time_fmt::unix_secs_to_rfc3339(event.event_created).is_some());
        }
    }
    Ok(())
}

/// What every outcome of `parse_ion_form` must satisfy: a 4xx refusal, or a store, an event
/// type, an order and a stored body for the normalizer that reads back as the same notification
/// under the same id.
fn check_ion(body: &[u8]) -> Result<(), TestCaseError> {
    match ecwid::parse_ion_form(body) {
        Err(e) => is_4xx(e.into())?,
        Ok(ion) => {
            prop_assert!(ecwid::is_store_id(&ion.store_id));
            prop_assert!(!ion.event_type.is_empty() && !ion.order_id.is_empty());
            let stored = ion.to_json();
            let object: Map<String, Value> = serde_json::from_slice(&stored)
                .map_err(|e| TestCaseError::fail(format!("stored body not an object: {e}")))?;
            prop_assert!(object.values().all(Value::is_string));
            let read_back = ecwid::parse_ion_json(&stored).map_err(|e| {
                TestCaseError::fail(format!(
                    "the normalizer refuses what the ingest stored: {e}"
                ))
            })?;
            prop_assert_eq!(&read_back, &ion);
            prop_assert_eq!(read_back.msg_id(), ion.msg_id());
            prop_assert!(header_safe(&ion.msg_id()));
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn format_detection_never_panics_and_refuses_only_a_content_type(
        ct in content_type(),
        body in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        match Format::of_request(ct.as_deref(), &body) {
            Ok(Format::V3 | Format::Ion) => {}
            Ok(Format::Poll) => prop_assert!(false, "a request body is never a poll event"),
            Err(refused) => {
                prop_assert_eq!(Some(refused), ct, "refused without a content type");
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

}

/// Each body here once got a 200 from the ingest and was then dead-lettered (or misrouted) by the
/// normalizer, or panicked the handler: the one parser refuses it now, naming what is wrong.
#[test]
fn what_the_normalizer_could_not_take_is_refused() {
    let cases: [(&[u8], &str); 6] = [
        // eventCreated past year 9999: no date for the envelope.
        (br#"{"eventId":"e-1","eventCreated":253402300800,"storeId":1003,"eventType":"order.created"}"#, "eventCreated"),
        // A positional array: serde fills struct fields from a sequence.
        (br#"["e-1",1234567,1003,"order.created"]"#, "JSON object"),
        // Invalid UTF-8 inside a member the ingest does not read.
        (b"{\"eventId\":\"e-1\",\"eventCreated\":1234567,\"storeId\":1003,\"eventType\":\"order.created\",\"note\":\"\xff\"}", "UTF-8"),
        // Repeated members: the normalizer read the other one.
        (br#"{"eventId":"e-1","eventCreated":1,"storeId":1003,"eventType":"order.created","entityId":1,"entityId":2}"#, "entityId"),
        (br#"{"eventId":"e-1","eventCreated":1,"storeId":1003,"storeId":9999,"eventType":"order.created"}"#, "storeId"),
        // A CR/LF in the event id once reached a NATS header and panicked the handler.
        (b"{\"eventId\":\"e-1\\r\\nX: y\",\"eventCreated\":1,\"storeId\":1003,\"eventType\":\"order.created\"}", "eventId"),
    ];
    for (body, says) in cases {
        let err = ecwid::parse_v3(body).expect_err(&String::from_utf8_lossy(body));
        assert!(err.to_string().contains(says), "{err} should say {says}");
        assert!(ApiError::from(err).status().is_client_error());
    }
    // Routed to store 1003, fanned out to store 9999's instances: a repeated owner_id is refused.
    let form = b"owner_id=1003&event_type=new_order&order_id=42&owner_id=9999&order_id=43";
    let err = ecwid::parse_ion_form(form).unwrap_err();
    assert!(err.to_string().contains("owner_id"), "{err}");
}
