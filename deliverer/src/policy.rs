//! The limit of requests in flight per callback host (each replica's own). When to try again
//! (the schedule, jitter, `Retry-After`) is `model::retry`; the circuit breaker every replica
//! shares is [`crate::health`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// At most `per_host` requests in flight to one host.
#[derive(Debug)]
pub struct HostLimits {
    per_host: usize,
    hosts: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl HostLimits {
    pub fn new(per_host: usize) -> Self {
        Self {
            per_host,
            hosts: Mutex::new(HashMap::new()),
        }
    }

    /// A slot for `host`, waiting at most [`model::retry::HOST_SLOT_WAIT`].
    pub async fn acquire(&self, host: &str) -> Option<OwnedSemaphorePermit> {
        let semaphore = {
            let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(
                hosts
                    .entry(host.to_owned())
                    .or_insert_with(|| Arc::new(Semaphore::new(self.per_host))),
            )
        };
        tokio::time::timeout(model::retry::HOST_SLOT_WAIT, semaphore.acquire_owned())
            .await
            .ok()
            .and_then(Result::ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn host_limits_bound_each_host() {
        let limits = HostLimits::new(1);
        let first = limits.acquire("a").await;
        assert!(first.is_some());
        assert!(limits.acquire("b").await.is_some());
        tokio::time::pause();
        assert!(
            limits.acquire("a").await.is_none(),
            "second slot for a times out"
        );
        drop(first);
        assert!(limits.acquire("a").await.is_some());
    }
}
