//! Starts each kind of test server for real and checks that it answers, stops
//! and restarts. Not a test of PostgreSQL, Redis or etcd themselves.

use std::time::Duration;

use convoy_testkit::{Etcd, Postgres, Redis, etcd_is_healthy, redis_answers_ping};
use tokio::net::TcpStream;

async fn accepts(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).await.is_ok()
}

#[tokio::test]
async fn two_postgres_shards_start_stop_and_restart() {
    let mut shards = convoy_testkit::start_postgres_shards(2)
        .await
        .expect("start shards");
    assert_eq!(shards.len(), 2);
    assert_ne!(shards[0].port(), shards[1].port());
    for pg in &shards {
        assert!(
            accepts(pg.port()).await,
            "postgres on {} refuses connections",
            pg.port()
        );
        assert_eq!(
            pg.dsn(),
            format!("postgres://postgres@127.0.0.1:{}/convoy", pg.port())
        );
        assert!(pg.dsn_for("other").ends_with("/other"));
        assert!(pg.is_running());
    }

    let pg = &mut shards[0];
    pg.stop().await.expect("stop");
    assert!(!pg.is_running());
    assert!(
        !accepts(pg.port()).await,
        "stopped postgres still accepts connections"
    );
    pg.restart().await.expect("restart");
    assert!(
        accepts(pg.port()).await,
        "restarted postgres refuses connections"
    );
    // The data survived: the convoy database is still there.
    pg.create_database("another")
        .await
        .expect("create database after restart");

    let dir = shards[1].data_dir().to_path_buf();
    drop(shards);
    assert!(!dir.exists(), "data dir {} left behind", dir.display());
}

#[tokio::test]
async fn postgres_takes_extra_settings() {
    let pg = Postgres::start_with(&["wal_level = replica", "max_wal_senders = 4"])
        .await
        .expect("start with settings");
    let conf = std::fs::read_to_string(pg.data_dir().join("postgresql.conf")).expect("conf");
    assert!(conf.contains("wal_level = replica"));
    assert!(accepts(pg.port()).await);
}

#[tokio::test]
async fn redis_answers_ping_and_restarts() {
    let mut redis = Redis::start().await.expect("start redis");
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}", redis.port()));
    assert!(redis_answers_ping(redis.port()).await);

    redis.stop().await.expect("stop");
    assert!(
        !accepts(redis.port()).await,
        "stopped redis still accepts connections"
    );
    redis.restart().await.expect("restart");
    assert!(redis_answers_ping(redis.port()).await);
}

#[tokio::test]
async fn etcd_is_healthy_and_survives_restart() {
    let mut etcd = Etcd::start().await.expect("start etcd");
    assert_eq!(etcd.endpoint(), format!("http://127.0.0.1:{}", etcd.port()));
    assert!(etcd_is_healthy(etcd.port()).await);

    etcd.stop().await.expect("stop");
    assert!(!etcd.is_running());
    assert!(
        !accepts(etcd.port()).await,
        "stopped etcd still accepts connections"
    );
    etcd.restart().await.expect("restart");
    assert!(etcd_is_healthy(etcd.port()).await);
}

#[tokio::test]
async fn servers_are_killed_on_drop() {
    let redis = Redis::start().await.expect("start redis");
    let port = redis.port();
    drop(redis);
    // SIGKILL is sent on drop; give the kernel a moment to close the socket.
    for _ in 0..40 {
        if !accepts(port).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("redis on {port} still accepts connections after drop");
}

#[tokio::test]
async fn postgres_start_failure_shows_the_log() {
    let err = Postgres::start_with(&["no_such_setting = 1"])
        .await
        .expect_err("a bad setting must stop postgres from starting");
    let text = err.to_string();
    assert!(
        matches!(err, convoy_testkit::Error::StartFailed { .. }),
        "{text}"
    );
    assert!(
        text.contains("no_such_setting"),
        "log tail missing from: {text}"
    );
}

#[tokio::test]
async fn a_replica_streams_the_primarys_writes_and_refuses_its_own() {
    let primary = Postgres::start().await.expect("start primary");
    let replica = primary.start_replica().await.expect("start replica");
    assert_ne!(primary.port(), replica.port());
    let on_primary = sqlx::PgPool::connect(&primary.dsn()).await.unwrap();
    let on_replica = sqlx::PgPool::connect(&replica.dsn()).await.unwrap();
    let in_recovery: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()")
        .fetch_one(&on_replica)
        .await
        .unwrap();
    assert!(in_recovery, "the replica is a standby");

    sqlx::query("CREATE TABLE t (v int)")
        .execute(&on_primary)
        .await
        .unwrap();
    sqlx::query("INSERT INTO t VALUES (1)")
        .execute(&on_primary)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let seen: Option<i64> = sqlx::query_scalar("SELECT count(*) FROM t")
                .fetch_one(&on_replica)
                .await
                .ok();
            if seen == Some(1) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the write reaches the replica");
    let refused = sqlx::query("INSERT INTO t VALUES (2)")
        .execute(&on_replica)
        .await;
    assert!(refused.is_err(), "a standby is read-only");
}
