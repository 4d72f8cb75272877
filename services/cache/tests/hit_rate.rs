//! The cache tier's hit rate under a skewed read load: 100,000 conversation keys read with
//! Zipf(1.0) popularity, an L1 sized for about a tenth of them, Redis (testkit) behind it.
//!
//! Readers read through with Lease, as convoy's callers do: a hit is done; a lease token means
//! "load from the database" (an in-test function that counts its loads), then Set with the
//! token; "retry after" means another reader is loading, so wait and ask again. The service
//! runs in-process, wired as `cache_service::serve` wires it, and its trait methods are called
//! directly (no network). Figures come from the Stats RPC over the measured phase (and the
//! metrics must agree with it), after a
//! warm-up phase of the same load.
//!
//! `cargo test -p cache --test hit_rate -- --nocapture` prints them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cache_service::CacheApi;
use convoy_cache::l1::{L1, L1Config};
use convoy_cache::l2::{L2, L2Config};
use convoy_cache::subscriber::{self, Subscriber};
use convoy_proto::v1 as pb;
use convoy_proto::v1::cache_service_server::CacheService;
use convoy_proto::v1::lease_response::Outcome;
use convoy_testkit::Redis;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::Request;

/// Conversation keys in the key space.
const KEYS: usize = 100_000;
/// Zipf exponent: the key of popularity rank r is read with probability ∝ 1/r.
const ZIPF_S: f64 = 1.0;
/// Values are 400 to 600 bytes.
const MIN_VALUE_BYTES: usize = 400;
/// See [`MIN_VALUE_BYTES`].
const MAX_VALUE_BYTES: usize = 600;
/// Readers at once (each a task with its own seeded generator).
const READERS: u64 = 8;
/// Reads before measuring. Under Zipf(1.0) over 100,000 keys the first read of each key is a
/// miss whatever the cache does, and those first reads thin out slowly: after 600,000 reads
/// about 11,000 of the next 300,000 are still first reads, so a combined hit rate of about
/// 0.96 is what a perfect cache could show here.
const WARM_UP_READS: u64 = 600_000;
/// Reads measured.
const MEASURED_READS: u64 = 300_000;
/// Seed of every reader's generator, so each run reads the same keys in the same order per
/// reader (the interleaving of readers still varies).
const SEED: u64 = 20_261_122;
/// Longest TTL, as the service's default (5 min): nothing expires during the test.
const MAX_TTL: Duration = Duration::from_secs(300);
/// How often the bus subscriber polls, as the service's default.
const BUS_POLL: Duration = Duration::from_millis(10);

// === the load ===

/// Zipf(s) over ranks `0..n`: rank r is drawn with probability ∝ 1/(r+1)^s, by a binary
/// search in the precomputed cumulative distribution.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut total = 0.0;
        let mut cdf: Vec<f64> = (1..=n)
            .map(|rank| {
                total += (rank as f64).powf(-s);
                total
            })
            .collect();
        for c in &mut cdf {
            *c /= total;
        }
        Zipf { cdf }
    }

    fn sample(&self, rng: &mut impl Rng) -> usize {
        let u: f64 = rng.random();
        self.cdf
            .partition_point(|&c| c <= u)
            .min(self.cdf.len() - 1)
    }
}

/// The key of conversation `id` (the popularity rank is the id: 0 is the hottest).
fn key(id: usize) -> String {
    format!("conv:team-{}:{id:08}", id % 500)
}

