//! Configuration from environment variables.
//!
//! Every service builds one typed struct from a [`Vars`] map at start-up. A missing or bad value is
//! a [`ConfigError`] naming the variable; `main` prints it and exits with status 64 (`EX_USAGE`)
//! before any port is bound. Tests build `Vars` from a map; nothing here writes the environment.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use model::units::{parse_duration, parse_size};

/// Exit status for a configuration error (`EX_USAGE` from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

/// A variable that is missing or holds a value we cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {message}")]
pub struct ConfigError {
    pub var: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(var: &str, message: impl Into<String>) -> Self {
        Self {
            var: var.to_owned(),
            message: message.into(),
        }
    }
}

/// The variables a config is read from: the process environment, or a map in tests.
/// An empty value counts as unset. Every name asked for is noted, with its default where the
/// question says it, so a binary can print what it reads ([`Vars::read`], `--print-contract`).
#[derive(Debug, Clone, Default)]
pub struct Vars {
    values: HashMap<String, String>,
    read: Arc<Mutex<BTreeMap<String, VarRead>>>,
    /// `--print-contract`: nothing is set, and a required variable reads as a placeholder so
    /// that the rest of the configuration is still read (and noted).
    contract: bool,
}

/// One variable a configuration read: its default (`None`: none, or not a plain value) and
/// whether it must be set.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct VarRead {
    pub default: Option<String>,
    pub required: bool,
}

/// What a required variable reads as under [`Vars::for_contract`]: long enough for every check a
/// value must pass (a token's length).
const CONTRACT_PLACEHOLDER: &str = "print-contract-placeholder-value-0123456789";

