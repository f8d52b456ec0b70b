//! The connector instance: the seed's instance JSON, what it means, how it is checked, and how its
//! secrets are kept out of responses and logs.
//!
//! ```json
//! {"element":{"key":"ecwid"},
//!  "configuration":{"ecwid.order.key":"","ecwid.product.key":"","ecwid.store.id":"",
//!                   "event.notification.enabled":"true","event.notification.callback.url":""},
//!  "tags":[""],"name":""}
//! ```

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize};

use crate::netguard::{self, AllowList};

/// Configuration keys the product reads.
pub mod keys {
    /// The Ecwid store the instance listens to (digits).
    pub const STORE_ID: &str = "ecwid.store.id";
    /// Ecwid API tokens of the seed (kept, never used by the pipeline, always secret).
    pub const ORDER_KEY: &str = "ecwid.order.key";
    pub const PRODUCT_KEY: &str = "ecwid.product.key";
    /// The Ecwid app's client secret: checks `X-Ecwid-Webhook-Signature`.
    pub const CLIENT_SECRET: &str = "ecwid.client.secret";
    /// `"true"` to receive events.
    pub const ENABLED: &str = "event.notification.enabled";
    /// Where envelopes are POSTed.
    pub const CALLBACK_URL: &str = "event.notification.callback.url";
    /// Open Connectors' `Elements-Webhook-Signature` key.
    pub const SIGNATURE_KEY: &str = "event.notification.signature.key";
    /// Standard Webhooks secret(s), `whsec_<base64>`; several separated by spaces while rotating.
    pub const WEBHOOK_SECRET: &str = "event.notification.webhook.secret";
    /// Object types to deliver, comma-separated (`orders,products`); unset or empty: all.
    pub const OBJECTS: &str = "event.objects";
    /// Retry schedule override for this instance (`5s,1m,10m`).
    pub const RETRY_SCHEDULE: &str = "event.notification.retry.schedule";
    /// `"true"`: this instance takes Instant Order Notifications although it holds a client
    /// secret. ION posts carry no signature, so without this a store with a secret refuses them.
    pub const ION_UNSIGNED_ALLOWED: &str = "ecwid.ion.unsigned.allowed";
    /// How events reach this instance (Open Connectors' name): `webhooks` (default), `polling`,
    /// or `webhooks,polling`.
    pub const VENDOR_TYPE: &str = "event.vendor.type";
    /// Minutes between two polls of the store (decimals allowed, at least 0.05; default 5).
    pub const POLL_INTERVAL: &str = "event.poller.refresh_interval";
    /// The store's REST API token (`secret_…`), which the poller reads with. A secret.
    pub const API_TOKEN: &str = "ecwid.api.token";
    /// `"true"`: this instance's events are delivered one at a time, in the order the ingest
    /// accepted them (`ECWID_RAW` sequence); a failing event holds the ones after it.
    pub const ORDERED: &str = "event.notification.ordered";
    /// Requests to this instance's callback in flight at once, across all deliverer replicas
    /// (1..=1000, default 16).
    pub const MAX_IN_FLIGHT: &str = "event.notification.max.in.flight";
    /// Requests per second to this instance's callback, across all deliverer replicas
    /// (decimals allowed: `0.5` is one every two seconds); unset: no rate limit.
    pub const RATE_LIMIT: &str = "event.notification.rate.limit";
    /// Headers of the instance's own sent with every request, a JSON object of name to value
    /// written as a string (`{"X-Api-Key":"…"}`). Values are secrets; names are shown.
    pub const HEADERS: &str = "event.notification.headers";
    /// The HTTP CONNECT proxy this instance's requests go through (overrides
    /// `DELIVER_PROXY_URL`): `http://[user:password@]host:port` or `https://…`.
    pub const PROXY_URL: &str = "event.notification.proxy.url";
    /// The client certificate (PEM, with its chain) presented to the receiver. A secret.
    pub const TLS_CLIENT_CERTIFICATE: &str = "event.notification.tls.client.certificate";
    /// The client certificate's private key (PEM, unencrypted). A secret.
    pub const TLS_CLIENT_KEY: &str = "event.notification.tls.client.key";
    /// CA certificates (PEM) to trust for this receiver, instead of the public roots.
    pub const TLS_CA: &str = "event.notification.tls.ca";
    /// OAuth2 client credentials: the token endpoint …
    pub const OAUTH2_TOKEN_URL: &str = "event.notification.oauth2.token.url";
    /// … the client id …
    pub const OAUTH2_CLIENT_ID: &str = "event.notification.oauth2.client.id";
    /// … the client secret (a secret) …
    pub const OAUTH2_CLIENT_SECRET: &str = "event.notification.oauth2.client.secret";
    /// … and, when the identity provider wants them, the scope and audience asked for.
    pub const OAUTH2_SCOPE: &str = "event.notification.oauth2.scope";
    pub const OAUTH2_AUDIENCE: &str = "event.notification.oauth2.audience";
    /// A CEL expression over the envelope; only events for which it is `true` are delivered
    /// (`raw.data.newPaymentStatus == 'PAID'`).
    pub const FILTER: &str = "event.notification.filter";
}

/// `event.notification.max.in.flight` when unset.
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 16;
/// The largest `event.notification.max.in.flight`.
pub const MAX_MAX_IN_FLIGHT: u32 = 1000;
/// The bounds of `event.notification.rate.limit`, requests per second: one per 100 s to 10,000
/// a second.
pub const MIN_RATE_LIMIT: f64 = 0.01;
pub const MAX_RATE_LIMIT: f64 = 10_000.0;

/// The shortest `event.poller.refresh_interval`, in minutes (3 s).
pub const MIN_POLL_MINUTES: f64 = 0.05;
/// The longest, in minutes (one day).
pub const MAX_POLL_MINUTES: f64 = 1440.0;
/// `event.poller.refresh_interval` when unset.
pub const DEFAULT_POLL_MINUTES: f64 = 5.0;

/// Bounds on what an instance may hold, so a mistake is a 422 and not a bucket write that fails.
pub mod limits {
    pub const NAME_CHARS: usize = 200;
    pub const TAGS: usize = 50;
    pub const TAG_CHARS: usize = 100;
    pub const CONFIG_KEYS: usize = 100;
    pub const KEY_CHARS: usize = 100;
    pub const VALUE_CHARS: usize = 4096;
    /// `event.notification.headers`: room for 8 KiB of headers written as JSON.
    pub const HEADERS_VALUE_CHARS: usize = 16 * 1024;
    /// PEM values (`event.notification.tls.*`): a certificate chain or a CA bundle.
    pub const PEM_VALUE_CHARS: usize = 64 * 1024;

