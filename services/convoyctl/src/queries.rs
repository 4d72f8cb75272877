//! `convoyctl queries`: where each shard's database time goes, from Postgres' own
//! statistics: the slowest statements (`pg_stat_statements`: calls, mean, max and total
//! time, rows) and sequential scans of large tables (`pg_stat_user_tables`), per shard.
//! Both count from the statistics' last reset, across every client of the database.
//!
//! Each statement carries the fingerprint the services label their own statement metrics
//! with (`convoy_db_statement_duration_seconds{statement="SELECT ... #1f2e3d4c"}`), so a
//! row here can be found on a dashboard; it matches for statements without literal
//! constants, which `pg_stat_statements` rewrites to parameters.
//!
//! Not here: the services' in-process view of their statements
//! (`convoy_store::query_stats`), or any change to a shard: this only reads.

use std::str::FromStr;
use std::time::Duration;

use convoy_discovery::EtcdConfig;
use convoy_discovery::shard_map::ShardMapStore;
use convoy_store::ShardMap;
use convoy_store::query_stats::{collapse, statement_id};
use convoy_store::shard_map::redact_dsn;
use futures::future::join_all;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};

/// How long connecting to one shard may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest statement text shown, in characters.
const STATEMENT_WIDTH: usize = 100;

/// How statements are ranked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Ranking {
    /// By mean time per call: the statements each request waits longest on.
    #[default]
    Mean,
    /// By total time: the statements the shard spends most time on.
    Total,
}

/// What to show.
#[derive(Clone, Debug)]
pub struct QueriesOptions {
    /// Statements shown per shard.
    pub top: u32,
    /// How they are ranked.
    pub by: Ranking,
    /// Sequential scans are shown for tables with at least this many live rows.
    pub min_rows: i64,
}

/// A shard to inspect: its id and its primary's DSN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The shard's id.
    pub shard: String,
    /// Its primary's DSN.
    pub dsn: String,
}

/// Every shard of the map stored in etcd (what the services follow).
pub async fn targets_from_etcd(etcd: &EtcdConfig) -> anyhow::Result<Vec<Target>> {
    let store = ShardMapStore::connect(etcd).await?;
    let stored = store.load().await?.ok_or_else(|| {
        anyhow::anyhow!(
            "no shard map in etcd at {}: is a shard-router running? Or name the shards with --shard-dsn",
            etcd.endpoints.join(",")
        )
    })?;
    Ok(targets_of(&stored.map))
}

/// The shards `--shard-dsn` names, in order, with the ids the services give them
/// (`shard-0`, `shard-1`, ...).
pub fn targets_from_dsns(dsns: &[String]) -> anyhow::Result<Vec<Target>> {
    Ok(targets_of(&ShardMap::evenly(dsns)?))
}

fn targets_of(map: &ShardMap) -> Vec<Target> {
    map.shards()
        .iter()
        .map(|shard| Target {
            shard: shard.id.to_string(),
            dsn: shard.primary.clone(),
        })
        .collect()
}

/// One statement as `pg_stat_statements` counts it.
#[derive(Clone, Debug, PartialEq)]
pub struct StatementRow {
    /// Its text, as `pg_stat_statements` normalized it.
    pub query: String,
    /// Times run.
    pub calls: i64,
    /// Mean execution time, milliseconds.
    pub mean_ms: f64,
    /// Longest execution time, milliseconds.
    pub max_ms: f64,
    /// Total execution time, milliseconds.
    pub total_ms: f64,
    /// Rows returned or affected, in all.
    pub rows: i64,
}

/// One table's scans, as `pg_stat_user_tables` counts them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqScanRow {
    /// `schema.table`.
    pub table: String,
    /// Sequential scans started.
    pub seq_scan: i64,
    /// Rows those scans read.
    pub seq_tup_read: i64,
    /// Index scans started (`None`: the table has no index).
    pub idx_scan: Option<i64>,
    /// Live rows, estimated.
    pub live_rows: i64,
}

/// One shard's answer; each part is the rows, or what prevented them.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardQueries {
    /// The shard's id.
    pub shard: String,
    /// Its slowest statements.
    pub statements: Result<Vec<StatementRow>, String>,
    /// Its sequentially scanned large tables.
    pub seq_scans: Result<Vec<SeqScanRow>, String>,
}

/// Reads every target's statistics, concurrently.
pub async fn queries(targets: &[Target], options: &QueriesOptions) -> Vec<ShardQueries> {
    join_all(targets.iter().map(|target| inspect(target, options))).await
}

