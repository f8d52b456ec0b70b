//! The runtime every service stands on (the pure rules and types are in `model`, below it).
//!
//! - [`config`]: environment variables → typed, validated configuration; [`config::Secret`].
//! - [`nats`]: stream, subject, consumer, bucket and header names; connect with retry; the
//!   acked publish.
//! - [`topology`]: the streams and buckets, created when missing and updated only when their
//!   settings differ, so replicas starting together write nothing twice.
//! - [`eventlog`]: the event log's store: every envelope's journey and attempts, its streams and index.
//! - [`control`]: instance states in KV, the retrying markers, and the hold where a held
//!   instance's envelopes wait.
//! - [`directory`]: the live in-memory view of the instances bucket (store id → instances).
//! - [`kvwatch`]: a live in-memory copy of a small JSON KV bucket (states, callback health).
//! - [`dead`]: publishing to the dead-letter stream, with headers saying why.
//! - [`ordered`]: ordered delivery's lanes (one consumer per ordered instance) and what blocks one.
//! - [`otel`]: OpenTelemetry traces: the `OTEL_*` settings, the exporter, trace context in NATS
//!   headers and HTTP requests.
//! - [`metrics`]: metric names, the metrics every service exports, registry helpers.
//! - [`ops`]: the ops HTTP server (`/metrics`, `/healthz`, `/readyz`) and the `healthcheck` command.
//! - [`http`]: the HTTP vocabulary: one error shape, the path-id, query and body extractors, paging.
//! - [`parse_errors`]: JSON bodies for the 400/414/431 hyper answers before any router runs.
//! - [`service`]: start-up common to every service (topology, instances watch, metrics), the
//!   service's `main`, and `--print-contract`.
//! - [`telemetry`]: tracing initialisation (`LOG_FORMAT`, `RUST_LOG`).
//! - [`shutdown`]: SIGTERM/SIGINT → one cancellation token; the bounded drain.
//! - [`worker`]: the bounded pull loop both workers run; the consumer-lag reporter.
//! - [`error`]: this crate's error type.

pub mod config;
pub mod control;
pub mod dead;
pub mod directory;
pub mod error;
pub mod eventlog;
pub mod http;
pub mod kvwatch;
pub mod metrics;
pub mod nats;
pub mod ops;
pub mod ordered;
pub mod otel;
pub mod parse_errors;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod topology;
pub mod worker;

pub use error::Error;

/// The product's version, as built.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
