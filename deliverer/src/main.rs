use anyhow::Context as _;
use deliverer::config::DEFAULT_OPS_LISTEN;
use tokio_util::sync::CancellationToken;

fn main() -> std::process::ExitCode {
    shared::service::main(
        "deliverer",
        "OPS_LISTEN",
        DEFAULT_OPS_LISTEN,
        deliverer::Config::from_vars,
        |c| &c.common,
        |registry| {
            deliverer::metrics::Metrics::register(registry);
        },
        start,
    )
}

async fn start(config: deliverer::Config, cancel: CancellationToken) -> anyhow::Result<()> {
    let ops = tokio::net::TcpListener::bind(config.ops_listen)
        .await
        .with_context(|| format!("OPS_LISTEN: cannot listen on {}", config.ops_listen))?;
    let client = shared::nats::connect(&config.common.nats_url, "ecwid-deliverer", &cancel).await?;
    deliverer::run(config, ops, client, cancel).await?;
    Ok(())
}