impl Vars {
    pub fn from_env() -> Self {
        Self::from_pairs(std::env::vars())
    }

    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self {
            values: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            ..Self::default()
        }
    }

    /// No variable set and required ones answered with a placeholder: read a configuration
    /// from it to learn every variable it reads ([`Vars::read`]).
    pub fn for_contract() -> Self {
        Self {
            contract: true,
            ..Self::default()
        }
    }

    /// Every variable asked for so far, by name.
    pub fn read(&self) -> BTreeMap<String, VarRead> {
        self.noted().clone()
    }

    fn noted(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, VarRead>> {
        self.read
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn note(&self, name: &str, default: Option<&str>, required: bool) {
        let mut read = self.noted();
        let entry = read.entry(name.to_owned()).or_default();
        if entry.default.is_none() {
            entry.default = default.map(str::to_owned);
        }
        entry.required |= required;
    }

    /// The value, trimmed; `None` when unset or empty.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.note(name, None, false);
        self.values
            .get(name)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    }

    pub fn string_or(&self, name: &str, default: &str) -> String {
        self.note(name, Some(default), false);
        self.get(name).unwrap_or(default).to_owned()
    }

    pub fn required(&self, name: &str) -> Result<String, ConfigError> {
        self.note(name, None, true);
        if self.contract {
            return Ok(CONTRACT_PLACEHOLDER.to_owned());
        }
        self.get(name)
            .map(str::to_owned)
            .ok_or_else(|| ConfigError::new(name, "is required but not set"))
    }

    /// Parses the value with `FromStr`, or returns `default` when unset.
    pub fn parse_or<T>(&self, name: &str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr + fmt::Display,
        T::Err: fmt::Display,
    {
        self.note(name, Some(&default.to_string()), false);
        match self.get(name) {
            None => Ok(default),
            Some(raw) => raw
                .parse()
                .map_err(|e| ConfigError::new(name, format!("cannot parse `{raw}`: {e}"))),
        }
    }

    /// `true`/`false` (also `1`/`0`, `yes`/`no`).
    pub fn bool_or(&self, name: &str, default: bool) -> Result<bool, ConfigError> {
        self.note(name, Some(if default { "true" } else { "false" }), false);
        match self.get(name).map(str::to_ascii_lowercase).as_deref() {
            None => Ok(default),
            Some("true" | "1" | "yes" | "on") => Ok(true),
            Some("false" | "0" | "no" | "off") => Ok(false),
            Some(other) => Err(ConfigError::new(
                name,
                format!("expected true or false, got `{other}`"),
            )),
        }
    }

    /// A whole number of milliseconds, at least `min_ms`.
    pub fn millis_or(
        &self,
        name: &str,
        default_ms: u64,
        min_ms: u64,
    ) -> Result<Duration, ConfigError> {
        let ms: u64 = self.parse_or(name, default_ms)?;
        if ms < min_ms {
            return Err(ConfigError::new(
                name,
                format!("must be at least {min_ms} ms, got {ms}"),
            ));
        }
        Ok(Duration::from_millis(ms))
    }

    /// A socket address such as `0.0.0.0:8080`.
    pub fn addr_or(&self, name: &str, default: &str) -> Result<std::net::SocketAddr, ConfigError> {
        self.note(name, Some(default), false);
        let raw = self.get(name).unwrap_or(default);
        raw.parse().map_err(|e| {
            ConfigError::new(
                name,
                format!("expected host:port such as 0.0.0.0:8080, got `{raw}`: {e}"),
            )
        })
    }
}

/// Tokio's own variable for the runtime's worker threads, read here so that a bad value stops the
/// service with exit status 64 like any other setting (Tokio itself would panic on it) and an
/// empty one counts as unset.
pub const WORKER_THREADS: &str = "TOKIO_WORKER_THREADS";

/// The runtime's worker threads: [`WORKER_THREADS`], or as many as the CPUs this process may use.
pub fn worker_threads(vars: &Vars) -> Result<usize, ConfigError> {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    match vars.parse_or(WORKER_THREADS, cpus)? {
        0 => Err(ConfigError::new(WORKER_THREADS, "must be at least 1")),
        n => Ok(n),
    }
}

/// A secret value: usable, but never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// `NATS_URL` when unset.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// The NATS servers of `NATS_URL`: one address, or a cluster's addresses separated by commas
/// (`nats://host:port`, `tls://host:port`, or a bare `host:port`, which means `nats://`).
/// Async-nats takes the list as it is and picks another server when one goes away.
///
/// `Debug` and `Display` show scheme, host and port only: a URL may carry a user and password.
#[derive(Clone, PartialEq, Eq)]
pub struct NatsServers(Vec<async_nats::ServerAddr>);

impl NatsServers {
    /// Parses `NATS_URL`; the error says which entry is wrong and why.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let mut servers = Vec::new();
        for entry in raw.split(',').map(str::trim) {
            if entry.is_empty() {
                return Err(format!(
                    "an empty entry in `{}`; expected nats://host:port, comma-separated for a cluster",
                    model::instance::redact_url(raw)
                ));
            }
            let addr: async_nats::ServerAddr = entry.parse().map_err(|e| {
                format!(
                    "`{}` is not a NATS server address (nats://host:port or tls://host:port): {e}",
                    model::instance::redact_url(entry)
                )
            })?;
            // Async-nats also takes ws:// and wss://: not part of the documented contract, and
            // untested here, so refused rather than half-supported.
            if !matches!(addr.scheme(), "nats" | "tls") {
                return Err(format!(
                    "`{}`: the scheme must be nats:// or tls://, not {}://",
                    model::instance::redact_url(entry),
                    addr.scheme()
                ));
            }
            if addr.host().is_empty() {
                return Err(format!(
                    "`{}` names no host",
                    model::instance::redact_url(entry)
                ));
            }
            servers.push(addr);
        }
        Ok(Self(servers))
    }

    /// The addresses, in the order given; [`crate::nats::connect`] hands them to async-nats.
    pub fn addrs(&self) -> &[async_nats::ServerAddr] {
        &self.0
    }
}

/// `scheme://host:port` of an entry whatever it carries besides, for messages and logs.
impl fmt::Display for NatsServers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, addr) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            let host = addr.host();
            if host.contains(':') {
                write!(f, "{}://[{host}]:{}", addr.scheme(), addr.port())?;
            } else {
                write!(f, "{}://{host}:{}", addr.scheme(), addr.port())?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for NatsServers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NatsServers({self})")
    }
}

