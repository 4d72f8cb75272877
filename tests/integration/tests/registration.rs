//! Instances register in etcd, and leave the endpoint set at once when stopped gracefully
//! and within the lease TTL when killed.

use std::collections::BTreeMap;
use std::time::Duration;

use convoy_discovery::{Endpoint, EtcdConfig, watch_service};
use convoy_integration_tests::Fleet;
use convoy_testkit::Etcd;
use futures::StreamExt;
use tokio::time::timeout;
use tower::discover::Change;

/// Applies changes from `changes` to `set` until `done(set)` holds (at most `within`).
async fn until(
    changes: &mut convoy_discovery::Changes,
    set: &mut BTreeMap<String, Endpoint>,
    within: Duration,
    done: impl Fn(&BTreeMap<String, Endpoint>) -> bool,
) {
    timeout(within, async {
        while !done(set) {
            match changes
                .next()
                .await
                .expect("the watch never ends")
                .expect("no watch error")
            {
                Change::Insert(key, endpoint) => {
                    set.insert(key, endpoint);
                }
                Change::Remove(key) => {
                    set.remove(&key);
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the endpoint set did not converge within {within:?}: {set:?}"));
}

#[tokio::test]
async fn instances_register_and_leave_at_once_or_within_the_ttl() {
    let etcd = Etcd::start().await.unwrap();
    let flags = [
        "--etcd-endpoint",
        &etcd.endpoint(),
        "--registration-ttl-secs",
        "2",
    ];
    let fleet = Fleet::start_with(1, &flags).await;
    // A lease far longer than the wait below: if this instance leaves the set in time, only
    // its deregistration can have removed it.
    let endpoint = etcd.endpoint();
    let mut graceful = fleet
        .spawn_instance(&[
            "--etcd-endpoint",
            &endpoint,
            "--registration-ttl-secs",
            "60",
        ])
        .await;
    let killed = fleet.spawn_instance(&flags).await;

    let etcd_config = EtcdConfig {
        endpoints: vec![etcd.endpoint()],
        ..EtcdConfig::default()
    };
    let mut changes = watch_service(&etcd_config, "conversation");
    let mut set = BTreeMap::new();
    until(&mut changes, &mut set, Duration::from_secs(10), |s| {
        s.len() == 3
    })
    .await;
    let mut addrs: Vec<String> = set.values().map(|e| e.addr.clone()).collect();
    addrs.sort();
    let mut expected = vec![
        fleet.addr.to_string(),
        graceful.addr.to_string(),
        killed.addr.to_string(),
    ];
    expected.sort();
    assert_eq!(addrs, expected);
    assert!(
        set.values().all(|e| e.metadata.service == "conversation"
            && e.metadata.version == env!("CARGO_PKG_VERSION"))
    );

    // Graceful: deregistered before draining, so peers drop it well before its 60 s lease
    // could expire.
    let graceful_addr = graceful.addr.to_string();
    let stopping = tokio::spawn(async move { graceful.stop().await });
    until(&mut changes, &mut set, Duration::from_secs(10), |s| {
        !s.values().any(|e| e.addr == graceful_addr)
    })
    .await;
    stopping.await.unwrap();

    // Killed: nothing deregisters; the lease expires within its TTL (2 s) plus etcd's
    // expiry sweep.
    let killed_addr = killed.addr.to_string();
    killed.kill();
    let registered = convoy_discovery::list_services(&etcd_config).await.unwrap();
    assert!(
        registered.iter().any(|e| e.addr == killed_addr),
        "a killed instance cannot deregister itself: it stays until its lease expires"
    );
    until(&mut changes, &mut set, Duration::from_secs(10), |s| {
        !s.values().any(|e| e.addr == killed_addr)
    })
    .await;
    assert_eq!(set.len(), 1);
}

#[tokio::test]
async fn convoyctl_status_shows_each_instance_and_its_health() {
    let etcd = Etcd::start().await.unwrap();
    let fleet = Fleet::start_with(1, &["--etcd-endpoint", &etcd.endpoint()]).await;
    let etcd_config = EtcdConfig {
        endpoints: vec![etcd.endpoint()],
        ..EtcdConfig::default()
    };
    let rows = convoyctl::status::status(&etcd_config, None).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].endpoint.addr, fleet.addr.to_string());
    assert_eq!(rows[0].health, "SERVING");
    let table = convoyctl::status::render(&rows);
    assert!(table.contains("conversation") && table.contains("SERVING"));
}
