//! App mode's install, behind the ingest's public routes (`GET /ecwid/install`, `GET
//! /ecwid/oauth/callback`): the authorization URL with a signed, expiring `state`
//! ([`authorize_url`]); the callback ([`complete`]), which takes the state once, exchanges the
//! code for the store's token server-side and provisions the store's instance from the template
//! ([`provision`]). What the merchant is told is [`Outcome::message`] (never a secret).

use std::time::Duration;

use async_nats::jetstream::kv;
use axum::http::StatusCode;
use model::instance::{keys, new_instance_id, AppInstall, Instance, ProvisionedBy};
use model::state::State as Mode;
use model::time_fmt::{now_unix_ms, unix_ms_to_rfc3339};
use shared::http::ApiError;
use shared::nats::APP_STATES_BUCKET;

use crate::config::AppConfig;
use crate::oauth_state::{self, StateError};
use crate::state::AdminState;
use crate::stored::{load, unavailable, within};

/// How long the token exchange with Ecwid may take.
const TOKEN_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest token answer read.
const MAX_TOKEN_BODY: usize = 64 * 1024;

/// The id of the instance the app provisions for `store_id`: one per store, so two installs at
/// once cannot make two.
pub fn app_instance_id(store_id: &str) -> String {
    format!("app-{store_id}")
}

/// Where `GET /ecwid/install` sends the merchant: Ecwid's authorization page, with a fresh
/// signed `state`.
pub fn authorize_url(app: &AppConfig) -> Result<String, ApiError> {
    let nonce = new_instance_id();
    let signed = oauth_state::sign(app.client_secret.expose(), &nonce, now_unix_ms());
    let mut url = url::Url::parse(&format!("{}/authorize", app.oauth_url))
        .map_err(|e| ApiError::Unavailable(format!("ECWID_OAUTH_URL: {e}")))?;
    url.query_pairs_mut()
        .append_pair("client_id", &app.client_id)
        .append_pair("redirect_uri", &app.redirect_url)
        .append_pair("response_type", "code")
        .append_pair("scope", &app.scopes)
        .append_pair("state", &signed);
    Ok(url.into())
}

