//! Raw Ecwid payload → Open Connectors event. Pure functions, no I/O.
//!
//! [`MAPPING`] is the one table that says which Ecwid event family becomes which `objectType`;
//! [`event_type_of`] says which action becomes which `eventType`. Unknown families and actions
//! still flow: the family keeps its own name and the action becomes `UNKNOWN`.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use sha2::{Digest, Sha256};
use shared::envelope::{Envelope, Event, EventType, Message, ELEMENT_KEY};

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
    let folded = fold(family);
    let object_type = MAPPING
        .iter()
        .find(|(f, _)| *f == folded)
        .map(|(_, o)| (*o).to_owned())
        .unwrap_or_else(|| {
            if family.is_empty() {
                "unknown".to_owned()
            } else {
                family.to_owned()
            }
        });
    (object_type, event_type_of(action))
}

/// Why a raw message cannot be normalized. Goes to the dead-letter stream with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NormalizeError {
    #[error("the payload is not a JSON object: {0}")]
    NotJson(String),
    #[error("`{0}` is missing or has the wrong type")]
    Field(&'static str),
    #[error("unknown format `{0}`")]
    Format(String),
}

impl NormalizeError {
    /// The `reason` of the dead letter and the metric label.
    pub fn reason(&self) -> &'static str {
        "unparseable"
    }
}

/// One Ecwid event, normalized, before fan-out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalized {
    pub store_id: String,
    /// Identifies the Ecwid event: `v3:<storeId>:<eventId>` or the ION message id.
    pub event_key: String,
    pub event: Event,
}

/// The top-level fields of a v3 webhook, unparsed: only what is needed gets parsed.
#[derive(Deserialize)]
struct V3<'a> {
    #[serde(rename = "eventId", default, borrow)]
    event_id: Option<&'a RawValue>,
    #[serde(rename = "eventCreated", default, borrow)]
    event_created: Option<&'a RawValue>,
    #[serde(rename = "storeId", default, borrow)]
    store_id: Option<&'a RawValue>,
    #[serde(rename = "eventType", default, borrow)]
    event_type: Option<&'a RawValue>,
    #[serde(rename = "entityId", default, borrow)]
    entity_id: Option<&'a RawValue>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

fn field<T: serde::de::DeserializeOwned>(
    raw: Option<&RawValue>,
    name: &'static str,
) -> Result<T, NormalizeError> {
    raw.and_then(|r| serde_json::from_str(r.get()).ok())
        .ok_or(NormalizeError::Field(name))
}

/// An id rendered as the string a REST API would use: numbers in decimal, strings as they are.
fn id_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Normalizes a v3 webhook body.
pub fn normalize_v3(body: &[u8]) -> Result<Normalized, NormalizeError> {
    let v: V3 = serde_json::from_slice(body).map_err(|e| NormalizeError::NotJson(e.to_string()))?;
    let event_id: String = field(v.event_id, "eventId")?;
    let event_created: i64 = field(v.event_created, "eventCreated")?;
    let ecwid_event_type: String = field(v.event_type, "eventType")?;
    let store_id = match field::<Value>(v.store_id, "storeId")? {
        Value::Number(n) if n.is_u64() => n.to_string(),
        Value::String(s) if shared::nats::is_subject_token(&s) => s,
        _ => return Err(NormalizeError::Field("storeId")),
    };
    let (object_type, event_type) = map_event_type(&ecwid_event_type);
    let entity_id = v
        .entity_id
        .and_then(|r| serde_json::from_str::<Value>(r.get()).ok())
        .and_then(|e| id_string(&e));
    let order_id = if object_type == "orders" || object_type == "abandonedCarts" {
        v.data
            .and_then(|d| serde_json::from_str::<Value>(d.get()).ok())
            .and_then(|d| d.get("orderId").and_then(id_string))
            .filter(|s| !s.is_empty())
    } else {
        None
    };
    let object_id = order_id.or(entity_id).unwrap_or_default();
    let date = shared::time_fmt::unix_secs_to_rfc3339(event_created)
        .ok_or(NormalizeError::Field("eventCreated"))?;
    Ok(Normalized {
        event_key: format!("v3:{store_id}:{event_id}"),
        store_id,
        event: Event {
            event_type,
            object_type,
            object_id,
            element_key: ELEMENT_KEY.to_owned(),
            date,
        },
    })
}

