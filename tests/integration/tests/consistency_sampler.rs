//! The consistency sampler: every sampled write is checked at each delay against every
//! layer, the fleet-wide tally counts them, and cache layers holding an older version are
//! reported as an inconsistency, by layer, in `convoyctl cache consistency`'s report.

use std::time::Duration;

use convoy_integration_tests::{CacheInstance, Fleet, new_conversation};
use convoy_proto::v1 as pb;
use convoy_testkit::Redis;

const WITHIN_SHORT: Duration = Duration::from_millis(200);
/// Long enough for delivery on a loaded machine: a healthy fleet is held to it.
const WITHIN_LONG: Duration = Duration::from_millis(2000);

fn update(name: &str, title: &str) -> pb::UpdateConversationRequest {
    pb::UpdateConversationRequest {
        conversation: Some(pb::Conversation {
            name: name.to_owned(),
            title: title.to_owned(),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["title".into()],
        }),
    }
}

/// Waits (at most 15 s) until both delays have checked `writes` writes; returns the report.
async fn tally_of(url: &str, writes: u64) -> convoy_cache::consistency::ConsistencyReport {
    tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let report = convoyctl::cache::consistency(url).await.unwrap();
            let checked = |d| report.delays.get(&d).map_or(0, |t| t.checks);
            if checked(WITHIN_SHORT) >= writes && checked(WITHIN_LONG) >= writes {
                return report;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("every sampled write is checked at both delays")
}

/// Redis, a cache instance (with `cache_extra` flags) and a fleet (with `extra` flags)
/// sampling every write, checked at both delays.
async fn sampled_fleet(extra: &[&str], cache_extra: &[&str]) -> (Redis, CacheInstance, Fleet) {
    let redis = Redis::start().await.unwrap();
    let url = redis.url();
    let cache = CacheInstance::start(&url, cache_extra).await;
    let cache_addr = cache.addr.to_string();
    let flags = [
        &[
            "--redis-url",
            url.as_str(),
            "--cache-addr",
            &cache_addr,
            "--consistency-sample-ratio",
            "1",
            "--consistency-check-after-ms",
            "200,2000",
        ][..],
        extra,
    ]
    .concat();
    let fleet = Fleet::start_with(2, &flags).await;
    (redis, cache, fleet)
}

#[tokio::test]
async fn sampled_writes_are_checked_and_a_stale_layer_is_reported() {
    let (redis, _cache, fleet) = sampled_fleet(&[], &[]).await;
    let url = redis.url();
    let mut client = fleet.client().await;
    let name = client
        .create_conversation(new_conversation("acme", "t", "c"))
        .await
        .unwrap()
        .into_inner()
        .name;
    for i in 0..10 {
        client
            .update_conversation(update(&name, &format!("t{i}")))
            .await
            .unwrap();
        // Reads fill the caches between writes, so there is something to contradict.
        client
            .get_conversation(pb::GetConversationRequest { name: name.clone() })
            .await
            .unwrap();
    }
    let report = tally_of(&url, 11).await;
    for delay in [WITHIN_SHORT, WITHIN_LONG] {
        assert_eq!(
            report.delays[&delay].checks, 11,
            "{delay:?}: every write, once"
        );
    }
    // Within 200 ms depends on the machine's load; within 2 s it must hold.
    assert_eq!(
        report.delays[&WITHIN_LONG].inconsistent,
        0,
        "{}",
        report.render()
    );
}

#[tokio::test]
async fn caches_left_stale_by_a_missing_relay_are_reported_by_layer() {
    // No instance relays the outbox, and no cache checks for relays' heartbeats (which
    // would stop them serving within a few seconds, see `hostile_bus.rs`): nothing
    // invalidates the caches after a write, and the sampler must say where.
    let unchecked = ["--bus-stale-after-ms", "0"];
    let (redis, _cache, fleet) = sampled_fleet(
        &["--fault-no-relay", unchecked[0], unchecked[1]],
        &unchecked,
    )
    .await;
    let url = redis.url();
    // The own L1 takes copies only while its subscriber is current.
    tokio::time::timeout(Duration::from_secs(10), async {
        while !convoy_cache::subscriber::live()
            .iter()
            .filter(|h| h.source() == url)
            .all(|h| h.is_current())
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("every subscriber is current");
    let mut client = fleet.client().await;
    let created = client
        .create_conversation(new_conversation("acme", "t", "c"))
        .await
        .unwrap()
        .into_inner();
    // Fills every layer with v1.
    client
        .get_conversation(pb::GetConversationRequest {
            name: created.name.clone(),
        })
        .await
        .unwrap();
    let written = client
        .update_conversation(update(&created.name, "changed"))
        .await
        .unwrap()
        .into_inner();
    let version: i64 = written.etag.trim_matches('"').parse().unwrap();

    let report = tally_of(&url, 2).await;
    for delay in [WITHIN_SHORT, WITHIN_LONG] {
        let tally = &report.delays[&delay];
        assert_eq!(tally.checks, 2, "the create and the update");
        assert_eq!(tally.inconsistent, 1, "{delay:?}: {}", report.render());
        for layer in ["local-l1", "cache", "l2"] {
            assert_eq!(
                tally.by_layer.get(layer),
                Some(&1),
                "{layer}: {}",
                report.render()
            );
        }
        assert_eq!(tally.by_layer.get("primary"), None);
        assert!((tally.nines().unwrap() - 2f64.log10()).abs() < 1e-9);
    }
    let text = report.render();
    assert!(text.contains("layer=l2 key=conv:acme:"), "{text}");
    assert!(
        text.contains(&format!("expected>=v{version} found=v{}", version - 1)),
        "{text}"
    );
    assert!(text.contains("50.0000%"), "1 of 2 consistent: {text}");
}
