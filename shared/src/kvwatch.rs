//! A live in-memory copy of a small KV bucket whose values are JSON: loaded once, then followed
//! with a watch, reloaded after the watch breaks (NATS restarted). Reads are a map lookup.
//!
//! Used for the instance states and the callback health ([`crate::control`]); every replica sees
//! a change within a second, and a replica's own compare-and-set writes land in its copy at once
//! ([`KvView::note`]).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

type Hook<T> = Arc<dyn Fn(&str, Option<&T>, Option<&T>) + Send + Sync>;

/// Values by key with their revisions.
pub struct KvView<T> {
    inner: Arc<RwLock<HashMap<String, (T, u64)>>>,
    /// Called with (key, old value, new value) on every change the watch or [`KvView::note`]
    /// brings.
    hook: Option<Hook<T>>,
}

impl<T> Clone for KvView<T> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            hook: self.hook.clone(),
        }
    }
}

impl<T> std::fmt::Debug for KvView<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvView").finish_non_exhaustive()
    }
}

impl<T> Default for KvView<T> {
    fn default() -> Self {
        Self {
            inner: Arc::default(),
            hook: None,
        }
    }
}

impl<T: DeserializeOwned + Clone + Send + Sync + 'static> KvView<T> {
    /// A view that calls `hook(key, old, new)` on each change.
    pub fn with_hook(hook: impl Fn(&str, Option<&T>, Option<&T>) + Send + Sync + 'static) -> Self {
        Self {
            inner: Arc::default(),
            hook: Some(Arc::new(hook)),
        }
    }

    pub fn get(&self, key: &str) -> Option<(T, u64)> {
        self.read(|m| m.get(key).cloned())
    }

    /// Every value, for gauges and sweeps.
    pub fn values(&self) -> Vec<(String, T)> {
        self.read(|m| m.iter().map(|(k, (v, _))| (k.clone(), v.clone())).collect())
    }

    fn read<R>(&self, f: impl FnOnce(&HashMap<String, (T, u64)>) -> R) -> R {
        f(&self.inner.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// A value this replica wrote at `revision` (or that the watch brought): kept unless the
    /// copy already holds a newer one. `None` removes the key.
    pub fn note(&self, key: &str, value: Option<T>, revision: u64) {
        let old = {
            let mut map = self.inner.write().unwrap_or_else(|p| p.into_inner());
            if map.get(key).is_some_and(|(_, r)| *r > revision) {
                return;
            }
            match value.clone() {
                Some(v) => map.insert(key.to_owned(), (v, revision)),
                None => map.remove(key),
            }
        };
        if let Some(hook) = &self.hook {
            hook(key, old.as_ref().map(|(v, _)| v), value.as_ref());
        }
    }

    fn apply(&self, entry: &kv::Entry) {
        let value = match entry.operation {
            kv::Operation::Put => match serde_json::from_slice::<T>(&entry.value) {
                Ok(v) => Some(v),
                Err(error) => {
                    tracing::warn!(%error, key = %entry.key, bucket = %entry.bucket, "A value in the bucket is not what this version reads; ignored.");
                    return;
                }
            },
            kv::Operation::Delete | kv::Operation::Purge => None,
        };
        self.note(&entry.key, value, entry.revision);
    }

    /// Loads the bucket, then follows it until `cancel` fires; reloads after any watch failure.
    pub fn spawn_follow(
        &self,
        store: kv::Store,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        spawn_follow(self.clone(), store, cancel)
    }
}

impl<T: DeserializeOwned + Clone + Send + Sync + 'static> Follow for KvView<T> {
    fn load(&self, entries: Vec<kv::Entry>) {
        let seen: Vec<String> = entries.iter().map(|e| e.key.clone()).collect();
        for entry in &entries {
            self.apply(entry);
        }
        // Keys deleted while the watch was down.
        let gone: Vec<String> =
            self.read(|m| m.keys().filter(|k| !seen.contains(k)).cloned().collect());
        for key in gone {
            self.note(&key, None, u64::MAX);
        }
    }

    fn apply(&self, entry: &kv::Entry) {
        KvView::apply(self, entry);
    }
}

/// What follows a bucket: given everything it holds, then each change.
pub trait Follow: Clone + Send + Sync + 'static {
    /// Every key's current entry (deletions included), replacing what was known.
    fn load(&self, entries: Vec<kv::Entry>);
    /// One change, in revision order.
    fn apply(&self, entry: &kv::Entry);
}

/// Loads `store` into `follower`, then follows it with a watch until `cancel` fires; loads it
/// again after any watch failure (NATS restarted), waiting 100 ms doubling to 5 s between tries.
pub fn spawn_follow<F: Follow>(
    follower: F,
    store: kv::Store,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut wait = Duration::from_millis(100);
        loop {
            match load_and_follow(&follower, &store, &cancel).await {
                Ok(()) => return,
                Err(error) => {
                    let bucket = store.name.as_str();
                    tracing::warn!(%error, bucket, retry_in = ?wait, "Watching a bucket failed; reloading.");
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

async fn load_and_follow<F: Follow>(
    follower: &F,
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
    let mut last_revision = 0;
    let mut entries = Vec::with_capacity(keys.len());
    for key in keys {
        if let Some(entry) = store.entry(&key).await.map_err(|e| e.to_string())? {
            last_revision = last_revision.max(entry.revision);
            entries.push(entry);
        }
    }
    // Changes made while we listed are replayed by the watch, which starts after the newest
    // revision we saw.
    let mut watch = store
        .watch_all_from_revision(last_revision + 1)
        .await
        .map_err(|e| e.to_string())?;
    follower.load(entries);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            next = watch.next() => match next {
                None => return Err("the watch ended".into()),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(entry)) => follower.apply(&entry),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn an_older_revision_never_replaces_a_newer_one() {
        let changes = Arc::new(AtomicUsize::new(0));
        let view = KvView::<u32>::with_hook({
            let changes = Arc::clone(&changes);
            move |_, _, _| {
                changes.fetch_add(1, Ordering::SeqCst);
            }
        });
        view.note("a", Some(1), 5);
        view.note("a", Some(0), 4);
        assert_eq!(view.get("a"), Some((1, 5)));
        view.note("a", Some(2), 6);
        assert_eq!(view.get("a"), Some((2, 6)));
        view.note("a", None, 7);
        assert_eq!(view.get("a"), None);
        assert_eq!(
            changes.load(Ordering::SeqCst),
            3,
            "the stale write is no change"
        );
    }
}
