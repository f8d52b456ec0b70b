//! How many times each message was put back without an attempt (breaker open, host busy,
//! instance at its limit), known to every deliverer replica.
//!
//! The attempt number is the message's delivery count less these put-backs. A message put back
//! by one replica is often redelivered to another, so each put-back is told to all replicas on
//! [`DEFERRALS_SUBJECT`] (core NATS, fire and forget), and so is the settling of a message that
//! had any. The note is published before the NAK on the same connection, and the NAK's delay
//! (at least 100 ms for the instance limits, 1 s for a busy host; a breaker's remaining
//! cool-down can be shorter) is far longer than the note takes to reach the other replicas, so
//! the replica that gets the message next already counts it. Nothing is published for a message that
//! was never put back: the hot path pays one map lookup.
//!
//! A replica that starts knows nothing of earlier put-backs, so a message put back before may
//! then spend up to that many attempts (the README's "Limits").

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt as _;
use shared::nats::DEFERRALS_SUBJECT;
use tokio_util::sync::CancellationToken;

/// Bounds the memory; past it the map starts over (those messages may spend an attempt each).
const MAX_TRACKED: usize = 200_000;

#[derive(Debug)]
pub struct Deferrals {
    me: String,
    client: async_nats::Client,
    /// Stream sequence → times any replica put the message back without an attempt.
    counts: Mutex<HashMap<u64, u64>>,
}

/// One line on [`DEFERRALS_SUBJECT`].
#[derive(Debug, PartialEq, Eq)]
enum Note<'a> {
    Deferred { from: &'a str, seq: u64 },
    Settled { from: &'a str, seq: u64 },
}

fn parse(payload: &str) -> Option<Note<'_>> {
    let (from, change) = payload.split_once(' ')?;
    if let Some(seq) = change.strip_prefix('+') {
        return Some(Note::Deferred {
            from,
            seq: seq.parse().ok()?,
        });
    }
    let seq = change.strip_prefix('-')?.parse().ok()?;
    Some(Note::Settled { from, seq })
}

impl Deferrals {
    /// Subscribes to the other replicas' notes (before this replica takes any message) and
    /// applies them until `cancel` fires.
    pub async fn start(
        me: String,
        client: async_nats::Client,
        cancel: CancellationToken,
    ) -> Result<Arc<Self>, async_nats::SubscribeError> {
        let mut notes = client.subscribe(DEFERRALS_SUBJECT).await?;
        let this = Arc::new(Self {
            me,
            client,
            counts: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&this);
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    m = notes.next() => m,
                    () = cancel.cancelled() => None,
                };
                let (Some(message), Some(this)) = (message, weak.upgrade()) else {
                    break;
                };
                match std::str::from_utf8(&message.payload).ok().and_then(parse) {
                    Some(Note::Deferred { from, seq }) if from != this.me => this.add(seq),
                    Some(Note::Settled { from, seq }) if from != this.me => {
                        this.remove(seq);
                    }
                    _ => {}
                }
            }
        });
        Ok(this)
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<u64, u64>) -> T) -> T {
        f(&mut self.counts.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn add(&self, seq: u64) {
        self.with(|counts| {
            if counts.len() >= MAX_TRACKED {
                counts.clear();
            }
            *counts.entry(seq).or_insert(0) += 1;
        });
    }

    fn remove(&self, seq: u64) -> bool {
        self.with(|counts| counts.remove(&seq).is_some())
    }

    /// Times message `seq` was put back without an attempt, by any replica.
    pub fn of(&self, seq: u64) -> u64 {
        self.with(|counts| counts.get(&seq).copied().unwrap_or(0))
    }

    /// Message `seq` is being put back without an attempt. Call before the NAK.
    pub async fn note(&self, seq: u64) {
        self.add(seq);
        self.publish(format!("{} +{seq}", self.me)).await;
    }

    /// Message `seq` is settled (acked or dead-lettered): forget it, here and elsewhere.
    pub async fn forget(&self, seq: u64) {
        if self.remove(seq) {
            self.publish(format!("{} -{seq}", self.me)).await;
        }
    }

    async fn publish(&self, note: String) {
        // A lost note costs at most one attempt of one message; not worth failing for.
        if let Err(error) = self.client.publish(DEFERRALS_SUBJECT, note.into()).await {
            tracing::debug!(%error, "Could not tell the other replicas about a put-back.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_parse() {
        assert_eq!(
            parse("a1 +42"),
            Some(Note::Deferred {
                from: "a1",
                seq: 42
            })
        );
        assert_eq!(parse("a1 -7"), Some(Note::Settled { from: "a1", seq: 7 }));
        for bad in ["", "a1", "a1 42", "a1 +x", "a1 -", "a1 +-1"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
