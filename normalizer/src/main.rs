use anyhow::Context as _;
use normalizer::config::DEFAULT_OPS_LISTEN;
use tokio_util::sync::CancellationToken;

fn main() -> std::process::ExitCode {
    shared::service::main(
        "normalizer",
        "OPS_LISTEN",
        DEFAULT_OPS_LISTEN,
        normalizer::Config::from_vars,
        |c| &c.common,
        |registry| {
            normalizer::metrics::Metrics::register(registry);
        },
        start,
    )
}

async fn start(config: normalizer::Config, cancel: CancellationToken) -> anyhow::Result<()> {
    let ops = tokio::net::TcpListener::bind(config.ops_listen)
        .await
        .with_context(|| format!("OPS_LISTEN: cannot listen on {}", config.ops_listen))?;
    let client =
        shared::nats::connect(&config.common.nats_url, "ecwid-normalizer", &cancel).await?;
    normalizer::run(config, ops, client, cancel).await?;
    Ok(())
}
