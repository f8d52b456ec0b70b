//! Ecwid's inbound formats, parsed in one place: REST v3 webhooks (JSON), legacy Instant Order
//! Notifications (forms), and `poll` (an entity the poller read from the REST API, with the REST
//! API's own response shapes: pages, deleted items, `latest-stats`). Pure functions.
//!
//! The ingest accepts a body only when this module parses it, and the normalizer parses what the
//! ingest stored with the same functions, so "whatever the ingest accepts, the normalizer can
//! normalize" holds by construction. Every value that later reaches a NATS subject or header
//! (store id, event id) is checked here. The dedupe ids (`Nats-Msg-Id`) are built here too.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Which of Ecwid's formats a stored raw message is in (the `Ecwid-Format` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// REST v3 webhook, JSON.
    V3,
    /// Legacy Instant Order Notification, stored as a JSON object of its form fields.
    Ion,
    /// An entity the poller read from the REST API ([`PollEvent`]).
    Poll,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::V3 => "v3",
            Format::Ion => "ion",
            Format::Poll => "poll",
        }
    }

    /// The format named by an `Ecwid-Format` header value (`v3` when the header is absent).
    pub fn from_header(value: Option<&str>) -> Result<Self, ParseError> {
        match value.unwrap_or("v3") {
            "v3" => Ok(Format::V3),
            "ion" => Ok(Format::Ion),
            "poll" => Ok(Format::Poll),
            other => Err(ParseError::Format(other.chars().take(32).collect())),
        }
    }

    /// The format of a request body from its content type. Without one, a body starting with `{`
    /// is JSON and anything else a form (what curl sends by default). `Err` carries the refused
    /// content type.
    pub fn of_request(content_type: Option<&str>, body: &[u8]) -> Result<Self, String> {
        let Some(ct) = content_type else {
            let first = body.iter().find(|b| !b.is_ascii_whitespace());
            return Ok(if first == Some(&b'{') {
                Format::V3
            } else {
                Format::Ion
            });
        };
        let essence = ct.split(';').next().unwrap_or("").trim();
        let essence = essence.to_ascii_lowercase();
        match essence.as_str() {
            "application/json" | "text/json" => Ok(Format::V3),
            e if e.starts_with("application/") && e.ends_with("+json") => Ok(Format::V3),
            "application/x-www-form-urlencoded" => Ok(Format::Ion),
            _ => Err(ct.to_owned()),
        }
    }
}

/// Why a body is not an Ecwid event. Every variant is a client error: no retry can fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("the body is not valid JSON: {0}")]
    Json(String),
    #[error("the body must be a JSON object")]
    NotObject,
    #[error("the body is not a URL-encoded form: {0}")]
    Form(String),
    #[error("`{field}` {problem}")]
    Field {
        field: &'static str,
        problem: &'static str,
    },
    #[error("unknown format `{0}`")]
    Format(String),
}

impl ParseError {
    fn field(field: &'static str, problem: &'static str) -> Self {
        ParseError::Field { field, problem }
    }

    /// The machine code of the refusal (`invalid_json`, `invalid_form`, `invalid_field`).
    pub fn code(&self) -> &'static str {
        match self {
            ParseError::Json(_) | ParseError::NotObject => "invalid_json",
            ParseError::Form(_) => "invalid_form",
            ParseError::Field { .. } | ParseError::Format(_) => "invalid_field",
        }
    }
}

const REQUIRED: &str = "is required";
const TWICE: &str = "appears more than once";
const NOT_TEXT: &str =
    "must be a non-empty string of at most 200 characters without control characters";
const NOT_STORE: &str = "must be the numeric store id";
const NOT_TIME: &str = "must be a Unix time in seconds (up to year 9999)";

/// 9999-12-31T23:59:59Z, the last second an envelope's `date` can show.
pub const MAX_EVENT_CREATED: i64 = 253_402_300_799;

/// A store id: 1 to 20 digits. It becomes a subject token (`ecwid.raw.<storeId>`).
pub fn is_store_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit())
}

/// Text that may travel in a NATS header: non-empty, bounded, no control characters (a CR or LF
/// would end the header; async-nats refuses it).
fn is_header_text(s: &str) -> bool {
    !s.trim().is_empty() && s.len() <= 200 && !s.chars().any(char::is_control)
}

/// A v3 webhook, parsed. Borrows the body.
#[derive(Debug, Clone)]
pub struct V3Event<'a> {
    pub event_id: String,
    pub event_created: i64,
    pub store_id: String,
    /// Ecwid's `eventType` (`order.created`).
    pub event_type: String,
    /// `entityId` as the REST API writes ids: numbers in decimal, strings as they are.
    pub entity_id: Option<String>,
    data: Option<&'a RawValue>,
    /// The whole body, byte for byte (less surrounding white space); valid JSON.
    text: &'a str,
}

/// Ecwid's event id in a raw message id made by [`V3Event::msg_id`] (`v3:<storeId>:<eventId>`);
/// none for another format's id.
pub fn event_id_of_msg_id(msg_id: &str) -> Option<&str> {
    let rest = msg_id.strip_prefix("v3:")?;
    rest.split_once(':').map(|(_, event_id)| event_id)
}

