//! The `conversation` binary: config → telemetry → shards → server.

use clap::Parser;
use conversation::Config;
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let _telemetry = config.telemetry.init_with(
        conversation::config::SERVICE_NAME,
        vec![convoy_store::query_stats::global_layer()],
    )?;
    tracing::info!(config = %config.summary(), "starting conversation service");

    let store = conversation::connect(&config).await?;
    if config.migrate_only {
        tracing::info!("migrations applied; exiting (--migrate-only)");
        return Ok(());
    }
    let listener = TcpListener::bind(config.listen).await?;
    conversation::serve(
        &config,
        store,
        listener,
        convoy_mesh::server::shutdown_signal(),
    )
    .await
}
