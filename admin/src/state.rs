//! What every admin handler shares: its configuration, the started service's NATS handles
//! (the admin API's own connection) and instance directory, and its metrics.

use std::sync::Arc;

use shared::service::ServiceContext;

use crate::config::Config;
use crate::metrics::Metrics;

/// Shared by every handler; cheap to clone.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub inner: Arc<Inner>,
}

#[derive(Debug)]
pub struct Inner {
    pub config: Config,
    pub ctx: ServiceContext,
    pub metrics: Metrics,
}

impl AdminState {
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