impl<'a> V3Event<'a> {
    /// The whole body as a raw JSON value, byte for byte (less surrounding white space). Read
    /// again here rather than in [`parse_v3`], so the ingest, which never needs it, scans each
    /// body once.
    pub fn raw(&self) -> Result<&'a RawValue, ParseError> {
        serde_json::from_str(self.text).map_err(|e| ParseError::Json(e.to_string()))
    }

    /// `v3:<storeId>:<eventId>`: the store and Ecwid's own event id, so Ecwid's retries of one
    /// event are one message.
    pub fn msg_id(&self) -> String {
        format!("v3:{}:{}", self.store_id, self.event_id)
    }

    /// `data.orderId` rendered as an id, when `data` is an object that has a usable one.
    pub fn data_order_id(&self) -> Option<String> {
        #[derive(Deserialize)]
        struct OrderData<'a> {
            #[serde(rename = "orderId", default, borrow)]
            order_id: Option<&'a RawValue>,
        }
        self.data
            .filter(|d| d.get().starts_with('{'))
            .and_then(|d| serde_json::from_str::<OrderData<'_>>(d.get()).ok())
            .and_then(|d| d.order_id)
            .and_then(raw_id_string)
            .filter(|s| !s.is_empty())
    }
}

/// An id as the payload's own text: a JSON string as it is, an integer digit for digit (parsed
/// into a number first, `10^40` would come out as `1e+40`), any other number as [`id_string`]
/// renders it.
pub fn raw_id_string(raw: &RawValue) -> Option<String> {
    let text = raw.get().trim();
    let digits = text.strip_prefix('-').unwrap_or(text);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        return Some(text.to_owned());
    }
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| id_string(&v))
}

/// An id rendered as the string a REST API would use: numbers in decimal, strings as they are.
pub fn id_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The members of a JSON object in order, values unparsed. Keys may be escaped (owned) or not.
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::new();
                while let Some((k, v)) = map.next_entry::<Key<'de>, &'de RawValue>()? {
                    members.push((k.0, v));
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(MembersVisitor)
    }
}

/// Parses the body as one JSON object, in one pass: its members (unparsed, but checked to be
/// valid JSON) and the whole body's text less surrounding white space.
fn object(body: &[u8]) -> Result<(Members<'_>, &str), ParseError> {
    // Checked first: a member skipped as raw could otherwise hide invalid UTF-8.
    let text = std::str::from_utf8(body)
        .map_err(|e| ParseError::Json(format!("the body is not valid UTF-8: {e}")))?;
    if !text.trim_start().starts_with('{') {
        return Err(ParseError::NotObject);
    }
    // `from_str` refuses anything but white space after the object.
    let members: Members<'_> =
        serde_json::from_str(text).map_err(|e| ParseError::Json(e.to_string()))?;
    Ok((
        members,
        text.trim_matches(|c| matches!(c, ' ' | '\t' | '\n' | '\r')),
    ))
}

/// Fills `slot` with `value`, refusing a second occurrence of `field`.
fn once<'a>(
    slot: &mut Option<&'a RawValue>,
    field: &'static str,
    value: &'a RawValue,
) -> Result<(), ParseError> {
    match slot.replace(value) {
        None => Ok(()),
        Some(_) => Err(ParseError::field(field, TWICE)),
    }
}

/// Parses a v3 webhook: `{eventId, eventCreated, storeId, entityId, eventType, data?}`. A missing,
/// repeated or mistyped field is an error naming it; `entityId` and `data` are free-form.
pub fn parse_v3(body: &[u8]) -> Result<V3Event<'_>, ParseError> {
    let (members, body_text) = object(body)?;
    let mut slots: [Option<&RawValue>; 6] = [None; 6];
    const NAMES: [&str; 6] = [
        "eventId",
        "eventCreated",
        "storeId",
        "eventType",
        "entityId",
        "data",
    ];
    for (key, value) in members.0 {
        if let Some(i) = NAMES.iter().position(|n| *n == key) {
            once(&mut slots[i], NAMES[i], value)?;
        }
    }
    let [event_id, event_created, store_id, event_type, entity_id, data] = slots;
    // A member that is missing or null is required; one that does not parse (a number out of
    // range) is as wrong as one of the wrong type.
    let value = |raw: Option<&RawValue>, field: &'static str, problem: &'static str| match raw
        .map(|r| serde_json::from_str::<Value>(r.get()))
    {
        None | Some(Ok(Value::Null)) => Err(ParseError::field(field, REQUIRED)),
        Some(Ok(v)) => Ok(v),
        Some(Err(_)) => Err(ParseError::field(field, problem)),
    };
    let text = |raw: Option<&RawValue>, field: &'static str| match value(raw, field, NOT_TEXT)? {
        Value::String(s) if is_header_text(&s) => Ok(s),
        _ => Err(ParseError::field(field, NOT_TEXT)),
    };
    let event_id = text(event_id, "eventId")?;
    let event_created = match value(event_created, "eventCreated", NOT_TIME)? {
        Value::Number(n) => n
            .as_i64()
            .filter(|t| (0..=MAX_EVENT_CREATED).contains(t))
            .ok_or(ParseError::field("eventCreated", NOT_TIME))?,
        _ => return Err(ParseError::field("eventCreated", NOT_TIME)),
    };
    let store_id = match value(store_id, "storeId", NOT_STORE)? {
        Value::Number(n) if n.is_u64() => n.to_string(),
        Value::String(s) if is_store_id(&s) => s,
        _ => return Err(ParseError::field("storeId", NOT_STORE)),
    };
    let event_type = text(event_type, "eventType")?;
    let entity_id = entity_id.and_then(raw_id_string);
    Ok(V3Event {
        event_id,
        event_created,
        store_id,
        event_type,
        entity_id,
        data,
        text: body_text,
    })
}

