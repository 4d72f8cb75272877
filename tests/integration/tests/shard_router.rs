//! The shard-router over real etcd and Postgres: it seeds the map in etcd, serves it (and
//! its changes as a stream), locates teams as the services route them, and reports each
//! node's health and replica lag.

use std::time::Duration;

use convoy_discovery::EtcdConfig;
use convoy_discovery::shard_map::ShardMapStore;
use convoy_integration_tests::Router;
use convoy_proto::v1 as pb;
use convoy_proto::v1::shard_router_service_client::ShardRouterServiceClient;
use convoy_store::{Epoch, Shard, ShardId, ShardMap, Slot};
use convoy_testkit::{Etcd, Postgres};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

/// Starts a router in this process; returns a client of it.
async fn router(etcd: &Etcd, seed: &ShardMap, extra: &[&str]) -> ShardRouterServiceClient<Channel> {
    let router = Router::start(&etcd.endpoint(), seed, extra).await;
    let client = router.client.clone();
    // The router runs for the rest of the test.
    std::mem::forget(router);
    client
}

fn map(epoch: u64, primary: &Postgres, replica: &Postgres, other: &Postgres) -> ShardMap {
    ShardMap::new(
        Epoch(epoch),
        vec![
            (
                Shard {
                    id: ShardId::new("shard-0").unwrap(),
                    primary: primary.dsn(),
                    replicas: vec![replica.dsn()],
                },
                vec![0..=511],
            ),
            (
                Shard {
                    id: ShardId::new("shard-1").unwrap(),
                    primary: other.dsn(),
                    replicas: Vec::new(),
                },
                vec![512..=1023],
            ),
        ],
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_serves_the_map_its_changes_placement_and_health() {
    let etcd = Etcd::start().await.unwrap();
    let primary = Postgres::start().await.unwrap();
    let replica = primary.start_replica().await.unwrap();
    let other = Postgres::start().await.unwrap();
    let seed = map(1, &primary, &replica, &other);
    let mut client = router(&etcd, &seed, &[]).await;

    let wire = client
        .get_shard_map(pb::GetShardMapRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(wire.epoch, 1);
    assert_eq!(wire.slot_count, 1024);
    let ranges: Vec<(i32, i32, &str)> = wire
        .ranges
        .iter()
        .map(|r| (r.start, r.end, r.shard.as_str()))
        .collect();
    assert_eq!(ranges, [(0, 511, "shard-0"), (512, 1023, "shard-1")]);
    let node = wire.shards[0].primary.as_ref().unwrap();
    assert_eq!(node.address, format!("127.0.0.1:{}", primary.port()));

    // Locate agrees with the services' own routing.
    let located = client
        .locate(pb::LocateRequest {
            team: "teams/acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let slot = Slot::for_team("acme");
    assert_eq!(located.slot, i32::from(slot.get()));
    assert_eq!(
        located.shard.unwrap().id,
        seed.shards()[seed.owner(slot)].id.to_string()
    );
    let bad = client
        .locate(pb::LocateRequest {
            team: "acme".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert_eq!(convoy_integration_tests::violated_fields(&bad), ["team"]);

    // Health: every node checked, the replica with its lag.
    let healthy = pb::NodeHealth::Healthy as i32;
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let shards = client
                .list_shards(pb::ListShardsRequest {})
                .await
                .unwrap()
                .into_inner()
                .shards;
            let all = shards.iter().all(|s| {
                s.primary.as_ref().is_some_and(|p| p.health == healthy)
                    && s.replicas.iter().all(|r| r.health == healthy)
            });
            if all {
                let replica = &shards[0].replicas[0];
                assert!(replica.replay_lsn.contains('/'), "{replica:?}");
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("every node is reported healthy");

    // A change in etcd reaches watchers, and a second router adopts the stored map.
    let mut watch = client
        .watch_shard_map(pb::WatchShardMapRequest { after_epoch: 0 })
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(first.epoch, 1);
    let store = ShardMapStore::connect(&EtcdConfig {
        endpoints: vec![etcd.endpoint()],
        ..EtcdConfig::default()
    })
    .await
    .unwrap();
    let stored = store.load().await.unwrap().unwrap();
    store
        .compare_and_swap(&stored, &map(2, &primary, &replica, &other))
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("the new map is streamed")
        .unwrap()
        .unwrap();
    assert_eq!(next.epoch, 2);
    let mut second = router(&etcd, &seed, &[]).await;
    let adopted = second
        .get_shard_map(pb::GetShardMapRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(adopted.epoch, 2, "the stored map wins over a seed");

    // convoyctl finds a router through etcd.
    let etcd_config = EtcdConfig {
        endpoints: vec![etcd.endpoint()],
        ..EtcdConfig::default()
    };
    let listed = convoyctl::shards::shards(&etcd_config, &convoyctl::access::Access::default())
        .await
        .unwrap();
    assert_eq!(listed.epoch, 2);
    let table = convoyctl::shards::render(&listed);
    assert!(table.contains("shard-0  replica-0"), "{table}");

    // A conversation instance can take its map from etcd, and serves by it.
    let etcd_url = etcd.endpoint();
    let fleet_less = convoy_integration_tests::Instance::start_with_flags(&[
        "--shard-map-from-etcd",
        "--etcd-endpoint",
        &etcd_url,
    ])
    .await;
    let mut conversations = pb::conversation_service_client::ConversationServiceClient::new(
        convoy_integration_tests::channel_to(fleet_less.addr).await,
    );
    let created = conversations
        .create_conversation(convoy_integration_tests::new_conversation("acme", "t", "c"))
        .await
        .unwrap()
        .into_inner();
    let on_shard = if seed.owner(slot) == 0 {
        &primary
    } else {
        &other
    };
    let pool = sqlx::PgPool::connect(&on_shard.dsn()).await.unwrap();
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM conversations WHERE team_id = 'acme'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        stored, 1,
        "{} landed on the shard the map in etcd names",
        created.name
    );

    // With --publish-shard-map, a router's file gives the servers (as the next epoch), never
    // the placement: a file written before a move must not undo it.
    let moved = ShardMap::new(
        Epoch(1),
        vec![
            (
                Shard {
                    id: ShardId::new("shard-0").unwrap(),
                    primary: primary.dsn(),
                    replicas: Vec::new(),
                },
                vec![0..=99],
            ),
            (
                Shard {
                    id: ShardId::new("shard-1").unwrap(),
                    primary: other.dsn(),
                    replicas: Vec::new(),
                },
                vec![100..=1023],
            ),
        ],
    )
    .unwrap();
    let mut publishing = router(&etcd, &moved, &["--publish-shard-map"]).await;
    let published = publishing
        .get_shard_map(pb::GetShardMapRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(published.epoch, 3);
    assert_eq!(published.ranges[0].end, 511, "the stored placement stays");
    assert!(
        published.shards[0].replicas.is_empty(),
        "the file's servers are published"
    );

    // Moves are checked before they are recorded.
    let backwards = client
        .move_slots(pb::MoveSlotsRequest {
            start: 10,
            end: 5,
            to_shard: "shard-1".into(),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(backwards.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        convoy_integration_tests::violated_fields(&backwards),
        ["end"]
    );
    let nowhere = client
        .move_slots(pb::MoveSlotsRequest {
            start: 0,
            end: 5,
            to_shard: "shard-9".into(),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(nowhere.code(), tonic::Code::FailedPrecondition);
}

/// The map the Kubernetes manifests seed the router with (k8s/base/shard-map.toml) is one
/// the router accepts: every slot owned, each shard with its replica, no password in a DSN.
#[test]
fn the_kubernetes_seed_map_is_a_valid_shard_map() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../k8s/base/shard-map.toml");
    let text = std::fs::read_to_string(path).expect("k8s/base/shard-map.toml");
    let map = ShardMap::from_toml(&text).expect("a valid shard map");
    let ids: Vec<String> = map.shards().iter().map(|s| s.id.to_string()).collect();
    assert_eq!(ids, ["shard-0", "shard-1"]);
    for shard in map.shards() {
        assert_eq!(
            shard.replicas.len(),
            1,
            "{}: one streaming replica",
            shard.id
        );
        for dsn in std::iter::once(&shard.primary).chain(&shard.replicas) {
            assert!(
                dsn.starts_with("postgres://convoy@"),
                "{dsn}: user convoy, no password (it comes from PGPASSFILE)"
            );
        }
    }
}
