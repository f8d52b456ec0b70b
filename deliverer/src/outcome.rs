//! What becomes of one envelope: the [`Outcome`] of an attempt (ack, NAK with a delay, or
//! dead-letter then ack) as [`decide`] rules it from the attempt's result and the retry
//! schedule, and what the deliverer reads of an envelope's body ([`MessageHead`]).

use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::dispatch::Attempt;
use model::retry::next_wait;

/// What becomes of one envelope after an attempt (or instead of one).
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Ack,
    /// Try again after `delay`; `spends_attempt` is false for deferrals.
    Retry {
        delay: Duration,
        spends_attempt: bool,
    },
    Dead {
        reason: &'static str,
        error: String,
        last_status: Option<u16>,
        attempts: u64,
    },
}

#[derive(Deserialize)]
struct EnvelopeHead<'a> {
    #[serde(borrow)]
    message: MessageHead<'a>,
}

/// What the deliverer reads of an envelope's body: its id, and its events unread. Read once per
/// message: the envelope's raw payload makes every read a scan of ~1 KB.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct MessageHead<'a> {
    pub(crate) event_id: String,
    /// Only the event log reads them ([`crate::journal`]): a delivery does not depend on them.
    #[serde(borrow, default)]
    pub(crate) events: Option<&'a RawValue>,
}

/// The head of `payload`, or why it is not an envelope.
pub(crate) fn read_head(payload: &[u8]) -> Result<MessageHead<'_>, String> {
    serde_json::from_slice::<EnvelopeHead<'_>>(payload)
        .map(|h| h.message)
        .map_err(|e| format!("not an envelope: {e}"))
}

/// What the result of attempt number `attempt` (1-based) means for its envelope, under
/// `schedule`.
pub fn decide(result: &Attempt, schedule: &[Duration], attempt: u64) -> Outcome {
    match result {
        Attempt::Delivered(_) => Outcome::Ack,
        Attempt::Gone(_) => Outcome::Dead {
            reason: "gone",
            error: "the callback answered 410 Gone".into(),
            last_status: Some(410),
            attempts: attempt,
        },
        Attempt::Refused(why) => Outcome::Dead {
            reason: "refused_address",
            error: why.clone(),
            last_status: None,
            attempts: attempt,
        },
        Attempt::Failed {
            answer,
            error,
            retry_after,
            ..
        } => match next_wait(schedule, attempt, *retry_after) {
            Some(delay) => Outcome::Retry {
                delay,
                spends_attempt: true,
            },
            None => Outcome::Dead {
                reason: "attempts_exhausted",
                error: error.clone(),
                last_status: answer.as_ref().map(|a| a.status),
                attempts: attempt,
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::Answer;
    use model::envelope::Event;

    fn answer(status: u16) -> Option<Answer> {
        Some(Answer {
            status,
            excerpt: String::new(),
        })
    }

    fn failed(answer: Option<Answer>, retry_after: Option<Duration>) -> Attempt {
        Attempt::Failed {
            answer,
            class: "5xx",
            error: "HTTP 503".into(),
            retry_after,
        }
    }

    #[test]
    fn a_delivery_needs_only_the_envelopes_id() {
        let head = read_head(br#"{"message":{"eventId":"e1","events":[{"eventType":"CREATED","objectType":"order","objectId":"7","elementKey":"ecwid","date":"2026-01-01T00:00:00Z"}],"raw":{"a":[1,{"b":"}"}]}}}"#).unwrap();
        assert_eq!(head.event_id, "e1");
        let events: Vec<Event> = serde_json::from_str(head.events.unwrap().get()).unwrap();
        assert_eq!(events[0].object_id, "7");
        // Events the log could not read do not stop the delivery.
        let odd = read_head(br#"{"message":{"eventId":"e2","events":"?"}}"#).unwrap();
        assert_eq!(
            (odd.event_id.as_str(), odd.events.map(RawValue::get)),
            ("e2", Some(r#""?""#))
        );
        assert!(read_head(br#"{"message":{"events":[]}}"#)
            .unwrap_err()
            .starts_with("not an envelope"));
    }

    #[test]
    fn each_result_decides_the_envelopes_fate() {
        let schedule = [Duration::from_secs(10), Duration::from_secs(60)];
        let delivered = Attempt::Delivered(Answer {
            status: 204,
            excerpt: String::new(),
        });
        assert_eq!(decide(&delivered, &schedule, 1), Outcome::Ack);
        let gone = Attempt::Gone(Answer {
            status: 410,
            excerpt: "bye".into(),
        });
        assert!(matches!(
            decide(&gone, &schedule, 2),
            Outcome::Dead {
                reason: "gone",
                last_status: Some(410),
                attempts: 2,
                ..
            }
        ));
        let refused = Attempt::Refused("loopback".into());
        assert!(matches!(
            decide(&refused, &schedule, 1),
            Outcome::Dead {
                reason: "refused_address",
                last_status: None,
                ..
            }
        ));
        // A failure within the schedule waits its entry; Retry-After is clamped to it.
        let Outcome::Retry {
            delay,
            spends_attempt: true,
        } = decide(&failed(answer(503), None), &schedule, 2)
        else {
            panic!("the second failure is retried");
        };
        assert!(delay >= Duration::from_secs(48) && delay <= Duration::from_secs(72));
        assert_eq!(
            decide(
                &failed(answer(429), Some(Duration::from_secs(1))),
                &schedule,
                1
            ),
            Outcome::Retry {
                delay: Duration::from_secs(10),
                spends_attempt: true
            }
        );
        // After the last wait: dead, with the last status, or none for a connection error.
        assert_eq!(
            decide(&failed(answer(503), None), &schedule, 3),
            Outcome::Dead {
                reason: "attempts_exhausted",
                error: "HTTP 503".into(),
                last_status: Some(503),
                attempts: 3
            }
        );
        assert!(matches!(
            decide(&failed(None, None), &schedule, 3),
            Outcome::Dead {
                last_status: None,
                attempts: 3,
                ..
            }
        ));
    }
}
