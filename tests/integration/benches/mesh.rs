//! The mesh's own cost per call: the same RPCs through a bare tonic channel and through the
//! SDK's stack (deadline, retry policy, p2c over peak-EWMA, breaker, endpoint gate, buffer),
//! to the same in-process server, in one run.
//!
//! `cargo bench -p convoy-integration-tests --bench mesh`

use convoy_client::{ClientConfig, ConvoyClient, Discovery};
use convoy_integration_tests::{Fleet, new_conversation};
use convoy_proto::v1 as pb;
use criterion::{Criterion, criterion_group, criterion_main};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

fn mesh(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (fleet, bare, health_bare, sdk, health_mesh, name) = runtime.block_on(async {
        let fleet = Fleet::start(1).await;
        let bare = fleet.client().await;
        let health_bare = HealthClient::new(fleet.channel().await);
        let discovery = Discovery::Static(vec![fleet.addr.to_string()]);
        let sdk = ConvoyClient::connect(discovery.clone(), ClientConfig::default())
            .unwrap()
            .conversations();
        let health_mesh = HealthClient::new(convoy_client::transport(
            &discovery,
            "conversation",
            ClientConfig::default(),
        ));
        let name = sdk
            .create_conversation(new_conversation("mesh", "bench", ""))
            .await
            .unwrap()
            .into_inner()
            .name;
        (fleet, bare, health_bare, sdk, health_mesh, name)
    });

    let mut group = c.benchmark_group("health_check");
    group.bench_function("bare tonic channel", |b| {
        b.to_async(&runtime).iter(|| {
            let mut client = health_bare.clone();
            async move { client.check(HealthCheckRequest::default()).await.unwrap() }
        })
    });
    group.bench_function("mesh transport", |b| {
        b.to_async(&runtime).iter(|| {
            let mut client = health_mesh.clone();
            async move { client.check(HealthCheckRequest::default()).await.unwrap() }
        })
    });
    group.finish();

    let mut group = c.benchmark_group("get_conversation");
    group.bench_function("bare tonic client", |b| {
        b.to_async(&runtime).iter(|| {
            let mut client = bare.clone();
            let name = name.clone();
            async move {
                client
                    .get_conversation(pb::GetConversationRequest { name })
                    .await
                    .unwrap()
            }
        })
    });
    group.bench_function("SDK (mesh stack + retry policy)", |b| {
        b.to_async(&runtime).iter(|| {
            let client = sdk.clone();
            let name = name.clone();
            async move {
                client
                    .get_conversation(pb::GetConversationRequest { name })
                    .await
                    .unwrap()
            }
        })
    });
    group.finish();

    drop((bare, health_bare, sdk, health_mesh));
    runtime.block_on(async move {
        let mut fleet = fleet;
        fleet.stop_service().await;
    });
}

criterion_group!(benches, mesh);
criterion_main!(benches);