    /// The longest value `key` may hold.
    pub fn value_chars(key: &str) -> usize {
        if key == super::keys::HEADERS {
            HEADERS_VALUE_CHARS
        } else if key.starts_with("event.notification.tls.") {
            PEM_VALUE_CHARS
        } else {
            VALUE_CHARS
        }
    }
}

pub use crate::redact::REDACTED;

/// Whether the value under `key` is a secret: the seed's API keys, and any key that names a
/// secret, key, token or password.
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    if k == keys::OAUTH2_TOKEN_URL {
        // A URL, redacted as one (its credentials); the token endpoint's address is no secret.
        return false;
    }
    k.ends_with(".key")
        || k.contains("secret")
        || k.contains("token")
        || k.contains("password")
        || k == keys::TLS_CLIENT_CERTIFICATE
}

#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Instance {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    #[serde(default)]
    pub element: Element,
    #[serde(default, deserialize_with = "config_values")]
    pub configuration: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "non_empty_strings")]
    pub tags: Vec<String>,
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_date: Option<String>,
    /// How the instance came to be: through the admin API, or by a merchant installing the
    /// Ecwid app (app mode). Only this service sets it; what a client sends is ignored.
    #[serde(default)]
    pub provisioned_by: ProvisionedBy,
    /// For an instance the app provisioned: its install, uninstall and purge times.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<AppInstall>,
}

/// Who made an instance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProvisionedBy {
    /// `POST /instances`.
    #[default]
    Admin,
    /// An install of the Ecwid app (`GET /ecwid/oauth/callback`).
    App,
}

/// The app's record of a store's install on its instance. Times are RFC 3339.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppInstall {
    /// The last (re)install.
    pub installed_at: String,
    /// When Ecwid said the merchant uninstalled the app; cleared by a reinstall.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uninstalled_at: Option<String>,
    /// When the store's data is to be purged after an uninstall (`ECWID_APP_PURGE_AFTER`);
    /// none when it is never to be, or once it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purge_due_at: Option<String>,
    /// When the store's data was purged after an uninstall.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purged_at: Option<String>,
    /// The newest `application.subscriptionStatusChanged` Ecwid sent for the store: its status
    /// (`data.newSubscriptionStatus`, or `data.status`) and when it came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscription_status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscription_changed_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Element {
    pub key: String,
}

impl Default for Element {
    fn default() -> Self {
        Self {
            key: "ecwid".into(),
        }
    }
}

/// `PATCH /instances/{id}`: `configuration` is merged key by key (`null` removes a key, the
/// redacted marker keeps the stored secret); `name` and `tags` replace.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstancePatch {
    #[serde(default, deserialize_with = "optional_config_values")]
    pub configuration: Option<BTreeMap<String, Option<String>>>,
    pub name: Option<String>,
    #[serde(default, deserialize_with = "optional_non_empty_strings")]
    pub tags: Option<Vec<String>>,
}

/// An instance field that is missing or wrong: answered with 422.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    fn new(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

impl Instance {
    fn config(&self, key: &str) -> Option<&str> {
        self.configuration
            .get(key)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    }

    pub fn store_id(&self) -> Option<&str> {
        self.config(keys::STORE_ID)
    }

    pub fn events_enabled(&self) -> bool {
        self.config(keys::ENABLED)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }

    pub fn callback_url(&self) -> Option<&str> {
        self.config(keys::CALLBACK_URL)
    }

    pub fn client_secret(&self) -> Option<&str> {
        self.config(keys::CLIENT_SECRET)
    }

    pub fn signature_key(&self) -> Option<&str> {
        self.config(keys::SIGNATURE_KEY)
    }

    /// The decoded Standard Webhooks secrets (more than one while rotating).
    pub fn webhook_secrets(&self) -> Vec<Vec<u8>> {
        self.config(keys::WEBHOOK_SECRET)
            .map(|v| v.split_whitespace().filter_map(decode_whsec).collect())
            .unwrap_or_default()
    }

    /// Whether this instance takes events whose Ecwid signature was not checked: yes without a
    /// client secret; with one, only when it opts in to Instant Order Notifications (which Ecwid
    /// never signs) with [`keys::ION_UNSIGNED_ALLOWED`].
    pub fn accepts_unverified(&self) -> bool {
        self.client_secret().is_none()
            || self
                .config(keys::ION_UNSIGNED_ALLOWED)
                .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }

    /// Whether this instance wants events about `object_type` (`event.objects`; default all).
    pub fn accepts_object(&self, object_type: &str) -> bool {
        match self.config(keys::OBJECTS) {
            None => true,
            Some(list) => list
                .split(',')
                .map(str::trim)
                .any(|o| o == "*" || o.eq_ignore_ascii_case(object_type)),
        }
    }

    /// The vendor types named by `event.vendor.type` (`webhooks` when unset), or `None` when it
    /// names something else.
    fn vendor_types(&self) -> Option<(bool, bool)> {
        let Some(v) = self.config(keys::VENDOR_TYPE) else {
            return Some((true, false));
        };
        let (mut webhooks, mut polling) = (false, false);
        for t in v.split(',').map(str::trim) {
            match t.to_ascii_lowercase().as_str() {
                "webhooks" | "webhook" => webhooks = true,
                "polling" => polling = true,
                _ => return None,
            }
        }
        Some((webhooks, polling))
    }

    /// Whether webhook events (v3, ION) reach this instance (`event.vendor.type` names webhooks,
    /// or is unset).
    pub fn takes_webhooks(&self) -> bool {
        self.vendor_types().is_some_and(|(w, _)| w)
    }

    /// Whether the poller polls this instance's store for it (`event.vendor.type` names polling).
    pub fn polls(&self) -> bool {
        self.vendor_types().is_some_and(|(_, p)| p)
    }

