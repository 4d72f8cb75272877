//! Discovery against a real etcd 3.4: registration, deregistration, crashes, etcd restarts
//! and compaction, each seen through a watcher the way a balancer would see it.
//!
//! Not for the key layout or JSON details alone (unit tests beside the code cover those).
//! Every wait is bounded; TTLs are short (2 to 5 s) so the file runs in seconds.

use std::collections::BTreeMap;
use std::time::Duration;

use convoy_discovery::{
    Backoff, Changes, Endpoint, EtcdConfig, Metadata, Registrar, Registration, RegistrationConfig,
    RegistrationStatus, list_services, watch_service,
};
use convoy_testkit::Etcd;
use etcd_client::{CompactionOptions, GetOptions};
use futures::StreamExt;
use tokio::time::{Instant, sleep, timeout};
use tower::discover::Change;

const SERVICE: &str = "conversation";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Quick retries, so recovery is measured in fractions of a second.
fn quick_backoff() -> Backoff {
    Backoff {
        initial: ms(50),
        max: ms(250),
    }
}

/// Logs to the test's output when `RUST_LOG` asks, e.g. `RUST_LOG=convoy_discovery=debug`.
fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn etcd_config(etcd: &Etcd) -> EtcdConfig {
    init_logs();
    EtcdConfig {
        endpoints: vec![etcd.endpoint()],
        connect_timeout: ms(500),
        request_timeout: secs(1),
        reconnect_backoff: quick_backoff(),
        ..EtcdConfig::default()
    }
}

fn lease(ttl: Duration) -> RegistrationConfig {
    RegistrationConfig {
        ttl,
        keepalive_interval: ms(500),
        retry_backoff: quick_backoff(),
    }
}

fn endpoint(instance: &str, port: u16) -> Endpoint {
    Endpoint {
        addr: format!("127.0.0.1:{port}"),
        metadata: Metadata {
            service: SERVICE.into(),
            instance: instance.into(),
            version: "0.1.0".into(),
            zone: "local".into(),
            extra: BTreeMap::new(),
        },
    }
}

async fn register(etcd: &Etcd, instance: &str, port: u16, ttl: Duration) -> Registration {
    let registration =
        Registrar::register(&etcd_config(etcd), endpoint(instance, port), lease(ttl))
            .await
            .unwrap();
    assert_eq!(
        *registration.status().borrow(),
        RegistrationStatus::Registered
    );
    registration
}

async fn raw_client(etcd: &Etcd) -> etcd_client::Client {
    etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap()
}

async fn wait_for_status(registration: &Registration, want: RegistrationStatus, within: Duration) {
    let mut status = registration.status();
    timeout(within, status.wait_for(|s| *s == want))
        .await
        .unwrap_or_else(|_| panic!("status not {want:?} within {within:?}"))
        .unwrap();
}

/// What a balancer fed by a change stream holds, and how often each id was inserted or
/// removed to get there.
#[derive(Debug, Default)]
struct Seen {
    set: BTreeMap<String, Endpoint>,
    inserts: BTreeMap<String, usize>,
    removes: BTreeMap<String, usize>,
}

impl Seen {
    fn apply(&mut self, change: Change<String, Endpoint>) {
        match change {
            Change::Insert(id, endpoint) => {
                *self.inserts.entry(id.clone()).or_default() += 1;
                self.set.insert(id, endpoint);
            }
            Change::Remove(id) => {
                *self.removes.entry(id.clone()).or_default() += 1;
                assert!(self.set.remove(&id).is_some(), "Remove of unknown {id}");
            }
        }
    }

    fn ids(&self) -> Vec<&str> {
        self.set.keys().map(String::as_str).collect()
    }

    fn inserts(&self, id: &str) -> usize {
        self.inserts.get(id).copied().unwrap_or(0)
    }

    fn removes(&self, id: &str) -> usize {
        self.removes.get(id).copied().unwrap_or(0)
    }

    /// Applies changes until the set holds exactly `ids`; panics after `within`.
    async fn until(&mut self, changes: &mut Changes, ids: &[&str], within: Duration) {
        let reached = timeout(within, async {
            while self.ids() != ids {
                let change = changes.next().await.expect("the stream ended");
                self.apply(change.expect("the stream yielded an error"));
            }
        })
        .await;
        assert!(
            reached.is_ok(),
            "wanted {ids:?} within {within:?}, have {self:?}"
        );
    }

    /// Asserts that nothing arrives for `quiet`.
    async fn nothing_for(&mut self, changes: &mut Changes, quiet: Duration) {
        if let Ok(item) = timeout(quiet, changes.next()).await {
            panic!("expected nothing for {quiet:?}, got {item:?}; have {self:?}");
        }
    }
}