/// The ION fields the pipeline reads; every one may appear once.
pub const ION_FIELDS: [&str; 8] = [
    "owner_id",
    "event_type",
    "date",
    "order_id",
    "payment_status",
    "fulfillment_status",
    "old_payment_status",
    "old_fulfillment_status",
];

/// A legacy Instant Order Notification. Its canonical form is the JSON object of its fields
/// (values trimmed, names sorted): that is what the ingest stores and what the dedupe id hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ion {
    pub store_id: String,
    /// `new_order`, `order_status_change`, or what Ecwid sends later.
    pub event_type: String,
    pub order_id: String,
    /// `YYYY-MM-DD hh:mm:ss`, no time zone, when present.
    pub date: Option<String>,
    fields: BTreeMap<String, String>,
}

impl Ion {
    /// Checks the fields and builds the notification. Values are trimmed: Ecwid would consider
    /// `owner_id=%207001%20` and `owner_id=7001` the same store.
    fn from_fields(pairs: Vec<(String, String)>) -> Result<Self, ParseError> {
        let mut fields = BTreeMap::new();
        for (name, value) in pairs {
            let value = value.trim().to_owned();
            let known = ION_FIELDS.iter().find(|f| **f == name).copied();
            if let Some(field) = known {
                if value.chars().any(char::is_control) {
                    return Err(ParseError::field(field, "contains a control character"));
                }
                if fields.contains_key(&name) {
                    return Err(ParseError::field(field, TWICE));
                }
            }
            // An unknown name keeps its first value.
            fields.entry(name).or_insert(value);
        }
        let get = |f: &'static str| fields.get(f).filter(|v| !v.is_empty()).cloned();
        let store_id = get("owner_id").ok_or(ParseError::field("owner_id", REQUIRED))?;
        if !is_store_id(&store_id) {
            return Err(ParseError::field("owner_id", NOT_STORE));
        }
        let event_type = get("event_type").ok_or(ParseError::field("event_type", REQUIRED))?;
        let order_id = get("order_id").ok_or(ParseError::field("order_id", REQUIRED))?;
        for (field, v) in [("event_type", &event_type), ("order_id", &order_id)] {
            if !is_header_text(v) {
                return Err(ParseError::field(field, NOT_TEXT));
            }
        }
        Ok(Self {
            store_id,
            event_type,
            order_id,
            date: get("date"),
            fields,
        })
    }

    /// The canonical JSON object the ingest stores and the normalizer reads.
    pub fn to_json(&self) -> Vec<u8> {
        // A map of strings always serializes.
        serde_json::to_vec(&self.fields).unwrap_or_default()
    }

    /// `ion:<storeId>:<hash>`: a hash of the canonical JSON. JSON's string escapes keep every
    /// field apart (a NUL or a separator inside a value cannot make two posts hash alike), and the
    /// trimmed values make what Ecwid considers one notification one id.
    pub fn msg_id(&self) -> String {
        let digest = Sha256::digest(self.to_json());
        let hex = crate::hex::lower(&digest[..16]);
        format!("ion:{}:{hex}", self.store_id)
    }
}

/// Parses an ION form body (`owner_id=…&event_type=…`).
pub fn parse_ion_form(body: &[u8]) -> Result<Ion, ParseError> {
    if body
        .iter()
        .any(|b| b.is_ascii_control() && !b.is_ascii_whitespace())
    {
        return Err(ParseError::Form("it contains control characters".into()));
    }
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_bytes(body).map_err(|e| ParseError::Form(e.to_string()))?;
    Ion::from_fields(pairs)
}

/// Parses an ION as the ingest stored it: the JSON object of its fields (all strings).
pub fn parse_ion_json(body: &[u8]) -> Result<Ion, ParseError> {
    let (members, _) = object(body)?;
    let pairs = members
        .0
        .into_iter()
        .map(|(k, v)| match serde_json::from_str::<Value>(v.get()) {
            Ok(Value::String(s)) => Ok((k.into_owned(), s)),
            _ => match ION_FIELDS.iter().find(|f| **f == k) {
                Some(field) => Err(ParseError::field(field, "must be a string")),
                None => Err(ParseError::Json(format!("`{k}` is not a string"))),
            },
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ion::from_fields(pairs)
}

// ---------------------------------------------------------------------------------------------
// Polling: what the poller reads from the REST API and the `poll` raw format it stores.

/// The entity types the poller reads: every one the REST API can list by update time. Categories
/// and the other types without a date filter are not polled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PollEntity {
    Orders,
    Carts,
    Products,
    Customers,
    Coupons,
    Reviews,
}

impl PollEntity {
    pub const ALL: [PollEntity; 6] = [
        PollEntity::Orders,
        PollEntity::Carts,
        PollEntity::Products,
        PollEntity::Customers,
        PollEntity::Coupons,
        PollEntity::Reviews,
    ];

    /// The REST path segment (`/{storeId}/<path>`); also the `entity` of a stored poll body and
    /// the cursor key's last token.
    pub fn path(self) -> &'static str {
        match self {
            PollEntity::Orders => "orders",
            PollEntity::Carts => "carts",
            PollEntity::Products => "products",
            PollEntity::Customers => "customers",
            PollEntity::Coupons => "discount_coupons",
            PollEntity::Reviews => "reviews",
        }
    }

    pub fn from_path(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.path() == s)
    }

    /// The webhook event family of the same entity (`order` of `order.updated`): the normalizer
    /// maps it to the `objectType` with its one table, so both sources agree.
    pub fn family(self) -> &'static str {
        match self {
            PollEntity::Orders => "order",
            PollEntity::Carts => "unfinished_order",
            PollEntity::Products => "product",
            PollEntity::Customers => "customer",
            PollEntity::Coupons => "discount_coupon",
            PollEntity::Reviews => "review",
        }
    }

    /// Whether the REST API lists this type's deletions (`/{storeId}/<path>/deleted`).
    pub fn has_deleted(self) -> bool {
        matches!(
            self,
            PollEntity::Orders | PollEntity::Products | PollEntity::Customers | PollEntity::Coupons
        )
    }

    /// The `latest-stats` field holding this type's last update time.
    pub fn stats_field(self) -> &'static str {
        match self {
            PollEntity::Orders => "ordersUpdated",
            PollEntity::Carts => "abandonedSalesUpdated",
            PollEntity::Products => "productsUpdated",
            PollEntity::Customers => "customersUpdated",
            PollEntity::Coupons => "discountCouponsUpdated",
            PollEntity::Reviews => "reviewsUpdated",
        }
    }

    /// The member of an item that is its id, as webhooks name the entity: an order's `id` (the
    /// `data.orderId` of an order webhook), a cart's `cartId`, everything else's `id`.
    fn id_fields(self) -> &'static [&'static str] {
        match self {
            PollEntity::Carts => &["cartId", "id"],
            _ => &["id"],
        }
    }
}

