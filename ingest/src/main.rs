use anyhow::Context as _;
use ingest::config::DEFAULT_ADMIN_LISTEN;
use tokio_util::sync::CancellationToken;

fn main() -> std::process::ExitCode {
    shared::service::main(
        "ingest",
        "ADMIN_LISTEN",
        DEFAULT_ADMIN_LISTEN,
        ingest::Config::from_vars,
        |c| &c.common,
        |registry| {
            ingest::metrics::Metrics::register(registry);
            admin::metrics::Metrics::register(registry);
        },
        start,
    )
}

async fn start(config: ingest::Config, cancel: CancellationToken) -> anyhow::Result<()> {
    let webhooks = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("INGEST_LISTEN: cannot listen on {}", config.listen))?;
    let admin = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("ADMIN_LISTEN: cannot listen on {}", config.admin_listen))?;
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
