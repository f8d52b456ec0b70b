//! Shared library of ecwid-events: everything the three services have in common.
//!
//! - [`config`]: environment variables → typed, validated configuration; [`config::Secret`].
//! - [`nats`]: stream, subject, consumer, bucket and header names; connect with retry; topology.
//! - [`ecwid`]: Ecwid's inbound formats (v3 webhooks, ION forms) parsed once, and their dedupe ids.
//! - [`eventlog`]: the event log: every envelope's journey and attempts, its streams and index.
//! - [`instance`]: the connector instance (the seed's instance JSON), validation and redaction.
//! - [`control`]: instance states (pause, disable), callback health shared by the deliverers,
//!   and the hold where a held instance's envelopes wait.
//! - [`directory`]: the live in-memory view of the instances bucket (store id → instances).
//! - [`kvwatch`]: a live in-memory copy of a small JSON KV bucket (states, callback health).
//! - [`envelope`]: the Open Connectors envelope the callbacks receive.
//! - [`dead`]: publishing to the dead-letter stream, with headers saying why.
//! - [`ordered`]: ordered delivery's lanes (one consumer per ordered instance) and what blocks one.
//! - [`netguard`]: which callback addresses are refused (SSRF guard) and the operator's allow-list.
//! - [`retry`]: how long a stage waits before trying again; the start-up backoff; the bounds of
//!   a delivery retry schedule.
//! - [`metrics`]: metric names, the metrics every service exports, registry helpers.
//! - [`ops`]: the ops HTTP server (`/metrics`, `/healthz`, `/readyz`) and the `healthcheck` command.
//! - [`topology`]: the streams and buckets, created when missing and updated only when their
//!   settings differ, so replicas starting together write nothing twice.
//! - [`parse_errors`]: JSON bodies for the 400/414/431 hyper answers before any router runs.
//! - [`service`]: start-up common to every service (topology, instances watch, metrics).
//! - `strategies` (feature `strategies`): proptest strategies for Ecwid-shaped input.
//! - [`telemetry`]: tracing initialisation (`LOG_FORMAT`, `RUST_LOG`).
//! - [`shutdown`]: SIGTERM/SIGINT → one cancellation token; the bounded drain.
//! - [`worker`]: the bounded pull loop both workers run; the consumer-lag reporter.
//! - [`error`]: this crate's error type.

pub mod config;
pub mod control;
pub mod dead;
pub mod directory;
pub mod ecwid;
pub mod envelope;
pub mod error;
pub mod eventlog;
pub mod hex;
pub mod instance;
pub mod kvwatch;
pub mod metrics;
pub mod nats;
pub mod netguard;
pub mod ops;
pub mod ordered;
pub mod parse_errors;
pub mod retry;
pub mod service;
pub mod shutdown;
#[cfg(feature = "strategies")]
pub mod strategies;
pub mod telemetry;
pub mod time_fmt;
pub mod topology;
pub mod worker;

pub use error::Error;

/// The product's version, as built.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
