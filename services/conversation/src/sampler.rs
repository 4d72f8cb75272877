//! The consistency sampler (after Meta's Polaris): a fraction of acknowledged writes are
//! re-read at fixed delays after their acknowledgement from every layer that could still
//! hold the old row (this instance's L1, the key's cache instance, Redis itself) and from
//! the primary. A layer contradicts the write when it holds an older version than the write
//! made; a write is "consistent within N" when no layer contradicts it N after its
//! acknowledgement. Results go to metrics and to the fleet-wide tally in Redis
//! ([`convoy_cache::consistency`]) that `convoyctl cache consistency` reports.
//!
//! Sampling never slows a write: the decision is a coin flip, the checks run on their own
//! tasks, and at most [`MAX_PENDING`] samples are pending (past that, samples are skipped
//! and counted).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use convoy_cache::consistency::Inconsistency;
use convoy_cache::l2::L2;
use convoy_client::CacheClient;
use rand::Rng;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::cached::LocalCache;
use crate::error::ApiError;
use crate::names::ConversationName;
use crate::relay::cache_key;
use crate::store::{ConversationStore, ReadAt};

/// The latest check after a write.
const MAX_DELAY: Duration = Duration::from_secs(3600);
/// Samples waiting for their checks, at most.
pub const MAX_PENDING: usize = 1024;

/// Samples writes and checks them; see the module docs.
pub struct Sampler {
    ratio: f64,
    delays: Vec<Duration>,
    pending: Arc<Semaphore>,
    probe: Arc<Probe>,
    /// The checks under way; they end with the sampler (with the server that owns it).
    checks: Mutex<JoinSet<()>>,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("ratio", &self.ratio)
            .field("delays", &self.delays)
            .finish()
    }
}

/// What a check reads.
struct Probe {
    store: Arc<ConversationStore>,
    local: Option<LocalCache>,
    tier: Option<CacheClient>,
    l2: L2,
}

impl Sampler {
    /// Samples `ratio` of writes, checking each `delays` after its acknowledgement, through
    /// the layers given; `l2` also keeps the tally.
    pub fn new(
        ratio: f64,
        delays: Vec<Duration>,
        store: Arc<ConversationStore>,
        local: Option<LocalCache>,
        tier: Option<CacheClient>,
        l2: L2,
    ) -> Self {
        // An hour at most: a check later than that measures nothing a cache still holds.
        let mut delays: Vec<Duration> = delays.into_iter().map(|d| d.min(MAX_DELAY)).collect();
        delays.sort();
        delays.dedup();
        Self {
            ratio: ratio.clamp(0.0, 1.0),
            delays,
            pending: Arc::new(Semaphore::new(MAX_PENDING)),
            probe: Arc::new(Probe {
                store,
                local,
                tier,
                l2,
            }),
            checks: Mutex::new(JoinSet::new()),
        }
    }

    /// Called once a write of `name` that made `version` is acknowledged.
    pub fn observe(&self, name: &ConversationName, version: i64) {
        if self.delays.is_empty() || !rand::rng().random_bool(self.ratio) {
            return;
        }
        let Ok(permit) = self.pending.clone().try_acquire_owned() else {
            metrics::counter!("convoy_consistency_samples_skipped_total").increment(1);
            return;
        };
        let acked = Instant::now();
        let probe = self.probe.clone();
        let delays = self.delays.clone();
        let name = name.clone();
        let mut checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        // Reap finished checks, so the set holds only the pending ones.
        while checks.try_join_next().is_some() {}
        checks.spawn(async move {
            for delay in delays {
                tokio::time::sleep_until(acked + delay).await;
                let found = probe.check(&name, version).await;
                let label = format!("{}ms", delay.as_millis());
                metrics::counter!("convoy_consistency_checks_total", "within" => label.clone())
                    .increment(1);
                if !found.is_empty() {
                    metrics::counter!("convoy_consistency_inconsistent_total", "within" => label)
                        .increment(1);
                    tracing::warn!(?delay, ?found, "a sampled write is contradicted by a cache");
                }
                if let Err(e) = probe.l2.record_consistency(delay, &found).await {
                    tracing::debug!(error = %e, "recording a consistency check failed");
                }
            }
            drop(permit);
        });
    }
}

impl Probe {
    /// The layers holding a version of `name` older than `version`.
    async fn check(&self, name: &ConversationName, version: i64) -> Vec<Inconsistency> {
        let key = cache_key(name.team.as_str(), name.id);
        let mut found = Vec::new();
        let mut contradicted = |layer: &str, held: i64| {
            if held < version {
                found.push(Inconsistency {
                    layer: layer.to_owned(),
                    key: key.clone(),
                    expected: version,
                    found: held,
                });
            }
        };
        if let Some(local) = &self.local
            && local.bus.is_current()
            && let Some(entry) = local.l1.peek(&key).await
        {
            contradicted("local-l1", entry.version.0);
        }
        // A peek: the check neither promotes nor counts, so it leaves the hit rates alone.
        if let Some(tier) = &self.tier
            && let Ok(response) = tier.get(&key, 0, true).await
            && let Some(entry) = response.entry
        {
            contradicted("cache", entry.version);
        }
        if let Ok(Some(entry)) = self.l2.get(&key).await {
            contradicted("l2", entry.version.0);
        }
        match self.store.get(name, &ReadAt::Primary).await {
            Ok(row) => contradicted("primary", row.version.0),
            // Deleted since: nothing older can be served from the primary.
            Err(ApiError::NotFound(_)) => {}
            Err(e) => tracing::debug!(error = %e, "a sampled write's primary read failed"),
        }
        found
    }
}
