//! What every webhook handler shares: the configuration, the started service's NATS handles and
//! instance directory, and the ingest's metrics.

use crate::config::Config;
use crate::metrics::Metrics;

/// Shared by every handler; cheap to clone.
pub type AppState = shared::service::HandlerState<Config, Metrics>;
