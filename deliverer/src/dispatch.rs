//! One delivery attempt: the request headers and signatures, the instance's own headers and its
//! OAuth2 access token ([`crate::oauth2`]), and the POST, by the shared client or, for an
//! instance with a proxy, a client certificate or its own CA, by its [`crate::route`]. No
//! redirects are followed; callback addresses are checked against the SSRF guard after DNS
//! resolution, at connect time ([`crate::guard`]). Of the answer only the status and the first
//! [`RESPONSE_EXCERPT_BYTES`] of the body are read. No error text carries the callback URL, which
//! may hold credentials (`user:pass@`, `?token=`), nor a token, a secret or the token endpoint's
//! URL.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use model::envelope::RESPONSE_EXCERPT_BYTES;
use model::instance::Instance;
use model::instance::OAuth2;
use model::netguard::{self, AllowList};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{
    HeaderMap, HeaderName, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE,
    USER_AGENT as USER_AGENT_HEADER,
};
use sha2::Sha256;

use crate::guard::{guarded_lookup, RefusedAddress};
use crate::oauth2::Tokens;
use crate::route::{ProxyFailure, RouteClient, RouteSpec, Routes};

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

/// Reads at most `limit` bytes of `response`'s body, within [`EXCERPT_WAIT`], then drops the
/// response. A body read to its end gives the connection back to the pool; one left unread
/// (endless, large or slow) closes it, so nothing more of it is ever read.
async fn read_head(mut response: reqwest::Response, limit: usize) -> Vec<u8> {
    let mut head = Vec::with_capacity(limit.min(RESPONSE_EXCERPT_BYTES));
    let read = async {
        while head.len() < limit {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = limit - head.len();
                    head.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                Ok(None) | Err(_) => break,
            }
        }
    };
    let _ = tokio::time::timeout(EXCERPT_WAIT, read).await;
    drop(response);
    head
}

