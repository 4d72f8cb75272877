//! Leader election against a real etcd: one leader at a time, a dropped leader hands over at
//! once, and a campaign abandoned while it waits leaves nothing behind in etcd.

use std::time::Duration;

use convoy_discovery::EtcdConfig;
use convoy_discovery::leader::campaign;
use convoy_testkit::Etcd;
use etcd_client::GetOptions;

/// The candidates in election `name`, in campaign order.
async fn candidates(etcd: &Etcd, name: &str) -> Vec<String> {
    let mut client = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    let response = client
        .get(
            format!("elections/{name}/"),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    response
        .kvs()
        .iter()
        .map(|kv| kv.value_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_at_a_time_and_an_abandoned_campaign_leaves_nothing() {
    let etcd = Etcd::start().await.unwrap();
    let config = EtcdConfig {
        endpoints: vec![etcd.endpoint()],
        ..EtcdConfig::default()
    };
    let first = campaign(&config, "router", "a").await.unwrap();

    // A second candidate waits while the first leads.
    let waiting = {
        let config = config.clone();
        tokio::spawn(async move { campaign(&config, "router", "b").await })
    };
    // A third one gives up while waiting (its task is dropped mid-campaign).
    let abandoned = {
        let config = config.clone();
        tokio::spawn(async move { campaign(&config, "router", "c").await })
    };
    while candidates(&etcd, "router").await.len() < 3 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!waiting.is_finished(), "b must wait while a leads");
    abandoned.abort();

    // The leader resigns by being dropped: b is elected, and c's lease is gone with c.
    drop(first);
    let second = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("b is elected once a resigns")
        .unwrap()
        .unwrap();
    let mut left = candidates(&etcd, "router").await;
    for _ in 0..300 {
        if left == ["b"] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = candidates(&etcd, "router").await;
    }
    assert_eq!(left, ["b"], "only the leader stays a candidate");

    // Nobody campaigns any more: no lease may be kept alive (an abandoned campaign that
    // kept refreshing its lease would hold it forever, and, had etcd elected it just
    // before it was abandoned, block every other candidate). Leases not refreshed expire
    // within their 10 s TTL; the wait allows three times that.
    drop(second);
    let mut client = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    let mut leases = client.leases().await.unwrap().leases().len();
    for _ in 0..300 {
        if leases == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        leases = client.leases().await.unwrap().leases().len();
    }
    assert_eq!(leases, 0, "a lease outlived every candidate");
}
