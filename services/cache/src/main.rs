//! The `cache` binary: config → telemetry → layers → server.

use clap::Parser;
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = cache_service::Config::parse();
    let _telemetry = config.telemetry.init(cache_service::config::SERVICE_NAME)?;
    tracing::info!(listen = %config.listen, l1_mib = config.l1_capacity_mib, "starting cache service");
    let listener = TcpListener::bind(config.listen).await?;
    cache_service::serve(&config, listener, convoy_mesh::server::shutdown_signal()).await
}
