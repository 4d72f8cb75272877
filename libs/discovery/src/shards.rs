//! The shard flags every data-reading service takes, and connecting with them.
//!
//! One definition (a clap `Args` group that services flatten into their own configuration),
//! so `--shard-dsn`, `--shard-map`, `--shard-map-from-etcd` and the pool limits mean the
//! same in the conversation and analytics services, and one way to turn them into live
//! pools: a fixed map with node checks, or the shard-router's map in etcd, followed as it
//! changes.
//!
//! Not here: what the map says ([`convoy_store::ShardMap`]) or how it is kept in etcd
//! ([`crate::shard_map`]).

use std::path::PathBuf;
use std::time::Duration;

use convoy_store::{LivePools, PoolSettings, QueryStats, ShardMap, ShardPools, StoreError};
use tokio_util::task::AbortOnDropHandle;

use crate::RegistrationArgs;
use crate::shard_map::ShardMapStore;

/// How long start-up waits for the shard-router to publish the map in etcd.
const MAP_WAIT: Duration = Duration::from_secs(30);
/// How often start-up looks for the map while waiting.
const MAP_POLL: Duration = Duration::from_millis(250);

/// Why the shards could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ShardsError {
    /// The flags name no usable shards.
    #[error("shard configuration: {0}")]
    Config(String),
    /// The map or a pool is invalid.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// etcd failed for good, or never published a map.
    #[error(transparent)]
    Etcd(#[from] crate::Error),
}

/// Where the shards are and how to pool connections to them, with `CONVOY_*` fallbacks.
#[derive(Clone, Debug, clap::Args)]
pub struct ShardArgs {
    /// Shard map file (TOML: epoch, and shards with id, primary, replicas, slots).
    #[arg(long, env = "CONVOY_SHARD_MAP", conflicts_with = "shard_dsn")]
    pub shard_map: Option<PathBuf>,

    /// Primary DSN of each shard, in order; slots are split evenly over them. Repeat the
    /// flag, or separate with commas in the environment variable.
    #[arg(long = "shard-dsn", env = "CONVOY_SHARD_DSNS", value_delimiter = ',')]
    pub shard_dsn: Vec<String>,

    /// Take the shard map from etcd (where the shard-router keeps it) instead of
    /// `--shard-map`/`--shard-dsn`, and follow it as it changes; needs `--etcd-endpoint`.
    #[arg(long, env = "CONVOY_SHARD_MAP_FROM_ETCD")]
    pub shard_map_from_etcd: bool,

    /// Most connections per shard. 16: enough for two cores' worth of backends plus I/O
    /// waits; raise with the shard's core count.
    #[arg(long, env = "CONVOY_POOL_MAX_CONNECTIONS", default_value_t = 16)]
    pub pool_max_connections: u32,

    /// Longest wait for a pooled connection, in milliseconds, before UNAVAILABLE. 2000:
    /// fail fast when a shard is down (sqlx's default is 30 s).
    #[arg(long, env = "CONVOY_POOL_ACQUIRE_TIMEOUT_MS", default_value_t = 2000)]
    pub pool_acquire_timeout_ms: u64,

    /// Postgres statement_timeout, in milliseconds. 5000: well above any indexed query.
    #[arg(long, env = "CONVOY_STATEMENT_TIMEOUT_MS", default_value_t = 5000)]
    pub statement_timeout_ms: u64,

    /// A statement that takes this long or longer, in milliseconds, is slow: counted in
    /// `convoy_db_slow_statements_total` and logged with its plan (captured off the
    /// request's path). 100: ten times the p99 of an indexed point query.
    #[arg(long, env = "CONVOY_SLOW_STATEMENT_MS", default_value_t = 100)]
    pub slow_statement_ms: u64,
}

impl ShardArgs {
    /// The map from `--shard-map` or `--shard-dsn`.
    pub fn static_map(&self) -> Result<ShardMap, ShardsError> {
        match &self.shard_map {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ShardsError::Config(format!("reading shard map {}: {e}", path.display()))
                })?;
                Ok(ShardMap::from_toml(&text).map_err(StoreError::from)?)
            }
            None if self.shard_dsn.is_empty() => Err(ShardsError::Config(
                "no shards configured: pass --shard-dsn (or CONVOY_SHARD_DSNS), --shard-map, \
                 or --shard-map-from-etcd"
                    .into(),
            )),
            None => Ok(ShardMap::evenly(&self.shard_dsn).map_err(StoreError::from)?),
        }
    }

    /// Pool settings for every shard, naming the connections `application_name`. Their
    /// statements are counted in the process-wide [`QueryStats::global`], whose slow
    /// threshold this sets to `--slow-statement-ms`.
    pub fn pool_settings(&self, application_name: &str) -> PoolSettings {
        let query_stats = QueryStats::global();
        query_stats.set_slow_threshold(Duration::from_millis(self.slow_statement_ms));
        PoolSettings {
            query_stats,
            max_connections: self.pool_max_connections,
            acquire_timeout: Duration::from_millis(self.pool_acquire_timeout_ms),
            statement_timeout: Duration::from_millis(self.statement_timeout_ms),
            application_name: application_name.into(),
            ..PoolSettings::default()
        }
    }

    /// The map in force: from etcd with `--shard-map-from-etcd` (waiting up to 30 s for the
    /// shard-router to publish one; the store to follow comes with it), else from the flags.
    pub async fn map(
        &self,
        registration: &RegistrationArgs,
    ) -> Result<(ShardMap, Option<ShardMapStore>), ShardsError> {
        if !self.shard_map_from_etcd {
            return Ok((self.static_map()?, None));
        }
        let etcd = registration.etcd_config().ok_or_else(|| {
            ShardsError::Config("--shard-map-from-etcd needs etcd: pass --etcd-endpoint".into())
        })?;
        let store = ShardMapStore::connect(&etcd).await?;
        let deadline = tokio::time::Instant::now() + MAP_WAIT;
        loop {
            match store.load().await {
                Ok(Some(stored)) => {
                    tracing::info!(epoch = stored.map.epoch().0, "shard map from etcd");
                    return Ok((stored.map, Some(store)));
                }
                Ok(None) => {
                    tracing::info!("no shard map in etcd yet; waiting for the shard-router");
                }
                Err(e) if e.is_transient() => tracing::warn!(error = %e, "reading the shard map"),
                Err(e) => return Err(e.into()),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ShardsError::Config(format!(
                    "no shard map in etcd after {MAP_WAIT:?}: is the shard-router running?"
                )));
            }
            tokio::time::sleep(MAP_POLL).await;
        }
    }
}

/// Pools over the map in force, kept current by `tasks` (map following or node checks),
/// which end when dropped.
pub struct Shards {
    /// The pools of the map in force.
    pub pools: LivePools,
    /// What keeps them current.
    pub tasks: Vec<AbortOnDropHandle<()>>,
}

/// Makes `pools` live: following `store`'s map when there is one (node checks come with
/// each map), else fixed with node checks of their own.
pub fn live(pools: ShardPools, store: Option<&ShardMapStore>) -> Shards {
    match store {
        Some(store) => {
            let (pools, following) = crate::shard_map::follow(store, pools);
            Shards {
                pools,
                tasks: vec![following],
            }
        }
        None => {
            let tasks = pools.spawn_checks();
            Shards {
                pools: pools.fixed(),
                tasks,
            }
        }
    }
}
