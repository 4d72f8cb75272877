//! The bus reaches the L1, and the L1 is flushed whenever invalidations may have been
//! missed: gaps, resets, reconnects, a bus no relay vouches for. Against a real Redis.

use std::time::Duration;

use bytes::Bytes;
use convoy_cache::bus::{Heartbeat, StreamId};
use convoy_cache::l1::{L1, L1Config};
use convoy_cache::l2::{L2, L2Config};
use convoy_cache::subscriber::Subscriber;
use convoy_cache::{BusMessage, Entry, SetOutcome, Version};
use convoy_testkit::Redis;

fn entry(version: i64) -> Entry {
    Entry {
        value: Bytes::from_static(b"v"),
        version: Version(version),
        tags: vec!["team:acme".into()],
        ttl: Duration::from_secs(60),
    }
}

fn message(key: &str, version: i64) -> BusMessage {
    BusMessage {
        shard: "shard-0".into(),
        outbox_id: version,
        key: key.into(),
        version: Version(version),
        tags: Vec::new(),
        kind: "updated".into(),
        written_at_us: 1_700_000_000_000_000,
    }
}

/// A bus, an L1 and its subscriber, whose staleness check is off: these tests publish no
/// heartbeats (the check has its own tests at the end).
async fn setup() -> (Redis, L2, L1, Subscriber) {
    let redis = Redis::start().await.unwrap();
    let l2 = L2::new(L2Config::new(redis.url())).unwrap();
    let l1 = L1::new(L1Config::default());
    let subscriber = Subscriber::new(L2::new(L2Config::new(redis.url())).unwrap(), l1.clone())
        .with_stale_after(None);
    (redis, l2, l1, subscriber)
}

#[tokio::test]
async fn an_invalidation_on_the_bus_reaches_the_l1_and_fences_stale_fills() {
    let (_redis, bus, l1, mut subscriber) = setup().await;
    subscriber.step().await.unwrap(); // subscribe at the tip
    l1.set("conv:acme:1", entry(1)).await;
    l1.set("other", entry(1)).await;
    bus.publish(&[message("conv:acme:1", 2)]).await.unwrap();
    assert_eq!(subscriber.step().await.unwrap(), 1);
    assert!(l1.get("conv:acme:1", None).await.is_none());
    assert_eq!(l1.set("conv:acme:1", entry(1)).await, SetOutcome::Stale);
    assert!(
        l1.get("other", None).await.is_some(),
        "only the named key is dropped"
    );
    assert_eq!(subscriber.handle().flushes(), 1, "only the initial flush");
    assert!(subscriber.handle().is_current());
}

#[tokio::test]
async fn tags_on_the_bus_drop_their_entries() {
    let (_redis, bus, l1, mut subscriber) = setup().await;
    subscriber.step().await.unwrap();
    l1.set("analytics:acme:summary", entry(1)).await;
    let mut m = message("conv:acme:9", 3);
    m.tags = vec!["team:acme".into()];
    bus.publish(&[m]).await.unwrap();
    subscriber.step().await.unwrap();
    assert!(l1.get("analytics:acme:summary", None).await.is_none());
}

#[tokio::test]
async fn messages_trimmed_before_they_were_applied_flush_the_l1() {
    let (redis, bus, l1, mut subscriber) = setup().await;
    bus.publish(&[message("a", 1)]).await.unwrap();
    subscriber.step().await.unwrap();
    bus.publish(&[message("b", 2), message("c", 3)])
        .await
        .unwrap();
    subscriber.step().await.unwrap();
    // While the subscriber is away, more is published and the stream is trimmed past it.
    bus.publish(&[message("d", 4), message("e", 5)])
        .await
        .unwrap();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: i64 = redis::cmd("XTRIM")
        .arg("convoy:invalidations")
        .arg("MAXLEN")
        .arg(0)
        .query_async(&mut conn)
        .await
        .unwrap();
    bus.publish(&[message("f", 6)]).await.unwrap();
    l1.set("unrelated", entry(1)).await;
    subscriber.step().await.unwrap();
    assert!(
        l1.get("unrelated", None).await.is_none(),
        "flushed after the gap"
    );
    assert_eq!(subscriber.handle().flushes(), 2);
}

