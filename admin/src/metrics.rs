//! The admin API's metrics.

use prometheus::{IntCounter, IntCounterVec, Registry};
use shared::metrics::{counter, counter_vec};

/// Installs of the Ecwid app (app mode), by outcome.
pub const APP_INSTALLS_TOTAL: &str = "ecwid_app_installs_total";
/// `application.uninstalled` events that disabled a store.
pub const APP_UNINSTALLS_TOTAL: &str = "ecwid_app_uninstalls_total";

#[derive(Debug, Clone)]
pub struct Metrics {
    /// to: paused, active (the admin API's pause and resume).
    pub instance_transitions: IntCounterVec,
    /// outcome: installed, reinstalled, admin_instance, forged_state, expired_state,
    /// replayed_state, refused_code, unknown_store, error.
    pub app_installs: IntCounterVec,
    pub app_uninstalls: IntCounter,
}

impl Metrics {
    pub fn register(reg: &Registry) -> Self {
        Self {
            instance_transitions: counter_vec(
                reg,
                shared::metrics::INSTANCE_TRANSITIONS_TOTAL,
                "Instance state changes, by new state.",
                &["to"],
            ),
            app_installs: counter_vec(
                reg,
                APP_INSTALLS_TOTAL,
                "Installs of the Ecwid app (OAuth callbacks), by outcome.",
                &["outcome"],
            ),
            app_uninstalls: counter(
                reg,
                APP_UNINSTALLS_TOTAL,
                "Stores whose application.uninstalled disabled their instances.",
            ),
        }
    }
}