    /// `event.poller.refresh_interval` (default 5 minutes), bounded to what validation allows.
    pub fn poll_interval(&self) -> std::time::Duration {
        let minutes = self
            .config(keys::POLL_INTERVAL)
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|m| m.is_finite())
            .unwrap_or(DEFAULT_POLL_MINUTES)
            .clamp(MIN_POLL_MINUTES, MAX_POLL_MINUTES);
        std::time::Duration::from_secs_f64(minutes * 60.0)
    }

    /// Whether this instance opted in to ordered delivery ([`keys::ORDERED`]).
    pub fn ordered(&self) -> bool {
        self.config(keys::ORDERED)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }

    /// `ecwid.api.token`, the REST token the poller reads with.
    pub fn api_token(&self) -> Option<&str> {
        self.config(keys::API_TOKEN)
    }

    /// `event.notification.max.in.flight`: requests in flight at once across all replicas
    /// (default [`DEFAULT_MAX_IN_FLIGHT`]; a value validation would refuse reads as the default).
    pub fn max_in_flight(&self) -> u32 {
        self.config(keys::MAX_IN_FLIGHT)
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|n| (1..=MAX_MAX_IN_FLIGHT).contains(n))
            .unwrap_or(DEFAULT_MAX_IN_FLIGHT)
    }

    /// `event.notification.rate.limit`: requests per second across all replicas, if limited.
    pub fn rate_limit(&self) -> Option<f64> {
        self.config(keys::RATE_LIMIT)
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|r| (MIN_RATE_LIMIT..=MAX_RATE_LIMIT).contains(r))
    }

    /// The instance's own retry schedule, when it sets one that can be kept
    /// ([`crate::retry::parse_schedule`]; one stored before that check falls back to the default).
    pub fn retry_schedule(&self) -> Option<Vec<std::time::Duration>> {
        self.config(keys::RETRY_SCHEDULE)
            .and_then(|v| crate::retry::parse_schedule(v).ok())
    }

    /// Checks that the event log, keeping records for `retention` (`None`: no log), keeps this
    /// instance's records as long as its own retry schedule retries their events
    /// ([`crate::retry::log_outlasts`]), as the deliverer checks `DELIVER_RETRY_SCHEDULE` at
    /// start-up. Separate from [`Instance::validate`]: only the admin API knows the retention.
    pub fn validate_log_retention(
        &self,
        retention: Option<std::time::Duration>,
    ) -> Result<(), FieldError> {
        let (Some(retention), Some(schedule)) = (retention, self.retry_schedule()) else {
            return Ok(());
        };
        if crate::retry::log_outlasts(&schedule, retention) {
            return Ok(());
        }
        Err(FieldError::new(
            &format!("configuration.{}", keys::RETRY_SCHEDULE),
            format!(
                "lasts {} h, longer than the event log keeps its records ({} h, \
                 EVENT_LOG_RETENTION): a retrying event's record would expire first",
                crate::retry::schedule_span(&schedule)
                    .as_secs()
                    .div_ceil(3600),
                retention.as_secs() / 3600
            ),
        ))
    }

    /// A copy fit for a response or a log: every non-empty secret value replaced by [`REDACTED`],
    /// and the credentials inside URLs (user info, query values) too.
    pub fn redacted(&self) -> Instance {
        let mut copy = self.clone();
        for (key, value) in copy.configuration.iter_mut() {
            if key == keys::HEADERS && !value.trim().is_empty() {
                *value = crate::receiver::redact_headers(value);
            } else if is_secret_key(key) && !value.is_empty() {
                *value = REDACTED.to_owned();
            } else if is_url_key(key) {
                *value = redact_url(value);
            }
        }
        copy
    }

    /// Applies a PATCH.
    pub fn apply(&mut self, patch: InstancePatch) {
        if let Some(configuration) = patch.configuration {
            for (key, value) in configuration {
                match value {
                    None => {
                        self.configuration.remove(&key);
                    }
                    Some(v) if v == REDACTED => {}
                    // Headers sent back as shown keep each stored value sent as the marker.
                    Some(v) if key == keys::HEADERS => {
                        let merged = match self.configuration.get(&key) {
                            Some(stored) => crate::receiver::merge_headers(stored, &v),
                            None => v,
                        };
                        self.configuration.insert(key, merged);
                    }
                    // A URL sent back as it was shown (credentials masked) keeps the stored one.
                    Some(v)
                        if is_url_key(&key)
                            && self
                                .configuration
                                .get(&key)
                                .is_some_and(|stored| redact_url(stored) == v) => {}
                    Some(v) => {
                        self.configuration.insert(key, v);
                    }
                }
            }
        }
        if let Some(name) = patch.name {
            self.name = name;
        }
        if let Some(tags) = patch.tags {
            self.tags = tags;
        }
    }

    /// Checks everything the pipeline relies on. `allow` is the operator's SSRF allow-list, applied
    /// here to callback URLs that name an address literally (names are checked at connect time).
    pub fn validate(&self, allow: &AllowList) -> Result<(), FieldError> {
        self.check_sizes()?;
        if self.element.key != "ecwid" {
            return Err(FieldError::new("element.key", "must be \"ecwid\""));
        }
        // Values that become an HTTP header (the API token's `Authorization`) or part of a URL
        // (the callback and any other `*.url`, the store id in Ecwid's paths): a control
        // character (NUL, CR, LF …) would fail every request later ("builder error") or split a
        // header, so it is refused here, naming the key.
        for (key, value) in &self.configuration {
            let on_the_wire = key == keys::API_TOKEN || key == keys::STORE_ID || is_url_key(key);
            if on_the_wire && value.chars().any(char::is_control) {
                return Err(FieldError::new(
                    &format!("configuration.{key}"),
                    "must not hold control characters",
                ));
            }
        }
        let store_field = "configuration.ecwid.store.id";
        match self.store_id() {
            None => {
                return Err(FieldError::new(
                    store_field,
                    "is required: the Ecwid store id",
                ))
            }
            Some(id) if !id.bytes().all(|b| b.is_ascii_digit()) || id.len() > 20 => {
                return Err(FieldError::new(
                    store_field,
                    "must be the numeric Ecwid store id",
                ))
            }
            Some(_) => {}
        }
        if self.events_enabled() || self.callback_url().is_some() {
            validate_callback_url(self.callback_url(), self.events_enabled(), allow)?;
        }
        for key in [keys::ENABLED, keys::ION_UNSIGNED_ALLOWED, keys::ORDERED] {
            if let Some(v) = self.config(key) {
                if !v.eq_ignore_ascii_case("true") && !v.eq_ignore_ascii_case("false") {
                    return Err(FieldError::new(
                        &format!("configuration.{key}"),
                        "must be \"true\" or \"false\"",
                    ));
                }
            }
        }
        if let Some(v) = self.config(keys::WEBHOOK_SECRET) {
            if v.split_whitespace().any(|s| decode_whsec(s).is_none()) {
                return Err(FieldError::new(
                    "configuration.event.notification.webhook.secret",
                    "must be whsec_ followed by base64 (several separated by spaces while rotating)",
                ));
            }
        }
        if let Some(v) = self.config(keys::RETRY_SCHEDULE) {
            crate::retry::parse_schedule(v).map_err(|e| {
                FieldError::new("configuration.event.notification.retry.schedule", e)
            })?;
        }
        self.validate_limits()?;
        self.validate_receiver()?;
        self.validate_polling()
    }

    /// `event.notification.headers`, parsed (empty when unset or, stored before the check,
    /// malformed).
    pub fn custom_headers(&self) -> Vec<(String, String)> {
        self.config(keys::HEADERS)
            .and_then(|v| crate::receiver::parse_headers(v).ok())
            .unwrap_or_default()
    }

    /// `event.notification.proxy.url`, this instance's own proxy.
    pub fn proxy_url(&self) -> Option<&str> {
        self.config(keys::PROXY_URL)
    }

    /// The client certificate and key (PEM), when both are set.
    pub fn client_identity(&self) -> Option<(&str, &str)> {
        Some((
            self.config(keys::TLS_CLIENT_CERTIFICATE)?,
            self.config(keys::TLS_CLIENT_KEY)?,
        ))
    }

    /// `event.notification.tls.ca`: CA certificates (PEM) to trust for this receiver.
    pub fn tls_ca(&self) -> Option<&str> {
        self.config(keys::TLS_CA)
    }

    /// When the client certificate (the first of its chain) expires, Unix seconds.
    pub fn client_certificate_expires_at(&self) -> Option<i64> {
        let (cert, _) = self.client_identity()?;
        crate::receiver::pem_certificates(cert)
            .ok()?
            .first()
            .map(|(_, expiry)| *expiry)
    }

    /// The OAuth2 client credentials, when the instance has them.
    pub fn oauth2(&self) -> Option<OAuth2<'_>> {
        Some(OAuth2 {
            token_url: self.config(keys::OAUTH2_TOKEN_URL)?,
            client_id: self.config(keys::OAUTH2_CLIENT_ID)?,
            client_secret: self.config(keys::OAUTH2_CLIENT_SECRET)?,
            scope: self.config(keys::OAUTH2_SCOPE),
            audience: self.config(keys::OAUTH2_AUDIENCE),
        })
    }

    /// `event.notification.filter`, the CEL expression events must pass.
    pub fn filter(&self) -> Option<&str> {
        self.config(keys::FILTER)
    }

    fn validate_receiver(&self) -> Result<(), FieldError> {
        let field = |key: &str| format!("configuration.{key}");
        let headers = match self.config(keys::HEADERS) {
            Some(v) => crate::receiver::parse_headers(v)
                .map_err(|m| FieldError::new(&field(keys::HEADERS), m))?,
            None => Vec::new(),
        };
        if let Some(v) = self.config(keys::PROXY_URL) {
            crate::receiver::check_proxy_url(v)
                .map_err(|m| FieldError::new(&field(keys::PROXY_URL), m))?;
        }
        let cert = self.config(keys::TLS_CLIENT_CERTIFICATE);
        let key = self.config(keys::TLS_CLIENT_KEY);
        match (cert, key) {
            (Some(cert), Some(key)) => {
                crate::receiver::pem_certificates(cert)
                    .map_err(|m| FieldError::new(&field(keys::TLS_CLIENT_CERTIFICATE), m))?;
                crate::receiver::pem_private_key(key)
                    .map_err(|m| FieldError::new(&field(keys::TLS_CLIENT_KEY), m))?;
            }
            (Some(_), None) => {
                return Err(FieldError::new(
                    &field(keys::TLS_CLIENT_KEY),
                    "is required with a client certificate",
                ))
            }
            (None, Some(_)) => {
                return Err(FieldError::new(
                    &field(keys::TLS_CLIENT_CERTIFICATE),
                    "is required with a client key",
                ))
            }
            (None, None) => {}
        }
        if let Some(ca) = self.config(keys::TLS_CA) {
            crate::receiver::pem_certificates(ca)
                .map_err(|m| FieldError::new(&field(keys::TLS_CA), m))?;
        }
        self.validate_oauth2(&headers)?;
        if let Some(f) = self.config(keys::FILTER) {
            crate::filter::Filter::parse(f)
                .map_err(|m| FieldError::new(&field(keys::FILTER), m))?;
        }
        Ok(())
    }

    fn validate_oauth2(&self, headers: &[(String, String)]) -> Result<(), FieldError> {
        let field = |key: &str| format!("configuration.{key}");
        let all = [
            keys::OAUTH2_TOKEN_URL,
            keys::OAUTH2_CLIENT_ID,
            keys::OAUTH2_CLIENT_SECRET,
            keys::OAUTH2_SCOPE,
            keys::OAUTH2_AUDIENCE,
        ];
        if all.iter().all(|k| self.config(k).is_none()) {
            return Ok(());
        }
        for required in [
            keys::OAUTH2_TOKEN_URL,
            keys::OAUTH2_CLIENT_ID,
            keys::OAUTH2_CLIENT_SECRET,
        ] {
            if self.config(required).is_none() {
                return Err(FieldError::new(
                    &field(required),
                    "is required with OAuth2 client credentials (token.url, client.id, client.secret)",
                ));
            }
        }
        if let Some(url) = self.config(keys::OAUTH2_TOKEN_URL) {
            let ok = url::Url::parse(url)
                .ok()
                .is_some_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
            if !ok {
                return Err(FieldError::new(
                    &field(keys::OAUTH2_TOKEN_URL),
                    "must be the token endpoint's http or https URL",
                ));
            }
        }
        for key in &all[1..] {
            if self
                .config(key)
                .is_some_and(|v| v.chars().any(char::is_control))
            {
                return Err(FieldError::new(
                    &field(key),
                    "must not hold control characters",
                ));
            }
        }
        if let Some((name, _)) = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("authorization"))
        {
            return Err(FieldError::new(
                &field(keys::HEADERS),
                format!("header {name:?} may not be set with OAuth2: the access token goes there"),
            ));
        }
        Ok(())
    }

    fn validate_limits(&self) -> Result<(), FieldError> {
        let field = |key: &str| format!("configuration.{key}");
        if let Some(v) = self.config(keys::MAX_IN_FLIGHT) {
            if !v
                .parse::<u32>()
                .is_ok_and(|n| (1..=MAX_MAX_IN_FLIGHT).contains(&n))
            {
                return Err(FieldError::new(
                    &field(keys::MAX_IN_FLIGHT),
                    format!("must be a whole number from 1 to {MAX_MAX_IN_FLIGHT}"),
                ));
            }
        }
        if let Some(v) = self.config(keys::RATE_LIMIT) {
            // `parse` takes "inf" and "NaN"; the range check refuses both.
            if !v
                .parse::<f64>()
                .is_ok_and(|r| (MIN_RATE_LIMIT..=MAX_RATE_LIMIT).contains(&r))
            {
                return Err(FieldError::new(
                    &field(keys::RATE_LIMIT),
                    format!(
                        "must be requests per second from {MIN_RATE_LIMIT} to {MAX_RATE_LIMIT} (decimals allowed)"
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate_polling(&self) -> Result<(), FieldError> {
        let field = |key: &str| format!("configuration.{key}");
        if self.vendor_types().is_none() {
            return Err(FieldError::new(
                &field(keys::VENDOR_TYPE),
                "must be webhooks, polling, or webhooks,polling",
            ));
        }
        if let Some(v) = self.config(keys::POLL_INTERVAL) {
            let ok = v
                .parse::<f64>()
                .ok()
                .filter(|m| (MIN_POLL_MINUTES..=MAX_POLL_MINUTES).contains(m));
            if ok.is_none() {
                return Err(FieldError::new(
                    &field(keys::POLL_INTERVAL),
                    format!(
                        "must be a number of minutes from {MIN_POLL_MINUTES} to {MAX_POLL_MINUTES}"
                    ),
                ));
            }
        }
        match self.api_token() {
            Some(t)
                if !t.starts_with("secret_")
                    || t.len() > 200
                    || t.contains(char::is_whitespace) =>
            {
                Err(FieldError::new(
                    &field(keys::API_TOKEN),
                    "must be the store's secret REST token (secret_…)",
                ))
            }
            None if self.polls() => Err(FieldError::new(
                &field(keys::API_TOKEN),
                "is required when event.vendor.type includes polling",
            )),
            _ => Ok(()),
        }
    }
}

impl Instance {
    fn check_sizes(&self) -> Result<(), FieldError> {
        use limits::*;
        let too_long = |field: &str, max: usize| {
            FieldError::new(field, format!("must be at most {max} characters"))
        };
        if self.name.chars().count() > NAME_CHARS {
            return Err(too_long("name", NAME_CHARS));
        }
        if self.tags.len() > TAGS {
            return Err(FieldError::new("tags", format!("at most {TAGS} tags")));
        }
        if self.tags.iter().any(|t| t.chars().count() > TAG_CHARS) {
            return Err(too_long("tags", TAG_CHARS));
        }
        if self.configuration.len() > CONFIG_KEYS {
            return Err(FieldError::new(
                "configuration",
                format!("at most {CONFIG_KEYS} keys"),
            ));
        }
        for (key, value) in &self.configuration {
            if key.chars().count() > KEY_CHARS || key.chars().any(char::is_control) {
                return Err(FieldError::new(
                    "configuration",
                    format!(
                        "keys must be at most {KEY_CHARS} characters without control characters"
                    ),
                ));
            }
            let max = value_chars(key);
            if value.chars().count() > max {
                return Err(too_long(&format!("configuration.{key}"), max));
            }
        }
        Ok(())
    }
}

/// Whether the value under `key` is a URL (the callback, and any key ending in `.url`).
fn is_url_key(key: &str) -> bool {
    key == keys::CALLBACK_URL || key.to_ascii_lowercase().ends_with(".url")
}

/// `url` with its user info and every query value replaced by [`REDACTED`], for responses and
/// logs (`https://********:********@host/hook?token=********`). Text that is not a URL is
/// returned unchanged; it holds no credentials a URL parser would find either.
pub fn redact_url(url: &str) -> String {
    let parsed = url::Url::parse(url).ok().filter(|_| url.contains("://"));
    let Some(mut parsed) = parsed else {
        // Not a URL that parses (`user:pass@host:4222`, `nats://u:p@host:99999`, a bare
        // `host:port`): what comes before the last `@` can only be credentials.
        let (scheme, rest) = match url.split_once("://") {
            Some((scheme, rest)) => (format!("{scheme}://"), rest),
            None => (String::new(), url),
        };
        return match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}{REDACTED}@{host}"),
            None => url.to_owned(),
        };
    };
    if parsed.username().is_empty() && parsed.password().is_none() && parsed.query().is_none() {
        return url.to_owned();
    }
    if !parsed.username().is_empty() {
        let _ = parsed.set_username(REDACTED);
    }
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some(REDACTED));
    }
    if parsed.query().is_some() {
        let names: Vec<String> = parsed.query_pairs().map(|(k, _)| k.into_owned()).collect();
        let mut pairs = parsed.query_pairs_mut();
        pairs.clear();
        for name in names {
            pairs.append_pair(&name, REDACTED);
        }
    }
    parsed.into()
}

fn validate_callback_url(
    raw: Option<&str>,
    enabled: bool,
    allow: &AllowList,
) -> Result<(), FieldError> {
    let field = "configuration.event.notification.callback.url";
    let Some(raw) = raw else {
        return match enabled {
            true => Err(FieldError::new(
                field,
                "is required when event.notification.enabled is \"true\"",
            )),
            false => Ok(()),
        };
    };
    let url = url::Url::parse(raw)
        .map_err(|e| FieldError::new(field, format!("is not a valid URL: {e}")))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(FieldError::new(field, "must be an http or https URL"));
    }
    let ip = match url.host() {
        None => return Err(FieldError::new(field, "must name a host")),
        Some(url::Host::Ipv4(v4)) => Some(std::net::IpAddr::V4(v4)),
        Some(url::Host::Ipv6(v6)) => Some(std::net::IpAddr::V6(v6)),
        Some(url::Host::Domain(d))
            if d.eq_ignore_ascii_case("localhost") || d.ends_with(".localhost") =>
        {
            Some(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))
        }
        Some(url::Host::Domain(_)) => None,
    };
    if let Some(ip) = ip {
        netguard::check(ip, allow).map_err(|m| FieldError::new(field, m))?;
    }
    Ok(())
}

