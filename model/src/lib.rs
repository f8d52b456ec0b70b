//! What the ecwid-events services agree on, with no runtime (no tokio, no NATS, no HTTP): pure
//! rules and types, each tested with tables beside it. `shared` (the runtime) and the services
//! stand on it.
//!
//! - [`ecwid`]: Ecwid's inbound formats (v3 webhooks, ION forms, polled entities) parsed once,
//!   and their dedupe ids.
//! - [`normalize`]: the event-type mapping table and raw payload → envelope(s).
//! - [`instance`]: the connector instance (the seed's instance JSON), validation and redaction.
//! - [`receiver`]: how an instance's receiver is reached: custom headers, proxy, client
//!   certificate, OAuth2 client credentials; their checks and the certificate's expiry.
//! - [`redact`]: the marker secrets are shown as.
//! - [`filter`]: payload filters (`event.notification.filter`, CEL).
//! - [`envelope`]: the Open Connectors envelope the callbacks receive.
//! - [`record`]: the event log's records and attempts.
//! - [`state`]: an instance's state (active, paused, disabled).
//! - [`health`]: a callback's shared health: breaker, failures, success rate.
//! - [`retry`]: every wait: after a transient failure, a delivery retry schedule's bounds, a
//!   server's `Retry-After`; the stages.
//! - [`netguard`]: which callback addresses are refused (SSRF guard) and the operator's allow-list.
//! - [`units`]: sizes and durations as operators write them.
//! - [`time_fmt`], [`hex`]: RFC 3339 times and hex digits.
//! - `strategies` (feature `strategies`): proptest strategies for Ecwid-shaped input.

pub mod ecwid;
pub mod envelope;
pub mod filter;
pub mod health;
pub mod hex;
pub mod instance;
pub mod netguard;
pub mod normalize;
pub mod receiver;
pub mod record;
pub mod redact;
pub mod retry;
pub mod state;
#[cfg(feature = "strategies")]
pub mod strategies;
pub mod time_fmt;
pub mod units;
