//! The `shard-router` binary: config → telemetry → the map in etcd → server.

use clap::Parser;
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = shard_router::Config::parse();
    let _telemetry = config.telemetry.init_with(
        shard_router::config::SERVICE_NAME,
        vec![convoy_store::query_stats::global_layer()],
    )?;
    tracing::info!(listen = %config.listen, "starting shard-router");
    let listener = TcpListener::bind(config.listen).await?;
    shard_router::serve(&config, listener, convoy_mesh::server::shutdown_signal()).await
}
