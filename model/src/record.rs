//! The event log's records: one per envelope (Ecwid event × instance), or one Ecwid event's
//! raw-stage outcome, with its attempts; what the admin API answers and the log stores.

use serde::{Deserialize, Serialize};

use crate::envelope::RESPONSE_EXCERPT_BYTES;

/// The instance token of raw-stage outcomes (no instance).
pub const NO_INSTANCE: &str = "_";

/// Attempts a record keeps: the first few and the latest (the count says how many there were).
pub const MAX_ATTEMPTS_KEPT: usize = 50;
/// The longest `lastError` / attempt error text kept.
pub const MAX_ERROR_CHARS: usize = 512;
/// Where an envelope (or an Ecwid event) stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Stored, not attempted yet (or redelivery requested).
    #[default]
    Pending,
    /// An attempt failed; the next one is scheduled (`nextAttemptAt`).
    Retrying,
    Delivered,
    /// Dead-lettered: by the deliverer after its last attempt, or by the normalizer.
    Dead,
    /// Raw stage: every instance of the store filtered it out (`event.objects`, disabled).
    Filtered,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Retrying => "retrying",
            Status::Delivered => "delivered",
            Status::Dead => "dead",
            Status::Filtered => "filtered",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Status::Pending,
            Status::Retrying,
            Status::Delivered,
            Status::Dead,
            Status::Filtered,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }
}

/// One delivery attempt. Never request or response headers, never a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attempt {
    /// 1-based, across redeliveries.
    pub number: u64,
    pub started_at: String,
    pub duration_ms: u64,
    /// The HTTP status, when the callback answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Without an answer: `timeout`, `connect_error`, `refused_address`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_class: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The first [`RESPONSE_EXCERPT_BYTES`] of the response body, UTF-8 (lossy).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub response: String,
}

/// A record: one envelope (Ecwid event × instance), or one Ecwid event's raw-stage outcome.
/// `Default` is a pending record with no attempts: writers fill in what they know.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// `message.eventId` of the envelope = `Elements-Webhook-Id`.
    pub id: String,
    /// `None` for a raw-stage outcome.
    pub instance_id: Option<String>,
    pub store_id: String,
    pub object_type: String,
    pub object_id: String,
    pub event_type: String,
    /// Ecwid's v3 `eventId`; for ION, the dedupe id.
    pub ecwid_event_id: String,
    pub format: String,
    pub verified: bool,
    pub request_id: String,
    pub received_at: String,
    pub status: Status,
    /// How many attempts were made (the list keeps at most [`MAX_ATTEMPTS_KEPT`]).
    pub attempts: u64,
    /// The last HTTP status, or the error class of the last attempt.
    pub last_status: Option<String>,
    pub last_error: Option<String>,
    pub last_attempt_at: Option<String>,
    pub next_attempt_at: Option<String>,
    pub delivered_at: Option<String>,
    /// The envelope's sequence in `ECWID_EVENTS` (its body, exactly as POSTed, is read there).
    pub envelope_seq: Option<u64>,
    pub attempt_log: Vec<Attempt>,
}

impl Record {
    /// Appends `attempt`, keeping the first few and the latest ones.
    pub fn push_attempt(&mut self, attempt: Attempt) {
        self.attempts = self.attempts.max(attempt.number);
        self.last_status = Some(match (attempt.status, &attempt.error_class) {
            (Some(s), _) => s.to_string(),
            (None, Some(class)) => class.clone(),
            (None, None) => "unknown".to_owned(),
        });
        self.last_error = attempt.error.clone();
        self.last_attempt_at = Some(attempt.started_at.clone());
        self.attempt_log.push(attempt);
        if self.attempt_log.len() > MAX_ATTEMPTS_KEPT {
            // Keep the first five: how it started matters as much as how it is going.
            self.attempt_log.remove(5);
        }
    }
}

/// Text cut to at most `max` characters.
pub fn clip(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// A response body excerpt: the first [`RESPONSE_EXCERPT_BYTES`], UTF-8, lossy.
pub fn excerpt(body: &[u8]) -> String {
    let cut = &body[..body.len().min(RESPONSE_EXCERPT_BYTES)];
    String::from_utf8_lossy(cut).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            id: "0f3c".into(),
            instance_id: Some("inst".into()),
            store_id: "1003".into(),
            object_type: "orders".into(),
            object_id: "XJ 12.H".into(),
            event_type: "CREATED".into(),
            ecwid_event_id: "e-1".into(),
            format: "v3".into(),
            verified: true,
            request_id: "r".into(),
            received_at: "2026-11-22T10:15:00Z".into(),
            ..Record::default()
        }
    }

    #[test]
    fn attempts_are_bounded_and_summarised() {
        let mut r = record();
        for n in 1..=60 {
            r.push_attempt(Attempt {
                number: n,
                started_at: format!("t{n}"),
                duration_ms: 5,
                status: Some(503),
                error_class: None,
                error: Some("HTTP 503".into()),
                response: excerpt(&vec![b'x'; 5000]),
            });
        }
        assert_eq!(r.attempts, 60);
        assert_eq!(r.attempt_log.len(), MAX_ATTEMPTS_KEPT);
        assert_eq!(r.attempt_log[0].number, 1);
        assert_eq!(r.attempt_log[4].number, 5);
        assert_eq!(r.attempt_log.last().map(|a| a.number), Some(60));
        assert_eq!(r.attempt_log[0].response.len(), RESPONSE_EXCERPT_BYTES);
        assert_eq!(r.last_status.as_deref(), Some("503"));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["status"], "pending");
        assert_eq!(json["ecwidEventId"], "e-1");
    }

    #[test]
    fn excerpts_are_lossy_utf8() {
        assert_eq!(excerpt(b"ok \xff"), "ok \u{fffd}");
        assert_eq!(Status::parse("delivered"), Some(Status::Delivered));
        assert_eq!(Status::parse("nope"), None);
    }
}
