//! Shutdown: SIGTERM or SIGINT cancel one token. HTTP servers stop accepting, workers stop pulling,
//! in-flight work gets [`crate::config::CommonConfig::shutdown_grace`] to finish, then the NATS
//! connection is drained so every pending publish and ack is flushed.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGTERM or SIGINT.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("Shutdown signal received; draining.");
        token.cancel();
    });
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(error) => {
            tracing::warn!(%error, "Cannot listen for SIGTERM; only SIGINT stops the service.");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

/// Flushes and drains the NATS connection, giving up after `grace`.
pub async fn drain_nats(client: &async_nats::Client, grace: Duration) {
    let drained = async {
        let _ = client.flush().await;
        client.drain().await
    };
    match tokio::time::timeout(grace.max(Duration::from_secs(1)), drained).await {
        Ok(Ok(())) => tracing::info!("NATS connection drained."),
        Ok(Err(error)) => tracing::warn!(%error, "Draining the NATS connection failed."),
        Err(_) => tracing::warn!(?grace, "Draining the NATS connection timed out."),
    }
}
