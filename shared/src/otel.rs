//! OpenTelemetry traces: the `OTEL_*` configuration, the exporter (OTLP over HTTP/protobuf or
//! gRPC, batched, on its own thread), the W3C trace context in NATS message headers and HTTP
//! requests, and the spans' shared vocabulary. One event is one trace: the ingest's request span
//! is its root (or the caller's `traceparent`), every stage continues the context it finds in the
//! message headers, and each callback POST carries the attempt's `traceparent`.
//!
//! Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` is set. Off, the spans this module's callers create
//! at TRACE level under [`TARGET`] are disabled by the log filter (a cached callsite check), and
//! [`enabled`] (one relaxed atomic load) guards every header read and write: no per-event work.
//!
//! A collector that cannot be reached costs no request any time: spans wait in a bounded queue
//! for the exporter's thread; an export that fails drops its batch, a full queue drops the span,
//! and both are counted (`ecwid_trace_spans_dropped_total{reason}`).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, SpanData, SpanExporter,
    SpanProcessor,
};
use opentelemetry_sdk::Resource;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

use crate::config::{ConfigError, Vars};

/// The target of the spans that exist for the traces only (publishes, attempts, cycles). They
/// are TRACE level, so the default log filter leaves them disabled while export is off.
pub const TARGET: &str = "otel";

/// The instrumentation scope the spans are exported under.
const SCOPE: &str = "ecwid-events";

pub const ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
pub const PROTOCOL_VAR: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
pub const TIMEOUT_VAR: &str = "OTEL_EXPORTER_OTLP_TIMEOUT";
pub const SERVICE_NAME_VAR: &str = "OTEL_SERVICE_NAME";
pub const SAMPLER_VAR: &str = "OTEL_TRACES_SAMPLER";
pub const SAMPLER_ARG_VAR: &str = "OTEL_TRACES_SAMPLER_ARG";
pub const RESOURCE_VAR: &str = "OTEL_RESOURCE_ATTRIBUTES";
pub const SCHEDULE_DELAY_VAR: &str = "OTEL_BSP_SCHEDULE_DELAY";
pub const QUEUE_SIZE_VAR: &str = "OTEL_BSP_MAX_QUEUE_SIZE";

/// Spans exported, and spans dropped by reason (`export_failed`: the collector did not take the
/// batch; `queue_full`: the exporter was behind and the queue full).
pub const SPANS_EXPORTED_TOTAL: &str = "ecwid_trace_spans_exported_total";
pub const SPANS_DROPPED_TOTAL: &str = "ecwid_trace_spans_dropped_total";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether traces are exported by this process. Everything that reads or writes trace headers
/// asks this first.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// How spans reach the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

/// `OTEL_TRACES_SAMPLER`, the names of the OpenTelemetry specification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerKind {
    AlwaysOn,
    AlwaysOff,
    TraceIdRatio,
    ParentBasedAlwaysOn,
    ParentBasedAlwaysOff,
    ParentBasedTraceIdRatio,
}