#[tokio::test]
async fn a_redis_restart_flushes_the_l1_and_it_is_not_current_while_down() {
    let (mut redis, bus, l1, mut subscriber) = setup().await;
    bus.publish(&[message("a", 1)]).await.unwrap();
    subscriber.step().await.unwrap();
    subscriber.step().await.unwrap();
    l1.set("kept-while-up", entry(1)).await;

    redis.stop().await.unwrap();
    assert!(subscriber.step().await.is_err());
    assert!(
        !subscriber.handle().is_current(),
        "the L1 must not serve now"
    );

    redis.restart().await.unwrap(); // comes back empty: the stream is gone
    l1.set("filled-while-down", entry(1)).await;
    let mut recovered = false;
    for _ in 0..50 {
        if subscriber.step().await.is_ok() {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "the subscriber reconnects");
    assert!(subscriber.handle().is_current());
    assert!(l1.get("kept-while-up", None).await.is_none());
    assert!(l1.get("filled-while-down", None).await.is_none());
    assert_eq!(subscriber.handle().flushes(), 2);
}

#[tokio::test]
async fn a_message_lost_on_its_way_is_noticed_and_flushes_the_l1() {
    let redis = Redis::start().await.unwrap();
    let bus = L2::new(L2Config::new(redis.url())).unwrap();
    let l1 = L1::new(L1Config::default());
    // Every message read is lost.
    let mut subscriber = Subscriber::new(L2::new(L2Config::new(redis.url())).unwrap(), l1.clone())
        .with_stale_after(None)
        .with_drop_ratio(1.0);
    subscriber.step().await.unwrap();
    l1.set("conv:acme:1", entry(1)).await;
    let ids = bus.publish(&[message("conv:acme:1", 2)]).await.unwrap();
    assert_eq!(subscriber.step().await.unwrap(), 0, "nothing applied");
    assert!(
        l1.get("conv:acme:1", None).await.is_none(),
        "the loss was noticed (the sequence fell short of the bus's) and the L1 flushed"
    );
    assert_eq!(subscriber.handle().flushes(), 2);
    assert_eq!(
        subscriber
            .handle()
            .coherent_through()
            .map(|id| id.to_string()),
        Some(ids[0].clone())
    );
}

#[tokio::test]
async fn with_random_losses_no_invalidated_entry_survives() {
    let (_redis, bus, l1, _) = setup().await;
    let redis_url = _redis.url();
    let mut subscriber = Subscriber::new(L2::new(L2Config::new(redis_url)).unwrap(), l1.clone())
        .with_stale_after(None)
        .with_drop_ratio(0.3);
    subscriber.step().await.unwrap();
    for round in 0..20_i64 {
        let keys: Vec<String> = (0..5).map(|k| format!("k{round}-{k}")).collect();
        for key in &keys {
            l1.set(key, entry(1)).await;
        }
        let messages: Vec<BusMessage> = keys.iter().map(|k| message(k, 2)).collect();
        let ids = bus.publish(&messages).await.unwrap();
        subscriber.step().await.unwrap();
        for key in &keys {
            assert!(
                l1.get(key, None).await.is_none(),
                "{key} survived its invalidation"
            );
        }
        assert_eq!(
            subscriber
                .handle()
                .coherent_through()
                .map(|id| id.to_string())
                .as_ref(),
            ids.last()
        );
    }
    assert!(
        subscriber.handle().flushes() > 1,
        "some losses were injected and noticed"
    );
}

#[tokio::test]
async fn concurrent_publishers_number_messages_without_holes() {
    let (_redis, bus, _, _) = setup().await;
    let bus = std::sync::Arc::new(bus);
    let publishers: Vec<_> = (0..4)
        .map(|p| {
            let bus = bus.clone();
            tokio::spawn(async move {
                for i in 0..25 {
                    bus.publish(&[message(&format!("p{p}-{i}"), 1), message("x", 2)])
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for p in publishers {
        p.await.unwrap();
    }
    let read = bus.read_bus("0", 1000).await.unwrap();
    let seqs: Vec<u64> = read.iter().map(|r| r.seq.unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=200).collect::<Vec<u64>>(),
        "in stream order, contiguous"
    );
    // Every field comes back as it was published.
    for received in &read {
        let got = received.message.as_ref().expect("a well-formed message");
        assert_eq!(got, &message(&got.key, got.version.0));
    }
}

#[tokio::test]
async fn copies_from_another_l1_are_allowed_only_from_one_past_the_last_flush() {
    let (mut redis, bus, _l1, mut subscriber) = setup().await;
    let first = bus.publish(&[message("a", 1)]).await.unwrap();
    subscriber.step().await.unwrap(); // the first step flushes, standing in for `a`
    let handle = subscriber.handle();
    let first = StreamId::parse(&first[0]).unwrap();
    assert!(handle.may_copy_from(first), "a peer that applied `a`");
    assert!(
        !handle.may_copy_from(StreamId(0, 0)),
        "a peer behind the flush"
    );

    // A restart loses the bus: until a message of the new bus is read, no peer is known to
    // have noticed, so nothing may be copied.
    redis.restart().await.unwrap();
    let mut stepped = false;
    for _ in 0..50 {
        if subscriber.step().await.is_ok() {
            stepped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(stepped);
    assert!(!handle.may_copy_from(StreamId(u64::MAX, 0)));
    let next = bus.publish(&[message("b", 2)]).await.unwrap();
    subscriber.step().await.unwrap();
    let next = StreamId::parse(&next[0]).unwrap();
    assert!(handle.may_copy_from(next));
    assert!(!handle.may_copy_from(first), "a peer still on the old bus");
}

fn heartbeat(backlog: Duration) -> Heartbeat {
    Heartbeat {
        relay: "relay-1".into(),
        backlog,
    }
}

#[tokio::test]
async fn an_l1_serves_only_while_a_relay_vouches_for_the_bus_and_is_flushed_when_one_does_again() {
    let redis = Redis::start().await.unwrap();
    let bus = L2::new(L2Config::new(redis.url())).unwrap();
    let l1 = L1::new(L1Config::default());
    let bound = Duration::from_millis(300);
    let mut subscriber = Subscriber::new(L2::new(L2Config::new(redis.url())).unwrap(), l1.clone())
        .with_stale_after(Some(bound));
    let handle = subscriber.handle();
    let mut changes = handle.current_changes();
    subscriber.step().await.unwrap();
    assert!(!handle.is_current(), "no relay has spoken yet");

    bus.heartbeat(&heartbeat(Duration::ZERO)).await.unwrap();
    subscriber.step().await.unwrap();
    assert!(handle.is_current());
    assert!(*changes.borrow_and_update());
    assert_eq!(handle.flushes(), 1, "only the first subscription's flush");

    // Heartbeats and messages both are numbered: neither is a gap or malformed.
    bus.publish(&[message("a", 1)]).await.unwrap();
    bus.heartbeat(&heartbeat(Duration::ZERO)).await.unwrap();
    assert_eq!(subscriber.step().await.unwrap(), 1);
    assert_eq!(handle.flushes(), 1);

    // A relay that speaks but reports a backlog past the bound: invalidations are held up.
    l1.set("held", entry(1)).await;
    bus.heartbeat(&heartbeat(Duration::from_secs(10)))
        .await
        .unwrap();
    subscriber.step().await.unwrap();
    assert!(!handle.is_current(), "a backlog past the bound");
    assert!(!*changes.borrow_and_update());

    // It catches up: the L1 is flushed (it may hold what the held-up invalidations named)
    // and serves again.
    bus.heartbeat(&heartbeat(Duration::ZERO)).await.unwrap();
    subscriber.step().await.unwrap();
    assert!(handle.is_current());
    assert!(
        l1.get("held", None).await.is_none(),
        "flushed on catching up"
    );
    assert_eq!(handle.flushes(), 2);

    // Silence: once no relay has spoken for the bound, the L1 stops serving (polled: the
    // bound is real time here; the verdict's timing is tested under a paused clock).
    l1.set("silent", entry(1)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while handle.is_current() {
        assert!(tokio::time::Instant::now() < deadline, "never went stale");
        subscriber.step().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bus.heartbeat(&heartbeat(Duration::ZERO)).await.unwrap();
    subscriber.step().await.unwrap();
    assert!(handle.is_current());
    assert!(l1.get("silent", None).await.is_none());
    assert_eq!(handle.flushes(), 3);
}
