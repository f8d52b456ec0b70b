//! The store cycles in flight: one task per store, watched, so that a cycle that fails for any
//! reason (an error, or a panic on some input nobody foresaw) frees its concurrency slot, is
//! shown on the store's status and runs again after a backoff that doubles while it keeps
//! failing. A cycle that panicked used to keep its slot and its store for ever, with the
//! store's status still saying `ok`.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::task::{Id, JoinSet};

use crate::poll::CycleEnd;

/// How a store's cycle ended.
#[derive(Debug)]
pub enum Ended {
    Done(CycleEnd),
    /// The task panicked (or was aborted): what it said.
    Crashed(String),
}

/// The running cycles, by store.
#[derive(Debug, Default)]
pub struct Cycles {
    tasks: JoinSet<CycleEnd>,
    stores: HashMap<Id, String>,
    /// Failed cycles in a row, by store.
    failures: HashMap<String, u32>,
}

impl Cycles {
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    pub fn len(&self) -> usize {
        self.stores.len()
    }

    pub fn is_running(&self, store: &str) -> bool {
        self.stores.values().any(|s| s == store)
    }

    pub fn spawn(&mut self, store: String, cycle: impl Future<Output = CycleEnd> + Send + 'static) {
        let id = self.tasks.spawn(cycle).id();
        self.stores.insert(id, store);
    }

    /// The next cycle to end (pending while none runs): its store, how it ended, and, when it
    /// failed, how long to wait before the store's next cycle.
    pub async fn next(&mut self) -> Option<(String, Ended, Option<Duration>)> {
        let (id, ended) = match self.tasks.join_next_with_id().await? {
            Ok((id, end)) => (id, Ended::Done(end)),
            Err(e) => (e.id(), Ended::Crashed(crash_message(e))),
        };
        let store = self.stores.remove(&id)?;
        let failed = match &ended {
            Ended::Done(end) => end.failed,
            Ended::Crashed(_) => true,
        };
        let wait = if failed {
            let n = self.failures.entry(store.clone()).or_default();
            *n = n.saturating_add(1);
            Some(backoff(*n))
        } else {
            self.failures.remove(&store);
            None
        };
        Some((store, ended, wait))
    }

    /// Waits for every cycle to end (after the cancellation they were given).
    pub async fn drain(&mut self) {
        while self.tasks.join_next().await.is_some() {}
        self.stores.clear();
    }
}

/// [`model::retry::POLL_FAILED_BACKOFF_MIN`] doubling per failure in a row, up to [`model::retry::POLL_FAILED_BACKOFF_MAX`].
pub fn backoff(failures: u32) -> Duration {
    model::retry::POLL_FAILED_BACKOFF_MIN
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(model::retry::POLL_FAILED_BACKOFF_MAX)
}

fn crash_message(e: tokio::task::JoinError) -> String {
    if e.is_cancelled() {
        return "the poll task was cancelled".into();
    }
    let payload = e.into_panic();
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into());
    format!("the poll task failed: {what}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_cycle_frees_its_store_and_backs_off() {
        let mut cycles = Cycles::default();
        for n in 0..3 {
            cycles.spawn("7".into(), async { panic!("cannot convert float seconds") });
            assert!(cycles.is_running("7"));
            let (store, ended, wait) = cycles.next().await.unwrap();
            assert_eq!(store, "7");
            assert!(
                matches!(&ended, Ended::Crashed(m) if m.contains("cannot convert float seconds")),
                "{ended:?}"
            );
            assert_eq!(wait, Some(model::retry::POLL_FAILED_BACKOFF_MIN * (1 << n)));
            assert!(!cycles.is_running("7") && cycles.is_empty());
        }
        // A good cycle resets the count.
        cycles.spawn("7".into(), async { CycleEnd::default() });
        assert!(cycles.next().await.unwrap().2.is_none());
        cycles.spawn("7".into(), async {
            CycleEnd {
                failed: true,
                ..CycleEnd::default()
            }
        });
        assert_eq!(
            cycles.next().await.unwrap().2,
            Some(model::retry::POLL_FAILED_BACKOFF_MIN)
        );
    }

    #[test]
    fn the_backoff_doubles_to_its_cap() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(40), model::retry::POLL_FAILED_BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX), model::retry::POLL_FAILED_BACKOFF_MAX);
    }
}
