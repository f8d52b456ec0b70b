//! The poller's configuration, from environment variables.

use std::net::SocketAddr;
use std::time::Duration;

use shared::config::{CommonConfig, ConfigError, Vars};

pub const DEFAULT_OPS_LISTEN: &str = "0.0.0.0:9103";
pub const DEFAULT_API_URL: &str = "https://app.ecwid.com/api/v3";
/// 16 MiB: a page of 100 entities is far smaller; a larger answer is not a page.
pub const DEFAULT_MAX_PAGE_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    /// `OPS_LISTEN`: `/metrics`, `/healthz`, `/readyz`.
    pub ops_listen: SocketAddr,
    /// `ECWID_API_URL`, default `https://app.ecwid.com/api/v3` (no trailing slash).
    pub api_url: String,
    /// `POLLER_REPLICA_ID`, default a fresh UUID: names this replica in leases and logs.
    pub replica_id: String,
    /// `POLLER_LEASE_TTL_MS`, default 30000: how long a store's lease lasts unrenewed; a replica
    /// that dies hands its stores over within this (renewed every third of it).
    pub lease_ttl: Duration,
    /// `POLLER_RATE_LIMIT`, default 600: requests one API token may make per
    /// `POLLER_RATE_WINDOW_MS` (default 60000) across all replicas.
    pub rate_limit: u32,
    pub rate_window: Duration,
    /// `POLLER_REQUEST_TIMEOUT_MS`, default 20000: one REST request.
    pub request_timeout: Duration,
    /// `POLLER_WINDOW_DELAY_MS`, default 10000: a window ends this far behind now, so that
    /// changes Ecwid has not indexed yet fall into the next one.
    pub window_delay: Duration,
    /// `POLLER_ERROR_BACKOFF_MS`, default 300000: the first wait after Ecwid refused a store's
    /// token (401/402/403/404); it doubles up to `POLLER_ERROR_BACKOFF_MAX_MS` (default 1 h).
    pub error_backoff: Duration,
    pub error_backoff_max: Duration,
    /// `POLLER_RETRY_MIN_MS`, default 500: the first wait before retrying a 5xx or a timeout
    /// (three retries, doubling, jittered).
    pub retry_min: Duration,
    /// `POLLER_PUBLISH_TIMEOUT_MS`, default 5000: wait for JetStream's ack of a poll event.
    pub publish_timeout: Duration,
    /// `POLLER_CONCURRENCY`, default 8: stores one replica polls at once.
    pub concurrency: usize,
    /// `POLLER_MAX_PAGE_BYTES`, default 16 MiB: the largest answer body read from Ecwid; a longer
    /// one is not read further and the cycle fails with an error naming this variable. Error
    /// bodies (401–404) are read to their first [`crate::api::MAX_ERROR_BODY_BYTES`] only.
    pub max_page_bytes: usize,
    /// `POLLER_MAX_RETRY_AFTER_MS`, default 120000: the longest wait a 429's `Retry-After` is
    /// honoured for; a longer one (or `1e20`) is cut to this. Waits above 5 s end the cycle and
    /// pause the token's budget for every replica.
    pub max_retry_after: Duration,
    /// `POLLER_CYCLE_MAX_PAGES`, default 100 (10 000 entities at 100 a page), and
    /// `POLLER_CYCLE_MAX_MS`, default 300000: what one store's cycle (or one backfill) reads at
    /// most. A cycle cut short keeps where it got to and the next one goes on from there; a
    /// backfill cut short answers 422 (ask for a shorter window).
    pub cycle_max_pages: u32,
    pub cycle_max_time: Duration,
    /// `POLLER_SIGHTINGS_MAX_AGE_MS`, default 21600000 (6 h): how far back the webhooks a polled
    /// change is checked against are read ([`crate::sightings`]); a polled change older than
    /// that is stored even when a webhook brought it.
    pub sightings_max_age: Duration,
}

