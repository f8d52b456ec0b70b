//! The Open Connectors envelope: what a callback receives.
//!
//! ```json
//! {"message": {"eventId": "…", "instanceId": "…", "elementKey": "ecwid", "verified": true,
//!   "events": [{"eventType": "UPDATED", "objectType": "orders", "objectId": "XJ12H",
//!               "elementKey": "ecwid", "date": "2026-11-22T10:15:00Z"}],
//!   "raw": { …the Ecwid payload exactly as received… }}}
//! ```

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

pub const ELEMENT_KEY: &str = "ecwid";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum EventType {
    Created,
    Updated,
    Deleted,
    Unknown,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Created => "CREATED",
            EventType::Updated => "UPDATED",
            EventType::Deleted => "DELETED",
            EventType::Unknown => "UNKNOWN",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub event_type: EventType,
    pub object_type: String,
    pub object_id: String,
    pub element_key: String,
    pub date: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    pub event_id: String,
    pub instance_id: String,
    pub element_key: String,
    /// Whether the ingest checked Ecwid's signature on this event (`false` for unsigned stores
    /// and for Instant Order Notifications, which Ecwid does not sign).
    pub verified: bool,
    pub events: Vec<Event>,
    /// The provider's payload, byte for byte.
    pub raw: Box<RawValue>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    pub message: Message,
}

impl Envelope {
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain strings, enums and an already valid RawValue cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// How much of a callback's response body the deliverer reads and keeps (as UTF-8, lossy): enough
/// for an operator to see why a receiver refused an envelope; the rest is never read, so an
/// endless or huge answer costs nothing.
pub const RESPONSE_EXCERPT_BYTES: usize = 1024;

/// The notification id of (Ecwid event, instance): deterministic, so a redelivered raw message
/// gets the same id and JetStream drops the second envelope. Shaped as a UUID. `event_key` is
/// the Ecwid event's message id (`v3:<storeId>:<eventId>`, `ion:<storeId>:<hash>`); an empty
/// `instance_id` names the event's raw-stage record in the event log.
pub fn notification_id(event_key: &str, instance_id: &str) -> String {
    let mut h = Sha256::new();
    h.update(event_key.as_bytes());
    h.update([0]);
    h.update(instance_id.as_bytes());
    let digest = h.finalize();
    let mut id = String::with_capacity(36);
    for (i, group) in [0..4, 4..6, 6..8, 8..10, 10..16].into_iter().enumerate() {
        if i > 0 {
            id.push('-');
        }
        crate::hex::push_lower(&mut id, &digest[group]);
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notification_ids_are_the_first_16_bytes_of_the_hash_shaped_as_a_uuid() {
        // The ids of envelopes already stored must not change: computed independently
        // (Python's hashlib) from SHA-256("v3:1003:abc\0inst-1").
        assert_eq!(
            notification_id("v3:1003:abc", "inst-1"),
            "9cabf31d-5f83-1521-d29e-a5d1cb2b9616"
        );
        assert_ne!(
            notification_id("v3:1003:abc", "inst-2"),
            notification_id("v3:1003:abc", "inst-1")
        );
    }
}
