//! The callback receivers: one axum server per instance, each checking
//! `Elements-Webhook-Signature` (`sha256=` base64 HMAC-SHA256 of the body under the instance's
//! `event.notification.signature.key`) and counting every delivery by the envelope's
//! `message.eventId` in the phase ledger its Ecwid event id names. Also the bare receiver of
//! floor (c).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Router;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use crate::load::Webhooks;
use crate::track::{now_ns, Tracker};

/// Deliveries the receivers could not account for.
#[derive(Debug, Default)]
pub(crate) struct Anomalies {
    pub bad_signatures: AtomicU64,
    pub unparseable: AtomicU64,
}

struct ReceiverState {
    key: Vec<u8>,
    trackers: Arc<Vec<Arc<Tracker>>>,
    anomalies: Arc<Anomalies>,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    message: Message<'a>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(rename = "eventId")]
    event_id: &'a str,
    #[serde(borrow)]
    raw: RawHead<'a>,
}

#[derive(Deserialize)]
struct RawHead<'a> {
    #[serde(rename = "eventId")]
    event_id: &'a str,
}

/// `sha256=<base64 HMAC-SHA256(key, body)>`
pub(crate) fn elements_signature(key: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(body);
    format!(
        "sha256={}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let at = now_ns();
    let signed = headers
        .get("elements-webhook-signature")
        .is_some_and(|v| v.as_bytes() == elements_signature(&state.key, &body).as_bytes());
    if !signed {
        state
            .anomalies
            .bad_signatures
            .fetch_add(1, Ordering::Relaxed);
    }
    let parsed = serde_json::from_slice::<Envelope<'_>>(&body)
        .ok()
        .and_then(|e| {
            Webhooks::parse_event_id(e.message.raw.event_id).map(|p| (p, e.message.event_id))
        });
    match parsed {
        Some(((phase, seq), message_event_id)) if phase < state.trackers.len() => {
            state.trackers[phase].record_delivery(seq, message_event_id, at);
        }
        _ => {
            state.anomalies.unparseable.fetch_add(1, Ordering::Relaxed);
        }
    }
    // A bad signature is counted, not refused: a refusal would only make the deliverer retry.
    StatusCode::OK
}

/// Starts a receiver on 127.0.0.1:0 verifying with `key`; returns its address.
pub(crate) async fn start(
    key: &str,
    trackers: Arc<Vec<Arc<Tracker>>>,
    anomalies: Arc<Anomalies>,
) -> anyhow::Result<SocketAddr> {
    let state = Arc::new(ReceiverState {
        key: key.as_bytes().to_vec(),
        trackers,
        anomalies,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = Router::new().fallback(receive).with_state(state);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

/// Floor (c)'s receiver: reads the body, answers 200, counts.
pub(crate) async fn start_bare(count: Arc<AtomicU64>) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .fallback(
            |State(count): State<Arc<AtomicU64>>, _body: Bytes| async move {
                count.fetch_add(1, Ordering::Relaxed);
                StatusCode::OK
            },
        )
        .with_state(count);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_base64_hmac_sha256_of_the_body() {
        // The HMAC-SHA256 example of Wikipedia's HMAC article (hex f7bc83f4…2d1a3cd8), in base64.
        assert_eq!(
            elements_signature(b"key", b"The quick brown fox jumps over the lazy dog"),
            "sha256=97yD9DBThCSxMpjmqm+xQ+9NWaFJRhdZl0edvC0aPNg="
        );
    }
}
