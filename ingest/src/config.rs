//! The ingest's configuration, from environment variables.

use std::net::SocketAddr;
use std::time::Duration;

use shared::config::{CommonConfig, ConfigError, Vars};
use shared::ops::ServerLimits;

pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8081";

#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    /// `INGEST_LISTEN`: webhooks only.
    pub listen: SocketAddr,
    /// `ADMIN_LISTEN`: admin API, `/metrics`, `/healthz`, `/readyz`.
    pub admin_listen: SocketAddr,
    /// The admin API's own settings (tokens, allowed networks, search budget).
    pub admin: admin::Config,
    /// `INGEST_MAX_BODY_BYTES`, default 256 KiB.
    pub max_body_bytes: usize,
    /// `INGEST_PUBLISH_TIMEOUT_MS`, default 2000: how long to wait for JetStream's ack before 503.
    pub publish_timeout: Duration,
    /// `INGEST_REQUIRE_SIGNATURE`, default false: refuse stores whose instances hold no client secret.
    pub require_signature: bool,
    /// `INGEST_MAX_EVENT_AGE_SECS`, default 0 (off): refuse v3 events older than this.
    pub max_event_age: Option<Duration>,
    /// `INGEST_MAX_CLOCK_SKEW_SECS`, default 300: with a maximum age set, refuse v3 events whose
    /// `eventCreated` lies further in the future than this.
    pub max_clock_skew: Duration,
    /// `INGEST_HEADER_TIMEOUT_MS` (default 10000) and `INGEST_MAX_CONNECTIONS` (default 1024),
    /// for both listeners.
    pub server_limits: ServerLimits,
    /// `INGEST_BODY_TIMEOUT_MS`, default 10000: the whole body must arrive within this (408).
    pub body_timeout: Duration,
}

impl Config {
    pub fn from_vars(vars: &Vars) -> Result<Self, ConfigError> {
        let max_body_bytes: usize = vars.parse_or("INGEST_MAX_BODY_BYTES", 256 * 1024)?;
        if !(1024..=64 * 1024 * 1024).contains(&max_body_bytes) {
            return Err(ConfigError::new(
                "INGEST_MAX_BODY_BYTES",
                "must be between 1024 and 67108864",
            ));
        }
        let publish_timeout = vars.millis_or("INGEST_PUBLISH_TIMEOUT_MS", 2_000, 10)?;
        if publish_timeout > Duration::from_secs(9) {
            return Err(ConfigError::new(
                "INGEST_PUBLISH_TIMEOUT_MS",
                "must be under 9000: Ecwid gives up on an answer after 10 s",
            ));
        }
        let max_age_secs: u64 = vars.parse_or("INGEST_MAX_EVENT_AGE_SECS", 0)?;
        // Ecwid gives up on an answer after 10 s: a slower request has failed anyway.
        let header_read_timeout = vars.millis_or("INGEST_HEADER_TIMEOUT_MS", 10_000, 100)?;
        let body_timeout = vars.millis_or("INGEST_BODY_TIMEOUT_MS", 10_000, 100)?;
        let max_connections: usize = vars.parse_or("INGEST_MAX_CONNECTIONS", 1024)?;
        if !(1..=1_000_000).contains(&max_connections) {
            return Err(ConfigError::new(
                "INGEST_MAX_CONNECTIONS",
                "must be between 1 and 1000000",
            ));
        }
        Ok(Self {
            admin: admin::Config::from_vars(vars)?,
            common: CommonConfig::from_vars(vars)?.with_event_log_database(vars)?,
            listen: vars.addr_or("INGEST_LISTEN", DEFAULT_LISTEN)?,
            admin_listen: vars.addr_or("ADMIN_LISTEN", DEFAULT_ADMIN_LISTEN)?,
            max_body_bytes,
            publish_timeout,
            require_signature: vars.bool_or("INGEST_REQUIRE_SIGNATURE", false)?,
            max_event_age: (max_age_secs > 0).then(|| Duration::from_secs(max_age_secs)),
            max_clock_skew: Duration::from_secs(vars.parse_or("INGEST_MAX_CLOCK_SKEW_SECS", 300)?),
            server_limits: ServerLimits {
                header_read_timeout,
                max_connections,
            },
            body_timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `pairs` with the event log's database named (required with `EVENT_LOG=on`).
    fn vars<const N: usize>(pairs: [(&str, &str); N]) -> Vars {
        Vars::from_pairs(
            pairs
                .into_iter()
                .chain([("EVENT_LOG_DATABASE_URL", "postgres://ecwid@db:5432/ecwid")]),
        )
    }

    const TOKEN: (&str, &str) = ("ADMIN_TOKEN", "0123456789abcdef");

    #[test]
    fn defaults() {
        let c = Config::from_vars(&vars([TOKEN])).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:8081");
        assert_eq!(c.max_body_bytes, 262_144);
        assert_eq!(c.publish_timeout, Duration::from_millis(2000));
        assert!(!c.require_signature);
        assert_eq!(c.max_event_age, None);
        assert_eq!(c.max_clock_skew, Duration::from_secs(300));
        assert_eq!(c.server_limits.max_connections, 1024);
        assert_eq!(c.server_limits.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.body_timeout, Duration::from_secs(10));
        assert!(!format!("{c:?}").contains("0123456789abcdef"));
        assert_eq!(c.admin.search_scan_budget, 20_000);
    }

    #[test]
    fn errors_name_the_variable() {
        let err = Config::from_vars(&vars([])).unwrap_err();
        assert_eq!(err.var, "ADMIN_TOKEN");
        for (var, value) in [
            ("INGEST_LISTEN", "8080"),
            ("INGEST_MAX_BODY_BYTES", "lots"),
            ("INGEST_PUBLISH_TIMEOUT_MS", "15000"),
            ("INGEST_REQUIRE_SIGNATURE", "perhaps"),
            ("INGEST_MAX_CLOCK_SKEW_SECS", "-1"),
            ("INGEST_HEADER_TIMEOUT_MS", "5"),
            ("INGEST_BODY_TIMEOUT_MS", "soon"),
            ("INGEST_MAX_CONNECTIONS", "0"),
            ("EVENT_SEARCH_SCAN_BUDGET", "10"),
            ("DELIVER_ALLOW_NETWORKS", "10.0.0.0/40"),
            ("NATS_URL", "http://localhost"),
        ] {
            let err = Config::from_vars(&vars([TOKEN, (var, value)])).unwrap_err();
            assert_eq!(err.var, var, "{value}");
        }
    }
}