/// Settings every service reads.
#[derive(Debug, Clone)]
pub struct CommonConfig {
    /// `NATS_URL`, default `nats://127.0.0.1:4222`: one server, or a cluster's servers
    /// separated by commas. Parsed here, so a typo stops the service at start-up.
    pub nats_url: NatsServers,
    /// `STREAM_REPLICAS`, default 1 (3 in a clustered deployment).
    pub stream_replicas: usize,
    /// `RAW_DUPLICATE_WINDOW_SECS`, default 7200: how long JetStream remembers a message id.
    pub duplicate_window: Duration,
    /// `SHUTDOWN_GRACE_MS`, default 20000: the whole shutdown, from SIGTERM to exit. The work in
    /// hand gets it less the drain's reserve, the NATS drain the rest ([`crate::shutdown`]).
    pub shutdown_grace: Duration,
    /// `LOG_FORMAT`: `text` (default) or `json`.
    pub log_format: LogFormat,
    /// `EVENT_LOG`: `on` (default) or `off` (no records are written; for measuring its cost).
    pub event_log: bool,
    /// `EVENT_LOG_RETENTION`, default `7d`: how long records (and the envelopes they point to)
    /// are kept.
    pub event_log_retention: Duration,
    /// `STREAM_MAX_BYTES` and `STREAM_MAX_MSGS`: limits per stream (none by default).
    pub stream_limits: StreamLimits,
    /// Where the event log is stored: set by the services that write or read it
    /// ([`CommonConfig::with_event_log_database`]); `None` in the others and with the log off.
    pub event_log_database: Option<DatabaseConfig>,
}

/// The event log's PostgreSQL database.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseConfig {
    /// `EVENT_LOG_DATABASE_URL`, or `DATABASE_URL`: `postgres://user:password@host:port/db`,
    /// with `sslmode=disable|prefer|require|verify-ca|verify-full` (TLS, when used, is always
    /// verified: `require` checks the certificate as `verify-full` does).
    pub url: String,
    /// `EVENT_LOG_DATABASE_POOL`, default 8: connections per process.
    pub pool: usize,
    /// `EVENT_LOG_DATABASE_CA_FILE`: PEM certificates to trust for the server (default: the
    /// webpki roots).
    pub ca_file: Option<std::path::PathBuf>,
}

impl fmt::Debug for DatabaseConfig {
    /// The URL without its password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = url::Url::parse(&self.url)
            .map(|mut u| {
                if u.password().is_some() {
                    let _ = u.set_password(Some("redacted"));
                }
                u.to_string()
            })
            .unwrap_or_else(|_| "<unparseable>".to_owned());
        f.debug_struct("DatabaseConfig")
            .field("url", &shown)
            .field("pool", &self.pool)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl DatabaseConfig {
    /// The database settings; `None` when no URL is set.
    pub fn from_vars(vars: &Vars) -> Result<Option<Self>, ConfigError> {
        let url = vars
            .get("EVENT_LOG_DATABASE_URL")
            .or_else(|| vars.get("DATABASE_URL"))
            .map(str::to_owned);
        let pool: usize = vars.parse_or("EVENT_LOG_DATABASE_POOL", 8)?;
        if !(1..=256).contains(&pool) {
            return Err(ConfigError::new(
                "EVENT_LOG_DATABASE_POOL",
                "must be between 1 and 256",
            ));
        }
        let ca_file = vars
            .get("EVENT_LOG_DATABASE_CA_FILE")
            .map(std::path::PathBuf::from);
        if let Some(path) = &ca_file {
            if !vars.contract && !path.is_file() {
                return Err(ConfigError::new(
                    "EVENT_LOG_DATABASE_CA_FILE",
                    format!("{} is not a readable file", path.display()),
                ));
            }
        }
        let Some(url) = url else { return Ok(None) };
        let var = if vars.get("EVENT_LOG_DATABASE_URL").is_some() {
            "EVENT_LOG_DATABASE_URL"
        } else {
            "DATABASE_URL"
        };
        parse_database_url(&url).map_err(|e| ConfigError::new(var, e))?;
        Ok(Some(Self { url, pool, ca_file }))
    }
}

/// Byte and message limits per stream, from `STREAM_MAX_BYTES` and `STREAM_MAX_MSGS`
/// (`ECWID_RAW=4GiB,ECWID_EVENTS=8GiB`; a stream not named has no limit but its age).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamLimits {
    pub max_bytes: std::collections::BTreeMap<String, i64>,
    pub max_msgs: std::collections::BTreeMap<String, i64>,
}

