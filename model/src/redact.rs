//! The marker a secret value is shown as.

/// What a secret value looks like in a response. Sending it back in a PATCH keeps the old value.
pub const REDACTED: &str = "********";