/// Normalizes an Instant Order Notification (the ingest publishes its form fields as a JSON
/// object). `new_order` → CREATED, `order_status_change` → UPDATED. Its `date` has no time zone
/// and is read as UTC; without one, `received_at_ms` is used.
pub fn normalize_ion(
    body: &[u8],
    msg_id: Option<&str>,
    received_at_ms: Option<i64>,
) -> Result<Normalized, NormalizeError> {
    let fields: serde_json::Map<String, Value> =
        serde_json::from_slice(body).map_err(|e| NormalizeError::NotJson(e.to_string()))?;
    let get = |k: &'static str| {
        fields
            .get(k)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
    };
    let store_id = get("owner_id")
        .filter(|s| shared::nats::is_subject_token(s))
        .ok_or(NormalizeError::Field("owner_id"))?
        .to_owned();
    let event_type = match get("event_type").ok_or(NormalizeError::Field("event_type"))? {
        "new_order" => EventType::Created,
        "order_status_change" => EventType::Updated,
        _ => EventType::Unknown,
    };
    let object_id = get("order_id")
        .ok_or(NormalizeError::Field("order_id"))?
        .to_owned();
    let date = get("date")
        .and_then(ion_date)
        .or_else(|| received_at_ms.map(shared::time_fmt::unix_ms_to_rfc3339))
        .unwrap_or_default();
    let event_key = match msg_id {
        Some(id) => id.to_owned(),
        None => format!("ion:{store_id}:{}", &hex(&Sha256::digest(body))[..32]),
    };
    Ok(Normalized {
        store_id,
        event_key,
        event: Event {
            event_type,
            object_type: "orders".to_owned(),
            object_id,
            element_key: ELEMENT_KEY.to_owned(),
            date,
        },
    })
}

/// `2026-11-22 10:15:00` → `2026-11-22T10:15:00Z`.
fn ion_date(s: &str) -> Option<String> {
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    let t = time::PrimitiveDateTime::parse(s, &format)
        .ok()?
        .assume_utc();
    shared::time_fmt::unix_secs_to_rfc3339(t.unix_timestamp())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The notification id of (Ecwid event, instance): deterministic, so a redelivered raw message
/// gets the same id and JetStream drops the second envelope. Shaped as a UUID.
pub fn notification_id(event_key: &str, instance_id: &str) -> String {
    let mut h = Sha256::new();
    h.update(event_key.as_bytes());
    h.update([0]);
    h.update(instance_id.as_bytes());
    let x = hex(&h.finalize()[..16]);
    format!(
        "{}-{}-{}-{}-{}",
        &x[..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

/// The envelope for one instance. `raw` is the payload exactly as received.
pub fn envelope(normalized: &Normalized, instance_id: &str, raw: &RawValue) -> Envelope {
    Envelope {
        message: Message {
            event_id: notification_id(&normalized.event_key, instance_id),
            instance_id: instance_id.to_owned(),
            element_key: ELEMENT_KEY.to_owned(),
            events: vec![normalized.event.clone()],
            raw: raw.to_owned(),
        },
    }
}

/// Parses the body as a JSON value without changing a byte of it.
pub fn raw_value(body: &[u8]) -> Result<&RawValue, NormalizeError> {
    let s = std::str::from_utf8(body).map_err(|e| NormalizeError::NotJson(e.to_string()))?;
    serde_json::from_str::<&RawValue>(s).map_err(|e| NormalizeError::NotJson(e.to_string()))
}
