//! Query statistics against a real server: statements run through the store's pools are
//! counted with sane quantiles and exported per shard, a slow one gets its generic plan
//! captured after it has answered (never before, never by running it again), and the pools'
//! gauges and acquire waits are exported per node.
//!
//! Each test runs on one thread (tokio's current-thread runtime), so the subscriber and the
//! metrics recorder it sets for that thread see everything its tasks do.

use std::time::Duration;

use convoy_store::spans::db_span;
use convoy_store::{Node, PoolSettings, QueryStats, QueryStatsSettings, ShardMap, ShardPools};
use convoy_testkit::Postgres;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use serde_json::Value;
use sqlx::PgPool;
use tracing::Instrument;
use tracing_subscriber::prelude::*;

/// How long a test waits on the real server for something asynchronous.
const PATIENCE: Duration = Duration::from_secs(20);

struct Fixture {
    _pg: Postgres,
    stats: QueryStats,
    pools: ShardPools,
    _checks: Vec<tokio_util::task::AbortOnDropHandle<()>>,
}

/// A server behind pools whose statements (and slow ones' plans) go to fresh statistics,
/// with their checks (and planner) running.
async fn fixture(slow_threshold: Duration) -> Fixture {
    let pg = Postgres::start().await.unwrap();
    let stats = QueryStats::new(QueryStatsSettings {
        slow_threshold,
        ..QueryStatsSettings::default()
    });
    let pools = ShardPools::connect_lazy(
        ShardMap::evenly(&[pg.dsn()]).unwrap(),
        &PoolSettings {
            query_stats: stats.clone(),
            ..PoolSettings::default()
        },
    )
    .unwrap();
    let checks = pools.spawn_checks();
    Fixture {
        _pg: pg,
        stats,
        pools,
        _checks: checks,
    }
}

impl Fixture {
    fn pool(&self) -> &PgPool {
        self.pools.pool(0)
    }
}

/// One metric as recorded: name, labels, value.
type Recorded = (String, Vec<(String, String)>, DebugValue);

/// What the recorder holds now (taking a snapshot drains it: take one and read it all).
fn recorded(snapshotter: &Snapshotter) -> Vec<Recorded> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let labels = key
                .key()
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            (key.key().name().to_owned(), labels, value)
        })
        .collect()
}

/// The value of metric `name` with exactly `labels`.
fn find<'a>(all: &'a [Recorded], name: &str, labels: &[(&str, &str)]) -> Option<&'a DebugValue> {
    all.iter()
        .find(|(n, l, _)| {
            n == name
                && l.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(.., value)| value)
}

fn samples(value: Option<&DebugValue>) -> usize {
    match value {
        Some(DebugValue::Histogram(samples)) => samples.len(),
        _ => 0,
    }
}

fn gauge(value: Option<&DebugValue>) -> Option<f64> {
    match value {
        Some(DebugValue::Gauge(v)) => Some(v.0),
        _ => None,
    }
}

#[tokio::test]
async fn a_statement_run_n_times_counts_n_with_sane_quantiles_per_shard() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _metrics = metrics::set_default_local_recorder(&recorder);
    let f = fixture(Duration::from_secs(5)).await;
    let _logs = tracing::subscriber::set_default(
        tracing_subscriber::registry().with(convoy_store::query_stats::layer(f.stats.clone())),
    );

    let sql = "SELECT $1::int + 1 AS next,   'counted' AS why";
    for n in 0..40 {
        let next: i32 = sqlx::query_scalar(sql)
            .bind(n)
            .fetch_one(f.pool())
            .instrument(db_span("shard-0", Node::Primary))
            .await
            .unwrap();
        assert_eq!(next, n + 1);
    }

    let stats = f.stats.statement(sql).expect("the statement was seen");
    assert_eq!(stats.count, 40, "{stats:?}");
    assert_eq!(stats.sql, "SELECT $1::int + 1 AS next, 'counted' AS why");
    assert!(stats.label.starts_with("SELECT $1::int + 1 #"), "{stats:?}");
    assert!(Duration::ZERO < stats.p50, "{stats:?}");
    assert!(
        stats.p50 <= stats.p95 && stats.p95 <= stats.p99,
        "{stats:?}"
    );
    // The sketch's 1% relative error may put p99 a hair above the max.
    assert!(
        stats.p99.as_secs_f64() <= stats.max.as_secs_f64() * 1.02,
        "{stats:?}"
    );
    // Under the 5 s threshold: none slow.
    assert_eq!(stats.slow, 0);

    let all = recorded(&snapshotter);
    let durations = find(
        &all,
        convoy_store::query_stats::STATEMENT_DURATION,
        &[("statement", &stats.label), ("shard", "shard-0")],
    );
    assert_eq!(samples(durations), 40);
    // Every acquire (one per query) was timed, on the node the span names.
    let waits = find(
        &all,
        convoy_store::pool_metrics::POOL_ACQUIRE_DURATION,
        &[("shard", "shard-0"), ("node", "primary")],
    );
    assert!(samples(waits) >= 40, "{} acquires timed", samples(waits));
}

