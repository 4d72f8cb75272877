//! The shard map in a real etcd: seeded once, changed only by compare-and-swap with a newer
//! epoch, and followed by watchers across an etcd restart.

use std::time::Duration;

use convoy_discovery::EtcdConfig;
use convoy_discovery::shard_map::{ShardMapStore, StoredMap, SwapError};
use convoy_store::{Epoch, ShardMap};
use convoy_testkit::Etcd;
use futures::StreamExt;
use futures::stream::BoxStream;

fn config(etcd: &Etcd) -> EtcdConfig {
    EtcdConfig {
        endpoints: vec![etcd.endpoint()],
        request_timeout: Duration::from_secs(2),
        ..EtcdConfig::default()
    }
}

fn map(epoch: u64, primaries: &[&str]) -> ShardMap {
    ShardMap::evenly(
        &primaries
            .iter()
            .map(|p| (*p).to_owned())
            .collect::<Vec<_>>(),
    )
    .unwrap()
    .with_epoch(Epoch(epoch))
}

#[tokio::test]
async fn the_map_is_seeded_once_and_changed_only_by_a_swap_with_a_newer_epoch() {
    let etcd = Etcd::start().await.unwrap();
    let store = ShardMapStore::connect(&config(&etcd)).await.unwrap();
    assert_eq!(store.load().await.unwrap(), None);

    let seeded = store
        .create_if_absent(&map(1, &["postgres://a"]))
        .await
        .unwrap();
    let again = store
        .create_if_absent(&map(1, &["postgres://b", "postgres://c"]))
        .await
        .unwrap();
    assert_eq!(again, seeded, "a second seed adopts the stored map");
    assert_eq!(store.load().await.unwrap(), Some(seeded.clone()));

    let next = map(2, &["postgres://a", "postgres://d"]);
    let swapped = store.compare_and_swap(&seeded, &next).await.unwrap();
    assert_eq!(swapped.map, next);
    assert!(swapped.revision > seeded.revision);
    // A second swap from the same read loses: the map changed since.
    assert!(matches!(
        store
            .compare_and_swap(&seeded, &map(3, &["postgres://x"]))
            .await,
        Err(SwapError::Conflict { .. })
    ));
    assert!(matches!(
        store
            .compare_and_swap(&swapped, &map(2, &["postgres://x"]))
            .await,
        Err(SwapError::StaleEpoch { stored: 2, new: 2 })
    ));
    assert_eq!(store.load().await.unwrap().unwrap().map, next);
}

async fn next(watch: &mut BoxStream<'static, StoredMap>) -> StoredMap {
    tokio::time::timeout(Duration::from_secs(15), watch.next())
        .await
        .expect("the watch yields within 15 s")
        .expect("the watch never ends")
}

#[tokio::test]
async fn a_watcher_sees_the_current_map_then_each_newer_one_across_an_etcd_restart() {
    let mut etcd = Etcd::start().await.unwrap();
    let store = ShardMapStore::connect(&config(&etcd)).await.unwrap();
    let mut watch = store.watch();
    let first = store
        .create_if_absent(&map(1, &["postgres://a"]))
        .await
        .unwrap();
    let seen = next(&mut watch).await;
    assert_eq!(seen.map.epoch(), Epoch(1));

    let second = store
        .compare_and_swap(&first, &map(2, &["postgres://b"]))
        .await
        .unwrap();
    assert_eq!(next(&mut watch).await.map.epoch(), Epoch(2));

    etcd.restart().await.unwrap();
    let mut third = None;
    for _ in 0..50 {
        match store
            .compare_and_swap(&second, &map(3, &["postgres://c"]))
            .await
        {
            Ok(stored) => {
                third = Some(stored);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(third.is_some(), "etcd came back");
    assert_eq!(next(&mut watch).await.map.epoch(), Epoch(3));
}
