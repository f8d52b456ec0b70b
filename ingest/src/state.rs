//! What every handler shares: the configuration, the started service's NATS handles and
//! instance directory, and the ingest's metrics.

use std::sync::Arc;

use shared::service::ServiceContext;

use crate::config::Config;
use crate::metrics::Metrics;

/// Shared by every handler; cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
    pub inner: Arc<Inner>,
}

#[derive(Debug)]
pub struct Inner {
    pub config: Config,
    pub ctx: ServiceContext,
    pub metrics: Metrics,
}

impl AppState {
    pub fn new(config: Config, ctx: ServiceContext, metrics: Metrics) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                ctx,
                metrics,
            }),
        }
    }
}
