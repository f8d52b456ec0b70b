//! One delivery attempt: the request headers and signatures, and the POST. No redirects are
//! followed; callback addresses are checked against the SSRF guard after DNS resolution, at
//! connect time. Of the answer only the status and the first [`RESPONSE_EXCERPT_BYTES`] of the
//! body are read. No error text carries the callback URL, which may hold credentials
//! (`user:pass@`, `?token=`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use model::envelope::RESPONSE_EXCERPT_BYTES;
use model::instance::Instance;
use model::netguard::{self, AllowList};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use sha2::Sha256;

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

/// The request headers: always the id and content type (the client adds the user agent); the
/// Open Connectors signature when the instance has a key; the Standard Webhooks trio when it has
/// secrets.
pub fn request_headers(
    instance: &Instance,
    event_id: &str,
    body: &[u8],
    now_secs: i64,
) -> HeaderMap {
    let mut h = HeaderMap::new();
    let mut put = |name: &'static str, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(name, v);
        }
    };
    put(CONTENT_TYPE.as_str(), "application/json");
    put("elements-webhook-id", event_id);
    if let Some(key) = instance.signature_key() {
        put("elements-webhook-signature", &elements_signature(key, body));
    }
    let secrets = instance.webhook_secrets();
    if !secrets.is_empty() {
        put("webhook-id", event_id);
        put("webhook-timestamp", &now_secs.to_string());
        put(
            "webhook-signature",
            &standard_signature(&secrets, event_id, now_secs, body),
        );
    }
    h
}

/// The OpenTelemetry client span of one attempt (HTTP client semantic conventions). The URL's
/// path and query are left out: a callback URL may carry a token there. Disabled while traces
/// are off.
pub fn attempt_span(
    url: &reqwest::Url,
    instance_id: &str,
    envelope_id: &str,
    attempt: u64,
) -> tracing::Span {
    use tracing::field::Empty;
    tracing::trace_span!(
        target: shared::otel::TARGET,
        "attempt",
        otel.name = "POST",
        otel.kind = "client",
        otel.status_code = Empty,
        http.request.method = "POST",
        url.scheme = url.scheme(),
        server.address = url.host_str().unwrap_or_default(),
        server.port = url.port_or_known_default().unwrap_or_default(),
        http.response.status_code = Empty,
        error.type = Empty,
        attempt,
        instance.id = instance_id,
        envelope.id = envelope_id,
        outcome = Empty,
    )
}

/// Writes how the attempt went into its span: the status, and for a failure its class.
pub fn record_attempt(span: &tracing::Span, attempt: &Attempt) {
    if span.is_disabled() {
        return;
    }
    if let Some(answer) = attempt.answer() {
        span.record("http.response.status_code", answer.status);
    }
    let outcome = match attempt {
        Attempt::Delivered(_) => "delivered",
        Attempt::Gone(_) => "gone",
        Attempt::Refused(_) => "refused",
        Attempt::Failed { .. } => "failed",
    };
    span.record("outcome", outcome);
    if !matches!(attempt, Attempt::Delivered(_)) {
        span.record("otel.status_code", "error");
        let error_type = match attempt.answer() {
            Some(answer) => answer.status.to_string(),
            None => attempt.class().to_owned(),
        };
        span.record("error.type", error_type);
    }
}

/// What the callback answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// The first [`RESPONSE_EXCERPT_BYTES`] of the body, as UTF-8 (lossy); never longer.
    pub excerpt: String,
}

/// How an attempt went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// 2xx.
    Delivered(Answer),
    /// 410: the receiver says the endpoint is gone; no retry.
    Gone(Answer),
    /// The address is refused by the SSRF guard; no retry.
    Refused(String),
    /// Anything else: retried. `answer` is `None` when no HTTP answer came (timeout, connection
    /// error).
    Failed {
        answer: Option<Answer>,
        class: &'static str,
        error: String,
        retry_after: Option<Duration>,
    },
}

