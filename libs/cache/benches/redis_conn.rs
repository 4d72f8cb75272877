//! How L2 should hold its Redis connections: a deadpool-redis pool (a `UNWATCH` + `PING` round
//! trip on every checkout) against one multiplexed connection shared by clones, next to a raw
//! RESP round trip on a plain socket (the floor), all against one real Redis in one run.
//!
//! Each read is timed one at a time (latency) and with 16 tasks issuing reads at once (per-read
//! time under concurrency, reported as throughput): multiplexing pipelines concurrent requests
//! on one socket, so that is where it should differ most. Two reads: `GET` of a small plain key,
//! and L2's own read (a `MULTI`/`EXEC` of `HMGET` + `PTTL`), each through the pool and through
//! the multiplexed connection, plus `L2::get` as it is configured now.
//!
//! `cargo bench -p convoy-cache --bench redis_conn -- --warm-up-time 1 --measurement-time 3`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use convoy_cache::l2::{L2, L2Config};
use convoy_cache::{Entry, Version};
use convoy_testkit::Redis;
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};
use deadpool_redis::redis::aio::MultiplexedConnection;
use deadpool_redis::redis::{self, AsyncConnectionConfig, Pipeline};
use deadpool_redis::{Manager, Pool, PoolConfig, Runtime, Timeouts};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

/// Tasks issuing reads at once in the concurrent group.
const TASKS: u64 = 16;
/// The small value read by every `GET`.
const VALUE: &[u8] = &[b'v'; 100];
/// Its plain key.
const PLAIN_KEY: &str = "bench:plain";
/// Its L2 key (stored through `L2::set`, read by `L2::get` and the L2-shaped pipeline).
const L2_KEY: &str = "bench:l2";

// === the contenders ===

/// Everything the benchmarks read through, shared by every task.
#[derive(Clone)]
struct Contenders {
    /// A deadpool-redis pool configured as L2's was: 16 connections, every step bounded.
    pool: Pool,
    /// One multiplexed connection; each task uses a clone.
    multiplexed: MultiplexedConnection,
    /// L2 as the crate configures it now.
    l2: Arc<L2>,
    /// One plain socket per task, speaking RESP by hand (the floor).
    raw: Arc<Vec<Mutex<TcpStream>>>,
}

impl Contenders {
    async fn start(redis: &Redis) -> Self {
        let connection = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_millis(500)));
        let manager = Manager::new_with_config(redis.url().as_str(), connection.clone()).unwrap();
        let mut pool_config = PoolConfig::new(16);
        pool_config.timeouts = Timeouts {
            wait: Some(Duration::from_millis(250)),
            create: Some(Duration::from_millis(500)),
            recycle: Some(Duration::from_millis(250)),
        };
        let pool = Pool::builder(manager)
            .config(pool_config)
            .runtime(Runtime::Tokio1)
            .build()
            .unwrap();
        let client = redis::Client::open(redis.url()).unwrap();
        let mut multiplexed = client
            .get_multiplexed_async_connection_with_config(&connection)
            .await
            .unwrap();
        let _: () = redis::cmd("SET")
            .arg(PLAIN_KEY)
            .arg(VALUE)
            .query_async(&mut multiplexed)
            .await
            .unwrap();
        let l2 = L2::new(L2Config::new(redis.url())).unwrap();
        let entry = Entry {
            value: Bytes::from_static(VALUE),
            version: Version(1),
            tags: Vec::new(),
            ttl: Duration::from_secs(3600),
        };
        l2.set(L2_KEY, &entry).await.unwrap();
        let mut raw = Vec::new();
        for _ in 0..TASKS {
            let stream = TcpStream::connect(("127.0.0.1", redis.port()))
                .await
                .unwrap();
            stream.set_nodelay(true).unwrap();
            raw.push(Mutex::new(stream));
        }
        let contenders = Contenders {
            pool,
            multiplexed,
            l2: Arc::new(l2),
            raw: Arc::new(raw),
        };
        // Open every pooled connection now (16 held at once), so no timed read pays a connect.
        let mut held = Vec::new();
        for _ in 0..16 {
            held.push(contenders.pool.get().await.unwrap());
        }
        drop(held);
        contenders
    }

    /// Reads once through `via`; `task` picks the raw socket.
    async fn read(&self, via: Via, task: usize) {
        match via {
            Via::RawGet => raw_get(&self.raw[task]).await,
            Via::PooledGet => {
                let mut conn = self.pool.get().await.unwrap();
                check(
                    redis::cmd("GET")
                        .arg(PLAIN_KEY)
                        .query_async(&mut conn)
                        .await,
                );
            }
            Via::MultiplexedGet => {
                let mut conn = self.multiplexed.clone();
                check(
                    redis::cmd("GET")
                        .arg(PLAIN_KEY)
                        .query_async(&mut conn)
                        .await,
                );
            }
            Via::PooledL2Read => {
                let mut conn = self.pool.get().await.unwrap();
                check_l2(l2_read().query_async(&mut conn).await);
            }
            Via::MultiplexedL2Read => {
                let mut conn = self.multiplexed.clone();
                check_l2(l2_read().query_async(&mut conn).await);
            }
            Via::L2Get => {
                let entry = self.l2.get(L2_KEY).await.unwrap().unwrap();
                assert_eq!(entry.value.len(), VALUE.len());
            }
        }
    }
}