/// Members that hold an item's creation time, first match wins (orders, carts and reviews:
/// `createTimestamp`/`createDate`; products `created`; coupons `creationDate`; customers
/// `registered`).
const CREATED_FIELDS: [&str; 6] = [
    "createTimestamp",
    "createDate",
    "created",
    "creationDate",
    "registered",
    "registrationDate",
];
/// Members that hold an item's last update time, first match wins.
const UPDATED_FIELDS: [&str; 4] = ["updateTimestamp", "updateDate", "updated", "updatedDate"];

/// A time as the REST API writes it: Unix seconds, `2024-05-01 10:15:00 +0000`,
/// `2024-05-01T10:15:00+0000` (latest-stats), or RFC 3339. `None` for anything else.
pub fn ecwid_time(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().filter(|t| (0..=MAX_EVENT_CREATED).contains(t)),
        Value::String(s) => parse_ecwid_time(s),
        _ => None,
    }
}

fn parse_ecwid_time(s: &str) -> Option<i64> {
    use time::format_description::well_known::Rfc3339;
    use time::macros::format_description;
    let s = s.trim();
    if let Ok(t) = time::OffsetDateTime::parse(s, &Rfc3339) {
        return Some(t.unix_timestamp());
    }
    let with_offset = [
        format_description!(
            "[year]-[month]-[day] [hour]:[minute]:[second] [offset_hour sign:mandatory][offset_minute]"
        ),
        format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second][offset_hour sign:mandatory][offset_minute]"
        ),
    ];
    for f in with_offset {
        if let Ok(t) = time::OffsetDateTime::parse(s, &f) {
            return Some(t.unix_timestamp());
        }
    }
    let bare = format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    time::PrimitiveDateTime::parse(s, &bare)
        .ok()
        .map(|t| t.assume_utc().unix_timestamp())
}

/// The first of `fields` that `item` has as a usable time.
fn first_time(item: &serde_json::Map<String, Value>, fields: &[&str]) -> Option<i64> {
    fields
        .iter()
        .find_map(|f| item.get(*f).and_then(ecwid_time))
}

/// What a poll event says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollAction {
    /// The item's creation and update times are equal: nothing changed since it was created.
    Created,
    Updated,
    /// From a `/deleted` endpoint.
    Deleted,
}

/// A poll event, parsed: one entity of one store, as the REST API returned it.
#[derive(Debug, Clone)]
pub struct PollEvent<'a> {
    pub entity: PollEntity,
    pub store_id: String,
    pub action: PollAction,
    /// The id webhooks use for the same entity ([`PollEntity::id_fields`]).
    pub object_id: String,
    /// The update time (the deletion's `date` for a deletion), Unix seconds.
    pub changed_at: i64,
    /// The entity exactly as the REST API returned it (a deleted item's `{"id","date"}`).
    pub item: &'a RawValue,
}

impl PollEvent<'_> {
    /// `poll:<storeId>:<entity>:<objectId>:<updated>` (`…:deleted:<date>` for a deletion): one
    /// message per version of an entity, so overlapping windows, a backfill of a polled window
    /// and a second replica's read store it once.
    pub fn msg_id(&self) -> String {
        let kind = match self.action {
            PollAction::Deleted => "deleted:",
            _ => "",
        };
        format!(
            "poll:{}:{}:{}:{kind}{}",
            self.store_id,
            self.entity.path(),
            self.object_id,
            self.changed_at
        )
    }
}

/// Builds the stored body of a changed entity (`item`, one element of a page's `items`):
/// `{"entity":"orders","storeId":"1003","action":"changed","item":{…}}`. Checked with
/// [`parse_poll`], so what the poller stores the normalizer can read.
pub fn poll_body(
    entity: PollEntity,
    store_id: &str,
    deleted: bool,
    item: &RawValue,
) -> Result<Vec<u8>, ParseError> {
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Body<'a> {
        entity: &'a str,
        store_id: &'a str,
        action: &'a str,
        item: &'a RawValue,
    }
    let body = serde_json::to_vec(&Body {
        entity: entity.path(),
        store_id,
        action: if deleted { "deleted" } else { "changed" },
        item,
    })
    .map_err(|e| ParseError::Json(e.to_string()))?;
    parse_poll(&body)?;
    Ok(body)
}