async fn inspect(target: &Target, options: &QueriesOptions) -> ShardQueries {
    let unreachable = |why: String| ShardQueries {
        shard: target.shard.clone(),
        statements: Err(why.clone()),
        seq_scans: Err(why),
    };
    let mut conn = match connect(&target.dsn).await {
        Ok(conn) => conn,
        Err(why) => return unreachable(why),
    };
    let statements = slowest(&mut conn, options).await;
    let seq_scans = seq_scans(&mut conn, options)
        .await
        .map_err(|e| format!("reading pg_stat_user_tables failed: {e}"));
    let _ = conn.close().await;
    ShardQueries {
        shard: target.shard.clone(),
        statements,
        seq_scans,
    }
}

async fn connect(dsn: &str) -> Result<PgConnection, String> {
    let unreachable = |why: String| format!("unreachable at {}: {why}", redact_dsn(dsn));
    let options = PgConnectOptions::from_str(dsn)
        .map_err(|e| unreachable(e.to_string()))?
        .application_name("convoyctl")
        .disable_statement_logging();
    match tokio::time::timeout(CONNECT_TIMEOUT, options.connect()).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(unreachable(e.to_string())),
        Err(_) => Err(unreachable(format!(
            "no connection within {CONNECT_TIMEOUT:?}"
        ))),
    }
}

/// The statements of the connected database, `pg_stat_statements`'s own queries left out,
/// ranked by `column` (a [`Ranking`]'s, never a user's text).
fn top_statements(column: &str) -> String {
    format!(
        "SELECT query, calls, total_exec_time, mean_exec_time, max_exec_time, rows \
         FROM pg_stat_statements \
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND query NOT ILIKE '%pg_stat_statements%' \
         ORDER BY {column} DESC LIMIT $1"
    )
}

/// The top statements, or how to enable `pg_stat_statements` where it is missing.
async fn slowest(
    conn: &mut PgConnection,
    options: &QueriesOptions,
) -> Result<Vec<StatementRow>, String> {
    let (database, installed): (String, bool) = sqlx::query_as(
        "SELECT current_database()::text, \
                EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements')",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| format!("reading pg_extension failed: {e}"))?;
    let enable = format!(
        "set shared_preload_libraries = 'pg_stat_statements' in postgresql.conf, restart the \
         server, then run CREATE EXTENSION pg_stat_statements; in database {database} as a \
         superuser"
    );
    if !installed {
        return Err(format!(
            "pg_stat_statements is not installed in database {database}: to enable it, {enable} \
             (the preload may already be there)"
        ));
    }
    let sql = top_statements(match options.by {
        Ranking::Mean => "mean_exec_time",
        Ranking::Total => "total_exec_time",
    });
    let rows: Vec<(String, i64, f64, f64, f64, i64)> = sqlx::query_as(&sql)
        .bind(i64::from(options.top))
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| match &e {
            // 55000 object_not_in_prerequisite_state: created, but the library is not loaded.
            sqlx::Error::Database(db) if db.code().as_deref() == Some("55000") => format!(
                "pg_stat_statements is installed in database {database} but the server has not \
                 loaded it: {enable} (the extension is already created)"
            ),
            _ => format!("reading pg_stat_statements failed: {e}"),
        })?;
    Ok(rows
        .into_iter()
        .map(
            |(query, calls, total_ms, mean_ms, max_ms, rows)| StatementRow {
                query,
                calls,
                mean_ms,
                max_ms,
                total_ms,
                rows,
            },
        )
        .collect())
}

/// Tables of at least `min_rows` live rows that were scanned sequentially, most rows read
/// that way first.
async fn seq_scans(
    conn: &mut PgConnection,
    options: &QueriesOptions,
) -> Result<Vec<SeqScanRow>, sqlx::Error> {
    let rows: Vec<(String, i64, i64, Option<i64>, i64)> = sqlx::query_as(
        "SELECT schemaname || '.' || relname, seq_scan, seq_tup_read, idx_scan, n_live_tup \
         FROM pg_stat_user_tables \
         WHERE n_live_tup >= $1 AND seq_scan > 0 \
         ORDER BY seq_tup_read DESC LIMIT $2",
    )
    .bind(options.min_rows)
    .bind(i64::from(options.top))
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(table, seq_scan, seq_tup_read, idx_scan, live_rows)| SeqScanRow {
                table,
                seq_scan,
                seq_tup_read,
                idx_scan,
                live_rows,
            },
        )
        .collect())
}

