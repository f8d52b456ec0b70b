//! The admin API's configuration, from environment variables (read by the binary that mounts
//! it, beside its own).

use std::time::Duration;

use model::instance::{keys, Instance};
use model::netguard::AllowList;
use shared::config::{CommonConfig, ConfigError, Secret, Vars};

/// `ECWID_OAUTH_URL` when unset: Ecwid's OAuth, whose `/authorize` and `/token` the app uses.
pub const DEFAULT_OAUTH_URL: &str = "https://my.ecwid.com/api/oauth";
/// `ECWID_APP_PURGE_AFTER` when unset.
pub const DEFAULT_PURGE_AFTER: &str = "30d";
/// `ECWID_APP_SCOPES` when unset: what the poller reads and webhooks need.
pub const DEFAULT_SCOPES: &str = "read_store_profile read_catalog read_orders read_customers";
/// What `{storeId}` stands for in the template's callback URL and name.
pub const STORE_ID_PLACEHOLDER: &str = "{storeId}";

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
    /// App mode (`ECWID_APP_CLIENT_ID` set): installs provision stores, uninstalls disable and
    /// purge them.
    pub app: Option<AppConfig>,
}

/// The Ecwid app's settings (app mode).
#[derive(Debug, Clone)]
pub struct AppConfig {
    /// `ECWID_APP_CLIENT_ID`.
    pub client_id: String,
    /// `ECWID_APP_CLIENT_SECRET`: the token exchange, the OAuth `state`'s signature, and the
    /// signature of every provisioned store's webhooks.
    pub client_secret: Secret,
    /// `ECWID_APP_REDIRECT_URL`: the public URL of `GET /ecwid/oauth/callback`.
    pub redirect_url: String,
    /// `ECWID_APP_SCOPES`: space-separated.
    pub scopes: String,
    /// `ECWID_OAUTH_URL`, without a trailing slash.
    pub oauth_url: String,
    /// `ECWID_APP_INSTANCE_TEMPLATE` or `ECWID_APP_INSTANCE_TEMPLATE_FILE`: what every installed
    /// store's instance starts from (no store id, no API token).
    pub template: Instance,
    /// `ECWID_APP_PURGE_AFTER` (default 30 days): how long after an uninstall a store's data is
    /// purged; zero: at once; `None` (`never`): never.
    pub purge_after: Option<Duration>,
    /// `ECWID_APP_RETURN_URL`: where a merchant goes after a successful install (303), instead
    /// of the page saying so.
    pub return_url: Option<String>,
}