/// How an install ended: the `outcome` label of `ecwid_app_installs_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Installed,
    Reinstalled,
    /// The store already has an instance an operator made: left alone.
    AdminInstance,
    ForgedState,
    ExpiredState,
    ReplayedState,
    /// Ecwid refused the code (or the merchant declined).
    RefusedCode,
    /// Ecwid's token answer named no store.
    UnknownStore,
    /// JetStream or Ecwid could not be reached.
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Installed => "installed",
            Outcome::Reinstalled => "reinstalled",
            Outcome::AdminInstance => "admin_instance",
            Outcome::ForgedState => "forged_state",
            Outcome::ExpiredState => "expired_state",
            Outcome::ReplayedState => "replayed_state",
            Outcome::RefusedCode => "refused_code",
            Outcome::UnknownStore => "unknown_store",
            Outcome::Error => "error",
        }
    }

    /// The HTTP status of the page the merchant gets.
    pub fn status(self) -> StatusCode {
        match self {
            Outcome::Installed | Outcome::Reinstalled | Outcome::AdminInstance => StatusCode::OK,
            Outcome::ForgedState
            | Outcome::ExpiredState
            | Outcome::ReplayedState
            | Outcome::RefusedCode
            | Outcome::UnknownStore => StatusCode::BAD_REQUEST,
            Outcome::Error => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// What the merchant reads: a title and a sentence (never a secret).
    pub fn message(self) -> (&'static str, &'static str) {
        match self {
            Outcome::Installed => (
                "The app is installed.",
                "Your store's events are on their way.",
            ),
            Outcome::Reinstalled => (
                "The app is installed again.",
                "Your store's events are on their way again.",
            ),
            Outcome::AdminInstance => (
                "Your store is already connected.",
                "An operator set this store up by hand; that setup was left as it is.",
            ),
            Outcome::ForgedState => (
                "Install refused.",
                "This link was not made by this app. Start the install again from Ecwid.",
            ),
            Outcome::ExpiredState => (
                "Install refused.",
                "This install link expired. Start the install again from Ecwid.",
            ),
            Outcome::ReplayedState => (
                "Install refused.",
                "This install link was already used. Start the install again from Ecwid.",
            ),
            Outcome::RefusedCode => (
                "Install refused.",
                "Ecwid did not authorize the app. Start the install again from Ecwid.",
            ),
            Outcome::UnknownStore => ("Install refused.", "Ecwid's answer named no store."),
            Outcome::Error => (
                "Install failed.",
                "Something went wrong on our side. Please try again in a minute.",
            ),
        }
    }
}

/// What Ecwid sent the merchant back with (`GET /ecwid/oauth/callback`).
#[derive(Debug, Default)]
pub struct Callback {
    pub code: Option<String>,
    pub state: Option<String>,
    /// Set when the merchant declined (`access_denied`).
    pub error: Option<String>,
}

/// The OAuth callback: takes the state once, exchanges the code, provisions the store. The
/// outcome (counted in `ecwid_app_installs_total`) and the store when Ecwid named one.
pub async fn complete(
    state: &AdminState,
    app: &AppConfig,
    callback: Callback,
) -> (Outcome, Option<String>) {
    let (outcome, store_id) = match run_callback(state, app, callback).await {
        Ok(done) => done,
        Err(error) => {
            tracing::warn!(%error, "App install failed.");
            (Outcome::Error, None)
        }
    };
    state
        .inner
        .metrics
        .app_installs
        .with_label_values(&[outcome.as_str()])
        .inc();
    tracing::info!(
        outcome = outcome.as_str(),
        store_id = store_id.as_deref().unwrap_or(""),
        "App install."
    );
    (outcome, store_id)
}

/// The callback's work: the outcome, and the store when Ecwid named one.
async fn run_callback(
    state: &AdminState,
    app: &AppConfig,
    q: Callback,
) -> Result<(Outcome, Option<String>), ApiError> {
    let nonce = match oauth_state::verify(
        app.client_secret.expose(),
        q.state.as_deref().unwrap_or_default(),
        now_unix_ms(),
    ) {
        Ok(nonce) => nonce,
        Err(StateError::Forged) => return Ok((Outcome::ForgedState, None)),
        Err(StateError::Expired) => return Ok((Outcome::ExpiredState, None)),
    };
    // Taken before anything else: a state is good once, whatever happens next.
    let states: kv::Store = within(state.inner.ctx.js.get_key_value(APP_STATES_BUCKET)).await?;
    match tokio::time::timeout(
        shared::http::JS_TIMEOUT,
        states.create(&nonce, now_unix_ms().to_string().into()),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(e)) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
            return Ok((Outcome::ReplayedState, None))
        }
        Ok(Err(e)) => return Err(unavailable(e)),
        Err(_) => return Err(unavailable("the app states bucket did not answer in time")),
    }
    if q.error.is_some() {
        return Ok((Outcome::RefusedCode, None));
    }
    let Some(code) = q.code.filter(|c| !c.is_empty()) else {
        return Ok((Outcome::RefusedCode, None));
    };
    let token = match exchange(app, &code).await {
        Ok(token) => token,
        Err(Exchange::Refused) => return Ok((Outcome::RefusedCode, None)),
        Err(Exchange::NoStore) => return Ok((Outcome::UnknownStore, None)),
        Err(Exchange::Failed(why)) => return Err(ApiError::Unavailable(why)),
    };
    let outcome = provision(state, app, &token.store_id, &token.access_token).await?;
    Ok((outcome, Some(token.store_id)))
}

/// What Ecwid's token endpoint answered.
#[derive(Debug)]
struct Token {
    access_token: String,
    store_id: String,
}

#[derive(Debug)]
enum Exchange {
    /// Ecwid answered 4xx: the code (or the app's credentials) refused.
    Refused,
    /// A token without a store id we can use.
    NoStore,
    /// Ecwid could not be reached or answered 5xx; the words say why (never a secret).
    Failed(String),
}

/// Ecwid's documented exchange: `POST {oauth}/token` with the form `client_id`,
/// `client_secret`, `code`, `redirect_uri`, `grant_type=authorization_code`, answering
/// `{"access_token", "token_type", "scope", "store_id", …}`.
async fn exchange(app: &AppConfig, code: &str) -> Result<Token, Exchange> {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(TOKEN_TIMEOUT)
        .build()
        .map_err(|e| Exchange::Failed(format!("HTTP client: {e}")))?;
    let form = [
        ("client_id", app.client_id.as_str()),
        ("client_secret", app.client_secret.expose()),
        ("code", code),
        ("redirect_uri", app.redirect_url.as_str()),
        ("grant_type", "authorization_code"),
    ];
    let body =
        serde_urlencoded::to_string(form).map_err(|e| Exchange::Failed(format!("form: {e}")))?;
    let response = http
        .post(format!("{}/token", app.oauth_url))
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(body)
        .send()
        .await
        // Without the URL: it is Ecwid's, but the error's text could carry the form.
        .map_err(|e| Exchange::Failed(format!("token request failed: {}", e.without_url())))?;
    let status = response.status();
    if status.is_client_error() {
        return Err(Exchange::Refused);
    }
    if !status.is_success() {
        return Err(Exchange::Failed(format!(
            "token endpoint answered {status}"
        )));
    }
    let bytes = response
        .bytes()
        .await
        .map_err(|e| Exchange::Failed(format!("token answer: {}", e.without_url())))?;
    if bytes.len() > MAX_TOKEN_BODY {
        return Err(Exchange::Failed("token answer too large".into()));
    }
    let v: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|_| Exchange::Failed("token answer is not JSON".into()))?;
    let access_token = v["access_token"]
        .as_str()
        .filter(|t| !t.is_empty() && !t.chars().any(char::is_control))
        .ok_or(Exchange::Refused)?
        .to_owned();
    let store_id = match &v["store_id"] {
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::String(s) => s.clone(),
        _ => String::new(),
    };
    if !model::ecwid::is_store_id(&store_id) {
        return Err(Exchange::NoStore);
    }
    Ok(Token {
        access_token,
        store_id,
    })
}

