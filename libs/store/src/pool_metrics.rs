//! Pool metrics, per shard and node (`primary`, `replica-N`): connections idle and in use
//! and the pool's maximum, sampled by each shard's background check at every check
//! interval (see [`ShardPools::check_replicas`](crate::ShardPools::check_replicas)); and
//! the time each acquire waited for a connection.
//!
//! The wait is sqlx's own measure: every `Pool::acquire` (which every query on a pool and
//! every `begin` goes through) times itself and reports the time as a `tracing` event once
//! the pool options enable it, as [`crate::pool`] does; [`crate::query_stats::layer`]
//! records it here, attributed by the enclosing span like a statement. It covers the whole
//! wait (for a permit, then a ping or a new connection when needed), measured where the
//! caller waits, so no call site has to time its own acquires. A wait that ends in a timeout
//! reports no event; it surfaces as the caller's UNAVAILABLE instead. sqlx exposes no count
//! of waiters, so there is no such gauge.
//!
//! Not here: statement timings ([`crate::query_stats`]).

use std::sync::Mutex;

use metrics::{Key, Label};
use sqlx::PgPool;

/// Open connections of a node's pool, labelled `shard`, `node` and `state` (`idle` or
/// `in_use`; in use counts those being opened too).
pub const POOL_CONNECTIONS: &str = "convoy_db_pool_connections";
/// The most connections a node's pool may open, labelled `shard` and `node`.
pub const POOL_MAX_CONNECTIONS: &str = "convoy_db_pool_max_connections";
/// How long each acquire waited for a connection, in seconds, labelled `shard` and `node`.
pub const POOL_ACQUIRE_DURATION: &str = "convoy_db_pool_acquire_duration_seconds";

static METADATA: metrics::Metadata<'static> =
    metrics::Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// Sets the connection gauges of `pool`, node `node` of shard `shard`.
pub fn sample(shard: &str, node: &str, pool: &PgPool) {
    let open = pool.size();
    let idle = u32::try_from(pool.num_idle()).unwrap_or(u32::MAX).min(open);
    let connections = |state: &'static str| {
        metrics::gauge!(
            POOL_CONNECTIONS,
            "shard" => shard.to_owned(),
            "node" => node.to_owned(),
            "state" => state
        )
    };
    connections("idle").set(f64::from(idle));
    connections("in_use").set(f64::from(open - idle));
    metrics::gauge!(
        POOL_MAX_CONNECTIONS,
        "shard" => shard.to_owned(),
        "node" => node.to_owned()
    )
    .set(f64::from(pool.options().get_max_connections()));
}

/// The acquire histogram's key per (shard, node) seen, made once each: as many as the
/// shard map has nodes.
#[derive(Default)]
pub(crate) struct AcquireHistograms {
    keys: Mutex<Vec<(String, String, Key)>>,
}

impl AcquireHistograms {
    /// Records one acquire on `node` of `shard` that waited `seconds`.
    pub(crate) fn record(&self, shard: &str, node: &str, seconds: f64) {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let at = match keys.iter().position(|(s, n, _)| s == shard && n == node) {
            Some(at) => at,
            None => {
                let key = Key::from_parts(
                    POOL_ACQUIRE_DURATION,
                    vec![
                        Label::new("shard", shard.to_owned()),
                        Label::new("node", node.to_owned()),
                    ],
                );
                keys.push((shard.to_owned(), node.to_owned(), key));
                keys.len() - 1
            }
        };
        metrics::with_recorder(|r| r.register_histogram(&keys[at].2, &METADATA)).record(seconds);
    }
}
