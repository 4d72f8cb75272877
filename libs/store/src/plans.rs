//! Slow statements' plans, captured off the request path: [`crate::query_stats`] queues a
//! request when a statement runs slow (at most one per statement per interval, into a
//! small queue per shard, dropped when full), and each shard's planner task, owned by the
//! pools' background checks ([`ShardPools::spawn_checks`](crate::ShardPools::spawn_checks)),
//! asks the shard's primary for the statement's generic plan on a connection of its own and
//! logs the slow statement with it (`tracing::warn!`).
//!
//! The plan is Postgres' generic plan, the one a prepared statement gets whatever its
//! arguments: PostgreSQL 15 has no `EXPLAIN (GENERIC_PLAN)` (16 does), so the statement is
//! prepared with `plan_cache_mode = force_generic_plan` and explained as executed with one
//! NULL per parameter ([`explain_generic`]). The values never matter to a generic plan.
//!
//! Never `EXPLAIN ANALYZE`: that would run the statement, writes included. Plain `EXPLAIN`
//! plans without executing, and it runs inside a `READ ONLY` transaction that is rolled
//! back, so even a mistake here could not write. Each command is sent as one extended-
//! protocol statement, which Postgres refuses to split, so a statement text holding several
//! commands fails to prepare instead of running its second half.
//!
//! Not here: deciding what is slow, or rate-limiting (both in [`crate::query_stats`]).

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection, PgPool};
use tokio::sync::mpsc;

use crate::query_stats::{QueryStats, Statement};

/// The name the statement is prepared under, on the planner's own connection.
const PREPARED: &str = "convoy_generic_plan";

/// Longest a plan capture may take on the server (`statement_timeout`), and at all on the
/// client. 2 s: planning takes milliseconds; anything longer is waiting on something.
const PLAN_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest wait for a lock while planning (`lock_timeout`). 200 ms: planning takes the
/// statement's table locks, and must not queue behind (and in front of) a migration's.
const LOCK_TIMEOUT: Duration = Duration::from_millis(200);

/// The planner's connection is closed after this long without a request. 60 s: slow
/// statements come in bursts; a shard with none holds no extra backend.
const IDLE_CLOSE: Duration = Duration::from_secs(60);

/// A slow run of a statement whose plan is wanted.
pub(crate) struct PlanRequest {
    pub(crate) statement: Arc<Statement>,
    pub(crate) elapsed: Duration,
}

/// A statement's generic plan, captured after a slow run.
#[derive(Clone, Debug, PartialEq)]
pub struct CapturedPlan {
    /// The statement's label.
    pub statement: String,
    /// The shard it ran slow on, where it was planned.
    pub shard: String,
    /// How long that run took.
    pub elapsed: Duration,
    /// `EXPLAIN (FORMAT JSON)`'s answer: an array holding one object with a `"Plan"`.
    pub plan: Value,
}

/// The generic plan of `sql` (a statement with `$n` parameters) on the server behind
/// `options`, asked for on a connection of its own, in a read-only transaction rolled back;
/// the statement is never executed. Fails when the statement cannot be prepared (a utility
/// command such as `BEGIN`, a parameter whose type Postgres cannot infer, several commands).
pub async fn explain_generic(options: &PgConnectOptions, sql: &str) -> Result<Value, sqlx::Error> {
    let mut conn = options
        .clone()
        .disable_statement_logging()
        .connect()
        .await?;
    let plan = explain_on(&mut conn, sql).await;
    let _ = conn.close().await;
    plan
}

/// [`explain_generic`] on `conn`. On error the session may hold an open transaction or the
/// prepared statement: close it.
async fn explain_on(conn: &mut PgConnection, sql: &str) -> Result<Value, sqlx::Error> {
    let sql = sql.trim().trim_end_matches(';').trim_end();
    let parameters = placeholders(sql);
    let arguments = if parameters == 0 {
        String::new()
    } else {
        format!("({})", vec!["NULL"; parameters].join(", "))
    };
    for command in [
        "BEGIN READ ONLY".to_owned(),
        format!("SET LOCAL statement_timeout = {}", PLAN_TIMEOUT.as_millis()),
        format!("SET LOCAL lock_timeout = {}", LOCK_TIMEOUT.as_millis()),
        "SET LOCAL plan_cache_mode = force_generic_plan".to_owned(),
        format!("PREPARE {PREPARED} AS {sql}"),
    ] {
        sqlx::query(&command)
            .persistent(false)
            .execute(&mut *conn)
            .await?;
    }
    let plan: Value = sqlx::query_scalar(&format!(
        "EXPLAIN (FORMAT JSON) EXECUTE {PREPARED}{arguments}"
    ))
    .persistent(false)
    .fetch_one(&mut *conn)
    .await?;
    for command in [format!("DEALLOCATE {PREPARED}"), "ROLLBACK".to_owned()] {
        sqlx::query(&command)
            .persistent(false)
            .execute(&mut *conn)
            .await?;
    }
    Ok(plan)
}

