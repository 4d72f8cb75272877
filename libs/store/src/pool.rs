//! One PostgreSQL pool per shard, configured to fail fast.
//!
//! sqlx's defaults suit a single application database, not a fleet: a 30 s acquire timeout
//! turns a dead shard into 30 s hangs, and no statement timeout lets one bad query hold a
//! connection forever. Every number here is explicit and documented where it is declared.
//!
//! Every pool reports its statements and acquire waits as TRACE events, which
//! [`crate::query_stats::layer`] records; its background checks also sample its gauges
//! ([`crate::pool_metrics`]) and capture slow statements' plans ([`crate::plans`]).
//!
//! Not here: which shard a team lives on (see [`crate::shard_map`]).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use log::LevelFilter;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use crate::query_stats::QueryStats;
use crate::replicas::{InFlight, Node, ReplicaSettings, ShardReplicas, primary_lsn};
use crate::spans::check_span;

use crate::StoreError;
use crate::shard_map::{ShardIndex, ShardMap, redact_dsn};

/// How each shard's pool behaves.
#[derive(Clone, Debug)]
pub struct PoolSettings {
    /// Most connections per shard per process. Default 16: two cores' worth of backends
    /// with headroom for waits on I/O; Postgres itself is the limit, not the pool.
    pub max_connections: u32,
    /// Connections kept open while idle. Default 1, so the first request finds one warm.
    pub min_connections: u32,
    /// Longest wait for a free connection before the request fails with UNAVAILABLE.
    /// Default 2 s: fail fast when a shard is down or saturated (sqlx's default is 30 s).
    pub acquire_timeout: Duration,
    /// Server-side `statement_timeout`. Default 5 s.
    pub statement_timeout: Duration,
    /// Server-side `idle_in_transaction_session_timeout`, so a connection abandoned inside
    /// a transaction releases its locks. Default 10 s.
    pub idle_in_transaction_timeout: Duration,
    /// Idle connections above `min_connections` are closed after this. Default 60 s.
    pub idle_timeout: Duration,
    /// Connections are recycled after this, spreading load after a failover. Default 30 min.
    pub max_lifetime: Duration,
    /// Server-side TCP keepalive idle time (`tcp_keepalives_idle`), so a vanished client's
    /// backend is reaped. sqlx has no client-side keepalive setting; the client side is
    /// covered by the per-request deadline. Default 30 s.
    pub tcp_keepalive_idle: Duration,
    /// `application_name`, visible in `pg_stat_activity`.
    pub application_name: String,
    /// Ping each connection before handing it out. Default off: the ping is a full round
    /// trip on every query (measured in docs/benchmarks.md); a connection broken by a
    /// server restart fails its first query instead, which is UNAVAILABLE and retryable,
    /// and sqlx then discards it.
    pub test_before_acquire: bool,
    /// How reads are routed to replicas.
    pub replicas: ReplicaSettings,
    /// Where slow statements' plans are kept (and their slowness judged): default the
    /// process-wide [`QueryStats::global`], which telemetry hands to
    /// [`crate::query_stats::layer`]; a test may bring its own.
    pub query_stats: QueryStats,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_connections: 16,
            min_connections: 1,
            acquire_timeout: Duration::from_secs(2),
            statement_timeout: Duration::from_secs(5),
            idle_in_transaction_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_lifetime: Duration::from_secs(30 * 60),
            tcp_keepalive_idle: Duration::from_secs(30),
            application_name: "convoy".into(),
            test_before_acquire: false,
            replicas: ReplicaSettings::default(),
            query_stats: QueryStats::global(),
        }
    }
}

/// The pools of every shard in a map: each primary's, and its replicas'.
#[derive(Clone, Debug)]
pub struct ShardPools {
    map: Arc<ShardMap>,
    pools: Vec<PgPool>,
    replicas: Vec<Arc<ShardReplicas>>,
    settings: Arc<PoolSettings>,
}

/// Pools that follow the shard map as it changes: each read of the channel is the map in
/// force with its pools (see `convoy_discovery::shard_map::follow`). A fixed map is a
/// channel that never changes ([`ShardPools::fixed`]).
pub type LivePools = tokio::sync::watch::Receiver<Arc<ShardPools>>;

