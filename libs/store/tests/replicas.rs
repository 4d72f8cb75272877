//! Replica checks against a real primary and streaming replica: lag is measured, a replica
//! that has not replayed a token's position gets no read needing it, a paused replica stops
//! getting reads once it lags past the bound, and a dead one is banned, then readmitted.

use std::time::Duration;

use convoy_store::replicas::commit_lsn;
use convoy_store::{Node, PoolSettings, ReplicaSettings, ShardMap, ShardPools};
use convoy_testkit::Postgres;

fn settings() -> PoolSettings {
    PoolSettings {
        replicas: ReplicaSettings {
            max_lag: Duration::from_millis(300),
            // Only the lag bound counts: a single replica is not kept eligible past it.
            keep_least_lagged: 0,
            check_interval: Duration::from_millis(50),
            min_ban: Duration::from_millis(200),
            max_ban: Duration::from_millis(400),
            ..ReplicaSettings::default()
        },
        ..PoolSettings::default()
    }
}

fn map(primary: &Postgres, replica: &Postgres) -> ShardMap {
    ShardMap::from_toml(&format!(
        r#"
        epoch = 1
        [[shards]]
        id = "shard-0"
        primary = "{}"
        replicas = ["{}"]
        slots = ["0-1023"]
        "#,
        primary.dsn(),
        replica.dsn()
    ))
    .unwrap()
}

/// Waits (at most 10 s) until `what` holds of the shard's target for `min_lsn`.
async fn until(pools: &ShardPools, min_lsn: u64, want: Node) {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if pools.read_target(0, min_lsn).0 == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("reads needing {min_lsn} never went to {want:?}"));
}

#[tokio::test]
async fn reads_follow_replay_position_lag_and_health() {
    let primary = Postgres::start().await.unwrap();
    let mut replica = primary.start_replica().await.unwrap();
    let pools = ShardPools::connect_lazy(map(&primary, &replica), &settings()).unwrap();
    let checks = tokio::spawn(pools.clone().check_replicas(0));
    let writer = pools.pool(0).clone();
    sqlx::query("CREATE TABLE t (v int)")
        .execute(&writer)
        .await
        .unwrap();

    // Caught up: ordinary reads and reads with the latest token go to the replica.
    sqlx::query("INSERT INTO t VALUES (1)")
        .execute(&writer)
        .await
        .unwrap();
    let token = commit_lsn(&writer).await.unwrap();
    until(&pools, token, Node::Replica(0)).await;
    let on_replica: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
        .fetch_one(pools.read_target(0, token).1)
        .await
        .unwrap();
    assert_eq!(on_replica, 1, "a read with the token sees the write");

    // Replay paused: a newer token's reads go to the primary at once; ordinary reads too,
    // once the lag passes the bound.
    let standby = sqlx::PgPool::connect(&replica.dsn()).await.unwrap();
    sqlx::query("SELECT pg_wal_replay_pause()")
        .execute(&standby)
        .await
        .unwrap();
    sqlx::query("INSERT INTO t VALUES (2)")
        .execute(&writer)
        .await
        .unwrap();
    let newer = commit_lsn(&writer).await.unwrap();
    for _ in 0..20 {
        assert_eq!(pools.read_target(0, newer).0, Node::Primary);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Keep WAL coming so the lag, in time, grows past the bound.
    let filler = tokio::spawn({
        let writer = writer.clone();
        async move {
            loop {
                let _ = sqlx::query("INSERT INTO t VALUES (3)")
                    .execute(&writer)
                    .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    until(&pools, 0, Node::Primary).await;
    let health = &pools.replicas(0).health()[0];
    // Routing reads the lag as it may be by now (measured lag plus the time since).
    assert!(
        health.lag_bytes > 0
            && health.lag_now(std::time::Instant::now()) > Duration::from_millis(300),
        "{health:?}"
    );
    sqlx::query("SELECT pg_wal_replay_resume()")
        .execute(&standby)
        .await
        .unwrap();
    until(&pools, newer, Node::Replica(0)).await;
    filler.abort();
    standby.close().await;

    // Dead: banned (reads go to the primary); back: readmitted.
    replica.stop().await.unwrap();
    until(&pools, 0, Node::Primary).await;
    let health = &pools.replicas(0).health()[0];
    assert!(!health.healthy && health.failures > 0, "{health:?}");
    replica.restart().await.unwrap();
    until(&pools, 0, Node::Replica(0)).await;
    checks.abort();
}
