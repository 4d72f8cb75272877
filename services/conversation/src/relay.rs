//! The outbox relay: publishes committed changes on the invalidation bus, at least once.
//!
//! Each shard's unpublished outbox rows are taken in id order with `FOR UPDATE SKIP LOCKED`
//! (so several instances share the work without publishing a row twice at the same time),
//! applied to Redis (the key's L2 entry dropped and its floor raised, the row's tags
//! dropped), appended to the bus for every L1, and marked published in the same
//! transaction. A crash between the
//! publish and the commit publishes those rows again later; duplicates are harmless
//! (invalidations only raise version floors). A write whose instance dies right after its
//! commit is published by whichever relay runs next.
//!
//! Relays wake on commit: a trigger on the outbox sends a Postgres `NOTIFY` that each relay
//! listens for on every shard, so an invalidation reaches the bus milliseconds after its
//! commit; a slow poll covers notifications lost while a listener reconnects.
//!
//! Every relay also heartbeats on the bus ([`convoy_cache::bus::Heartbeat`], every
//! [`HEARTBEAT_INTERVAL`], from a task of its own so a slow shard cannot delay it) with the
//! age of the oldest unpublished outbox row over every shard ([`Backlog`]). Subscribers stop
//! serving their L1 when no relay vouches for a backlog within their staleness bound: when
//! Redis refuses writes (out of memory, read-only) the heartbeats fail with the
//! publications, and when the relays fall behind the backlog says so.
//!
//! Metrics: `convoy_relay_backlog_seconds` (that age, as this relay knows it) and
//! `convoy_relay_publish_failures_total{what}` (`outbox`: a batch the bus refused or could
//! not be reached for; `heartbeat`).
//!
//! Not here: writing the outbox rows (the store does, with each change) or consuming the bus.

use std::sync::Arc;
use std::time::Duration;

use convoy_cache::bus::{HEARTBEAT_INTERVAL, Heartbeat};
use convoy_cache::l2::{L2, L2Error};
use convoy_cache::{BusMessage, Version};
use sqlx::postgres::{PgListener, PgPoolOptions};
use tokio::sync::Notify;
use tokio::time::{Instant, MissedTickBehavior};
use uuid::Uuid;

use crate::store::ConversationStore;

/// Rows published per shard per round.
const BATCH: i64 = 256;
/// Longest pause between rounds that found nothing to publish. Commits wake the relay at
/// once (Postgres `NOTIFY`, see [`wake_on_commit`]); the poll only bounds the delay of a
/// commit whose notification was lost while the listener reconnected. 250 ms.
const IDLE_PAUSE: Duration = Duration::from_millis(250);
/// How far back rows are published again after Redis restarted: past the longest time any
/// cache keeps an entry (the cache service's `--max-ttl-secs`, 300 by default), so every
/// entry a lost invalidation could have left is invalidated again.
const REPUBLISH_WINDOW: Duration = Duration::from_secs(15 * 60);
/// The channel the outbox trigger notifies on commit.
const CHANNEL: &str = "convoy_outbox";
/// Pause after a round that failed (Redis or the shard unreachable).
const ERROR_PAUSE: Duration = Duration::from_millis(500);
/// Longest a shard's backlog reading may take before the heartbeat goes without it (the
/// shard then counts from its last reading). Half a heartbeat interval: heartbeats stay on
/// time with a shard unreachable.
const BACKLOG_READ_TIMEOUT: Duration = Duration::from_millis(500);

