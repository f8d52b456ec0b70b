//! OAuth2 access tokens (client credentials), cached per set of credentials and shared by every
//! worker of this replica: the first request fetches one, the ones that come meanwhile wait for
//! it, and all use it until shortly before it expires ([`model::receiver::token_lifetime`]). A
//! receiver's 401 makes the deliverer [`Tokens::forget`] the token and fetch a new one, once.
//! Tokens are never logged, and the cache is keyed by a digest, never by the secret itself.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use model::instance::OAuth2;
use sha2::{Digest, Sha256};

/// Credentials kept at most; emptied past that.
const MAX_CREDENTIALS: usize = 4096;

struct Cached {
    token: String,
    until: Instant,
}

type Slot = Arc<tokio::sync::Mutex<Option<Cached>>>;

/// The token cache.
pub(crate) struct Tokens {
    slots: Mutex<HashMap<[u8; 32], Slot>>,
    /// `ecwid_deliver_oauth2_token_requests_total` by `outcome` (ok, error).
    requests: Option<prometheus::IntCounterVec>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").finish_non_exhaustive()
    }
}

impl Default for Tokens {
    fn default() -> Self {
        Self::new(None)
    }
}

impl Tokens {
    pub(crate) fn new(requests: Option<prometheus::IntCounterVec>) -> Self {
        Self {
            slots: Mutex::default(),
            requests,
        }
    }

    fn slot(&self, credentials: &OAuth2<'_>) -> Slot {
        let mut h = Sha256::new();
        for part in [
            Some(credentials.token_url),
            Some(credentials.client_id),
            Some(credentials.client_secret),
            credentials.scope,
            credentials.audience,
        ] {
            let part = part.unwrap_or("");
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        let key: [u8; 32] = h.finalize().into();
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if slots.len() >= MAX_CREDENTIALS && !slots.contains_key(&key) {
            slots.clear();
        }
        Arc::clone(slots.entry(key).or_default())
    }

    /// The cached token for `credentials`, or one `fetch` gets (and the time it may be used).
    pub(crate) async fn get<F, Fut>(
        &self,
        credentials: &OAuth2<'_>,
        fetch: F,
    ) -> Result<String, String>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(String, Duration), String>>,
    {
        let slot = self.slot(credentials);
        let mut cached = slot.lock().await;
        if let Some(c) = cached.as_ref().filter(|c| c.until > Instant::now()) {
            return Ok(c.token.clone());
        }
        let fetched = fetch().await;
        if let Some(requests) = &self.requests {
            let outcome = if fetched.is_ok() { "ok" } else { "error" };
            requests.with_label_values(&[outcome]).inc();
        }
        let (token, lifetime) = fetched?;
        *cached = Some(Cached {
            token: token.clone(),
            until: Instant::now() + lifetime,
        });
        Ok(token)
    }

    /// Drops `token` from the cache (a receiver refused it), unless another worker already
    /// replaced it.
    pub(crate) async fn forget(&self, credentials: &OAuth2<'_>, token: &str) {
        let slot = self.slot(credentials);
        let mut cached = slot.lock().await;
        if cached.as_ref().is_some_and(|c| c.token == token) {
            *cached = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn credentials(secret: &str) -> OAuth2<'_> {
        OAuth2 {
            token_url: "https://idp.example/token",
            client_id: "c",
            client_secret: secret,
            scope: None,
            audience: None,
        }
    }

    #[tokio::test]
    async fn one_fetch_serves_every_worker_until_it_is_forgotten() {
        let tokens = Arc::new(Tokens::default());
        let fetches = Arc::new(AtomicUsize::new(0));
        let fetch = |fetches: Arc<AtomicUsize>| async move {
            let n = fetches.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            Ok((format!("t{n}"), Duration::from_secs(3600)))
        };
        let got = futures::future::join_all((0..8).map(|_| {
            let tokens = Arc::clone(&tokens);
            let fetches = Arc::clone(&fetches);
            async move { tokens.get(&credentials("s"), || fetch(fetches)).await }
        }))
        .await;
        assert!(got.iter().all(|t| t.as_deref() == Ok("t0")), "{got:?}");
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        // Another secret is another cache entry.
        let other = tokens
            .get(&credentials("s2"), || fetch(Arc::clone(&fetches)))
            .await;
        assert_eq!(other.as_deref(), Ok("t1"));
        // A stale forget (the token was replaced) changes nothing; the current one goes.
        tokens.forget(&credentials("s"), "t-old").await;
        let same = tokens
            .get(&credentials("s"), || fetch(Arc::clone(&fetches)))
            .await;
        assert_eq!(same.as_deref(), Ok("t0"));
        tokens.forget(&credentials("s"), "t0").await;
        let fresh = tokens
            .get(&credentials("s"), || fetch(Arc::clone(&fetches)))
            .await;
        assert_eq!(fresh.as_deref(), Ok("t2"));
    }

    #[tokio::test]
    async fn a_failed_fetch_is_not_cached_and_an_expired_token_is_refetched() {
        let tokens = Tokens::default();
        let err = tokens
            .get(&credentials("s"), || async {
                Err("token endpoint answered 500".to_owned())
            })
            .await;
        assert_eq!(err, Err("token endpoint answered 500".to_owned()));
        let t = tokens
            .get(&credentials("s"), || async {
                Ok(("a".to_owned(), Duration::ZERO))
            })
            .await;
        assert_eq!(t.as_deref(), Ok("a"));
        let t = tokens
            .get(&credentials("s"), || async {
                Ok(("b".to_owned(), Duration::from_secs(60)))
            })
            .await;
        assert_eq!(
            t.as_deref(),
            Ok("b"),
            "a token whose time is up is not used"
        );
    }
}
