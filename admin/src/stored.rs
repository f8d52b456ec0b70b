//! The instances bucket as the admin API reads it: an instance by id with its revision, or a
//! 404 that says which.

use async_nats::jetstream::kv;
use model::instance::Instance;

use shared::http::{self as error, ApiError};

/// The longest instance id looked up; a longer one cannot exist (ids are UUIDs).
const MAX_ID_LEN: usize = 128;

/// How an instances bucket call that failed is logged.
const WHAT: &str = "An instances bucket operation";

/// An instances bucket call within the admin API's JetStream timeout (503 otherwise).
pub(crate) async fn within<T, E: std::fmt::Display>(
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, ApiError> {
    error::within(WHAT, f).await
}

/// An instances bucket call that failed, as a 503 (logged with its cause).
pub(crate) fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::unavailable(WHAT, e)
}

pub(crate) fn not_found(id: &str) -> ApiError {
    let shown: String = id.chars().take(MAX_ID_LEN).collect();
    ApiError::NotFound {
        code: "not_found",
        message: format!("no instance {shown}"),
    }
}

pub(crate) async fn load(store: &kv::Store, id: &str) -> Result<Option<(Instance, u64)>, ApiError> {
    if !is_valid_key(id) {
        return Ok(None);
    }
    let entry = within(store.entry(id)).await?;
    Ok(entry.and_then(|e| {
        if e.operation != kv::Operation::Put {
            return None;
        }
        let mut instance: Instance = serde_json::from_slice(&e.value).ok()?;
        instance.id = id.to_owned();
        Some((instance, e.revision))
    }))
}

/// The instance `id` and its revision, or 404.
pub(crate) async fn existing(store: &kv::Store, id: &str) -> Result<(Instance, u64), ApiError> {
    load(store, id).await?.ok_or_else(|| not_found(id))
}

/// Keys the bucket can hold (`[-/_=.a-zA-Z0-9]`, not starting or ending with a dot), no longer
/// than an id can be.
fn is_valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_ID_LEN
        && !key.starts_with('.')
        && !key.ends_with('.')
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'/' | b'_' | b'=' | b'.'))
}

/// The ids of every stored instance.
pub(crate) async fn ids(store: &kv::Store) -> Result<Vec<String>, ApiError> {
    use futures::StreamExt as _;
    Ok(within(store.keys())
        .await?
        .filter_map(|k| async move { k.ok() })
        .collect()
        .await)
}
