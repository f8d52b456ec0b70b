//! The live view of the instances bucket.
//!
//! Every service keeps the instances in memory, indexed by id and by store id, and follows the
//! bucket with a KV watch: a change reaches every replica within a second and no event pays a
//! lookup. When the watch breaks (NATS restarted), the view is loaded again and watched anew.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv;
use prometheus::IntGauge;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use model::instance::Instance;

#[derive(Debug, Default)]
struct Snapshot {
    by_id: HashMap<String, Arc<Instance>>,
    by_store: HashMap<String, Vec<Arc<Instance>>>,
}

impl Snapshot {
    fn remove(&mut self, id: &str) {
        let Some(old) = self.by_id.remove(id) else {
            return;
        };
        if let Some(store) = old.store_id() {
            if let Some(list) = self.by_store.get_mut(store) {
                list.retain(|i| i.id != id);
                if list.is_empty() {
                    self.by_store.remove(store);
                }
            }
        }
    }

    fn put(&mut self, instance: Instance) {
        self.remove(&instance.id);
        let instance = Arc::new(instance);
        if let Some(store) = instance.store_id() {
            self.by_store
                .entry(store.to_owned())
                .or_default()
                .push(Arc::clone(&instance));
        }
        self.by_id.insert(instance.id.clone(), instance);
    }
}

/// Instances by id and by store; cheap to clone, shared by every task of a service.
#[derive(Debug, Clone)]
pub struct Directory {
    inner: Arc<RwLock<Snapshot>>,
    /// Whether the first load completed. A watch channel rather than a flag: a waiter sees the
    /// value when it subscribes and is woken by the change, so no wake-up is lost between a check
    /// and the wait.
    loaded: Arc<watch::Sender<bool>>,
    revision_gauge: Option<IntGauge>,
    /// Counts the changes applied, so a task that follows the instances (the deliverer's
    /// ordered lanes) wakes on a change instead of polling.
    changes: Arc<watch::Sender<u64>>,
}

impl Default for Directory {
    fn default() -> Self {
        Self {
            inner: Arc::default(),
            loaded: Arc::new(watch::Sender::new(false)),
            revision_gauge: None,
            changes: Arc::new(watch::Sender::new(0)),
        }
    }
}

impl Directory {
    /// A directory that reports the newest bucket revision it
    /// applied (`ecwid_instances_revision`).
    pub fn with_revision_gauge(revision: IntGauge) -> Self {
        Self {
            revision_gauge: Some(revision),
            ..Self::default()
        }
    }

    /// The instances of `store_id` (any state).
    pub fn for_store(&self, store_id: &str) -> Vec<Arc<Instance>> {
        self.read(|s| s.by_store.get(store_id).cloned().unwrap_or_default())
    }

    /// Every instance (any state): the poller's list of stores to poll.
    pub fn all(&self) -> Vec<Arc<Instance>> {
        self.read(|s| s.by_id.values().cloned().collect())
    }

    pub fn get(&self, id: &str) -> Option<Arc<Instance>> {
        self.read(|s| s.by_id.get(id).cloned())
    }

    pub fn len(&self) -> usize {
        self.read(|s| s.by_id.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A receiver that is marked changed whenever the instances change (the first load included).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Whether the first load from the bucket has completed.
    pub fn is_loaded(&self) -> bool {
        *self.loaded.borrow()
    }

    /// Waits until the first load completed, or `timeout` passed. Returns whether it loaded.
    pub async fn wait_loaded(&self, timeout: Duration) -> bool {
        let mut loaded = self.loaded.subscribe();
        // `wait_for` looks at the current value first; the sender lives in `self`, so the channel
        // cannot close while we wait.
        let woken = tokio::time::timeout(timeout, async {
            loaded.wait_for(|loaded| *loaded).await.is_ok()
        })
        .await;
        woken.unwrap_or(false)
    }

    /// Waits until the first load completed (warning every 5 s while it has not); `false` when
    /// `cancel` fired first. Workers call it before pulling: a message handled earlier would
    /// find its store unknown and be dead-lettered.
    pub async fn loaded(&self, cancel: &CancellationToken) -> bool {
        let wait = async {
            while !self.wait_loaded(Duration::from_secs(5)).await {
                tracing::warn!("Instances not loaded yet; waiting before consuming.");
            }
        };
        tokio::select! {
            () = cancel.cancelled() => false,
            () = wait => true,
        }
    }

    fn read<T>(&self, f: impl FnOnce(&Snapshot) -> T) -> T {
        let guard = self
            .inner
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&guard)
    }

    fn write(&self, revision: u64, f: impl FnOnce(&mut Snapshot)) {
        let mut guard = self
            .inner
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut guard);
        if let Some(rev) = &self.revision_gauge {
            rev.set(rev.get().max(i64::try_from(revision).unwrap_or(i64::MAX)));
        }
        drop(guard);
        self.changes.send_modify(|n| *n += 1);
    }