impl Attempt {
    /// The `status_class` label.
    pub fn class(&self) -> &'static str {
        match self {
            Attempt::Delivered(_) => "2xx",
            Attempt::Gone(_) => "4xx",
            Attempt::Refused(_) => "refused",
            Attempt::Failed { class, .. } => class,
        }
    }

    /// The callback's answer, when it gave one.
    pub fn answer(&self) -> Option<&Answer> {
        match self {
            Attempt::Delivered(a) | Attempt::Gone(a) => Some(a),
            Attempt::Failed { answer, .. } => answer.as_ref(),
            Attempt::Refused(_) => None,
        }
    }
}

/// How long the excerpt of a response body may take to read. The status has already decided
/// the outcome; a receiver trickling its body must not hold the attempt (or its host slot).
const EXCERPT_WAIT: Duration = Duration::from_secs(1);

/// Reads at most [`RESPONSE_EXCERPT_BYTES`] of `response`'s body, within [`EXCERPT_WAIT`], then
/// drops the response. A body read to its end gives the connection back to the pool; one left
/// unread (endless, large or slow) closes it, so nothing more of it is ever read.
async fn read_excerpt(mut response: reqwest::Response) -> String {
    let mut head = Vec::with_capacity(RESPONSE_EXCERPT_BYTES);
    let read = async {
        while head.len() < RESPONSE_EXCERPT_BYTES {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = RESPONSE_EXCERPT_BYTES - head.len();
                    head.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                Ok(None) | Err(_) => break,
            }
        }
    };
    let _ = tokio::time::timeout(EXCERPT_WAIT, read).await;
    drop(response);
    excerpt_text(&head)
}

