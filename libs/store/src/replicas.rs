//! Replica-aware reads: which node of a shard may answer a read, from health checks and
//! replication lag (after Vitess, pgcat/PgDog and GitLab's database load balancing).
//!
//! A checker task per shard ([`ShardPools::check_replicas`](crate::ShardPools::check_replicas))
//! reads the primary's WAL position and each replica's replay position every
//! [`ReplicaSettings::check_interval`], with a timeout. A replica's lag is the bytes it has
//! yet to replay and, when that is not zero, the time since the last transaction it
//! replayed or since a check last found it caught up, whichever is shorter. A replica that fails a check, or a read, is banned for a backoff that doubles
//! with each failure in a row (1 s to 30 s); a check that succeeds readmits it.
//!
//! A read goes to an eligible replica, chosen by power of two choices on reads in flight,
//! or to the primary when none is eligible. Eligible: not banned, healthy at its last check,
//! replayed at least the read's minimum LSN (a consistency token's), and lagging under
//! [`ReplicaSettings::max_lag`]; when fewer than [`ReplicaSettings::keep_least_lagged`] are
//! under it, the least-lagged ones under [`ReplicaSettings::hard_max_lag`] stay eligible.
//! When every replica is banned, all are unbanned (a ban that takes out the whole tier is
//! more likely a fault on our side). The checked positions only trail the true ones, so a
//! replica counted as past an LSN is.
//!
//! Not here: what a read does with its target (the caller's store), or the map's changes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use sqlx::PgPool;
use tracing::Instrument;

use crate::spans::check_span;

/// Replica routing settings; every default is documented where it is declared.
#[derive(Clone, Debug)]
pub struct ReplicaSettings {
    /// A replica lagging more than this serves no ordinary reads. 1 s: Vitess's and
    /// GitLab's order of magnitude.
    pub max_lag: Duration,
    /// Replicas kept eligible, least-lagged first, when fewer are under `max_lag`. 2.
    pub keep_least_lagged: usize,
    /// A replica lagging more than this serves nothing. 30 s.
    pub hard_max_lag: Duration,
    /// How often nodes are checked. 250 ms.
    pub check_interval: Duration,
    /// How long a check may take before it counts as failed. 1 s.
    pub check_timeout: Duration,
    /// First ban after a failure; doubles with each failure in a row. 1 s.
    pub min_ban: Duration,
    /// Longest ban. 30 s.
    pub max_ban: Duration,
}

impl Default for ReplicaSettings {
    fn default() -> Self {
        Self {
            max_lag: Duration::from_secs(1),
            keep_least_lagged: 2,
            hard_max_lag: Duration::from_secs(30),
            check_interval: Duration::from_millis(250),
            check_timeout: Duration::from_secs(1),
            min_ban: Duration::from_secs(1),
            max_ban: Duration::from_secs(30),
        }
    }
}

/// A replica's state, as of its last check.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReplicaHealth {
    /// Whether the last check succeeded (and found a standby).
    pub healthy: bool,
    /// The WAL position it has replayed (bytes since 0/0).
    pub replay_lsn: u64,
    /// WAL bytes it has yet to replay.
    pub lag_bytes: u64,
    /// How long ago the primary wrote the oldest WAL it has yet to replay; zero when caught
    /// up. As of `measured_at`.
    pub lag: Duration,
    /// Until when it serves no reads, if banned.
    pub banned_until: Option<Instant>,
    /// Failures in a row (reset by a good check once the ban is over).
    pub failures: u32,
    /// When it was last checked.
    pub checked_at: Option<Instant>,
    /// When its lag was last measured (the primary answered too).
    pub measured_at: Option<Instant>,
}

impl ReplicaHealth {
    /// Its lag as it may be by `now`: the lag last measured plus the time since (lag grows
    /// at most that fast while unmeasured); unknown (never measured) is `Duration::MAX`.
    pub fn lag_now(&self, now: Instant) -> Duration {
        self.measured_at.map_or(Duration::MAX, |at| {
            self.lag.saturating_add(now.saturating_duration_since(at))
        })
    }
}

/// Where a read goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Node {
    /// The primary.
    Primary,
    /// Replica `n` of the shard (in map order).
    Replica(usize),
}

/// `primary` or `replica-N`: the node's name in metrics and spans.
impl std::fmt::Display for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Node::Primary => f.write_str("primary"),
            Node::Replica(n) => write!(f, "replica-{n}"),
        }
    }
}

