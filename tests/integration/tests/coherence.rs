//! Cache coherence under concurrency and faults, checked on a recorded history.
//!
//! Two conversation instances (each with its own L1) read through two cache instances, over
//! two real Postgres shards and a real Redis. Writers update a few conversations; readers
//! read them through either instance, half of the time with the consistency token of the
//! conversation's latest acknowledged write. A monitor follows the bus and every L1's
//! subscriber in the process (`coherent_through`: the stream id through which each L1 has
//! applied, or flushed past, every invalidation), so each write's *delivery* time is the
//! first moment every L1 was past a message invalidating its predecessors. Observing it by
//! polling only makes it later than the truth, so the checks below are sound:
//!
//! 1. a read with a token never returns a version older than the token's;
//! 2. a read never returns a version older than a write delivered before the read started;
//! 3. every acknowledged write is delivered (no invalidation is lost).
//!
//! Each scenario adds one fault: the bus losing messages at random (injected in every
//! subscriber), Redis restarted mid-run, and an instance that never relays (as if it always
//! died between commit and publish) killed mid-run. The time from a write's acknowledgement
//! to its delivery is printed as p50/p99/max.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use convoy_cache::bus::StreamId;
use convoy_cache::l2::{L2, L2Config};
use convoy_cache::subscriber;
use convoy_integration_tests::{CacheInstance, Fleet, channel_to, new_conversation};
use convoy_proto::consistency::HEADER;
use convoy_proto::v1 as pb;
use convoy_proto::v1::conversation_service_client::ConversationServiceClient;
use convoy_testkit::Redis;
use rand::Rng;
use tokio::time::Instant;

/// Conversations written and read: few, so writes and reads collide.
const KEYS: usize = 4;
const WRITERS: usize = 3;
const READERS: usize = 4;
/// How long writers write at least.
const RUN: Duration = Duration::from_secs(3);
/// Writers go on past [`RUN`] until the history holds this many acknowledged writes and
/// [`MIN_READS`] reads: the checks mean something only with enough of both, and how long
/// that takes depends on the machine (a debug build with the four scenarios side by side on
/// two cores reads far slower than a release build alone).
const MIN_WRITES: usize = 60;
/// See [`MIN_WRITES`].
const MIN_READS: usize = 250;
/// The most writers go on for, enough or not (then the checks say how much was gathered).
const MAX_RUN: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    None,
    BusDrops,
    RedisRestart,
    InstanceKilled,
}

#[derive(Debug)]
struct Write {
    key: usize,
    version: i64,
    acked: Instant,
}

#[derive(Debug)]
struct Read {
    key: usize,
    started: Instant,
    version: i64,
    min: Option<i64>,
    took: Duration,
}

#[derive(Default)]
struct History {
    writes: Vec<Write>,
    reads: Vec<Read>,
    /// The latest acknowledged write's token, per key.
    tokens: HashMap<usize, (i64, String)>,
}

#[derive(Default)]
struct Observed {
    /// (stream id, key, version) of each bus message, in stream order.
    messages: Vec<(StreamId, String, i64)>,
    /// (when, the least `coherent_through` over every live L1 of this fleet).
    watermarks: Vec<(Instant, StreamId)>,
}

impl History {
    /// Whether writers may stop after `elapsed`: [`RUN`] is over and the history holds
    /// enough to check, or [`MAX_RUN`] is over.
    fn enough(&self, elapsed: Duration) -> bool {
        elapsed >= MAX_RUN
            || (elapsed >= RUN && self.writes.len() >= MIN_WRITES && self.reads.len() >= MIN_READS)
    }
}

fn version_of(etag: &str) -> i64 {
    etag.trim_matches('"')
        .parse()
        .expect("etag is a quoted version")
}

