//! Leases: a herd of misses costs one load, and only the lease holder may fill a leased key.
//! Against a real Redis.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use convoy_cache::l2::{L2, L2Config};
use convoy_cache::lease::LeaseOutcome;
use convoy_cache::{Entry, SetOutcome, Version};
use convoy_testkit::Redis;

fn entry(version: i64) -> Entry {
    Entry {
        value: Bytes::from(format!("row at v{version}")),
        version: Version(version),
        tags: Vec::new(),
        ttl: Duration::from_secs(60),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_misses_cause_one_load() {
    let redis = Redis::start().await.unwrap();
    let l2 = Arc::new(L2::new(L2Config::new(redis.url())).unwrap());
    let loads = Arc::new(AtomicUsize::new(0));
    let readers: Vec<_> = (0..1000)
        .map(|_| {
            let (l2, loads) = (l2.clone(), loads.clone());
            tokio::spawn(async move {
                loop {
                    match l2
                        .lease("conv:acme:1", Duration::from_secs(2))
                        .await
                        .unwrap()
                    {
                        LeaseOutcome::Hit(found) => return found.version,
                        LeaseOutcome::Granted(token) => {
                            loads.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await; // the load
                            let outcome = l2
                                .set_leased("conv:acme:1", &entry(1), &token)
                                .await
                                .unwrap();
                            assert_eq!(outcome, SetOutcome::Stored);
                        }
                        LeaseOutcome::Wait => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
            })
        })
        .collect();
    for reader in readers {
        assert_eq!(reader.await.unwrap(), Version(1));
    }
    assert_eq!(
        loads.load(Ordering::SeqCst),
        1,
        "one database load for the whole herd"
    );
}

#[tokio::test]
async fn only_the_lease_holder_fills_a_leased_key() {
    let redis = Redis::start().await.unwrap();
    let l2 = L2::new(L2Config::new(redis.url())).unwrap();
    let LeaseOutcome::Granted(token) = l2.lease("k", Duration::from_secs(5)).await.unwrap() else {
        panic!("a miss on a free key grants the lease");
    };
    assert_eq!(
        l2.lease("k", Duration::from_secs(5)).await.unwrap(),
        LeaseOutcome::Wait
    );
    assert_eq!(
        l2.set("k", &entry(1)).await.unwrap(),
        SetOutcome::LeaseMismatch
    );
    assert_eq!(
        l2.set_leased("k", &entry(1), "not-the-token")
            .await
            .unwrap(),
        SetOutcome::LeaseMismatch
    );
    assert_eq!(
        l2.set_leased("k", &entry(1), &token).await.unwrap(),
        SetOutcome::Stored
    );
    // Released: the next lease request is a hit.
    let LeaseOutcome::Hit(found) = l2.lease("k", Duration::from_secs(5)).await.unwrap() else {
        panic!("filled");
    };
    assert_eq!(found.value, Bytes::from("row at v1"));
}

#[tokio::test]
async fn a_lease_holder_that_read_before_a_write_is_refused_and_releases_the_lease() {
    let redis = Redis::start().await.unwrap();
    let l2 = L2::new(L2Config::new(redis.url())).unwrap();
    let LeaseOutcome::Granted(token) = l2.lease("k", Duration::from_secs(5)).await.unwrap() else {
        panic!("granted");
    };
    // The holder read v1; a write makes v2 and invalidates.
    l2.invalidate("k", Version(2)).await.unwrap();
    assert_eq!(
        l2.set_leased("k", &entry(1), &token).await.unwrap(),
        SetOutcome::Stale
    );
    // The lease is released: the next reader can load v2.
    let LeaseOutcome::Granted(next) = l2.lease("k", Duration::from_secs(5)).await.unwrap() else {
        panic!("the lease was released");
    };
    assert_eq!(
        l2.set_leased("k", &entry(2), &next).await.unwrap(),
        SetOutcome::Stored
    );
}

#[tokio::test]
async fn a_token_whose_lease_is_gone_fills_nothing() {
    // A lease lost with a Redis restart (or expired) no longer authorizes a fill: the
    // holder may have read the row before a write whose invalidation (and floor) the
    // restart also lost.
    let mut redis = Redis::start().await.unwrap();
    let l2 = L2::new(L2Config::new(redis.url())).unwrap();
    let LeaseOutcome::Granted(token) = l2.lease("k", Duration::from_secs(5)).await.unwrap() else {
        panic!("granted");
    };
    redis.restart().await.unwrap();
    let mut outcome = None;
    for _ in 0..50 {
        match l2.set_leased("k", &entry(1), &token).await {
            Ok(o) => {
                outcome = Some(o);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert_eq!(outcome, Some(SetOutcome::LeaseMismatch));
    assert_eq!(l2.get("k").await.unwrap(), None);
}

#[tokio::test]
async fn a_tag_invalidation_cancels_the_leases_bound_to_the_tag() {
    // An aggregate over a team is filled under a lease bound to the team's tag; a write to
    // the team invalidates the tag while the fill computes: what the fill read predates the
    // write, so its set must fail. A lease bound to another tag is untouched.
    let redis = Redis::start().await.unwrap();
    let l2 = L2::new(L2Config::new(redis.url())).unwrap();
    let tags = |t: &str| vec![t.to_owned()];
    let ttl = Duration::from_secs(5);
    let LeaseOutcome::Granted(mine) = l2
        .lease_tagged("sum:a", ttl, &tags("team:a"))
        .await
        .unwrap()
    else {
        panic!("granted");
    };
    let LeaseOutcome::Granted(theirs) = l2
        .lease_tagged("sum:b", ttl, &tags("team:b"))
        .await
        .unwrap()
    else {
        panic!("granted");
    };
    l2.invalidate_tags(&tags("team:a")).await.unwrap();
    let tagged = |version| Entry {
        tags: tags("team:a"),
        ..entry(version)
    };
    assert_eq!(
        l2.set_leased("sum:a", &tagged(1), &mine).await.unwrap(),
        SetOutcome::LeaseMismatch
    );
    assert_eq!(
        l2.set_leased("sum:b", &entry(1), &theirs).await.unwrap(),
        SetOutcome::Stored
    );
    // The next filler (after the write) gets a lease and stores.
    let LeaseOutcome::Granted(next) = l2
        .lease_tagged("sum:a", ttl, &tags("team:a"))
        .await
        .unwrap()
    else {
        panic!("the cancelled lease is free again");
    };
    assert_eq!(
        l2.set_leased("sum:a", &tagged(2), &next).await.unwrap(),
        SetOutcome::Stored
    );
    assert!(
        l2.lease_tagged("k", ttl, &tags("bad\u{1}tag"))
            .await
            .is_err()
    );
}
