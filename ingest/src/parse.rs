//! What the ingest reads of a body: enough to route, verify and dedupe it. Pure functions.
//!
//! Ecwid REST v3 webhooks are JSON: `{eventId, eventCreated, storeId, entityId, eventType, data?}`.
//! Legacy Instant Order Notifications are forms: `owner_id`, `event_type`, `date`, `order_id`, ….

use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// Which of Ecwid's two formats a body is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    V3,
    Ion,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::V3 => "v3",
            Format::Ion => "ion",
        }
    }
}

/// Picks the format from the content type. Without one, a body starting with `{` is JSON and
/// anything else a form (what curl sends by default).
pub fn detect_format(content_type: Option<&str>, body: &[u8]) -> Result<Format, ApiError> {
    let Some(ct) = content_type else {
        let first = body.iter().find(|b| !b.is_ascii_whitespace());
        return Ok(if first == Some(&b'{') {
            Format::V3
        } else {
            Format::Ion
        });
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "application/json" | "text/json" => Ok(Format::V3),
        e if e.starts_with("application/") && e.ends_with("+json") => Ok(Format::V3),
        "application/x-www-form-urlencoded" => Ok(Format::Ion),
        _ => Err(ApiError::UnsupportedMediaType(format!(
            "content type `{ct}` is not accepted: send application/json (Ecwid webhooks) or \
             application/x-www-form-urlencoded (Instant Order Notifications)"
        ))),
    }
}

/// The routing fields of a v3 webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V3Head {
    pub event_id: String,
    pub event_created: i64,
    pub store_id: String,
    pub event_type: String,
}

#[derive(Deserialize)]
struct RawHead {
    #[serde(rename = "eventId")]
    event_id: Option<Value>,
    #[serde(rename = "eventCreated")]
    event_created: Option<Value>,
    #[serde(rename = "storeId")]
    store_id: Option<Value>,
    #[serde(rename = "eventType")]
    event_type: Option<Value>,
}

fn missing(field: &'static str) -> ApiError {
    ApiError::bad_request("invalid_field", format!("`{field}` is required"))
}

fn wrong(field: &'static str, expected: &str) -> ApiError {
    ApiError::bad_request("invalid_field", format!("`{field}` must be {expected}"))
}

/// Parses a v3 body. Malformed JSON, a non-object, or a missing or wrongly typed routing field is
/// a 400 that names the field. `entityId` and `data` are not looked at here.
pub fn parse_v3(body: &[u8]) -> Result<V3Head, ApiError> {
    // Checked here, not only by the normalizer: a member the ingest skips may hold invalid UTF-8.
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::bad_request("invalid_json", format!("the body is not valid UTF-8: {e}"))
    })?;
    // serde would also fill the fields from a positional array.
    if !text.trim_start().starts_with('{') {
        return Err(ApiError::bad_request(
            "invalid_json",
            "the body must be a JSON object",
        ));
    }
    let head: RawHead = serde_json::from_str(text).map_err(|e| {
        if e.is_data() {
            ApiError::bad_request("invalid_json", "the body must be a JSON object")
        } else {
            ApiError::bad_request("invalid_json", format!("the body is not valid JSON: {e}"))
        }
    })?;
    let event_id = match head.event_id {
        None | Some(Value::Null) => return Err(missing("eventId")),
        Some(Value::String(s)) if !s.trim().is_empty() && s.len() <= 200 => s,
        Some(_) => return Err(wrong("eventId", "a non-empty string")),
    };
    let event_created = match head.event_created {
        None | Some(Value::Null) => return Err(missing("eventCreated")),
        Some(Value::Number(n)) => n
            .as_i64()
            .filter(|t| (0..=MAX_EVENT_CREATED).contains(t))
            .ok_or_else(|| wrong("eventCreated", "a Unix time in seconds"))?,
        Some(_) => return Err(wrong("eventCreated", "a Unix time in seconds (a number)")),
    };
    let store_id = match head.store_id {
        None | Some(Value::Null) => return Err(missing("storeId")),
        Some(Value::Number(n)) if n.is_u64() => n.to_string(),
        Some(Value::String(s)) if is_store_id(&s) => s,
        Some(_) => return Err(wrong("storeId", "the numeric store id")),
    };
    let event_type = match head.event_type {
        None | Some(Value::Null) => return Err(missing("eventType")),
        Some(Value::String(s)) if !s.trim().is_empty() && s.len() <= 200 => s,
        Some(_) => return Err(wrong("eventType", "a non-empty string")),
    };
    Ok(V3Head {
        event_id,
        event_created,
        store_id,
        event_type,
    })
}

