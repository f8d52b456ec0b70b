//! What every service does at start-up once it has a NATS client: set up the topology (retrying
//! while JetStream is not ready), start following the instances bucket, register the common
//! metrics. The result, [`Base`], is what the service's `run` builds on.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use backon::{ExponentialBuilder, Retryable};
use prometheus::Registry;
use tokio_util::sync::CancellationToken;

use crate::config::CommonConfig;
use crate::directory::Directory;
use crate::metrics::CommonMetrics;
use crate::nats::{setup_topology, TopologyConfig};
use crate::ops::OpsState;
use crate::Error;

/// A started service's shared parts.
#[derive(Debug, Clone)]
pub struct Base {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub kv: kv::Store,
    pub directory: Directory,
    pub registry: Registry,
    pub common: CommonMetrics,
}

impl Base {
    pub async fn start(
        client: async_nats::Client,
        config: &CommonConfig,
        service: &str,
        cancel: &CancellationToken,
    ) -> Result<Self, Error> {
        let js = crate::nats::jetstream(client.clone());
        let topology = TopologyConfig::from(config);
        let setup = || setup_topology(&js, &topology);
        let kv = tokio::select! {
            result = setup
                .retry(
                    ExponentialBuilder::default()
                        .with_min_delay(Duration::from_millis(200))
                        .with_max_delay(Duration::from_secs(5))
                        .with_max_times(20),
                )
                .notify(|error, wait| {
                    tracing::warn!(%error, retry_in = ?wait, "JetStream topology not ready; retrying.");
                }) => result?,
            () = cancel.cancelled() => return Err(Error::Cancelled),
        };
        let registry = Registry::new();
        let common = CommonMetrics::register(&registry, service);
        let directory =
            Directory::with_gauges(common.instances.clone(), common.instances_revision.clone());
        directory.spawn_watch(kv.clone(), cancel.child_token());
        Ok(Self {
            client,
            js,
            kv,
            directory,
            registry,
            common,
        })
    }

    pub fn ops_state(&self) -> OpsState {
        OpsState {
            registry: self.registry.clone(),
            common: self.common.clone(),
            nats: self.client.clone(),
            directory: self.directory.clone(),
        }
    }
}
