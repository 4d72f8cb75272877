//! The slot hash agrees with PostgreSQL's own hash partitioning, on a real server.

use convoy_store::{PoolSettings, SLOT_COUNT, ShardMap, ShardPools, Slot};
use convoy_testkit::Postgres;
use sqlx::{Connection, PgConnection};

fn teams() -> Vec<String> {
    let mut teams: Vec<String> = (0..2000).map(|i| format!("team-{i}")).collect();
    // Lengths 0..=40 exercise every tail length of the hash's 12-byte blocks.
    teams.extend((0..=40).map(|n| "x".repeat(n)));
    teams.extend(["acme".into(), "ünïcode-team".into()]);
    teams
}

#[tokio::test]
async fn slot_matches_postgres_hash_partition_routing() {
    let pg = Postgres::start().await.unwrap();
    let mut conn = PgConnection::connect(&pg.dsn()).await.unwrap();

    // A real table hash-partitioned by team into SLOT_COUNT partitions: Postgres' own routing
    // must put every row in the partition whose remainder is our slot.
    sqlx::query("CREATE TABLE placed (team text NOT NULL) PARTITION BY HASH (team)")
        .execute(&mut conn)
        .await
        .unwrap();
    for r in 0..SLOT_COUNT {
        let ddl = format!(
            "CREATE TABLE placed_{r} PARTITION OF placed FOR VALUES WITH (MODULUS {SLOT_COUNT}, REMAINDER {r})"
        );
        sqlx::query(&ddl).execute(&mut conn).await.unwrap();
    }
    let teams = teams();
    sqlx::query("INSERT INTO placed (team) SELECT unnest($1::text[])")
        .bind(&teams)
        .execute(&mut conn)
        .await
        .unwrap();
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT team, tableoid::regclass::text FROM placed")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(rows.len(), teams.len());
    for (team, partition) in rows {
        let slot = Slot::for_team(&team);
        assert_eq!(partition, format!("placed_{slot}"), "team {team:?}");
    }
}

#[tokio::test]
async fn schema_slot_column_agrees_with_the_router() {
    let pg = Postgres::start().await.unwrap();
    let pools = ShardPools::connect_lazy(
        ShardMap::evenly(&[pg.dsn()]).unwrap(),
        &PoolSettings::default(),
    )
    .unwrap();
    pools.migrate().await.unwrap();
    // Migrating twice is a no-op.
    pools.migrate().await.unwrap();

    let teams = teams();
    let slots: Vec<i16> = sqlx::query_scalar("SELECT convoy_slot(t) FROM unnest($1::text[]) AS t")
        .bind(&teams)
        .fetch_all(pools.pool(0))
        .await
        .unwrap();
    for (team, slot) in teams.iter().zip(slots) {
        assert_eq!(slot as u16, Slot::for_team(team).get(), "team {team:?}");
    }
}
