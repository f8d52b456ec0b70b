//! Raw Ecwid payload → Open Connectors event. Pure functions, no I/O.
//!
//! [`MAPPING`] is the one table that says which Ecwid event family becomes which `objectType`;
//! [`event_type_of`] says which action becomes which `eventType`. Unknown families and actions
//! still flow: the family keeps its own name and the action becomes `UNKNOWN`.

use crate::ecwid::{self, Format, ParseError};
use crate::envelope::{Envelope, Event, EventType, Message, ELEMENT_KEY};
use serde_json::value::RawValue;

/// Ecwid event family (as spelled after folding case and underscores) → `objectType`.
/// `unfinished_order` becomes `abandonedCarts`: that is what Ecwid's own control panel calls
/// unfinished orders, and the REST API serves them under `/carts`.
pub const MAPPING: &[(&str, &str)] = &[
    ("order", "orders"),
    ("unfinishedorder", "abandonedCarts"),
    ("product", "products"),
    ("category", "categories"),
    ("customer", "customers"),
    ("customergroup", "customerGroups"),
    ("discountcoupon", "discountCoupons"),
    ("promotion", "promotions"),
    ("productclass", "productClasses"),
    ("review", "reviews"),
    ("invoice", "invoices"),
    ("sizechart", "sizeCharts"),
    ("application", "applications"),
    ("profile", "profiles"),
];

/// Folds `subscriptionStatusChanged` and `subscription_status_changed` to one spelling.
fn fold(s: &str) -> String {
    s.chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect()
}

/// Action (folded) → `eventType`.
pub fn event_type_of(action: &str) -> EventType {
    match fold(action).as_str() {
        "created" | "installed" => EventType::Created,
        "updated" | "subscriptionstatuschanged" | "storagestatuschanged" | "storagechanged" => {
            EventType::Updated
        }
        "deleted" | "uninstalled" => EventType::Deleted,
        _ => EventType::Unknown,
    }
}

/// Ecwid `eventType` (`order.created`) → (`objectType`, `eventType`).
pub fn map_event_type(ecwid_event_type: &str) -> (String, EventType) {
    let (family, action) = ecwid_event_type
        .split_once('.')
        .unwrap_or((ecwid_event_type, ""));
    (object_type_of(family), event_type_of(action))
}

/// Ecwid event family (`order`, `unfinished_order`) → `objectType`, by [`MAPPING`].
pub fn object_type_of(family: &str) -> String {
    let folded = fold(family);
    MAPPING
        .iter()
        .find(|(f, _)| *f == folded)
        .map(|(_, o)| (*o).to_owned())
        .unwrap_or_else(|| {
            if family.is_empty() {
                "unknown".to_owned()
            } else {
                family.to_owned()
            }
        })
}

/// The `objectType` of a polled entity type: its webhook family through [`MAPPING`], so a
/// polled order and an order webhook name the same type.
pub fn poll_object_type(entity: ecwid::PollEntity) -> String {
    object_type_of(entity.family())
}

/// Whether `instance` takes an event that arrived in `format`: webhook formats go to instances
/// whose `event.vendor.type` names webhooks, polled ones to those that poll. A poll message that
/// names an instance (`Ecwid-Instance-Id`, set by a backfill) goes to that instance only.
pub fn takes(format: Format, instance: &crate::instance::Instance, named: Option<&str>) -> bool {
    match format {
        Format::V3 | Format::Ion => instance.takes_webhooks(),
        Format::Poll => match named {
            Some(id) => instance.id == id,
            None => instance.polls(),
        },
    }
}

/// One Ecwid event, normalized, before fan-out. Borrows the raw payload.
#[derive(Debug, Clone)]
pub struct Normalized<'a> {
    pub format: Format,
    pub store_id: String,
    /// Identifies the Ecwid event: `v3:<storeId>:<eventId>` or the ION's `ion:<storeId>:<hash>`,
    /// the same id the ingest stored it under.
    pub event_key: String,
    pub event: Event,
    /// The payload exactly as stored.
    pub raw: &'a RawValue,
}

impl Normalized<'_> {
    /// The id Ecwid knows the event by: v3's `eventId`; for ION (which has none) its dedupe id.
    pub fn ecwid_event_id(&self) -> &str {
        match self.format {
            Format::V3 => self
                .event_key
                .strip_prefix("v3:")
                .and_then(|rest| rest.strip_prefix(self.store_id.as_str()))
                .and_then(|rest| rest.strip_prefix(':'))
                .unwrap_or(&self.event_key),
            Format::Ion | Format::Poll => &self.event_key,
        }
    }
}