impl SamplerKind {
    const ALL: [(&'static str, SamplerKind); 6] = [
        ("always_on", SamplerKind::AlwaysOn),
        ("always_off", SamplerKind::AlwaysOff),
        ("traceidratio", SamplerKind::TraceIdRatio),
        ("parentbased_always_on", SamplerKind::ParentBasedAlwaysOn),
        ("parentbased_always_off", SamplerKind::ParentBasedAlwaysOff),
        (
            "parentbased_traceidratio",
            SamplerKind::ParentBasedTraceIdRatio,
        ),
    ];
}

/// The `OTEL_*` settings, read at start-up like every other setting: a bad value stops the
/// service naming the variable. Tests build it from a map ([`TraceConfig::from_vars`]).
#[derive(Clone, PartialEq)]
pub struct TraceConfig {
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`: none = traces off. For http/protobuf the base URL
    /// (`/v1/traces` is appended, as the specification says); for gRPC the collector's address.
    pub endpoint: Option<url::Url>,
    /// `OTEL_EXPORTER_OTLP_PROTOCOL`: `http/protobuf` (default) or `grpc`.
    pub protocol: Protocol,
    /// `OTEL_EXPORTER_OTLP_TIMEOUT`, ms, default 10000: one export's limit.
    pub export_timeout: Duration,
    /// `OTEL_SERVICE_NAME`, default the binary's name.
    pub service_name: String,
    pub sampler: SamplerKind,
    /// `OTEL_TRACES_SAMPLER_ARG`: the ratio of the `*traceidratio` samplers, default 1.0.
    pub sampler_arg: f64,
    /// `OTEL_RESOURCE_ATTRIBUTES`: `key=value,key=value` (values percent-decoded).
    pub resource: Vec<(String, String)>,
    /// `OTEL_BSP_SCHEDULE_DELAY`, ms, default 5000: how long spans wait to be sent in a batch.
    pub schedule_delay: Duration,
    /// `OTEL_BSP_MAX_QUEUE_SIZE`, default 2048: spans waiting for export; more are dropped.
    pub max_queue_size: usize,
}

impl std::fmt::Debug for TraceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceConfig")
            // A URL may carry a user and password.
            .field(
                "endpoint",
                &self
                    .endpoint
                    .as_ref()
                    .map(|u| model::instance::redact_url(u.as_str())),
            )
            .field("protocol", &self.protocol)
            .field("export_timeout", &self.export_timeout)
            .field("service_name", &self.service_name)
            .field("sampler", &self.sampler)
            .field("sampler_arg", &self.sampler_arg)
            .field("resource", &self.resource)
            .field("schedule_delay", &self.schedule_delay)
            .field("max_queue_size", &self.max_queue_size)
            .finish()
    }
}

impl TraceConfig {
    /// Reads the `OTEL_*` variables; `service` is the default service name.
    pub fn from_vars(vars: &Vars, service: &str) -> Result<Self, ConfigError> {
        let endpoint = match vars.get(ENDPOINT_VAR) {
            None => None,
            Some(raw) => {
                let url = url::Url::parse(raw).map_err(|e| {
                    ConfigError::new(
                        ENDPOINT_VAR,
                        format!(
                            "`{}` is not a URL such as http://collector:4318: {e}",
                            model::instance::redact_url(raw)
                        ),
                    )
                })?;
                if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                    return Err(ConfigError::new(
                        ENDPOINT_VAR,
                        format!(
                            "`{}`: expected http:// or https:// and a host",
                            model::instance::redact_url(raw)
                        ),
                    ));
                }
                Some(url)
            }
        };
        let protocol = match vars.string_or(PROTOCOL_VAR, "http/protobuf").as_str() {
            "http/protobuf" => Protocol::HttpProtobuf,
            "grpc" => Protocol::Grpc,
            other => {
                return Err(ConfigError::new(
                    PROTOCOL_VAR,
                    format!("expected grpc or http/protobuf, got `{other}`"),
                ))
            }
        };
        let sampler_name = vars.string_or(SAMPLER_VAR, "parentbased_always_on");
        let sampler = SamplerKind::ALL
            .iter()
            .find(|(name, _)| *name == sampler_name)
            .map(|(_, kind)| *kind)
            .ok_or_else(|| {
                let names: Vec<&str> = SamplerKind::ALL.iter().map(|(n, _)| *n).collect();
                ConfigError::new(
                    SAMPLER_VAR,
                    format!("expected one of {}, got `{sampler_name}`", names.join(", ")),
                )
            })?;
        let sampler_arg: f64 = vars.parse_or(SAMPLER_ARG_VAR, 1.0)?;
        if !(0.0..=1.0).contains(&sampler_arg) {
            return Err(ConfigError::new(
                SAMPLER_ARG_VAR,
                format!("a ratio between 0 and 1, got {sampler_arg}"),
            ));
        }
        let resource = parse_resource(&vars.string_or(RESOURCE_VAR, ""))
            .map_err(|e| ConfigError::new(RESOURCE_VAR, e))?;
        let max_queue_size: usize = vars.parse_or(QUEUE_SIZE_VAR, 2048)?;
        if max_queue_size == 0 {
            return Err(ConfigError::new(QUEUE_SIZE_VAR, "must be at least 1"));
        }
        Ok(Self {
            endpoint,
            protocol,
            export_timeout: vars.millis_or(TIMEOUT_VAR, 10_000, 1)?,
            service_name: vars.string_or(SERVICE_NAME_VAR, service),
            sampler,
            sampler_arg,
            resource,
            schedule_delay: vars.millis_or(SCHEDULE_DELAY_VAR, 5_000, 1)?,
            max_queue_size,
        })
    }

    /// Where the exporter sends: the signal's path appended for http/protobuf.
    fn export_url(&self) -> Option<String> {
        let base = self.endpoint.as_ref()?;
        Some(match self.protocol {
            Protocol::Grpc => base.to_string(),
            Protocol::HttpProtobuf => {
                let mut url = base.clone();
                let path = format!("{}/v1/traces", base.path().trim_end_matches('/'));
                url.set_path(&path);
                url.to_string()
            }
        })
    }

    fn sampler(&self) -> Sampler {
        let ratio = Sampler::TraceIdRatioBased(self.sampler_arg);
        match self.sampler {
            SamplerKind::AlwaysOn => Sampler::AlwaysOn,
            SamplerKind::AlwaysOff => Sampler::AlwaysOff,
            SamplerKind::TraceIdRatio => ratio,
            SamplerKind::ParentBasedAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            SamplerKind::ParentBasedAlwaysOff => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            SamplerKind::ParentBasedTraceIdRatio => Sampler::ParentBased(Box::new(ratio)),
        }
    }
}

/// `key=value,key=value`, values percent-encoded (W3C Baggage octets).
fn parse_resource(raw: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for item in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((key, value)) = item.split_once('=') else {
            return Err(format!("`{item}` is not key=value"));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(format!("`{item}` has no key"));
        }
        let value = percent_decode(value.trim())
            .ok_or_else(|| format!("`{item}`: the value is not valid percent-encoded UTF-8"))?;
        out.push((key.to_owned(), value));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The span counters, one set per process (each service's registry registers the same ones).
struct SpanCounters {
    exported: IntCounter,
    dropped: IntCounterVec,
}

static COUNTERS: LazyLock<SpanCounters> = LazyLock::new(|| {
    SpanCounters {
    exported: IntCounter::new(SPANS_EXPORTED_TOTAL, "Trace spans the collector took.")
        .expect("valid metric"),
    dropped: IntCounterVec::new(
        Opts::new(
            SPANS_DROPPED_TOTAL,
            "Trace spans dropped, by reason (export_failed: the collector did not take them; queue_full: the exporter was behind).",
        ),
        &["reason"],
    )
    .expect("valid metric"),
}
});

/// Registers the span counters in `reg` (every service has them; they stay 0 while off).
pub fn register_metrics(reg: &Registry) {
    crate::metrics::declare(SPANS_EXPORTED_TOTAL, "counter");
    crate::metrics::declare(SPANS_DROPPED_TOTAL, "counter");
    // A registry takes each only once; a second service in the same process has its own.
    let _ = reg.register(Box::new(COUNTERS.exported.clone()));
    let _ = reg.register(Box::new(COUNTERS.dropped.clone()));
}

/// The exporting half, kept by `main` to flush what is queued at exit.
#[derive(Debug, Clone)]
pub struct Exporting {
    provider: SdkTracerProvider,
}

/// What is still queued gets this long to reach the collector at exit.
const FLUSH_AT_EXIT: Duration = Duration::from_secs(2);

impl Exporting {
    /// Sends what is queued (bounded by [`FLUSH_AT_EXIT`]) and stops the exporter's thread.
    /// Call it from within the runtime, before the runtime stops: the exports run on it.
    pub async fn shutdown(self) {
        let provider = self.provider;
        let flushed =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(FLUSH_AT_EXIT));
        if let Ok(Ok(Err(error))) = tokio::time::timeout(FLUSH_AT_EXIT * 2, flushed).await {
            tracing::debug!(%error, "Trace exporter did not stop cleanly.");
        }
    }
}

/// The tracer provider for `config` (whose endpoint is set), exporting on `runtime`. Marks this
/// process as tracing ([`enabled`]).
pub fn start(
    config: &TraceConfig,
    runtime: tokio::runtime::Handle,
) -> Result<(SdkTracerProvider, Exporting), String> {
    let url = config
        .export_url()
        .ok_or_else(|| format!("{ENDPOINT_VAR} is not set"))?;
    let _entered = runtime.enter();
    let provider = match config.protocol {
        Protocol::HttpProtobuf => {
            let client = reqwest::Client::builder()
                .timeout(config.export_timeout)
                .no_proxy()
                .build()
                .map_err(|e| format!("cannot build the trace exporter's HTTP client: {e}"))?;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_http_client(HttpClient(client))
                .with_endpoint(url)
                .with_timeout(config.export_timeout)
                .build()
                .map_err(|e| format!("cannot build the trace exporter: {e}"))?;
            provider(config, Counted::new(exporter, runtime.clone()))
        }
        Protocol::Grpc => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(url)
                .with_timeout(config.export_timeout)
                .build()
                .map_err(|e| format!("cannot build the trace exporter: {e}"))?;
            provider(config, Counted::new(exporter, runtime.clone()))
        }
    };
    opentelemetry::global::set_tracer_provider(provider.clone());
    ENABLED.store(true, Ordering::Relaxed);
    Ok((provider.clone(), Exporting { provider }))
}

/// The provider: `exporter` behind a batch processor and its counted bound, the sampler and
/// the resource of `config`.
fn provider<E: SpanExporter + 'static>(
    config: &TraceConfig,
    exporter: Counted<E>,
) -> SdkTracerProvider {
    let pending = exporter.pending.clone();
    let batch = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_scheduled_delay(config.schedule_delay)
                .with_max_queue_size(config.max_queue_size)
                .with_max_export_batch_size(config.max_queue_size.min(512))
                .build(),
        )
        .build();
    let processor = Bounded {
        inner: batch,
        pending,
        capacity: config.max_queue_size,
    };
    let resource = Resource::builder_empty()
        .with_service_name(config.service_name.clone())
        .with_attributes(
            config
                .resource
                .iter()
                .filter(|(k, _)| k != "service.name")
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
        )
        .with_attributes([
            KeyValue::new("service.version", crate::VERSION),
            KeyValue::new("telemetry.sdk.language", "rust"),
        ])
        .build();
    SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(config.sampler())
        .with_resource(resource)
        .build()
}

/// The tracer spans are made with.
pub fn tracer(provider: &SdkTracerProvider) -> opentelemetry_sdk::trace::SdkTracer {
    provider.tracer(SCOPE)
}

/// The exporter's HTTP client: the workspace's reqwest (the exporter's own feature would bring a
/// second major version of it). It runs on the service's runtime: [`Counted`] exports there.
#[derive(Debug)]
struct HttpClient(reqwest::Client);

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for HttpClient {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<bytes::Bytes>,
    ) -> Result<opentelemetry_http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let request = reqwest::Request::try_from(request)?;
        let response = self.0.execute(request).await?;
        let mut out = opentelemetry_http::Response::builder().status(response.status());
        if let Some(headers) = out.headers_mut() {
            *headers = response.headers().clone();
        }
        let body = response.bytes().await?;
        Ok(out.body(body)?)
    }
}

/// An exporter run on the service's Tokio runtime (the batch processor calls it from a thread of
/// its own, where neither reqwest nor tonic could run), counting what it exported and dropped.
#[derive(Debug)]
struct Counted<E> {
    inner: Arc<E>,
    runtime: tokio::runtime::Handle,
    /// Spans handed to the processor and not yet through an export ([`Bounded`]).
    pending: Arc<AtomicUsize>,
    /// Whether the last export failed: a failing collector is logged once, not per batch.
    failing: AtomicBool,
}

impl<E: SpanExporter + 'static> Counted<E> {
    fn new(inner: E, runtime: tokio::runtime::Handle) -> Self {
        Self {
            inner: Arc::new(inner),
            runtime,
            pending: Arc::new(AtomicUsize::new(0)),
            failing: AtomicBool::new(false),
        }
    }

    async fn export_counted(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let inner = Arc::clone(&self.inner);
        let result = match self
            .runtime
            .spawn(async move { inner.export(batch).await })
            .await
        {
            Ok(result) => result,
            Err(e) => Err(OTelSdkError::InternalFailure(e.to_string())),
        };
        self.pending.fetch_sub(n, Ordering::Relaxed);
        let n = n as u64;
        match &result {
            Ok(()) => {
                COUNTERS.exported.inc_by(n);
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("Trace collector reachable again; spans are exported.");
                }
            }
            Err(error) => {
                COUNTERS
                    .dropped
                    .with_label_values(&["export_failed"])
                    .inc_by(n);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%error, dropped = n, "Trace collector did not take spans; they are dropped (counted in ecwid_trace_spans_dropped_total) until it does.");
                }
            }
        }
        result
    }
}

impl<E: SpanExporter + 'static> SpanExporter for Counted<E> {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        self.export_counted(batch)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        // Called once, when the provider is built: no export holds a clone yet.
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

/// The batch processor behind a counted bound: a span that would find the processor's queue
/// full is dropped here and counted, instead of silently there.
#[derive(Debug)]
struct Bounded {
    inner: BatchSpanProcessor,
    pending: Arc<AtomicUsize>,
    capacity: usize,
}

impl SpanProcessor for Bounded {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &opentelemetry::Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.pending.fetch_add(1, Ordering::Relaxed) >= self.capacity {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            COUNTERS.dropped.with_label_values(&["queue_full"]).inc();
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// W3C `traceparent`/`tracestate`.
static PROPAGATOR: LazyLock<TraceContextPropagator> = LazyLock::new(TraceContextPropagator::new);

struct NatsExtractor<'a>(&'a async_nats::HeaderMap);

impl Extractor for NatsExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

struct NatsInjector<'a>(&'a mut async_nats::HeaderMap);

impl Injector for NatsInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

/// The trace context a message's headers carry (empty when none, or when off).
pub fn extract_nats(h: Option<&async_nats::HeaderMap>) -> opentelemetry::Context {
    match h {
        Some(h) if enabled() => PROPAGATOR.extract(&NatsExtractor(h)),
        _ => opentelemetry::Context::new(),
    }
}

/// The trace context of an HTTP request's headers.
pub fn extract_http(h: &reqwest::header::HeaderMap) -> opentelemetry::Context {
    PROPAGATOR.extract(&opentelemetry_http::HeaderExtractor(h))
}

/// Writes `span`'s context into message headers (`traceparent`, `tracestate`), replacing what
/// they carried. Nothing while off.
pub fn inject_nats(span: &tracing::Span, h: &mut async_nats::HeaderMap) {
    if !enabled() {
        return;
    }
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        PROPAGATOR.inject_context(&cx, &mut NatsInjector(h));
    }
}

/// Writes `span`'s context into HTTP request headers. Nothing while off.
pub fn inject_http(span: &tracing::Span, h: &mut reqwest::header::HeaderMap) {
    if !enabled() {
        return;
    }
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        PROPAGATOR.inject_context(&cx, &mut opentelemetry_http::HeaderInjector(h));
    }
}

/// Makes `cx` (a context read from headers) the parent of `span`, when it holds a trace.
pub fn set_parent(span: &tracing::Span, cx: opentelemetry::Context) {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The trace id (hex) of `span`, when it has one.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let cx = span.context();
    let otel_span = cx.span();
    let sc = otel_span.span_context();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// Links `span` to the span `to` (a polled entity's trace to the cycle that read it).
pub fn link(span: &tracing::Span, to: &tracing::Span) {
    if !enabled() || span.is_disabled() || to.is_disabled() {
        return;
    }
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    add_link(span, &to.context());
}

/// Links `span` to the trace a message's headers carry (an operator's redelivery or replay
/// links the event it sends again; the event's own trace goes on under its old context).
pub fn link_to_headers(span: &tracing::Span, h: Option<&async_nats::HeaderMap>) {
    if !enabled() || span.is_disabled() {
        return;
    }
    add_link(span, &extract_nats(h));
}

/// Links `span` to the trace in `cx` (a redelivery or replay started by an operator links the
/// event's original trace).
pub fn add_link(span: &tracing::Span, cx: &opentelemetry::Context) {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let linked = cx.span().span_context().clone();
    if linked.is_valid() {
        span.add_link(linked);
    }
}

/// A finished span for the time a message waited in `stream`: from when JetStream stored it
/// (`stored`) to now, under the trace context `parent`. Nothing while off.
pub fn record_wait(
    stream: &'static str,
    stored: std::time::SystemTime,
    parent: &opentelemetry::Context,
) {
    use opentelemetry::trace::{Span as _, SpanKind, Tracer as _};
    if !enabled() || !parent.span().span_context().is_valid() {
        return;
    }
    let tracer = opentelemetry::global::tracer(SCOPE);
    let now = std::time::SystemTime::now();
    let mut span = tracer
        .span_builder(format!("wait {stream}"))
        .with_kind(SpanKind::Internal)
        .with_start_time(stored.min(now))
        .with_attributes([
            KeyValue::new("messaging.system", "nats"),
            KeyValue::new("messaging.destination.name", stream),
        ])
        .start_with_context(&tracer, parent);
    span.end_with_timestamp(now);
}

/// The trace and span ids (hex) of the span `id` of `dispatch`, for a log line.
pub fn ids_of(id: &tracing::span::Id, dispatch: &tracing::Dispatch) -> Option<(String, String)> {
    let cx = tracing_opentelemetry::get_otel_context(id, dispatch)?;
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid()
        .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
}

/// The layer that turns the [`TARGET`] spans and the stage spans into OpenTelemetry spans.
pub fn layer<S>(
    provider: &SdkTracerProvider,
) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_opentelemetry::layer()
        .with_tracer(tracer(provider))
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_target(false)
        .with_level(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Result<TraceConfig, ConfigError> {
        TraceConfig::from_vars(&Vars::from_pairs(pairs.iter().copied()), "deliverer")
    }

    #[test]
    fn off_without_an_endpoint_with_the_specification_s_defaults() {
        let c = config(&[]).expect("defaults");
        assert_eq!(c.endpoint, None);
        assert_eq!(c.export_url(), None);
        assert_eq!(c.protocol, Protocol::HttpProtobuf);
        assert_eq!(c.service_name, "deliverer");
        assert_eq!(c.sampler, SamplerKind::ParentBasedAlwaysOn);
        assert_eq!(c.schedule_delay, Duration::from_secs(5));
        assert_eq!(c.export_timeout, Duration::from_secs(10));
    }

    #[test]
    fn http_appends_the_signal_path_and_grpc_does_not() {
        let c = config(&[(ENDPOINT_VAR, "http://collector:4318")]).expect("valid");
        assert_eq!(
            c.export_url().as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        let c = config(&[(ENDPOINT_VAR, "http://collector:4318/otlp/")]).expect("valid");
        assert_eq!(
            c.export_url().as_deref(),
            Some("http://collector:4318/otlp/v1/traces")
        );
        let c = config(&[
            (ENDPOINT_VAR, "http://collector:4317"),
            (PROTOCOL_VAR, "grpc"),
        ])
        .expect("valid");
        assert_eq!(c.export_url().as_deref(), Some("http://collector:4317/"));
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (var, value) in [
            (ENDPOINT_VAR, "collector:4318"),
            (ENDPOINT_VAR, "ftp://collector"),
            (PROTOCOL_VAR, "http/json"),
            (SAMPLER_VAR, "sometimes"),
            (SAMPLER_ARG_VAR, "1.5"),
            (SAMPLER_ARG_VAR, "half"),
            (RESOURCE_VAR, "novalue"),
            (RESOURCE_VAR, "k=%zz"),
            (SCHEDULE_DELAY_VAR, "0"),
            (QUEUE_SIZE_VAR, "0"),
            (TIMEOUT_VAR, "soon"),
        ] {
            let err = config(&[(var, value)]).expect_err(value);
            assert_eq!(err.var, var, "{value}: {err}");
        }
    }

    #[test]
    fn resource_attributes_are_decoded_and_the_name_is_ours_to_default() {
        let c = config(&[
            (RESOURCE_VAR, "deployment.environment=prod, team=a%20b"),
            (SERVICE_NAME_VAR, "deliverer-eu"),
            (SAMPLER_VAR, "parentbased_traceidratio"),
            (SAMPLER_ARG_VAR, "0.01"),
        ])
        .expect("valid");
        assert_eq!(
            c.resource,
            vec![
                ("deployment.environment".to_owned(), "prod".to_owned()),
                ("team".to_owned(), "a b".to_owned())
            ]
        );
        assert_eq!(c.service_name, "deliverer-eu");
        assert_eq!(c.sampler, SamplerKind::ParentBasedTraceIdRatio);
        assert!((c.sampler_arg - 0.01).abs() < f64::EPSILON);
    }

    #[test]
    fn the_endpoint_s_password_stays_out_of_debug() {
        let c = config(&[(ENDPOINT_VAR, "https://user:hunter2@collector:4318")]).expect("valid");
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
