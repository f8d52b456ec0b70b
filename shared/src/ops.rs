//! The ops HTTP server every service runs: `/metrics` (Prometheus text), `/healthz` (the process
//! answers), `/readyz` (503 while NATS is disconnected, the instances are not loaded yet, or the
//! service's own start-up work is not done: [`StartGate`]).
//! Also the `healthcheck` subcommand, so a container health check needs no shell or curl, and
//! [`serve_with`], the HTTP server every listener runs: a header read timeout, a connection cap,
//! a panic in a handler answered as a 500 instead of a dropped connection, and JSON bodies on the
//! answers hyper writes itself to requests it cannot parse ([`crate::parse_errors`]).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::FutureExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use prometheus::{IntCounter, Registry};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::directory::Directory;
use crate::metrics::CommonMetrics;
use crate::parse_errors::JsonParseErrors;

/// What the ops endpoints look at.
#[derive(Debug, Clone)]
pub struct OpsState {
    pub registry: Registry,
    pub common: CommonMetrics,
    pub nats: async_nats::Client,
    pub directory: Directory,
    pub starting: StartGate,
    /// What setting up the topology wrote; its differences are shown on `/readyz`.
    pub topology: Arc<crate::topology::TopologyReport>,
}

/// Start-up work of a service's own that `/readyz` waits for beyond NATS and the instances (the
/// deliverer: joining the other replicas before it takes messages). Open unless held.
#[derive(Debug, Clone, Default)]
pub struct StartGate(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl StartGate {
    /// Not ready until [`StartGate::release`].
    pub fn hold(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }

    pub fn release(&self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }

    pub fn is_held(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl OpsState {
    fn nats_connected(&self) -> bool {
        let up = self.nats.connection_state() == async_nats::connection::State::Connected;
        self.common.nats_connected.set(i64::from(up));
        up
    }
}

/// `/metrics`, `/healthz`, `/readyz`.
pub fn router(state: OpsState) -> Router {
    let panics = state.common.http_panics.clone();
    catch_panics(
        Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(state),
        panics,
    )
}

/// Answers a request whose handler panicked with 500 and a JSON body (saying nothing internal),
/// and counts it in `panics`. The panic itself is logged by the hook [`crate::telemetry::init`]
/// installs. Without this, hyper drops the connection and the client learns nothing.
pub fn catch_panics(router: Router, panics: IntCounter) -> Router {
    router.layer(middleware::from_fn(move |request: Request, next: Next| {
        let panics = panics.clone();
        async move {
            match AssertUnwindSafe(next.run(request)).catch_unwind().await {
                Ok(response) => response,
                Err(_) => {
                    panics.inc();
                    (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        Json(json!({"error": "internal", "message": "internal error; it was logged"})),
                    )
                        .into_response()
                }
            }
        }
    }))
}

async fn metrics(State(state): State<OpsState>) -> Response {
    state.nats_connected();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::encode(&state.registry),
    )
        .into_response()
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(state): State<OpsState>) -> Response {
    let reason = if !state.nats_connected() {
        Some("nats_disconnected")
    } else if !state.directory.is_loaded() {
        Some("instances_not_loaded")
    } else if state.starting.is_held() {
        Some("starting")
    } else {
        None
    };
    // Settings this replica found different from what it wanted (and updated at start-up): a
    // replica configured unlike the others says so here as well as in its log.
    let topology = &*state.topology;
    match reason {
        None => Json(json!({"status": "ready", "topology": topology})).into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "reason": reason, "topology": topology})),
        )
            .into_response(),
    }
}

/// How an HTTP listener protects itself from slow and from too many clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// A connection that has not sent a whole request head within this is closed (also an idle
    /// keep-alive connection: the clock starts when the server waits for the next request).
    pub header_read_timeout: Duration,
    /// Connections served at once; further ones wait in the listen backlog until one closes.
    pub max_connections: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 1024,
        }
    }
}

/// Serves `router` on `listener` with the default [`ServerLimits`] until `cancel` fires, then
/// finishes open requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    serve_with(listener, router, ServerLimits::default(), cancel).await
}

/// Serves `router` on `listener` within `limits` until `cancel` fires; then stops accepting,
/// closes idle connections and returns once the requests in flight are answered (callers bound
/// that wait with the shutdown deadline).
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: ServerLimits,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    loop {
        // A slot first: while every slot is taken, new connections wait in the kernel's backlog
        // instead of being accepted and starved.
        let permit = tokio::select! {
            () = cancel.cancelled() => break,
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "Cannot accept a connection; retrying.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let connection = http.serve_connection(
            TokioIo::new(JsonParseErrors::new(stream)),
            TowerToHyperService::new(router.clone()),
        );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "HTTP connection ended with an error.");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// The `healthcheck` subcommand: GET `/healthz` on the service's own ops address; 0 when it
/// answers 200. `addr` with an unspecified IP (0.0.0.0) is reached on loopback.
pub fn healthcheck(addr: SocketAddr) -> i32 {
    let mut target = addr;
    if target.ip().is_unspecified() {
        target.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let check = || -> std::io::Result<bool> {
        let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut head = [0u8; 16];
        let n = stream.read(&mut head)?;
        Ok(head[..n].starts_with(b"HTTP/1.1 200") || head[..n].starts_with(b"HTTP/1.0 200"))
    };
    match check() {
        Ok(true) => 0,
        Ok(false) => {
            eprintln!("healthcheck: {target} answered, but not 200");
            1
        }
        Err(e) => {
            eprintln!("healthcheck: {target}: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt as _;

    #[tokio::test]
    async fn a_panicking_handler_is_answered_500_json_and_counted() {
        let panics = IntCounter::new("p", "p").unwrap();
        let router = catch_panics(
            Router::new()
                .route("/boom", get(|| async { panic!("boom") as &str }))
                .route("/fine", get(|| async { "fine" })),
            panics.clone(),
        );
        let request = |path: &str| Request::builder().uri(path).body(Body::empty()).unwrap();
        let response = router.clone().oneshot(request("/boom")).await.unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"], "internal");
        assert!(
            !body.to_string().contains("boom"),
            "nothing internal: {body}"
        );
        assert_eq!(panics.get(), 1);
        let response = router.oneshot(request("/fine")).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(panics.get(), 1);
    }
}