/// [`read_head`] for a response that came through a [`crate::route`].
async fn read_route_head(
    response: hyper::Response<hyper::body::Incoming>,
    limit: usize,
) -> Vec<u8> {
    use http_body_util::BodyExt as _;
    let mut body = response.into_body();
    let mut head = Vec::with_capacity(limit.min(RESPONSE_EXCERPT_BYTES));
    let read = async {
        while head.len() < limit {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(chunk) = frame.data_ref() {
                        let room = limit - head.len();
                        head.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    }
                }
                Some(Err(_)) | None => break,
            }
        }
    };
    let _ = tokio::time::timeout(EXCERPT_WAIT, read).await;
    head
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

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow = self.allow.clone();
        Box::pin(async move {
            let allowed = guarded_lookup(name.as_str(), 0, &allow).await?;
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

/// What a receiver (or a token endpoint) answered: its status, `Retry-After`, and the first
/// bytes of its body.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) retry_after: Option<Duration>,
    pub(crate) body: Vec<u8>,
}

/// How a request goes: the plain client, or a [`crate::route`] (proxy, client certificate, CA).
enum Via {
    Plain,
    Route(RouteClient),
}

/// Sends envelopes.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    http: reqwest::Client,
    allow: AllowList,
    timeout: Duration,
    /// `DELIVER_PROXY_URL`, for instances without a proxy of their own.
    proxy: Option<Arc<str>>,
    routes: Arc<Routes>,
    tokens: Arc<Tokens>,
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
        Ok(Self {
            http,
            routes: Arc::new(Routes::new(
                allow.clone(),
                AllowList::default(),
                connect_timeout,
            )),
            allow,
            timeout,
            proxy: None,
            tokens: Arc::new(Tokens::default()),
        })
    }

    /// Sends through `proxy_url` (`DELIVER_PROXY_URL`) every request of an instance without a
    /// proxy of its own; a proxy passes the guard when public or in `proxy_allow`.
    pub fn with_proxy(mut self, proxy_url: Option<&str>, proxy_allow: AllowList) -> Self {
        self.proxy = proxy_url.map(Arc::from);
        self.routes = Arc::new(Routes::new(
            self.allow.clone(),
            proxy_allow,
            self.routes.connect_timeout(),
        ));
        self
    }

    /// Counts the requests to OAuth2 token endpoints in `requests` (label `outcome`).
    pub fn with_token_metric(mut self, requests: prometheus::IntCounterVec) -> Self {
        self.tokens = Arc::new(Tokens::new(Some(requests)));
        self
    }

    /// POSTs `body` to `url` with `headers`, with the plain client.
    pub async fn post(
        &self,
        url: &reqwest::Url,
        headers: reqwest::header::HeaderMap,
        body: Bytes,
    ) -> Attempt {
        attempt_of(
            self.send(&Via::Plain, url, headers, body, RESPONSE_EXCERPT_BYTES)
                .await,
        )
    }

    /// One delivery to `instance`'s receiver: its own headers added, through its route (proxy,
    /// client certificate, CA), with an OAuth2 access token when it has client credentials. A
    /// 401 fetches a new token and sends once more.
    pub async fn deliver(
        &self,
        instance: &Instance,
        url: &reqwest::Url,
        mut headers: HeaderMap,
        body: Bytes,
    ) -> Attempt {
        let via = match self.via(instance) {
            Ok(via) => via,
            Err(why) => {
                return Attempt::Failed {
                    answer: None,
                    class: "tls_error",
                    error: why,
                    retry_after: None,
                }
            }
        };
        for (name, value) in instance.custom_headers() {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(&value),
            ) {
                headers.insert(name, value);
            }
        }
        let Some(credentials) = instance.oauth2() else {
            return attempt_of(
                self.send(&via, url, headers, body, RESPONSE_EXCERPT_BYTES)
                    .await,
            );
        };
        let mut refreshed = false;
        loop {
            let token = match self
                .tokens
                .get(&credentials, || self.fetch_token(&via, &credentials))
                .await
            {
                Ok(token) => token,
                Err(error) => {
                    return Attempt::Failed {
                        answer: None,
                        class: "auth_error",
                        error,
                        retry_after: None,
                    }
                }
            };
            let mut bearer = HeaderValue::from_str(&format!("Bearer {token}"))
                .unwrap_or_else(|_| HeaderValue::from_static("Bearer"));
            bearer.set_sensitive(true);
            let mut with_token = headers.clone();
            with_token.insert(AUTHORIZATION, bearer);
            let sent = self
                .send(&via, url, with_token, body.clone(), RESPONSE_EXCERPT_BYTES)
                .await;
            match sent {
                // The token was revoked or expired early: one new token, one more try.
                Ok(reply) if reply.status == 401 && !refreshed => {
                    self.tokens.forget(&credentials, &token).await;
                    refreshed = true;
                }
                other => return attempt_of(other),
            }
        }
    }

    /// How `instance`'s requests go; an error when its TLS settings cannot be used.
    fn via(&self, instance: &Instance) -> Result<Via, String> {
        let spec = RouteSpec {
            proxy: instance.proxy_url().or(self.proxy.as_deref()),
            identity: instance.client_identity(),
            ca: instance.tls_ca(),
        };
        if spec.proxy.is_none() && spec.identity.is_none() && spec.ca.is_none() {
            return Ok(Via::Plain);
        }
        self.routes.client(&spec).map(Via::Route)
    }

    /// A new access token from the token endpoint (client credentials grant, the client
    /// authenticated with HTTP Basic as RFC 6749 asks every server to support), and how long it
    /// may be used. Errors never quote the token, the secret or the endpoint's URL.
    async fn fetch_token(
        &self,
        via: &Via,
        credentials: &OAuth2<'_>,
    ) -> Result<(String, Duration), String> {
        let url = reqwest::Url::parse(credentials.token_url)
            .map_err(|_| "the token endpoint's URL is not valid".to_owned())?;
        let form = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "client_credentials");
            if let Some(scope) = credentials.scope {
                form.append_pair("scope", scope);
            }
            if let Some(audience) = credentials.audience {
                form.append_pair("audience", audience);
            }
            form.finish()
        };
        let encode =
            |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let basic = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            encode(credentials.client_id),
            encode(credentials.client_secret)
        ));
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        let mut auth = HeaderValue::from_str(&format!("Basic {basic}"))
            .map_err(|_| "the client id or secret cannot be sent".to_owned())?;
        auth.set_sensitive(true);
        headers.insert(AUTHORIZATION, auth);
        let reply = match self
            .send(via, &url, headers, Bytes::from(form), MAX_TOKEN_ANSWER)
            .await
        {
            Ok(reply) => reply,
            Err(attempt) => {
                let why = match attempt {
                    Attempt::Refused(why) => why,
                    Attempt::Failed { error, .. } => error,
                    _ => "no answer".to_owned(),
                };
                return Err(format!("token endpoint: {why}"));
            }
        };
        let parsed: Result<TokenAnswer, _> = serde_json::from_slice(&reply.body);
        match (reply.status, parsed) {
            (200..=299, Ok(answer)) if !answer.access_token.is_empty() => Ok((
                answer.access_token,
                model::receiver::token_lifetime(answer.expires_in),
            )),
            (200..=299, _) => Err(format!(
                "token endpoint answered {} without an access_token",
                reply.status
            )),
            (status, parsed) => {
                // OAuth2's error code (`invalid_client`, …) says what is wrong and holds no secret.
                let code = parsed
                    .ok()
                    .and_then(|a| a.error)
                    .filter(|c| c.len() <= 64 && c.bytes().all(|b| b.is_ascii_graphic()))
                    .map(|c| format!(" ({c})"))
                    .unwrap_or_default();
                Err(format!("token endpoint answered {status}{code}"))
            }
        }
    }

    /// Sends one POST by `via`; what came back, or the attempt it became without an answer.
    async fn send(
        &self,
        via: &Via,
        url: &reqwest::Url,
        headers: HeaderMap,
        body: Bytes,
        limit: usize,
    ) -> Result<Reply, Attempt> {
        match via {
            Via::Plain => self.send_plain(url, headers, body, limit).await,
            Via::Route(client) => self.send_route(client, url, headers, body, limit).await,
        }
    }

    async fn send_plain(
        &self,
        url: &reqwest::Url,
        headers: HeaderMap,
        body: Bytes,
        limit: usize,
    ) -> Result<Reply, Attempt> {
        // Literal addresses never reach the resolver: check them here.
        let literal: Option<IpAddr> = match url.host() {
            Some(url::Host::Ipv4(v4)) => Some(v4.into()),
            Some(url::Host::Ipv6(v6)) => Some(v6.into()),
            _ => None,
        };
        if let Some(ip) = literal {
            if let Err(why) = netguard::check(ip, &self.allow) {
                return Err(Attempt::Refused(why));
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
                let status = r.status().as_u16();
                let retry_after = retry_after(r.headers());
                Ok(Reply {
                    status,
                    retry_after,
                    body: read_head(r, limit).await,
                })
            }
            Err(e) => {
                let timed_out = e.is_timeout();
                Err(failure(&e.without_url(), timed_out))
            }
        }
    }

    async fn send_route(
        &self,
        client: &RouteClient,
        url: &reqwest::Url,
        mut headers: HeaderMap,
        body: Bytes,
        limit: usize,
    ) -> Result<Reply, Attempt> {
        let uri: hyper::Uri = match url.as_str().parse() {
            Ok(uri) => uri,
            Err(_) => {
                return Err(Attempt::Failed {
                    answer: None,
                    class: "connect_error",
                    error: "the URL cannot be sent".to_owned(),
                    retry_after: None,
                })
            }
        };
        // User info stays out of the request line (hyper would refuse it) and goes as Basic
        // auth, as reqwest sends it on the plain way, unless the instance sets Authorization.
        if !url.username().is_empty() && !headers.contains_key(AUTHORIZATION) {
            let decode = |s: &str| {
                url::form_urlencoded::parse(format!("v={s}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default()
            };
            let pair = format!(
                "{}:{}",
                decode(url.username()),
                decode(url.password().unwrap_or(""))
            );
            let basic = base64::engine::general_purpose::STANDARD.encode(pair);
            if let Ok(mut value) = HeaderValue::from_str(&format!("Basic {basic}")) {
                value.set_sensitive(true);
                headers.insert(AUTHORIZATION, value);
            }
        }
        let uri = match (uri.scheme(), uri.authority()) {
            (Some(scheme), Some(authority)) if authority.as_str().contains('@') => {
                let host = authority.as_str().rsplit('@').next().unwrap_or_default();
                let path = uri.path_and_query().map_or("/", |p| p.as_str());
                format!("{scheme}://{host}{path}")
                    .parse()
                    .unwrap_or_else(|_| uri.clone())
            }
            _ => uri,
        };
        headers.insert(USER_AGENT_HEADER, HeaderValue::from_static(USER_AGENT));
        let mut request = hyper::Request::post(uri);
        if let Some(h) = request.headers_mut() {
            *h = headers;
        }
        let request = match request.body(http_body_util::Full::new(body)) {
            Ok(r) => r,
            Err(_) => {
                return Err(Attempt::Failed {
                    answer: None,
                    class: "connect_error",
                    error: "the request cannot be built".to_owned(),
                    retry_after: None,
                })
            }
        };
        let exchange = async {
            let response = client.request(request).await?;
            let status = response.status().as_u16();
            let retry_after = retry_after(response.headers());
            Ok::<_, hyper_util::client::legacy::Error>(Reply {
                status,
                retry_after,
                body: read_route_head(response, limit).await,
            })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => Err(failure(&e, false)),
            Err(_) => Err(Attempt::Failed {
                answer: None,
                class: "timeout",
                error: format!("no answer within {} ms", self.timeout.as_millis()),
                retry_after: None,
            }),
        }
    }
}

/// The longest token endpoint answer read.
const MAX_TOKEN_ANSWER: usize = 64 * 1024;

#[derive(serde::Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
    #[serde(default)]
    error: Option<String>,
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        // Clamped to the schedule by model::retry::next_wait.
        .and_then(|v| model::retry::parse_retry_after(v, model::retry::MAX_WAIT))
}

/// The attempt an answer (or its absence) makes.
fn attempt_of(sent: Result<Reply, Attempt>) -> Attempt {
    let reply = match sent {
        Ok(reply) => reply,
        Err(attempt) => return attempt,
    };
    let code = reply.status;
    let answer = Answer {
        status: code,
        excerpt: excerpt_text(&reply.body),
    };
    if (200..300).contains(&code) {
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
            retry_after: reply.retry_after,
        }
    }
}

/// The attempt a request that got no answer makes. `e` must not carry the URL, which may hold
/// credentials: this text goes to logs, the event log and dead letters.
fn failure(e: &(dyn std::error::Error + 'static), timed_out: bool) -> Attempt {
    if let Some(refused) = find_source::<RefusedAddress>(e) {
        return Attempt::Refused(refused.0.clone());
    }
    if let Some(proxy) = find_source::<ProxyFailure>(e) {
        return Attempt::Failed {
            answer: None,
            class: "proxy_error",
            error: proxy.to_string(),
            retry_after: None,
        };
    }
    let class = if timed_out {
        "timeout"
    } else {
        "connect_error"
    };
    Attempt::Failed {
        answer: None,
        class,
        error: error_chain(e),
        retry_after: None,
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
    use std::net::SocketAddr;

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