impl Config {
    pub fn from_vars(vars: &Vars) -> Result<Self, ConfigError> {
        let api_url = vars
            .string_or("ECWID_API_URL", DEFAULT_API_URL)
            .trim_end_matches('/')
            .to_owned();
        match url::Url::parse(&api_url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            _ => {
                return Err(ConfigError::new(
                    "ECWID_API_URL",
                    format!(
                        "expected an http(s) URL such as {DEFAULT_API_URL}, got `{}`",
                        model::instance::redact_url(&api_url)
                    ),
                ))
            }
        }
        let replica_id = vars.string_or("POLLER_REPLICA_ID", "");
        let replica_id = if replica_id.is_empty() {
            uuid::Uuid::new_v4().to_string()
        } else if shared::nats::is_subject_token(&replica_id) && replica_id.len() <= 64 {
            replica_id
        } else {
            return Err(ConfigError::new(
                "POLLER_REPLICA_ID",
                "must be up to 64 letters, digits, - or _",
            ));
        };
        let rate_limit: u32 = vars.parse_or("POLLER_RATE_LIMIT", 600)?;
        if rate_limit < 2 {
            return Err(ConfigError::new("POLLER_RATE_LIMIT", "must be at least 2"));
        }
        let concurrency: usize = vars.parse_or("POLLER_CONCURRENCY", 8)?;
        if !(1..=256).contains(&concurrency) {
            return Err(ConfigError::new(
                "POLLER_CONCURRENCY",
                "must be between 1 and 256",
            ));
        }
        let error_backoff = vars.millis_or("POLLER_ERROR_BACKOFF_MS", 300_000, 100)?;
        let error_backoff_max = vars.millis_or("POLLER_ERROR_BACKOFF_MAX_MS", 3_600_000, 100)?;
        if error_backoff_max < error_backoff {
            return Err(ConfigError::new(
                "POLLER_ERROR_BACKOFF_MAX_MS",
                "must be at least POLLER_ERROR_BACKOFF_MS",
            ));
        }
        let max_page_bytes: usize =
            vars.parse_or("POLLER_MAX_PAGE_BYTES", DEFAULT_MAX_PAGE_BYTES)?;
        if !(64 * 1024..=1024 * 1024 * 1024).contains(&max_page_bytes) {
            return Err(ConfigError::new(
                "POLLER_MAX_PAGE_BYTES",
                "must be between 65536 (64 KiB) and 1073741824 (1 GiB)",
            ));
        }
        let max_retry_after = vars.millis_or("POLLER_MAX_RETRY_AFTER_MS", 120_000, 1_000)?;
        if max_retry_after > Duration::from_secs(86_400) {
            return Err(ConfigError::new(
                "POLLER_MAX_RETRY_AFTER_MS",
                "must be at most 86400000 (a day)",
            ));
        }
        let cycle_max_pages: u32 = vars.parse_or("POLLER_CYCLE_MAX_PAGES", 100)?;
        if cycle_max_pages < 1 {
            return Err(ConfigError::new(
                "POLLER_CYCLE_MAX_PAGES",
                "must be at least 1",
            ));
        }
        Ok(Self {
            common: CommonConfig::from_vars(vars)?,
            ops_listen: vars.addr_or("OPS_LISTEN", DEFAULT_OPS_LISTEN)?,
            api_url,
            replica_id,
            lease_ttl: vars.millis_or("POLLER_LEASE_TTL_MS", 30_000, 300)?,
            rate_limit,
            rate_window: vars.millis_or("POLLER_RATE_WINDOW_MS", 60_000, 1_000)?,
            request_timeout: vars.millis_or("POLLER_REQUEST_TIMEOUT_MS", 20_000, 100)?,
            window_delay: vars.millis_or("POLLER_WINDOW_DELAY_MS", 10_000, 0)?,
            error_backoff,
            error_backoff_max,
            retry_min: vars.millis_or("POLLER_RETRY_MIN_MS", 500, 10)?,
            publish_timeout: vars.millis_or("POLLER_PUBLISH_TIMEOUT_MS", 5_000, 100)?,
            concurrency,
            max_page_bytes,
            max_retry_after,
            cycle_max_pages,
            cycle_max_time: vars.millis_or("POLLER_CYCLE_MAX_MS", 300_000, 1_000)?,
            sightings_max_age: vars.millis_or("POLLER_SIGHTINGS_MAX_AGE_MS", 21_600_000, 60_000)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_errors_name_the_variable() {
        let c = Config::from_vars(&Vars::default()).unwrap();
        assert_eq!(c.ops_listen.to_string(), "0.0.0.0:9103");
        assert_eq!(c.api_url, DEFAULT_API_URL);
        assert_eq!(
            (c.rate_limit, c.rate_window),
            (600, Duration::from_secs(60))
        );
        assert_eq!(c.max_page_bytes, 16 * 1024 * 1024);
        for (var, value) in [
            ("ECWID_API_URL", "ftp://x"),
            ("ECWID_API_URL", "not a url"),
            ("POLLER_RATE_LIMIT", "1"),
            ("POLLER_LEASE_TTL_MS", "10"),
            ("POLLER_REPLICA_ID", "a.b"),
            ("POLLER_CONCURRENCY", "0"),
            ("POLLER_ERROR_BACKOFF_MAX_MS", "200"),
            ("POLLER_MAX_PAGE_BYTES", "100"),
            ("POLLER_MAX_RETRY_AFTER_MS", "100000000000"),
            ("POLLER_CYCLE_MAX_PAGES", "0"),
            ("POLLER_CYCLE_MAX_MS", "5"),
            ("POLLER_SIGHTINGS_MAX_AGE_MS", "1000"),
        ] {
            let err = Config::from_vars(&Vars::from_pairs([(var, value)])).unwrap_err();
            assert_eq!(err.var, var, "{var}={value}");
        }
    }
}