/// A well-mixed hash of `id` (splitmix64's finalizer), for value sizes.
fn mix(id: usize) -> u64 {
    let mut z = (id as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The stored value of conversation `id`: 400 to 600 bytes, the same on every call.
fn value(id: usize) -> Vec<u8> {
    let len = MIN_VALUE_BYTES + (mix(id) % (MAX_VALUE_BYTES - MIN_VALUE_BYTES + 1) as u64) as usize;
    format!("conversation {id};")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(len)
        .collect()
}

/// The source of truth behind the cache: deterministic values, and a count of loads.
#[derive(Default)]
struct Database {
    loads: AtomicU64,
}

impl Database {
    fn load(&self, id: usize) -> Vec<u8> {
        self.loads.fetch_add(1, Ordering::Relaxed);
        value(id)
    }

    fn loads(&self) -> u64 {
        self.loads.load(Ordering::Relaxed)
    }
}

// === the readers ===

/// Reads conversation `id` through the cache: Lease; on a hit, done; with the lease, load
/// and Set with its token; told to retry, wait and ask again.
async fn read_through(api: &CacheApi, db: &Database, id: usize) {
    let key = key(id);
    loop {
        let reply = api
            .lease(Request::new(pb::LeaseRequest {
                key: key.clone(),
                lease_ttl: None,
                tags: Vec::new(),
            }))
            .await
            .expect("Lease failed")
            .into_inner();
        match reply.outcome.expect("a Lease reply has an outcome") {
            Outcome::Entry(entry) => {
                assert_eq!(entry.value, value(id), "{key} served a wrong value");
                return;
            }
            Outcome::LeaseToken(lease_token) => {
                let entry = pb::CacheEntry {
                    key,
                    value: db.load(id),
                    version: 1,
                    tags: Vec::new(),
                    ttl: None,
                };
                let set = api
                    .set(Request::new(pb::CacheSetRequest {
                        entry: Some(entry),
                        lease_token,
                    }))
                    .await
                    .expect("Set failed")
                    .into_inner();
                assert_eq!(set.outcome, pb::SetOutcome::Stored as i32);
                return;
            }
            Outcome::RetryAfter(after) => {
                let after = Duration::new(after.seconds as u64, after.nanos as u32);
                tokio::time::sleep(after).await;
            }
        }
    }
}

/// `reads` Zipf reads shared among [`READERS`] tasks; `phase` varies their seeds.
async fn run(api: &CacheApi, db: &Arc<Database>, zipf: &Arc<Zipf>, reads: u64, phase: u64) {
    let tasks: Vec<_> = (0..READERS)
        .map(|reader| {
            let (api, db, zipf) = (api.clone(), Arc::clone(db), Arc::clone(zipf));
            let mine = reads / READERS + u64::from(reader < reads % READERS);
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(SEED ^ (phase << 32) ^ reader);
                for _ in 0..mine {
                    read_through(&api, &db, zipf.sample(&mut rng)).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a reader panicked");
    }
}

/// `convoy_cache_lookups_total` by layer, counted since the last snapshot.
fn lookups(snapshotter: &Snapshotter) -> BTreeMap<String, u64> {
    let mut by_layer = BTreeMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        if key.key().name() != "convoy_cache_lookups_total" {
            continue;
        }
        if let (Some(layer), DebugValue::Counter(n)) =
            (key.key().labels().find(|l| l.key() == "layer"), value)
        {
            *by_layer.entry(layer.value().to_owned()).or_default() += n;
        }
    }
    by_layer
}

async fn stats(api: &CacheApi) -> pb::CacheStatsResponse {
    api.stats(Request::new(pb::CacheStatsRequest {}))
        .await
        .expect("Stats failed")
        .into_inner()
}

// === the test ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zipf_reads_hit_the_cache_over_95_percent_with_an_l1_of_a_tenth_of_the_keys() {
    // The metrics too: this test is alone in its binary, so the recorder is its own.
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().expect("install the metrics recorder");
    let redis = Redis::start().await.expect("start redis");
    let total_value_bytes: u64 = (0..KEYS).map(|id| value(id).len() as u64).sum();
    let capacity = total_value_bytes / 10;

    // As `cache_service::serve` wires it.
    let l1 = L1::new(L1Config {
        capacity_bytes: capacity,
        max_ttl: MAX_TTL,
        ..L1Config::default()
    });
    let l2 = Arc::new(L2::new(L2Config::new(redis.url())).expect("L2"));
    let bus_l2 = L2::new(L2Config::new(redis.url())).expect("bus L2");
    // No relay heartbeats here: the bus's staleness check is off.
    let (bus, subscription) = subscriber::spawn(
        Subscriber::new(bus_l2, l1.clone()).with_stale_after(None),
        BUS_POLL,
    );
    let api = CacheApi::new(l1, l2, bus.clone(), MAX_TTL, capacity);
    // L1 serves only once the subscriber is current.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !bus.is_current() {
        assert!(
            Instant::now() < deadline,
            "the bus subscriber never became current"
        );
        tokio::time::sleep(BUS_POLL).await;
    }

    let db = Arc::new(Database::default());
    let zipf = Arc::new(Zipf::new(KEYS, ZIPF_S));
    let started = Instant::now();
    run(&api, &db, &zipf, WARM_UP_READS, 0).await;
    let warm_up = started.elapsed();

    let before = stats(&api).await;
    // The recorder hands out what was counted since the last snapshot.
    let _ = lookups(&snapshotter);
    let loads_before = db.loads();
    let started = Instant::now();
    run(&api, &db, &zipf, MEASURED_READS, 1).await;
    let measured = started.elapsed();
    let after = stats(&api).await;
    let metered = lookups(&snapshotter);
    let loads = db.loads() - loads_before;
    subscription.abort();

    let l1_hits = (after.l1_hits - before.l1_hits) as u64;
    let l2_hits = (after.l2_hits - before.l2_hits) as u64;
    let misses = (after.misses - before.misses) as u64;
    let total = l1_hits + l2_hits + misses;
    let hit_rate = (l1_hits + l2_hits) as f64 / total as f64;
    println!(
        "warm-up: {WARM_UP_READS} reads in {warm_up:.1?}; measured: {MEASURED_READS} reads in \
         {measured:.1?} ({:.0} reads/s, {READERS} readers)",
        MEASURED_READS as f64 / measured.as_secs_f64()
    );
    println!(
        "L1: {} entries, {} of {} bytes (10% of {total_value_bytes} value bytes); bus flushes: {}",
        after.l1_entries, after.l1_bytes, after.l1_capacity_bytes, after.bus_flushes
    );
    println!(
        "measured: l1_hits {l1_hits}, l2_hits {l2_hits}, misses {misses}, database loads {loads}"
    );
    println!(
        "L1 share {:.4}, L2 share {:.4}, combined hit rate {hit_rate:.4}",
        l1_hits as f64 / total as f64,
        l2_hits as f64 / total as f64,
    );

    // Lease counts each answered read once: an L1 or L2 hit, or a miss when it grants the
    // lease; "retry after" counts nothing, so a read that waited is counted by the Lease that
    // finally answered it.
    assert_eq!(
        total, MEASURED_READS,
        "every read is counted once, as a hit or a miss"
    );
    assert_eq!(loads, misses, "every miss caused exactly one database load");
    assert_eq!(
        metered,
        [
            ("l1".to_owned(), l1_hits),
            ("l2".to_owned(), l2_hits),
            ("miss".to_owned(), misses)
        ]
        .into_iter()
        .collect(),
        "convoy_cache_lookups_total agrees with Stats"
    );
    assert!(
        hit_rate > 0.95,
        "combined hit rate {hit_rate:.4} (L1 {l1_hits}, L2 {l2_hits}, misses {misses})"
    );
    assert_eq!(
        after.bus_flushes, before.bus_flushes,
        "no L1 flush while measuring"
    );
}
