//! The shard map in etcd: one key (`<prefix>shardmap`) holding the map's TOML form, changed
//! only by compare-and-swap on the key's revision, so two routers can never both publish a
//! change made from the same map. Epochs only grow: a swap must carry a newer epoch than
//! the map it replaces.
//!
//! Followers use [`ShardMapStore::watch`]: the current map, then each newer one. The watch
//! resumes after any interruption by reading the key again, so a follower never misses the
//! newest map (intermediate ones may be skipped: only the newest matters for routing).
//!
//! Not here: what the map says (`convoy_store::ShardMap`) or who may change it (the
//! shard-router's leader).

use std::time::Duration;

use std::sync::Arc;

use convoy_store::{LivePools, ShardMap, ShardPools};
use etcd_client::{Client, Compare, CompareOp, EventType, Txn, TxnOp, WatchOptions};
use futures::stream::BoxStream;
use futures::{StreamExt, stream};
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;

use crate::config::EtcdConfig;
use crate::connection::{bounded, connect};
use crate::{Error, Result};

/// A map as stored, with the etcd revision that last changed it.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredMap {
    /// The map.
    pub map: ShardMap,
    /// The key's modification revision: what a compare-and-swap must name.
    pub revision: i64,
}

/// Why a swap did not happen.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    /// The map changed since it was read (or was never created): read it again.
    #[error("the shard map changed since revision {expected}")]
    Conflict {
        /// The revision the swap named.
        expected: i64,
    },
    /// The new map's epoch is not newer than the stored one's.
    #[error("the new epoch {new} is not newer than the stored epoch {stored}")]
    StaleEpoch {
        /// The stored map's epoch.
        stored: u64,
        /// The new map's epoch.
        new: u64,
    },
    /// etcd failed.
    #[error(transparent)]
    Etcd(#[from] Error),
}

/// The shard map's home in etcd.
#[derive(Clone)]
pub struct ShardMapStore {
    etcd: EtcdConfig,
    client: Client,
    key: String,
}

impl std::fmt::Debug for ShardMapStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardMapStore")
            .field("key", &self.key)
            .finish()
    }
}

fn decode(value: &[u8], revision: i64) -> Result<StoredMap> {
    let text = std::str::from_utf8(value)
        .map_err(|e| Error::InvalidConfig(format!("the stored shard map is not UTF-8: {e}")))?;
    let map = ShardMap::from_toml(text)
        .map_err(|e| Error::InvalidConfig(format!("the stored shard map is invalid: {e}")))?;
    Ok(StoredMap { map, revision })
}

impl ShardMapStore {
    /// The store in the etcd `etcd` names (connecting lazily).
    pub async fn connect(etcd: &EtcdConfig) -> Result<Self> {
        Ok(Self {
            client: connect(etcd).await?,
            key: format!("{}shardmap", etcd.prefix),
            etcd: etcd.clone(),
        })
    }

    /// The stored map, if any.
    pub async fn load(&self) -> Result<Option<StoredMap>> {
        let mut kv = self.client.kv_client();
        let response = bounded(
            "get shard map",
            self.etcd.request_timeout,
            kv.get(self.key.as_str(), None),
        )
        .await?;
        match response.kvs().first() {
            Some(kv) => Ok(Some(decode(kv.value(), kv.mod_revision())?)),
            None => Ok(None),
        }
    }

