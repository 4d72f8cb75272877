//! The cache service over a real Redis: layers, versioned sets, leases, and coherence between
//! two instances through the invalidation bus.

use std::time::Duration;

use convoy_cache::BusMessage;
use convoy_cache::l2::{L2, L2Config};
use convoy_integration_tests::CacheInstance;
use convoy_proto::v1 as pb;
use convoy_proto::v1::cache_service_client::CacheServiceClient;
use convoy_testkit::Redis;
use tonic::transport::Channel;

/// Starts a cache instance over `redis`; returns it and a client of it. No relay runs
/// here to vouch for the bus with heartbeats, so the staleness check is off (it is tested
/// in `hostile_bus.rs`); invalidations are published by hand.
async fn instance(redis: &Redis) -> (CacheInstance, CacheServiceClient<Channel>) {
    let instance = CacheInstance::start(&redis.url(), &["--bus-stale-after-ms", "0"]).await;
    let client = instance.client().await;
    (instance, client)
}

fn entry(key: &str, version: i64) -> pb::CacheEntry {
    pb::CacheEntry {
        key: key.into(),
        value: format!("v{version}").into_bytes(),
        version,
        tags: vec!["team:acme".into()],
        ttl: Some(prost_types::Duration {
            seconds: 60,
            nanos: 0,
        }),
    }
}

async fn get(client: &mut CacheServiceClient<Channel>, key: &str) -> pb::CacheGetResponse {
    client
        .get(pb::CacheGetRequest {
            key: key.into(),
            min_version: 0,
            peek: false,
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn reads_come_from_l1_then_l2_and_stale_sets_are_refused() {
    let redis = Redis::start().await.unwrap();
    let (_a, mut a) = instance(&redis).await;
    let (_b, mut b) = instance(&redis).await;

    let stored = a
        .set(pb::CacheSetRequest {
            entry: Some(entry("conv:acme:1", 2)),
            lease_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.outcome, pb::SetOutcome::Stored as i32);
    assert_eq!(
        get(&mut a, "conv:acme:1").await.layer,
        pb::CacheLayer::L1 as i32
    );
    // Another instance finds it in Redis, then keeps it in its own L1.
    assert_eq!(
        get(&mut b, "conv:acme:1").await.layer,
        pb::CacheLayer::L2 as i32
    );
    assert_eq!(
        get(&mut b, "conv:acme:1").await.layer,
        pb::CacheLayer::L1 as i32
    );

    let stale = a
        .set(pb::CacheSetRequest {
            entry: Some(entry("conv:acme:1", 1)),
            lease_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stale.outcome, pb::SetOutcome::Stale as i32);

    let miss = get(&mut a, "conv:acme:404").await;
    assert!(miss.entry.is_none());
    let stats = a
        .stats(pb::CacheStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((stats.l1_hits, stats.misses), (1, 1));
    assert!(stats.l2_healthy);

    let status = a
        .get(pb::CacheGetRequest {
            key: String::new(),
            min_version: 0,
            peek: false,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn a_write_published_on_the_bus_empties_every_instances_l1() {
    let redis = Redis::start().await.unwrap();
    let (_a, mut a) = instance(&redis).await;
    let (_b, mut b) = instance(&redis).await;
    a.set(pb::CacheSetRequest {
        entry: Some(entry("conv:acme:7", 1)),
        lease_token: String::new(),
    })
    .await
    .unwrap();
    get(&mut b, "conv:acme:7").await; // now in b's L1 too

    // What the conversation service's relay does for a write that made version 2: drop
    // Redis's copy (raising its floor), then publish on the bus for every L1.
    let l2 = L2::new(L2Config::new(redis.url())).unwrap();
    l2.invalidate("conv:acme:7", convoy_cache::Version(2))
        .await
        .unwrap();
    l2.publish(&[BusMessage {
        shard: "shard-0".into(),
        outbox_id: 1,
        key: "conv:acme:7".into(),
        version: convoy_cache::Version(2),
        tags: vec![],
        kind: "updated".into(),
        written_at_us: 0,
    }])
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let (ra, rb) = (
                get(&mut a, "conv:acme:7").await,
                get(&mut b, "conv:acme:7").await,
            );
            if ra.entry.is_none() && rb.entry.is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("both L1s drop the entry");
    // And a fill from the old row is refused by both layers.
    let refused = b
        .set(pb::CacheSetRequest {
            entry: Some(entry("conv:acme:7", 1)),
            lease_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(refused.outcome, pb::SetOutcome::Stale as i32);
}

#[tokio::test]
async fn leases_through_the_service_give_one_filler() {
    let redis = Redis::start().await.unwrap();
    let (_a, mut a) = instance(&redis).await;
    let lease = |key: &str| pb::LeaseRequest {
        key: key.into(),
        lease_ttl: None,
        tags: Vec::new(),
    };
    let first = a.lease(lease("k")).await.unwrap().into_inner().outcome;
    let Some(pb::lease_response::Outcome::LeaseToken(token)) = first else {
        panic!("the first miss gets the lease: {first:?}");
    };
    let second = a.lease(lease("k")).await.unwrap().into_inner().outcome;
    assert!(matches!(
        second,
        Some(pb::lease_response::Outcome::RetryAfter(_))
    ));
    let filled = a
        .set(pb::CacheSetRequest {
            entry: Some(entry("k", 1)),
            lease_token: token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(filled.outcome, pb::SetOutcome::Stored as i32);
    let third = a.lease(lease("k")).await.unwrap().into_inner().outcome;
    assert!(matches!(third, Some(pb::lease_response::Outcome::Entry(_))));
}

#[tokio::test]
async fn batch_get_reads_l1_then_redis_in_order_and_promotes() {
    let redis = Redis::start().await.unwrap();
    let (_a, mut a) = instance(&redis).await;
    let (_b, mut b) = instance(&redis).await;
    for key in ["k1", "k2", "k3"] {
        a.set(pb::CacheSetRequest {
            entry: Some(entry(key, 1)),
            lease_token: String::new(),
        })
        .await
        .unwrap();
    }
    let keys: Vec<String> = ["k3", "absent", "k1", "k2"].map(String::from).to_vec();
    let stats = |c: &mut CacheServiceClient<Channel>| {
        let mut c = c.clone();
        async move {
            c.stats(pb::CacheStatsRequest {})
                .await
                .unwrap()
                .into_inner()
        }
    };
    let before = stats(&mut b).await;
    let found = b
        .batch_get(pb::CacheBatchGetRequest { keys: keys.clone() })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let names: Vec<&str> = found.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(names, ["k3", "k1", "k2"], "found keys, in request order");
    let after = stats(&mut b).await;
    assert_eq!(
        after.l2_hits - before.l2_hits,
        3,
        "from Redis: B's L1 was empty"
    );
    assert_eq!(after.misses - before.misses, 1);

    b.batch_get(pb::CacheBatchGetRequest { keys })
        .await
        .unwrap();
    let again = stats(&mut b).await;
    assert_eq!(again.l1_hits - after.l1_hits, 3, "promoted into B's L1");

    let status = b
        .batch_get(pb::CacheBatchGetRequest {
            keys: (0..257).map(|i| format!("k{i}")).collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(convoy_integration_tests::violated_fields(&status), ["keys"]);
}