/// The streams whose limits can be set.
pub const LIMITED_STREAMS: [&str; 6] = [
    "ECWID_RAW",
    "ECWID_EVENTS",
    "ECWID_DEAD",
    "ECWID_HELD",
    "ECWID_RETRYING",
    "ECWID_LOG_SPOOL",
];

/// Streams of earlier releases (the JetStream event log) that a limit may still name, and that
/// are ignored: a deployment's `STREAM_MAX_BYTES` keeps working across the upgrade.
pub const RETIRED_STREAMS: [&str; 2] = ["ECWID_LOG", "ECWID_LOG_INDEX"];

impl StreamLimits {
    pub fn parse(max_bytes: &str, max_msgs: &str) -> Result<Self, ConfigError> {
        Ok(Self {
            max_bytes: parse_limits("STREAM_MAX_BYTES", max_bytes, parse_size)?,
            max_msgs: parse_limits("STREAM_MAX_MSGS", max_msgs, |v| {
                v.trim()
                    .parse::<i64>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("`{v}` is not a positive number of messages"))
            })?,
        })
    }

    /// The limits of `stream` (-1: none), as JetStream takes them.
    pub fn of(&self, stream: &str) -> (i64, i64) {
        (
            self.max_bytes.get(stream).copied().unwrap_or(-1),
            self.max_msgs.get(stream).copied().unwrap_or(-1),
        )
    }
}

fn parse_limits(
    var: &str,
    raw: &str,
    value: impl Fn(&str) -> Result<i64, String>,
) -> Result<std::collections::BTreeMap<String, i64>, ConfigError> {
    let mut out = std::collections::BTreeMap::new();
    for item in raw.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (name, v) = item
            .split_once('=')
            .ok_or_else(|| ConfigError::new(var, format!("`{item}` is not STREAM=LIMIT")))?;
        let name = name.trim();
        if RETIRED_STREAMS.contains(&name) {
            // The JetStream event log's streams: no longer written, so no longer limited.
            continue;
        }
        if !LIMITED_STREAMS.contains(&name) {
            return Err(ConfigError::new(
                var,
                format!(
                    "unknown stream `{name}` (one of {})",
                    LIMITED_STREAMS.join(", ")
                ),
            ));
        }
        let v = value(v).map_err(|e| ConfigError::new(var, format!("{name}: {e}")))?;
        if out.insert(name.to_owned(), v).is_some() {
            return Err(ConfigError::new(var, format!("`{name}` is named twice")));
        }
    }
    Ok(out)
}