/// Parses a stored poll body (see [`poll_body`]). Every member appears once; `item` must be an
/// object with an id and, for a change, an update time (or a creation time); a deletion needs
/// `id` and `date`.
pub fn parse_poll(body: &[u8]) -> Result<PollEvent<'_>, ParseError> {
    let (members, _) = object(body)?;
    const NAMES: [&str; 4] = ["entity", "storeId", "action", "item"];
    let mut slots: [Option<&RawValue>; 4] = [None; 4];
    for (key, value) in members.0 {
        if let Some(i) = NAMES.iter().position(|n| *n == key) {
            once(&mut slots[i], NAMES[i], value)?;
        }
    }
    let [entity, store_id, action, item] = slots;
    let string = |raw: Option<&RawValue>, field: &'static str| -> Result<String, ParseError> {
        match raw.map(|r| serde_json::from_str::<Value>(r.get())) {
            Some(Ok(Value::String(s))) => Ok(s),
            None | Some(Ok(Value::Null)) => Err(ParseError::field(field, REQUIRED)),
            _ => Err(ParseError::field(field, "must be a string")),
        }
    };
    let entity = PollEntity::from_path(&string(entity, "entity")?).ok_or(ParseError::field(
        "entity",
        "must be orders, carts, products, customers, discount_coupons or reviews",
    ))?;
    let store_id = string(store_id, "storeId")?;
    if !is_store_id(&store_id) {
        return Err(ParseError::field("storeId", NOT_STORE));
    }
    let deleted = match string(action, "action")?.as_str() {
        "changed" => false,
        "deleted" => true,
        _ => return Err(ParseError::field("action", "must be changed or deleted")),
    };
    let item = item.ok_or(ParseError::field("item", REQUIRED))?;
    let fields = match serde_json::from_str::<Value>(item.get()) {
        Ok(Value::Object(map)) => map,
        _ => return Err(ParseError::field("item", "must be a JSON object")),
    };
    let id_fields = if deleted {
        &["id"][..]
    } else {
        entity.id_fields()
    };
    // Ids from the item's own text: parsed into numbers first, 10^40 would become `1e+40`.
    let raw_fields: std::collections::HashMap<String, &RawValue> =
        serde_json::from_str(item.get()).map_err(|e| ParseError::Json(e.to_string()))?;
    let object_id = id_fields
        .iter()
        .find_map(|f| raw_fields.get(*f).copied().and_then(raw_id_string))
        .filter(|id| is_header_text(id))
        .ok_or(ParseError::field("item.id", NOT_TEXT))?;
    let (action, changed_at) = if deleted {
        let date = fields
            .get("date")
            .and_then(ecwid_time)
            .ok_or(ParseError::field("item.date", NOT_TIME))?;
        (PollAction::Deleted, date)
    } else {
        let created = first_time(&fields, &CREATED_FIELDS);
        let updated = first_time(&fields, &UPDATED_FIELDS);
        match (created, updated) {
            (Some(c), Some(u)) if c == u => (PollAction::Created, u),
            (_, Some(u)) => (PollAction::Updated, u),
            // Never updated since it was created.
            (Some(c), None) => (PollAction::Created, c),
            (None, None) => return Err(ParseError::field("item.updated", NOT_TIME)),
        }
    };
    Ok(PollEvent {
        entity,
        store_id,
        action,
        object_id,
        changed_at,
        item,
    })
}

/// One page of a REST search (`{"total","count","offset","limit","items":[…]}`), or a deleted
/// list (`{"items":[{"id","date"}]}`, where `total` and `count` may be absent).
#[derive(Debug, Deserialize)]
pub struct Page {
    #[serde(default)]
    pub total: Option<u64>,
    #[serde(default)]
    pub count: Option<u64>,
    pub items: Vec<Box<RawValue>>,
}

/// Parses a page; an answer without an `items` array is an error.
pub fn parse_page(body: &[u8]) -> Result<Page, ParseError> {
    serde_json::from_slice(body).map_err(|e| ParseError::Json(e.to_string()))
}

