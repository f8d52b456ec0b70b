//! Traces: the services, as real processes, export OpenTelemetry spans to an OTLP/HTTP endpoint
//! this test serves (it decodes the protobuf `ExportTraceServiceRequest` the way a collector
//! does). One webhook delivered after one failed attempt is one trace, from the ingest's request
//! to both attempts, and the receiver gets that trace's `traceparent`.
//!
//! `cargo test -p integration-tests --test it traces::` (build the binaries first:
//! `cargo build --workspace --bins`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use axum::Router;
use integration_tests::procs::*;
use integration_tests::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use prost::Message as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

/// One exported span, as the collector got it.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    /// `Status.code`: 0 unset, 1 ok, 2 error.
    status: i32,
    attributes: HashMap<String, String>,
    /// The trace ids of its links.
    links: Vec<String>,
    /// Every string of the span and its resource, for the secrets check.
    texts: Vec<String>,
}

impl Span {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// An OTLP/HTTP trace receiver on 127.0.0.1: `POST /v1/traces` with protobuf bodies.
#[derive(Debug, Clone)]
struct Collector {
    url: String,
    spans: Arc<Mutex<Vec<Span>>>,
    _cancel: Arc<CancellationGuard>,
}

#[derive(Debug)]
struct CancellationGuard(CancellationToken);

impl Drop for CancellationGuard {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

fn text(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn export(
    State(spans): State<Arc<Mutex<Vec<Span>>>>,
    body: Bytes,
) -> impl axum::response::IntoResponse {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (axum::http::StatusCode::BAD_REQUEST, Vec::new());
    };
    let mut got = Vec::new();
    for rs in request.resource_spans {
        let resource: Vec<KeyValue> = rs.resource.map(|r| r.attributes).unwrap_or_default();
        let service = resource
            .iter()
            .find(|kv| kv.key == "service.name")
            .map(text)
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for span in ss.spans {
                let attributes: HashMap<String, String> = span
                    .attributes
                    .iter()
                    .map(|kv| (kv.key.clone(), text(kv)))
                    .collect();
                let mut texts: Vec<String> = resource.iter().map(text).collect();
                texts.extend(attributes.values().cloned());
                texts.push(span.name.clone());
                for event in &span.events {
                    texts.push(event.name.clone());
                    texts.extend(event.attributes.iter().map(text));
                }
                let status = span.status.as_ref().map_or(0, |s| s.code);
                if let Some(s) = &span.status {
                    texts.push(s.message.clone());
                }
                got.push(Span {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    status,
                    attributes,
                    links: span.links.iter().map(|l| hex(&l.trace_id)).collect(),
                    texts,
                });
            }
        }
    }
    spans.lock().expect("spans").extend(got);
    (axum::http::StatusCode::OK, Vec::new())
}

impl Collector {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let spans = Arc::new(Mutex::new(Vec::new()));
        let app = Router::new()
            .route("/v1/traces", post(export))
            .with_state(spans.clone());
        let cancel = CancellationToken::new();
        serve_until(listener, app, &cancel);
        Self {
            url: format!("http://{addr}"),
            spans,
            _cancel: Arc::new(CancellationGuard(cancel)),
        }
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().expect("spans").clone()
    }
}

/// The one span of `service` named `name` in `spans` (panics naming what it found otherwise).
fn one<'a>(spans: &'a [Span], service: &str, name: &str) -> &'a Span {
    let found: Vec<&Span> = spans
        .iter()
        .filter(|s| s.service == service && s.name == name)
        .collect();
    assert_eq!(found.len(), 1, "one {service} span `{name}`: {spans:#?}");
    found[0]
}