impl CommonConfig {
    pub fn from_vars(vars: &Vars) -> Result<Self, ConfigError> {
        let nats_url = NatsServers::parse(&vars.string_or("NATS_URL", DEFAULT_NATS_URL))
            .map_err(|message| ConfigError::new("NATS_URL", message))?;
        let stream_replicas: usize = vars.parse_or("STREAM_REPLICAS", 1)?;
        if !(1..=5).contains(&stream_replicas) {
            return Err(ConfigError::new(
                "STREAM_REPLICAS",
                "must be between 1 and 5",
            ));
        }
        let window_secs: u64 = vars.parse_or("RAW_DUPLICATE_WINDOW_SECS", 7200)?;
        if window_secs == 0 {
            return Err(ConfigError::new(
                "RAW_DUPLICATE_WINDOW_SECS",
                "must be at least 1",
            ));
        }
        let log_format = match vars
            .get("LOG_FORMAT")
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError::new(
                    "LOG_FORMAT",
                    format!("expected text or json, got `{other}`"),
                ))
            }
        };
        let event_log = match vars
            .get("EVENT_LOG")
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("on" | "true" | "1") => true,
            Some("off" | "false" | "0") => false,
            Some(other) => {
                return Err(ConfigError::new(
                    "EVENT_LOG",
                    format!("expected on or off, got `{other}`"),
                ))
            }
        };
        let event_log_retention = parse_duration(&vars.string_or("EVENT_LOG_RETENTION", "7d"))
            .map_err(|e| ConfigError::new("EVENT_LOG_RETENTION", e))?;
        if event_log_retention < Duration::from_secs(3600) {
            return Err(ConfigError::new(
                "EVENT_LOG_RETENTION",
                "must be at least 1h",
            ));
        }
        let stream_limits = StreamLimits::parse(
            &vars.string_or("STREAM_MAX_BYTES", ""),
            &vars.string_or("STREAM_MAX_MSGS", ""),
        )?;
        Ok(Self {
            stream_limits,
            nats_url,
            stream_replicas,
            duplicate_window: Duration::from_secs(window_secs),
            shutdown_grace: vars.millis_or("SHUTDOWN_GRACE_MS", 20_000, 0)?,
            log_format,
            event_log,
            event_log_retention,
            event_log_database: None,
        })
    }

    /// For the services that write or read the event log (ingest's admin API, normalizer,
    /// deliverer): with `EVENT_LOG=on` its database must be named.
    pub fn with_event_log_database(mut self, vars: &Vars) -> Result<Self, ConfigError> {
        let database = DatabaseConfig::from_vars(vars)?;
        if self.event_log {
            if vars.contract {
                self.event_log_database = database;
                return Ok(self);
            }
            let database = database.ok_or_else(|| {
                ConfigError::new(
                    "EVENT_LOG_DATABASE_URL",
                    "is required with EVENT_LOG=on (a PostgreSQL URL; DATABASE_URL also works), \
                     or set EVENT_LOG=off to run without the event log",
                )
            })?;
            self.event_log_database = Some(database);
        }
        Ok(self)
    }
}

/// `url` as tokio-postgres takes it. libpq's `sslmode=verify-ca` and `verify-full` are taken as
/// `require`: TLS here always verifies the certificate and the host name.
pub fn parse_database_url(url: &str) -> Result<tokio_postgres::Config, String> {
    let mut url = url.to_owned();
    for strict in ["sslmode=verify-full", "sslmode=verify-ca"] {
        url = url.replace(strict, "sslmode=require");
    }
    let config: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| format!("not a PostgreSQL URL: {e}"))?;
    if config.get_hosts().is_empty() {
        return Err("names no host".to_owned());
    }
    if config.get_dbname().is_none() {
        return Err("names no database (postgres://user:password@host:5432/database)".to_owned());
    }
    Ok(config)
}