    /// Stores `map` if no map is stored yet; returns the stored map either way (the first
    /// router to start seeds the map from its configuration, later ones adopt it).
    pub async fn create_if_absent(&self, map: &ShardMap) -> Result<StoredMap> {
        let txn = Txn::new()
            .when([Compare::create_revision(
                self.key.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(self.key.as_str(), map.to_toml(), None)])
            .or_else([TxnOp::get(self.key.as_str(), None)]);
        let mut kv = self.client.kv_client();
        let response = bounded("create shard map", self.etcd.request_timeout, kv.txn(txn)).await?;
        if response.succeeded() {
            let revision = response.header().map_or(0, |h| h.revision());
            return Ok(StoredMap {
                map: map.clone(),
                revision,
            });
        }
        self.load()
            .await?
            .ok_or_else(|| Error::InvalidConfig("the shard map vanished while created".into()))
    }

    /// Replaces the map stored at `expected` revision with `next`, whose epoch must be newer.
    pub async fn compare_and_swap(
        &self,
        expected: &StoredMap,
        next: &ShardMap,
    ) -> std::result::Result<StoredMap, SwapError> {
        if next.epoch() <= expected.map.epoch() {
            return Err(SwapError::StaleEpoch {
                stored: expected.map.epoch().0,
                new: next.epoch().0,
            });
        }
        let txn = Txn::new()
            .when([Compare::mod_revision(
                self.key.as_str(),
                CompareOp::Equal,
                expected.revision,
            )])
            .and_then([TxnOp::put(self.key.as_str(), next.to_toml(), None)]);
        let mut kv = self.client.kv_client();
        let response = bounded("swap shard map", self.etcd.request_timeout, kv.txn(txn)).await?;
        if !response.succeeded() {
            return Err(SwapError::Conflict {
                expected: expected.revision,
            });
        }
        Ok(StoredMap {
            map: next.clone(),
            revision: response.header().map_or(0, |h| h.revision()),
        })
    }

    /// The stored map (once there is one), then every newer one. Never ends: etcd being
    /// down is waited out (the last map stays in force meanwhile).
    pub fn watch(&self) -> BoxStream<'static, StoredMap> {
        let store = self.clone();
        stream::unfold(
            (store, None::<StoredMap>, None::<etcd_client::WatchStream>),
            |(store, mut last, mut watch)| async move {
                loop {
                    // Resume: read the key, yield it if newer than what was yielded.
                    if watch.is_none() {
                        match store.load().await {
                            Ok(Some(stored))
                                if last
                                    .as_ref()
                                    .is_none_or(|l| stored.map.epoch() > l.map.epoch()) =>
                            {
                                let from = stored.revision + 1;
                                watch = store.start_watch(from).await;
                                last = Some(stored.clone());
                                return Some((stored, (store, last, watch)));
                            }
                            Ok(stored) => {
                                let from = stored.map_or(1, |s| s.revision + 1);
                                watch = store.start_watch(from).await;
                            }
                            Err(e) => tracing::debug!(error = %e, "reading the shard map failed"),
                        }
                        if watch.is_none() {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            continue;
                        }
                    }
                    let Some(stream) = watch.as_mut() else {
                        continue;
                    };
                    match stream.message().await {
                        Ok(Some(response)) => {
                            let newest = response
                                .events()
                                .iter()
                                .filter(|e| e.event_type() == EventType::Put)
                                .filter_map(|e| e.kv())
                                .filter_map(|kv| decode(kv.value(), kv.mod_revision()).ok())
                                .next_back();
                            if response.canceled() {
                                watch = None;
                            }
                            if let Some(stored) = newest
                                && last
                                    .as_ref()
                                    .is_none_or(|l| stored.map.epoch() > l.map.epoch())
                            {
                                last = Some(stored.clone());
                                return Some((stored, (store, last, watch)));
                            }
                        }
                        // Ended or failed: resume from a fresh read.
                        Ok(None) | Err(_) => watch = None,
                    }
                }
            },
        )
        .boxed()
    }

    async fn start_watch(&self, from_revision: i64) -> Option<etcd_client::WatchStream> {
        let mut client = self.client.watch_client();
        let options = WatchOptions::new().with_start_revision(from_revision);
        match bounded(
            "watch shard map",
            self.etcd.request_timeout,
            client.watch(self.key.as_str(), Some(options)),
        )
        .await
        {
            Ok(stream) => Some(stream),
            Err(e) => {
                tracing::debug!(error = %e, "watching the shard map failed");
                None
            }
        }
    }
}

/// Follows the map stored in `store` from `pools` (built for the map in force): every newer
/// map gets pools rebuilt from the previous ones ([`ShardPools::rebuild`]: unchanged shards
/// keep their connections and replica state) with fresh node checks, and is published on
/// the returned channel. The old map's removed pools close once no call holds them. The
/// task ends with the returned guard.
pub fn follow(store: &ShardMapStore, pools: ShardPools) -> (LivePools, AbortOnDropHandle<()>) {
    let mut maps = store.watch();
    let (tx, rx) = watch::channel(Arc::new(pools));
    let task = tokio::spawn(async move {
        let mut _checks = tx.borrow().spawn_checks();
        while let Some(stored) = maps.next().await {
            let current = tx.borrow().clone();
            if stored.map.epoch() <= current.map().epoch() {
                continue;
            }
            match current.rebuild(stored.map) {
                Ok(next) => {
                    tracing::info!(epoch = next.map().epoch().0, "following a new shard map");
                    _checks = next.spawn_checks();
                    let next = Arc::new(next);
                    tx.send_replace(next.clone());
                    tokio::spawn(async move { current.close_unkept(&next).await });
                }
                Err(e) => tracing::error!(error = %e, "a stored shard map cannot be used"),
            }
        }
    });
    (rx, AbortOnDropHandle::new(task))
}