#[tokio::test]
async fn registered_instance_is_seen_by_a_watcher() {
    let etcd = Etcd::start().await.unwrap();
    let config = etcd_config(&etcd);
    let a = register(&etcd, "a1", 7001, secs(5)).await;
    let _other = Registrar::register(
        &config,
        Endpoint {
            addr: "127.0.0.1:7100".into(),
            metadata: Metadata {
                service: "gateway".into(),
                instance: "g1".into(),
                ..Metadata::default()
            },
        },
        lease(secs(5)),
    )
    .await
    .unwrap();
    assert_eq!(a.key(), "services/conversation/a1");

    let mut changes = watch_service(&config, SERVICE);
    let mut seen = Seen::default();
    seen.until(&mut changes, &["a1"], secs(5)).await;
    assert_eq!(seen.set["a1"], endpoint("a1", 7001));
    // The other service's instance never shows up here.
    seen.nothing_for(&mut changes, ms(300)).await;

    // What etcdctl and Go's naming resolver read: the raw value is the resolver layout.
    let mut raw = raw_client(&etcd).await;
    let got = raw.get("services/conversation/a1", None).await.unwrap();
    let value: serde_json::Value = serde_json::from_slice(got.kvs()[0].value()).unwrap();
    assert_eq!(value["Op"], 0);
    assert_eq!(value["Addr"], "127.0.0.1:7001");
    assert_eq!(value["Metadata"]["service"], SERVICE);
    assert_eq!(value["Metadata"]["instance"], "a1");
    assert_eq!(value["Metadata"]["version"], "0.1.0");
    assert_eq!(value["Metadata"]["zone"], "local");
    assert_ne!(got.kvs()[0].lease(), 0, "the key is under a lease");

    let all = list_services(&config).await.unwrap();
    let names: Vec<_> = all
        .iter()
        .map(|e| format!("{}/{}", e.metadata.service, e.metadata.instance))
        .collect();
    assert_eq!(names, ["conversation/a1", "gateway/g1"]);
}

#[tokio::test]
async fn deregistered_instance_disappears_at_once() {
    let etcd = Etcd::start().await.unwrap();
    let ttl = secs(10);
    let a = register(&etcd, "a1", 7001, ttl).await;
    let mut changes = watch_service(&etcd_config(&etcd), SERVICE);
    let mut seen = Seen::default();
    seen.until(&mut changes, &["a1"], secs(5)).await;

    let mut status = a.status();
    let started = Instant::now();
    a.deregister().await.unwrap();
    seen.until(&mut changes, &[], secs(2)).await;
    let took = started.elapsed();
    assert!(took < secs(2), "Remove took {took:?}, TTL is {ttl:?}");
    assert_eq!(
        *status.borrow_and_update(),
        RegistrationStatus::Deregistered
    );
    assert_eq!(seen.removes("a1"), 1);
}

#[tokio::test]
async fn crashed_instance_disappears_within_the_lease_ttl() {
    let etcd = Etcd::start().await.unwrap();
    let ttl = secs(2);
    let a = register(&etcd, "a1", 7001, ttl).await;
    let mut changes = watch_service(&etcd_config(&etcd), SERVICE);
    let mut seen = Seen::default();
    seen.until(&mut changes, &["a1"], secs(5)).await;

    // A crash: the keepalive stops, nothing is revoked.
    let started = Instant::now();
    drop(a);
    seen.until(&mut changes, &[], secs(6)).await;
    let took = started.elapsed();
    // The last keepalive was at most 0.5 s before the drop, so the lease ran at least 1.5 s.
    assert!(
        took >= secs(1),
        "removed after {took:?}, too soon for a {ttl:?} lease"
    );
    assert!(
        took < secs(5),
        "removed after {took:?} with a {ttl:?} lease"
    );
}

#[tokio::test]
async fn watcher_resumes_after_etcd_restart_without_losing_or_duplicating() {
    let mut etcd = Etcd::start().await.unwrap();
    let ttl = secs(5);
    let a = register(&etcd, "a1", 7001, ttl).await;
    let b = register(&etcd, "b1", 7002, ttl).await;
    let mut changes = watch_service(&etcd_config(&etcd), SERVICE);
    let mut seen = Seen::default();
    seen.until(&mut changes, &["a1", "b1"], secs(5)).await;

    etcd.stop().await.unwrap();
    // While etcd is down the consumer sees nothing: no errors, no removals.
    seen.nothing_for(&mut changes, secs(1)).await;
    wait_for_status(&a, RegistrationStatus::Lost, secs(3)).await;

    etcd.restart().await.unwrap();
    b.deregister().await.unwrap();
    let _c = register(&etcd, "c1", 7003, ttl).await;
    seen.until(&mut changes, &["a1", "c1"], secs(10)).await;
    wait_for_status(&a, RegistrationStatus::Registered, secs(5)).await;
    // Long enough for a1's keepalive to have recovered, and for any duplicate to show.
    seen.nothing_for(&mut changes, secs(1)).await;

    assert_eq!(seen.ids(), ["a1", "c1"]);
    assert_eq!((seen.inserts("a1"), seen.removes("a1")), (1, 0), "{seen:?}");
    assert_eq!((seen.inserts("b1"), seen.removes("b1")), (1, 1), "{seen:?}");
    assert_eq!((seen.inserts("c1"), seen.removes("c1")), (1, 0), "{seen:?}");
}