/// Normalizes a raw message of `format`. The only way it fails is that [`crate::ecwid`] cannot
/// parse the payload; the ingest parses with the same functions before it stores anything.
pub fn normalize(
    format: Format,
    payload: &[u8],
    received_at_ms: Option<i64>,
) -> Result<Normalized<'_>, ParseError> {
    match format {
        Format::V3 => normalize_v3(payload),
        Format::Ion => normalize_ion(payload, received_at_ms),
        Format::Poll => normalize_poll(payload),
    }
}

/// Normalizes an entity the poller read (`poll` format, see [`crate::ecwid::parse_poll`]):
/// CREATED when its creation and update times are equal, UPDATED otherwise, DELETED from a
/// `/deleted` list. `objectId` is the id webhooks use, `date` the update (or deletion) time, and
/// `raw` the entity exactly as the REST API returned it.
pub fn normalize_poll(body: &[u8]) -> Result<Normalized<'_>, ParseError> {
    let poll = ecwid::parse_poll(body)?;
    let event_type = match poll.action {
        ecwid::PollAction::Created => EventType::Created,
        ecwid::PollAction::Updated => EventType::Updated,
        ecwid::PollAction::Deleted => EventType::Deleted,
    };
    let date = crate::time_fmt::unix_secs_to_rfc3339(poll.changed_at).unwrap_or_default();
    Ok(Normalized {
        format: Format::Poll,
        event_key: poll.msg_id(),
        event: Event {
            event_type,
            object_type: poll_object_type(poll.entity),
            object_id: poll.object_id,
            element_key: ELEMENT_KEY.to_owned(),
            date,
        },
        store_id: poll.store_id,
        raw: poll.item,
    })
}

/// Normalizes a v3 webhook body. Orders and abandoned carts take `objectId` from
/// `data.orderId` (the id the REST API uses) when present; everything else from `entityId`.
pub fn normalize_v3(body: &[u8]) -> Result<Normalized<'_>, ParseError> {
    let v3 = ecwid::parse_v3(body)?;
    let raw = v3.raw()?;
    let (object_type, event_type) = map_event_type(&v3.event_type);
    let order_id = if object_type == "orders" || object_type == "abandonedCarts" {
        v3.data_order_id()
    } else {
        None
    };
    let object_id = order_id
        .or_else(|| v3.entity_id.clone())
        .unwrap_or_default();
    // parse_v3 bounds eventCreated to what a date can show.
    let date = crate::time_fmt::unix_secs_to_rfc3339(v3.event_created).unwrap_or_default();
    Ok(Normalized {
        format: Format::V3,
        event_key: v3.msg_id(),
        store_id: v3.store_id,
        event: Event {
            event_type,
            object_type,
            object_id,
            element_key: ELEMENT_KEY.to_owned(),
            date,
        },
        raw,
    })
}

/// Normalizes an Instant Order Notification (the ingest stores its form fields as a JSON object).
/// `new_order` → CREATED, `order_status_change` → UPDATED. Its `date` has no time zone and is
/// read as UTC; without a usable one, `received_at_ms` is used.
pub fn normalize_ion(
    body: &[u8],
    received_at_ms: Option<i64>,
) -> Result<Normalized<'_>, ParseError> {
    let ion = ecwid::parse_ion_json(body)?;
    // The stored body is a JSON object: parse_ion_json just read it.
    let raw = raw_value(body)?;
    let event_type = match ion.event_type.as_str() {
        "new_order" => EventType::Created,
        "order_status_change" => EventType::Updated,
        _ => EventType::Unknown,
    };
    let date = ion
        .date
        .as_deref()
        .and_then(ion_date)
        .or_else(|| received_at_ms.map(crate::time_fmt::unix_ms_to_rfc3339))
        .unwrap_or_default();
    Ok(Normalized {
        format: Format::Ion,
        event_key: ion.msg_id(),
        store_id: ion.store_id,
        event: Event {
            event_type,
            object_type: "orders".to_owned(),
            object_id: ion.order_id,
            element_key: ELEMENT_KEY.to_owned(),
            date,
        },
        raw,
    })
}

/// `2026-11-22 10:15:00` → `2026-11-22T10:15:00Z`.
fn ion_date(s: &str) -> Option<String> {
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    let t = time::PrimitiveDateTime::parse(s, &format)
        .ok()?
        .assume_utc();
    crate::time_fmt::unix_secs_to_rfc3339(t.unix_timestamp())
}

pub use crate::envelope::notification_id;

/// The envelope for one instance. `raw` is the payload exactly as received; `verified` says
/// whether the ingest checked Ecwid's signature.
pub fn envelope(normalized: &Normalized<'_>, instance_id: &str, verified: bool) -> Envelope {
    Envelope {
        message: Message {
            event_id: notification_id(&normalized.event_key, instance_id),
            instance_id: instance_id.to_owned(),
            element_key: ELEMENT_KEY.to_owned(),
            verified,
            events: vec![normalized.event.clone()],
            raw: normalized.raw.to_owned(),
        },
    }
}

