//! Get through the cache service, next to its ceilings in the same run: the same value read
//! with the L2 library directly (no gRPC) and a raw Redis GET of a plain key.
//!
//! `cargo bench -p convoy-integration-tests --bench cache`

use std::time::Duration;

use clap::Parser;
use convoy_cache::l2::{L2, L2Config};
use convoy_proto::v1 as pb;
use convoy_proto::v1::cache_service_client::CacheServiceClient;
use convoy_testkit::Redis;
use criterion::{Criterion, criterion_group, criterion_main};
use tokio::net::TcpListener;

async fn instance(redis: &Redis, extra: &[&str]) -> CacheServiceClient<tonic::transport::Channel> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut args = vec![
        "cache".to_owned(),
        "--listen".into(),
        addr.to_string(),
        "--redis-url".into(),
        redis.url(),
        "--no-auth".into(),
        // No relay runs here to heartbeat on the bus: serve without waiting for one.
        "--bus-stale-after-ms".into(),
        "0".into(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let config = cache_service::Config::try_parse_from(args).unwrap();
    tokio::spawn(
        async move { cache_service::serve(&config, listener, std::future::pending()).await },
    );
    let mut client = CacheServiceClient::new(convoy_integration_tests::channel_to(addr).await);
    while client
        .stats(pb::CacheStatsRequest {})
        .await
        .map(|s| s.into_inner().bus_flushes)
        .unwrap_or(0)
        < 1
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    client
}

fn cache(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let value = vec![7u8; 1024];
    let (redis, l1_instance, l2_instance, l2, raw) = runtime.block_on(async {
        let redis = Redis::start().await.unwrap();
        let mut l1_instance = instance(&redis, &[]).await;
        // An L1 of zero bytes keeps nothing: every read goes to Redis.
        let l2_instance = instance(&redis, &["--l1-capacity-mib", "0"]).await;
        l1_instance
            .set(pb::CacheSetRequest {
                entry: Some(pb::CacheEntry {
                    key: "conv:bench:1".into(),
                    value: value.clone(),
                    version: 1,
                    tags: vec![],
                    ttl: None,
                }),
                lease_token: String::new(),
            })
            .await
            .unwrap();
        let l2 = L2::new(L2Config::new(redis.url())).unwrap();
        let client = redis::Client::open(redis.url()).unwrap();
        let mut raw = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("SET")
            .arg("raw:bench")
            .arg(&value)
            .query_async(&mut raw)
            .await
            .unwrap();
        (redis, l1_instance, l2_instance, l2, raw)
    });

    let mut group = c.benchmark_group("cache_get_1KiB");
    for (label, instance, layer) in [
        (
            "cache service Get, L1 hit",
            &l1_instance,
            pb::CacheLayer::L1,
        ),
        (
            "cache service Get, L2 hit",
            &l2_instance,
            pb::CacheLayer::L2,
        ),
    ] {
        group.bench_function(label, |b| {
            b.to_async(&runtime).iter(|| {
                let mut client = instance.clone();
                async move {
                    let r = client
                        .get(pb::CacheGetRequest {
                            key: "conv:bench:1".into(),
                            min_version: 0,
                            peek: false,
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    assert_eq!(r.layer, layer as i32);
                }
            })
        });
    }
    let fills = std::sync::atomic::AtomicU64::new(0);
    group.bench_function(
        "cache service miss path: Lease (granted) + Set with the token",
        |b| {
            b.to_async(&runtime).iter(|| {
                let mut client = l1_instance.clone();
                let key = format!(
                    "conv:bench:miss-{}",
                    fills.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                );
                let value = value.clone();
                async move {
                    let lease = client
                        .lease(pb::LeaseRequest {
                            key: key.clone(),
                            lease_ttl: None,
                            tags: Vec::new(),
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    let Some(pb::lease_response::Outcome::LeaseToken(token)) = lease.outcome else {
                        panic!("a new key is a miss: {lease:?}");
                    };
                    let set = client
                        .set(pb::CacheSetRequest {
                            entry: Some(pb::CacheEntry {
                                key,
                                value,
                                version: 1,
                                tags: vec![],
                                ttl: None,
                            }),
                            lease_token: token,
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    assert_eq!(set.outcome, pb::SetOutcome::Stored as i32);
                }
            })
        },
    );
    group.bench_function("L2 library get (no gRPC)", |b| {
        b.to_async(&runtime)
            .iter(|| async { l2.get("conv:bench:1").await.unwrap().unwrap() })
    });
    group.bench_function("raw Redis GET (multiplexed connection)", |b| {
        b.to_async(&runtime).iter(|| {
            let mut raw = raw.clone();
            async move {
                let v: Vec<u8> = redis::cmd("GET")
                    .arg("raw:bench")
                    .query_async(&mut raw)
                    .await
                    .unwrap();
                v
            }
        })
    });
    group.finish();
    drop(redis);
}

criterion_group!(benches, cache);
criterion_main!(benches);
