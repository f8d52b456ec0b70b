use std::process::ExitCode;

use anyhow::Context as _;
use shared::config::{exit_on_error, Vars};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let vars = Vars::from_env();
    if std::env::args().nth(1).as_deref() == Some("healthcheck") {
        let addr =
            exit_on_error(vars.addr_or("OPS_LISTEN", normalizer::config::DEFAULT_OPS_LISTEN));
        return ExitCode::from(shared::ops::healthcheck(addr) as u8);
    }
    let config = exit_on_error(normalizer::Config::from_vars(&vars));
    shared::telemetry::init(config.common.log_format);
    let result = tokio::runtime::Runtime::new()
        .context("cannot start the Tokio runtime")
        .and_then(|rt| rt.block_on(start(config)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "Normalizer stopped.");
            ExitCode::FAILURE
        }
    }
}

async fn start(config: normalizer::Config) -> anyhow::Result<()> {
    let ops = tokio::net::TcpListener::bind(config.ops_listen)
        .await
        .with_context(|| format!("OPS_LISTEN: cannot listen on {}", config.ops_listen))?;
    let cancel = CancellationToken::new();
    shared::shutdown::cancel_on_signal(cancel.clone());
    let client =
        shared::nats::connect(&config.common.nats_url, "ecwid-normalizer", &cancel).await?;
    normalizer::run(config, ops, client, cancel).await?;
    Ok(())
}