/// Prints a configuration error and exits with [`EXIT_CONFIG`]. For `main` only.
pub fn exit_on_error<T>(result: Result<T, ConfigError>) -> T {
    match result {
        Ok(value) => value,
        Err(err) => {
            eprintln!("configuration error: {err}");
            std::process::exit(EXIT_CONFIG);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_contract_read_notes_every_variable_with_its_default() {
        let vars = Vars::for_contract();
        let config = CommonConfig::from_vars(&vars).expect("defaults are valid");
        assert_eq!(config.stream_replicas, 1);
        assert_eq!(
            vars.required("ADMIN_TOKEN").expect("placeholder"),
            CONTRACT_PLACEHOLDER
        );
        let read = vars.read();
        assert_eq!(
            read["NATS_URL"],
            VarRead {
                default: Some(DEFAULT_NATS_URL.to_owned()),
                required: false
            }
        );
        assert_eq!(read["STREAM_REPLICAS"].default.as_deref(), Some("1"));
        assert!(read["ADMIN_TOKEN"].required);
        for name in [
            "LOG_FORMAT",
            "EVENT_LOG",
            "EVENT_LOG_RETENTION",
            "STREAM_MAX_BYTES",
        ] {
            assert!(read.contains_key(name), "{name} not noted: {read:?}");
        }
        // Outside contract mode a required variable is still required.
        assert!(Vars::default().required("ADMIN_TOKEN").is_err());
    }

    #[test]
    fn defaults_apply_when_unset_or_empty() {
        let cfg = CommonConfig::from_vars(&Vars::from_pairs([("NATS_URL", "")])).unwrap();
        assert_eq!(cfg.nats_url.to_string(), "nats://127.0.0.1:4222");
        assert_eq!(cfg.stream_replicas, 1);
        assert_eq!(cfg.duplicate_window, Duration::from_secs(7200));
        assert_eq!(cfg.log_format, LogFormat::Text);
    }

    #[test]
    fn worker_threads_default_to_the_cpus_and_refuse_zero() {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        assert_eq!(worker_threads(&Vars::default()).unwrap(), cpus);
        assert_eq!(
            worker_threads(&Vars::from_pairs([(WORKER_THREADS, " ")])).unwrap(),
            cpus
        );
        assert_eq!(
            worker_threads(&Vars::from_pairs([(WORKER_THREADS, "1")])).unwrap(),
            1
        );
        for bad in ["0", "-1", "two"] {
            let err = worker_threads(&Vars::from_pairs([(WORKER_THREADS, bad)])).unwrap_err();
            assert_eq!(err.var, WORKER_THREADS, "{bad}");
        }
    }

    #[test]
    fn bad_values_name_the_variable() {
        let err =
            CommonConfig::from_vars(&Vars::from_pairs([("STREAM_REPLICAS", "three")])).unwrap_err();
        assert_eq!(err.var, "STREAM_REPLICAS");
        let err = CommonConfig::from_vars(&Vars::from_pairs([("LOG_FORMAT", "xml")])).unwrap_err();
        assert_eq!(err.var, "LOG_FORMAT");
        assert!(err.to_string().starts_with("LOG_FORMAT: "));
        let err =
            CommonConfig::from_vars(&Vars::from_pairs([("NATS_URL", "http://x")])).unwrap_err();
        assert_eq!(err.var, "NATS_URL");
        let err = Vars::default().required("ADMIN_TOKEN").unwrap_err();
        assert_eq!(err.var, "ADMIN_TOKEN");
        let err = Vars::from_pairs([("X", "maybe")])
            .bool_or("X", false)
            .unwrap_err();
        assert_eq!(err.var, "X");
        let err = Vars::from_pairs([("L", "nowhere")])
            .addr_or("L", "0.0.0.0:1")
            .unwrap_err();
        assert_eq!(err.var, "L");
    }

    #[test]
    fn nats_url_takes_a_cluster_as_a_comma_separated_list() {
        let vars = Vars::from_pairs([(
            "NATS_URL",
            "nats://10.0.0.1:4222, nats://10.0.0.2:4223 ,10.0.0.3:4224",
        )]);
        let cfg = CommonConfig::from_vars(&vars).unwrap();
        let addrs = cfg.nats_url.addrs();
        assert_eq!(addrs.len(), 3);
        assert_eq!(
            addrs
                .iter()
                .map(|a| (a.host(), a.port()))
                .collect::<Vec<_>>(),
            [("10.0.0.1", 4222), ("10.0.0.2", 4223), ("10.0.0.3", 4224)]
        );
        // A bare host:port is nats://.
        assert_eq!(addrs[2].scheme(), "nats");
        assert_eq!(
            cfg.nats_url.to_string(),
            "nats://10.0.0.1:4222,nats://10.0.0.2:4223,nats://10.0.0.3:4224"
        );
    }

    #[test]
    fn nats_url_keeps_tls_and_hides_credentials() {
        let servers =
            NatsServers::parse("tls://svc:s3cret@nats-0.nats:4222,tls://nats-1.nats:4222").unwrap();
        assert!(servers.addrs().iter().all(|a| a.tls_required()));
        assert_eq!(servers.addrs()[0].password(), Some("s3cret"));
        let shown = format!("{servers} {servers:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("tls://nats-0.nats:4222"), "{shown}");
    }

    #[test]
    fn a_malformed_nats_url_entry_is_refused_naming_it() {
        for (raw, names) in [
            ("nats://a:4222,nats://b:42x2", "nats://b:42x2"),
            ("nats://a:4222,,nats://b:4222", "empty entry"),
            ("nats://a:4222;nats://b:4222", "nats://a:4222;nats://b:4222"),
            ("http://nats:4222", "http://nats:4222"),
            ("ws://nats:443", "ws://nats:443"),
            ("nats://", "nats://"),
            ("nats://user:hunter2@a:99999", "nats://********@a:99999"),
            ("user:hunter2@a:99999", "********@a:99999"),
        ] {
            let err = CommonConfig::from_vars(&Vars::from_pairs([("NATS_URL", raw)])).unwrap_err();
            assert_eq!(err.var, "NATS_URL", "{raw}");
            assert!(err.message.contains(names), "{raw}: {err}");
            assert!(!err.message.contains("hunter2"), "{raw}: {err}");
        }
    }

    #[test]
    fn the_event_log_needs_its_database_unless_it_is_off() {
        let err = CommonConfig::from_vars(&Vars::default())
            .unwrap()
            .with_event_log_database(&Vars::default())
            .unwrap_err();
        assert_eq!(err.var, "EVENT_LOG_DATABASE_URL");
        let off = Vars::from_pairs([("EVENT_LOG", "off")]);
        let c = CommonConfig::from_vars(&off)
            .unwrap()
            .with_event_log_database(&off)
            .unwrap();
        assert!(c.event_log_database.is_none());
        let on = Vars::from_pairs([("DATABASE_URL", "postgresql://u:hunter2@db/ecwid")]);
        let c = CommonConfig::from_vars(&on)
            .unwrap()
            .with_event_log_database(&on)
            .unwrap();
        let db = c.event_log_database.expect("named");
        assert_eq!(db.pool, 8);
        assert!(!format!("{db:?}").contains("hunter2"), "{db:?}");
        let bad = Vars::from_pairs([("EVENT_LOG_DATABASE_URL", "postgres://u@db")]);
        let err = CommonConfig::from_vars(&bad)
            .unwrap()
            .with_event_log_database(&bad)
            .unwrap_err();
        assert_eq!(err.var, "EVENT_LOG_DATABASE_URL");
    }

    #[test]
    fn stream_limits_name_known_streams_with_sizes() {
        let l = StreamLimits::parse(
            "ECWID_RAW=1500MB, ECWID_EVENTS=2GiB,ECWID_LOG=1",
            "ECWID_DEAD=1000",
        )
        .unwrap();
        assert_eq!(l.of("ECWID_RAW"), (1_500_000_000, -1));
        assert_eq!(l.of("ECWID_EVENTS"), (2 << 30, -1));
        assert_eq!(l.of("ECWID_DEAD"), (-1, 1000));
        assert_eq!(l.of("ECWID_HELD"), (-1, -1));
        assert_eq!(
            l.of("ECWID_LOG"),
            (-1, -1),
            "a retired stream's limit is ignored"
        );
        assert_eq!(
            StreamLimits::parse("", "").unwrap(),
            StreamLimits::default()
        );
        for (bytes, msgs) in [
            ("ECWID_NOPE=1GB", ""),
            ("ECWID_RAW", ""),
            ("ECWID_RAW=1XB", ""),
            ("ECWID_RAW=0", ""),
            ("ECWID_RAW=1GB,ECWID_RAW=2GB", ""),
            ("", "ECWID_RAW=-5"),
            ("ECWID_RAW=9999999TiB", ""),
        ] {
            let err = StreamLimits::parse(bytes, msgs).unwrap_err();
            let var = if bytes.is_empty() {
                "STREAM_MAX_MSGS"
            } else {
                "STREAM_MAX_BYTES"
            };
            assert_eq!(err.var, var, "{bytes} {msgs}");
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(s.expose(), "hunter2");
    }
}
