//! `convoyctl queries` against real servers: a statement run in the test shows with its
//! calls, a sequentially scanned table shows with its scans, and a shard without
//! `pg_stat_statements` (not created, or created but not loaded) says how to enable it.

use convoy_testkit::Postgres;
use sqlx::{Connection, PgConnection};

#[tokio::test]
async fn queries_lists_statements_and_seq_scanned_tables_and_says_how_to_enable_the_extension() {
    // shard-0: the extension preloaded (the testkit's default) and created.
    let pg = Postgres::start().await.unwrap();
    // shard-1: another database of the same server, where it is not created.
    pg.create_database("noext").await.unwrap();
    // shard-2: created, but the server does not load it.
    let unloaded = Postgres::start_with(&["shared_preload_libraries = ''"])
        .await
        .unwrap();

    let mut conn = PgConnection::connect(&unloaded.dsn()).await.unwrap();
    sqlx::query("CREATE EXTENSION pg_stat_statements")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();

    let mut conn = PgConnection::connect(&pg.dsn()).await.unwrap();
    for sql in [
        "CREATE EXTENSION pg_stat_statements",
        "CREATE TABLE big (id int NOT NULL, v text NOT NULL)",
        "INSERT INTO big SELECT i, 'v' || i FROM generate_series(1, 5000) AS i",
    ] {
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    }
    let statement = "SELECT count(*) FROM big WHERE v = $1";
    for _ in 0..3 {
        let n: i64 = sqlx::query_scalar(statement)
            .bind("v42")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(n, 1);
    }
    // Table statistics reach the shared view when this backend flushes them, which it does
    // before it answers its next command once asked to.
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("SELECT 1").execute(&mut conn).await.unwrap();

    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_convoyctl"))
        .env_remove("CONVOY_SHARD_DSNS")
        .args(["queries", "--top", "50", "--min-rows", "1000"])
        .args(["--shard-dsn", &pg.dsn()])
        .args(["--shard-dsn", &pg.dsn_for("noext")])
        .args(["--shard-dsn", &unloaded.dsn()])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let line = text
        .lines()
        .find(|line| line.ends_with(statement))
        .unwrap_or_else(|| panic!("the statement is listed:\n{text}"));
    let cells: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&cells[..2], ["shard-0", "3"], "3 calls on shard-0: {line}");
    let id = convoy_store::query_stats::statement_id(statement);
    assert!(
        line.contains(&id),
        "the metrics label's fingerprint {id}: {line}"
    );

    let scan = text
        .lines()
        .find(|line| line.starts_with("shard-0") && line.contains("public.big"))
        .unwrap_or_else(|| panic!("the seq-scanned table is listed:\n{text}"));
    let cells: Vec<&str> = scan.split_whitespace().collect();
    let seq_scans: i64 = cells[2].parse().unwrap();
    assert!(seq_scans >= 3, "{scan}");
    assert_eq!(
        cells[4..],
        ["-", "5000"],
        "no index, 5000 live rows: {scan}"
    );

    assert!(
        text.contains(
            "shard-1: pg_stat_statements is not installed in database noext: to enable it, set \
             shared_preload_libraries = 'pg_stat_statements'"
        ),
        "{text}"
    );
    assert!(
        text.contains("CREATE EXTENSION pg_stat_statements; in database noext as a superuser"),
        "{text}"
    );
    assert!(
        text.contains(
            "shard-2: pg_stat_statements is installed in database convoy but the server has not \
             loaded it"
        ),
        "{text}"
    );
}
