//! One delivery attempt: sign the envelope and POST it. No redirects are followed; callback
//! addresses are checked against the SSRF guard after DNS resolution, at connect time.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use sha2::Sha256;
use shared::netguard::{self, AllowList};

use crate::policy::parse_retry_after;

pub const USER_AGENT: &str = concat!("ecwid-events/", env!("CARGO_PKG_VERSION"));

fn hmac_b64(key: &[u8], parts: &[&[u8]]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    for p in parts {
        mac.update(p);
    }
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Open Connectors' `Elements-Webhook-Signature`: `sha256=<base64 HMAC-SHA256(key, body)>`.
pub fn elements_signature(key: &str, body: &[u8]) -> String {
    format!("sha256={}", hmac_b64(key.as_bytes(), &[body]))
}

/// Standard Webhooks' `webhook-signature`: `v1,<base64 HMAC-SHA256(secret, "{id}.{ts}.{body}")>`
/// for each secret, space-separated (several while a secret is rotated).
pub fn standard_signature(secrets: &[Vec<u8>], id: &str, timestamp: i64, body: &[u8]) -> String {
    let ts = timestamp.to_string();
    secrets
        .iter()
        .map(|s| {
            format!(
                "v1,{}",
                hmac_b64(s, &[id.as_bytes(), b".", ts.as_bytes(), b".", body])
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// How an attempt went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// 2xx.
    Delivered { status: u16 },
    /// 410: the receiver says the endpoint is gone; no retry.
    Gone,
    /// The address is refused by the SSRF guard; no retry.
    Refused(String),
    /// Anything else: retried.
    Failed {
        status: Option<u16>,
        class: &'static str,
        error: String,
        retry_after: Option<Duration>,
    },
}

impl Attempt {
    /// The `status_class` label.
    pub fn class(&self) -> &'static str {
        match self {
            Attempt::Delivered { .. } => "2xx",
            Attempt::Gone => "4xx",
            Attempt::Refused(_) => "refused",
            Attempt::Failed { class, .. } => class,
        }
    }
}

/// The SSRF guard as a DNS resolver: only allowed addresses are handed to the connector.
#[derive(Debug)]
struct GuardedResolver {
    allow: AllowList,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct RefusedAddress(String);

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow = self.allow.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refusal = None;
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|a| match netguard::check(a.ip(), &allow) {
                    Ok(()) => true,
                    Err(why) => {
                        refusal = Some(why);
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                let why = refusal.unwrap_or_else(|| format!("{host} did not resolve"));
                return Err(Box::new(RefusedAddress(format!("{host}: {why}"))) as _);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// Sends envelopes.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    http: reqwest::Client,
    allow: AllowList,
}

impl Dispatcher {
    pub fn new(
        connect_timeout: Duration,
        timeout: Duration,
        allow: AllowList,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(connect_timeout)
            .timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(32)
            .tcp_nodelay(true)
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver {
                allow: allow.clone(),
            }))
            .build()?;
        Ok(Self { http, allow })
    }

    /// POSTs `body` to `url` with `headers`.
    pub async fn post(
        &self,
        url: &reqwest::Url,
        headers: reqwest::header::HeaderMap,
        body: Bytes,
    ) -> Attempt {
        // Literal addresses never reach the resolver: check them here.
        let literal: Option<IpAddr> = match url.host() {
            Some(url::Host::Ipv4(v4)) => Some(v4.into()),
            Some(url::Host::Ipv6(v6)) => Some(v6.into()),
            _ => None,
        };
        if let Some(ip) = literal {
            if let Err(why) = netguard::check(ip, &self.allow) {
                return Attempt::Refused(why);
            }
        }
        let response = self
            .http
            .post(url.clone())
            .headers(headers)
            .body(body)
            .send()
            .await;
        match response {
            Ok(r) => {
                let status = r.status();
                let retry_after = r
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_retry_after);
                // Read (a bounded part of) the body so the connection can be reused.
                let _ = tokio::time::timeout(Duration::from_secs(1), r.bytes()).await;
                let code = status.as_u16();
                if status.is_success() {
                    Attempt::Delivered { status: code }
                } else if code == 410 {
                    Attempt::Gone
                } else {
                    Attempt::Failed {
                        status: Some(code),
                        class: match code {
                            300..=399 => "3xx",
                            400..=499 => "4xx",
                            _ => "5xx",
                        },
                        error: format!("HTTP {code}"),
                        retry_after,
                    }
                }
            }
            Err(e) => {
                if let Some(refused) = find_source::<RefusedAddress>(&e) {
                    return Attempt::Refused(refused.0.clone());
                }
                let class = if e.is_timeout() {
                    "timeout"
                } else {
                    "connect_error"
                };
                Attempt::Failed {
                    status: None,
                    class,
                    error: error_chain(&e),
                    retry_after: None,
                }
            }
        }
    }
}

fn find_source<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(t) = s.downcast_ref::<T>() {
            return Some(t);
        }
        source = s.source();
    }
    None
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_signature_test_vector() {
        assert_eq!(
            elements_signature(
                "MySecretEventSignatureKey",
                br#"{"message":{"eventId":"1"}}"#
            ),
            "sha256=BglE3qkASaGiP5DAbkZ3SSOQwZE897+gwodA43OVuno="
        );
    }

    #[test]
    fn standard_webhooks_signature_verifies_with_the_reference_crate() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let old = "whsec_c2Vjb25kIHNlY3JldCBmb3Igcm90YXRpb24=";
        let key = |s: &str| {
            base64::engine::general_purpose::STANDARD
                .decode(&s[6..])
                .unwrap()
        };
        let body = br#"{"message":{"eventId":"e1"}}"#;
        let ts = shared::time_fmt::now_unix_ms() / 1000;
        let header = standard_signature(&[key(old), key(secret)], "e1", ts, body);
        assert_eq!(header.split(' ').count(), 2);
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("webhook-id", "e1".parse().unwrap());
        h.insert("webhook-timestamp", ts.to_string().parse().unwrap());
        h.insert("webhook-signature", header.parse().unwrap());
        for s in [secret, old] {
            let verifier = standardwebhooks::Webhook::new(s).unwrap();
            verifier
                .verify(body, &h)
                .expect("the reference implementation accepts our signature");
        }
        let stranger = standardwebhooks::Webhook::new("whsec_dGhpcmQgc2VjcmV0").unwrap();
        assert!(stranger.verify(body, &h).is_err());
    }

    #[tokio::test]
    async fn literal_internal_addresses_are_refused_without_a_request() {
        let d = Dispatcher::new(
            Duration::from_secs(1),
            Duration::from_secs(1),
            AllowList::default(),
        )
        .unwrap();
        for url in [
            "http://127.0.0.1:9/x",
            "http://10.0.0.1/x",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]:9/x",
            "http://[::ffff:10.0.0.1]/x",
        ] {
            let attempt = d
                .post(&url.parse().unwrap(), Default::default(), Bytes::new())
                .await;
            assert!(matches!(attempt, Attempt::Refused(_)), "{url}: {attempt:?}");
        }
    }

    #[tokio::test]
    async fn names_resolving_to_internal_addresses_are_refused_at_connect_time() {
        let d = Dispatcher::new(
            Duration::from_secs(1),
            Duration::from_secs(1),
            AllowList::default(),
        )
        .unwrap();
        let attempt = d
            .post(
                &"http://localhost:9/x".parse().unwrap(),
                Default::default(),
                Bytes::new(),
            )
            .await;
        assert!(
            matches!(attempt, Attempt::Refused(ref why) if why.contains("loopback")),
            "{attempt:?}"
        );
    }
}