/// 9999-12-31T23:59:59Z, the last second an envelope's `date` can show.
const MAX_EVENT_CREATED: i64 = 253_402_300_799;

fn is_store_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit())
}

/// A legacy Instant Order Notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ion {
    pub store_id: String,
    pub event_type: String,
    pub order_id: String,
    /// Every field as posted, in order.
    pub fields: Vec<(String, String)>,
}

/// Parses an ION form body. `owner_id` (digits), `event_type` and `order_id` are required.
pub fn parse_ion(body: &[u8]) -> Result<Ion, ApiError> {
    if body
        .iter()
        .any(|b| b.is_ascii_control() && !b.is_ascii_whitespace())
    {
        return Err(ApiError::bad_request(
            "invalid_form",
            "the body is not a URL-encoded form",
        ));
    }
    let fields: Vec<(String, String)> = serde_urlencoded::from_bytes(body).map_err(|e| {
        ApiError::bad_request(
            "invalid_form",
            format!("the body is not a URL-encoded form: {e}"),
        )
    })?;
    let get = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    let store_id = get("owner_id").ok_or_else(|| missing("owner_id"))?;
    if !is_store_id(&store_id) {
        return Err(wrong("owner_id", "the numeric store id"));
    }
    Ok(Ion {
        store_id,
        event_type: get("event_type").ok_or_else(|| missing("event_type"))?,
        order_id: get("order_id").ok_or_else(|| missing("order_id"))?,
        fields,
    })
}

impl Ion {
    /// The body published for the normalizer: the form fields as a JSON object.
    pub fn to_json(&self) -> Vec<u8> {
        // A repeated name keeps its first value, the one `parse_ion` routed by.
        let mut map = serde_json::Map::new();
        for (k, v) in &self.fields {
            map.entry(k.as_str())
                .or_insert_with(|| Value::String(v.clone()));
        }
        serde_json::to_vec(&map).unwrap_or_default()
    }

    /// A message id derived from every field, so a resent notification is a duplicate and a
    /// different one is not.
    pub fn msg_id(&self) -> String {
        let mut sorted: Vec<_> = self.fields.iter().collect();
        sorted.sort();
        let mut h = Sha256::new();
        for (k, v) in sorted {
            h.update(k.as_bytes());
            h.update([0]);
            h.update(v.as_bytes());
            h.update([0]);
        }
        let digest = h.finalize();
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        format!("ion:{}:{hex}", self.store_id)
    }
}

