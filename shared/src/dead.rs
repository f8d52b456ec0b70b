//! Dead letters: what a stage cannot process goes to `ECWID_DEAD` (`ecwid.dead.<stage>.<id>`)
//! with headers saying why, where it came from and, for deliveries, how the attempts went. The
//! admin API lists, replays and deletes them.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::HeaderMap;
use bytes::Bytes;

use model::retry::Stage;

use crate::nats::{dead_subject, headers};
use crate::Error;

/// One message on its way to the dead-letter stream.
#[derive(Debug)]
pub struct DeadLetter<'a> {
    pub stage: Stage,
    /// Store id (normalize) or instance id (deliver): the last subject token.
    pub id: &'a str,
    /// A short machine word: `unparseable`, `no_instance`, `gone`, `attempts_exhausted`, …
    pub reason: &'static str,
    /// What went wrong, for a person.
    pub error: String,
    pub original_subject: &'a str,
    pub original_headers: Option<&'a HeaderMap>,
    /// Identifies the source message (stream and sequence): JetStream drops a second dead letter
    /// for the same message, so a lost ack after dead-lettering adds no copy.
    pub source_id: String,
    pub payload: Bytes,
    pub extra: Vec<(async_nats::HeaderName, String)>,
}

/// Publishes `letter` and waits for JetStream's ack (up to `timeout`).
pub async fn publish(
    js: &jetstream::Context,
    letter: DeadLetter<'_>,
    timeout: Duration,
) -> Result<(), Error> {
    let mut h = HeaderMap::new();
    if let Some(original) = letter.original_headers {
        headers::carry(original, &mut h);
        // A replayed event keeps its first id; otherwise the message's own id is the first.
        if original.get(headers::ORIGINAL_MSG_ID).is_none() {
            if let Some(v) = original.get(headers::MSG_ID) {
                h.insert(headers::ORIGINAL_MSG_ID, v.as_str());
            }
        }
    }
    h.insert(
        headers::MSG_ID,
        format!("dead:{}:{}", letter.stage.as_str(), letter.source_id),
    );
    h.insert(headers::DEAD_STAGE, letter.stage.as_str());
    h.insert(headers::DEAD_REASON, letter.reason);
    h.insert(headers::DEAD_ERROR, header_safe(&letter.error));
    h.insert(
        headers::DEAD_AT,
        model::time_fmt::unix_ms_to_rfc3339(model::time_fmt::now_unix_ms()),
    );
    h.insert(headers::ORIGINAL_SUBJECT, letter.original_subject);
    for (name, value) in letter.extra {
        h.insert(name, header_safe(&value));
    }
    let subject = dead_subject(letter.stage.as_str(), letter.id);
    crate::nats::publish(js, subject, h, letter.payload, timeout).await?;
    Ok(())
}

/// A header value: one line, at most 512 bytes.
pub fn header_safe(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.len() > 512 {
        let mut cut = 512;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}