impl ShardPools {
    /// Builds a pool per shard without connecting: a shard that is down at start-up makes
    /// its requests fail with UNAVAILABLE instead of stopping the process.
    pub fn connect_lazy(map: ShardMap, settings: &PoolSettings) -> Result<Self, StoreError> {
        Self::build(map, Arc::new(settings.clone()), None)
    }

    /// Pools for `map`, keeping (with their replica state) the pools of every shard whose
    /// id and servers are unchanged, so a new epoch that moves slots costs no connections.
    pub fn rebuild(&self, map: ShardMap) -> Result<Self, StoreError> {
        Self::build(map, self.settings.clone(), Some(self))
    }

    fn build(
        map: ShardMap,
        settings: Arc<PoolSettings>,
        previous: Option<&ShardPools>,
    ) -> Result<Self, StoreError> {
        let pool = |shard: &crate::Shard, dsn: &str| {
            let options = connect_options(dsn, &settings).map_err(|source| StoreError::Dsn {
                shard: shard.id.to_string(),
                dsn: redact_dsn(dsn),
                source,
            })?;
            Ok(PgPoolOptions::new()
                .max_connections(settings.max_connections)
                .min_connections(settings.min_connections)
                .acquire_timeout(settings.acquire_timeout)
                .idle_timeout(settings.idle_timeout)
                .max_lifetime(settings.max_lifetime)
                .test_before_acquire(settings.test_before_acquire)
                // Every acquire's wait, for crate::query_stats (sqlx's slow-acquire warning
                // would never fire: its 2 s threshold is our acquire timeout).
                .acquire_time_level(LevelFilter::Trace)
                .acquire_slow_level(LevelFilter::Trace)
                .connect_lazy_with(options))
        };
        let mut pools = Vec::new();
        let mut replicas = Vec::new();
        for shard in map.shards() {
            let kept = previous.and_then(|p| {
                p.pools
                    .iter()
                    .zip(&p.replicas)
                    .zip(p.map.shards())
                    .find(|(_, old)| *old == shard)
            });
            if let Some(((primary, shard_replicas), _)) = kept {
                pools.push(primary.clone());
                replicas.push(shard_replicas.clone());
                continue;
            }
            pools.push(pool(shard, &shard.primary)?);
            let replica_pools = shard
                .replicas
                .iter()
                .map(|dsn| pool(shard, dsn))
                .collect::<Result<Vec<_>, StoreError>>()?;
            replicas.push(Arc::new(ShardReplicas::new(
                replica_pools,
                settings.replicas.clone(),
            )));
        }
        Ok(Self {
            map: Arc::new(map),
            pools,
            replicas,
            settings,
        })
    }

    /// These pools as a [`LivePools`] that never changes.
    pub fn fixed(self) -> LivePools {
        tokio::sync::watch::channel(Arc::new(self)).1
    }

    /// Checks every shard's nodes and samples their pools (see
    /// [`ShardPools::check_replicas`]), and captures the plans of each shard's slow
    /// statements (see [`crate::plans`]), until the returned guards drop.
    pub fn spawn_checks(&self) -> Vec<AbortOnDropHandle<()>> {
        let stats = &self.settings.query_stats;
        let mut tasks = Vec::with_capacity(self.pools.len() * 2);
        for (index, shard) in self.map.shards().iter().enumerate() {
            let shard = shard.id.to_string();
            let planner = crate::plans::capture(
                stats.clone(),
                shard.clone(),
                stats.register_planner(&shard),
                self.pools[index].clone(),
            );
            tasks.push(AbortOnDropHandle::new(tokio::spawn(planner)));
            tasks.push(AbortOnDropHandle::new(tokio::spawn(
                self.clone().check_replicas(index),
            )));
        }
        tasks
    }

    /// Closes the pools of `self` that `next` does not keep (a shard removed or whose
    /// servers changed), waiting for connections in use to be returned.
    pub async fn close_unkept(&self, next: &ShardPools) {
        for (primary, replicas) in self.pools.iter().zip(&self.replicas) {
            if next.replicas.iter().any(|r| Arc::ptr_eq(r, replicas)) {
                continue;
            }
            primary.close().await;
            for n in 0..replicas.len() {
                replicas.pool(n).close().await;
            }
        }
    }

    /// Shard `index`'s replicas.
    pub fn replicas(&self, index: ShardIndex) -> &ShardReplicas {
        &self.replicas[index]
    }