/// Parses `GET /{storeId}/latest-stats`: the last update time of every type it reports.
pub fn parse_latest_stats(body: &[u8]) -> Result<BTreeMap<PollEntity, i64>, ParseError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ParseError::Json(e.to_string()))?;
    let map = value.as_object().ok_or(ParseError::NotObject)?;
    Ok(PollEntity::ALL
        .into_iter()
        .filter_map(|e| {
            map.get(e.stats_field())
                .and_then(ecwid_time)
                .map(|t| (e, t))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_come_back_out_of_v3_message_ids_only() {
        for (msg_id, event_id) in [
            (
                "v3:1003:80aece08-40e8-4145-8764-6c2f0d38678",
                Some("80aece08-40e8-4145-8764-6c2f0d38678"),
            ),
            ("v3:1003:a:b", Some("a:b")),
            ("ion:1003:0f3c", None),
            ("v3:1003", None),
            ("poll:1003:orders:1:2", None),
        ] {
            assert_eq!(event_id_of_msg_id(msg_id), event_id, "{msg_id}");
        }
    }

    #[test]
    fn polled_integer_ids_stay_exact_as_text() {
        let item: Box<RawValue> = serde_json::from_str(
            r#"{"id":10000000000000000000000000000000000000000,"updateTimestamp":1764000000,"createTimestamp":1764000000}"#,
        )
        .unwrap();
        let body = poll_body(PollEntity::Products, "1003", false, &item).unwrap();
        let event = parse_poll(&body).unwrap();
        assert_eq!(event.object_id, "10000000000000000000000000000000000000000");
        assert!(event
            .msg_id()
            .contains(":10000000000000000000000000000000000000000:"));
    }

    #[test]
    fn parses_the_documented_webhook() {
        let body = br#"{"eventId":"80aece08-40e8-4145-8764-6c2f0d38678","eventCreated":1234567,"storeId":1003,"entityId":22222,"eventType":"order.created","data":{"orderId":"XJ12H","newPaymentStatus":"PAID"}}"#;
        let e = parse_v3(body).unwrap();
        assert_eq!(e.store_id, "1003");
        assert_eq!(e.event_created, 1234567);
        assert_eq!(e.entity_id.as_deref(), Some("22222"));
        assert_eq!(e.data_order_id().as_deref(), Some("XJ12H"));
        assert_eq!(e.msg_id(), "v3:1003:80aece08-40e8-4145-8764-6c2f0d38678");
        assert_eq!(e.raw().unwrap().get().as_bytes(), body);
    }

    #[test]
    fn integer_ids_stay_exact_as_text() {
        let raw = |t: &str| RawValue::from_string(t.to_owned()).unwrap();
        let huge = format!("1{}", "0".repeat(40));
        assert_eq!(raw_id_string(&raw(&huge)), Some(huge.clone()));
        assert_eq!(raw_id_string(&raw("-42")), Some("-42".into()));
        assert_eq!(raw_id_string(&raw("\"XJ12\"")), Some("XJ12".into()));
        assert_eq!(raw_id_string(&raw("1.5")), Some("1.5".into()));
        assert_eq!(raw_id_string(&raw("null")), None);
    }

    #[test]
    fn data_and_entity_id_are_optional_and_free_form() {
        let e = parse_v3(br#"{"eventId":"x","eventCreated":1,"storeId":"1003","entityId":"app-name","eventType":"application.installed"}"#).unwrap();
        assert_eq!(e.entity_id.as_deref(), Some("app-name"));
        assert_eq!(e.data_order_id(), None);
    }

    #[test]
    fn names_the_bad_field() {
        let cases: &[(&[u8], &str)] = &[
            (br#"{"eventCreated":1,"storeId":1,"eventType":"a"}"#, "eventId"),
            (br#"{"eventId":5,"eventCreated":1,"storeId":1,"eventType":"a"}"#, "eventId"),
            (br#"{"eventId":"a\r\nb","eventCreated":1,"storeId":1,"eventType":"a"}"#, "eventId"),
            (br#"{"eventId":"a\u0000","eventCreated":1,"storeId":1,"eventType":"a"}"#, "eventId"),
            (br#"{"eventId":"x","storeId":1,"eventType":"a"}"#, "eventCreated"),
            (br#"{"eventId":"x","eventCreated":"yesterday","storeId":1,"eventType":"a"}"#, "eventCreated"),
            (br#"{"eventId":"x","eventCreated":1e400,"storeId":1,"eventType":"a"}"#, "eventCreated"),
            (br#"{"eventId":"x","eventCreated":253402300800,"storeId":1,"eventType":"a"}"#, "eventCreated"),
            (br#"{"eventId":"x","eventCreated":1,"eventType":"a"}"#, "storeId"),
            (br#"{"eventId":"x","eventCreated":1,"storeId":-4,"eventType":"a"}"#, "storeId"),
            (br#"{"eventId":"x","eventCreated":1,"storeId":"1.2","eventType":"a"}"#, "storeId"),
            (br#"{"eventId":"x","eventCreated":1,"storeId":1}"#, "eventType"),
            (br#"{"eventId":"x","eventCreated":1,"storeId":1,"eventType":["a"]}"#, "eventType"),
            // Repeated members: JSON parsers disagree on which one wins, so none is chosen.
            (br#"{"eventId":"x","eventCreated":1,"storeId":1,"storeId":2,"eventType":"a"}"#, "storeId"),
            (br#"{"eventId":"x","eventCreated":1,"storeId":1,"eventType":"a","entityId":1,"entityId":2}"#, "entityId"),
            (br#"{"eventId":"x","eventCreated":1,"storeId":1,"eventType":"a","data":{},"data":{}}"#, "data"),
            (br#"{"eventId":"x","event\u0049d":"y","eventCreated":1,"storeId":1,"eventType":"a"}"#, "eventId"),
        ];
        for (body, field) in cases {
            let err = parse_v3(body).unwrap_err();
            assert_eq!(
                err.code(),
                "invalid_field",
                "{}",
                String::from_utf8_lossy(body)
            );
            assert!(
                matches!(&err, ParseError::Field { field: f, .. } if f == field),
                "{err} should name {field}"
            );
        }
    }

    #[test]
    fn malformed_json_is_refused() {
        for body in [&b"{"[..], b"[1,2]", b"null", b"\"s\"", b"", b"{\"a\":\xff}"] {
            let err = parse_v3(body).unwrap_err();
            assert_eq!(err.code(), "invalid_json", "{body:?}");
        }
    }

    #[test]
    fn parses_an_ion_form_into_its_canonical_json() {
        let body = b"owner_id=1003&event_type=order_status_change&date=2026-11-22+10%3A15%3A00&order_id=42&payment_status=PAID&fulfillment_status=SHIPPED&old_payment_status=AWAITING_PAYMENT&old_fulfillment_status=PROCESSING";
        let ion = parse_ion_form(body).unwrap();
        assert_eq!(ion.store_id, "1003");
        assert_eq!(ion.order_id, "42");
        assert_eq!(ion.date.as_deref(), Some("2026-11-22 10:15:00"));
        let stored = ion.to_json();
        let json: Value = serde_json::from_slice(&stored).unwrap();
        assert_eq!(json["date"], "2026-11-22 10:15:00");
        // What the normalizer reads back is the same notification with the same id.
        assert_eq!(parse_ion_json(&stored).unwrap(), ion);
        assert_eq!(parse_ion_json(&stored).unwrap().msg_id(), ion.msg_id());
        let other = parse_ion_form(&[&body[..], b"x"].concat()).unwrap();
        assert_ne!(ion.msg_id(), other.msg_id());
    }

    #[test]
    fn ion_ids_are_unambiguous_and_ignore_what_ecwid_ignores() {
        let id = |b: &[u8]| parse_ion_form(b).unwrap().msg_id();
        // White space around a value is the same notification.
        assert_eq!(
            id(b"owner_id=%207001%20&event_type=new_order&order_id=5"),
            id(b"owner_id=7001&event_type=new_order&order_id=5")
        );
        // A separator inside an unknown field cannot make one post hash like another.
        assert_ne!(
            id(b"owner_id=7001&event_type=new_order&order_id=5&a=b%00c%00d"),
            id(b"owner_id=7001&event_type=new_order&order_id=5&a=b&c=d")
        );
        // Control characters in a known field are refused, naming it.
        let err = parse_ion_form(b"owner_id=7001&event_type=new_order&order_id=5%00").unwrap_err();
        assert!(
            matches!(
                err,
                ParseError::Field {
                    field: "order_id",
                    ..
                }
            ),
            "{err}"
        );
        let err = parse_ion_form(b"owner_id=7001&owner_id=7002&event_type=new_order&order_id=5")
            .unwrap_err();
        assert!(
            matches!(
                err,
                ParseError::Field {
                    field: "owner_id",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn ion_requires_its_fields() {
        for (body, field) in [
            (&b"event_type=new_order&order_id=1"[..], "owner_id"),
            (b"owner_id=abc&event_type=new_order&order_id=1", "owner_id"),
            (b"owner_id=1&order_id=1", "event_type"),
            (b"owner_id=1&event_type=new_order", "order_id"),
            (b"owner_id=1&event_type=new_order&order_id=++", "order_id"),
        ] {
            let err = parse_ion_form(body).unwrap_err();
            assert!(
                matches!(&err, ParseError::Field { field: f, .. } if *f == field),
                "{err}"
            );
        }
        assert!(matches!(
            parse_ion_json(br#"{"owner_id":1003,"event_type":"new_order","order_id":"42"}"#),
            Err(ParseError::Field {
                field: "owner_id",
                ..
            })
        ));
        assert_eq!(
            parse_ion_json(b"owner_id=1003&event_type=new_order&order_id=42")
                .unwrap_err()
                .code(),
            "invalid_json"
        );
    }

    #[test]
    fn detects_formats() {
        assert_eq!(
            Format::of_request(Some("application/json; charset=utf-8"), b"{}"),
            Ok(Format::V3)
        );
        assert_eq!(
            Format::of_request(Some("application/x-www-form-urlencoded"), b"a=b"),
            Ok(Format::Ion)
        );
        assert_eq!(Format::of_request(None, b"  {\"a\":1}"), Ok(Format::V3));
        assert_eq!(Format::of_request(None, b"owner_id=1"), Ok(Format::Ion));
        assert!(Format::of_request(Some("text/plain"), b"{}").is_err());
        assert_eq!(Format::from_header(None), Ok(Format::V3));
        assert_eq!(Format::from_header(Some("ion")), Ok(Format::Ion));
        assert!(Format::from_header(Some("xml")).is_err());
    }

    fn poll(
        entity: PollEntity,
        deleted: bool,
        item: &str,
    ) -> Result<PollEvent<'static>, ParseError> {
        let raw: Box<RawValue> = serde_json::from_str(item).unwrap();
        let body = poll_body(entity, "1003", deleted, &raw)?;
        let body: &'static [u8] = Box::leak(body.into_boxed_slice());
        parse_poll(body)
    }

    #[test]
    fn poll_items_become_created_updated_or_deleted() {
        use PollAction::*;
        use PollEntity::*;
        let cases: &[(PollEntity, bool, &str, PollAction, &str, i64)] = &[
            // An order as /orders returns it: id is what order webhooks call data.orderId.
            (
                Orders,
                false,
                r#"{"id":"XJ12H","internalId":22222,"createDate":"2024-05-01 10:15:00 +0000","updateDate":"2024-05-01 10:15:00 +0000","createTimestamp":1714558500,"updateTimestamp":1714558500}"#,
                Created,
                "XJ12H",
                1714558500,
            ),
            (
                Orders,
                false,
                r#"{"id":"XJ12H","createTimestamp":1714558500,"updateTimestamp":1714558600}"#,
                Updated,
                "XJ12H",
                1714558600,
            ),
            (
                Orders,
                false,
                r#"{"id":42,"createDate":"2024-05-01 10:15:00 +0000","updateDate":"2024-05-01 10:16:40 +0000"}"#,
                Updated,
                "42",
                1714558600,
            ),
            (
                Carts,
                false,
                r#"{"cartId":"6626E60A-A6F9-4CD5-8230-43D5F162E0CD","createDate":"2024-05-01 10:15:00 +0000","updateDate":"2024-05-01 10:15:00 +0000"}"#,
                Created,
                "6626E60A-A6F9-4CD5-8230-43D5F162E0CD",
                1714558500,
            ),
            (
                Products,
                false,
                r#"{"id":66722487,"created":"2024-05-01 10:15:00 +0000","updated":"2024-05-01T10:16:40+00:00"}"#,
                Updated,
                "66722487",
                1714558600,
            ),
            (
                Customers,
                false,
                r#"{"id":177737165,"registered":"2024-05-01 10:15:00 +0000","updated":"2024-05-01 10:15:00 +0000"}"#,
                Created,
                "177737165",
                1714558500,
            ),
            (
                Coupons,
                false,
                r#"{"id":152301,"code":"SALE","creationDate":"2024-05-01 10:15:00 +0000","updateDate":"2024-05-01 10:17:00 +0000"}"#,
                Updated,
                "152301",
                1714558620,
            ),
            (
                Reviews,
                false,
                r#"{"id":3011,"createTimestamp":1714558500}"#,
                Created,
                "3011",
                1714558500,
            ),
            (
                Orders,
                true,
                r#"{"id":"XJ12H","date":"2024-05-01 10:20:00 +0000"}"#,
                Deleted,
                "XJ12H",
                1714558800,
            ),
            (
                Products,
                true,
                r#"{"id":66722487,"date":1714558800}"#,
                Deleted,
                "66722487",
                1714558800,
            ),
        ];
        for (entity, deleted, item, action, id, at) in cases {
            let e = poll(*entity, *deleted, item).unwrap_or_else(|err| panic!("{item}: {err}"));
            assert_eq!(
                (e.action, e.object_id.as_str(), e.changed_at),
                (*action, *id, *at),
                "{item}"
            );
            assert_eq!(e.store_id, "1003");
            assert_eq!(e.item.get(), *item, "the item is kept byte for byte");
        }
    }

    #[test]
    fn poll_ids_name_the_version_of_an_entity() {
        let a = poll(
            PollEntity::Orders,
            false,
            r#"{"id":"X","updateTimestamp":5}"#,
        )
        .unwrap();
        let b = poll(
            PollEntity::Orders,
            false,
            r#"{"id":"X","updateTimestamp":5,"total":9}"#,
        )
        .unwrap();
        let c = poll(
            PollEntity::Orders,
            false,
            r#"{"id":"X","updateTimestamp":6}"#,
        )
        .unwrap();
        let d = poll(PollEntity::Orders, true, r#"{"id":"X","date":6}"#).unwrap();
        assert_eq!(a.msg_id(), "poll:1003:orders:X:5");
        assert_eq!(a.msg_id(), b.msg_id());
        assert_ne!(a.msg_id(), c.msg_id());
        assert_eq!(d.msg_id(), "poll:1003:orders:X:deleted:6");
    }

    #[test]
    fn poll_bodies_are_checked_naming_the_field() {
        for (item, deleted, field) in [
            (r#"{"updateTimestamp":5}"#, false, "item.id"),
            (r#"{"id":"a\nb","updateTimestamp":5}"#, false, "item.id"),
            (r#"{"id":"X"}"#, false, "item.updated"),
            (
                r#"{"id":"X","updateDate":"yesterday"}"#,
                false,
                "item.updated",
            ),
            (r#"{"id":"X"}"#, true, "item.date"),
            (r#"[1]"#, false, "item"),
        ] {
            let err = poll(PollEntity::Orders, deleted, item).unwrap_err();
            assert!(
                matches!(&err, ParseError::Field { field: f, .. } if *f == field),
                "{item}: {err}"
            );
        }
        for (body, field) in [
            (&br#"{"entity":"categories","storeId":"1","action":"changed","item":{"id":1,"updated":1}}"#[..], "entity"),
            (br#"{"entity":"orders","storeId":"x","action":"changed","item":{"id":1,"updated":1}}"#, "storeId"),
            (br#"{"entity":"orders","storeId":"1","action":"gone","item":{"id":1,"updated":1}}"#, "action"),
            (br#"{"entity":"orders","storeId":"1","storeId":"2","action":"changed","item":{"id":1,"updated":1}}"#, "storeId"),
            (br#"{"entity":"orders","storeId":"1","action":"changed"}"#, "item"),
        ] {
            let err = parse_poll(body).unwrap_err();
            assert!(matches!(&err, ParseError::Field { field: f, .. } if *f == field), "{err}");
        }
        assert_eq!(Format::from_header(Some("poll")), Ok(Format::Poll));
    }

    #[test]
    fn rest_answers_parse() {
        let page = parse_page(
            br#"{"total":250,"count":100,"offset":0,"limit":100,"items":[{"id":1},{"id":2}]}"#,
        )
        .unwrap();
        assert_eq!(
            (page.total, page.count, page.items.len()),
            (Some(250), Some(100), 2)
        );
        assert!(parse_page(br#"{"total":1}"#).is_err());
        let stats = parse_latest_stats(br#"{"productsUpdated":"2024-05-01T10:15:00+0000","ordersUpdated":"2024-05-01T10:16:40+0000","productCount":4}"#).unwrap();
        assert_eq!(stats.get(&PollEntity::Products), Some(&1714558500));
        assert_eq!(stats.get(&PollEntity::Orders), Some(&1714558600));
        assert_eq!(stats.get(&PollEntity::Reviews), None);
    }
}
