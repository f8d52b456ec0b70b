//! The ops HTTP server every service runs: `/metrics` (Prometheus text), `/healthz` (the process
//! answers), `/readyz` (503 while NATS is disconnected or the instances are not loaded yet).
//! Also the `healthcheck` subcommand, so a container health check needs no shell or curl.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus::Registry;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::directory::Directory;
use crate::metrics::CommonMetrics;

/// What the ops endpoints look at.
#[derive(Debug, Clone)]
pub struct OpsState {
    pub registry: Registry,
    pub common: CommonMetrics,
    pub nats: async_nats::Client,
    pub directory: Directory,
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
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
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
    } else {
        None
    };
    match reason {
        None => Json(json!({"status": "ready"})).into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "reason": reason})),
        )
            .into_response(),
    }
}

/// Serves `router` on `listener` until `cancel` fires, then finishes open requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
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
