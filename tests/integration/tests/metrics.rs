//! Every service serves Prometheus metrics on `--metrics-listen`, and the series move with
//! the calls: RED per gRPC method with each answer's status code, on the server and the
//! client side, cache lookups per layer, invalidation bus lag and breaker states, and the
//! data layer's statements, acquire waits and pool gauges per shard. Scraped with a plain
//! HTTP GET, as Prometheus does.
//!
//! The services share this process, and so one registry: each endpoint serves all of it.
//! Assertions are on increments of series only the call under test moves.

use std::time::Duration;

use convoy_integration_tests::exposition::{metrics_addr, sample, scrape};
use convoy_integration_tests::{CacheInstance, Fleet, Router, new_conversation};
use convoy_proto::v1 as pb;
use convoy_testkit::{Etcd, Redis};
use tonic::Code;

/// A method's server-side call count for `code`, 0 before its first call.
fn served(text: &str, service: &str, method: &str, code: &str) -> f64 {
    sample(
        text,
        "convoy_rpc_server_duration_seconds_count",
        &[
            ("rpc_system", "grpc"),
            ("rpc_service", service),
            ("rpc_method", method),
            ("rpc_grpc_status_code", code),
        ],
    )
    .unwrap_or(0.0)
}

const CONVERSATIONS: &str = "convoy.v1.ConversationService";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_serves_metrics_whose_series_move_with_its_calls() {
    let redis = Redis::start().await.unwrap();
    let etcd = Etcd::start().await.unwrap();
    let (cache_metrics, conversation_metrics, router_metrics) =
        (metrics_addr(), metrics_addr(), metrics_addr());
    let cache = CacheInstance::start(
        &redis.url(),
        &["--metrics-listen", &cache_metrics.to_string()],
    )
    .await;
    let fleet = Fleet::start_with(
        1,
        &[
            "--metrics-listen",
            &conversation_metrics.to_string(),
            "--redis-url",
            &redis.url(),
            "--cache-addr",
            &cache.addr.to_string(),
        ],
    )
    .await;
    // As the binaries do: the store's statement statistics read sqlx's events.
    {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        tracing_subscriber::registry()
            .with(convoy_store::query_stats::global_layer())
            .try_init()
            .expect("the first subscriber of this test process");
    }
    let router = Router::start(
        &etcd.endpoint(),
        &fleet.map,
        &["--metrics-listen", &router_metrics.to_string()],
    )
    .await;
    let mut client = fleet.client().await;

    // Histograms are real Prometheus histograms, with the declared buckets.
    let before = scrape(conversation_metrics).await;
    assert!(
        before
            .lines()
            .any(|l| l == "# TYPE convoy_rpc_server_duration_seconds histogram"),
        "{before}"
    );
    assert!(
        sample(
            &before,
            "convoy_rpc_server_duration_seconds_bucket",
            &[("rpc_service", "grpc.health.v1.Health"), ("le", "0.0005")],
        )
        .is_some(),
        "health checks are counted, in buckets: {before}"
    );

    // A successful CreateConversation moves its method's count at code 0, once.
    let created = client
        .create_conversation(new_conversation("acme", "Flaky test", "hello"))
        .await
        .unwrap()
        .into_inner();
    let after = scrape(conversation_metrics).await;
    assert_eq!(
        served(&after, CONVERSATIONS, "CreateConversation", "0")
            - served(&before, CONVERSATIONS, "CreateConversation", "0"),
        1.0
    );

    // Its insert (with its outbox row, in one statement) is a statement of shard-0, the
    // only shard, timed and labelled by its first words and fingerprint; the acquire it
    // waited for is timed on the primary.
    let inserts = |text: &str| {
        text.lines()
            .filter(|l| {
                l.starts_with("convoy_db_statement_duration_seconds_count{")
                    && l.contains("statement=\"WITH changed AS (INSERT #")
                    && l.contains("shard=\"shard-0\"")
            })
            .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
            .sum::<f64>()
    };
    assert_eq!(
        inserts(&after) - inserts(&before),
        1.0,
        "one insert into conversations on shard-0: {after}"
    );
    let acquires = |text: &str| {
        sample(
            text,
            "convoy_db_pool_acquire_duration_seconds_count",
            &[("shard", "shard-0"), ("node", "primary")],
        )
        .unwrap_or(0.0)
    };
    assert!(acquires(&after) > acquires(&before), "{after}");
    // The pools' gauges, sampled by the shard's checks.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let text = scrape(conversation_metrics).await;
        let max = sample(
            &text,
            "convoy_db_pool_max_connections",
            &[("shard", "shard-0"), ("node", "primary")],
        );
        if let Some(max) = max {
            // The router's pools (4) sample the same series in this shared registry.
            assert!(max == 16.0 || max == 4.0, "a pool's maximum: {max}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no pool gauges:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // An invalid one is counted at INVALID_ARGUMENT (3), and not at 0.
    let status = client
        .create_conversation(new_conversation("not a team!", "Bad", "x"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let invalid = scrape(conversation_metrics).await;
    assert_eq!(
        served(&invalid, CONVERSATIONS, "CreateConversation", "3")
            - served(&after, CONVERSATIONS, "CreateConversation", "3"),
        1.0
    );
    assert_eq!(
        served(&invalid, CONVERSATIONS, "CreateConversation", "0"),
        served(&after, CONVERSATIONS, "CreateConversation", "0")
    );

    // A read goes through the cache tier: the conversation service's calls to it are
    // counted on its client side.
    client
        .get_conversation(pb::GetConversationRequest {
            name: created.name.clone(),
        })
        .await
        .unwrap();
    let read = scrape(conversation_metrics).await;
    let tier_calls = sample(
        &read,
        "convoy_rpc_client_duration_seconds_count",
        &[
            ("rpc_system", "grpc"),
            ("rpc_service", "convoy.v1.CacheService"),
        ],
    )
    .unwrap_or(0.0);
    assert!(tier_calls >= 1.0, "{read}");
    // The tier's endpoint has a breaker, closed.
    assert_eq!(
        sample(
            &read,
            "convoy_breaker_state",
            &[("endpoint", &cache.addr.to_string())]
        ),
        Some(0.0),
        "{read}"
    );

    // A cache hit moves the cache service's lookups at its layer, and its Get at code 0
    // (the tier serves once the fleet's relay vouches for the bus).
    cache.wait_bus_current().await;
    let mut cache_client = cache.client().await;
    cache_client
        .set(pb::CacheSetRequest {
            entry: Some(pb::CacheEntry {
                key: "metrics:hit".into(),
                value: b"v".to_vec(),
                version: 1,
                tags: Vec::new(),
                ttl: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
            }),
            lease_token: String::new(),
        })
        .await
        .unwrap();
    let before = scrape(cache_metrics).await;
    let found = cache_client
        .get(pb::CacheGetRequest {
            key: "metrics:hit".into(),
            min_version: 0,
            peek: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(found.layer, pb::CacheLayer::L1 as i32);
    let after = scrape(cache_metrics).await;
    let l1_hits = |text: &str| sample(text, "convoy_cache_lookups_total", &[("layer", "l1")]);
    assert_eq!(
        l1_hits(&after).unwrap() - l1_hits(&before).unwrap_or(0.0),
        1.0
    );
    assert_eq!(
        served(&after, "convoy.v1.CacheService", "Get", "0")
            - served(&before, "convoy.v1.CacheService", "Get", "0"),
        1.0
    );

    // The write's invalidation reaches the L1s over the bus: its lag is measured.
    let lag_count = |text: &str| sample(text, "convoy_cache_bus_lag_seconds_count", &[]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let text = scrape(cache_metrics).await;
        if lag_count(&text).unwrap_or(0.0) >= 1.0 {
            assert!(
                sample(
                    &text,
                    "convoy_cache_bus_lag_seconds_bucket",
                    &[("le", "+Inf")]
                )
                .is_some()
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no bus lag recorded after the write:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The shard-router serves its own endpoint, with its methods.
    let before = scrape(router_metrics).await;
    router
        .client
        .clone()
        .get_shard_map(pb::GetShardMapRequest {})
        .await
        .unwrap();
    let after = scrape(router_metrics).await;
    let router_service = "convoy.v1.ShardRouterService";
    assert_eq!(
        served(&after, router_service, "GetShardMap", "0")
            - served(&before, router_service, "GetShardMap", "0"),
        1.0
    );

    // Analytics: its method's series and the per-shard query counter move.
    let analytics_metrics = metrics_addr();
    let analytics = fleet
        .start_analytics(&["--metrics-listen", &analytics_metrics.to_string()])
        .await;
    let mut analytics_client = pb::analytics_service_client::AnalyticsServiceClient::new(
        convoy_integration_tests::channel_to(analytics.addr).await,
    );
    let before = scrape(analytics_metrics).await;
    let now = prost_types::Timestamp {
        seconds: 1_800_000_000,
        nanos: 0,
    };
    analytics_client
        .get_team_summary(pb::GetTeamSummaryRequest {
            filter: Some(pb::AnalyticsFilter {
                parent: "teams/acme".into(),
                start_time: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: 0,
                }),
                end_time: Some(now),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err(); // a range over 366 days: INVALID_ARGUMENT (3)
    analytics_client
        .get_team_summary(pb::GetTeamSummaryRequest {
            filter: Some(pb::AnalyticsFilter {
                parent: "teams/acme".into(),
                start_time: Some(prost_types::Timestamp {
                    seconds: now.seconds - 86_400,
                    nanos: 0,
                }),
                end_time: Some(now),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let after = scrape(analytics_metrics).await;
    let analytics_service = "convoy.v1.AnalyticsService";
    for code in ["0", "3"] {
        assert_eq!(
            served(&after, analytics_service, "GetTeamSummary", code)
                - served(&before, analytics_service, "GetTeamSummary", code),
            1.0,
            "GetTeamSummary with code {code}"
        );
    }
    let shard_queries = |text: &str| {
        sample(
            text,
            "convoy_analytics_shard_queries_total",
            &[("shard", "shard-0"), ("outcome", "ok")],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(shard_queries(&after) - shard_queries(&before), 1.0);
}