/// Why a relay round failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The shard: reading or marking its outbox.
    #[error("shard: {0}")]
    Shard(#[from] sqlx::Error),
    /// The bus refused the batch (Redis out of memory, read-only) or could not be reached.
    #[error("bus: {0}")]
    Bus(#[from] L2Error),
}

/// The cache key of a conversation, as the cache tier and the bus name it.
pub fn cache_key(team: &str, id: Uuid) -> String {
    format!("conv:{team}:{id}")
}

/// Relays every shard's outbox to the bus, and heartbeats there, until the task is dropped.
pub async fn run(store: Arc<ConversationStore>, bus: L2) {
    let bus = Arc::new(bus);
    let wake = Arc::new(Notify::new());
    let mut heartbeats = crate::Tasks::default();
    heartbeats.spawn(heartbeat(store.clone(), bus.clone()));
    let mut listeners = crate::Tasks::default();
    // The Redis run id every shard's relay_state is known to hold.
    let mut reconciled: Option<String> = None;
    loop {
        // A shard added to the map (they are appended) gets its listener, and its
        // relay_state the Redis run id, too.
        for index in listeners.0.len()..store.pools().map().shards().len() {
            listeners.spawn(wake_on_commit(store.clone(), index, wake.clone()));
            reconciled = None;
        }
        let mut published = 0;
        let mut failed = false;
        match bus.server_run_id().await {
            Ok(run_id) if reconciled.as_ref() != Some(&run_id) => {
                if reconcile_all(&store, &run_id).await {
                    reconciled = Some(run_id);
                } else {
                    failed = true;
                }
            }
            Ok(_) => {}
            Err(e) => {
                failed = true;
                tracing::warn!(error = %e, "outbox relay cannot reach Redis; retrying");
            }
        }
        for index in 0..store.pools().map().shards().len() {
            match relay_once(&store, index, &bus).await {
                Ok(n) => published += n,
                Err(e) => {
                    failed = true;
                    if matches!(e, RelayError::Bus(_)) {
                        metrics::counter!("convoy_relay_publish_failures_total", "what" => "outbox")
                            .increment(1);
                    }
                    tracing::warn!(shard = index, error = %e, "outbox relay round failed; retrying");
                }
            }
        }
        if failed {
            tokio::time::sleep(ERROR_PAUSE).await;
        } else if published == 0 {
            // A commit during the round left a permit: the wait ends at once.
            let _ = tokio::time::timeout(IDLE_PAUSE, wake.notified()).await;
        }
    }
}

/// Heartbeats on the bus every [`HEARTBEAT_INTERVAL`] with the age of the oldest
/// unpublished outbox row over every shard, until dropped.
async fn heartbeat(store: Arc<ConversationStore>, bus: Arc<L2>) {
    let relay = Uuid::new_v4().to_string();
    let mut backlog = Backlog::new(Instant::now());
    let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        let shards = store.pools().map().shards().len();
        let readings =
            futures::future::join_all((0..shards).map(|index| read_backlog(&store, index))).await;
        let now = Instant::now();
        for (index, reading) in readings.into_iter().enumerate() {
            match reading {
                Ok(age) => backlog.read(index, age, now),
                Err(e) => {
                    tracing::debug!(shard = index, error = %e, "reading the outbox backlog failed")
                }
            }
        }
        let worst = backlog.worst(shards, now);
        metrics::gauge!("convoy_relay_backlog_seconds").set(worst.as_secs_f64());
        let beat = Heartbeat {
            relay: relay.clone(),
            backlog: worst,
        };
        match bus.heartbeat(&beat).await {
            Ok(_) if failing => {
                failing = false;
                tracing::info!("the relay heartbeats on the bus again");
            }
            Ok(_) => {}
            Err(e) => {
                metrics::counter!("convoy_relay_publish_failures_total", "what" => "heartbeat")
                    .increment(1);
                if !failing {
                    failing = true;
                    tracing::warn!(error = %e, "the relay cannot heartbeat on the bus: caches will stop serving until it can");
                }
            }
        }
    }
}

