//! Scatter a query to the shards that hold its conversations, gather their partial
//! aggregates, and say which shards did not answer.
//!
//! A team lives on one shard (its slot's owner in the map in force), so a team query asks
//! that shard; a fleet query asks every shard, each only for the slots the map gives it (a
//! slot being copied by a move has rows on two shards, and only its owner's count). Each
//! shard is read on an eligible replica when it has one (one that has replayed the
//! caller's consistency token, when the token names the shard), else the primary; a
//! replica that fails or takes half the shard's time hands the read to the primary.
//!
//! Each answer carries the WAL position its data is at least as new as, read before the
//! aggregate's snapshot: [`crate::cached`] compares it with the positions in consistency
//! tokens. A shard that does not answer within its time (the smaller of the configured
//! shard timeout and what the call's deadline leaves) is listed as missing, never silently
//! left out.

use std::time::Duration;

use chrono::{DateTime, Utc};
use convoy_mesh::Deadline;
use convoy_proto::consistency::ConsistencyToken;
use convoy_store::replicas::{Node, primary_lsn};
use convoy_store::spans::db_span;
use convoy_store::{DbFailure, LivePools, ShardIndex, ShardPools};
use sqlx::{PgPool, Postgres, QueryBuilder, Row};
use tokio::time::Instant;
use tracing::Instrument;

use crate::aggregate::{Groups, MIN_VALUE, StatusFigures, gamma_ln};
use crate::query::{Grouping, Query, Scope};

/// Time kept back from the call's deadline to merge and answer.
const ANSWER_MARGIN: Duration = Duration::from_millis(20);

/// One shard's answer.
#[derive(Clone, Debug)]
pub struct ShardAnswer {
    /// The shard.
    pub shard: String,
    /// A WAL position of the shard's primary that every write the answer reflects is at or
    /// before: a token at or below it is satisfied.
    pub lsn: u64,
    /// Its figures per group.
    pub groups: Groups,
    /// Whether the data is at least as new as the moment the question was asked (read on
    /// the primary, or on a replica past the primary's position then): only such answers
    /// may be cached, so a fill that follows an invalidation never stores older data.
    pub fresh: bool,
}

/// What the shards answered.
#[derive(Debug, Default)]
pub struct Gathered {
    /// Shards that answered, with their figures.
    pub answers: Vec<ShardAnswer>,
    /// Shards that did not answer in time or failed.
    pub missing: Vec<String>,
}

/// Asks the shards of the map in force; see the module docs.
#[derive(Clone, Debug)]
pub struct Scatter {
    pools: LivePools,
    shard_timeout: Duration,
}

/// Where one shard may be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadAt {
    /// A replica that has replayed this position (0: any eligible replica), else the
    /// primary.
    After(u64),
    /// Only the primary.
    Primary,
}

impl Scatter {
    /// Asks the shards of `pools`, giving each at most `shard_timeout`.
    pub fn new(pools: LivePools, shard_timeout: Duration) -> Self {
        Self {
            pools,
            shard_timeout,
        }
    }

    /// The shards `query` reads, by id, in the map in force.
    pub fn targets(&self, query: &Query) -> Vec<String> {
        let pools = self.pools.borrow().clone();
        target_indexes(&pools, query)
            .into_iter()
            .map(|i| pools.map().shards()[i].id.to_string())
            .collect()
    }

