//! Committed writes reach the invalidation bus through the outbox relay, even when the
//! instance that wrote them never relays.

use std::time::Duration;

use clap::Parser;
use convoy_cache::BusMessage;
use convoy_cache::l2::{L2, L2Config};
use convoy_integration_tests::{Fleet, new_conversation};
use convoy_proto::v1 as pb;
use convoy_testkit::Redis;

fn bytes_of(text: &str) -> bytes::Bytes {
    bytes::Bytes::from(text.to_owned())
}

/// Reads the bus until `done` holds (bounded); returns every message read.
async fn bus_until(bus: &L2, done: impl Fn(&[BusMessage]) -> bool) -> Vec<BusMessage> {
    let mut seen = Vec::new();
    let mut last = "0".to_owned();
    tokio::time::timeout(Duration::from_secs(10), async {
        while !done(&seen) {
            for received in bus.read_bus(&last, 1000).await.unwrap() {
                last = received.id.to_string();
                assert!(!received.is_malformed(), "{received:?}");
                // Relays' heartbeats aside.
                seen.extend(received.message);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the bus did not get there within 10 s: {seen:?}"));
    seen
}

#[tokio::test]
async fn committed_writes_reach_the_bus_with_their_versions() {
    let redis = Redis::start().await.unwrap();
    let fleet = Fleet::start_with(2, &["--redis-url", &redis.url()]).await;
    let mut client = fleet.client().await;
    let created = client
        .create_conversation(new_conversation("relayed", "t", ""))
        .await
        .unwrap()
        .into_inner();
    let updated = client
        .update_conversation(pb::UpdateConversationRequest {
            conversation: Some(pb::Conversation {
                name: created.name.clone(),
                title: "t2".into(),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .unwrap()
        .into_inner();

    let bus = L2::new(L2Config::new(redis.url())).unwrap();
    let seen = bus_until(&bus, |s| s.len() >= 2).await;
    let id = created.name.rsplit('/').next().unwrap();
    let key = format!("conv:relayed:{id}");
    let versions: Vec<i64> = seen
        .iter()
        .filter(|m| m.key == key)
        .map(|m| m.version.0)
        .collect();
    assert_eq!(versions, vec![created.version, updated.version]);
    assert!(
        seen.iter()
            .all(|m| m.tags == vec!["team:relayed".to_owned()])
    );

    // The relay also raised the key's floor in Redis: a fill from the first version is
    // refused there.
    let stale = convoy_cache::Entry {
        value: bytes_of("old"),
        version: convoy_cache::Version(created.version),
        tags: Vec::new(),
        ttl: Duration::from_secs(60),
    };
    assert_eq!(
        bus.set(&key, &stale).await.unwrap(),
        convoy_cache::SetOutcome::Stale
    );

    let shard = fleet.map.owner_of_team("relayed");
    let pool = fleet.shard_pool(shard).await;
    let unpublished: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(unpublished, 0, "published rows are marked");
}

#[tokio::test]
async fn writes_of_an_instance_that_never_relayed_are_published_by_another() {
    let redis = Redis::start().await.unwrap();
    // This instance has no Redis: like one killed between commit and publish, it leaves
    // its outbox rows unpublished.
    let fleet = Fleet::start(1).await;
    let mut client = fleet.client().await;
    let mut names = Vec::new();
    for i in 0..5 {
        names.push(
            client
                .create_conversation(new_conversation("orphaned", &format!("t{i}"), ""))
                .await
                .unwrap()
                .into_inner()
                .name,
        );
    }
    let bus = L2::new(L2Config::new(redis.url())).unwrap();
    assert!(bus.read_bus("0", 10).await.unwrap().is_empty());

    let _relaying = fleet.spawn_instance(&["--redis-url", &redis.url()]).await;
    let seen = bus_until(&bus, |s| s.len() >= 5).await;
    for name in &names {
        let id = name.rsplit('/').next().unwrap();
        assert!(
            seen.iter().any(|m| m.key == format!("conv:orphaned:{id}")),
            "{name} was never published"
        );
    }
}

#[tokio::test]
async fn published_outbox_rows_are_purged_and_unpublished_ones_kept() {
    let mut fleet = Fleet::start(1).await;
    let mut client = fleet.client().await;
    for i in 0..3 {
        client
            .create_conversation(new_conversation("purged", &format!("t{i}"), ""))
            .await
            .unwrap();
    }
    // The instance purges on its own schedule, first at start; stopped, it cannot take the
    // rows this test ages before the store under test sees them.
    fleet.stop_service().await;
    let pool = fleet.shard_pool(0).await;
    // Two rows were published two hours ago; one is still waiting for a relay.
    sqlx::query(
        "UPDATE outbox SET published_at = now() - interval '2 hours' \
         WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT 2)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let config = conversation::Config::try_parse_from([
        "conversation",
        "--shard-dsn",
        &fleet.shards[0].dsn(),
    ])
    .unwrap();
    let store = conversation::connect(&config).await.unwrap();
    assert_eq!(
        store
            .purge_published_outbox(Duration::from_secs(3600))
            .await
            .unwrap(),
        2
    );
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 1);
}

#[tokio::test]
async fn after_a_redis_restart_recent_invalidations_are_published_again() {
    // A restarted Redis may have lost invalidations whose rows are marked published (here
    // everything: the test Redis keeps nothing). The relay notices the new run id and
    // publishes the recent rows again.
    let mut redis = Redis::start().await.unwrap();
    let fleet = Fleet::start_with(1, &["--redis-url", &redis.url()]).await;
    let mut client = fleet.client().await;
    let created = client
        .create_conversation(new_conversation("restarted", "t", ""))
        .await
        .unwrap()
        .into_inner();
    let id = created.name.rsplit('/').next().unwrap().to_owned();
    let key = format!("conv:restarted:{id}");
    let bus = L2::new(L2Config::new(redis.url())).unwrap();
    bus_until(&bus, |s| s.iter().any(|m| m.key == key)).await;

    redis.restart().await.unwrap();
    let seen = bus_until(&bus, |s| s.iter().any(|m| m.key == key)).await;
    assert!(
        seen.iter().any(|m| m.key == key && m.version.0 == 1),
        "the create was published again to the restarted Redis: {seen:?}"
    );
}
