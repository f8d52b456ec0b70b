//! The deliverer's configuration, from environment variables.

use std::net::SocketAddr;
use std::time::Duration;

use model::netguard::AllowList;
use model::retry::{self, parse_schedule, MAX_ATTEMPT_TIMEOUT};
use shared::config::{CommonConfig, ConfigError, Secret, Vars};

pub const DEFAULT_OPS_LISTEN: &str = "0.0.0.0:9102";
pub const DEFAULT_SCHEDULE: &str = "5s,30s,2m,10m,30m,1h,2h,4h,8h,9h";
pub const DEFAULT_DISABLE_AFTER: &str = "72h";

#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    /// `OPS_LISTEN`: `/metrics`, `/healthz`, `/readyz`.
    pub ops_listen: SocketAddr,
    /// `DELIVER_CONNECT_TIMEOUT_MS`, default 5000.
    pub connect_timeout: Duration,
    /// `DELIVER_TIMEOUT_MS`, default 15000: the whole request.
    pub timeout: Duration,
    /// `DELIVER_RETRY_SCHEDULE`: the waits between attempts; attempts = waits + 1.
    pub schedule: Vec<Duration>,
    /// `DELIVER_MAX_IN_FLIGHT`, default 256.
    pub max_in_flight: usize,
    /// `DELIVER_MAX_IN_FLIGHT_PER_HOST`, default 16.
    pub max_in_flight_per_host: usize,
    /// `DELIVER_QUEUE_PER_INSTANCE`, default 256, and `DELIVER_QUEUE_TOTAL`, default 4096:
    /// deliveries that wait in this replica for a slot of their instance without holding one of
    /// the `DELIVER_MAX_IN_FLIGHT` consumer slots, per instance and in all.
    pub queue: crate::limits::Park,
    /// `DELIVER_BREAKER_FAILURES`, default 5: consecutive failures that open a URL's breaker.
    pub breaker_failures: u32,
    /// `DELIVER_BREAKER_COOLDOWN_MS`, default 30000.
    pub breaker_cooldown: Duration,
    /// `DELIVER_ALLOW_NETWORKS`: networks callbacks may reach despite the SSRF guard.
    pub allow_networks: AllowList,
    /// `DELIVER_DISABLE_AFTER`, default `72h`, `0` = never: how long an instance's callback may
    /// fail without a success before the instance is disabled.
    pub disable_after: Option<Duration>,
    /// `DELIVER_PROXY_URL`: the HTTP CONNECT proxy every request goes through, unless an
    /// instance names its own (`event.notification.proxy.url`). May hold credentials.
    pub proxy_url: Option<Secret>,
    /// `DELIVER_PROXY_ALLOW_NETWORKS`: networks a proxy may be at despite the SSRF guard (a
    /// proxy usually sits on the operator's own network). Targets are never let through by it.
    pub proxy_allow_networks: AllowList,
}

impl Config {
    pub fn from_vars(vars: &Vars) -> Result<Self, ConfigError> {
        let connect_timeout = vars.millis_or("DELIVER_CONNECT_TIMEOUT_MS", 5_000, 10)?;
        let timeout = vars.millis_or("DELIVER_TIMEOUT_MS", 15_000, 10)?;
        if timeout > MAX_ATTEMPT_TIMEOUT {
            return Err(ConfigError::new(
                "DELIVER_TIMEOUT_MS",
                format!("must be at most {}", MAX_ATTEMPT_TIMEOUT.as_millis()),
            ));
        }
        let schedule = parse_schedule(&vars.string_or("DELIVER_RETRY_SCHEDULE", DEFAULT_SCHEDULE))
            .map_err(|e| ConfigError::new("DELIVER_RETRY_SCHEDULE", e))?;
        let max_in_flight: usize = vars.parse_or("DELIVER_MAX_IN_FLIGHT", 256)?;
        if !(1..=10_000).contains(&max_in_flight) {
            return Err(ConfigError::new(
                "DELIVER_MAX_IN_FLIGHT",
                "must be between 1 and 10000",
            ));
        }
        let max_in_flight_per_host: usize = vars.parse_or("DELIVER_MAX_IN_FLIGHT_PER_HOST", 16)?;
        if max_in_flight_per_host == 0 || max_in_flight_per_host > max_in_flight {
            return Err(ConfigError::new(
                "DELIVER_MAX_IN_FLIGHT_PER_HOST",
                "must be between 1 and DELIVER_MAX_IN_FLIGHT",
            ));
        }
        let per_instance: usize = vars.parse_or("DELIVER_QUEUE_PER_INSTANCE", 256)?;
        if !(1..=100_000).contains(&per_instance) {
            return Err(ConfigError::new(
                "DELIVER_QUEUE_PER_INSTANCE",
                "must be between 1 and 100000",
            ));
        }
        let total: usize = vars.parse_or("DELIVER_QUEUE_TOTAL", 4096)?;
        if !(per_instance..=1_000_000).contains(&total) {
            return Err(ConfigError::new(
                "DELIVER_QUEUE_TOTAL",
                "must be between DELIVER_QUEUE_PER_INSTANCE and 1000000",
            ));
        }
        let breaker_failures: u32 = vars.parse_or("DELIVER_BREAKER_FAILURES", 5)?;
        if breaker_failures == 0 {
            return Err(ConfigError::new(
                "DELIVER_BREAKER_FAILURES",
                "must be at least 1",
            ));
        }
        let disable_after = vars.string_or("DELIVER_DISABLE_AFTER", DEFAULT_DISABLE_AFTER);
        let disable_after = Some(
            model::units::parse_duration(&disable_after)
                .map_err(|e| ConfigError::new("DELIVER_DISABLE_AFTER", e))?,
        )
        .filter(|d| !d.is_zero());
        let proxy_url = vars
            .get("DELIVER_PROXY_URL")
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(|v| {
                model::receiver::check_proxy_url(v)
                    .map(|_| Secret::new(v))
                    .map_err(|e| ConfigError::new("DELIVER_PROXY_URL", e))
            })
            .transpose()?;
        let common = CommonConfig::from_vars(vars)?.with_event_log_database(vars)?;
        // A record must outlive the retries it describes, or a retrying event would vanish from
        // the log while still being delivered.
        if common.event_log && !retry::log_outlasts(&schedule, common.event_log_retention) {
            return Err(ConfigError::new(
                "EVENT_LOG_RETENTION",
                format!(
                    "must be at least as long as DELIVER_RETRY_SCHEDULE lasts ({} h); raise it",
                    retry::schedule_span(&schedule).as_secs().div_ceil(3600)
                ),
            ));
        }
        Ok(Self {
            common,
            ops_listen: vars.addr_or("OPS_LISTEN", DEFAULT_OPS_LISTEN)?,
            connect_timeout,
            timeout,
            schedule,
            max_in_flight,
            max_in_flight_per_host,
            queue: crate::limits::Park {
                per_instance,
                total,
            },
            breaker_failures,
            breaker_cooldown: vars.millis_or("DELIVER_BREAKER_COOLDOWN_MS", 30_000, 10)?,
            allow_networks: AllowList::parse(&vars.string_or("DELIVER_ALLOW_NETWORKS", ""))
                .map_err(|e| ConfigError::new("DELIVER_ALLOW_NETWORKS", e))?,
            disable_after,
            proxy_url,
            proxy_allow_networks: AllowList::parse(
                &vars.string_or("DELIVER_PROXY_ALLOW_NETWORKS", ""),
            )
            .map_err(|e| ConfigError::new("DELIVER_PROXY_ALLOW_NETWORKS", e))?,
        })
    }