    /// Runs `query` on every shard that holds its conversations, reading no older than
    /// `token` where it names a shard; with `fresh`, no older than the moment of asking.
    pub async fn gather(
        &self,
        query: &Query,
        token: Option<&ConsistencyToken>,
        fresh: bool,
    ) -> Gathered {
        let pools = self.pools.borrow().clone();
        let budget = match Deadline::current() {
            Some(deadline) => deadline
                .remaining()
                .saturating_sub(ANSWER_MARGIN)
                .min(self.shard_timeout),
            None => self.shard_timeout,
        };
        let deadline = Instant::now() + budget;
        let asks = target_indexes(&pools, query).into_iter().map(|index| {
            let shard = pools.map().shards()[index].id.to_string();
            let at = match token {
                Some(t) if t.shard == shard && (t.lsn == 0 || t.lsn == u64::MAX) => {
                    // The write's position was not measured: only the primary surely has it.
                    ReadAt::Primary
                }
                Some(t) if t.shard == shard => ReadAt::After(t.lsn),
                _ => ReadAt::After(0),
            };
            let pools = &pools;
            async move {
                let result = ask(pools, index, query, at, fresh, deadline).await;
                (shard, result)
            }
        });
        let mut gathered = Gathered::default();
        for (shard, result) in futures::future::join_all(asks).await {
            let outcome = match &result {
                Ok(_) => "ok",
                Err(Failure::Timeout) => "timeout",
                Err(Failure::Db(_)) => "error",
            };
            metrics::counter!("convoy_analytics_shard_queries_total", "shard" => shard.clone(), "outcome" => outcome)
                .increment(1);
            match result {
                Ok((lsn, groups, fresh)) => gathered.answers.push(ShardAnswer {
                    shard,
                    lsn,
                    groups,
                    fresh,
                }),
                Err(failure) => {
                    tracing::warn!(%shard, %failure, "shard left out of an analytics answer");
                    metrics::counter!("convoy_analytics_missing_shards_total", "shard" => shard.clone())
                        .increment(1);
                    gathered.missing.push(shard);
                }
            }
        }
        gathered
    }
}

/// Why a shard did not answer.
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// Out of time.
    #[error("no answer in time")]
    Timeout,
    /// The database failed.
    #[error(transparent)]
    Db(sqlx::Error),
}

/// The shards `query` reads.
fn target_indexes(pools: &ShardPools, query: &Query) -> Vec<ShardIndex> {
    match &query.scope {
        Scope::Team(team) => vec![pools.map().owner_of_team(team.as_str())],
        Scope::Fleet => (0..pools.map().shards().len()).collect(),
    }
}

/// How long a fresh read waits for the primary's WAL position before it gives up on
/// freshness (and on caching) and reads as usual.
const FLOOR_TIMEOUT: Duration = Duration::from_millis(200);

/// Shard `index`'s answer, and whether it is fresh: on a replica `at` allows (half the
/// time at most), else the primary, by `deadline`. A fresh read first takes the
/// primary's WAL position and needs a replica past it.
async fn ask(
    pools: &ShardPools,
    index: ShardIndex,
    query: &Query,
    at: ReadAt,
    fresh: bool,
    deadline: Instant,
) -> Result<(u64, Groups, bool), Failure> {
    let slots = owned_slots(pools, index);
    let mut is_fresh = true;
    if let ReadAt::After(token_lsn) = at {
        let mut min_lsn = token_lsn;
        if fresh && !pools.replicas(index).is_empty() {
            match tokio::time::timeout(FLOOR_TIMEOUT, primary_lsn(pools.pool(index))).await {
                Ok(Ok(floor)) => min_lsn = min_lsn.max(floor),
                _ => is_fresh = false,
            }
        }
        let (node, pool, in_flight) = pools.read_target(index, min_lsn);
        if let Node::Replica(n) = node {
            let half = deadline - (deadline - Instant::now()) / 2;
            let shard = pools.map().shards()[index].id.as_str();
            let attempt = run(pool, query, &slots).instrument(db_span(shard, node));
            let result = tokio::time::timeout_at(half, attempt).await;
            drop(in_flight);
            match result {
                Ok(Ok((lsn, groups))) => return Ok((lsn, groups, fresh && is_fresh)),
                Ok(Err(e)) => {
                    if DbFailure::classify(&e) == DbFailure::Unavailable {
                        pools.replicas(index).report_failure(n);
                    }
                    tracing::debug!(replica = n, error = %e, "replica failed an analytics read");
                }
                Err(_) => pools.replicas(index).report_failure(n),
            }
        }
    }
    let shard = pools.map().shards()[index].id.as_str();
    let attempt = run(pools.pool(index), query, &slots).instrument(db_span(shard, Node::Primary));
    match tokio::time::timeout_at(deadline, attempt).await {
        Ok(Ok((lsn, groups))) => Ok((lsn, groups, fresh)),
        Ok(Err(e)) => Err(Failure::Db(e)),
        Err(_) => Err(Failure::Timeout),
    }
}

