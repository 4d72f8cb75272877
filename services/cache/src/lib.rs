//! The cache service: convoy's shared read-through cache tier.
//!
//! [`service`] answers the `convoy.v1.CacheService` API over the layers of `libs/cache`: an
//! in-process L1 kept coherent by a bus subscriber, in front of Redis (L2, leases, bus).
//! [`serve`] wires config, layers, registration and server together.

#![forbid(unsafe_code)]

pub mod config;
pub mod service;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use convoy_cache::l1::{L1, L1Config};
use convoy_cache::l2::{L2, L2Config};
use convoy_cache::subscriber::{self, Subscriber};
use convoy_mesh::ServerBuilder;
use convoy_proto::v1::cache_service_server::CacheServiceServer;
use tokio::net::TcpListener;
use tokio_util::task::AbortOnDropHandle;

pub use config::Config;
pub use service::CacheApi;

/// Serves the cache API on `listener` until `shutdown` completes.
pub async fn serve(
    config: &Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    // Served for as long as this function runs, from before the first call it could count.
    let _metrics = config.telemetry.serve_metrics().await?;
    let tls = config.tls.load()?;
    let capacity = config.l1_capacity_mib << 20;
    let l1 = L1::new(L1Config {
        capacity_bytes: capacity,
        max_ttl: config.max_ttl(),
        ..L1Config::default()
    });
    let l2 = Arc::new(L2::new(L2Config::new(config.redis_url.clone()))?);
    let (bus, subscription) = subscriber::spawn(
        Subscriber::new(
            L2::new(L2Config::new(config.redis_url.clone()))?,
            l1.clone(),
        )
        .with_drop_ratio(config.fault_bus_drop_ratio)
        .with_stale_after(config.bus.stale_after()),
        Duration::from_millis(config.bus_poll_ms.max(1)),
    );
    // Stopped however `serve` ends (an error below, or the future dropped).
    let subscription = AbortOnDropHandle::new(subscription);
    let deregister = config
        .registration
        .register_until_drained(
            config::SERVICE_NAME,
            env!("CARGO_PKG_VERSION"),
            listener.local_addr()?,
        )
        .await?;
    let current = bus.current_changes();
    let api = CacheApi::new(l1, l2, bus, config.max_ttl(), capacity);
    let server = ServerBuilder::new(config.server_config(tls).with_auth(&config.auth)?)
        .add_service(CacheServiceServer::new(api));
    // `convoy.bus`: NOT_SERVING while neither layer serves (the bus may be stale); the
    // server stays SERVING, its answers are misses, so callers read their databases.
    let health = AbortOnDropHandle::new(tokio::spawn(convoy_mesh::health::follow(
        server.health(),
        subscriber::BUS_HEALTH_SERVICE,
        current,
    )));
    let result = server
        .serve_with_drain_hook(listener, shutdown, deregister)
        .await;
    drop(health);
    drop(subscription);
    Ok(result?)
}