#[tokio::test]
async fn registration_survives_etcd_restart_longer_than_ttl() {
    let mut etcd = Etcd::start().await.unwrap();
    let ttl = secs(2);
    let a = register(&etcd, "a1", 7001, ttl).await;

    etcd.stop().await.unwrap();
    wait_for_status(&a, RegistrationStatus::Lost, secs(3)).await;
    sleep(ttl + secs(1)).await;
    etcd.restart().await.unwrap();
    wait_for_status(&a, RegistrationStatus::Registered, secs(5)).await;

    let config = etcd_config(&etcd);
    let mut changes = watch_service(&config, SERVICE);
    let mut seen = Seen::default();
    seen.until(&mut changes, &["a1"], secs(5)).await;
    // And it stays: kept alive past another TTL.
    seen.nothing_for(&mut changes, ttl + secs(1)).await;
    assert_eq!(
        list_services(&config).await.unwrap(),
        [endpoint("a1", 7001)]
    );
}

#[tokio::test]
async fn lease_revoked_by_someone_else_is_replaced() {
    let etcd = Etcd::start().await.unwrap();
    let a = register(&etcd, "a1", 7001, secs(5)).await;
    let mut changes = watch_service(&etcd_config(&etcd), SERVICE);
    let mut seen = Seen::default();
    seen.until(&mut changes, &["a1"], secs(5)).await;

    let mut raw = raw_client(&etcd).await;
    let lease_of = |got: etcd_client::GetResponse| got.kvs().first().map(|kv| kv.lease());
    let old = lease_of(raw.get(a.key(), None).await.unwrap()).unwrap();
    raw.lease_revoke(old).await.unwrap();

    seen.until(&mut changes, &[], secs(2)).await;
    seen.until(&mut changes, &["a1"], secs(3)).await;
    wait_for_status(&a, RegistrationStatus::Registered, secs(1)).await;
    let new = lease_of(raw.get(a.key(), None).await.unwrap()).unwrap();
    assert_ne!(new, old, "re-registered under a new lease");
    assert_eq!((seen.inserts("a1"), seen.removes("a1")), (2, 1));
}

#[tokio::test]
async fn compaction_forces_relist_not_loss() {
    let mut etcd = Etcd::start().await.unwrap();
    let ttl = secs(5);
    let _a = register(&etcd, "a1", 7001, ttl).await;
    let d = register(&etcd, "d1", 7004, ttl).await;
    let mut changes = watch_service(&etcd_config(&etcd), SERVICE);
    let mut seen = Seen::default();
    seen.until(&mut changes, &["a1", "d1"], secs(5)).await;

    // Break the watcher's stream; it cannot reconnect while nobody polls it.
    etcd.stop().await.unwrap();
    etcd.restart().await.unwrap();

    // Meanwhile: churn it could only replay from history, a departure and an arrival,
    // then history up to now is compacted away.
    let mut raw = raw_client(&etcd).await;
    for i in 0..50 {
        let key = format!("services/{SERVICE}/tmp{i}");
        raw.put(
            key.as_str(),
            endpoint(&format!("tmp{i}"), 8000).to_json(),
            None,
        )
        .await
        .unwrap();
        raw.delete(key, None).await.unwrap();
    }
    d.deregister().await.unwrap();
    let _b = register(&etcd, "b1", 7002, ttl).await;
    let now = raw
        .get("services/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    raw.compact(now, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();

    seen.until(&mut changes, &["a1", "b1"], secs(10)).await;
    seen.nothing_for(&mut changes, ms(500)).await;
    // Relisted, not replayed: none of the churn reached the consumer, a1 was not repeated.
    assert!(
        seen.inserts.keys().all(|id| !id.starts_with("tmp")),
        "{seen:?}"
    );
    assert_eq!((seen.inserts("a1"), seen.removes("a1")), (1, 0), "{seen:?}");
    assert_eq!((seen.inserts("d1"), seen.removes("d1")), (1, 1), "{seen:?}");
    assert_eq!((seen.inserts("b1"), seen.removes("b1")), (1, 0), "{seen:?}");
}
