//! An instance's state, as an operator or the deliverer sets it (active, paused, disabled), and
//! the value stored for it under its id in `ECWID_INSTANCE_STATE` (no key: active).

use serde::{Deserialize, Serialize};

use crate::time_fmt::unix_ms_to_rfc3339;

/// Where an instance's events go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Delivered as they come.
    #[default]
    Active,
    /// Held by an operator until resumed.
    Paused,
    /// Held since its deliveries failed for `DELIVER_DISABLE_AFTER`; resumed by an operator.
    Disabled,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Active => "active",
            State::Paused => "paused",
            State::Disabled => "disabled",
        }
    }

    /// Whether its envelopes wait in the hold.
    pub fn holds(self) -> bool {
        !matches!(self, State::Active)
    }

    pub const ALL: [State; 3] = [State::Active, State::Paused, State::Disabled];
}

/// The value under an instance id in `ECWID_INSTANCE_STATE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceState {
    pub state: State,
    /// RFC 3339: when it entered this state.
    pub since: String,
    /// Why, in words (for `disabled`: the failure that disabled it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl InstanceState {
    pub fn new(state: State, now_ms: i64, reason: Option<String>) -> Self {
        Self {
            state,
            since: unix_ms_to_rfc3339(now_ms),
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_serialize_as_the_api_names_them() {
        let s = InstanceState::new(State::Disabled, 0, Some("HTTP 503".into()));
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["state"], "disabled");
        assert_eq!(json["since"], "1970-01-01T00:00:00Z");
        assert!(State::Paused.holds() && State::Disabled.holds() && !State::Active.holds());
    }
}