async fn run(fault: Fault) {
    let mut redis = Redis::start().await.unwrap();
    let url = redis.url();
    let drops: &[&str] = if fault == Fault::BusDrops {
        &["--fault-bus-drop-ratio", "0.2"]
    } else {
        &[]
    };
    let cache_flags: Vec<&str> = [&["--bus-poll-ms", "2"][..], drops].concat();
    let caches = [
        CacheInstance::start(&url, &cache_flags).await,
        CacheInstance::start(&url, &cache_flags).await,
    ];
    let cache_addrs = format!("{},{}", caches[0].addr, caches[1].addr);
    let conversation_flags: Vec<&str> = [
        &[
            "--redis-url",
            &url,
            "--cache-addr",
            &cache_addrs,
            "--bus-poll-ms",
            "2",
        ][..],
        drops,
    ]
    .concat();
    let fleet = Fleet::start_with(2, &conversation_flags).await;
    let second = fleet.spawn_instance(&conversation_flags).await;
    // The instance that dies between commit and publish: it never relays.
    let doomed = match fault {
        Fault::InstanceKilled => {
            let flags = [&conversation_flags[..], &["--fault-no-relay"]].concat();
            Some(fleet.spawn_instance(&flags).await)
        }
        _ => None,
    };
    let readers_at = [fleet.addr, second.addr];
    let mut writers_at = vec![fleet.addr, second.addr];
    if let Some(doomed) = &doomed {
        writers_at.push(doomed.addr);
    }

    // The conversations, across both shards' teams.
    let mut client = fleet.client().await;
    let mut names = Vec::new();
    for k in 0..KEYS {
        let created = client
            .create_conversation(new_conversation(&format!("team-{k}"), "t", "c"))
            .await
            .unwrap()
            .into_inner();
        names.push(created.name);
    }
    let keys: Vec<String> = names
        .iter()
        .map(|n| {
            let mut parts = n.split('/');
            let (_, team, _, id) = (parts.next(), parts.next(), parts.next(), parts.next());
            format!("conv:{}:{}", team.unwrap(), id.unwrap())
        })
        .collect();

    let history = Arc::new(Mutex::new(History::default()));
    let observed = Arc::new(Mutex::new(Observed::default()));
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));

    let monitor = tokio::spawn(monitor(url.clone(), observed.clone(), stopped.clone()));

    let started = Instant::now();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let mut clients = Vec::new();
        for addr in &writers_at {
            clients.push(ConversationServiceClient::new(channel_to(*addr).await));
        }
        let names = names.clone();
        let history = history.clone();
        writers.push(tokio::spawn(async move {
            let mut n = 0;
            while !history.lock().unwrap().enough(started.elapsed()) {
                n += 1;
                let (key, via, pause) = {
                    let mut rng = rand::rng();
                    (
                        rng.random_range(0..KEYS),
                        rng.random_range(0..clients.len()),
                        rng.random_range(0..4),
                    )
                };
                let request = pb::UpdateConversationRequest {
                    conversation: Some(pb::Conversation {
                        name: names[key].clone(),
                        title: format!("w{w}-{n}"),
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["title".into()],
                    }),
                };
                // Writes through the doomed instance may fail once it is gone: only
                // acknowledged writes enter the history.
                if let Ok(response) = clients[via].update_conversation(request).await {
                    let acked = Instant::now();
                    let token = response
                        .metadata()
                        .get(HEADER)
                        .unwrap()
                        .to_str()
                        .unwrap()
                        .to_owned();
                    let version = version_of(&response.get_ref().etag);
                    let mut h = history.lock().unwrap();
                    h.writes.push(Write {
                        key,
                        version,
                        acked,
                    });
                    let latest = h.tokens.entry(key).or_insert((0, String::new()));
                    if latest.0 < version {
                        *latest = (version, token);
                    }
                }
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }));
    }
    let mut readers = Vec::new();
    for _ in 0..READERS {
        let mut clients = Vec::new();
        for addr in &readers_at {
            clients.push(ConversationServiceClient::new(channel_to(*addr).await));
        }
        let names = names.clone();
        let history = history.clone();
        let mut stop = stop_rx.clone();
        readers.push(tokio::spawn(async move {
            while !*stop.borrow() {
                let (key, via, with_token) = {
                    let mut rng = rand::rng();
                    (
                        rng.random_range(0..KEYS),
                        rng.random_range(0..clients.len()),
                        rng.random_bool(0.5),
                    )
                };
                let token = with_token
                    .then(|| history.lock().unwrap().tokens.get(&key).cloned())
                    .flatten();
                let mut request = tonic::Request::new(pb::GetConversationRequest {
                    name: names[key].clone(),
                });
                if let Some((_, token)) = &token {
                    request
                        .metadata_mut()
                        .insert(HEADER, token.parse().unwrap());
                }
                let read_started = Instant::now();
                let response = tokio::select! {
                    _ = stop.changed() => return,
                    response = clients[via].get_conversation(request) => response,
                };
                let conversation = response
                    .unwrap_or_else(|s| panic!("reads never fail because of a cache: {s:?}"))
                    .into_inner();
                history.lock().unwrap().reads.push(Read {
                    key,
                    started: read_started,
                    version: version_of(&conversation.etag),
                    min: token.map(|(v, _)| v),
                    took: read_started.elapsed(),
                });
            }
        }));
    }

    // The fault, mid-run.
    match fault {
        Fault::RedisRestart => {
            tokio::time::sleep(RUN / 3).await;
            redis.stop().await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            redis.restart().await.unwrap();
        }
        Fault::InstanceKilled => {
            tokio::time::sleep(RUN / 2).await;
            doomed.expect("started above").kill();
        }
        Fault::None | Fault::BusDrops => {}
    }
    for writer in writers {
        writer.await.unwrap();
    }
    // Every acknowledged write must be delivered: wait (bounded) until the last is.
    let writes_done = Instant::now();
    let last_writes: HashMap<usize, i64> = {
        let h = history.lock().unwrap();
        let mut last = HashMap::new();
        for w in &h.writes {
            let v = last.entry(w.key).or_insert(0);
            *v = (*v).max(w.version);
        }
        last
    };
    loop {
        let all_delivered = {
            let o = observed.lock().unwrap();
            let through = o.watermarks.last().map(|(_, w)| *w);
            last_writes.iter().all(|(key, version)| {
                o.messages.iter().any(|(id, k, v)| {
                    k == &keys[*key] && v >= version && through.is_some_and(|t| t >= *id)
                })
            })
        };
        if all_delivered {
            break;
        }
        assert!(
            writes_done.elapsed() < Duration::from_secs(15),
            "acknowledged writes were never delivered to every L1 ({fault:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let readers see the final state for a moment, then stop everything.
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.send(true).unwrap();
    for reader in readers {
        reader.await.unwrap();
    }
    stopped.store(true, std::sync::atomic::Ordering::Release);
    monitor.await.unwrap();

    check(
        fault,
        &keys,
        &history.lock().unwrap(),
        &observed.lock().unwrap(),
    );
    // The reads exercised the caches, not only the primary.
    let mut hits = 0;
    for cache in &caches {
        let stats = cache
            .client()
            .await
            .stats(pb::CacheStatsRequest {})
            .await
            .unwrap()
            .into_inner();
        hits += stats.l1_hits + stats.l2_hits;
    }
    assert!(
        hits > 0,
        "{fault:?}: no read was answered by a cache instance"
    );
    drop(second);
}

/// Follows the bus and the L1s' watermarks until `stopped`.
async fn monitor(
    url: String,
    observed: Arc<Mutex<Observed>>,
    stopped: Arc<std::sync::atomic::AtomicBool>,
) {
    let bus = L2::new(L2Config::new(url.clone())).unwrap();
    let mut after = StreamId(0, 0);
    while !stopped.load(std::sync::atomic::Ordering::Acquire) {
        // The watermark first: a message read after it cannot be counted delivered early.
        let handles: Vec<_> = subscriber::live()
            .into_iter()
            .filter(|h| h.source() == url)
            .collect();
        let least = handles
            .iter()
            .map(|h| h.coherent_through())
            .collect::<Option<Vec<_>>>()
            .and_then(|w| w.into_iter().min());
        let now = Instant::now();
        if let Ok(received) = bus.read_bus(&after.to_string(), 1000).await {
            let mut o = observed.lock().unwrap();
            for r in received {
                after = r.id;
                if let Some(m) = r.message {
                    o.messages.push((r.id, m.key, m.version.0));
                }
            }
            if let Some(least) = least {
                o.watermarks.push((now, least));
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn check(fault: Fault, keys: &[String], history: &History, observed: &Observed) {
    // When each stream id was first seen delivered to every L1.
    let delivered_at = |id: StreamId| -> Option<Instant> {
        observed
            .watermarks
            .iter()
            .find(|(_, w)| *w >= id)
            .map(|(t, _)| *t)
    };
    // Per key: (delivery time, version) of each message.
    let mut deliveries: HashMap<&str, Vec<(Instant, i64)>> = HashMap::new();
    for (id, key, version) in &observed.messages {
        if let Some(t) = delivered_at(*id) {
            deliveries
                .entry(key.as_str())
                .or_default()
                .push((t, *version));
        }
    }
    let newest_delivered_before = |key: usize, t: Instant| -> i64 {
        deliveries
            .get(keys[key].as_str())
            .map(|d| {
                d.iter()
                    .filter(|(at, _)| *at < t)
                    .map(|(_, v)| *v)
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    };

    assert!(
        history.writes.len() >= MIN_WRITES && history.reads.len() >= MIN_READS,
        "{fault:?}: too few to mean anything in {MAX_RUN:?}: {} writes, {} reads",
        history.writes.len(),
        history.reads.len()
    );
    let mut token_reads = 0;
    for read in &history.reads {
        if let Some(min) = read.min {
            token_reads += 1;
            assert!(
                read.version >= min,
                "{fault:?}: a read with a token for v{min} returned v{} of key {}",
                read.version,
                read.key
            );
        }
        // A message at version v' invalidates everything older than v'; the row then had
        // v' (or, for a deletion, none): a read after its delivery returns at least v'.
        let fresh = newest_delivered_before(read.key, read.started);
        assert!(
            read.version >= fresh,
            "{fault:?}: a read of key {} started after v{fresh} was delivered to every L1, \
             and returned v{}",
            read.key,
            read.version
        );
    }
    assert!(token_reads > 0);

    // Delay from acknowledgement to delivery.
    let mut delays: Vec<Duration> = history
        .writes
        .iter()
        .map(|w| {
            let delivered = deliveries
                .get(keys[w.key].as_str())
                .and_then(|d| {
                    d.iter()
                        .filter(|(_, v)| *v >= w.version)
                        .map(|(t, _)| *t)
                        .min()
                })
                .unwrap_or_else(|| {
                    panic!(
                        "{fault:?}: the write of v{} to key {} was never delivered",
                        w.version, w.key
                    )
                });
            delivered.saturating_duration_since(w.acked)
        })
        .collect();
    delays.sort();
    let at = |q: f64| delays[((delays.len() - 1) as f64 * q).round() as usize];
    let mut took: Vec<Duration> = history.reads.iter().map(|r| r.took).collect();
    took.sort();
    let read_at = |q: f64| took[((took.len() - 1) as f64 * q).round() as usize];
    println!(
        "coherence {fault:?}: read latency p50 {:?}, p99 {:?}",
        read_at(0.5),
        read_at(0.99)
    );
    println!(
        "coherence {fault:?}: {} writes, {} reads ({token_reads} with a token); \
         acknowledgement to every L1: p50 {:?}, p99 {:?}, max {:?}",
        history.writes.len(),
        history.reads.len(),
        at(0.5),
        at(0.99),
        delays.last().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coherent_without_faults() {
    run(Fault::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coherent_while_the_bus_loses_messages() {
    run(Fault::BusDrops).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coherent_across_a_redis_restart() {
    run(Fault::RedisRestart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coherent_when_an_instance_dies_between_commit_and_publish() {
    run(Fault::InstanceKilled).await;
}
