//! The `conversation` binary: config → telemetry → shards → server.

use clap::Parser;
use conversation::Config;
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    convoy_telemetry::init(config.log_format);
    tracing::info!(config = %config.summary(), "starting conversation service");

    let store = conversation::connect(&config).await?;
    if config.migrate_only {
        tracing::info!("migrations applied; exiting (--migrate-only)");
        return Ok(());
    }
    let listener = TcpListener::bind(config.listen).await?;
    conversation::serve(&config, store, listener, shutdown_signal()).await
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}
