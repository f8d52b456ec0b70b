//! The SSRF guard at connect time: a name is resolved here and only the addresses the guard
//! allows are handed on (to reqwest's connector, or to a [`crate::route`]'s), so a name that
//! resolves to an internal address is refused however the request goes.

use std::net::SocketAddr;

use model::netguard::{self, AllowList};

/// Boxed errors, as hyper's and reqwest's connectors take them.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An address the guard refused, and why.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct RefusedAddress(pub(crate) String);

/// The addresses `host` resolves to that the SSRF guard allows; [`RefusedAddress`] when it
/// allows none. Literal addresses are judged the same way.
pub(crate) async fn guarded_lookup(
    host: &str,
    port: u16,
    allow: &AllowList,
) -> Result<Vec<SocketAddr>, BoxError> {
    let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    let mut refusal = None;
    let allowed: Vec<SocketAddr> = resolved
        .into_iter()
        .filter(|a| match netguard::check(a.ip(), allow) {
            Ok(()) => true,
            Err(why) => {
                refusal = Some(why);
                false
            }
        })
        .collect();
    if allowed.is_empty() {
        let why = refusal.unwrap_or_else(|| format!("{host} did not resolve"));
        return Err(Box::new(RefusedAddress(format!("{host}: {why}"))));
    }
    Ok(allowed)
}