fn now() -> String {
    unix_ms_to_rfc3339(now_unix_ms())
}

/// Creates the store's instance from the template, or updates the one the app made before (the
/// token, the install time) and resumes it. A store with an instance an operator made is left
/// alone.
pub async fn provision(
    state: &AdminState,
    app: &AppConfig,
    store_id: &str,
    token: &str,
) -> Result<Outcome, ApiError> {
    let ctx = &state.inner.ctx;
    let id = app_instance_id(store_id);
    for _ in 0..5 {
        match load(&ctx.kv, &id).await? {
            Some((mut instance, revision)) => {
                instance
                    .configuration
                    .insert(keys::API_TOKEN.to_owned(), token.to_owned());
                instance.provisioned_by = ProvisionedBy::App;
                let app_record = instance.app.get_or_insert_with(AppInstall::default);
                app_record.installed_at = now();
                // A new install: what the last uninstall did is history.
                app_record.uninstalled_at = None;
                app_record.purge_due_at = None;
                app_record.purged_at = None;
                instance.updated_date = Some(now());
                let value = serde_json::to_vec(&instance).map_err(unavailable)?;
                match tokio::time::timeout(
                    shared::http::JS_TIMEOUT,
                    ctx.kv.update(&id, value.into(), revision),
                )
                .await
                {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                    Ok(Err(e)) => return Err(unavailable(e)),
                    Err(_) => {
                        return Err(unavailable("the instances bucket did not answer in time"))
                    }
                }
                resume(state, &id).await?;
                tracing::info!(instance_id = %id, store_id, "App reinstalled: instance updated and resumed.");
                return Ok(Outcome::Reinstalled);
            }
            None => {
                if ctx
                    .directory
                    .for_store(store_id)
                    .iter()
                    .any(|i| i.provisioned_by == ProvisionedBy::Admin)
                {
                    tracing::info!(
                        store_id,
                        "App installed for a store an operator set up: left alone."
                    );
                    return Ok(Outcome::AdminInstance);
                }
                let mut instance: Instance = app.instance_for(store_id, token);
                instance.id = id.clone();
                instance.provisioned_by = ProvisionedBy::App;
                instance.app = Some(AppInstall {
                    installed_at: now(),
                    ..AppInstall::default()
                });
                instance.created_date = Some(now());
                instance.updated_date = instance.created_date.clone();
                let value = serde_json::to_vec(&instance).map_err(unavailable)?;
                match tokio::time::timeout(
                    shared::http::JS_TIMEOUT,
                    ctx.kv.create(&id, value.into()),
                )
                .await
                {
                    Ok(Ok(_)) => {}
                    // Another install of the same store won: update that one.
                    Ok(Err(e)) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                    Ok(Err(e)) => return Err(unavailable(e)),
                    Err(_) => {
                        return Err(unavailable("the instances bucket did not answer in time"))
                    }
                }
                // A state left from an instance of this id deleted earlier must not hold it.
                resume(state, &id).await?;
                tracing::info!(instance_id = %id, store_id, "App installed: instance created.");
                return Ok(Outcome::Installed);
            }
        }
    }
    Err(ApiError::Conflict(format!(
        "the instance of store {store_id} kept changing"
    )))
}

/// Makes `id` active (a reinstall resumes what the uninstall disabled).
async fn resume(state: &AdminState, id: &str) -> Result<(), ApiError> {
    crate::control::transition(state, id, Mode::Active, None)
        .await
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_bounded_labels() {
        for o in [
            Outcome::Installed,
            Outcome::Reinstalled,
            Outcome::AdminInstance,
            Outcome::ForgedState,
            Outcome::ExpiredState,
            Outcome::ReplayedState,
            Outcome::RefusedCode,
            Outcome::UnknownStore,
            Outcome::Error,
        ] {
            assert!(o
                .as_str()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_'));
        }
    }

    #[test]
    fn the_state_outlives_no_remembered_nonce() {
        // A nonce must be remembered at least as long as its state is good.
        assert!(
            Duration::from_millis(oauth_state::STATE_TTL_MS as u64)
                < shared::nats::APP_STATES_MAX_AGE
        );
    }
}
