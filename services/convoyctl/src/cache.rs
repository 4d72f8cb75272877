//! `convoyctl cache ...`: the cache tier as operators see it.

use convoy_cache::consistency::ConsistencyReport;
use convoy_cache::l2::{L2, L2Config};

/// The fleet's consistency tally, from the Redis at `redis_url`: per delay, how many
/// sampled writes were checked and how many some cache layer still contradicted.
pub async fn consistency(redis_url: &str) -> anyhow::Result<ConsistencyReport> {
    let l2 = L2::new(L2Config::new(redis_url.to_owned()))?;
    Ok(l2.consistency_report().await?)
}
