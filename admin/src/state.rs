//! What every admin handler shares: its configuration, the started service's NATS handles
//! (the admin API's own connection) and instance directory, and its metrics.

use crate::config::Config;
use crate::metrics::Metrics;

/// Shared by every handler; cheap to clone.
pub type AdminState = shared::service::HandlerState<Config, Metrics>;
