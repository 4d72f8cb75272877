//! The shard-router: convoy's data-placement control plane, off the hot path.
//!
//! It seeds the shard map in etcd from its configuration when etcd holds none, follows the
//! stored map ([`convoy_discovery::shard_map`]), checks every node of every shard (health,
//! replica lag) and serves `convoy.v1.ShardRouterService`: the map, its changes as a stream,
//! where a team lives, and the shards with their nodes' health. Services route on their
//! own; the router only publishes. Moving slots (AddShard, MoveSlots and the operations)
//! answers UNIMPLEMENTED until online resharding lands.

#![forbid(unsafe_code)]

pub mod config;
pub mod service;

use std::future::Future;
use std::sync::Arc;

use convoy_discovery::shard_map::{ShardMapStore, StoredMap};
use convoy_mesh::ServerBuilder;
use convoy_proto::v1::shard_router_service_server::ShardRouterServiceServer;
use convoy_store::{PoolSettings, ShardPools};
use futures::StreamExt;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;

pub use config::Config;
pub use service::RouterApi;

/// The map in force and the pools that check its nodes.
#[derive(Clone, Debug)]
pub struct Placement {
    /// The stored map.
    pub stored: StoredMap,
    /// Pools over its nodes (for health checks), each shard checked by a task of its own.
    pub pools: ShardPools,
}

/// Follows the stored map from `store`, publishing each one (with fresh pools and checks)
/// on the returned channel; the task ends with the returned guard.
pub async fn follow(
    store: ShardMapStore,
    first: StoredMap,
) -> anyhow::Result<(watch::Receiver<Arc<Placement>>, AbortOnDropHandle<()>)> {
    let (placement, checks) = place(first)?;
    let (tx, rx) = watch::channel(Arc::new(placement));
    let task = tokio::spawn(async move {
        let mut _checks = checks;
        let mut maps = store.watch();
        while let Some(stored) = maps.next().await {
            if stored.map.epoch() <= tx.borrow().stored.map.epoch() {
                continue;
            }
            match place(stored) {
                Ok((placement, checks)) => {
                    tracing::info!(epoch = placement.stored.map.epoch().0, "new shard map");
                    _checks = checks;
                    let old = tx.send_replace(Arc::new(placement));
                    // The old map's connections close once no call holds them.
                    tokio::spawn(async move { old.pools.close().await });
                    if tx.is_closed() {
                        return;
                    }
                }
                Err(e) => tracing::error!(error = %e, "a stored shard map cannot be used"),
            }
        }
    });
    Ok((rx, AbortOnDropHandle::new(task)))
}

fn place(stored: StoredMap) -> anyhow::Result<(Placement, Vec<AbortOnDropHandle<()>>)> {
    let pools = ShardPools::connect_lazy(
        stored.map.clone(),
        &PoolSettings {
            max_connections: 2,
            application_name: "convoy-shard-router".into(),
            ..PoolSettings::default()
        },
    )?;
    let checks = (0..stored.map.shards().len())
        .map(|index| AbortOnDropHandle::new(tokio::spawn(pools.clone().check_replicas(index))))
        .collect();
    Ok((Placement { stored, pools }, checks))
}

/// Serves the router on `listener` until `shutdown` completes.
pub async fn serve(
    config: &Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let etcd = config
        .registration
        .etcd_config()
        .ok_or_else(|| anyhow::anyhow!("the shard-router needs etcd: pass --etcd-endpoint"))?;
    let store = ShardMapStore::connect(&etcd).await?;
    let stored = match (store.load().await?, config.seed_map()?) {
        (Some(stored), Some(seed))
            if config.publish_shard_map
                && seed.clone().with_epoch(stored.map.epoch()) != stored.map =>
        {
            let next = seed.with_epoch(convoy_store::Epoch(stored.map.epoch().0 + 1));
            tracing::warn!(
                epoch = next.epoch().0,
                "publishing --shard-map over the stored map"
            );
            store.compare_and_swap(&stored, &next).await?
        }
        (Some(stored), _) => stored,
        (None, Some(seed)) => store.create_if_absent(&seed).await?,
        (None, None) => {
            anyhow::bail!("etcd holds no shard map yet: pass --shard-map with the one to publish")
        }
    };
    tracing::info!(epoch = stored.map.epoch().0, "shard map in force");
    let (placement, _following) = follow(store, stored).await?;
    let deregister = config
        .registration
        .register_until_drained(
            config::SERVICE_NAME,
            env!("CARGO_PKG_VERSION"),
            listener.local_addr()?,
        )
        .await?;
    let result = ServerBuilder::new(config.server_config())
        .add_service(ShardRouterServiceServer::new(RouterApi::new(placement)))
        .serve_with_drain_hook(listener, shutdown, deregister)
        .await;
    Ok(result?)
}