/// The highest `$n` placeholder in `sql`, outside quoted literals, quoted identifiers and
/// comments: how many parameters the statement takes.
pub fn placeholders(sql: &str) -> usize {
    let bytes = sql.as_bytes();
    let mut highest = 0;
    let mut i = 0;
    while i < bytes.len() {
        let skip_to = |from: usize, end: &[u8]| {
            bytes[from..]
                .windows(end.len())
                .position(|w| w == end)
                .map_or(bytes.len(), |at| from + at + end.len())
        };
        i = match bytes[i] {
            b'\'' => skip_to(i + 1, b"'"),
            b'"' => skip_to(i + 1, b"\""),
            b'-' if bytes.get(i + 1) == Some(&b'-') => skip_to(i + 2, b"\n"),
            b'/' if bytes.get(i + 1) == Some(&b'*') => skip_to(i + 2, b"*/"),
            b'$' => {
                let digits = bytes[i + 1..]
                    .iter()
                    .take_while(|b| b.is_ascii_digit())
                    .count();
                // `a$1` is an identifier, not a parameter.
                let in_word =
                    i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
                if digits > 0 && !in_word {
                    let n: usize = sql[i + 1..i + 1 + digits].parse().unwrap_or(0);
                    highest = highest.max(n);
                }
                i + 1 + digits
            }
            _ => i + 1,
        };
    }
    highest
}

/// Shard `shard`'s planner: captures the plan of each slow statement queued for it on the
/// primary behind `primary` (on a connection of its own, opened on demand and closed when
/// idle), logs the statement with it, and keeps it in `stats`. Runs until the queue is
/// replaced or its task is dropped.
pub(crate) async fn capture(
    stats: QueryStats,
    shard: String,
    mut requests: mpsc::Receiver<PlanRequest>,
    primary: PgPool,
) {
    let options = (*primary.connect_options())
        .clone()
        .disable_statement_logging();
    drop(primary);
    let mut conn: Option<PgConnection> = None;
    loop {
        let request = match conn.take() {
            Some(open) => match tokio::time::timeout(IDLE_CLOSE, requests.recv()).await {
                Ok(request) => {
                    conn = Some(open);
                    request
                }
                Err(_) => {
                    let _ = tokio::time::timeout(PLAN_TIMEOUT, open.close()).await;
                    continue;
                }
            },
            None => requests.recv().await,
        };
        let Some(request) = request else {
            if let Some(open) = conn.take() {
                let _ = tokio::time::timeout(PLAN_TIMEOUT, open.close()).await;
            }
            return;
        };
        let statement = &request.statement;
        let elapsed_ms = request.elapsed.as_secs_f64() * 1e3;
        let slow_runs = statement.slow.load(std::sync::atomic::Ordering::Relaxed);
        let attempt = async {
            let open = match conn.as_mut() {
                Some(open) => open,
                None => conn.insert(options.connect().await?),
            };
            explain_on(open, &statement.sql).await
        };
        let outcome = tokio::time::timeout(PLAN_TIMEOUT, attempt).await;
        let why = match outcome {
            Ok(Ok(plan)) => {
                tracing::warn!(
                    shard,
                    statement = %statement.label,
                    elapsed_ms,
                    slow_runs,
                    plan = %plan,
                    "slow statement (its generic plan attached)"
                );
                stats.store_plan(
                    statement,
                    CapturedPlan {
                        statement: statement.label.to_string(),
                        shard: shard.clone(),
                        elapsed: request.elapsed,
                        plan,
                    },
                );
                continue;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no plan within {PLAN_TIMEOUT:?}"),
        };
        // Its session may hold the transaction or the prepared statement: start afresh.
        if let Some(open) = conn.take() {
            let _ = tokio::time::timeout(PLAN_TIMEOUT, open.close()).await;
        }
        tracing::warn!(
            shard,
            statement = %statement.label,
            elapsed_ms,
            slow_runs,
            plan_error = %why,
            "slow statement (its plan could not be captured)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_count_the_highest_parameter_outside_literals_and_comments() {
        assert_eq!(placeholders("SELECT 1"), 0);
        assert_eq!(placeholders("SELECT $2, $1"), 2);
        assert_eq!(placeholders("SELECT $1 WHERE a = $12"), 12);
        assert_eq!(
            placeholders("SELECT '$3', \"$4\", x$5 FROM t WHERE a = $1"),
            1
        );
        assert_eq!(placeholders("SELECT 1 -- $9\n, $2 /* $8 */"), 2);
        assert_eq!(placeholders("SELECT 'it''s $7' || $1"), 1);
    }
}
