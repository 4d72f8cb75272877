//! convoy's data placement and PostgreSQL plumbing, shared by every service that touches a
//! shard: the slot hash, the shard map, one fail-fast pool per shard, the schema migrations,
//! the classification of database errors, and what the data layer measures of itself
//! (statement statistics, slow statements' plans, pool gauges and waits).
//!
//! Queries themselves belong to the services that own them.

#![forbid(unsafe_code)]

pub mod failure;
pub mod ownership;
pub mod plans;
pub mod pool;
pub mod pool_metrics;
pub mod query_stats;
pub mod replicas;
pub mod shard_map;
pub mod slots;
pub mod spans;

pub use failure::DbFailure;
pub use ownership::{Fence, SlotState};
pub use plans::CapturedPlan;
pub use pool::{LivePools, PoolSettings, ShardPools};
pub use query_stats::{QueryStats, QueryStatsSettings, StatementStats};
pub use replicas::{Node, ReplicaSettings};
pub use shard_map::{Epoch, Shard, ShardId, ShardIndex, ShardMap, ShardMapError};
pub use slots::{SLOT_COUNT, Slot};

/// The schema migrations in `libs/store/migrations`, applied to every shard.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The store's one error type.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The shard map is invalid.
    #[error(transparent)]
    ShardMap(#[from] ShardMapError),
    /// A shard's DSN does not parse.
    #[error("shard {shard}: invalid DSN {dsn}: {source}")]
    Dsn {
        /// The shard.
        shard: String,
        /// The DSN, password redacted.
        dsn: String,
        /// Why.
        source: sqlx::Error,
    },
    /// Migrations failed on a shard.
    #[error("shard {shard}: migrations failed: {source}")]
    Migrate {
        /// The shard.
        shard: String,
        /// Why.
        source: sqlx::migrate::MigrateError,
    },
    /// Seeding a shard's slot ownership failed.
    #[error("shard {shard}: seeding slot ownership failed: {source}")]
    Seed {
        /// The shard.
        shard: String,
        /// Why.
        source: sqlx::Error,
    },
}