/// Parses the body as a JSON value without changing a byte of it.
pub fn raw_value(body: &[u8]) -> Result<&RawValue, ParseError> {
    let s = std::str::from_utf8(body).map_err(|e| ParseError::Json(e.to_string()))?;
    serde_json::from_str::<&RawValue>(s).map_err(|e| ParseError::Json(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const INSTANCE: &str = "inst-1";
    /// 2026-11-22T10:15:00Z
    const CREATED: i64 = 1_795_342_500;
    const DATE: &str = "2026-11-22T10:15:00Z";

    fn event(event_type: EventType, object_type: &str, object_id: &str, date: &str) -> Event {
        Event {
            event_type,
            object_type: object_type.to_owned(),
            object_id: object_id.to_owned(),
            element_key: ELEMENT_KEY.to_owned(),
            date: date.to_owned(),
        }
    }

    /// A v3 webhook of store 1003 as Ecwid sends it.
    fn webhook(event_id: &str, event_type: &str, entity_id: Value, data: Option<Value>) -> Value {
        let mut body = json!({
            "eventId": event_id,
            "eventCreated": CREATED,
            "storeId": 1003,
            "entityId": entity_id,
            "eventType": event_type,
        });
        if let Some(data) = data {
            body["data"] = data;
        }
        body
    }

    /// The whole envelope the callback of [`INSTANCE`] receives, as JSON.
    fn envelope_json(normalized: &Normalized<'_>) -> Value {
        let text = serde_json::to_string(&envelope(normalized, INSTANCE, true)).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn every_documented_v3_payload_becomes_the_expected_envelope() {
        use EventType::{Created, Deleted, Unknown, Updated};
        let cases: Vec<(Value, Event)> = vec![
            // Orders: objectId is data.orderId, the id the REST API uses.
            (
                webhook(
                    "e-order-created",
                    "order.created",
                    json!(22222),
                    Some(json!({"orderId": "XJ12H", "newPaymentStatus": "PAID",
                                "newFulfillmentStatus": "AWAITING_PROCESSING"})),
                ),
                event(Created, "orders", "XJ12H", DATE),
            ),
            (
                webhook(
                    "e-order-updated",
                    "order.updated",
                    json!(22222),
                    Some(json!({"orderId": "XJ12H",
                                "oldPaymentStatus": "AWAITING_PAYMENT", "newPaymentStatus": "PAID",
                                "oldFulfillmentStatus": "AWAITING_PROCESSING",
                                "newFulfillmentStatus": "SHIPPED"})),
                ),
                event(Updated, "orders", "XJ12H", DATE),
            ),
            (
                webhook(
                    "e-order-deleted",
                    "order.deleted",
                    json!(22222),
                    Some(json!({"orderId": "XJ12H"})),
                ),
                event(Deleted, "orders", "XJ12H", DATE),
            ),
            // Without data.orderId an order falls back to entityId.
            (
                webhook("e-order-bare", "order.deleted", json!(22222), None),
                event(Deleted, "orders", "22222", DATE),
            ),
            // A numeric orderId is rendered as a string; an empty one falls back to entityId.
            (
                webhook(
                    "e-order-num",
                    "order.updated",
                    json!(22222),
                    Some(json!({"orderId": 1042})),
                ),
                event(Updated, "orders", "1042", DATE),
            ),
            (
                webhook(
                    "e-order-empty",
                    "order.updated",
                    json!(22222),
                    Some(json!({"orderId": ""})),
                ),
                event(Updated, "orders", "22222", DATE),
            ),
            // data that is not an object, or an orderId that is not an id: entityId.
            (
                webhook(
                    "e-order-array",
                    "order.updated",
                    json!(22222),
                    Some(json!(["XJ12H"])),
                ),
                event(Updated, "orders", "22222", DATE),
            ),
            (
                webhook(
                    "e-order-null",
                    "order.updated",
                    json!(22222),
                    Some(json!({"orderId": null, "items": [{"orderId": "nested"}]})),
                ),
                event(Updated, "orders", "22222", DATE),
            ),
            (
                webhook(
                    "e-order-obj",
                    "order.updated",
                    json!(22222),
                    Some(json!({"orderId": {"id": "XJ12H"}})),
                ),
                event(Updated, "orders", "22222", DATE),
            ),
            (
                webhook(
                    "e-cart-created",
                    "unfinished_order.created",
                    json!(33333),
                    Some(json!({"orderId": "QD7P2"})),
                ),
                event(Created, "abandonedCarts", "QD7P2", DATE),
            ),
            (
                webhook(
                    "e-cart-updated",
                    "unfinished_order.updated",
                    json!(33333),
                    Some(json!({"orderId": "QD7P2"})),
                ),
                event(Updated, "abandonedCarts", "QD7P2", DATE),
            ),
            (
                webhook(
                    "e-cart-deleted",
                    "unfinished_order.deleted",
                    json!(33333),
                    None,
                ),
                event(Deleted, "abandonedCarts", "33333", DATE),
            ),
            // Everything else: objectId is entityId as a string, even when data has an orderId.
            (
                webhook(
                    "e-product-created",
                    "product.created",
                    json!(66722487),
                    None,
                ),
                event(Created, "products", "66722487", DATE),
            ),
            (
                webhook(
                    "e-product-updated",
                    "product.updated",
                    json!(66722487),
                    Some(json!({"orderId": "not-this-one"})),
                ),
                event(Updated, "products", "66722487", DATE),
            ),
            (
                webhook(
                    "e-product-deleted",
                    "product.deleted",
                    json!(66722487),
                    None,
                ),
                event(Deleted, "products", "66722487", DATE),
            ),
            (
                webhook("e-cat-created", "category.created", json!(9691094), None),
                event(Created, "categories", "9691094", DATE),
            ),
            (
                webhook("e-cat-deleted", "category.deleted", json!(9691094), None),
                event(Deleted, "categories", "9691094", DATE),
            ),
            (
                webhook(
                    "e-customer-created",
                    "customer.created",
                    json!(177737165),
                    Some(json!({"customerEmail": "ec.apps@lightspeedhq.com"})),
                ),
                event(Created, "customers", "177737165", DATE),
            ),
            (
                webhook(
                    "e-customer-updated",
                    "customer.updated",
                    json!(177737165),
                    Some(json!({"customerEmail": "ec.apps@lightspeedhq.com"})),
                ),
                event(Updated, "customers", "177737165", DATE),
            ),
            (
                webhook(
                    "e-customer-deleted",
                    "customer.deleted",
                    json!(177737165),
                    None,
                ),
                event(Deleted, "customers", "177737165", DATE),
            ),
            (
                webhook(
                    "e-customer-gdpr",
                    "customer.personalDataRemovalRequest",
                    json!(177737165),
                    Some(json!({"customerEmail": "ec.apps@lightspeedhq.com"})),
                ),
                event(Unknown, "customers", "177737165", DATE),
            ),
            (
                webhook(
                    "e-customer-export",
                    "customer.personalDataExportRequest",
                    json!(177737165),
                    None,
                ),
                event(Unknown, "customers", "177737165", DATE),
            ),
            (
                webhook("e-group", "customer_group.created", json!(4), None),
                event(Created, "customerGroups", "4", DATE),
            ),
            (
                webhook("e-coupon", "discount_coupon.updated", json!(152301), None),
                event(Updated, "discountCoupons", "152301", DATE),
            ),
            // A camelCase family folds to the same row.
            (
                webhook(
                    "e-coupon-camel",
                    "discountCoupon.deleted",
                    json!(152301),
                    None,
                ),
                event(Deleted, "discountCoupons", "152301", DATE),
            ),
            (
                webhook("e-promo", "promotion.created", json!(5001), None),
                event(Created, "promotions", "5001", DATE),
            ),
            (
                webhook("e-class", "product_class.deleted", json!(62921), None),
                event(Deleted, "productClasses", "62921", DATE),
            ),
            (
                webhook("e-review", "review.created", json!(3011), None),
                event(Created, "reviews", "3011", DATE),
            ),
            (
                webhook("e-review-upd", "review.updated", json!(3011), None),
                event(Updated, "reviews", "3011", DATE),
            ),
            (
                webhook("e-invoice", "invoice.created", json!(77), None),
                event(Created, "invoices", "77", DATE),
            ),
            (
                webhook("e-size", "size_chart.updated", json!(12), None),
                event(Updated, "sizeCharts", "12", DATE),
            ),
            (
                webhook("e-profile", "profile.updated", json!(1003), None),
                event(Updated, "profiles", "1003", DATE),
            ),
            (
                webhook(
                    "e-profile-plan",
                    "profile.subscriptionStatusChanged",
                    json!(1003),
                    None,
                ),
                event(Updated, "profiles", "1003", DATE),
            ),
            // application.*: entityId is a string.
            (
                webhook(
                    "e-app-in",
                    "application.installed",
                    json!("custom-app-1003-1"),
                    None,
                ),
                event(Created, "applications", "custom-app-1003-1", DATE),
            ),
            (
                webhook(
                    "e-app-out",
                    "application.uninstalled",
                    json!("custom-app-1003-1"),
                    None,
                ),
                event(Deleted, "applications", "custom-app-1003-1", DATE),
            ),
            (
                webhook(
                    "e-app-sub",
                    "application.subscriptionStatusChanged",
                    json!("custom-app-1003-1"),
                    Some(json!({"oldSubscriptionName": "FREE", "newSubscriptionName": "PRO"})),
                ),
                event(Updated, "applications", "custom-app-1003-1", DATE),
            ),
            (
                webhook(
                    "e-app-sub-snake",
                    "application.subscription_status_changed",
                    json!("custom-app-1003-1"),
                    None,
                ),
                event(Updated, "applications", "custom-app-1003-1", DATE),
            ),
            (
                webhook(
                    "e-app-storage",
                    "application.storageChanged",
                    json!("custom-app-1003-1"),
                    None,
                ),
                event(Updated, "applications", "custom-app-1003-1", DATE),
            ),
            // A type Ecwid adds later still flows: its family keeps its name, UNKNOWN.
            (
                webhook("e-future", "gift_card.activated", json!(555), None),
                event(Unknown, "gift_card", "555", DATE),
            ),
            (
                webhook("e-future-bare", "order", json!(22222), None),
                event(Unknown, "orders", "22222", DATE),
            ),
        ];
        for (payload, expected) in cases {
            let body = serde_json::to_vec(&payload).unwrap();
            let event_id = payload["eventId"].as_str().unwrap();
            let normalized = normalize_v3(&body)
                .unwrap_or_else(|e| panic!("{} is refused: {e}", payload["eventType"]));
            assert_eq!(normalized.store_id, "1003");
            assert_eq!(normalized.event_key, format!("v3:1003:{event_id}"));
            assert_eq!(normalized.event, expected, "{}", payload["eventType"]);
            assert_eq!(
                envelope_json(&normalized),
                json!({"message": {
                    "eventId": notification_id(&normalized.event_key, INSTANCE),
                    "instanceId": INSTANCE,
                    "elementKey": "ecwid",
                    "verified": true,
                    "events": [{
                        "eventType": expected.event_type.as_str(),
                        "objectType": expected.object_type,
                        "objectId": expected.object_id,
                        "elementKey": "ecwid",
                        "date": DATE,
                    }],
                    "raw": payload,
                }}),
                "{}",
                payload["eventType"]
            );
        }
    }

    #[test]
    fn the_design_example_is_exact() {
        let body = br#"{"eventId":"80aece08-40e8-4145-8764-6c2f0d38678","eventCreated":1234567,"storeId":1003,"entityId":22222,"eventType":"order.created","data":{"orderId":"XJ12H"}}"#;
        let normalized = normalize_v3(body).unwrap();
        let text = serde_json::to_string(&envelope(&normalized, INSTANCE, true)).unwrap();
        // Pinned: a changed id scheme would deliver every redelivered raw message again.
        assert_eq!(
            text,
            format!(
                r#"{{"message":{{"eventId":"{}","instanceId":"inst-1","elementKey":"ecwid","verified":true,"events":[{{"eventType":"CREATED","objectType":"orders","objectId":"XJ12H","elementKey":"ecwid","date":"1970-01-15T06:56:07Z"}}],"raw":{}}}}}"#,
                "ef5f96da-3555-db70-8cd6-fb159563996e",
                std::str::from_utf8(body).unwrap()
            )
        );
    }

    /// The ION body exactly as the ingest publishes it: the form fields as a JSON object.
    fn ion(fields: &[(&str, &str)]) -> Vec<u8> {
        let map: serde_json::Map<String, Value> = fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::String((*v).to_owned())))
            .collect();
        serde_json::to_vec(&map).unwrap()
    }

    #[test]
    fn ion_notifications_become_order_events() {
        let new_order = ion(&[
            ("owner_id", "1003"),
            ("event_type", "new_order"),
            ("date", "2026-11-22 10:15:00"),
            ("order_id", "42"),
            ("payment_status", "PAID"),
            ("fulfillment_status", "AWAITING_PROCESSING"),
        ]);
        let status_change = ion(&[
            ("owner_id", "1003"),
            ("event_type", "order_status_change"),
            ("date", "2026-11-22 10:15:00"),
            ("order_id", "42"),
            ("payment_status", "PAID"),
            ("fulfillment_status", "SHIPPED"),
            ("old_payment_status", "AWAITING_PAYMENT"),
            ("old_fulfillment_status", "PROCESSING"),
        ]);
        for (body, event_type) in [
            (&new_order, EventType::Created),
            (&status_change, EventType::Updated),
        ] {
            let normalized = normalize_ion(body, Some(1)).unwrap();
            let key = crate::ecwid::parse_ion_json(body).unwrap().msg_id();
            assert_eq!(normalized.store_id, "1003");
            assert_eq!(normalized.event_key, key);
            assert_eq!(
                normalized.event,
                event(event_type, "orders", "42", "2026-11-22T10:15:00Z")
            );
            let raw: Value = serde_json::from_slice(body).unwrap();
            assert_eq!(
                envelope_json(&normalized),
                json!({"message": {
                    "eventId": notification_id(&key, INSTANCE),
                    "instanceId": INSTANCE,
                    "elementKey": "ecwid",
                    "verified": true,
                    "events": [{"eventType": event_type.as_str(), "objectType": "orders",
                                "objectId": "42", "elementKey": "ecwid",
                                "date": "2026-11-22T10:15:00Z"}],
                    "raw": raw,
                }})
            );
        }
    }

    #[test]
    fn ion_without_a_usable_date_uses_the_receipt_time() {
        for date in [None, Some("22/11/2026 10:15"), Some("")] {
            let mut fields = vec![
                ("owner_id", "1003"),
                ("event_type", "new_order"),
                ("order_id", "42"),
            ];
            if let Some(d) = date {
                fields.push(("date", d));
            }
            let body = ion(&fields);
            let n = normalize_ion(&body, Some(1_795_342_500_500)).unwrap();
            assert_eq!(n.event.date, "2026-11-22T10:15:00.5Z", "{date:?}");
        }
    }

    #[test]
    fn an_ion_is_keyed_by_the_id_the_ingest_stored_it_under() {
        let form = b"owner_id=1003&event_type=new_order&order_id=42";
        let stored = crate::ecwid::parse_ion_form(form).unwrap();
        let body = stored.to_json();
        let key = normalize_ion(&body, None).unwrap().event_key;
        assert_eq!(key, stored.msg_id());
        assert!(key.starts_with("ion:1003:"), "{key}");
        assert_eq!(key.len(), "ion:1003:".len() + 32);
        let other = ion(&[
            ("owner_id", "1003"),
            ("event_type", "new_order"),
            ("order_id", "43"),
        ]);
        assert_ne!(normalize_ion(&other, None).unwrap().event_key, key);
    }

    #[test]
    fn an_unknown_ion_event_type_still_flows() {
        let body = ion(&[
            ("owner_id", "1003"),
            ("event_type", "order_archived"),
            ("order_id", "42"),
        ]);
        let n = normalize_ion(&body, None).unwrap();
        assert_eq!(n.event.event_type, EventType::Unknown);
        assert_eq!(n.event.object_type, "orders");
    }

    #[test]
    fn raw_is_the_body_byte_for_byte() {
        // Odd white space, key order, a trailing zero, an escape and non-ASCII: a parse and
        // re-serialize would change every one of them.
        let body = "{ \"storeId\" :1003,\n\t\"eventType\":\"order.updated\",  \"eventId\":\"e-1\",\r\n\"data\" :  { \"orderId\":\"XJ12H\",\"total\":1.50,\"note\":\"caf\\u00e9 \u{2713}\",\"big\":12345678901234567890123},\"eventCreated\":1234567 , \"entityId\":22222 }";
        let normalized = normalize_v3(body.as_bytes()).unwrap();
        assert_eq!(normalized.event.object_id, "XJ12H");
        assert_eq!(normalized.raw.get(), body);
        let built = envelope(&normalized, INSTANCE, true);
        let text = serde_json::to_string(&built).unwrap();
        assert!(
            text.ends_with(&format!(",\"raw\":{body}}}}}")),
            "raw changed: {text}"
        );
        assert_eq!(built.to_json(), text.as_bytes());
    }

    #[test]
    fn white_space_around_the_body_is_not_part_of_raw() {
        let body = b"\n  {\"a\": 1}\r\n";
        assert_eq!(raw_value(body).unwrap().get(), "{\"a\": 1}");
    }

    #[test]
    fn notification_ids_are_deterministic_per_event_and_instance() {
        let a = notification_id("v3:1003:e-1", "inst-1");
        assert_eq!(a, notification_id("v3:1003:e-1", "inst-1"));
        assert_ne!(a, notification_id("v3:1003:e-1", "inst-2"));
        assert_ne!(a, notification_id("v3:1003:e-2", "inst-1"));
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(notification_id("ab", "c"), notification_id("a", "bc"));
        let parts: Vec<usize> = a.split('-').map(str::len).collect();
        assert_eq!(parts, [8, 4, 4, 4, 12], "{a}");
        assert!(a.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit()));

        let body = serde_json::to_vec(&webhook("e-1", "order.created", json!(1), None)).unwrap();
        let n = normalize_v3(&body).unwrap();
        let (one, two) = (envelope(&n, "inst-1", true), envelope(&n, "inst-2", true));
        assert_eq!(
            one.message.event_id,
            envelope(&n, "inst-1", false).message.event_id
        );
        assert_ne!(one.message.event_id, two.message.event_id);
        assert_eq!(two.message.instance_id, "inst-2");
    }

    #[test]
    fn store_ids_may_be_numbers_or_digit_strings() {
        let mut body = webhook("e-1", "order.created", json!(1), None);
        body["storeId"] = json!("1003");
        let bytes = serde_json::to_vec(&body).unwrap();
        let n = normalize_v3(&bytes).unwrap();
        assert_eq!(n.store_id, "1003");
        assert_eq!(n.event_key, "v3:1003:e-1");
    }

    #[test]
    fn what_cannot_be_normalized_says_which_field() {
        let valid = webhook("e-1", "order.created", json!(1), None);
        let without = |field: &str| {
            let mut v = valid.clone();
            v.as_object_mut().unwrap().remove(field);
            serde_json::to_vec(&v).unwrap()
        };
        let with = |field: &str, value: Value| {
            let mut v = valid.clone();
            v[field] = value;
            serde_json::to_vec(&v).unwrap()
        };
        let field = |name: &str| name.to_owned();
        let cases: Vec<(Vec<u8>, String)> = vec![
            (without("eventId"), field("eventId")),
            (with("eventId", json!(7)), field("eventId")),
            (without("eventCreated"), field("eventCreated")),
            (
                with("eventCreated", json!("yesterday")),
                field("eventCreated"),
            ),
            (with("eventCreated", json!(1.5)), field("eventCreated")),
            // Past year 9999: no date to give.
            (
                with("eventCreated", json!(1_000_000_000_000_000_i64)),
                field("eventCreated"),
            ),
            (without("eventType"), field("eventType")),
            (
                with("eventType", json!(["order.created"])),
                field("eventType"),
            ),
            (without("storeId"), field("storeId")),
            (with("storeId", json!(-4)), field("storeId")),
            (with("storeId", json!(10.5)), field("storeId")),
            // Not one subject token: it would publish to another subject.
            (with("storeId", json!("10.3")), field("storeId")),
            (with("storeId", json!("1003.>")), field("storeId")),
            (with("storeId", json!("")), field("storeId")),
        ];
        for (body, expected) in cases {
            let err = normalize_v3(&body).unwrap_err();
            assert!(
                matches!(&err, ParseError::Field { field, .. } if *field == expected),
                "{err} for {}",
                String::from_utf8_lossy(&body)
            );
        }
        // A positional array would otherwise fill the fields in order.
        let positional = br#"["e-1",1234567,1003,"order.created",22222,{"orderId":"XJ12H"}]"#;
        for body in [
            &b""[..],
            b"{",
            b"[1]",
            positional,
            b"null",
            b"\"order\"",
            b"\xff\xfe",
        ] {
            assert!(
                matches!(normalize_v3(body), Err(e) if e.code() == "invalid_json"),
                "{body:?}"
            );
        }
    }

    #[test]
    fn ion_without_its_fields_is_refused() {
        let cases: [(&[(&str, &str)], &str); 5] = [
            (
                &[("event_type", "new_order"), ("order_id", "42")],
                "owner_id",
            ),
            (
                &[
                    ("owner_id", "10.3"),
                    ("event_type", "new_order"),
                    ("order_id", "42"),
                ],
                "owner_id",
            ),
            (&[("owner_id", "1003"), ("order_id", "42")], "event_type"),
            (
                &[("owner_id", "1003"), ("event_type", "new_order")],
                "order_id",
            ),
            (
                &[
                    ("owner_id", "1003"),
                    ("event_type", "new_order"),
                    ("order_id", "  "),
                ],
                "order_id",
            ),
        ];
        for (fields, expected) in cases {
            let err = normalize_ion(&ion(fields), None).unwrap_err();
            assert!(
                matches!(&err, ParseError::Field { field, .. } if *field == expected),
                "{err} for {fields:?}"
            );
        }
        assert!(matches!(
            normalize_ion(b"owner_id=1003&event_type=new_order&order_id=42", None),
            Err(e) if e.code() == "invalid_json"
        ));
        assert!(matches!(
            normalize_ion(
                br#"{"owner_id":1003,"event_type":"new_order","order_id":"42"}"#,
                None
            ),
            Err(ParseError::Field {
                field: "owner_id",
                ..
            })
        ));
    }

    #[test]
    fn the_mapping_table_covers_every_documented_family_in_both_spellings() {
        let families = [
            ("order", "orders"),
            ("unfinished_order", "abandonedCarts"),
            ("unfinishedOrder", "abandonedCarts"),
            ("product", "products"),
            ("category", "categories"),
            ("customer", "customers"),
            ("customer_group", "customerGroups"),
            ("customerGroup", "customerGroups"),
            ("discount_coupon", "discountCoupons"),
            ("promotion", "promotions"),
            ("product_class", "productClasses"),
            ("productClass", "productClasses"),
            ("review", "reviews"),
            ("invoice", "invoices"),
            ("size_chart", "sizeCharts"),
            ("sizeChart", "sizeCharts"),
            ("application", "applications"),
            ("profile", "profiles"),
        ];
        for (family, object_type) in families {
            assert_eq!(
                map_event_type(&format!("{family}.created")),
                (object_type.to_owned(), EventType::Created),
                "{family}"
            );
        }
        let actions = [
            ("created", EventType::Created),
            ("updated", EventType::Updated),
            ("deleted", EventType::Deleted),
            ("installed", EventType::Created),
            ("uninstalled", EventType::Deleted),
            ("subscriptionStatusChanged", EventType::Updated),
            ("subscription_status_changed", EventType::Updated),
            ("storageStatusChanged", EventType::Updated),
            ("storage_status_changed", EventType::Updated),
            ("storageChanged", EventType::Updated),
            ("personalDataRemovalRequest", EventType::Unknown),
            ("personal_data_removal_request", EventType::Unknown),
            ("personalDataExportRequest", EventType::Unknown),
            ("activated", EventType::Unknown),
            ("", EventType::Unknown),
        ];
        for (action, expected) in actions {
            assert_eq!(event_type_of(action), expected, "{action}");
        }
        assert_eq!(
            map_event_type(""),
            ("unknown".to_owned(), EventType::Unknown)
        );
        assert_eq!(
            map_event_type(".created"),
            ("unknown".to_owned(), EventType::Created)
        );
    }

    #[test]
    fn polled_entities_become_the_same_envelopes_as_webhooks() {
        use crate::ecwid::{poll_body, PollEntity};
        use EventType::{Created, Deleted, Updated};
        let cases: &[(PollEntity, bool, &str, Event)] = &[
            (
                PollEntity::Orders,
                false,
                r#"{"id":"XJ12H","internalId":22222,"createTimestamp":1795342500,"updateTimestamp":1795342500}"#,
                event(Created, "orders", "XJ12H", DATE),
            ),
            (
                PollEntity::Orders,
                false,
                r#"{"id":"XJ12H","createTimestamp":1795342000,"updateTimestamp":1795342500}"#,
                event(Updated, "orders", "XJ12H", DATE),
            ),
            (
                PollEntity::Orders,
                true,
                r#"{"id":"XJ12H","date":"2026-11-22 10:15:00 +0000"}"#,
                event(Deleted, "orders", "XJ12H", DATE),
            ),
            (
                PollEntity::Carts,
                false,
                r#"{"cartId":"C-1","createDate":"2026-11-22 10:15:00 +0000","updateDate":"2026-11-22 10:15:00 +0000"}"#,
                event(Created, "abandonedCarts", "C-1", DATE),
            ),
            (
                PollEntity::Products,
                false,
                r#"{"id":66722487,"created":"2026-11-22 10:00:00 +0000","updated":"2026-11-22 10:15:00 +0000"}"#,
                event(Updated, "products", "66722487", DATE),
            ),
            (
                PollEntity::Customers,
                true,
                r#"{"id":177737165,"date":1795342500}"#,
                event(Deleted, "customers", "177737165", DATE),
            ),
            (
                PollEntity::Coupons,
                false,
                r#"{"id":152301,"creationDate":"2026-11-22 10:15:00 +0000","updateDate":"2026-11-22 10:15:00 +0000"}"#,
                event(Created, "discountCoupons", "152301", DATE),
            ),
            (
                PollEntity::Reviews,
                false,
                r#"{"id":3011,"createTimestamp":1795342000,"updateTimestamp":1795342500}"#,
                event(Updated, "reviews", "3011", DATE),
            ),
        ];
        for (entity, deleted, item, expected) in cases {
            let raw: Box<RawValue> = serde_json::from_str(item).unwrap();
            let body = poll_body(*entity, "1003", *deleted, &raw).unwrap();
            let n = normalize(Format::Poll, &body, None).unwrap();
            assert_eq!(&n.event, expected, "{item}");
            assert_eq!(n.store_id, "1003");
            assert_eq!(n.raw.get(), *item, "raw is the entity as Ecwid returned it");
            assert!(n.event_key.starts_with("poll:1003:"), "{}", n.event_key);
            assert_eq!(n.ecwid_event_id(), n.event_key);
        }
    }

    #[test]
    fn vendor_types_decide_which_instances_take_which_format() {
        use crate::instance::{keys, Instance};
        let with = |vendor: Option<&str>| {
            let mut i: Instance = serde_json::from_str(r#"{"configuration":{}}"#).unwrap();
            i.id = "i-1".into();
            if let Some(v) = vendor {
                i.configuration.insert(keys::VENDOR_TYPE.into(), v.into());
            }
            i
        };
        let cases = [
            (None, [true, true, false]),
            (Some("webhooks"), [true, true, false]),
            (Some("polling"), [false, false, true]),
            (Some("webhooks,polling"), [true, true, true]),
        ];
        for (vendor, expected) in cases {
            let i = with(vendor);
            let got = [Format::V3, Format::Ion, Format::Poll].map(|f| takes(f, &i, None));
            assert_eq!(got, expected, "{vendor:?}");
        }
        // A backfill names its instance: it alone takes the message, whatever it is set to.
        assert!(takes(Format::Poll, &with(None), Some("i-1")));
        assert!(!takes(Format::Poll, &with(Some("polling")), Some("i-2")));
    }
}
