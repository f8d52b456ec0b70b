//! The normalizer's configuration, from environment variables.

use std::net::SocketAddr;
use std::time::Duration;

use shared::config::{CommonConfig, ConfigError, Vars};

pub const DEFAULT_OPS_LISTEN: &str = "0.0.0.0:9101";

#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    /// `OPS_LISTEN`: `/metrics`, `/healthz`, `/readyz`.
    pub ops_listen: SocketAddr,
    /// `NORMALIZER_CONCURRENCY`, default 256: raw messages in work at once.
    pub concurrency: usize,
    /// `NORMALIZER_PUBLISH_TIMEOUT_MS`, default 5000: wait for the envelopes' acks.
    pub publish_timeout: Duration,
}

impl Config {
    pub fn from_vars(vars: &Vars) -> Result<Self, ConfigError> {
        let concurrency: usize = vars.parse_or("NORMALIZER_CONCURRENCY", 256)?;
        if !(1..=4096).contains(&concurrency) {
            return Err(ConfigError::new(
                "NORMALIZER_CONCURRENCY",
                "must be between 1 and 4096",
            ));
        }
        Ok(Self {
            common: CommonConfig::from_vars(vars)?.with_event_log_database(vars)?,
            ops_listen: vars.addr_or("OPS_LISTEN", DEFAULT_OPS_LISTEN)?,
            concurrency,
            publish_timeout: vars.millis_or("NORMALIZER_PUBLISH_TIMEOUT_MS", 5_000, 100)?,
        })
    }

    /// How long the server waits for an ack before redelivering: longer than any publish wait.
    pub fn ack_wait(&self) -> Duration {
        self.publish_timeout * 2 + Duration::from_secs(20)
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

    #[test]
    fn defaults_and_errors() {
        let c = Config::from_vars(&vars([])).unwrap();
        assert_eq!(c.ops_listen.to_string(), "0.0.0.0:9101");
        assert_eq!(c.concurrency, 256);
        assert!(c.ack_wait() > c.publish_timeout);
        let err = Config::from_vars(&vars([("NORMALIZER_CONCURRENCY", "0")])).unwrap_err();
        assert_eq!(err.var, "NORMALIZER_CONCURRENCY");
        let err =
            Config::from_vars(&vars([("NORMALIZER_PUBLISH_TIMEOUT_MS", "soon")])).unwrap_err();
        assert_eq!(err.var, "NORMALIZER_PUBLISH_TIMEOUT_MS");
    }
}