impl AppConfig {
    /// `None` unless `ECWID_APP_CLIENT_ID` is set. Every variable is read either way, so the
    /// contract lists them.
    pub fn from_vars(vars: &Vars, allow: &AllowList) -> Result<Option<Self>, ConfigError> {
        let client_id = vars.get("ECWID_APP_CLIENT_ID").map(str::to_owned);
        let secret = vars.get("ECWID_APP_CLIENT_SECRET").map(Secret::new);
        let redirect_url = vars.get("ECWID_APP_REDIRECT_URL").map(str::to_owned);
        let scopes = vars.string_or("ECWID_APP_SCOPES", DEFAULT_SCOPES);
        let oauth_url = vars.string_or("ECWID_OAUTH_URL", DEFAULT_OAUTH_URL);
        let inline = vars.get("ECWID_APP_INSTANCE_TEMPLATE").map(str::to_owned);
        let file = vars
            .get("ECWID_APP_INSTANCE_TEMPLATE_FILE")
            .map(str::to_owned);
        let purge_after = vars.string_or("ECWID_APP_PURGE_AFTER", DEFAULT_PURGE_AFTER);
        let return_url = vars.get("ECWID_APP_RETURN_URL").map(str::to_owned);
        let Some(client_id) = client_id else {
            return Ok(None);
        };
        let client_secret = secret.ok_or_else(|| {
            ConfigError::new("ECWID_APP_CLIENT_SECRET", "is required in app mode")
        })?;
        let redirect_url = redirect_url
            .ok_or_else(|| ConfigError::new("ECWID_APP_REDIRECT_URL", "is required in app mode"))?;
        for (var, url) in [
            ("ECWID_APP_REDIRECT_URL", Some(redirect_url.as_str())),
            ("ECWID_OAUTH_URL", Some(oauth_url.as_str())),
            ("ECWID_APP_RETURN_URL", return_url.as_deref()),
        ] {
            if let Some(url) = url {
                check_url(var, url)?;
            }
        }
        let (template_var, text) = match (inline, file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "ECWID_APP_INSTANCE_TEMPLATE_FILE",
                    "give the template in ECWID_APP_INSTANCE_TEMPLATE or in a file, not both",
                ))
            }
            (Some(text), None) => ("ECWID_APP_INSTANCE_TEMPLATE", text),
            (None, Some(path)) => (
                "ECWID_APP_INSTANCE_TEMPLATE_FILE",
                std::fs::read_to_string(&path).map_err(|e| {
                    ConfigError::new(
                        "ECWID_APP_INSTANCE_TEMPLATE_FILE",
                        format!("cannot read {path}: {e}"),
                    )
                })?,
            ),
            (None, None) => {
                return Err(ConfigError::new(
                    "ECWID_APP_INSTANCE_TEMPLATE",
                    "is required in app mode (or ECWID_APP_INSTANCE_TEMPLATE_FILE)",
                ))
            }
        };
        let template =
            parse_template(&text, allow).map_err(|m| ConfigError::new(template_var, m))?;
        let purge_after = match purge_after.as_str() {
            "never" => None,
            other => Some(
                model::units::parse_duration(other)
                    .map_err(|e| ConfigError::new("ECWID_APP_PURGE_AFTER", e))?,
            ),
        };
        Ok(Some(Self {
            client_id,
            client_secret,
            redirect_url,
            scopes,
            oauth_url: oauth_url.trim_end_matches('/').to_owned(),
            template,
            purge_after,
            return_url,
        }))
    }

    /// The template filled in for `store_id` with `token`: the instance an install writes.
    pub fn instance_for(&self, store_id: &str, token: &str) -> Instance {
        let mut instance = self.template.clone();
        for value in instance.configuration.values_mut() {
            if value.contains(STORE_ID_PLACEHOLDER) {
                *value = value.replace(STORE_ID_PLACEHOLDER, store_id);
            }
        }
        instance.name = instance.name.replace(STORE_ID_PLACEHOLDER, store_id);
        instance
            .configuration
            .insert(keys::STORE_ID.to_owned(), store_id.to_owned());
        instance
            .configuration
            .insert(keys::API_TOKEN.to_owned(), token.to_owned());
        instance
    }
}

fn check_url(var: &str, url: &str) -> Result<(), ConfigError> {
    match url::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        _ => Err(ConfigError::new(var, "must be an http(s) URL")),
    }
}