    /// Applies one bucket entry (put, delete or purge).
    pub fn apply(&self, entry: &kv::Entry) {
        match entry.operation {
            kv::Operation::Put => match serde_json::from_slice::<Instance>(&entry.value) {
                Ok(mut instance) => {
                    instance.id.clone_from(&entry.key);
                    self.write(entry.revision, |s| s.put(instance));
                }
                Err(error) => {
                    tracing::warn!(%error, key = %entry.key, "Instance in the bucket is not valid JSON; ignored.");
                }
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                self.write(entry.revision, |s| s.remove(&entry.key))
            }
        }
    }

    /// Loads the bucket, then follows it until `cancel` fires; reloads after any watch failure.
    pub fn spawn_watch(
        &self,
        store: kv::Store,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        crate::kvwatch::spawn_follow(self.clone(), store, cancel)
    }
}

impl crate::kvwatch::Follow for Directory {
    fn load(&self, entries: Vec<kv::Entry>) {
        let mut snapshot = Snapshot::default();
        let mut last_revision = 0;
        for entry in entries {
            last_revision = last_revision.max(entry.revision);
            if entry.operation == kv::Operation::Put {
                if let Ok(mut instance) = serde_json::from_slice::<Instance>(&entry.value) {
                    instance.id = entry.key;
                    snapshot.put(instance);
                }
            }
        }
        self.write(last_revision, |s| *s = snapshot);
        // `send_replace`, not `send`: it stores the value even when nobody is waiting yet.
        self.loaded.send_replace(true);
        tracing::debug!(instances = self.len(), "Instances loaded.");
    }

    fn apply(&self, entry: &kv::Entry) {
        Directory::apply(self, entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark_loaded(directory: &Directory) {
        directory.loaded.send_replace(true);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_loaded_gives_up_at_its_timeout() {
        let directory = Directory::default();
        let started = tokio::time::Instant::now();
        assert!(!directory.wait_loaded(Duration::from_secs(5)).await);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert!(!directory.is_loaded());
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_is_woken_by_the_load_when_it_happens() {
        let directory = Directory::default();
        let waiter = tokio::spawn({
            let directory = directory.clone();
            async move {
                let started = tokio::time::Instant::now();
                let loaded = directory.wait_loaded(Duration::from_secs(60)).await;
                (loaded, started.elapsed())
            }
        });
        tokio::time::sleep(Duration::from_secs(3)).await;
        mark_loaded(&directory);
        let (loaded, waited) = waiter.await.expect("the waiter ends");
        assert!(loaded);
        // Woken by the change itself, not by a poll or the timeout.
        assert_eq!(waited, Duration::from_secs(3));
        assert!(directory.is_loaded());
        // Once loaded, it stays loaded, for later waiters too.
        assert!(directory.wait_loaded(Duration::ZERO).await);
    }

    #[tokio::test(start_paused = true)]
    async fn loaded_waits_past_the_warnings_and_stops_on_cancel() {
        let directory = Directory::default();
        let cancel = CancellationToken::new();
        let waiter = tokio::spawn({
            let (directory, cancel) = (directory.clone(), cancel.clone());
            async move { directory.loaded(&cancel).await }
        });
        // Past two 5 s warnings, still waiting.
        tokio::time::sleep(Duration::from_secs(12)).await;
        assert!(!waiter.is_finished());
        mark_loaded(&directory);
        assert!(waiter.await.expect("the waiter ends"));

        let never = Directory::default();
        cancel.cancel();
        assert!(!never.loaded(&cancel).await, "cancelled before the load");
    }
}