    /// How long the server waits for an ack: the longest a message can be in work (waiting for a
    /// host slot, then the whole request) plus a margin, so it is never worked on twice at once.
    pub fn ack_wait(&self) -> Duration {
        model::retry::HOST_SLOT_WAIT + self.timeout + Duration::from_secs(15)
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
    fn defaults() {
        let c = Config::from_vars(&vars([])).unwrap();
        assert_eq!(c.ops_listen.to_string(), "0.0.0.0:9102");
        assert_eq!(c.schedule.len(), 10);
        assert!(c.schedule.iter().sum::<Duration>() >= Duration::from_secs(24 * 3600));
        assert_eq!(
            (c.connect_timeout, c.timeout),
            (Duration::from_secs(5), Duration::from_secs(15))
        );
        assert!(c.ack_wait() > c.timeout);
        assert_eq!((c.queue.per_instance, c.queue.total), (256, 4096));
        assert_eq!(c.disable_after, Some(Duration::from_secs(72 * 3600)));
        let never = Config::from_vars(&vars([("DELIVER_DISABLE_AFTER", "0")])).unwrap();
        assert_eq!(never.disable_after, None);
    }

    #[test]
    fn the_longest_attempt_fits_the_schedule_allowance() {
        // parse_schedule budgets ATTEMPT_ALLOWANCE per attempt: it must cover the longest time
        // the server lets one attempt hold a message.
        let c = Config::from_vars(&vars([("DELIVER_TIMEOUT_MS", "600000")])).unwrap();
        assert!(
            c.ack_wait() <= model::retry::ATTEMPT_ALLOWANCE,
            "{:?}",
            c.ack_wait()
        );
        let err = Config::from_vars(&vars([("DELIVER_TIMEOUT_MS", "600001")])).unwrap_err();
        assert_eq!(err.var, "DELIVER_TIMEOUT_MS");
    }

    #[test]
    fn errors_name_the_variable() {
        for (var, value) in [
            ("DELIVER_RETRY_SCHEDULE", "5s,soon"),
            ("DELIVER_RETRY_SCHEDULE", "3000000000h"),
            ("DELIVER_RETRY_SCHEDULE", "1d,2d,3d"),
            ("DELIVER_RETRY_SCHEDULE", "0s"),
            ("DELIVER_TIMEOUT_MS", "x"),
            ("DELIVER_MAX_IN_FLIGHT", "0"),
            ("DELIVER_MAX_IN_FLIGHT_PER_HOST", "100000"),
            ("DELIVER_QUEUE_PER_INSTANCE", "0"),
            ("DELIVER_QUEUE_TOTAL", "10"),
            ("DELIVER_BREAKER_FAILURES", "0"),
            ("DELIVER_ALLOW_NETWORKS", "everything"),
            ("DELIVER_DISABLE_AFTER", "3 days"),
            ("DELIVER_PROXY_URL", "socks5://proxy.example:1080"),
            ("DELIVER_PROXY_ALLOW_NETWORKS", "the office"),
            ("OPS_LISTEN", "9102"),
            // Shorter than the default schedule's 24 h 43 min.
            ("EVENT_LOG_RETENTION", "24h"),
            ("EVENT_LOG_RETENTION", "forever"),
        ] {
            let err = Config::from_vars(&vars([(var, value)])).unwrap_err();
            assert_eq!(err.var, var, "{value}");
        }
    }
}