#[tokio::test]
async fn pools_export_their_connections_per_node() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _metrics = metrics::set_default_local_recorder(&recorder);
    let f = fixture(Duration::from_secs(5)).await;

    // Hold two connections; the checks sample the pool at every interval (250 ms).
    let held = (
        f.pool().acquire().await.unwrap(),
        f.pool().acquire().await.unwrap(),
    );
    let expected = |all: &[Recorded]| {
        let shard = [("shard", "shard-0"), ("node", "primary")];
        let connections = |state| {
            let labels = [shard[0], shard[1], ("state", state)];
            gauge(find(
                all,
                convoy_store::pool_metrics::POOL_CONNECTIONS,
                &labels,
            ))
        };
        let max = find(
            all,
            convoy_store::pool_metrics::POOL_MAX_CONNECTIONS,
            &shard,
        );
        connections("in_use") >= Some(2.0)
            && connections("idle").is_some()
            && gauge(max) == Some(16.0)
    };
    tokio::time::timeout(PATIENCE, async {
        while !expected(&recorded(&snapshotter)) {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
    .await
    .expect("the gauges show the held connections and the pool's maximum");
    drop(held);
}

#[tokio::test]
async fn a_slow_statement_gets_its_plan_after_it_has_answered() {
    let f = fixture(Duration::from_millis(50)).await;
    let _logs = tracing::subscriber::set_default(
        tracing_subscriber::registry().with(convoy_store::query_stats::layer(f.stats.clone())),
    );

    let sql = "SELECT 'slept' AS what FROM pg_sleep($1)";
    let what: String = sqlx::query_scalar(sql)
        .bind(0.2_f64)
        .fetch_one(f.pool())
        .instrument(db_span("shard-0", Node::Primary))
        .await
        .unwrap();
    assert_eq!(what, "slept");
    // Nothing ran between the answer and here (one thread): had the plan been captured
    // on the statement's path, it would be here already.
    assert!(
        f.stats.plan(sql).is_none(),
        "the plan is captured after the answer, not before"
    );

    let captured = tokio::time::timeout(PATIENCE, f.stats.wait_for_plan(sql))
        .await
        .expect("a plan is captured");
    assert_eq!(captured.shard, "shard-0");
    assert!(captured.elapsed >= Duration::from_millis(200));
    let text = captured.plan.to_string();
    let parsed: Value = serde_json::from_str(&text).unwrap();
    let plan = &parsed[0]["Plan"];
    assert!(plan.is_object(), "a Plan node: {parsed}");
    assert_eq!(plan["Node Type"], "Function Scan", "{parsed}");
    let stats = f.stats.statement(sql).unwrap();
    assert_eq!((stats.count, stats.slow), (1, 1));
}

#[tokio::test]
async fn capturing_a_plan_never_executes_the_statement() {
    let f = fixture(Duration::from_millis(50)).await;
    let _logs = tracing::subscriber::set_default(
        tracing_subscriber::registry().with(convoy_store::query_stats::layer(f.stats.clone())),
    );
    sqlx::query("CREATE TABLE notes (id int PRIMARY KEY, note text NOT NULL)")
        .execute(f.pool())
        .await
        .unwrap();
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM notes")
            .fetch_one(f.pool())
            .await
            .unwrap()
    };

    // EXPLAIN of a write, directly: a plan, no row.
    let insert = "INSERT INTO notes (id, note) VALUES ($1, $2)";
    let plan = convoy_store::plans::explain_generic(&f.pool().connect_options(), insert)
        .await
        .unwrap();
    assert_eq!(plan[0]["Plan"]["Node Type"], "ModifyTable", "{plan}");
    assert_eq!(plan[0]["Plan"]["Operation"], "Insert", "{plan}");
    assert_eq!(count().await, 0, "planning inserted nothing");

    // A slow write through the pools: it runs once (its own row), its plan is captured,
    // and the capture adds nothing.
    let slow_insert = "INSERT INTO notes (id, note) SELECT $1, 'slow' FROM pg_sleep($2)";
    sqlx::query(slow_insert)
        .bind(7)
        .bind(0.1_f64)
        .execute(f.pool())
        .instrument(db_span("shard-0", Node::Primary))
        .await
        .unwrap();
    let captured = tokio::time::timeout(PATIENCE, f.stats.wait_for_plan(slow_insert))
        .await
        .expect("a plan is captured");
    assert_eq!(captured.plan[0]["Plan"]["Operation"], "Insert");
    assert_eq!(count().await, 1, "only the statement's own row");

    // A text holding two commands is refused whole, not half run.
    let two = "SELECT 1; INSERT INTO notes (id, note) VALUES (99, 'smuggled')";
    assert!(
        convoy_store::plans::explain_generic(&f.pool().connect_options(), two)
            .await
            .is_err()
    );
    assert_eq!(count().await, 1);
}