/// Reads the instance template and checks it as the admin API checks an instance, filled in
/// for a store; it must leave the store id and the API token to the install.
fn parse_template(text: &str, allow: &AllowList) -> Result<Instance, String> {
    let template: Instance =
        serde_json::from_str(text).map_err(|e| format!("is not an instance's JSON: {e}"))?;
    for key in [keys::STORE_ID, keys::API_TOKEN] {
        if template
            .configuration
            .get(key)
            .is_some_and(|v| !v.trim().is_empty())
        {
            return Err(format!(
                "must not set configuration.{key}: the install sets it"
            ));
        }
    }
    let config = AppConfig {
        client_id: String::new(),
        client_secret: Secret::new(""),
        redirect_url: String::new(),
        scopes: String::new(),
        oauth_url: String::new(),
        template: template.clone(),
        purge_after: None,
        return_url: None,
    };
    config
        .instance_for("1", "secret_template_check")
        .validate(allow)
        .map_err(|e| format!("{}: {}", e.field, e.message))?;
    Ok(template)
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
        let allow_networks = AllowList::parse(&vars.string_or("DELIVER_ALLOW_NETWORKS", ""))
            .map_err(|e| ConfigError::new("DELIVER_ALLOW_NETWORKS", e))?;
        Ok(Self {
            common: CommonConfig::from_vars(vars)?.with_event_log_database(vars)?,
            admin_token: Secret::new(token),
            admin_read_token,
            app: AppConfig::from_vars(vars, &allow_networks)?,
            allow_networks,
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

    const TEMPLATE: &str = r#"{"element":{"key":"ecwid"},"configuration":{
        "event.notification.enabled":"true",
        "event.notification.callback.url":"https://hooks.example.com/ecwid/{storeId}"},
        "tags":["app"],"name":"Store {storeId}"}"#;

    fn app_vars(pairs: &[(&str, &str)]) -> Vars {
        let base = [
            TOKEN,
            ("ECWID_APP_CLIENT_ID", "client"),
            ("ECWID_APP_CLIENT_SECRET", "app-secret-value"),
            (
                "ECWID_APP_REDIRECT_URL",
                "https://events.example.com/ecwid/oauth/callback",
            ),
            ("ECWID_APP_INSTANCE_TEMPLATE", TEMPLATE),
            ("EVENT_LOG_DATABASE_URL", "postgres://ecwid@db:5432/ecwid"),
        ];
        let mut map: std::collections::HashMap<&str, &str> = base.into_iter().collect();
        map.extend(pairs.iter().copied());
        Vars::from_pairs(map)
    }

    #[test]
    fn app_mode_is_off_unless_a_client_id_is_set() {
        let c = Config::from_vars(&vars([TOKEN])).unwrap();
        assert!(c.app.is_none());
        let c = Config::from_vars(&app_vars(&[])).unwrap();
        let app = c.app.expect("app mode");
        assert_eq!(app.oauth_url, DEFAULT_OAUTH_URL);
        assert_eq!(app.scopes, DEFAULT_SCOPES);
        assert_eq!(app.purge_after, Some(Duration::from_secs(30 * 86_400)));
        assert!(!format!("{app:?}").contains("app-secret-value"));
        let instance = app.instance_for("1003", "secret_token");
        assert_eq!(instance.store_id(), Some("1003"));
        assert_eq!(instance.api_token(), Some("secret_token"));
        assert_eq!(
            instance.callback_url(),
            Some("https://hooks.example.com/ecwid/1003")
        );
        assert_eq!(instance.name, "Store 1003");
    }

    #[test]
    fn purge_after_takes_durations_zero_and_never() {
        for (raw, want) in [
            ("0", Some(Duration::ZERO)),
            ("12h", Some(Duration::from_secs(12 * 3600))),
            ("never", None),
        ] {
            let c = Config::from_vars(&app_vars(&[("ECWID_APP_PURGE_AFTER", raw)])).unwrap();
            assert_eq!(c.app.unwrap().purge_after, want, "{raw}");
        }
    }

    #[test]
    fn app_mode_errors_name_the_variable() {
        for (var, value) in [
            ("ECWID_APP_CLIENT_SECRET", ""),
            ("ECWID_APP_REDIRECT_URL", ""),
            ("ECWID_APP_REDIRECT_URL", "not a url"),
            ("ECWID_OAUTH_URL", "ftp://ecwid.example"),
            ("ECWID_APP_PURGE_AFTER", "soon"),
            ("ECWID_APP_INSTANCE_TEMPLATE", ""),
            ("ECWID_APP_INSTANCE_TEMPLATE", "{"),
            (
                "ECWID_APP_INSTANCE_TEMPLATE",
                r#"{"configuration":{"ecwid.store.id":"1","event.notification.enabled":"true",
                    "event.notification.callback.url":"https://h.example.com/"}}"#,
            ),
            (
                "ECWID_APP_INSTANCE_TEMPLATE",
                r#"{"configuration":{"event.notification.enabled":"true"}}"#,
            ),
            (
                "ECWID_APP_INSTANCE_TEMPLATE_FILE",
                "/nonexistent/template.json",
            ),
        ] {
            // An empty value is unset: the file alone is given.
            let inline = if var == "ECWID_APP_INSTANCE_TEMPLATE_FILE" {
                ""
            } else {
                TEMPLATE
            };
            let vars = app_vars(&[("ECWID_APP_INSTANCE_TEMPLATE", inline), (var, value)]);
            let err = Config::from_vars(&vars).unwrap_err();
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