fn decode_whsec(s: &str) -> Option<Vec<u8>> {
    let b64 = s.strip_prefix("whsec_")?;
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .ok()
        .filter(|k| !k.is_empty())
}

impl fmt::Debug for Instance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = self.redacted();
        f.debug_struct("Instance")
            .field("id", &shown.id)
            .field("name", &shown.name)
            .field("configuration", &shown.configuration)
            .finish_non_exhaustive()
    }
}

/// An instance's OAuth2 client credentials (`event.notification.oauth2.*`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct OAuth2<'a> {
    pub token_url: &'a str,
    pub client_id: &'a str,
    pub client_secret: &'a str,
    pub scope: Option<&'a str>,
    pub audience: Option<&'a str>,
}

impl fmt::Debug for OAuth2<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuth2")
            .field("token_url", &redact_url(self.token_url))
            .field("client_id", &self.client_id)
            .field("client_secret", &REDACTED)
            .finish_non_exhaustive()
    }
}

/// Configuration values are strings in the seed; numbers and booleans are taken as their text.
#[derive(Deserialize)]
#[serde(untagged)]
enum ConfigValue {
    Str(String),
    Bool(bool),
    Num(serde_json::Number),
}

impl From<ConfigValue> for String {
    fn from(v: ConfigValue) -> Self {
        match v {
            ConfigValue::Str(s) => s,
            ConfigValue::Bool(b) => b.to_string(),
            ConfigValue::Num(n) => n.to_string(),
        }
    }
}

