//! The Ecwid REST API client: `GET {ECWID_API_URL}/{storeId}/{path}` with the store's token as
//! `Authorization: Bearer`, one shared budget token per request ([`crate::budget`]). A 429 waits
//! its `Retry-After` (and pauses the token for every replica); 5xx, timeouts and connection
//! errors are retried three times with a jittered, doubling wait; 401/402/403/404 stop at once
//! as [`PollError::Refused`]. No body is read without a bound: a page stops at
//! `POLLER_MAX_PAGE_BYTES` (the cycle fails, naming the limit), an error body at
//! [`MAX_ERROR_BODY_BYTES`] (only its start is shown).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use model::retry::POLL_MAX_IN_CYCLE_WAIT;

use crate::budget::Budget;
use crate::config::Config;
use crate::error::PollError;
use crate::metrics::Metrics;

/// 429s in a row after which a request is given up for this cycle.
const MAX_RATE_LIMITED: u32 = 10;
/// How much of an error body (401–404) is read: enough for Ecwid's `errorMessage`, of which
/// the status shows 200 characters.
pub const MAX_ERROR_BODY_BYTES: usize = 4 * 1024;

#[derive(Debug, Clone)]
pub struct EcwidApi {
    http: reqwest::Client,
    base: String,
    budget: Budget,
    metrics: Metrics,
    retry_min: Duration,
    max_page_bytes: usize,
    max_retry_after: Duration,
}

impl EcwidApi {
    /// The client for `config`'s API URL, timeouts and limits.
    pub fn new(
        config: &Config,
        user_agent: String,
        budget: Budget,
        metrics: Metrics,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .user_agent(user_agent)
            .timeout(config.request_timeout)
            .connect_timeout(config.request_timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            http,
            base: config.api_url.clone(),
            budget,
            metrics,
            retry_min: config.retry_min,
            max_page_bytes: config.max_page_bytes,
            max_retry_after: config.max_retry_after,
        })
    }

    /// `GET {base}/{store_id}/{path_and_query}`, the body of a 200.
    pub async fn get(
        &self,
        store_id: &str,
        path_and_query: &str,
        token: &str,
        cancel: &CancellationToken,
    ) -> Result<Bytes, PollError> {
        let url = format!("{}/{store_id}/{path_and_query}", self.base);
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(self.retry_min)
            .with_max_delay(self.retry_min * 16)
            .with_max_times(3)
            .with_jitter()
            .build();
        let mut rate_limited = 0;
        loop {
            self.budget.acquire(token, cancel).await?;
            let sent = tokio::select! {
                r = self.http.get(&url).bearer_auth(token).send() => r,
                () = cancel.cancelled() => return Err(PollError::Cancelled),
            };
            let failure = match sent {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    match status {
                        200..=299 => match read_body(resp, self.max_page_bytes).await {
                            Ok(Body::Whole(body)) => {
                                self.count("ok");
                                return Ok(body);
                            }
                            Ok(Body::Cut(_)) => {
                                // The same request would only bring the same answer again.
                                self.count("too_large");
                                return Err(PollError::Transient(format!(
                                    "Ecwid's answer is larger than {} bytes \
                                     (POLLER_MAX_PAGE_BYTES); not read further",
                                    self.max_page_bytes
                                )));
                            }
                            Err(e) => {
                                self.count("error");
                                format!("reading the answer failed: {}", describe(e))
                            }
                        },
                        429 => {
                            self.count("rate_limited");
                            rate_limited += 1;
                            let wait = resp
                                .headers()
                                .get(reqwest::header::RETRY_AFTER)
                                .and_then(|v| v.to_str().ok())
                                .and_then(|v| {
                                    model::retry::parse_retry_after(v, self.max_retry_after)
                                })
                                .unwrap_or(
                                    model::retry::POLL_DEFAULT_RETRY_AFTER
                                        .min(self.max_retry_after),
                                );
                            self.budget.pause(token, wait).await;
                            if wait > POLL_MAX_IN_CYCLE_WAIT {
                                return Err(PollError::Transient(format!(
                                    "Ecwid answered 429 and asked to wait {} s (Retry-After, \
                                     at most POLLER_MAX_RETRY_AFTER_MS); the token is paused",
                                    wait.as_secs()
                                )));
                            }
                            if rate_limited >= MAX_RATE_LIMITED {
                                return Err(PollError::Transient(format!(
                                    "rate limited {rate_limited} times in a row"
                                )));
                            }
                            tracing::info!(store_id, retry_in = ?wait, "Ecwid answered 429; waiting.");
                            tokio::select! {
                                () = tokio::time::sleep(wait) => {}
                                () = cancel.cancelled() => return Err(PollError::Cancelled),
                            }
                            continue;
                        }
                        401..=404 => {
                            self.count("refused");
                            // Only its start: the message shown is 200 characters at most.
                            let head = match read_body(resp, MAX_ERROR_BODY_BYTES).await {
                                Ok(Body::Whole(b) | Body::Cut(b)) => b,
                                Err(_) => Bytes::new(),
                            };
                            return Err(PollError::Refused {
                                status,
                                message: ecwid_message(&String::from_utf8_lossy(&head)),
                            });
                        }
                        500..=599 => {
                            self.count("server_error");
                            format!("Ecwid answered {status}")
                        }
                        _ => {
                            self.count("error");
                            format!("Ecwid answered {status}")
                        }
                    }
                }
                Err(e) if e.is_timeout() => {
                    self.count("timeout");
                    "the request timed out".to_owned()
                }
                Err(e) => {
                    self.count("error");
                    format!("the request failed: {}", describe(e))
                }
            };
            let Some(wait) = backoff.next() else {
                return Err(PollError::Transient(failure));
            };
            tracing::debug!(store_id, error = failure, retry_in = ?wait, "Ecwid request failed; retrying.");
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = cancel.cancelled() => return Err(PollError::Cancelled),
            }
        }
    }

    fn count(&self, outcome: &str) {
        self.metrics.requests.with_label_values(&[outcome]).inc();
    }
}

/// `e` and its causes, without the URL reqwest would print: `ECWID_API_URL` may carry
/// credentials (user info, query values), and this text reaches the logs and `lastPollError`.
fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut parts = vec![e.to_string()];
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        parts.push(model::instance::redact_url(&s.to_string()));
        source = s.source();
    }
    parts.join(": ")
}

/// A body read up to a limit.
#[derive(Debug)]
enum Body {
    /// All of it.
    Whole(Bytes),
    /// Its first `limit` bytes: the rest was not read.
    Cut(Bytes),
}

/// Reads `response`'s body chunk by chunk and stops at `limit` bytes, so a hostile or broken
/// answer (however long, whatever its `Content-Length` says) costs at most `limit` bytes of
/// memory; the rest is never read (the connection is dropped).
async fn read_body(mut response: reqwest::Response, limit: usize) -> Result<Body, reqwest::Error> {
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = response.chunk().await? {
        let room = limit - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok(Body::Cut(body.freeze()));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Body::Whole(body.freeze()))
}

/// Ecwid's `errorMessage`, or the start of the body; bounded, one line.
fn ecwid_message(text: &str) -> String {
    let message = serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v["errorMessage"].as_str().map(str::to_owned))
        .unwrap_or_else(|| text.to_owned());
    message
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect()
}