/// The slots shard `index` owns in the map, for fleet queries.
fn owned_slots(pools: &ShardPools, index: ShardIndex) -> Vec<i16> {
    pools
        .map()
        .ranges()
        .into_iter()
        .filter(|(_, owner)| *owner == index)
        .flat_map(|(range, _)| range.map(|slot| slot as i16))
        .collect()
}

/// Runs `query` on one node over `slots` (fleet queries): its WAL position first, then the
/// aggregate (whose snapshot is therefore at least as new as the position). Public for the
/// benchmarks, which compare it with the whole service.
pub async fn run(
    pool: &PgPool,
    query: &Query,
    slots: &[i16],
) -> Result<(u64, Groups), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let (position, replica): (i64, bool) = sqlx::query_as(
        "SELECT (CASE WHEN pg_is_in_recovery() \
                 THEN coalesce(pg_last_wal_replay_lsn(), '0/0') \
                 ELSE pg_current_wal_lsn() END - '0/0'::pg_lsn)::bigint, \
                pg_is_in_recovery()",
    )
    .fetch_one(&mut *conn)
    .await?;
    // A replica shows a commit once it has replayed it; the primary's insert position can
    // equal a token's while that commit is still becoming visible, so a token is
    // satisfied only by a position strictly past it there.
    let position = position.max(0) as u64;
    let lsn = if replica {
        position
    } else {
        position.saturating_sub(1)
    };
    let mut groups = Groups::new();
    if matches!(
        query.grouping,
        Grouping::Usage { .. } | Grouping::Tools { .. }
    ) {
        let rows = events_sql("", query).build().fetch_all(&mut *conn).await?;
        for row in rows {
            let mut tokens = [0; 4];
            for (k, slot) in tokens.iter_mut().enumerate() {
                *slot = row.try_get::<Option<i64>, _>(4 + k)?.unwrap_or(0);
            }
            groups.entry(row.try_get(0)?).or_default().add_events(
                row.try_get(1)?,
                row.try_get(2)?,
                row.try_get(3)?,
                tokens,
            );
        }
        return Ok((lsn, groups));
    }
    let rows = conversations_sql("", query, slots)
        .build()
        .fetch_all(&mut *conn)
        .await?;
    for row in rows {
        let group: String = row.try_get(0)?;
        let status: String = row.try_get(1)?;
        let count: i64 = row.try_get(3)?;
        let partial = groups.entry(group).or_default();
        partial.add_status(
            &status,
            StatusFigures {
                count,
                messages: row.try_get::<Option<i64>, _>(4)?.unwrap_or(0),
                duration_sum: row.try_get::<Option<f64>, _>(5)?.unwrap_or(0.0),
                effectiveness_sum: row.try_get::<Option<f64>, _>(6)?.unwrap_or(0.0),
                scored: row.try_get(7)?,
            },
        );
        partial.add_bin(row.try_get(2)?, count);
    }
    Ok((lsn, groups))
}

/// SQL for the sum of a bigint column as a bigint, saturated at i64::MAX: Postgres sums
/// bigints as numeric, and a cast of a larger sum would fail the shard's whole answer.
fn saturated_sum(column: &str) -> String {
    format!("LEAST(sum({column}), {})::bigint", i64::MAX)
}

/// The origin of time buckets: a UTC midnight, so day buckets are UTC days.
const BUCKET_ORIGIN: &str = "2000-01-01 00:00:00+00";