fn millis(ms: f64) -> String {
    if ms < 1000.0 {
        format!("{ms:.3}ms")
    } else {
        format!("{:.2}s", ms / 1000.0)
    }
}

fn shorten(text: &str) -> String {
    let text = collapse(text);
    match text.char_indices().nth(STATEMENT_WIDTH) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// Renders both sections as aligned tables for a person, with each shard's problem (if
/// any) on a line of its own under the table.
pub fn render(shards: &[ShardQueries], options: &QueriesOptions) -> String {
    let ranking = match options.by {
        Ranking::Mean => "mean",
        Ranking::Total => "total",
    };
    let mut out = format!(
        "Slowest statements by {ranking} time, top {} per shard (pg_stat_statements)\n",
        options.top
    );
    let mut rows = Vec::new();
    let mut problems = String::new();
    for shard in shards {
        match &shard.statements {
            Ok(statements) => rows.extend(statements.iter().map(|s| {
                vec![
                    shard.shard.clone(),
                    s.calls.to_string(),
                    millis(s.mean_ms),
                    millis(s.max_ms),
                    millis(s.total_ms),
                    s.rows.to_string(),
                    statement_id(&s.query),
                    shorten(&s.query),
                ]
            })),
            Err(why) => problems.push_str(&format!("{}: {why}\n", shard.shard)),
        }
    }
    out.push_str(&crate::table::render(
        &[
            "SHARD",
            "CALLS",
            "MEAN",
            "MAX",
            "TOTAL",
            "ROWS",
            "ID",
            "STATEMENT",
        ],
        &rows,
    ));
    out.push_str(&problems);

    out.push_str(&format!(
        "\nSequential scans on tables of {} live rows or more (pg_stat_user_tables)\n",
        options.min_rows
    ));
    let mut rows = Vec::new();
    let mut problems = String::new();
    for shard in shards {
        match &shard.seq_scans {
            Ok(scans) => rows.extend(scans.iter().map(|s| {
                vec![
                    shard.shard.clone(),
                    s.table.clone(),
                    s.seq_scan.to_string(),
                    s.seq_tup_read.to_string(),
                    s.idx_scan.map_or_else(|| "-".to_owned(), |n| n.to_string()),
                    s.live_rows.to_string(),
                ]
            })),
            Err(why) => problems.push_str(&format!("{}: {why}\n", shard.shard)),
        }
    }
    out.push_str(&crate::table::render(
        &[
            "SHARD",
            "TABLE",
            "SEQ_SCAN",
            "SEQ_TUP_READ",
            "IDX_SCAN",
            "LIVE_ROWS",
        ],
        &rows,
    ));
    out.push_str(&problems);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_tables_are_aligned_with_each_shards_problem_below() {
        let options = QueriesOptions {
            top: 5,
            by: Ranking::Total,
            min_rows: 1000,
        };
        let shards = vec![
            ShardQueries {
                shard: "shard-0".into(),
                statements: Ok(vec![StatementRow {
                    query: "SELECT id\n  FROM conversations WHERE team_id = $1".into(),
                    calls: 12,
                    mean_ms: 0.25,
                    max_ms: 1500.0,
                    total_ms: 3.0,
                    rows: 12,
                }]),
                seq_scans: Ok(vec![SeqScanRow {
                    table: "public.conversations".into(),
                    seq_scan: 3,
                    seq_tup_read: 9000,
                    idx_scan: None,
                    live_rows: 3000,
                }]),
            },
            ShardQueries {
                shard: "shard-1".into(),
                statements: Err("pg_stat_statements is not installed".into()),
                seq_scans: Ok(Vec::new()),
            },
        ];
        let text = render(&shards, &options);
        let id = statement_id("SELECT id FROM conversations WHERE team_id = $1");
        assert!(
            text.starts_with("Slowest statements by total time, top 5"),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "shard-0  12     0.250ms  1.50s  3.000ms  12    {id}  SELECT id FROM conversations WHERE team_id = $1\n"
            )),
            "{text}"
        );
        assert!(
            text.contains("shard-1: pg_stat_statements is not installed\n"),
            "{text}"
        );
        assert!(
            text.contains("shard-0  public.conversations  3         9000          -         3000"),
            "{text}"
        );
    }
}
