use std::process::ExitCode;

use anyhow::Context as _;
use shared::config::{exit_on_error, Vars};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let vars = Vars::from_env();
    if std::env::args().nth(1).as_deref() == Some("healthcheck") {
        let addr =
            exit_on_error(vars.addr_or("ADMIN_LISTEN", ingest::config::DEFAULT_ADMIN_LISTEN));
        return ExitCode::from(shared::ops::healthcheck(addr) as u8);
    }
    let config = exit_on_error(ingest::Config::from_vars(&vars));
    shared::telemetry::init(config.common.log_format);
    let result = tokio::runtime::Runtime::new()
        .context("cannot start the Tokio runtime")
        .and_then(|rt| rt.block_on(start(config)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "Ingest stopped.");
            ExitCode::FAILURE
        }
    }
}

async fn start(config: ingest::Config) -> anyhow::Result<()> {
    let webhooks = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("INGEST_LISTEN: cannot listen on {}", config.listen))?;
    let admin = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("ADMIN_LISTEN: cannot listen on {}", config.admin_listen))?;
    let cancel = CancellationToken::new();
    shared::shutdown::cancel_on_signal(cancel.clone());
    let client = shared::nats::connect(&config.common.nats_url, "ecwid-ingest", &cancel).await?;
    ingest::run(
        config,
        ingest::Listeners { webhooks, admin },
        client,
        cancel,
    )
    .await?;
    Ok(())
}