/// The aggregate over `conversations` for `query`: one scan, grouped once by (group,
/// status, sketch bin), from which the service sums counts and totals per status and
/// fills the duration sketch per bin (one hash aggregate: grouping sets by (group, status)
/// and (group, bin) hashed every row twice and measured 2x slower). Every column it reads of a team's rows is in
/// `conversations_team_analytics_idx`, so a team query is an index-only scan; a fleet
/// query reads by time through `conversations_created_brin`.
fn conversations_sql<'a>(
    prefix: &str,
    query: &'a Query,
    slots: &'a [i16],
) -> QueryBuilder<'a, Postgres> {
    let mut sql = QueryBuilder::new(prefix);
    sql.push("WITH picked AS (SELECT ");
    match &query.grouping {
        Grouping::Total => {
            sql.push("''::text");
        }
        Grouping::Intent => {
            sql.push("intent");
        }
        Grouping::Bucket(width) => {
            sql.push("(extract(epoch FROM date_bin(make_interval(secs => ")
                .push_bind(width.seconds() as f64)
                .push(format!(
                    "), created_at, timestamptz '{BUCKET_ORIGIN}')))::bigint::text"
                ));
        }
        Grouping::TopTeams { .. } => {
            sql.push("team_id");
        }
        Grouping::TopMetadata { key, .. } => {
            sql.push("coalesce(metadata ->> ")
                .push_bind(key)
                .push(", '')");
        }
        // Event groupings read events (`events_sql`); never asked here.
        Grouping::Usage { .. } | Grouping::Tools { .. } => {
            sql.push("''::text");
        }
    }
    sql.push(
        " AS g, status, message_count, duration_seconds, effectiveness_score, \
         CASE WHEN duration_seconds > ",
    )
    .push_bind(MIN_VALUE)
    .push(" THEN floor(ln(duration_seconds) / ")
    .push_bind(gamma_ln())
    .push(")::int END AS k FROM conversations WHERE ");
    match &query.scope {
        Scope::Team(team) => sql.push("team_id = ").push_bind(team.as_str()),
        Scope::Fleet => sql.push("slot = ANY(").push_bind(slots).push(")"),
    };
    sql.push(" AND created_at >= ")
        .push_bind(query.start)
        .push(" AND created_at < ")
        .push_bind(query.end);
    if let Some(intent) = query.intent {
        sql.push(" AND intent = ").push_bind(intent);
    }
    if let Some(status) = query.status {
        sql.push(" AND status = ").push_bind(status);
    }
    sql.push(")");
    let top = match &query.grouping {
        Grouping::TopTeams { limit } | Grouping::TopMetadata { limit, .. } => Some(*limit),
        _ => None,
    };
    if let Some(limit) = top {
        // Teams never span shards, and a team's metadata lives on its shard: each shard's
        // top N holds the global top N's members, so the merge stays exact.
        sql.push(", top AS (SELECT g FROM picked GROUP BY g ORDER BY count(*) DESC, g LIMIT ")
            .push_bind(i64::from(limit))
            .push(")");
    }
    sql.push(format!(
        " SELECT g, status, k, count(*), {}, sum(duration_seconds), \
             sum(effectiveness_score), count(effectiveness_score) FROM picked",
        saturated_sum("message_count")
    ));
    if top.is_some() {
        sql.push(" WHERE g IN (SELECT g FROM top)");
    }
    sql.push(" GROUP BY g, status, k");
    sql
}

