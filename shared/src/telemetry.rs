//! Tracing: `RUST_LOG` filters (default `info`), `LOG_FORMAT` picks text or JSON lines. A panic
//! is logged through the same subscriber, so even it comes out in the configured format. With
//! `OTEL_EXPORTER_OTLP_ENDPOINT` set, spans are exported too ([`crate::otel`]) and every JSON line
//! logged inside a span carries its `trace_id` and `span_id`.

use std::sync::OnceLock;

use tracing::dispatcher::WeakDispatch;
use tracing_subscriber::fmt::format::{Format, Json, Writer};
use tracing_subscriber::fmt::{self, FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::config::LogFormat;
use crate::otel::{Exporting, TraceConfig};

/// The log filter's variable (tracing's own name) and its default.
pub const FILTER_VAR: &str = "RUST_LOG";
pub const DEFAULT_FILTER: &str = "info";

/// The installed subscriber, for the JSON formatter to find a span's trace context (a formatter
/// runs inside the dispatcher, where the current-dispatcher lookup answers "none").
static DISPATCH: OnceLock<WeakDispatch> = OnceLock::new();

/// Installs the global subscriber. A second call (tests start several services) is a no-op.
/// With `traces` set to a configuration whose endpoint is set, spans are exported on `runtime`;
/// the result then flushes them at exit. An exporter that cannot be built is logged and traces
/// stay off: the service itself runs on.
pub fn init(
    format: LogFormat,
    traces: Option<(&TraceConfig, tokio::runtime::Handle)>,
) -> Option<Exporting> {
    let mut filter =
        EnvFilter::try_from_env(FILTER_VAR).unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let mut failed = None;
    let exporting = match traces {
        Some((config, runtime)) if config.endpoint.is_some() => {
            match crate::otel::start(config, runtime) {
                Ok(started) => {
                    // The trace-only spans are TRACE level under their own target.
                    if let Ok(directive) = format!("{}=trace", crate::otel::TARGET).parse() {
                        filter = filter.add_directive(directive);
                    }
                    Some(started)
                }
                Err(error) => {
                    failed = Some(error);
                    None
                }
            }
        }
        _ => None,
    };
    let otel = exporting.as_ref().map(|(provider, _)| {
        crate::otel::layer(provider).with_filter(tracing_subscriber::filter::filter_fn(|m| {
            m.is_span() && m.target() == crate::otel::TARGET
        }))
    });
    let fmt_layer = match format {
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_target(false)
            .event_format(WithTraceIds(
                fmt::format().json().flatten_event(true).with_target(false),
            ))
            .boxed(),
        LogFormat::Text => fmt::layer().with_target(false).boxed(),
    };
    // The trace-only spans (TRACE, enabled for the exporter) are not the logs' business: the log
    // layer would format every one's fields for nothing.
    let fmt_layer = if exporting.is_some() {
        fmt_layer
            .with_filter(tracing_subscriber::filter::filter_fn(|m| {
                !(m.target() == crate::otel::TARGET && *m.level() == tracing::Level::TRACE)
            }))
            .boxed()
    } else {
        fmt_layer
    };
    let subscriber = tracing_subscriber::registry()
        .with(otel)
        .with(fmt_layer)
        .with(filter);
    let dispatch = tracing::Dispatch::new(subscriber);
    let weak = dispatch.downgrade();
    if dispatch.try_init().is_ok() {
        let _ = DISPATCH.set(weak);
    }
    if let Some(error) = failed {
        tracing::error!(%error, "Traces are off: the exporter could not be set up.");
    }
    std::panic::set_hook(Box::new(|info| {
        let message = panic_message(info.payload());
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(panic = %message, %location, "A task panicked.");
    }));
    exporting.map(|(_, exporting)| exporting)
}

/// The JSON line of tracing-subscriber, with `trace_id` and `span_id` of the current span added
/// while traces are on.
struct WithTraceIds(Format<Json>);

impl<S, N> FormatEvent<S, N> for WithTraceIds
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    Format<Json>: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let ids = if crate::otel::enabled() {
            ctx.lookup_current().and_then(|span| {
                let dispatch = DISPATCH.get()?.upgrade()?;
                crate::otel::ids_of(&span.id(), &dispatch)
            })
        } else {
            None
        };
        let Some((trace_id, span_id)) = ids else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match line.trim_end().strip_suffix('}') {
            Some(open) => writeln!(
                writer,
                "{open},\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\"}}"
            ),
            None => writer.write_str(&line),
        }
    }
}

/// The text a panic was raised with.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}
