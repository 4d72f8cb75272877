//! The shard-router: convoy's data-placement control plane, off the hot path.
//!
//! It seeds the shard map in etcd from its configuration when etcd holds none, follows the
//! stored map ([`convoy_discovery::shard_map`]), checks every node of every shard (health,
//! replica lag) and serves `convoy.v1.ShardRouterService`: the map, its changes as a stream,
//! where a team lives, and the shards with their nodes' health. Services route on their
//! own; the router only publishes. It also adds shards and moves slot ranges between them
//! online (AddShard, MoveSlots and the operations: [`mover`], [`operations`]).

#![forbid(unsafe_code)]

pub mod config;
pub mod mover;
pub mod operations;
pub mod service;

use std::future::Future;

use convoy_discovery::EtcdConfig;
use convoy_discovery::records::Records;
use convoy_discovery::shard_map::ShardMapStore;
use convoy_mesh::ServerBuilder;
use convoy_proto::v1::shard_router_service_server::ShardRouterServiceServer;
use convoy_store::{PoolSettings, ShardPools};
use operations::Driver;
use tokio::net::TcpListener;
use tokio_util::task::AbortOnDropHandle;

pub use config::Config;
pub use service::RouterApi;

/// Pools for the router's own work over a map: node checks and moves need few connections.
pub fn router_pools(map: convoy_store::ShardMap) -> anyhow::Result<ShardPools> {
    Ok(ShardPools::connect_lazy(
        map,
        &PoolSettings {
            max_connections: 4,
            application_name: "convoy-shard-router".into(),
            ..PoolSettings::default()
        },
    )?)
}

/// Serves the router on `listener` until `shutdown` completes.
pub async fn serve(
    config: &Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    // Served for as long as this function runs, from before the first call it could count.
    let _metrics = config.telemetry.serve_metrics().await?;
    let tls = config.tls.load()?;
    let etcd = config
        .registration
        .etcd_config()
        .ok_or_else(|| anyhow::anyhow!("the shard-router needs etcd: pass --etcd-endpoint"))?;
    let store = ShardMapStore::connect(&etcd).await?;
    let stored = match (store.load().await?, config.seed_map()?) {
        (Some(stored), Some(seed)) if config.publish_shard_map => {
            // The file's servers win; the placement stays the stored one, which only moves
            // change (a file written before a move must not undo it).
            let next = stored.map.with_servers_of(&seed)?;
            if next.clone().with_epoch(stored.map.epoch()) == stored.map {
                stored
            } else {
                tracing::warn!(
                    epoch = next.epoch().0,
                    "publishing the servers of --shard-map over the stored map"
                );
                store.compare_and_swap(&stored, &next).await?
            }
        }
        (Some(stored), _) => stored,
        (None, Some(seed)) => store.create_if_absent(&seed).await?,
        (None, None) => {
            anyhow::bail!("etcd holds no shard map yet: pass --shard-map with the one to publish")
        }
    };
    tracing::info!(epoch = stored.map.epoch().0, "shard map in force");
    let (pools, _following) =
        convoy_discovery::shard_map::follow(&store, router_pools(stored.map)?);
    let records = Records::connect(&etcd, operations::KIND).await?;
    let driver = Driver::new(
        records.clone(),
        store.clone(),
        pools.clone(),
        config.move_settings(),
    );
    let candidate = format!("{}", listener.local_addr()?);
    let _leading = AbortOnDropHandle::new(tokio::spawn(lead(etcd.clone(), candidate, driver)));
    let deregister = config
        .registration
        .register_until_drained(
            config::SERVICE_NAME,
            env!("CARGO_PKG_VERSION"),
            listener.local_addr()?,
        )
        .await?;
    let result = ServerBuilder::new(config.server_config(tls).with_auth(&config.auth)?)
        .add_service(ShardRouterServiceServer::new(RouterApi::new(
            pools, store, records,
        )))
        .serve_with_drain_hook(listener, shutdown, deregister)
        .await;
    Ok(result?)
}

/// Campaigns for leadership among the routers and, while leading, drives the moves; a
/// leader that loses its lease stops at once and campaigns again.
async fn lead(etcd: EtcdConfig, candidate: String, driver: Driver) {
    loop {
        match convoy_discovery::leader::campaign(&etcd, config::SERVICE_NAME, &candidate).await {
            Ok(leadership) => {
                tokio::select! {
                    () = leadership.lost() => tracing::warn!("lost leadership; moves pause until re-elected"),
                    () = driver.run() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "campaigning for leadership failed; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}