struct Replica {
    pool: PgPool,
    health: Mutex<ReplicaHealth>,
    in_flight: Arc<AtomicUsize>,
}

/// One shard's replicas and what is known of them (and of the primary, as the checks see
/// it).
pub struct ShardReplicas {
    settings: ReplicaSettings,
    replicas: Vec<Replica>,
    /// Whether the primary answered the last check (`None`: not checked yet), and its WAL
    /// position then.
    primary: Mutex<(Option<bool>, u64)>,
    /// The primary's WAL position at each check, oldest first (for lag in time).
    history: Mutex<std::collections::VecDeque<(Instant, u64)>>,
}

/// Primary positions remembered: 5 minutes of checks at 250 ms, past any hard cap on lag.
const HISTORY: usize = 1200;

impl std::fmt::Debug for ShardReplicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardReplicas")
            .field("replicas", &self.replicas.len())
            .finish()
    }
}

/// Counts a read in flight on a replica until dropped.
#[derive(Debug)]
pub struct InFlight(Option<Arc<AtomicUsize>>);

impl InFlight {
    /// Counts nothing (a read on the primary).
    pub fn none() -> Self {
        Self(None)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(count) = &self.0 {
            count.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl ShardReplicas {
    /// The replicas behind `pools` (map order), none eligible before their first check.
    pub fn new(pools: Vec<PgPool>, settings: ReplicaSettings) -> Self {
        Self {
            settings,
            primary: Mutex::new((None, 0)),
            history: Mutex::default(),
            replicas: pools
                .into_iter()
                .map(|pool| Replica {
                    pool,
                    health: Mutex::new(ReplicaHealth::default()),
                    in_flight: Arc::default(),
                })
                .collect(),
        }
    }

    /// Whether the primary answered its last check (`None`: not checked yet), and its WAL
    /// position then.
    pub fn primary_health(&self) -> (Option<bool>, u64) {
        *lock(&self.primary)
    }

    /// Records the primary's check.
    pub fn record_primary(&self, answered: Option<u64>) {
        let mut primary = lock(&self.primary);
        *primary = match answered {
            Some(lsn) => (Some(true), lsn),
            None => (Some(false), primary.1),
        };
    }

    /// The settings they are routed by.
    pub fn settings(&self) -> &ReplicaSettings {
        &self.settings
    }

    /// How many replicas the shard has.
    pub fn len(&self) -> usize {
        self.replicas.len()
    }

    /// Whether the shard has no replicas.
    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    /// Replica `n`'s pool.
    pub fn pool(&self, n: usize) -> &PgPool {
        &self.replicas[n].pool
    }

    /// Each replica's state.
    pub fn health(&self) -> Vec<ReplicaHealth> {
        self.replicas
            .iter()
            .map(|r| lock(&r.health).clone())
            .collect()
    }

    /// The replica a read needing at least `min_lsn` should go to, counted in flight until
    /// the guard drops; `None`: the primary.
    pub fn choose(&self, min_lsn: u64) -> Option<(usize, InFlight)> {
        let now = Instant::now();
        let states: Vec<ReplicaHealth> = self.health();
        if !states.is_empty()
            && states
                .iter()
                .all(|s| s.banned_until.is_some_and(|t| t > now))
        {
            // Everything banned: more likely our fault than theirs.
            for r in &self.replicas {
                lock(&r.health).banned_until = None;
            }
            return self.choose_from(&self.health(), min_lsn, now);
        }
        self.choose_from(&states, min_lsn, now)
    }

    fn choose_from(
        &self,
        states: &[ReplicaHealth],
        min_lsn: u64,
        now: Instant,
    ) -> Option<(usize, InFlight)> {
        // A state older than a few checks is not trusted (the checker may be stuck).
        let fresh = self.settings.check_interval.saturating_mul(4) + self.settings.check_timeout;
        let usable: Vec<usize> = (0..states.len())
            .filter(|&i| {
                let s = &states[i];
                s.healthy
                    && s.checked_at
                        .is_some_and(|t| now.saturating_duration_since(t) <= fresh)
                    && s.banned_until.is_none_or(|t| t <= now)
                    && s.replay_lsn >= min_lsn
                    && s.lag_now(now) <= self.settings.hard_max_lag
            })
            .collect();
        let mut eligible: Vec<usize> = usable
            .iter()
            .copied()
            .filter(|&i| states[i].lag_now(now) <= self.settings.max_lag)
            .collect();
        if eligible.len() < self.settings.keep_least_lagged {
            let mut by_lag = usable.clone();
            by_lag.sort_by_key(|&i| (states[i].lag_now(now), states[i].lag_bytes));
            for i in by_lag {
                if eligible.len() >= self.settings.keep_least_lagged {
                    break;
                }
                if !eligible.contains(&i) {
                    eligible.push(i);
                }
            }
        }
        let chosen = match eligible.len() {
            0 => return None,
            1 => eligible[0],
            n => {
                let mut rng = rand::rng();
                let a = eligible[rng.random_range(0..n)];
                let b = eligible[rng.random_range(0..n)];
                let load = |i: usize| self.replicas[i].in_flight.load(Ordering::Relaxed);
                if load(b) < load(a) { b } else { a }
            }
        };
        let count = self.replicas[chosen].in_flight.clone();
        count.fetch_add(1, Ordering::Relaxed);
        Some((chosen, InFlight(Some(count))))
    }

    /// Bans replica `n` after a failed read (as a failed check does).
    pub fn report_failure(&self, n: usize) {
        let mut health = lock(&self.replicas[n].health);
        self.fail(&mut health);
    }

    /// Bans after a failure; failures during a ban leave it as it is (a replica down for a
    /// while is banned for 1 s, then 2 s, 4 s... by the checks that find it still down when
    /// each ban ends, not by every check in between).
    fn fail(&self, health: &mut ReplicaHealth) {
        if health.banned_until.is_some_and(|t| t > Instant::now()) {
            return;
        }
        health.failures = health.failures.saturating_add(1);
        let ban = self
            .settings
            .min_ban
            .saturating_mul(1 << health.failures.saturating_sub(1).min(16))
            .min(self.settings.max_ban);
        health.banned_until = Some(Instant::now() + ban);
    }

    /// Checks every replica; with the primary's current WAL position (`primary_lsn`) also
    /// their lag. Without it (the primary did not answer) health is still checked, and the
    /// last lag stands, growing with its age when read (see [`ReplicaHealth::lag_now`]).
    pub async fn check(&self, shard: &str, primary_lsn: Option<u64>) {
        let now = Instant::now();
        if let Some(lsn) = primary_lsn {
            let mut history = lock(&self.history);
            history.push_back((now, lsn));
            while history.len() > HISTORY {
                history.pop_front();
            }
        }
        let checks = self.replicas.iter().enumerate().map(|(n, replica)| async move {
            let checked = tokio::time::timeout(
                self.settings.check_timeout,
                sqlx::query_as::<_, (bool, Option<i64>)>(
                    "SELECT pg_is_in_recovery(), \
                       (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint",
                )
                .fetch_one(&replica.pool)
                .instrument(check_span(shard, Node::Replica(n))),
            )
            .await;
            let now = Instant::now();
            let mut health = lock(&replica.health);
            match checked {
                Ok(Ok((true, Some(replayed)))) => {
                    let replay_lsn = u64::try_from(replayed).unwrap_or(0);
                    health.healthy = true;
                    health.replay_lsn = replay_lsn;
                    health.checked_at = Some(now);
                    if let Some(primary_lsn) = primary_lsn {
                        health.lag_bytes = primary_lsn.saturating_sub(replay_lsn);
                        health.lag = self.lag_of(replay_lsn, now);
                        health.measured_at = Some(now);
                    }
                    // A ban runs its course; a good check after it readmits for good.
                    if health.banned_until.is_none_or(|t| t <= now) {
                        health.banned_until = None;
                        health.failures = 0;
                    }
                    let replica = n.to_string();
                    metrics::gauge!("convoy_store_replica_lag_bytes", "shard" => shard.to_owned(), "replica" => replica.clone())
                        .set(health.lag_bytes as f64);
                    metrics::gauge!("convoy_store_replica_lag_seconds", "shard" => shard.to_owned(), "replica" => replica)
                        .set(health.lag.as_secs_f64());
                }
                outcome => {
                    let why = match outcome {
                        Ok(Ok(_)) => "not a standby".to_owned(),
                        Ok(Err(e)) => e.to_string(),
                        Err(_) => "check timed out".to_owned(),
                    };
                    if health.healthy || health.failures == 0 {
                        tracing::warn!(shard, replica = n, why, "replica failed its check; banned");
                    }
                    health.healthy = false;
                    health.checked_at = Some(now);
                    self.fail(&mut health);
                }
            }
        });
        futures::future::join_all(checks).await;
    }

    /// How long ago the primary was last at a WAL position the replica has not replayed:
    /// the earliest recorded primary position past `replay_lsn` was written at least that
    /// long ago. Measured on this process's clock alone (no clock skew between hosts, no
    /// reliance on replayed transactions' timestamps, which an idle primary does not
    /// produce). Zero when the replica is past every recorded position.
    fn lag_of(&self, replay_lsn: u64, now: Instant) -> Duration {
        let history = lock(&self.history);
        history
            .iter()
            .find(|(_, lsn)| *lsn > replay_lsn)
            .map_or(Duration::ZERO, |(at, _)| now.saturating_duration_since(*at))
    }
}

/// The primary's current WAL position, bytes since 0/0.
pub async fn primary_lsn(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let lsn: i64 = sqlx::query_scalar("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint")
        .fetch_one(pool)
        .await?;
    Ok(u64::try_from(lsn).unwrap_or(0))
}

/// A WAL position at or after every commit acknowledged so far on the primary behind
/// `executor` (its insert position), bytes since 0/0: what a consistency token carries.
/// Asked on the connection that just committed a write, it needs no second connection.
pub async fn commit_lsn<'e>(executor: impl sqlx::PgExecutor<'e>) -> Result<u64, sqlx::Error> {
    let lsn: i64 =
        sqlx::query_scalar("SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint")
            .fetch_one(executor)
            .await?;
    Ok(u64::try_from(lsn).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replicas(states: Vec<ReplicaHealth>) -> ShardReplicas {
        let pools = states
            .iter()
            .map(|_| {
                sqlx::postgres::PgPoolOptions::new()
                    .connect_lazy("postgres://nobody@127.0.0.1:1/none")
                    .unwrap()
            })
            .collect();
        let r = ShardReplicas::new(pools, ReplicaSettings::default());
        for (replica, state) in r.replicas.iter().zip(states) {
            *lock(&replica.health) = state;
        }
        r
    }

    fn ok(replay_lsn: u64, lag_ms: u64) -> ReplicaHealth {
        let now = Instant::now();
        ReplicaHealth {
            healthy: true,
            replay_lsn,
            lag_bytes: if lag_ms == 0 { 0 } else { 100 },
            lag: Duration::from_millis(lag_ms),
            banned_until: None,
            failures: 0,
            checked_at: Some(now),
            measured_at: Some(now),
        }
    }

    #[tokio::test]
    async fn a_read_with_a_token_goes_only_where_the_token_was_replayed() {
        let r = replicas(vec![ok(100, 0), ok(500, 0)]);
        for _ in 0..50 {
            assert_eq!(r.choose(400).map(|(n, _)| n), Some(1));
        }
        assert!(r.choose(600).is_none(), "none has it: the primary");
    }

    #[tokio::test]
    async fn lagging_replicas_serve_only_to_keep_two_eligible_and_never_past_the_hard_cap() {
        let r = replicas(vec![ok(0, 0), ok(0, 5_000), ok(0, 60_000)]);
        let mut seen = [0; 3];
        for _ in 0..200 {
            seen[r.choose(0).unwrap().0] += 1;
        }
        assert!(seen[0] > 0 && seen[1] > 0, "the two least lagged: {seen:?}");
        assert_eq!(seen[2], 0, "past the hard cap: {seen:?}");
        let fresh = replicas(vec![ok(0, 0), ok(0, 0), ok(0, 5_000)]);
        for _ in 0..200 {
            assert_ne!(fresh.choose(0).unwrap().0, 2, "two are under the bound");
        }
    }

    #[tokio::test]
    async fn a_failed_replica_is_banned_and_when_all_are_banned_all_are_unbanned() {
        let r = replicas(vec![ok(0, 0), ok(0, 0)]);
        // A failed read bans the replica; its checks still pass, but it serves nothing.
        r.report_failure(0);
        for _ in 0..50 {
            assert_eq!(r.choose(0).unwrap().0, 1);
        }
        r.report_failure(1);
        assert!(r.choose(0).is_some(), "all banned: all unbanned");
    }

    #[tokio::test]
    async fn reads_in_flight_steer_the_choice() {
        let r = replicas(vec![ok(0, 0), ok(0, 0)]);
        let held: Vec<_> = (0..10).map(|_| r.choose(0).unwrap()).collect();
        let on_zero = held.iter().filter(|(n, _)| *n == 0).count();
        assert!((2..=8).contains(&on_zero), "{on_zero} of 10 on replica 0");
    }
}
