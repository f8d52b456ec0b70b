//! Tracing: `RUST_LOG` filters (default `info`), `LOG_FORMAT` picks text or JSON lines. A panic
//! is logged through the same subscriber, so even it comes out in the configured format.

use tracing_subscriber::{fmt, EnvFilter};

use crate::config::LogFormat;

/// The log filter's variable (tracing's own name) and its default.
pub const FILTER_VAR: &str = "RUST_LOG";
pub const DEFAULT_FILTER: &str = "info";

/// Installs the global subscriber. A second call (tests start several services) is a no-op.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_env(FILTER_VAR).unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = fmt().with_env_filter(filter).with_target(false);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    std::panic::set_hook(Box::new(|info| {
        let message = panic_message(info.payload());
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(panic = %message, %location, "A task panicked.");
    }));
}

/// The text a panic was raised with.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}