    /// Where a read on shard `index` that needs at least WAL position `min_lsn` should go,
    /// counted in flight until the guard drops.
    pub fn read_target(&self, index: ShardIndex, min_lsn: u64) -> (Node, &PgPool, InFlight) {
        match self.replicas[index].choose(min_lsn) {
            Some((n, guard)) => (Node::Replica(n), self.replicas[index].pool(n), guard),
            None => (Node::Primary, &self.pools[index], InFlight::none()),
        }
    }

    /// Checks shard `index`'s primary and replicas every `check_interval`, and samples
    /// their pools' gauges ([`crate::pool_metrics`]), forever (spawn it).
    pub async fn check_replicas(self, index: ShardIndex) {
        let replicas = self.replicas[index].clone();
        let shard = self.map.shards()[index].id.to_string();
        let settings = replicas.settings().clone();
        let nodes: Vec<String> = std::iter::once(Node::Primary)
            .chain((0..replicas.len()).map(Node::Replica))
            .map(|node| node.to_string())
            .collect();
        let mut tick = tokio::time::interval(settings.check_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            crate::pool_metrics::sample(&shard, &nodes[0], &self.pools[index]);
            for n in 0..replicas.len() {
                crate::pool_metrics::sample(&shard, &nodes[n + 1], replicas.pool(n));
            }
            let primary =
                primary_lsn(&self.pools[index]).instrument(check_span(&shard, Node::Primary));
            let lsn = match tokio::time::timeout(settings.check_timeout, primary).await {
                Ok(Ok(lsn)) => Some(lsn),
                Ok(Err(e)) => {
                    tracing::debug!(%shard, error = %e, "primary WAL position unavailable");
                    None
                }
                Err(_) => {
                    tracing::debug!(%shard, "primary WAL position timed out");
                    None
                }
            };
            replicas.record_primary(lsn);
            // Health is checked either way; lag only with the primary's position.
            replicas.check(&shard, lsn).await;
        }
    }

    /// Applies the schema migrations to every shard (concurrent callers are serialized by
    /// sqlx's advisory lock), then seeds each shard's slot ownership from the map if the
    /// shard has none yet (see [`crate::ownership::seed`]).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        for index in 0..self.pools.len() {
            self.migrate_shard(index).await?;
        }
        Ok(())
    }

    /// [`ShardPools::migrate`] for shard `index` alone.
    pub async fn migrate_shard(&self, index: ShardIndex) -> Result<(), StoreError> {
        let shard = self.map.shards()[index].id.to_string();
        let pool = &self.pools[index];
        crate::MIGRATOR
            .run(pool)
            .await
            .map_err(|source| StoreError::Migrate {
                shard: shard.clone(),
                source,
            })?;
        crate::ownership::seed(pool, &self.map, index)
            .await
            .map_err(|source| StoreError::Seed { shard, source })?;
        Ok(())
    }

    /// The shard map these pools serve.
    pub fn map(&self) -> &ShardMap {
        &self.map
    }

    /// The pool of shard `index`.
    pub fn pool(&self, index: ShardIndex) -> &PgPool {
        &self.pools[index]
    }

    /// The shard holding `team`, and its pool.
    pub fn for_team(&self, team: &str) -> (ShardIndex, &PgPool) {
        let index = self.map.owner_of_team(team);
        (index, &self.pools[index])
    }

    /// Closes every pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        for pool in &self.pools {
            pool.close().await;
        }
        for replicas in &self.replicas {
            for n in 0..replicas.len() {
                replicas.pool(n).close().await;
            }
        }
    }
}

fn connect_options(dsn: &str, settings: &PoolSettings) -> Result<PgConnectOptions, sqlx::Error> {
    let ms = |d: Duration| d.as_millis().to_string();
    Ok(PgConnectOptions::from_str(dsn)?
        // Every statement as a TRACE event, for crate::query_stats, which judges slowness
        // itself and logs slow statements with their plans: sqlx's own slow-statement
        // warning (1 s, WARN) would only repeat it, without the plan.
        .log_statements(LevelFilter::Trace)
        .log_slow_statements(LevelFilter::Trace, Duration::MAX)
        .application_name(&settings.application_name)
        .options([
            ("statement_timeout", ms(settings.statement_timeout)),
            (
                "idle_in_transaction_session_timeout",
                ms(settings.idle_in_transaction_timeout),
            ),
            (
                "tcp_keepalives_idle",
                settings.tcp_keepalive_idle.as_secs().to_string(),
            ),
        ]))
}
