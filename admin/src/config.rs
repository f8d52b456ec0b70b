//! The admin API's configuration, from environment variables (read by the binary that mounts
//! it, beside its own).

use model::netguard::AllowList;
use shared::config::{CommonConfig, ConfigError, Secret, Vars};

#[derive(Debug, Clone)]
pub struct Config {
    /// The settings every service shares (the event log's on/off and retention are checked
    /// against instances' retry schedules).
    pub common: CommonConfig,
    /// `ADMIN_TOKEN` (required): the bearer token of the admin API.
    pub admin_token: Secret,
    /// `ADMIN_READ_TOKEN` (optional): a second bearer token that may call every `GET` of the
    /// admin API and nothing else (the console signed in with it shows no actions).
    pub admin_read_token: Option<Secret>,
    /// `DELIVER_ALLOW_NETWORKS`: literal callback addresses the admin API accepts.
    pub allow_networks: AllowList,
    /// `EVENT_SEARCH_SCAN_BUDGET`, default 20000: how many index entries (stream sequences) one
    /// `GET /events` walks back through at most; a search the budget does not finish answers what
    /// it found with a `next` cursor to go on from.
    pub search_scan_budget: u64,
}

impl Config {
    pub fn from_vars(vars: &Vars) -> Result<Self, ConfigError> {
        let token = vars.required("ADMIN_TOKEN")?;
        if token.len() < 16 {
            return Err(ConfigError::new(
                "ADMIN_TOKEN",
                "must be at least 16 characters",
            ));
        }
        let read_token = vars.get("ADMIN_READ_TOKEN").filter(|t| !t.is_empty());
        if let Some(read) = read_token {
            if read.len() < 16 {
                return Err(ConfigError::new(
                    "ADMIN_READ_TOKEN",
                    "must be at least 16 characters",
                ));
            }
            if read == token {
                return Err(ConfigError::new(
                    "ADMIN_READ_TOKEN",
                    "must differ from ADMIN_TOKEN",
                ));
            }
        }
        let admin_read_token = read_token.map(Secret::new);
        let search_scan_budget: u64 = vars.parse_or("EVENT_SEARCH_SCAN_BUDGET", 20_000)?;
        if !(100..=10_000_000).contains(&search_scan_budget) {
            return Err(ConfigError::new(
                "EVENT_SEARCH_SCAN_BUDGET",
                "must be between 100 and 10000000",
            ));
        }
        Ok(Self {
            common: CommonConfig::from_vars(vars)?.with_event_log_database(vars)?,
            admin_token: Secret::new(token),
            admin_read_token,
            allow_networks: AllowList::parse(&vars.string_or("DELIVER_ALLOW_NETWORKS", ""))
                .map_err(|e| ConfigError::new("DELIVER_ALLOW_NETWORKS", e))?,
            search_scan_budget,
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
    fn defaults_and_errors_name_the_variable() {
        let c = Config::from_vars(&vars([TOKEN])).unwrap();
        assert!(c.admin_read_token.is_none());
        assert_eq!(c.search_scan_budget, 20_000);
        assert!(!format!("{c:?}").contains("0123456789abcdef"));
        assert_eq!(Config::from_vars(&vars([])).unwrap_err().var, "ADMIN_TOKEN");
        for (var, value) in [
            ("ADMIN_TOKEN", "short"),
            ("EVENT_SEARCH_SCAN_BUDGET", "10"),
            ("DELIVER_ALLOW_NETWORKS", "10.0.0.0/40"),
        ] {
            let err = Config::from_vars(&vars([TOKEN, (var, value)])).unwrap_err();
            assert_eq!(err.var, var, "{value}");
        }
    }

    #[test]
    fn read_token_is_optional_long_and_distinct() {
        let read = ("ADMIN_READ_TOKEN", "read-only-token-0123");
        let c = Config::from_vars(&vars([TOKEN, read])).unwrap();
        assert_eq!(
            c.admin_read_token.as_ref().map(|s| s.expose()),
            Some("read-only-token-0123")
        );
        assert!(!format!("{c:?}").contains("read-only-token-0123"));
        for bad in ["short", "0123456789abcdef"] {
            let err = Config::from_vars(&vars([TOKEN, ("ADMIN_READ_TOKEN", bad)])).unwrap_err();
            assert_eq!(err.var, "ADMIN_READ_TOKEN", "{bad}");
        }
    }
}
