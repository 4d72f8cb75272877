//! The `analytics` binary: config → telemetry → shards → server.

use clap::Parser;
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = analytics::Config::parse();
    let _telemetry = config.telemetry.init_with(
        analytics::config::SERVICE_NAME,
        vec![convoy_store::query_stats::global_layer()],
    )?;
    tracing::info!(listen = %config.listen, "starting analytics");
    let shards = analytics::connect(&config).await?;
    let listener = TcpListener::bind(config.listen).await?;
    analytics::serve(
        &config,
        shards,
        listener,
        convoy_mesh::server::shutdown_signal(),
    )
    .await
}
