//! What app mode does when Ecwid says a merchant left or changed plan, and the purge that
//! follows a departure.
//!
//! - `application.uninstalled`: the store's app-made instances are disabled at once (nothing
//!   more is delivered; what is held stays), their REST token (which Ecwid revoked) is dropped
//!   so the poller stops, and the store's purge is due after `ECWID_APP_PURGE_AFTER`, written
//!   on the instance so that it survives restarts.
//! - `application.subscriptionStatusChanged`: delivered like any event; its status is shown on
//!   the instance.
//! - [`spawn_purger`]: every replica of the ingest looks now and then for purges that are due,
//!   and runs them through the admin API's store purge ([`crate::purge::purge_store`]). A purge
//!   run twice removes nothing more, so replicas need not agree on who runs it.

use std::time::Duration;

use async_nats::jetstream::kv;
use model::instance::{keys, AppInstall, Instance, ProvisionedBy};
use model::state::State as Mode;
use model::time_fmt::{now_unix_ms, rfc3339_to_unix_ms, unix_ms_to_rfc3339};
use shared::http::ApiError;
use tokio_util::sync::CancellationToken;

use crate::state::AdminState;
use crate::stored::{load, unavailable};

/// Ecwid's event type when a merchant uninstalls the app.
pub const UNINSTALLED: &str = "application.uninstalled";
/// Ecwid's event type when a store's subscription to the app changes.
pub const SUBSCRIPTION_CHANGED: &str = "application.subscriptionStatusChanged";

/// Why an uninstalled store's instances are disabled (shown as the state's reason).
pub const UNINSTALLED_REASON: &str = "the merchant uninstalled the Ecwid app";

/// Whether the ingest must tell [`on_app_event`] about an event of this type.
pub fn is_app_event(event_type: &str) -> bool {
    event_type == UNINSTALLED || event_type == SUBSCRIPTION_CHANGED
}

