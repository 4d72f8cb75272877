//! The analytics service: answers about a team's conversations, and about the fleet,
//! aggregated over every shard.
//!
//! Data flows one way: [`service`] (gRPC) → [`validate`] (requests become [`query`]
//! values) → [`cached`] (the cache tier) → [`scatter`] (SQL on the shards holding the
//! conversations, replicas preferred) → [`aggregate`] (partials merged, quantiles from a
//! mergeable sketch) → the reply. [`error`] maps failures to gRPC statuses in one place.
//! The binary (`main.rs`) only wires config, telemetry, shards and server together.

#![forbid(unsafe_code)]

pub mod aggregate;
pub mod cached;
pub mod config;
pub mod error;
pub mod prices;
pub mod query;
pub mod scatter;
pub mod service;
pub mod validate;

use std::future::Future;
use std::time::Duration;

use convoy_client::{CacheClient, CacheClientConfig};
use convoy_discovery::Shards;
use convoy_mesh::ServerBuilder;
use convoy_proto::v1::analytics_service_server::AnalyticsServiceServer;
use convoy_store::ShardPools;
use tokio::net::TcpListener;

pub use cached::AnswerCache;
pub use config::Config;
pub use scatter::Scatter;
pub use service::AnalyticsApi;

/// Connects to the shards the configuration names (or the map in etcd, followed as it
/// changes). Analytics only reads: it never migrates.
pub async fn connect(config: &Config) -> anyhow::Result<Shards> {
    let (map, store) = config.shards.map(&config.registration).await?;
    let pools = ShardPools::connect_lazy(map, &config.shards.pool_settings("convoy-analytics"))?;
    Ok(convoy_discovery::shards::live(pools, store.as_ref()))
}

/// Serves the analytics API on `listener` until `shutdown` completes.
pub async fn serve(
    config: &Config,
    shards: Shards,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    // Served for as long as this function runs, from before the first call it could count.
    let _metrics = config.telemetry.serve_metrics().await?;
    let tls = config.tls.load()?;
    let deregister = config
        .registration
        .register_until_drained(
            config::SERVICE_NAME,
            env!("CARGO_PKG_VERSION"),
            listener.local_addr()?,
        )
        .await?;
    let credentials = config.auth.credentials()?;
    let tier = config.cache_discovery().map(|discovery| {
        let cache = CacheClientConfig {
            timeout: Duration::from_millis(config.cache_timeout_ms),
            credentials: credentials.clone(),
            ..CacheClientConfig::default()
        }
        .with_tls(tls.clone());
        CacheClient::connect(&discovery, cache)
    });
    if tier.is_none() {
        tracing::info!("no cache tier configured: every answer is computed");
    }
    let cache = AnswerCache::new(
        tier,
        Duration::from_secs(config.team_ttl_secs),
        Duration::from_secs(config.fleet_ttl_secs),
    );
    let prices = match &config.prices {
        Some(path) => prices::Prices::load(path)?,
        None => prices::Prices::default(),
    };
    let api = AnalyticsApi::new(
        Scatter::new(shards.pools.clone(), config.shard_timeout()),
        cache,
    )
    .with_prices(prices);
    let result = ServerBuilder::new(config.server_config(tls).with_auth(&config.auth)?)
        .add_service(AnalyticsServiceServer::new(api))
        .serve_with_drain_hook(listener, shutdown, deregister)
        .await;
    let pools = shards.pools.borrow().clone();
    drop(shards.tasks);
    pools.close().await;
    Ok(result?)
}
