//! Analytics latency: one team's summary and the fleet's busiest teams, through gRPC
//! (computed, and from the cache tier), next to the same aggregate sent directly to the shard
//! with sqlx (the service's ceiling), and next to the textbook SQL with exact percentiles
//! (`percentile_disc`), which the sketch replaces. Two real PostgreSQL shards from the
//! testkit, 200,000 conversations over 20 teams (10,000 each), statistics fresh.
//!
//! `cargo bench -p convoy-integration-tests --bench analytics`

use analytics::query::{Grouping, Query, Scope};
use convoy_integration_tests::{CacheInstance, Fleet, channel_to};
use convoy_proto::names::TeamId;
use convoy_proto::v1 as pb;
use convoy_proto::v1::analytics_service_client::AnalyticsServiceClient;
use criterion::{Criterion, criterion_group, criterion_main};

const TEAMS: usize = 20;
const PER_TEAM: i64 = 10_000;

fn analytics(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (fleet, redis, cache, computed, cached) = runtime.block_on(async {
        let fleet = Fleet::start(2).await;
        for index in 0..2 {
            let teams: Vec<String> = (0..TEAMS)
                .map(|t| format!("team-{t}"))
                .filter(|t| fleet.map.owner_of_team(t) == index)
                .collect();
            let pool = fleet.shard_pool(index).await;
            sqlx::query(
                "INSERT INTO conversations (team_id, id, title, intent, status, duration_seconds, \
                 message_count, effectiveness_score, created_at) \
                 SELECT t, gen_random_uuid(), 'bench', \
                        (ARRAY['debug','feature','refactor','review'])[1 + i % 4], \
                        (ARRAY['active','completed','abandoned'])[1 + i % 3], \
                        (i * 7919 % 10000) / 3.0, i % 40, (i % 10) / 10.0, \
                        timestamptz '2026-01-01' + make_interval(secs => i * 3000.0) \
                 FROM unnest($1::text[]) t, generate_series(1, $2) i",
            )
            .bind(&teams)
            .bind(PER_TEAM)
            .execute(&pool)
            .await
            .unwrap();
            sqlx::query("VACUUM ANALYZE conversations")
                .execute(&pool)
                .await
                .unwrap();
        }
        let redis = convoy_testkit::Redis::start().await.unwrap();
        let cache = CacheInstance::start(&redis.url(), &[]).await;
        let cache_addr = cache.addr.to_string();
        let computed = fleet.start_analytics(&[]).await;
        let cached = fleet.start_analytics(&["--cache-addr", &cache_addr]).await;
        (fleet, redis, cache, computed, cached)
    });
    let (computed_client, cached_client) = runtime.block_on(async {
        (
            AnalyticsServiceClient::new(channel_to(computed.addr).await),
            AnalyticsServiceClient::new(channel_to(cached.addr).await),
        )
    });
    let team = "team-3";
    let shard = fleet.map.owner_of_team(team);
    let pool = runtime.block_on(fleet.shard_pool(shard));
    let year = |seconds| prost_types::Timestamp { seconds, nanos: 0 };
    let (start, end) = (1_767_225_600, 1_767_225_600 + 366 * 86_400); // 2026-01-01 + 366 d
    let summary = pb::GetTeamSummaryRequest {
        filter: Some(pb::AnalyticsFilter {
            parent: format!("teams/{team}"),
            start_time: Some(year(start)),
            end_time: Some(year(end)),
            ..Default::default()
        }),
    };
    let query = Query {
        scope: Scope::Team(TeamId::parse(team).unwrap()),
        start: chrono::DateTime::from_timestamp(start, 0).unwrap(),
        end: chrono::DateTime::from_timestamp(end, 0).unwrap(),
        intent: None,
        status: None,
        require_complete: false,
        grouping: Grouping::Total,
    };

    let mut group = c.benchmark_group(format!("team summary ({PER_TEAM} conversations)"));
    group.bench_function("direct SQL: the service's aggregate (sqlx)", |b| {
        b.to_async(&runtime)
            .iter(|| async { analytics::scatter::run(&pool, &query, &[]).await.unwrap() })
    });
    group.bench_function("direct SQL: exact percentile_disc (sqlx)", |b| {
        b.to_async(&runtime).iter(|| async {
            let _: (i64, Option<f64>, Option<f64>, Option<f64>) = sqlx::query_as(
                "SELECT count(*), percentile_disc(0.5) WITHIN GROUP (ORDER BY duration_seconds), \
                 percentile_disc(0.95) WITHIN GROUP (ORDER BY duration_seconds), \
                 percentile_disc(0.99) WITHIN GROUP (ORDER BY duration_seconds) \
                 FROM conversations WHERE team_id = $1 AND created_at >= $2 AND created_at < $3",
            )
            .bind(team)
            .bind(query.start)
            .bind(query.end)
            .fetch_one(&pool)
            .await
            .unwrap();
        })
    });
    group.bench_function("grpc GetTeamSummary, computed", |b| {
        b.to_async(&runtime).iter(|| {
            let mut client = computed_client.clone();
            let request = summary.clone();
            async move { client.get_team_summary(request).await.unwrap() }
        })
    });
    group.bench_function("grpc GetTeamSummary, from the cache tier", |b| {
        b.to_async(&runtime).iter(|| {
            let mut client = cached_client.clone();
            let request = summary.clone();
            async move {
                let answer = client.get_team_summary(request).await.unwrap().into_inner();
                debug_assert!(answer.coverage.is_some());
                answer
            }
        })
    });
    group.finish();

    let fleet_request = pb::GetFleetOverviewRequest {
        start_time: Some(year(start)),
        end_time: Some(year(end)),
        limit: 10,
        require_complete: true,
    };
    let mut group = c.benchmark_group(format!(
        "fleet overview ({} conversations, 2 shards)",
        PER_TEAM * TEAMS as i64
    ));
    group.sample_size(20);
    group.bench_function("grpc GetFleetOverview, computed", |b| {
        b.to_async(&runtime).iter(|| {
            let mut client = computed_client.clone();
            let request = fleet_request;
            async move { client.get_fleet_overview(request).await.unwrap() }
        })
    });
    group.bench_function("grpc GetFleetOverview, from the cache tier", |b| {
        b.to_async(&runtime).iter(|| {
            let mut client = cached_client.clone();
            let request = fleet_request;
            async move { client.get_fleet_overview(request).await.unwrap() }
        })
    });
    group.finish();
    drop((computed, cached, cache, redis, fleet));
}

criterion_group!(benches, analytics);
criterion_main!(benches);
