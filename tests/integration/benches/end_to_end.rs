//! End-to-end latency of Get and Create through gRPC, next to its two ceilings measured in
//! the same run: a gRPC call that touches no database (the health check, on the same
//! server), and the same SQL sent directly with sqlx, on one real PostgreSQL shard started
//! by the testkit. Get is also measured through the caches: answered by the instance's own
//! L1, and (with no own L1) by the key's cache instance. Create's direct SQL is also run
//! with the write fence's trigger off, to price the fence.
//!
//! `cargo bench -p convoy-integration-tests --bench end_to_end`

use convoy_integration_tests::{Fleet, new_conversation};
use convoy_proto::v1 as pb;
use criterion::{Criterion, criterion_group, criterion_main};
use uuid::Uuid;

fn end_to_end(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (fleet, client, pool, name) = runtime.block_on(async {
        let fleet = Fleet::start(1).await;
        let mut client = fleet.client().await;
        let created = client
            .create_conversation(new_conversation("bench", "a benchmark", "some content"))
            .await
            .unwrap()
            .into_inner();
        let pool = fleet.shard_pool(0).await;
        (fleet, client, pool, created.name)
    });
    let id: Uuid = name.rsplit('/').next().unwrap().parse().unwrap();
    // The same shard behind two more instances that read through a cache instance: one with
    // its own L1, one without.
    let (redis, cache, cached_instance, tiered_instance, cached, tiered) =
        runtime.block_on(async {
            let redis = convoy_testkit::Redis::start().await.unwrap();
            let cache = convoy_integration_tests::CacheInstance::start(&redis.url(), &[]).await;
            let url = redis.url();
            let addr = cache.addr.to_string();
            let flags = ["--redis-url", &url, "--cache-addr", &addr];
            let cached = fleet.spawn_instance(&flags).await;
            let tiered = fleet
                .spawn_instance(&[&flags[..], &["--local-cache-mib", "0"]].concat())
                .await;
            let cached_client = pb::conversation_service_client::ConversationServiceClient::new(
                convoy_integration_tests::channel_to(cached.addr).await,
            );
            let tiered_client = pb::conversation_service_client::ConversationServiceClient::new(
                convoy_integration_tests::channel_to(tiered.addr).await,
            );
            (redis, cache, cached, tiered, cached_client, tiered_client)
        });

    let health = runtime.block_on(async {
        tonic_health::pb::health_client::HealthClient::new(fleet.channel().await)
    });
    let mut group = c.benchmark_group("get");
    group.bench_function("grpc Health/Check (no database: the gRPC floor)", |b| {
        b.to_async(&runtime).iter(|| {
            let mut health = health.clone();
            async move {
                health
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .unwrap()
            }
        })
    });
    group.bench_function("grpc GetConversation", |b| {
        b.to_async(&runtime).iter(|| {
            let mut client = client.clone();
            let name = name.clone();
            async move {
                client
                    .get_conversation(pb::GetConversationRequest { name })
                    .await
                    .unwrap()
            }
        })
    });
    for (label, client) in [
        ("grpc GetConversation, own L1 hit", &cached),
        (
            "grpc GetConversation, cache instance hit (no own L1)",
            &tiered,
        ),
    ] {
        group.bench_function(label, |b| {
            b.to_async(&runtime).iter(|| {
                let mut client = client.clone();
                let name = name.clone();
                async move {
                    client
                        .get_conversation(pb::GetConversationRequest { name })
                        .await
                        .unwrap()
                }
            })
        });
    }
    group.bench_function("direct SQL (sqlx)", |b| {
        b.to_async(&runtime).iter(|| {
            let pool = pool.clone();
            async move {
                sqlx::query(conversation::store::GET_SQL)
                    .bind("bench")
                    .bind(id)
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            }
        })
    });
    group.finish();
    // Their relays would wake on every Create below and compete for the two cores.
    drop((cached_instance, tiered_instance, cache, redis));

    // The same statement the service runs without a request_id, returning the same row.
    let create_sql = format!(
        "INSERT INTO conversations (team_id, id, title, intent, status, content) \
         VALUES ($1, $2, $3, 'debug', 'active', $4) RETURNING {}",
        conversation::store::COLUMNS
    );
    let create_sql = &create_sql;
    let mut group = c.benchmark_group("create");
    group.bench_function("grpc CreateConversation", |b| {
        b.to_async(&runtime).iter(|| {
            let mut client = client.clone();
            async move {
                client
                    .create_conversation(new_conversation("bench", "created", "body"))
                    .await
                    .unwrap()
            }
        })
    });
    group.bench_function("direct SQL (sqlx)", |b| {
        b.to_async(&runtime).iter(|| {
            let pool = pool.clone();
            async move {
                sqlx::query(create_sql)
                    .bind("bench")
                    .bind(Uuid::now_v7())
                    .bind("created")
                    .bind("body")
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            }
        })
    });
    // The same statement with the write fence's trigger off (`session_replication_role =
    // replica` skips ordinary triggers): the fence's own cost is the difference.
    let unfenced = runtime.block_on(async {
        let options: sqlx::postgres::PgConnectOptions = fleet.shards[0].dsn().parse().unwrap();
        sqlx::postgres::PgPoolOptions::new()
            .connect_with(options.options([("session_replication_role", "replica")]))
            .await
            .unwrap()
    });
    group.bench_function("direct SQL (sqlx), write fence off", |b| {
        b.to_async(&runtime).iter(|| {
            let pool = unfenced.clone();
            async move {
                sqlx::query(create_sql)
                    .bind("bench")
                    .bind(Uuid::now_v7())
                    .bind("created")
                    .bind("body")
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            }
        })
    });
    group.finish();

    drop((client, health));
    runtime.block_on(async move {
        let mut fleet = fleet;
        fleet.stop_service().await;
    });
}

criterion_group!(benches, end_to_end);
criterion_main!(benches);
