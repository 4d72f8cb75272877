//! The conversation service: convoy's system of record over sharded PostgreSQL.
//!
//! Data flows one way: [`service`] (gRPC) → [`validate`] (requests become [`model`] values)
//! → [`store`] (SQL on the owning shard) → [`wire`] (replies). [`error`] maps every failure
//! to a gRPC status in one place. The binary (`main.rs`) only wires config, telemetry,
//! backends and server together through [`run`].

#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod fingerprint;
pub mod limits;
pub mod model;
pub mod names;
pub mod page_token;
pub mod relay;
pub mod service;
pub mod store;
pub mod validate;
pub mod wire;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use convoy_mesh::ServerBuilder;
use convoy_proto::v1::conversation_service_server::ConversationServiceServer;
use convoy_store::ShardPools;
use tokio::net::TcpListener;

pub use config::Config;
pub use service::ConversationApi;
pub use store::ConversationStore;

/// How long idempotency records are kept (the contract promises 24 h).
const REQUEST_ID_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// How long published outbox rows are kept (for inspection) before they are purged.
const OUTBOX_RETENTION: Duration = Duration::from_secs(3600);
/// How often old idempotency records and published outbox rows are purged.
const PURGE_INTERVAL: Duration = Duration::from_secs(600);

/// Builds the store from configuration and, unless `--migrate=false`, applies migrations to
/// every shard.
pub async fn connect(config: &Config) -> anyhow::Result<ConversationStore> {
    let settings = config.pool_settings();
    let pools = ShardPools::connect_lazy(config.shard_map()?, &settings)?;
    if config.migrate || config.migrate_only {
        pools.migrate().await?;
    }
    // One operation may wait for a connection, then run a few statements.
    let op_timeout = settings.acquire_timeout + settings.statement_timeout * 2;
    Ok(ConversationStore::new(pools, op_timeout))
}

/// The gRPC service over `store`, with the contract's message-size limit.
pub fn grpc_service(store: Arc<ConversationStore>) -> ConversationServiceServer<ConversationApi> {
    ConversationServiceServer::new(ConversationApi::new(store))
        .max_decoding_message_size(limits::MAX_DECODING_MESSAGE_BYTES)
}

/// Serves the conversation API on `listener` until `shutdown` completes.
pub async fn serve(
    config: &Config,
    store: ConversationStore,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let store = Arc::new(store);
    let registration = config
        .registration
        .register(
            config::SERVICE_NAME,
            env!("CARGO_PKG_VERSION"),
            listener.local_addr()?,
        )
        .await?;
    // Shutdown order: health NOT_SERVING, then deregister (peers drop us at once), then
    // stop accepting and drain.
    let deregister = convoy_discovery::deregister_if_any(registration);
    let purger = tokio::spawn(purge_old_rows(store.clone()));
    let relay = match &config.redis_url {
        Some(url) => {
            let bus = convoy_cache::l2::L2::new(convoy_cache::l2::L2Config::new(url.clone()))?;
            Some(tokio::spawn(relay::run(store.clone(), bus)))
        }
        None => {
            tracing::warn!("no --redis-url: the outbox is not relayed to the invalidation bus");
            None
        }
    };
    let result = ServerBuilder::new(config.server_config())
        .add_service(grpc_service(store.clone()))
        .serve_with_drain_hook(listener, shutdown, deregister)
        .await;
    purger.abort();
    if let Some(relay) = relay {
        relay.abort();
    }
    store.pools().close().await;
    Ok(result?)
}

async fn purge_old_rows(store: Arc<ConversationStore>) {
    let mut tick = tokio::time::interval(PURGE_INTERVAL);
    loop {
        tick.tick().await;
        match store.purge_create_requests(REQUEST_ID_RETENTION).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "purged expired idempotency records"),
            Err(e) => tracing::warn!(error = %e, "purging idempotency records failed"),
        }
        match store.purge_published_outbox(OUTBOX_RETENTION).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "purged published outbox rows"),
            Err(e) => tracing::warn!(error = %e, "purging the outbox failed"),
        }
    }
}