#[tokio::test]
async fn one_webhook_retried_once_is_one_trace_from_the_ingest_to_the_receiver() {
    let nats = NatsServer::start().await;
    let collector = Collector::start().await;
    let cluster = Cluster::start(
        &nats.url(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url.as_str()),
            // Batches go every 100 ms instead of every 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test"),
            ("LOG_FORMAT", "json"),
        ],
        1,
    )
    .await;
    // The first attempt fails with 500, the second is delivered.
    let receiver = Receiver::start(Behavior::Sequence(vec![500])).await;
    let client_secret = "trace-test-client-secret-2f8a";
    let signature_key = "trace-test-signature-key-91c3";
    let whsec = "whsec_dHJhY2UtdGVzdC1zdGFuZGFyZC1zZWNyZXQ=";
    let instance_id = cluster
        .create_instance(
            "7301",
            &receiver.url(),
            &[
                ("ecwid.client.secret", client_secret),
                ("event.notification.signature.key", signature_key),
                ("event.notification.webhook.secret", whsec),
            ],
        )
        .await;
    let event = order_created(7301, "traced-1");
    let response = cluster
        .http
        .post(cluster.webhook_url())
        .header(
            "x-ecwid-webhook-signature",
            ecwid_signature(client_secret, &event),
        )
        .json(&event)
        .send()
        .await
        .expect("webhook sent");
    assert_eq!(response.status(), 200);
    let got = receiver.wait_for(2, WAIT).await;

    // Everything the collector must have: the ingest's request and publish, the normalizer's
    // process and publish, the deliverer's process spans and both attempts.
    let spans = wait_for(
        WAIT,
        || {
            format!(
                "the pipeline's spans; the collector has {:#?}",
                collector.spans()
            )
        },
        || async {
            let spans = collector.spans();
            let count = |service: &str, name: &str| {
                spans
                    .iter()
                    .filter(|s| s.service == service && s.name == name)
                    .count()
            };
            (count("ingest", "POST /events/ecwid") == 1
                && count("ingest", "publish ECWID_RAW") == 1
                && count("normalizer", "process ECWID_RAW") == 1
                && count("normalizer", "publish ECWID_EVENTS") == 1
                && count("deliverer", "process ECWID_EVENTS") == 2
                && count("deliverer", "POST") == 2)
                .then_some(spans)
        },
    )
    .await;

    // One trace: every span of the event has the ingest's trace id.
    let request = one(&spans, "ingest", "POST /events/ecwid");
    let trace = request.trace_id.clone();
    assert_eq!(
        request.parent_span_id, "",
        "the request is the trace's root"
    );
    assert_eq!(request.attr("http.response.status_code"), Some("200"));
    assert_eq!(request.attr("http.route"), Some("/events/ecwid"));
    assert_eq!(request.attr("ecwid.store_id"), Some("7301"));
    assert_eq!(request.attr("ecwid.event_id"), Some("traced-1"));
    for s in &spans {
        assert_eq!(
            s.trace_id, trace,
            "one trace id across the pipeline: {s:#?}"
        );
    }
    let raw_publish = one(&spans, "ingest", "publish ECWID_RAW");
    assert_eq!(raw_publish.parent_span_id, request.span_id);
    assert_eq!(raw_publish.attr("messaging.system"), Some("nats"));
    let normalize = one(&spans, "normalizer", "process ECWID_RAW");
    assert_eq!(
        normalize.parent_span_id, raw_publish.span_id,
        "the normalizer continues the ingest's context from the message headers"
    );
    assert_eq!(normalize.attr("messaging.system"), Some("nats"));
    assert_eq!(normalize.attr("ecwid.event_id"), Some("traced-1"));
    let envelope_publish = one(&spans, "normalizer", "publish ECWID_EVENTS");
    assert_eq!(envelope_publish.parent_span_id, normalize.span_id);
    assert_eq!(
        envelope_publish.attr("instance.id"),
        Some(instance_id.as_str())
    );
    let envelope_id = envelope_publish
        .attr("envelope.id")
        .expect("the envelope's id")
        .to_owned();

    // Each delivery of the envelope continues the normalizer's publish; an attempt under each.
    let processes: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "process ECWID_EVENTS")
        .collect();
    for p in &processes {
        assert_eq!(p.parent_span_id, envelope_publish.span_id, "{p:#?}");
        assert_eq!(p.attr("envelope.id"), Some(envelope_id.as_str()));
        assert_eq!(p.attr("instance.id"), Some(instance_id.as_str()));
    }
    let mut attempts: Vec<&Span> = spans
        .iter()
        .filter(|s| s.service == "deliverer" && s.name == "POST")
        .collect();
    attempts.sort_by_key(|s| s.attr("attempt").map(str::to_owned));
    let (first, second) = (attempts[0], attempts[1]);
    assert_eq!(first.attr("attempt"), Some("1"));
    assert_eq!(first.attr("http.response.status_code"), Some("500"));
    assert_eq!(first.status, 2, "a failed attempt is an error: {first:#?}");
    assert_eq!(first.attr("error.type"), Some("500"));
    assert_eq!(second.attr("attempt"), Some("2"));
    assert_eq!(second.attr("http.response.status_code"), Some("200"));
    assert_ne!(
        second.status, 2,
        "the delivered attempt is no error: {second:#?}"
    );
    for a in [first, second] {
        assert_eq!(a.attr("http.request.method"), Some("POST"));
        assert_eq!(a.attr("server.address"), Some("127.0.0.1"));
        assert_eq!(a.attr("envelope.id"), Some(envelope_id.as_str()));
        assert!(
            processes.iter().any(|p| p.span_id == a.parent_span_id),
            "an attempt is a child of its delivery's process span: {a:#?}"
        );
    }

    // The receiver got each attempt's context: its trace, the attempt span as parent.
    for (request, attempt) in got.iter().zip([first, second]) {
        let traceparent = request.header("traceparent").expect("a traceparent header");
        let parts: Vec<&str> = traceparent.split('-').collect();
        assert_eq!(parts.len(), 4, "{traceparent}");
        assert_eq!(
            parts[1], trace,
            "the receiver's traceparent is the event's trace"
        );
        assert_eq!(parts[2], attempt.span_id, "and names the attempt as parent");
    }

    // The waits in the streams are spans of the trace too.
    one(&spans, "normalizer", "wait ECWID_RAW");
    assert!(spans.iter().any(|s| s.name == "wait ECWID_EVENTS"));

    // No secret in any span or resource attribute.
    for s in &spans {
        for t in &s.texts {
            for secret in [
                client_secret,
                signature_key,
                whsec,
                "order-key-secret",
                ADMIN_TOKEN,
            ] {
                assert!(!t.contains(secret), "a secret in span {}: {t}", s.name);
            }
            assert!(!t.contains("XJ12H"), "no payload in span {}: {t}", s.name);
        }
    }
    assert!(
        request.texts.iter().any(|t| t == "test"),
        "OTEL_RESOURCE_ATTRIBUTES is exported"
    );

    // The JSON log lines of the failed attempt carry the trace and span ids.
    let log = cluster.deliverers[0].log_tail(200);
    let line = log
        .lines()
        .find(|l| l.contains("Delivery failed; will retry."))
        .unwrap_or_else(|| panic!("the retry is logged:\n{log}"));
    assert!(
        line.contains(&format!("\"trace_id\":\"{trace}\"")),
        "{line}"
    );
    assert!(line.contains("\"span_id\":\""), "{line}");

    // An operator's redelivery: its own trace, linked to the event's; the attempt it causes goes
    // on in the event's trace.
    let (code, body) = cluster
        .admin_request(
            reqwest::Method::POST,
            &format!("/events/{envelope_id}/redeliver"),
            None,
        )
        .await;
    assert_eq!(code, 202, "{body}");
    let got = receiver.wait_for(3, WAIT).await;
    let spans = wait_for(
        WAIT,
        || {
            format!(
                "the redelivery's spans; the collector has {:#?}",
                collector.spans()
            )
        },
        || async {
            let spans = collector.spans();
            let attempts = spans.iter().filter(|s| s.name == "POST").count();
            let redelivery = spans
                .iter()
                .any(|s| s.service == "ingest" && s.name == "publish ECWID_EVENTS");
            (attempts == 3 && redelivery).then_some(spans)
        },
    )
    .await;
    let redelivery = one(&spans, "ingest", "publish ECWID_EVENTS");
    assert_ne!(
        redelivery.trace_id, trace,
        "the operator's action is a trace of its own"
    );
    assert_eq!(
        redelivery.links,
        vec![trace.clone()],
        "linked to the event's trace"
    );
    let third = spans
        .iter()
        .find(|s| s.name == "POST" && s.span_id != first.span_id && s.span_id != second.span_id)
        .expect("the third attempt");
    assert_eq!(
        third.trace_id, trace,
        "the redelivered attempt is in the event's trace"
    );
    let traceparent = got[2].header("traceparent").expect("a traceparent header");
    assert!(
        traceparent.contains(&format!("-{trace}-{}-", third.span_id)),
        "{traceparent}"
    );

    // Everything was exported, nothing dropped.
    let deliverer = &cluster.deliverers[0];
    wait_until(
        WAIT,
        "the deliverer to count its exported spans",
        || async {
            sample_sum(
                &deliverer.metrics().await,
                "ecwid_trace_spans_exported_total",
                &[],
            ) >= 5.0
        },
    )
    .await;
    let metrics = deliverer.metrics().await;
    assert_eq!(
        sample_sum(&metrics, "ecwid_trace_spans_dropped_total", &[]),
        0.0,
        "{metrics}"
    );
}
