//! L2 against a real, private Redis (testkit): versions, floors, tags, batches, flush, and
//! what happens when Redis dies or stops answering.

use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use convoy_cache::l2::{L2, L2Config, L2Error};
use convoy_cache::{Entry, SetOutcome, Version};
use convoy_testkit::Redis;
use redis::{self, aio::MultiplexedConnection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type TestResult = Result<(), Box<dyn Error>>;

/// How long a failing operation may take: the default op_timeout (1 s) plus slack.
const FAIL_FAST: Duration = Duration::from_secs(2);

async fn start() -> Result<(Redis, L2), Box<dyn Error>> {
    let redis = Redis::start().await?;
    let l2 = L2::new(L2Config::new(redis.url()))?;
    Ok((redis, l2))
}

async fn raw(redis: &Redis) -> Result<MultiplexedConnection, Box<dyn Error>> {
    let client = redis::Client::open(redis.url())?;
    Ok(client.get_multiplexed_async_connection().await?)
}

fn entry(value: &str, version: i64, tags: &[&str]) -> Entry {
    Entry {
        value: Bytes::from(value.to_owned()),
        version: Version(version),
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        ttl: Duration::from_secs(60),
    }
}

async fn value_of(l2: &L2, key: &str) -> Result<Option<(String, i64)>, Box<dyn Error>> {
    Ok(l2
        .get(key)
        .await?
        .map(|e| (String::from_utf8_lossy(&e.value).into_owned(), e.version.0)))
}

#[tokio::test]
async fn set_then_get_round_trips_until_the_ttl_expires() -> TestResult {
    let (_redis, l2) = start().await?;
    let mut sent = entry("hello", 7, &["team:acme", "kind:conversation"]);
    sent.ttl = Duration::from_millis(300);
    assert_eq!(l2.set("conv:1", &sent).await?, SetOutcome::Stored);

    let got = l2
        .get("conv:1")
        .await?
        .ok_or("entry missing right after set")?;
    assert_eq!(got.value, sent.value);
    assert_eq!(got.version, Version(7));
    assert_eq!(got.tags, sent.tags);
    assert!(
        got.ttl > Duration::from_millis(100) && got.ttl <= sent.ttl,
        "remaining ttl {:?}",
        got.ttl
    );

    // Redis's own clock expires it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(l2.get("conv:1").await?, None);
    Ok(())
}

#[tokio::test]
async fn older_version_is_refused_and_newer_or_equal_is_stored() -> TestResult {
    let (_redis, l2) = start().await?;
    assert_eq!(l2.set("k", &entry("v5", 5, &[])).await?, SetOutcome::Stored);
    assert_eq!(l2.set("k", &entry("v4", 4, &[])).await?, SetOutcome::Stale);
    assert_eq!(value_of(&l2, "k").await?, Some(("v5".into(), 5)));

    // Same version: an idempotent refill is stored.
    assert_eq!(
        l2.set("k", &entry("v5 again", 5, &[])).await?,
        SetOutcome::Stored
    );
    assert_eq!(value_of(&l2, "k").await?, Some(("v5 again".into(), 5)));

    assert_eq!(l2.set("k", &entry("v6", 6, &[])).await?, SetOutcome::Stored);
    assert_eq!(value_of(&l2, "k").await?, Some(("v6".into(), 6)));
    Ok(())
}

#[tokio::test]
async fn stale_set_after_invalidation_is_refused() -> TestResult {
    let (_redis, l2) = start().await?;
    // An earlier fill at v1 is cached.
    assert_eq!(l2.set("k", &entry("v1", 1, &[])).await?, SetOutcome::Stored);
    // A slow filler reads the row at v1; meanwhile a write makes v2 and invalidates.
    l2.invalidate("k", Version(2)).await?;
    assert_eq!(l2.get("k").await?, None);
    // The slow filler's set lands after the invalidation: refused.
    assert_eq!(l2.set("k", &entry("v1", 1, &[])).await?, SetOutcome::Stale);
    assert_eq!(l2.get("k").await?, None);
    // A fill that read v2 is stored.
    assert_eq!(l2.set("k", &entry("v2", 2, &[])).await?, SetOutcome::Stored);
    assert_eq!(value_of(&l2, "k").await?, Some(("v2".into(), 2)));
    Ok(())
}

#[tokio::test]
async fn an_older_invalidation_does_not_lower_the_floor() -> TestResult {
    let (_redis, l2) = start().await?;
    l2.invalidate("k", Version(5)).await?;
    // A late, duplicate or reordered invalidation for an older version.
    l2.invalidate("k", Version(3)).await?;
    assert_eq!(l2.set("k", &entry("v4", 4, &[])).await?, SetOutcome::Stale);
    assert_eq!(l2.set("k", &entry("v5", 5, &[])).await?, SetOutcome::Stored);
    Ok(())
}

#[tokio::test]
async fn floor_is_forgotten_after_floor_ttl() -> TestResult {
    let redis = Redis::start().await?;
    let mut config = L2Config::new(redis.url());
    config.floor_ttl = Duration::from_millis(200);
    let l2 = L2::new(config)?;
    l2.invalidate("k", Version(2)).await?;
    assert_eq!(l2.set("k", &entry("v1", 1, &[])).await?, SetOutcome::Stale);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(l2.set("k", &entry("v1", 1, &[])).await?, SetOutcome::Stored);
    Ok(())
}

#[tokio::test]
async fn invalidate_tags_drops_exactly_the_entries_carrying_the_tag() -> TestResult {
    let (redis, l2) = start().await?;
    l2.set("a", &entry("a", 1, &["team:1"])).await?;
    l2.set("b", &entry("b", 1, &["team:1", "team:2"])).await?;
    l2.set("c", &entry("c", 1, &["team:2"])).await?;
    l2.set("d", &entry("d", 1, &[])).await?;
    // "e" was tagged team:1 once, then re-set without it: its stale index membership must not
    // drop it.
    l2.set("e", &entry("e", 1, &["team:1"])).await?;
    l2.set("e", &entry("e", 1, &["team:3"])).await?;

    // The tag index expires, at least as late as its members.
    let mut conn = raw(&redis).await?;
    let index_ttl: i64 = redis::cmd("PTTL")
        .arg("convoy:t:team:1")
        .query_async(&mut conn)
        .await?;
    assert!(
        (50_000..=60_000).contains(&index_ttl),
        "tag index pttl {index_ttl}"
    );

    assert_eq!(l2.invalidate_tags(&["team:1".into()]).await?, 2);
    assert_eq!(l2.get("a").await?, None);
    assert_eq!(l2.get("b").await?, None);
    assert!(l2.get("c").await?.is_some());
    assert!(l2.get("d").await?.is_some());
    assert!(l2.get("e").await?.is_some());
    let index_exists: i64 = redis::cmd("EXISTS")
        .arg("convoy:t:team:1")
        .query_async(&mut conn)
        .await?;
    assert_eq!(index_exists, 0, "the invalidated tag's index is deleted");

    // Several tags at once; b is already gone, so only c counts.
    assert_eq!(
        l2.invalidate_tags(&["team:2".into(), "team:nobody".into()])
            .await?,
        1
    );
    assert_eq!(l2.get("c").await?, None);
    assert_eq!(l2.invalidate_tags(&[]).await?, 0);
    Ok(())
}

#[tokio::test]
async fn get_many_returns_entries_in_order_in_one_round_trip() -> TestResult {
    let (redis, l2) = start().await?;
    l2.set("k1", &entry("one", 1, &[])).await?;
    l2.set("k3", &entry("three", 3, &["t"])).await?;
    let keys: Vec<String> = ["k1", "k2", "k3"].map(String::from).into();

    let mut conn = raw(&redis).await?;
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await?;
    let got = l2.get_many(&keys).await?;
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await?;

    let got: Vec<Option<(String, i64)>> = got
        .into_iter()
        .map(|e| e.map(|e| (String::from_utf8_lossy(&e.value).into_owned(), e.version.0)))
        .collect();
    assert_eq!(
        got,
        vec![Some(("one".into(), 1)), None, Some(("three".into(), 3))]
    );
    // One transaction carrying every read.
    assert_eq!(calls(&stats, "exec"), 1, "{stats}");
    assert_eq!(calls(&stats, "hmget"), 3, "{stats}");
    assert!(l2.get_many(&[]).await?.is_empty());
    Ok(())
}

/// `calls=` of `cmdstat_{command}` in `INFO commandstats`.
fn calls(stats: &str, command: &str) -> u64 {
    let prefix = format!("cmdstat_{command}:calls=");
    stats
        .lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn bad_tags_versions_and_ttls_are_refused_before_reaching_redis() -> TestResult {
    let (_redis, l2) = start().await?;
    let long = "x".repeat(129);
    let many: Vec<String> = (0..65).map(|i| format!("t{i}")).collect();
    let mut bad = vec![
        entry("v", 1, &[""]),
        entry("v", 1, &["a\u{1f}b"]),
        entry("v", 1, &[long.as_str()]),
        entry("v", (1 << 53) + 1, &[]),
        entry("v", i64::MIN, &[]),
    ];
    let mut too_many = entry("v", 1, &[]);
    too_many.tags = many;
    bad.push(too_many);
    let mut no_ttl = entry("v", 1, &[]);
    no_ttl.ttl = Duration::ZERO;
    bad.push(no_ttl);

    for e in &bad {
        let err = l2.set("k", e).await.expect_err("a bad entry was accepted");
        assert!(matches!(err, L2Error::InvalidArgument(_)), "{err}");
    }
    assert_eq!(l2.get("k").await?, None);
    assert!(matches!(
        l2.invalidate_tags(&[String::new()]).await,
        Err(L2Error::InvalidArgument(_))
    ));
    Ok(())
}

#[tokio::test]
async fn redis_down_fails_fast_and_recovers_after_restart() -> TestResult {
    let (mut redis, l2) = start().await?;
    l2.set("k", &entry("v", 1, &["t"])).await?;
    redis.stop().await?;

    let keys = vec!["k".to_owned()];
    let started = Instant::now();
    let results = [
        l2.get("k").await.map(drop),
        l2.get_many(&keys).await.map(drop),
        l2.set("k", &entry("v", 2, &["t"])).await.map(drop),
        l2.invalidate("k", Version(3)).await,
        l2.invalidate_tags(&["t".into()]).await.map(drop),
        l2.flush().await,
        l2.ping().await,
    ];
    let took = started.elapsed();
    for result in results {
        let err = result.expect_err("an operation succeeded with Redis down");
        assert!(err.is_unavailable(), "not reported as unavailable: {err}");
    }
    assert!(
        took < FAIL_FAST,
        "7 operations took {took:?} with Redis down"
    );

    // Redis comes back empty; the pool reconnects and the scripts are loaded again.
    redis.restart().await?;
    l2.ping().await?;
    assert_eq!(l2.get("k").await?, None);
    assert_eq!(
        l2.set("k", &entry("v", 1, &["t"])).await?,
        SetOutcome::Stored
    );
    assert_eq!(value_of(&l2, "k").await?, Some(("v".into(), 1)));
    Ok(())
}

#[tokio::test]
async fn hung_redis_fails_within_the_op_timeout() -> TestResult {
    let redis = Redis::start().await?;
    let proxy = FreezableProxy::start(redis.port()).await?;
    let l2 = L2::new(L2Config::new(proxy.url()))?;
    // Connected before the hang, so it meets an open connection, not a connect.
    let (a, b, c, d) = tokio::join!(l2.ping(), l2.ping(), l2.ping(), l2.ping());
    a?;
    b?;
    c?;
    d?;
    l2.set("k", &entry("v", 1, &[])).await?;

    proxy.freeze(true);
    let newer = entry("v", 2, &[]);
    let started = Instant::now();
    let (got, set, ping) = tokio::join!(l2.get("k"), l2.set("k", &newer), l2.ping());
    let took = started.elapsed();
    for result in [got.map(drop), set.map(drop), ping] {
        let err = result.expect_err("an operation succeeded on a hung Redis");
        assert!(err.is_unavailable(), "not reported as unavailable: {err}");
    }
    assert!(took < FAIL_FAST, "operations on a hung Redis took {took:?}");

    proxy.freeze(false);
    l2.ping().await?;
    Ok(())
}

#[tokio::test]
async fn flush_removes_everything_under_the_prefix_and_nothing_else() -> TestResult {
    let (redis, l2) = start().await?;
    for i in 0..1200 {
        l2.set(&format!("k{i}"), &entry("v", 1, &["team:1"]))
            .await?;
    }
    l2.invalidate("k0", Version(2)).await?;
    let mut conn = raw(&redis).await?;
    let _: () = redis::cmd("SET")
        .arg("other:keep")
        .arg("1")
        .query_async(&mut conn)
        .await?;

    l2.flush().await?;

    assert_eq!(l2.get("k1").await?, None);
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut conn).await?;
    assert_eq!(keys, vec!["other:keep".to_owned()]);
    Ok(())
}

#[tokio::test]
async fn flush_reads_the_prefix_literally_not_as_a_pattern() -> TestResult {
    let redis = Redis::start().await?;
    let mut config = L2Config::new(redis.url());
    config.key_prefix = "c*:".into();
    let l2 = L2::new(config)?;
    l2.set("k", &entry("v", 1, &[])).await?;
    let mut conn = raw(&redis).await?;
    let _: () = redis::cmd("SET")
        .arg("cx:keep")
        .arg("1")
        .query_async(&mut conn)
        .await?;

    l2.flush().await?;

    assert_eq!(l2.get("k").await?, None);
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut conn).await?;
    assert_eq!(keys, vec!["cx:keep".to_owned()]);
    Ok(())
}

// === FreezableProxy ===

/// A TCP proxy in front of Redis that can stop passing bytes while keeping every connection
/// open: a hung Redis, as opposed to a dead one.
struct FreezableProxy {
    port: u16,
    frozen: Arc<AtomicBool>,
}

impl FreezableProxy {
    async fn start(upstream: u16) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let frozen = Arc::new(AtomicBool::new(false));
        let shared = Arc::clone(&frozen);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pump(client_read, server_write, Arc::clone(&shared)));
                tokio::spawn(pump(server_read, client_write, Arc::clone(&shared)));
            }
        });
        Ok(FreezableProxy { port, frozen })
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn freeze(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::SeqCst);
    }
}

/// Copies `from` to `to`, holding each chunk while frozen.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