/// The aggregate over one team's `conversation_events` for an event grouping (usage per
/// day and model; tool calls and errors per tool), by the event's time. Columns: group,
/// events, tool calls, failed tool results, then the four token sums. A result names its
/// tool when its client said, else its call's (joined by `tool_call_id`). The team's rows
/// are found by the primary key's `team_id` prefix; the time range by the BRIN index.
fn events_sql<'a>(prefix: &str, query: &'a Query) -> QueryBuilder<'a, Postgres> {
    let mut sql = QueryBuilder::new(prefix);
    let team = query.team().map_or("", |t| t.as_str());
    let group = match &query.grouping {
        Grouping::Usage { .. } => format!(
            "(extract(epoch FROM date_bin(interval '1 day', e.occurred_at, \
              timestamptz '{BUCKET_ORIGIN}')))::bigint::text || '|' || coalesce(e.model, '')"
        ),
        _ => "coalesce(e.tool_name, c.tool_name)".to_owned(),
    };
    sql.push(format!(
        "SELECT {group} AS g, count(*), \
           count(*) FILTER (WHERE e.kind = 'tool_call'), \
           count(*) FILTER (WHERE e.kind = 'tool_result' AND e.is_error), \
           {}, {}, {}, {} \
         FROM conversation_events e ",
        saturated_sum("e.input_tokens"),
        saturated_sum("e.output_tokens"),
        saturated_sum("e.cache_creation_input_tokens"),
        saturated_sum("e.cache_read_input_tokens"),
    ));
    let tools = matches!(query.grouping, Grouping::Tools { .. });
    if tools {
        sql.push(
            "LEFT JOIN conversation_events c ON e.kind = 'tool_result' AND e.tool_name IS NULL \
               AND c.team_id = e.team_id AND c.conversation_id = e.conversation_id \
               AND c.kind = 'tool_call' AND c.tool_call_id = e.tool_call_id ",
        );
    }
    sql.push("WHERE e.team_id = ")
        .push_bind(team)
        .push(" AND e.occurred_at >= ")
        .push_bind(query.start)
        .push(" AND e.occurred_at < ")
        .push_bind(query.end);
    if tools {
        sql.push(" AND e.kind IN ('tool_call', 'tool_result')");
    } else {
        // Counts are never negative: "any is positive" without a sum that could overflow.
        sql.push(
            " AND GREATEST(e.input_tokens, e.output_tokens, e.cache_creation_input_tokens, \
               e.cache_read_input_tokens) > 0",
        );
    }
    if query.intent.is_some() || query.status.is_some() {
        sql.push(" AND e.conversation_id IN (SELECT id FROM conversations WHERE team_id = ")
            .push_bind(team);
        if let Some(intent) = query.intent {
            sql.push(" AND intent = ").push_bind(intent);
        }
        if let Some(status) = query.status {
            sql.push(" AND status = ").push_bind(status);
        }
        sql.push(")");
    }
    sql.push(" GROUP BY g");
    if let Some(most) = query.grouping.max_groups() {
        // One more than an answer may hold, so the service knows it would be too large
        // without receiving every group.
        sql.push(" ORDER BY g LIMIT ")
            .push_bind(i64::try_from(most).unwrap_or(i64::MAX).saturating_add(1));
    }
    if tools {
        // A team lives on one shard: its top N is the answer's.
        sql.push(
            " HAVING coalesce(e.tool_name, c.tool_name) IS NOT NULL ORDER BY 3 DESC, g LIMIT ",
        )
        .push_bind(i64::from(query.grouping.limit()));
    }
    sql
}

/// The plan Postgres chooses for `query` on the node behind `pool` (EXPLAIN, text), over
/// `slots` for a fleet query: what the index tests and operators look at.
pub async fn explain(pool: &PgPool, query: &Query, slots: &[i16]) -> Result<String, sqlx::Error> {
    let mut sql = if matches!(
        query.grouping,
        Grouping::Usage { .. } | Grouping::Tools { .. }
    ) {
        events_sql("EXPLAIN ", query)
    } else {
        conversations_sql("EXPLAIN ", query, slots)
    };
    let lines: Vec<String> = sql.build_query_scalar().fetch_all(pool).await?;
    Ok(lines.join("\n"))
}

/// When a time bucket's group key (epoch seconds as text) starts.
pub fn bucket_start(group: &str) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(group.parse().ok()?, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use convoy_proto::names::TeamId;

    #[test]
    fn team_queries_bind_every_value_and_fleet_queries_restrict_slots() {
        let query = Query {
            scope: Scope::Team(TeamId::parse("acme").unwrap()),
            start: DateTime::from_timestamp(0, 0).unwrap(),
            end: DateTime::from_timestamp(60, 0).unwrap(),
            intent: Some("debug"),
            status: None,
            require_complete: false,
            grouping: Grouping::TopMetadata {
                key: "project'; DROP TABLE conversations; --".into(),
                limit: 5,
            },
        };
        let sql = conversations_sql("", &query, &[]).into_sql();
        assert!(!sql.contains("DROP TABLE"), "{sql}");
        assert!(sql.contains("team_id = $"), "{sql}");
        assert!(sql.contains("LIMIT $"), "{sql}");
        let fleet = Query {
            scope: Scope::Fleet,
            grouping: Grouping::TopTeams { limit: 3 },
            ..query
        };
        assert!(
            conversations_sql("", &fleet, &[1, 2])
                .into_sql()
                .contains("slot = ANY($")
        );
    }

    #[test]
    fn bucket_groups_are_epoch_seconds() {
        assert_eq!(bucket_start("3600").unwrap().timestamp(), 3600);
        assert!(bucket_start("soon").is_none());
    }
}