fn config_values<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let raw: BTreeMap<String, ConfigValue> = BTreeMap::deserialize(d)?;
    Ok(raw.into_iter().map(|(k, v)| (k, v.into())).collect())
}

fn optional_config_values<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<BTreeMap<String, Option<String>>>, D::Error> {
    let raw: Option<BTreeMap<String, Option<ConfigValue>>> = Option::deserialize(d)?;
    Ok(raw.map(|m| m.into_iter().map(|(k, v)| (k, v.map(Into::into))).collect()))
}

fn non_empty_strings<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let raw: Vec<String> = Vec::deserialize(d)?;
    Ok(raw.into_iter().filter(|s| !s.trim().is_empty()).collect())
}

fn optional_non_empty_strings<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<String>>, D::Error> {
    let raw: Option<Vec<String>> = Option::deserialize(d)?;
    Ok(raw.map(|v| v.into_iter().filter(|s| !s.trim().is_empty()).collect()))
}

/// A fresh instance id.
pub fn new_instance_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"{"element":{"key":"ecwid"},"configuration":{"ecwid.order.key":"","ecwid.product.key":"","ecwid.store.id":"","event.notification.enabled":"true","event.notification.callback.url":""},"tags":[""],"name":""}"#;

    fn seed_with(store: &str, url: &str) -> Instance {
        let mut i: Instance = serde_json::from_str(SEED).unwrap();
        i.configuration.insert(keys::STORE_ID.into(), store.into());
        i.configuration
            .insert(keys::CALLBACK_URL.into(), url.into());
        i
    }

    #[test]
    fn seed_shape_parses_and_empty_store_is_refused() {
        let i: Instance = serde_json::from_str(SEED).unwrap();
        assert!(i.tags.is_empty());
        assert!(i.events_enabled());
        let err = i.validate(&AllowList::default()).unwrap_err();
        assert_eq!(err.field, "configuration.ecwid.store.id");
    }

    #[test]
    fn filled_seed_is_valid() {
        let i = seed_with("1003", "https://hooks.example.com/ecwid");
        assert_eq!(i.validate(&AllowList::default()), Ok(()));
        assert_eq!(i.store_id(), Some("1003"));
    }

    #[test]
    fn enabled_needs_a_valid_http_url() {
        let allow = AllowList::default();
        for url in ["", "ftp://x.example/", "not a url", "https://"] {
            let err = seed_with("1003", url).validate(&allow).unwrap_err();
            assert_eq!(
                err.field, "configuration.event.notification.callback.url",
                "{url}"
            );
        }
    }

    #[test]
    fn literal_internal_callback_is_refused_unless_allowed() {
        let i = seed_with("1003", "http://127.0.0.1:9000/hook");
        let err = i.validate(&AllowList::default()).unwrap_err();
        assert!(err.message.contains("DELIVER_ALLOW_NETWORKS"));
        assert!(seed_with("1003", "http://localhost/x")
            .validate(&AllowList::default())
            .is_err());
        assert!(seed_with("1003", "http://[::1]/x")
            .validate(&AllowList::default())
            .is_err());
        let allow = AllowList::parse("127.0.0.0/8").unwrap();
        assert_eq!(i.validate(&allow), Ok(()));
    }

    #[test]
    fn non_numeric_store_is_refused() {
        let err = seed_with("12.3", "https://a.example/")
            .validate(&AllowList::default())
            .unwrap_err();
        assert_eq!(err.field, "configuration.ecwid.store.id");
    }

    #[test]
    fn secrets_are_redacted_and_kept_on_patch() {
        let mut i = seed_with("1003", "https://a.example/");
        i.configuration
            .insert(keys::ORDER_KEY.into(), "secret_abc".into());
        i.configuration
            .insert(keys::CLIENT_SECRET.into(), "cs".into());
        i.configuration
            .insert(keys::SIGNATURE_KEY.into(), "sig".into());
        let shown = i.redacted();
        assert_eq!(shown.configuration[keys::ORDER_KEY], REDACTED);
        assert_eq!(shown.configuration[keys::CLIENT_SECRET], REDACTED);
        assert_eq!(shown.configuration[keys::SIGNATURE_KEY], REDACTED);
        assert_eq!(shown.configuration[keys::PRODUCT_KEY], "");
        assert_eq!(shown.configuration[keys::STORE_ID], "1003");
        assert!(!format!("{i:?}").contains("secret_abc"));

        let patch: InstancePatch = serde_json::from_str(
            r#"{"configuration":{"ecwid.order.key":"********","ecwid.client.secret":null,"event.objects":"orders"},"name":"n"}"#,
        )
        .unwrap();
        i.apply(patch);
        assert_eq!(i.configuration[keys::ORDER_KEY], "secret_abc");
        assert!(!i.configuration.contains_key(keys::CLIENT_SECRET));
        assert_eq!(i.name, "n");
        assert!(i.accepts_object("orders") && !i.accepts_object("products"));
    }

    #[test]
    fn config_values_accept_booleans_and_numbers() {
        let i: Instance = serde_json::from_str(
            r#"{"configuration":{"ecwid.store.id":1003,"event.notification.enabled":true,"event.notification.callback.url":"https://a.example/"}}"#,
        )
        .unwrap();
        assert_eq!(i.store_id(), Some("1003"));
        assert!(i.events_enabled());
        assert_eq!(i.element.key, "ecwid");
    }

    #[test]
    fn credentials_in_urls_never_come_back() {
        assert_eq!(
            redact_url("https://user:pass@hooks.example.com/x?token=abc&v=2"),
            "https://********:********@hooks.example.com/x?token=********&v=********"
        );
        assert_eq!(
            redact_url("https://hooks.example.com/x"),
            "https://hooks.example.com/x"
        );
        assert_eq!(redact_url("not a url"), "not a url");
        let mut i = seed_with("1003", "https://user:pass@a.example/hook?token=abc");
        let shown = i.redacted();
        let url = shown.callback_url().unwrap();
        assert!(!url.contains("pass") && !url.contains("abc"), "{url}");
        assert!(!format!("{i:?}").contains("pass"));
        // Sending back what was shown keeps the stored URL; a new URL replaces it.
        let patch = |v: &str| InstancePatch {
            configuration: Some([(keys::CALLBACK_URL.to_owned(), Some(v.to_owned()))].into()),
            ..Default::default()
        };
        i.apply(patch(url));
        assert_eq!(
            i.callback_url(),
            Some("https://user:pass@a.example/hook?token=abc")
        );
        i.apply(patch("https://b.example/hook"));
        assert_eq!(i.callback_url(), Some("https://b.example/hook"));
    }

    #[test]
    fn oversized_fields_are_refused_naming_them() {
        let allow = AllowList::default();
        let mut i = seed_with("1003", "https://a.example/");
        i.name = "n".repeat(limits::NAME_CHARS + 1);
        assert_eq!(i.validate(&allow).unwrap_err().field, "name");
        i.name = "ok".into();
        i.configuration
            .insert("x.note".into(), "v".repeat(limits::VALUE_CHARS + 1));
        assert_eq!(
            i.validate(&allow).unwrap_err().field,
            "configuration.x.note"
        );
    }

    #[test]
    fn ordered_delivery_is_an_opt_in_boolean() {
        let mut i = seed_with("1003", "https://a.example/");
        assert!(!i.ordered(), "unordered unless asked for");
        i.configuration.insert(keys::ORDERED.into(), "TRUE".into());
        assert!(i.ordered());
        assert_eq!(i.validate(&AllowList::default()), Ok(()));
        i.configuration.insert(keys::ORDERED.into(), "yes".into());
        assert!(!i.ordered());
        assert_eq!(
            i.validate(&AllowList::default()).unwrap_err().field,
            "configuration.event.notification.ordered"
        );
    }

    #[test]
    fn ion_opt_in_lets_unsigned_notifications_reach_an_instance_with_a_secret() {
        let mut i = seed_with("1003", "https://a.example/");
        assert!(i.accepts_unverified());
        i.configuration
            .insert(keys::CLIENT_SECRET.into(), "s3cret".into());
        assert!(!i.accepts_unverified());
        i.configuration
            .insert(keys::ION_UNSIGNED_ALLOWED.into(), "true".into());
        assert!(i.accepts_unverified());
        i.configuration
            .insert(keys::ION_UNSIGNED_ALLOWED.into(), "maybe".into());
        assert_eq!(
            i.validate(&AllowList::default()).unwrap_err().field,
            "configuration.ecwid.ion.unsigned.allowed"
        );
    }

    #[test]
    fn retry_schedules_that_outlive_the_events_are_refused() {
        let mut i = seed_with("1003", "https://a.example/");
        i.configuration
            .insert(keys::RETRY_SCHEDULE.into(), "10s,1m,1h".into());
        assert_eq!(i.validate(&AllowList::default()), Ok(()));
        assert_eq!(i.retry_schedule().map(|s| s.len()), Some(3));
        for bad in ["3000000000h", "7d", "1s,0s"] {
            i.configuration
                .insert(keys::RETRY_SCHEDULE.into(), bad.into());
            let err = i.validate(&AllowList::default()).unwrap_err();
            assert_eq!(
                err.field, "configuration.event.notification.retry.schedule",
                "{bad}"
            );
            assert_eq!(i.retry_schedule(), None, "{bad}: the default applies");
        }
    }

    #[test]
    fn retry_schedules_that_outlast_the_event_log_are_refused() {
        let day = std::time::Duration::from_secs(86_400);
        let mut i = seed_with("1003", "https://a.example/");
        assert_eq!(i.validate_log_retention(Some(day)), Ok(()), "no schedule");
        i.configuration
            .insert(keys::RETRY_SCHEDULE.into(), "12h,12h".into());
        assert_eq!(i.validate_log_retention(Some(day)), Ok(()), "exactly a day");
        assert_eq!(i.validate_log_retention(None), Ok(()), "no log");
        i.configuration
            .insert(keys::RETRY_SCHEDULE.into(), "12h,12h,1s".into());
        assert_eq!(i.validate(&AllowList::default()), Ok(()));
        let err = i.validate_log_retention(Some(day)).unwrap_err();
        assert_eq!(err.field, "configuration.event.notification.retry.schedule");
        assert!(
            err.message.contains("EVENT_LOG_RETENTION"),
            "{}",
            err.message
        );
    }

    #[test]
    fn limits_are_checked_naming_the_key() {
        let allow = AllowList::default();
        let mut i = seed_with("1003", "https://a.example/");
        assert_eq!(i.max_in_flight(), DEFAULT_MAX_IN_FLIGHT);
        assert_eq!(i.rate_limit(), None);
        for (key, good, read) in [
            (keys::MAX_IN_FLIGHT, "1", Some(1.0)),
            (keys::MAX_IN_FLIGHT, "1000", Some(1000.0)),
            (keys::RATE_LIMIT, "0.5", Some(0.5)),
            (keys::RATE_LIMIT, "5", Some(5.0)),
        ] {
            i.configuration.insert(key.into(), good.into());
            assert_eq!(i.validate(&allow), Ok(()), "{key}={good}");
            let got = if key == keys::MAX_IN_FLIGHT {
                Some(f64::from(i.max_in_flight()))
            } else {
                i.rate_limit()
            };
            assert_eq!(got, read, "{key}={good}");
        }
        for (key, bad) in [
            (keys::MAX_IN_FLIGHT, "0"),
            (keys::MAX_IN_FLIGHT, "1001"),
            (keys::MAX_IN_FLIGHT, "2.5"),
            (keys::MAX_IN_FLIGHT, "-1"),
            (keys::MAX_IN_FLIGHT, "many"),
            (keys::RATE_LIMIT, "0"),
            (keys::RATE_LIMIT, "-1"),
            (keys::RATE_LIMIT, "inf"),
            (keys::RATE_LIMIT, "NaN"),
            (keys::RATE_LIMIT, "1e9"),
            (keys::RATE_LIMIT, "fast"),
        ] {
            let mut j = i.clone();
            j.configuration.insert(key.into(), bad.into());
            assert_eq!(
                j.validate(&allow).unwrap_err().field,
                format!("configuration.{key}"),
                "{key}={bad}"
            );
        }
        // Numbers sent as JSON numbers are stored as text and read the same.
        let parsed: Instance = serde_json::from_str(
            r#"{"configuration":{"ecwid.store.id":"1","event.notification.max.in.flight":2,"event.notification.rate.limit":0.5}}"#,
        )
        .unwrap();
        assert_eq!(parsed.validate(&allow), Ok(()));
        assert_eq!(
            (parsed.max_in_flight(), parsed.rate_limit()),
            (2, Some(0.5))
        );
    }

    #[test]
    fn webhook_secrets_are_checked() {
        let mut i = seed_with("1003", "https://a.example/");
        i.configuration.insert(
            keys::WEBHOOK_SECRET.into(),
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw whsec_c2Vjb25k".into(),
        );
        assert_eq!(i.validate(&AllowList::default()), Ok(()));
        assert_eq!(i.webhook_secrets().len(), 2);
        i.configuration
            .insert(keys::WEBHOOK_SECRET.into(), "plain".into());
        assert!(i.validate(&AllowList::default()).is_err());
    }

    #[test]
    fn polling_keys_are_checked_naming_the_key() {
        let allow = AllowList::default();
        let mut i = seed_with("1003", "https://a.example/");
        assert!(i.takes_webhooks() && !i.polls());
        assert_eq!(i.poll_interval(), std::time::Duration::from_secs(300));
        i.configuration
            .insert(keys::VENDOR_TYPE.into(), "webhooks,polling".into());
        assert_eq!(
            i.validate(&allow).unwrap_err().field,
            "configuration.ecwid.api.token"
        );
        i.configuration
            .insert(keys::API_TOKEN.into(), "secret_abc123".into());
        assert_eq!(i.validate(&allow), Ok(()));
        assert!(i.takes_webhooks() && i.polls());
        assert_eq!(i.redacted().configuration[keys::API_TOKEN], REDACTED);
        assert!(!format!("{i:?}").contains("secret_abc123"));
        for (key, value) in [
            (keys::VENDOR_TYPE, "carrier-pigeon"),
            (keys::VENDOR_TYPE, "polling,fax"),
            (keys::POLL_INTERVAL, "0.01"),
            (keys::POLL_INTERVAL, "soon"),
            (keys::POLL_INTERVAL, "NaN"),
            (keys::API_TOKEN, "public_abc"),
            (keys::API_TOKEN, "secret_abc\u{0}123"),
            (keys::API_TOKEN, "secret_abc\u{7f}"),
            (keys::STORE_ID, "1003\u{0}"),
            (keys::CALLBACK_URL, "https://a.example/\u{0}hook"),
            (keys::CALLBACK_URL, "https://a.example/\r\nX-Evil: 1"),
        ] {
            let mut bad = i.clone();
            bad.configuration.insert(key.into(), value.into());
            assert_eq!(
                bad.validate(&allow).unwrap_err().field,
                format!("configuration.{key}"),
                "{key}={value}"
            );
        }
        i.configuration
            .insert(keys::VENDOR_TYPE.into(), " Polling ".into());
        i.configuration
            .insert(keys::POLL_INTERVAL.into(), "0.05".into());
        assert_eq!(i.validate(&allow), Ok(()));
        assert!(!i.takes_webhooks() && i.polls());
        assert_eq!(i.poll_interval(), std::time::Duration::from_secs(3));
    }

    #[test]
    fn receiver_keys_are_checked_naming_the_key_and_their_secrets_redacted() {
        let allow = AllowList::default();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["c.example".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let mut i = seed_with("1003", "https://a.example/");
        for (k, v) in [
            (keys::HEADERS, r#"{"X-Api-Key":"hk-1"}"#.to_owned()),
            (
                keys::PROXY_URL,
                "http://pu:proxy-pw-77@proxy.example:3128".to_owned(),
            ),
            (keys::TLS_CLIENT_CERTIFICATE, cert.pem()),
            (keys::TLS_CLIENT_KEY, key.serialize_pem()),
            (keys::TLS_CA, cert.pem()),
            (
                keys::OAUTH2_TOKEN_URL,
                "https://idp.example/token".to_owned(),
            ),
            (keys::OAUTH2_CLIENT_ID, "cid".to_owned()),
            (keys::OAUTH2_CLIENT_SECRET, "cs-1".to_owned()),
            (keys::OAUTH2_SCOPE, "hooks:write".to_owned()),
            (
                keys::FILTER,
                "raw.data.newPaymentStatus == 'PAID'".to_owned(),
            ),
        ] {
            i.configuration.insert(k.into(), v);
        }
        assert_eq!(i.validate(&allow), Ok(()));
        assert_eq!(
            i.custom_headers(),
            vec![("X-Api-Key".into(), "hk-1".into())]
        );
        assert!(i.client_certificate_expires_at().is_some());
        assert_eq!(i.oauth2().map(|o| o.client_id), Some("cid"));
        let shown = serde_json::to_string(&i.redacted()).unwrap();
        for secret in [
            "hk-1",
            "proxy-pw-77",
            "cs-1",
            "PRIVATE KEY",
            "BEGIN CERTIFICATE-----\nMII",
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("X-Api-Key") && shown.contains("BEGIN CERTIFICATE"));
        assert!(!format!("{:?}", i.oauth2()).contains("cs-1"));
        for (k, v) in [
            (keys::HEADERS, r#"{"Host":"x"}"#),
            (keys::HEADERS, r#"{"Authorization":"Basic x"}"#),
            (keys::PROXY_URL, "socks5://p.example:1080"),
            (
                keys::TLS_CLIENT_KEY,
                "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----",
            ),
            (keys::TLS_CA, "nothing"),
            (keys::OAUTH2_TOKEN_URL, "ftp://idp.example/"),
            (keys::OAUTH2_CLIENT_SECRET, ""),
            (keys::FILTER, "raw.data.newPaymentStatus =="),
        ] {
            let mut bad = i.clone();
            bad.configuration.insert(k.into(), v.into());
            assert_eq!(
                bad.validate(&allow).unwrap_err().field,
                format!("configuration.{k}"),
                "{k}={v}"
            );
        }
        let mut lone = seed_with("1003", "https://a.example/");
        lone.configuration
            .insert(keys::TLS_CLIENT_CERTIFICATE.into(), cert.pem());
        assert_eq!(
            lone.validate(&allow).unwrap_err().field,
            "configuration.event.notification.tls.client.key"
        );
    }
}