/// The age of shard `index`'s oldest unpublished outbox row (zero when none), by the
/// shard's clock; bounded by [`BACKLOG_READ_TIMEOUT`].
async fn read_backlog(store: &ConversationStore, index: usize) -> Result<Duration, RelayError> {
    let pool = store.pools().pool(index).clone();
    // The oldest by id, from the relay's own partial index: one row read however long the
    // backlog. Its `created_at` is its transaction's start, so the age errs long.
    let read = sqlx::query_scalar::<_, f64>(
        "SELECT coalesce(EXTRACT(EPOCH FROM now() - \
           (SELECT created_at FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT 1) \
         )::float8, 0)",
    )
    .fetch_one(&pool);
    let seconds = tokio::time::timeout(BACKLOG_READ_TIMEOUT, read)
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)??;
    Ok(Duration::try_from_secs_f64(seconds.max(0.0)).unwrap_or(Duration::MAX))
}

/// The oldest unpublished outbox row's age over every shard, as far as this relay knows:
/// each shard's last reading plus the time since, so a shard that cannot be read counts
/// as growing older (the rows it holds do) and the figure only errs long. A shard never
/// read counts from the relay's start.
#[derive(Debug)]
pub struct Backlog {
    started: Instant,
    /// Per shard index: when it was last read, and the age read.
    shards: Vec<Option<(Instant, Duration)>>,
}

impl Backlog {
    /// Nothing read yet, at `started`.
    pub fn new(started: Instant) -> Self {
        Self {
            started,
            shards: Vec::new(),
        }
    }

    /// Records that shard `index`'s oldest unpublished row was `age` old at `now`.
    pub fn read(&mut self, index: usize, age: Duration, now: Instant) {
        if self.shards.len() <= index {
            self.shards.resize(index + 1, None);
        }
        self.shards[index] = Some((now, age));
    }

    /// The largest age over the first `shards` shards at `now`.
    pub fn worst(&self, shards: usize, now: Instant) -> Duration {
        (0..shards)
            .map(|index| match self.shards.get(index).copied().flatten() {
                Some((at, age)) => age.saturating_add(now.saturating_duration_since(at)),
                None => now.saturating_duration_since(self.started),
            })
            .max()
            .unwrap_or(Duration::ZERO)
    }
}

/// Wakes the relay whenever shard `index` commits outbox rows (the trigger's `NOTIFY`).
/// sqlx's listener reconnects by itself; while it cannot, the relay polls.
async fn wake_on_commit(store: Arc<ConversationStore>, index: usize, wake: Arc<Notify>) {
    // A connection of its own, not one of the shard pool's.
    let options = store.pools().pool(index).connect_options();
    let own = PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with((*options).clone());
    loop {
        let listening = async {
            let mut listener = PgListener::connect_with(&own).await?;
            listener.listen(CHANNEL).await?;
            loop {
                listener.recv().await?;
                wake.notify_one();
            }
        };
        let result: Result<(), sqlx::Error> = listening.await;
        if let Err(e) = result {
            tracing::debug!(shard = index, error = %e, "outbox listener failed; polling until it is back");
        }
        tokio::time::sleep(ERROR_PAUSE).await;
    }
}

/// Records `run_id` on every shard (see [`reconcile`]); true if all succeeded.
async fn reconcile_all(store: &ConversationStore, run_id: &str) -> bool {
    let mut all = true;
    for index in 0..store.pools().map().shards().len() {
        match reconcile(store, index, run_id).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                shard = index,
                republishing = n,
                "Redis restarted since the outbox was last published: publishing recent rows again"
            ),
            Err(e) => {
                all = false;
                tracing::warn!(shard = index, error = %e, "recording the Redis run id failed");
            }
        }
    }
    all
}