/// Acts on an app event of `store_id` the ingest has stored; idempotent, since Ecwid sends an
/// event again when the ingest answered 503, and may send it twice anyway. `data` is the
/// event's `data`.
pub async fn on_app_event(
    state: &AdminState,
    store_id: &str,
    event_type: &str,
    data: &serde_json::Value,
) -> Result<(), ApiError> {
    let Some(app) = state.inner.config.app.as_ref() else {
        return Ok(());
    };
    let instances: Vec<String> = state
        .inner
        .ctx
        .directory
        .for_store(store_id)
        .iter()
        .filter(|i| i.provisioned_by == ProvisionedBy::App)
        .map(|i| i.id.clone())
        .collect();
    match event_type {
        UNINSTALLED => {
            let mut newly = false;
            for id in &instances {
                let now = now_unix_ms();
                let due = app
                    .purge_after
                    .map(|after| now.saturating_add(after.as_millis() as i64));
                newly |= update(state, id, |instance| {
                    let record = instance.app.get_or_insert_with(AppInstall::default);
                    if record.uninstalled_at.is_some() {
                        return false;
                    }
                    record.uninstalled_at = Some(unix_ms_to_rfc3339(now));
                    record.purge_due_at = due.map(unix_ms_to_rfc3339);
                    instance.configuration.remove(keys::API_TOKEN);
                    true
                })
                .await?;
                disable(state, id).await?;
            }
            if newly {
                state.inner.metrics.app_uninstalls.inc();
                tracing::info!(
                    store_id,
                    instances = instances.len(),
                    "App uninstalled: the store's instances are disabled."
                );
            }
            if app.purge_after == Some(Duration::ZERO) {
                purge_due(state).await?;
            }
        }
        SUBSCRIPTION_CHANGED => {
            let status = ["newSubscriptionStatus", "subscriptionStatus", "status"]
                .iter()
                .find_map(|k| data[*k].as_str())
                .map(|s| s.chars().take(64).collect::<String>());
            for id in &instances {
                update(state, id, |instance| {
                    let record = instance.app.get_or_insert_with(AppInstall::default);
                    record.subscription_status = status.clone();
                    record.subscription_changed_at = Some(unix_ms_to_rfc3339(now_unix_ms()));
                    true
                })
                .await?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Applies `change` to instance `id` with compare-and-set; `change` answers whether it changed
/// anything (nothing is written otherwise). Whether something was written.
async fn update(
    state: &AdminState,
    id: &str,
    change: impl Fn(&mut Instance) -> bool,
) -> Result<bool, ApiError> {
    let store = &state.inner.ctx.kv;
    for _ in 0..5 {
        let Some((mut instance, revision)) = load(store, id).await? else {
            return Ok(false);
        };
        if !change(&mut instance) {
            return Ok(false);
        }
        instance.updated_date = Some(unix_ms_to_rfc3339(now_unix_ms()));
        let value = serde_json::to_vec(&instance).map_err(unavailable)?;
        match tokio::time::timeout(
            shared::http::JS_TIMEOUT,
            store.update(id, value.into(), revision),
        )
        .await
        {
            Ok(Ok(_)) => return Ok(true),
            Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
            Ok(Err(e)) => return Err(unavailable(e)),
            Err(_) => return Err(unavailable("the instances bucket did not answer in time")),
        }
    }
    Err(ApiError::Conflict(format!("instance {id} kept changing")))
}

/// Makes `id` disabled (the deliverers hold its envelopes from now on).
async fn disable(state: &AdminState, id: &str) -> Result<(), ApiError> {
    crate::control::transition(state, id, Mode::Disabled, Some(UNINSTALLED_REASON))
        .await
        .map(drop)
}

/// How often the purger looks for due purges: a quarter of `ECWID_APP_PURGE_AFTER`, between a
/// second and a minute.
pub fn purge_check_interval(purge_after: Duration) -> Duration {
    (purge_after / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Looks for due purges now and then until `cancel` fires (in app mode, unless purges are
/// `never`).
pub fn spawn_purger(state: AdminState, cancel: CancellationToken) {
    let Some(after) = state.inner.config.app.as_ref().and_then(|a| a.purge_after) else {
        return;
    };
    let every = purge_check_interval(after);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(error) = purge_due(&state).await {
                tracing::warn!(%error, "Could not run the app's due purges; trying again later.");
            }
        }
    });
}

/// Purges every store whose app instance's purge is due, and notes it on the instance.
pub async fn purge_due(state: &AdminState) -> Result<(), ApiError> {
    let store = &state.inner.ctx.kv;
    let keys = crate::stored::ids(store).await?;
    let now = now_unix_ms();
    for key in keys {
        let Some((instance, _)) = load(store, &key).await? else {
            continue;
        };
        let due = instance
            .app
            .as_ref()
            .and_then(|a| a.purge_due_at.as_deref())
            .and_then(rfc3339_to_unix_ms);
        let (Some(due), Some(store_id)) = (due, instance.store_id()) else {
            continue;
        };
        if due > now || instance.provisioned_by != ProvisionedBy::App {
            continue;
        }
        let removed = crate::purge::purge_store(&state.inner.ctx, store_id, None).await?;
        update(state, &key, |instance| {
            let Some(record) = instance.app.as_mut() else {
                return false;
            };
            record.purge_due_at = None;
            record.purged_at = Some(unix_ms_to_rfc3339(now_unix_ms()));
            true
        })
        .await?;
        tracing::info!(
            store_id,
            instance_id = %key,
            log_events = removed.event_log_records,
            dead_letters = removed.dead_letters,
            held = removed.held_envelopes,
            "Uninstalled store's data purged."
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purger_looks_often_enough_and_not_too_often() {
        assert_eq!(purge_check_interval(Duration::ZERO), Duration::from_secs(1));
        assert_eq!(
            purge_check_interval(Duration::from_secs(8)),
            Duration::from_secs(2)
        );
        assert_eq!(
            purge_check_interval(Duration::from_secs(30 * 86_400)),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn only_app_events_are_handed_over() {
        assert!(is_app_event("application.uninstalled"));
        assert!(is_app_event("application.subscriptionStatusChanged"));
        assert!(!is_app_event("application.installed"));
        assert!(!is_app_event("order.created"));
    }
}