/// `bytes` as UTF-8, lossy, at most [`RESPONSE_EXCERPT_BYTES`] long. A character cut in two by
/// the byte limit is left out rather than shown as U+FFFD.
fn excerpt_text(bytes: &[u8]) -> String {
    let whole = match std::str::from_utf8(bytes) {
        Err(e) if e.error_len().is_none() => &bytes[..e.valid_up_to()],
        _ => bytes,
    };
    let mut text = String::from_utf8_lossy(whole).into_owned();
    // Invalid bytes become U+FFFD (3 bytes each): the text can outgrow the bytes it came from.
    let mut cut = text.len().min(RESPONSE_EXCERPT_BYTES);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    text
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

/// Parsed callback URLs by their text: parsing one (IDNA included) cost more than the rest of
/// resolving an envelope, and an instance's URL rarely changes. Bounded: emptied when it would
/// hold more than [`MAX_PARSED_URLS`].
#[derive(Debug, Default)]
pub struct ParsedUrls(std::sync::Mutex<std::collections::HashMap<String, reqwest::Url>>);

const MAX_PARSED_URLS: usize = 16_384;

impl ParsedUrls {
    pub fn parse(&self, text: &str) -> Result<reqwest::Url, url::ParseError> {
        let mut urls = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(url) = urls.get(text) {
            return Ok(url.clone());
        }
        let url = reqwest::Url::parse(text)?;
        if urls.len() >= MAX_PARSED_URLS {
            urls.clear();
        }
        urls.insert(text.to_owned(), url.clone());
        Ok(url)
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
                    // Clamped to the schedule by model::retry::next_wait.
                    .and_then(|v| model::retry::parse_retry_after(v, model::retry::MAX_WAIT));
                let code = status.as_u16();
                let answer = Answer {
                    status: code,
                    excerpt: read_excerpt(r).await,
                };
                if status.is_success() {
                    Attempt::Delivered(answer)
                } else if code == 410 {
                    Attempt::Gone(answer)
                } else {
                    Attempt::Failed {
                        answer: Some(answer),
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
                    answer: None,
                    class,
                    // The URL may carry credentials: this text goes to logs and dead letters.
                    error: error_chain(&e.without_url()),
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
    fn parsed_urls_are_the_parser_s_and_errors_are_not_kept() {
        let urls = ParsedUrls::default();
        for _ in 0..2 {
            let url = urls
                .parse("https://user:pw@Example.COM:8443/hook?x=1")
                .unwrap();
            assert_eq!(url.as_str(), "https://user:pw@example.com:8443/hook?x=1");
        }
        assert!(urls.parse("not a url").is_err());
        assert_eq!(urls.0.lock().unwrap().len(), 1);
    }

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
        let ts = model::time_fmt::now_unix_ms() / 1000;
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

    fn loopback_dispatcher() -> Dispatcher {
        Dispatcher::new(
            Duration::from_secs(1),
            Duration::from_secs(5),
            AllowList::parse("127.0.0.0/8").unwrap(),
        )
        .unwrap()
    }

    /// A receiver on 127.0.0.1 that answers one request with 200 and a chunked body that never
    /// ends. The channel gets the bytes it wrote once the client closed the connection.
    async fn endless_receiver() -> (SocketAddr, tokio::sync::oneshot::Receiver<usize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = conn.read(&mut buf).await.unwrap();
                assert!(n > 0, "the client sent a whole request head");
                request.extend_from_slice(&buf[..n]);
            }
            let head =
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n";
            let chunk = format!("400\r\n{}\r\n", "x".repeat(1024));
            let mut written = 0;
            let ended = async {
                conn.write_all(head.as_bytes()).await?;
                loop {
                    conn.write_all(chunk.as_bytes()).await?;
                    written += chunk.len();
                }
            };
            let _: std::io::Result<()> = ended.await;
            let _ = closed_tx.send(written);
        });
        (addr, closed_rx)
    }

    #[tokio::test]
    async fn an_endless_response_body_is_cut_at_the_excerpt_and_the_connection_closed() {
        let (addr, closed) = endless_receiver().await;
        let url = format!("http://{addr}/hook").parse().unwrap();
        let attempt = tokio::time::timeout(
            Duration::from_secs(5),
            loopback_dispatcher().post(&url, Default::default(), Bytes::from_static(b"{}")),
        )
        .await
        .expect("the attempt returns although the body never ends");
        let Attempt::Delivered(answer) = attempt else {
            panic!("200 counts as delivered: {attempt:?}");
        };
        assert_eq!(answer.status, 200);
        assert_eq!(answer.excerpt, "x".repeat(RESPONSE_EXCERPT_BYTES));
        let written = tokio::time::timeout(Duration::from_secs(5), closed)
            .await
            .expect("the deliverer closes the connection instead of reading on")
            .unwrap();
        // Socket buffers at both ends hold a few MiB; reading on for the old 1 s let ~90 MB by.
        assert!(
            written < 16 << 20,
            "the receiver wrote {written} bytes before the connection closed"
        );
    }

    #[tokio::test]
    async fn error_texts_carry_no_part_of_the_callback_url() {
        let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://user:secret@127.0.0.1:{closed_port}/x?token=abc")
            .parse()
            .unwrap();
        let attempt = loopback_dispatcher()
            .post(&url, Default::default(), Bytes::new())
            .await;
        let Attempt::Failed { error, class, .. } = attempt else {
            panic!("a closed port fails: {attempt:?}");
        };
        assert_eq!(class, "connect_error");
        for part in ["secret", "token", "abc", "/x"] {
            assert!(!error.contains(part), "{part} in {error}");
        }
    }

    #[test]
    fn excerpts_are_utf8_and_never_longer_than_the_limit() {
        let n = RESPONSE_EXCERPT_BYTES;
        assert_eq!(
            excerpt_text(b"refused: bad signature"),
            "refused: bad signature"
        );
        // A 3-byte character cut by the limit is left out, not shown as U+FFFD.
        let mut cut = vec![b'a'; n - 1];
        cut.extend_from_slice(&"€".as_bytes()[..1]);
        assert_eq!(excerpt_text(&cut), "a".repeat(n - 1));
        // Invalid bytes grow into U+FFFD; the text is still cut at the limit.
        let text = excerpt_text(&vec![0xff; n]);
        assert!(text.len() <= n && text.chars().all(|c| c == '\u{fffd}'));
        assert_eq!(text.chars().count(), n / 3);
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
