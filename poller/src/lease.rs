//! Which replica polls which store: a lease per store in `ECWID_POLL_LEASES`
//! (`lease.<storeId>` → owner and expiry), taken with `create` and renewed or taken over with
//! `update` at the revision read, so two replicas can never both believe they hold it. Replicas
//! announce themselves (`replica.<id>` → expiry); every store has one preferred replica among
//! the live ones (rendezvous hashing), which is how N replicas share the stores: a replica takes
//! a store that is free or whose lease expired, and hands a store it holds to the preferred
//! replica once that one is alive. A replica that dies stops renewing: its stores are taken
//! over once their leases expire, within one lease period (plus one renewal tick).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Serialize, Deserialize)]
struct Lease {
    owner: String,
    /// Unix ms.
    expires: i64,
}

pub fn lease_key(store_id: &str) -> String {
    format!("lease.{store_id}")
}

fn replica_key(id: &str) -> String {
    format!("replica.{id}")
}

/// The rendezvous score of (`replica`, `store`): the highest live score prefers the store.
fn score(replica: &str, store_id: &str) -> u64 {
    let d = Sha256::digest(format!("{replica}/{store_id}").as_bytes());
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// Which of `replicas` prefers `store_id`. Pure.
pub fn preferred<'a>(replicas: &'a [String], store_id: &str) -> Option<&'a str> {
    replicas
        .iter()
        .max_by_key(|r| score(r, store_id))
        .map(String::as_str)
}

#[derive(Debug)]
pub struct Leases {
    kv: kv::Store,
    me: String,
    ttl: Duration,
    /// Stores held, with the lease's revision and expiry (Unix ms).
    held: HashMap<String, (u64, i64)>,
}

impl Leases {
    pub fn new(kv: kv::Store, me: String, ttl: Duration) -> Self {
        Self {
            kv,
            me,
            ttl,
            held: HashMap::new(),
        }
    }

    /// Whether this replica holds `store_id`'s lease now (by its own clock).
    pub fn holds(&self, store_id: &str) -> bool {
        self.held
            .get(store_id)
            .is_some_and(|(_, exp)| *exp > model::time_fmt::now_unix_ms())
    }

    pub fn held(&self) -> impl Iterator<Item = &String> {
        self.held.keys()
    }

    fn value(&self) -> bytes::Bytes {
        let lease = Lease {
            owner: self.me.clone(),
            expires: model::time_fmt::now_unix_ms() + self.ttl.as_millis() as i64,
        };
        serde_json::to_vec(&lease).unwrap_or_default().into()
    }

    /// Announces this replica, reads who else is alive, then takes, renews and hands over store
    /// leases so that this replica holds what it should of `stores`. Errors of single keys are
    /// logged; a store whose lease could not be renewed is dropped from what this replica holds.
    pub async fn rebalance(&mut self, stores: &HashSet<String>) {
        let now = model::time_fmt::now_unix_ms();
        if let Err(error) = self.kv.put(replica_key(&self.me), self.value()).await {
            tracing::warn!(%error, "Could not announce this poller replica.");
        }
        let live = self.live_replicas(now).await;
        let wanted: Vec<String> = stores.iter().cloned().collect();
        for store in wanted {
            let mine = preferred(&live, &store) == Some(self.me.as_str());
            let key = lease_key(&store);
            let entry = match self.kv.entry(&key).await {
                Ok(e) => e,
                Err(error) => {
                    tracing::warn!(%error, store_id = store, "Cannot read a lease.");
                    self.held.remove(&store);
                    continue;
                }
            };
            let current = entry.as_ref().filter(|e| e.operation == kv::Operation::Put);
            let lease = current.and_then(|e| serde_json::from_slice::<Lease>(&e.value).ok());
            let result = match (current, lease) {
                (None, _) => self
                    .kv
                    .create(&key, self.value())
                    .await
                    .map_err(|e| e.to_string()),
                (Some(e), Some(l)) if l.owner == self.me => {
                    if !mine && live.len() > 1 {
                        // The preferred replica is alive: hand the store over.
                        let _ = self.kv.delete_expect_revision(&key, Some(e.revision)).await;
                        self.held.remove(&store);
                        tracing::info!(
                            store_id = store,
                            "Store handed over to its preferred replica."
                        );
                        continue;
                    }
                    self.kv
                        .update(&key, self.value(), e.revision)
                        .await
                        .map_err(|e| e.to_string())
                }
                (Some(e), l) if l.as_ref().is_none_or(|l| l.expires <= now) => self
                    .kv
                    .update(&key, self.value(), e.revision)
                    .await
                    .map_err(|e| e.to_string()),
                _ => {
                    self.held.remove(&store);
                    continue;
                }
            };
            match result {
                Ok(revision) => {
                    let expires = model::time_fmt::now_unix_ms() + self.ttl.as_millis() as i64;
                    if self
                        .held
                        .insert(store.clone(), (revision, expires))
                        .is_none()
                    {
                        tracing::info!(store_id = store, "Lease taken; polling this store.");
                    }
                }
                Err(error) => {
                    tracing::debug!(%error, store_id = store, "Lease not taken.");
                    self.held.remove(&store);
                }
            }
        }
        // Stores nobody polls any more.
        let gone: Vec<String> = self
            .held
            .keys()
            .filter(|s| !stores.contains(*s))
            .cloned()
            .collect();
        for store in gone {
            self.release_one(&store).await;
        }
    }

    async fn live_replicas(&self, now: i64) -> Vec<String> {
        let mut live = vec![self.me.clone()];
        let Ok(keys) = self.kv.keys().await else {
            return live;
        };
        let keys: Vec<String> = keys.filter_map(|k| async move { k.ok() }).collect().await;
        for key in keys {
            let Some(id) = key.strip_prefix("replica.") else {
                continue;
            };
            if id == self.me {
                continue;
            }
            if let Ok(Some(value)) = self.kv.get(&key).await {
                match serde_json::from_slice::<Lease>(&value) {
                    Ok(l) if l.expires > now => live.push(id.to_owned()),
                    // Gone without saying goodbye (SIGKILL): forget it.
                    _ => {
                        let _ = self.kv.purge(&key).await;
                    }
                }
            }
        }
        live
    }

    async fn release_one(&mut self, store: &str) {
        if let Some((revision, _)) = self.held.remove(store) {
            let _ = self
                .kv
                .delete_expect_revision(lease_key(store), Some(revision))
                .await;
        }
    }

    /// On shutdown: gives every lease back and withdraws this replica, so the others take over
    /// at once instead of after a lease period.
    pub async fn release_all(&mut self) {
        let stores: Vec<String> = self.held.keys().cloned().collect();
        for store in stores {
            self.release_one(&store).await;
        }
        let _ = self.kv.purge(replica_key(&self.me)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_store_has_one_preferred_replica_and_they_share() {
        let replicas: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for store in 0..300 {
            let p = preferred(&replicas, &store.to_string()).unwrap();
            assert_eq!(preferred(&replicas, &store.to_string()), Some(p));
            *counts.entry(p).or_default() += 1;
        }
        assert_eq!(counts.len(), 3);
        assert!(counts.values().all(|n| *n > 60), "{counts:?}");
        // A replica leaving moves only its own stores.
        let two: Vec<String> = ["a", "b"].map(String::from).to_vec();
        for store in 0..300 {
            let s = store.to_string();
            let before = preferred(&replicas, &s).unwrap();
            if before != "c" {
                assert_eq!(preferred(&two, &s), Some(before));
            }
        }
    }
}
