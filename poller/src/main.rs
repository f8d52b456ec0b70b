use anyhow::Context as _;
use poller::config::DEFAULT_OPS_LISTEN;
use tokio_util::sync::CancellationToken;

fn main() -> std::process::ExitCode {
    shared::service::main(
        "poller",
        "OPS_LISTEN",
        DEFAULT_OPS_LISTEN,
        poller::Config::from_vars,
        |c| &c.common,
        |registry| {
            poller::metrics::Metrics::register(registry);
        },
        start,
    )
}

async fn start(config: poller::Config, cancel: CancellationToken) -> anyhow::Result<()> {
    let ops = tokio::net::TcpListener::bind(config.ops_listen)
        .await
        .with_context(|| format!("OPS_LISTEN: cannot listen on {}", config.ops_listen))?;
    let client = shared::nats::connect(&config.common.nats_url, "ecwid-poller", &cancel).await?;
    poller::run(config, ops, client, cancel).await?;
    Ok(())
}