/// One way of reading.
#[derive(Clone, Copy, Debug)]
enum Via {
    RawGet,
    PooledGet,
    MultiplexedGet,
    PooledL2Read,
    MultiplexedL2Read,
    L2Get,
}

impl Via {
    const ALL: [Via; 6] = [
        Via::RawGet,
        Via::PooledGet,
        Via::MultiplexedGet,
        Via::PooledL2Read,
        Via::MultiplexedL2Read,
        Via::L2Get,
    ];

    fn name(self) -> &'static str {
        match self {
            Via::RawGet => "GET, raw RESP on a plain socket (floor)",
            Via::PooledGet => "GET, deadpool-redis pooled connection",
            Via::MultiplexedGet => "GET, shared multiplexed connection",
            Via::PooledL2Read => "L2 read pipeline, pooled connection",
            Via::MultiplexedL2Read => "L2 read pipeline, multiplexed connection",
            Via::L2Get => "L2::get (as configured now)",
        }
    }
}

/// L2's read of one key: `MULTI`, `HMGET v d t`, `PTTL`, `EXEC`.
fn l2_read() -> Pipeline {
    let entry_key = format!("convoy:e:{L2_KEY}");
    let mut pipe = redis::pipe();
    pipe.atomic();
    pipe.cmd("HMGET").arg(&entry_key).arg("v").arg("d").arg("t");
    pipe.cmd("PTTL").arg(&entry_key);
    pipe
}

fn check(reply: redis::RedisResult<Vec<u8>>) {
    assert_eq!(reply.unwrap().len(), VALUE.len());
}

/// The reply to [`l2_read`]: the entry's fields `v`, `d`, `t`, then its TTL.
type L2Reply = ((Option<String>, Option<Vec<u8>>, Option<String>), i64);

fn check_l2(reply: redis::RedisResult<L2Reply>) {
    let ((_, value, _), _) = reply.unwrap();
    assert_eq!(value.map(|v| v.len()), Some(VALUE.len()));
}

/// `GET` written as RESP by hand and its reply read back exactly: the round trip with no
/// client library in it.
async fn raw_get(stream: &Mutex<TcpStream>) {
    let request = format!("*2\r\n$3\r\nGET\r\n${}\r\n{PLAIN_KEY}\r\n", PLAIN_KEY.len());
    let header = format!("${}\r\n", VALUE.len());
    let mut reply = vec![0; header.len() + VALUE.len() + 2];
    let mut stream = stream.lock().await;
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.read_exact(&mut reply).await.unwrap();
    assert!(reply.starts_with(header.as_bytes()));
}

/// Runs each of `tasks` on its own Tokio task (so they spread over the runtime's workers, as
/// concurrent requests would) and waits for them all.
async fn spawn_all<F>(tasks: Vec<F>)
where
    F: Future<Output = ()> + Send + 'static,
{
    let handles: Vec<_> = tasks.into_iter().map(tokio::spawn).collect();
    for handle in handles {
        handle.await.unwrap();
    }
}

// === benchmarks ===

fn one_at_a_time(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &tokio::runtime::Runtime,
    c: &Contenders,
) {
    for via in Via::ALL {
        group.bench_function(via.name(), |b| {
            b.to_async(rt).iter(|| c.read(via, 0));
        });
    }
}

/// `iters` reads shared among [`TASKS`] tasks; the time reported per read is the wall time
/// over `iters`, so its inverse is throughput.
fn concurrent(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &tokio::runtime::Runtime,
    c: &Contenders,
) {
    group.throughput(Throughput::Elements(1));
    for via in Via::ALL {
        group.bench_function(via.name(), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let c = c.clone();
                async move {
                    let left = Arc::new(AtomicU64::new(iters));
                    let started = Instant::now();
                    let tasks: Vec<_> = (0..TASKS as usize)
                        .map(|task| {
                            let c = c.clone();
                            let left = Arc::clone(&left);
                            async move {
                                while left
                                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                                        n.checked_sub(1)
                                    })
                                    .is_ok()
                                {
                                    c.read(via, task).await;
                                }
                            }
                        })
                        .collect();
                    spawn_all(tasks).await;
                    started.elapsed()
                }
            });
        });
    }
}

fn redis_conn(criterion: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (redis, contenders) = rt.block_on(async {
        let redis = Redis::start().await.unwrap();
        let contenders = Contenders::start(&redis).await;
        (redis, contenders)
    });

    let mut group = criterion.benchmark_group("redis_read_one_at_a_time");
    one_at_a_time(&mut group, &rt, &contenders);
    group.finish();

    let mut group = criterion.benchmark_group("redis_read_16_tasks");
    concurrent(&mut group, &rt, &contenders);
    group.finish();

    drop(contenders);
    drop(redis);
}

criterion_group!(benches, redis_conn);
criterion_main!(benches);
