//! A Redis that refuses writes but answers reads (out of memory under `noeviction`), no
//! relay running at all, then a Redis that is down: invalidations cannot be published, and
//! within the bus's staleness bound every cache stops serving what may be stale (reads go
//! through to Postgres), says so in its health (`convoy.bus`) and metrics while the servers
//! stay SERVING, and serves again once a relay has caught up. Real Redis and Postgres.

use std::net::SocketAddr;
use std::time::Duration;

use convoy_cache::subscriber::BUS_HEALTH_SERVICE;
use convoy_integration_tests::exposition::{metrics_addr, sample, scrape};
use convoy_integration_tests::{
    CacheInstance, Fleet, channel_to, health_of, new_conversation, wait_health,
};
use convoy_proto::v1 as pb;
use convoy_proto::v1::conversation_service_client::ConversationServiceClient;
use convoy_testkit::Redis;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

/// The staleness bound the fleet runs with (`--bus-stale-after-ms`): a write whose
/// invalidation cannot be published stops every cache from serving older versions this
/// long after its commit, plus a subscriber's step.
const BOUND: Duration = Duration::from_millis(2000);
/// What the assertion allows on top of the bound: a debug build on a busy machine takes a
/// while to schedule the subscribers' steps and this test's reads, never seconds more.
const SLACK: Duration = Duration::from_secs(5);
/// How long a recovery may take: Redis back, the relay's backlog published, a heartbeat.
const RECOVERY: Duration = Duration::from_secs(20);

/// GetConversation's answer through the caches.
async fn read(client: &mut ConversationServiceClient<Channel>, name: &str) -> pb::Conversation {
    client
        .get_conversation(pb::GetConversationRequest { name: name.into() })
        .await
        .expect("reads go through to Postgres whatever Redis does")
        .into_inner()
}

/// Reads answered by the conversation instance's own L1 so far.
async fn local_hits(metrics: SocketAddr) -> f64 {
    sample(
        &scrape(metrics).await,
        "convoy_conversation_reads_total",
        &[("source", "local")],
    )
    .unwrap_or(0.0)
}

/// Health `convoy.bus` of the conversation instance at `conversation` and of the cache
/// instance.
async fn bus_health(conversation: SocketAddr, cache: &CacheInstance) -> [Option<ServingStatus>; 2] {
    [
        health_of(conversation, BUS_HEALTH_SERVICE).await,
        health_of(cache.addr, BUS_HEALTH_SERVICE).await,
    ]
}

/// Waits until both report `convoy.bus` SERVING again.
async fn wait_bus_current(conversation: SocketAddr, cache: &CacheInstance) {
    for addr in [conversation, cache.addr] {
        wait_health(addr, BUS_HEALTH_SERVICE, ServingStatus::Serving, RECOVERY).await;
    }
}