/// The message id of a v3 event: the store and Ecwid's `eventId`.
pub fn v3_msg_id(head: &V3Head) -> String {
    format!("v3:{}:{}", head.store_id, head.event_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(err: ApiError) -> String {
        assert_eq!(err.status(), axum::http::StatusCode::BAD_REQUEST);
        err.to_string()
    }

    #[test]
    fn parses_the_documented_webhook() {
        let body = br#"{"eventId":"80aece08-40e8-4145-8764-6c2f0d38678","eventCreated":1234567,"storeId":1003,"entityId":22222,"eventType":"order.created","data":{"orderId":"XJ12H","newPaymentStatus":"PAID"}}"#;
        let head = parse_v3(body).unwrap();
        assert_eq!(head.store_id, "1003");
        assert_eq!(head.event_created, 1234567);
        assert_eq!(
            v3_msg_id(&head),
            "v3:1003:80aece08-40e8-4145-8764-6c2f0d38678"
        );
    }

    #[test]
    fn data_and_entity_id_are_optional_and_free_form() {
        let body = br#"{"eventId":"x","eventCreated":1,"storeId":"1003","entityId":"app-name","eventType":"application.installed"}"#;
        assert!(parse_v3(body).is_ok());
    }

    #[test]
    fn names_the_bad_field() {
        let cases: [(&[u8], &str); 9] = [
            (
                br#"{"eventCreated":1,"storeId":1,"eventType":"a"}"#,
                "eventId",
            ),
            (
                br#"{"eventId":5,"eventCreated":1,"storeId":1,"eventType":"a"}"#,
                "eventId",
            ),
            (
                br#"{"eventId":"x","storeId":1,"eventType":"a"}"#,
                "eventCreated",
            ),
            (
                br#"{"eventId":"x","eventCreated":"yesterday","storeId":1,"eventType":"a"}"#,
                "eventCreated",
            ),
            (
                br#"{"eventId":"x","eventCreated":1,"eventType":"a"}"#,
                "storeId",
            ),
            (
                br#"{"eventId":"x","eventCreated":1,"storeId":-4,"eventType":"a"}"#,
                "storeId",
            ),
            (
                br#"{"eventId":"x","eventCreated":1,"storeId":"1.2","eventType":"a"}"#,
                "storeId",
            ),
            (
                br#"{"eventId":"x","eventCreated":1,"storeId":1}"#,
                "eventType",
            ),
            (
                br#"{"eventId":"x","eventCreated":1,"storeId":1,"eventType":["a"]}"#,
                "eventType",
            ),
        ];
        for (body, field) in cases {
            let message = field_of(parse_v3(body).unwrap_err());
            assert!(message.contains(field), "{message} should name {field}");
        }
    }

    #[test]
    fn malformed_json_is_400() {
        for body in [&b"{"[..], b"[1,2]", b"null", b"\"s\"", b""] {
            let err = parse_v3(body).unwrap_err();
            assert_eq!(err.code(), "invalid_json");
        }
    }

    #[test]
    fn parses_an_ion_form() {
        let body = b"owner_id=1003&event_type=order_status_change&date=2026-11-22+10%3A15%3A00&order_id=42&payment_status=PAID&fulfillment_status=SHIPPED&old_payment_status=AWAITING_PAYMENT&old_fulfillment_status=PROCESSING";
        let ion = parse_ion(body).unwrap();
        assert_eq!(ion.store_id, "1003");
        assert_eq!(ion.order_id, "42");
        let json: Value = serde_json::from_slice(&ion.to_json()).unwrap();
        assert_eq!(json["date"], "2026-11-22 10:15:00");
        assert_eq!(ion.msg_id(), parse_ion(body).unwrap().msg_id());
        let other = parse_ion(&[&body[..], b"x"].concat()).unwrap();
        assert_ne!(ion.msg_id(), other.msg_id());
    }

    #[test]
    fn ion_requires_its_fields() {
        assert!(parse_ion(b"event_type=new_order&order_id=1")
            .unwrap_err()
            .to_string()
            .contains("owner_id"));
        assert!(parse_ion(b"owner_id=abc&event_type=new_order&order_id=1")
            .unwrap_err()
            .to_string()
            .contains("owner_id"));
        assert!(parse_ion(b"owner_id=1&order_id=1")
            .unwrap_err()
            .to_string()
            .contains("event_type"));
        assert!(parse_ion(b"owner_id=1&event_type=new_order")
            .unwrap_err()
            .to_string()
            .contains("order_id"));
    }

    #[test]
    fn detects_formats() {
        assert_eq!(
            detect_format(Some("application/json; charset=utf-8"), b"{}").unwrap(),
            Format::V3
        );
        assert_eq!(
            detect_format(Some("application/x-www-form-urlencoded"), b"a=b").unwrap(),
            Format::Ion
        );
        assert_eq!(detect_format(None, b"  {\"a\":1}").unwrap(), Format::V3);
        assert_eq!(detect_format(None, b"owner_id=1").unwrap(), Format::Ion);
        assert_eq!(
            detect_format(Some("text/plain"), b"{}")
                .unwrap_err()
                .status(),
            axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
    }
}