/// Records that shard `index`'s outbox is published to the Redis whose run id is `run_id`.
/// If it was published to another (Redis restarted or failed over, and may have lost the
/// latest invalidations even with persistence), unmarks the rows published within
/// [`REPUBLISH_WINDOW`] so they are published again; returns how many.
pub async fn reconcile(
    store: &ConversationStore,
    index: usize,
    run_id: &str,
) -> Result<u64, sqlx::Error> {
    let pools = store.pools();
    let mut tx = pools.pool(index).begin().await?;
    let known: String =
        sqlx::query_scalar("SELECT redis_run_id FROM relay_state WHERE id = 1 FOR UPDATE")
            .fetch_one(&mut *tx)
            .await?;
    if known == run_id {
        tx.commit().await?;
        return Ok(0);
    }
    let mut unmarked = 0;
    if !known.is_empty() {
        unmarked = sqlx::query(
            "UPDATE outbox SET published_at = NULL \
             WHERE published_at > now() - make_interval(secs => $1)",
        )
        .bind(REPUBLISH_WINDOW.as_secs_f64())
        .execute(&mut *tx)
        .await?
        .rows_affected();
    }
    sqlx::query("UPDATE relay_state SET redis_run_id = $1 WHERE id = 1")
        .bind(run_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(unmarked)
}

/// An outbox row: id, team, conversation, version, tags, kind, written at (µs).
type OutboxRow = (i64, String, Uuid, i64, Vec<String>, String, i64);

/// Publishes one batch of shard `index`'s outbox; returns how many rows.
pub async fn relay_once(
    store: &ConversationStore,
    index: usize,
    bus: &L2,
) -> Result<usize, RelayError> {
    let pools = store.pools();
    let Some(shard) = pools.map().shards().get(index).map(|s| s.id.to_string()) else {
        return Ok(0);
    };
    let pool = pools.pool(index);
    let mut tx = pool.begin().await?;
    let rows: Vec<OutboxRow> = sqlx::query_as(
        "SELECT id, team_id, conversation_id, version, tags, kind, \
           (EXTRACT(EPOCH FROM created_at) * 1000000)::bigint FROM outbox \
         WHERE published_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(BATCH)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        tx.commit().await?;
        return Ok(0);
    }
    let messages: Vec<BusMessage> = rows
        .iter()
        .map(
            |(id, team, conversation, version, tags, kind, at)| BusMessage {
                shard: shard.clone(),
                outbox_id: *id,
                key: cache_key(team, *conversation),
                version: Version(*version),
                tags: tags.clone(),
                kind: kind.clone(),
                written_at_us: *at,
            },
        )
        .collect();
    // Redis's own copy first (raising each key's floor there), then every L1 via the bus.
    // Concurrently: a batch is up to BATCH requests, pipelined on L2's one connection.
    futures::future::try_join_all(messages.iter().map(|message| async move {
        bus.invalidate(&message.key, message.version).await?;
        if !message.tags.is_empty() {
            bus.invalidate_tags(&message.tags).await?;
        }
        Ok::<_, convoy_cache::l2::L2Error>(())
    }))
    .await?;
    bus.publish(&messages).await?;
    let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
    sqlx::query("UPDATE outbox SET published_at = now() WHERE id = ANY($1)")
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(rows.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test(start_paused = true)]
    async fn the_backlog_is_the_oldest_reading_aged_by_the_time_since_it_was_read() {
        let mut backlog = Backlog::new(Instant::now());
        tokio::time::advance(ms(200)).await;
        assert_eq!(
            backlog.worst(2, Instant::now()),
            ms(200),
            "a shard never read counts from the start"
        );
        backlog.read(0, ms(0), Instant::now());
        backlog.read(1, ms(50), Instant::now());
        assert_eq!(backlog.worst(2, Instant::now()), ms(50));
        // Shard 1 cannot be read any more: its rows age; shard 0 is read again.
        tokio::time::advance(ms(3000)).await;
        backlog.read(0, ms(10), Instant::now());
        assert_eq!(backlog.worst(2, Instant::now()), ms(3050));
        backlog.read(1, ms(0), Instant::now());
        assert_eq!(backlog.worst(2, Instant::now()), ms(10));
        assert_eq!(
            backlog.worst(0, Instant::now()),
            Duration::ZERO,
            "no shards, no backlog"
        );
    }
}