/// Reads `name` until it shows `version` and both instances report the bus NOT_SERVING;
/// panics if that takes longer than the bound and the slack after `since`. Returns how
/// long it took.
async fn until_fresh_and_reported(
    client: &mut ConversationServiceClient<Channel>,
    name: &str,
    version: i64,
    conversation: SocketAddr,
    cache: &CacheInstance,
    since: Instant,
) -> Duration {
    loop {
        let seen = read(client, name).await.version;
        let health = bus_health(conversation, cache).await;
        if seen == version && health == [Some(ServingStatus::NotServing); 2] {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < BOUND + SLACK,
            "{:?} after the write: read version {seen} (want {version}), bus health {health:?}",
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The version of `key`'s entry in the tier's Redis, read without a transaction (which a
/// Redis out of memory refuses).
async fn stored_version(admin: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<i64> {
    redis::cmd("HGET")
        .arg(format!("convoy:e:{key}"))
        .arg("v")
        .query_async(admin)
        .await
        .unwrap()
}

/// The cache tier's answer to a Get of `key`.
async fn tier_get(cache: &CacheInstance, key: &str) -> Option<pb::CacheEntry> {
    cache
        .client()
        .await
        .get(pb::CacheGetRequest {
            key: key.into(),
            min_version: 0,
            peek: false,
        })
        .await
        .unwrap()
        .into_inner()
        .entry
}

/// A read fills the caches, the next is a hit of `version` in the own L1.
async fn assert_served_from_cache(
    client: &mut ConversationServiceClient<Channel>,
    name: &str,
    version: i64,
    metrics: SocketAddr,
) {
    assert_eq!(read(client, name).await.version, version);
    let before = local_hits(metrics).await;
    assert_eq!(read(client, name).await.version, version);
    assert_eq!(
        local_hits(metrics).await - before,
        1.0,
        "the repeat is a cache hit"
    );
}

/// `CONFIG SET name value` on the Redis behind `admin`.
async fn config_set(admin: &mut redis::aio::MultiplexedConnection, name: &str, value: &str) {
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg(name)
        .arg(value)
        .query_async(admin)
        .await
        .unwrap();
}

async fn retitle(
    client: &mut ConversationServiceClient<Channel>,
    name: &str,
    title: &str,
) -> pb::Conversation {
    client
        .update_conversation(pb::UpdateConversationRequest {
            conversation: Some(pb::Conversation {
                name: name.into(),
                title: title.into(),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .expect("a write is acknowledged whatever Redis does: Postgres takes it")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_invalidations_cannot_be_published_caches_stop_serving_within_the_bound_and_resume() {
    let mut redis = Redis::start().await.unwrap();
    let url = redis.url();
    let bound_ms = BOUND.as_millis().to_string();
    let cache = CacheInstance::start(&url, &["--bus-stale-after-ms", &bound_ms]).await;
    let cache_addr = cache.addr.to_string();
    let conversation_flags = [
        "--redis-url",
        &url,
        "--cache-addr",
        &cache_addr,
        "--bus-stale-after-ms",
        &bound_ms,
        "--consistency-sample-ratio",
        "0",
    ];
    let metrics = metrics_addr();
    let metrics_listen = metrics.to_string();
    let fleet = Fleet::start_with(
        1,
        &[
            &conversation_flags[..],
            &["--metrics-listen", &metrics_listen],
        ]
        .concat(),
    )
    .await;
    wait_bus_current(fleet.addr, &cache).await;
    let mut client = fleet.client().await;
    let created = client
        .create_conversation(new_conversation("acme", "v1", ""))
        .await
        .unwrap()
        .into_inner();
    let name = created.name.clone();
    let key = format!("conv:acme:{}", name.rsplit('/').next().unwrap());
    fleet.wait_outbox_published().await;
    assert_served_from_cache(&mut client, &name, created.version, metrics).await;
    let mut admin = redis::Client::open(url.clone())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    assert_eq!(
        stored_version(&mut admin, &key).await,
        Some(created.version),
        "the tier's Redis holds the conversation too"
    );

    // 1. Redis refuses writes (out of memory, nothing to evict) and still answers reads.
    config_set(&mut admin, "maxmemory-policy", "noeviction").await;
    config_set(&mut admin, "maxmemory", "1").await;
    let refused: redis::RedisResult<()> = redis::cmd("SET")
        .arg("probe")
        .arg("x")
        .query_async(&mut admin)
        .await;
    assert!(
        refused.is_err_and(|e| e.to_string().contains("OOM")),
        "Redis refuses writes"
    );
    let updated = retitle(&mut client, &name, "v2").await;
    let acked = Instant::now();
    let took = until_fresh_and_reported(
        &mut client,
        &name,
        updated.version,
        fleet.addr,
        &cache,
        acked,
    )
    .await;
    println!(
        "Redis refusing writes: reads fresh and the bus reported stale {took:?} after the write \
         (bound {BOUND:?})"
    );
    assert_eq!(
        stored_version(&mut admin, &key).await,
        Some(created.version),
        "the relay could not drop the old version from Redis"
    );
    assert!(tier_get(&cache, &key).await.is_none());
    for _ in 0..5 {
        assert_eq!(read(&mut client, &name).await.version, updated.version);
    }
    // The servers stay SERVING: clients still read through to Postgres.
    for addr in [fleet.addr, cache.addr] {
        assert_eq!(health_of(addr, "").await, Some(ServingStatus::Serving));
    }
    let text = scrape(metrics).await;
    assert_eq!(sample(&text, "convoy_cache_bus_current", &[]), Some(0.0));
    assert!(
        sample(&text, "convoy_relay_publish_failures_total", &[]).unwrap_or(0.0) > 0.0,
        "publish failures are counted"
    );
    assert!(
        sample(&text, "convoy_relay_backlog_seconds", &[]).unwrap_or(0.0) > 0.0,
        "the unpublished write shows as a backlog"
    );

    // Redis takes writes again: the relay publishes what it held, vouches for the bus, and
    // the caches serve again (the L1s flushed), with the new version.
    config_set(&mut admin, "maxmemory", "0").await;
    wait_bus_current(fleet.addr, &cache).await;
    assert!(
        stored_version(&mut admin, &key)
            .await
            .is_none_or(|v| v >= updated.version),
        "the held-up invalidation reached Redis"
    );
    assert_served_from_cache(&mut client, &name, updated.version, metrics).await;
    let text = scrape(metrics).await;
    assert_eq!(sample(&text, "convoy_cache_bus_current", &[]), Some(1.0));
    assert!(
        sample(
            &text,
            "convoy_cache_bus_flushes_total",
            &[("why", "the bus caught up")]
        )
        .unwrap_or(0.0)
            >= 2.0,
        "both L1s were flushed on catching up"
    );

    // 2. No relay at all: the only instance left relays nothing (as if every relay had
    //    died), so a write's invalidation stays in the outbox while Redis, healthy, still
    //    holds the old version. Neither the L1s nor the tier's Redis serve it past the bound.
    let quiet_metrics = metrics_addr();
    let quiet_listen = quiet_metrics.to_string();
    let quiet = fleet
        .spawn_instance(
            &[
                &conversation_flags[..],
                &["--fault-no-relay", "--metrics-listen", &quiet_listen],
            ]
            .concat(),
        )
        .await;
    let mut client = ConversationServiceClient::new(channel_to(quiet.addr).await);
    wait_bus_current(quiet.addr, &cache).await;
    assert_served_from_cache(&mut client, &name, updated.version, quiet_metrics).await;
    let mut fleet = fleet;
    fleet.stop_service().await;
    let v3 = retitle(&mut client, &name, "v3").await;
    let acked = Instant::now();
    let took =
        until_fresh_and_reported(&mut client, &name, v3.version, quiet.addr, &cache, acked).await;
    println!("no relay: reads fresh and the bus reported stale {took:?} after the write");
    assert_eq!(
        stored_version(&mut admin, &key).await,
        Some(updated.version),
        "Redis answers, with the old version"
    );
    assert!(
        tier_get(&cache, &key).await.is_none(),
        "the tier does not serve what Redis holds while the bus is stale"
    );
    let _relaying = fleet.spawn_instance(&conversation_flags).await;
    wait_bus_current(quiet.addr, &cache).await;
    assert_served_from_cache(&mut client, &name, v3.version, quiet_metrics).await;

    // 3. Redis down: the same, and back (empty) it serves again.
    redis.stop().await.unwrap();
    let v4 = retitle(&mut client, &name, "v4").await;
    let acked = Instant::now();
    let took =
        until_fresh_and_reported(&mut client, &name, v4.version, quiet.addr, &cache, acked).await;
    println!("Redis down: reads fresh and the bus reported stale {took:?} after the write");
    redis.restart().await.unwrap();
    wait_bus_current(quiet.addr, &cache).await;
    assert_served_from_cache(&mut client, &name, v4.version, quiet_metrics).await;
}
