//! The live view of the instances bucket.
//!
//! Every service keeps the instances in memory, indexed by id and by store id, and follows the
//! bucket with a KV watch: a change reaches every replica within a second and no event pays a
//! lookup. When the watch breaks (NATS restarted), the view is loaded again and watched anew.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;
use prometheus::IntGauge;
use tokio_util::sync::CancellationToken;

use crate::instance::Instance;

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
#[derive(Debug, Clone, Default)]
pub struct Directory {
    inner: Arc<RwLock<Snapshot>>,
    loaded: Arc<AtomicBool>,
    gauges: Option<(IntGauge, IntGauge)>,
}

impl Directory {
    /// A directory that reports its size (`ecwid_instances`) and the newest bucket revision it
    /// applied (`ecwid_instances_revision`).
    pub fn with_gauges(size: IntGauge, revision: IntGauge) -> Self {
        Self {
            gauges: Some((size, revision)),
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

    /// Whether the first load from the bucket has completed.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Waits until the first load completed, or `timeout` passed. Returns whether it loaded.
    pub async fn wait_loaded(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.is_loaded() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
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
        if let Some((size, rev)) = &self.gauges {
            size.set(guard.by_id.len() as i64);
            rev.set(rev.get().max(i64::try_from(revision).unwrap_or(i64::MAX)));
        }
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
        let directory = self.clone();
        tokio::spawn(async move {
            let mut wait = Duration::from_millis(100);
            loop {
                match directory.load_and_follow(&store, &cancel).await {
                    Ok(()) => return,
                    Err(error) => {
                        tracing::warn!(%error, retry_in = ?wait, "Watching the instances bucket failed; reloading.");
                    }
                }
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        })
    }

    async fn load_and_follow(
        &self,
        store: &kv::Store,
        cancel: &CancellationToken,
    ) -> Result<(), String> {
        let keys: Vec<String> = store
            .keys()
            .await
            .map_err(|e| e.to_string())?
            .filter_map(|k| async move { k.ok() })
            .collect()
            .await;
        let mut snapshot = Snapshot::default();
        let mut last_revision = 0;
        for key in keys {
            if let Some(entry) = store.entry(&key).await.map_err(|e| e.to_string())? {
                last_revision = last_revision.max(entry.revision);
                if entry.operation == kv::Operation::Put {
                    if let Ok(mut instance) = serde_json::from_slice::<Instance>(&entry.value) {
                        instance.id = key;
                        snapshot.put(instance);
                    }
                }
            }
        }
        // Changes made while we listed are replayed by the watch, which starts after the newest
        // revision we saw.
        let mut watch = store
            .watch_all_from_revision(last_revision + 1)
            .await
            .map_err(|e| e.to_string())?;
        self.write(last_revision, |s| *s = snapshot);
        self.loaded.store(true, Ordering::Release);
        tracing::debug!(instances = self.len(), "Instances loaded.");
        loop {
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                next = watch.next() => match next {
                    None => return Err("the watch ended".into()),
                    Some(Err(e)) => return Err(e.to_string()),
                    Some(Ok(entry)) => self.apply(&entry),
                },
            }
        }
    }
}
