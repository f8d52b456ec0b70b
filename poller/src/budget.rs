//! One request budget per API token, shared by every replica through `ECWID_POLL_STATE`
//! (`budget.<hash of the token>`): a token bucket whose state (tokens left, as of when) is
//! updated with a revision check before each request, so replicas never spend one token twice.
//!
//! Why a bucket and not a count per minute: Ecwid's limit is "600 requests a minute", and a
//! count per calendar minute lets 600 at the end of one minute and 600 at the start of the next
//! through. The bucket holds at most `burst` = limit/60 (one second's worth, at least 1) and
//! refills at (limit − burst) per window, so any window-long stretch of time sees at most
//! burst + (limit − burst) = limit requests. The cost is one bucket update per REST request,
//! small next to the request itself.

use std::time::Duration;

use async_nats::jetstream::kv;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::error::PollError;
use model::retry::POLL_MAX_IN_CYCLE_WAIT;

#[derive(Debug, Clone)]
pub struct Budget {
    kv: kv::Store,
    burst: f64,
    /// Tokens per millisecond.
    rate: f64,
}

#[derive(Debug, Serialize, Deserialize)]
struct State {
    tokens: f64,
    /// Unix ms the tokens were counted at; later than now while a 429 pauses the token.
    at: i64,
}

/// `budget.<first 16 bytes of SHA-256(token), hex>`: the token itself is never a key.
pub fn budget_key(token: &str) -> String {
    format!("budget.{}", token_hash(token))
}

/// A short hash of a token, to tell tokens apart without keeping them.
pub fn token_hash(token: &str) -> String {
    model::hex::lower(&Sha256::digest(token.as_bytes())[..16])
}

impl Budget {
    pub fn new(kv: kv::Store, limit: u32, window: Duration) -> Self {
        let burst = f64::from((limit / 60).max(1));
        let rate = (f64::from(limit) - burst) / window.as_millis().max(1) as f64;
        Self { kv, burst, rate }
    }

    /// Waits until `token` may make one request, and takes it.
    pub async fn acquire(&self, token: &str, cancel: &CancellationToken) -> Result<(), PollError> {
        let key = budget_key(token);
        loop {
            let entry = self.kv.entry(&key).await.map_err(transient)?;
            let now = model::time_fmt::now_unix_ms();
            let (state, revision) = match &entry {
                Some(e) if e.operation == kv::Operation::Put => (
                    serde_json::from_slice::<State>(&e.value).unwrap_or(State {
                        tokens: self.burst,
                        at: now,
                    }),
                    Some(e.revision),
                ),
                _ => (
                    State {
                        tokens: self.burst,
                        at: now,
                    },
                    None,
                ),
            };
            let wait_ms = if state.at > now {
                // Paused by a 429 until `at`: a long pause ends the cycle rather than holding
                // a slot (the next cycle finds the token still paused, or free).
                let paused = Duration::from_millis((state.at - now) as u64);
                if paused > POLL_MAX_IN_CYCLE_WAIT {
                    return Err(PollError::Transient(format!(
                        "the token is paused for {} s more after Ecwid answered 429",
                        paused.as_secs()
                    )));
                }
                (state.at - now) as f64 + ((1.0 - state.tokens).max(0.0) / self.rate)
            } else {
                let tokens = (state.tokens + (now - state.at) as f64 * self.rate).min(self.burst);
                if tokens >= 1.0 {
                    let next = State {
                        tokens: tokens - 1.0,
                        at: now,
                    };
                    let value: bytes::Bytes = serde_json::to_vec(&next).unwrap_or_default().into();
                    let written = match revision {
                        Some(r) => self.kv.update(&key, value, r).await.is_ok(),
                        None => self.kv.create(&key, value).await.is_ok(),
                    };
                    if written {
                        return Ok(());
                    }
                    // Another replica took a token first: read again.
                    continue;
                }
                (1.0 - tokens) / self.rate
            };
            let wait = Duration::from_millis(wait_ms.ceil().clamp(1.0, 60_000.0) as u64);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = cancel.cancelled() => return Err(PollError::Cancelled),
            }
        }
    }

    /// Empties `token`'s bucket until `retry_after` from now (Ecwid answered 429): every replica
    /// waits, not only the one that was told.
    pub async fn pause(&self, token: &str, retry_after: Duration) {
        let state = State {
            tokens: 0.0,
            at: model::time_fmt::now_unix_ms() + retry_after.as_millis() as i64,
        };
        if let Ok(value) = serde_json::to_vec(&state) {
            if let Err(error) = self.kv.put(budget_key(token), value.into()).await {
                tracing::warn!(%error, "Could not record a 429 in the shared budget.");
            }
        }
    }
}

fn transient(e: impl std::fmt::Display) -> PollError {
    PollError::Transient(format!("the budget bucket did not answer: {e}"))
}
