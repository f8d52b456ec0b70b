//! proptest strategies for Ecwid-shaped input, shared by the ingest's and the normalizer's
//! property tests (feature `strategies`).

use proptest::prelude::*;
use serde_json::{json, Map, Value};

/// Any JSON value, nested a few levels.
pub fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A field that is sometimes missing, sometimes plausible, sometimes anything.
pub fn field(plausible: BoxedStrategy<Value>) -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        1 => Just(None),
        6 => plausible.prop_map(Some),
        2 => any_json().prop_map(Some),
    ]
}

pub const EVENT_TYPES: &[&str] = &[
    "order.created",
    "order.updated",
    "order.deleted",
    "unfinished_order.created",
    "product.updated",
    "customer.created",
    "customer.personalDataRemovalRequest",
    "application.installed",
    "application.subscriptionStatusChanged",
    "application.subscription_status_changed",
    "gift_card.activated",
    "",
    ".",
    "order.",
    ".created",
];

/// Objects shaped like v3 webhooks, so that most cases reach past the first field check.
pub fn webhook_like() -> impl Strategy<Value = Value> {
    (
        field(".{0,40}".prop_map(Value::from).boxed()),
        field(
            prop_oneof![
                (0i64..4_000_000_000).prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
            ]
            .boxed(),
        ),
        field(
            prop_oneof![
                any::<u64>().prop_map(Value::from),
                "[0-9]{1,20}".prop_map(Value::from),
                "[a-z0-9._*> -]{0,8}".prop_map(Value::from),
            ]
            .boxed(),
        ),
        field(
            prop_oneof![
                prop::sample::select(EVENT_TYPES).prop_map(Value::from),
                "[a-zA-Z_]{0,12}\\.[a-zA-Z_]{0,24}".prop_map(Value::from),
            ]
            .boxed(),
        ),
        field(
            prop_oneof![
                any::<u64>().prop_map(Value::from),
                ".{0,20}".prop_map(Value::from)
            ]
            .boxed(),
        ),
        field(
            prop_oneof![
                (any_json(), any_json()).prop_map(|(id, extra)| json!({"orderId": id, "x": extra})),
                ".{0,10}".prop_map(|id| json!({"orderId": id, "customerEmail": "a@b.c"})),
            ]
            .boxed(),
        ),
        prop::collection::btree_map("[a-z]{1,6}", any_json(), 0..3),
    )
        .prop_map(
            |(event_id, created, store, event_type, entity, data, extra)| {
                let mut m: Map<String, Value> = extra.into_iter().collect();
                for (k, v) in [
                    ("eventId", event_id),
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
            },
        )
}
