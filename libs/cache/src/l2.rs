//! Redis as L2: the versioned, tagged cache that every convoy process shares, reached
//! through one multiplexed connection.
//!
//! For: reading (one key or a batch in one round trip), version-checked sets, per-key
//! invalidation with a version floor, tag invalidation, and an admin flush, on one standalone
//! Redis. Not for: the in-process L1 ([`crate::l1`]), the invalidation bus, leases, deciding
//! what to cache, or Redis Cluster (the tag script reaches keys it is not handed). L2 is a
//! cache: when it errs, callers go to the source ([`L2Error::is_unavailable`]).
//!
//! # Versions
//! A set is refused ([`SetOutcome::Stale`]) when its version is older than the stored entry's
//! or older than the key's *floor*. A set at the same version is stored (an idempotent
//! refill). `invalidate(key, V)` means "the row is now at V": it raises the floor to
//! `max(floor, V)`, remembered for [`L2Config::floor_ttl`], and deletes the entry. So a slow
//! filler that read an older row cannot put it back, while a filler that read V can.
//! Limits: a filler slower than `floor_ttl` can land stale data; the stored entry's version
//! fences only while the entry lives; tag invalidation and [`L2::flush`] raise no floor; a
//! Redis restart forgets every floor (the bus's restart rule flushes L1s for the same reason).
//! Versions compare as Lua numbers (doubles), so they must lie within ±2^53.
//!
//! # Layout (under [`L2Config::key_prefix`], `convoy:` by default)
//! - `{prefix}e:{key}`: the entry, a hash `v` (version), `d` (value bytes), `t` (tags joined
//!   by U+001F, which tags may not contain), with `PEXPIRE` = the entry's TTL.
//! - `{prefix}f:{key}`: the floor, an integer, with `PEXPIRE` = `floor_ttl`.
//! - `{prefix}t:{tag}`: the tag index, a set of keys, whose expiry is raised on each add to at
//!   least the new member's TTL: it lives as long as its longest-lived member, and no longer.
//!   Members whose entry has expired or was re-set without the tag are skipped (and the whole
//!   set deleted) when the tag is invalidated, so invalidation reads only that set; one script
//!   does it all, so a tag with very many live entries holds Redis for that long.
//!
//! # Connection
//! Every operation is sent on one `redis::aio::MultiplexedConnection`, shared by clones: its
//! driver task writes concurrent requests back to back on one socket and matches the replies
//! in order, rather than a deadpool-redis pool, whose `Manager::recycle` always sends
//! `UNWATCH` + `PING` on checkout (deadpool-redis 0.23 has no `RecyclingMethod`).
//! `cargo bench -p convoy-cache --bench redis_conn` compared the two side by side on two cores
//! over loopback (figures in `docs/benchmarks.md`). One at a time the pool cost 1.9-2.7× the
//! multiplexed connection (a small `GET`: 157 µs against 59 µs, a raw RESP round trip being
//! 41 µs; L2's `MULTI`/`EXEC` read: 160 µs against 74 µs). With 16 tasks at once it served
//! 0.2-0.6× the reads (that read: 73k/s against 120k/s), and `L2::get` went from 61k/s on the
//! pool to 133-153k/s on the multiplexed connection.
//!
//! What the pool's ping gave, the connection keeps (`Link`, below):
//! - *Reconnection.* A connection is dropped when a command on it fails as a broken connection
//!   (or as a parse error) or times out, and the next operation connects again, one caller at a
//!   time while the others wait for it. A connection that broke while idle (a Redis restart
//!   closes it) is found by the first command sent on it, which is then sent once more on a new
//!   connection. It most likely never reached Redis, and a repeat would be harmless anyway:
//!   reads, sets, invalidations and flushes are idempotent; a repeated lease answers "wait"
//!   until its TTL, a repeated leased set reports a lease mismatch though the first one
//!   stored, and a repeated publish is a duplicate, which the bus allows.
//! - *Bounds.* A connect (handshake included) is bounded by [`L2Config::create_timeout`], each
//!   reply by [`L2Config::response_timeout`], and each operation as a whole by
//!   [`L2Config::op_timeout`], which also covers waiting for another caller's connect. A reply
//!   that times out drops the connection, so a half-open socket (a host gone without a reset)
//!   is replaced rather than waited on until TCP gives up.
//!
//! Not safe on a shared connection, and not used here: `WATCH`, `SELECT`, blocking commands
//! and pub/sub, which change or hold the connection's state for everyone on it. `MULTI`/`EXEC`
//! is safe: a pipeline is written as one piece, so nothing else lands inside the transaction.

use std::fmt;
use std::future::Future;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{
    self, AsyncConnectionConfig, Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Script, Value,
};

use crate::entry::{Entry, SetOutcome, Version};

// === defaults and limits ===

/// Prefix of every key L2 writes; [`L2::flush`] deletes everything under it.
pub const DEFAULT_KEY_PREFIX: &str = "convoy:";
/// How long an invalidation's floor is remembered: far longer than any fill takes.
pub const DEFAULT_FLOOR_TTL: Duration = Duration::from_secs(10 * 60);
/// Bound on one operation as a whole: an L2 answer later than this is worth less than the
/// source's.
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(1);
/// Connect and handshake a new connection (a healthy Redis nearby takes about a millisecond).
pub const DEFAULT_CREATE_TIMEOUT: Duration = Duration::from_millis(500);
/// Wait for one command's (or pipeline's) answer; redis-rs's own default.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_millis(500);
/// Longest tag, in bytes.
pub const MAX_TAG_LEN: usize = 128;
/// Most tags one entry may carry (each is a key the set script touches).
pub const MAX_TAGS: usize = 64;
/// Longest entry TTL or floor TTL: far beyond any cache lifetime, and well inside what
/// Redis accepts for `PEXPIRE` (a rejected expiry would abort a script halfway).
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Joins an entry's tags in its hash; a control character, which tags may not contain.
const TAG_SEPARATOR: char = '\u{1f}';
/// Largest version magnitude that Lua's doubles compare exactly.
const MAX_EXACT_VERSION: i64 = 1 << 53;
/// Keys asked of each `SCAN` (and so deleted per `UNLINK`) by [`L2::flush`].
const FLUSH_BATCH: usize = 500;

// === Lua ===

/// Stores an entry unless the lease does not match (-1): a token must name the key's
/// current lease (one lost with a Redis restart, or expired, no longer counts, so a fill
/// that started before the restart cannot land after it), and a set without a token is
/// refused while the key is leased. Refused too (0) when the version is older than the
/// floor or the stored entry's. A caller with the lease's token releases it.
/// KEYS: entry, floor, lease, tag sets. ARGV: version, value, joined tags, ttl ms, key,
/// lease token ('' for none).
const SET_LUA: &str = r"
local lease = redis.call('GET', KEYS[3])
if lease ~= (ARGV[6] ~= '' and ARGV[6] or false) then return -1 end
if ARGV[6] ~= '' then redis.call('DEL', KEYS[3]) end
local version = tonumber(ARGV[1])
local floor = tonumber(redis.call('GET', KEYS[2]))
if floor and version < floor then return 0 end
local stored = tonumber(redis.call('HGET', KEYS[1], 'v'))
if stored and version < stored then return 0 end
local ttl = tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'd', ARGV[2], 't', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
for i = 4, #KEYS do
  redis.call('SADD', KEYS[i], ARGV[5])
  if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ARGV[4]) end
end
return 1
";

/// Raises the floor to max(floor, version) for the floor TTL and deletes the entry (even one
/// at a newer version: a miss is always safe). KEYS: entry, floor. ARGV: version, floor ttl ms.
const INVALIDATE_LUA: &str = r"
local floor = redis.call('GET', KEYS[2])
local version = ARGV[1]
if floor and tonumber(floor) > tonumber(version) then version = floor end
redis.call('SET', KEYS[2], version, 'PX', ARGV[2])
redis.call('DEL', KEYS[1])
return 1
";

/// For each tag set, deletes the member entries that still carry the tag and the members'
/// leases (a fill leased with the tag read before this change: its set must fail), then the
/// set. Returns the entries deleted. KEYS: tag sets. ARGV: entry key prefix, lease key
/// prefix, separator, then the tag of each KEYS[i].
const INVALIDATE_TAGS_LUA: &str = r"
local prefix, lease_prefix, sep = ARGV[1], ARGV[2], ARGV[3]
local dropped = 0
for i, set in ipairs(KEYS) do
  local needle = sep .. ARGV[i + 3] .. sep
  for _, key in ipairs(redis.call('SMEMBERS', set)) do
    redis.call('DEL', lease_prefix .. key)
    local entry = prefix .. key
    local tags = redis.call('HGET', entry, 't')
    if tags and string.find(sep .. tags .. sep, needle, 1, true) then
      dropped = dropped + redis.call('DEL', entry)
    end
  end
  redis.call('DEL', set)
end
return dropped
";

// === L2Error ===

/// What went wrong in an L2 operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum L2Error {
    /// The configuration cannot work (bad URL, zero pool size, empty prefix...).
    #[error("invalid L2 config: {0}")]
    Config(String),
    /// An argument L2 cannot store: a bad tag, too many tags, a TTL or version out of range.
    #[error("invalid L2 argument: {0}")]
    InvalidArgument(String),
    /// A connect or a command failed: Redis refused the connection or answered with an
    /// error, or the connection broke or timed out.
    #[error("redis command failed: {0}")]
    Redis(#[from] RedisError),
    /// The operation as a whole ran past [`L2Config::op_timeout`]. A script may still have
    /// run on the server; retrying is safe, as every operation is idempotent.
    #[error("redis {op} did not finish within {after:?}")]
    Timeout {
        /// The operation, e.g. `set`.
        op: &'static str,
        /// The bound it ran past.
        after: Duration,
    },
    /// An entry under our prefix is not shaped as L2 writes it.
    #[error("corrupt L2 entry for key {key:?}: {what}")]
    Corrupt {
        /// The caller's key.
        key: String,
        /// What is wrong with it.
        what: String,
    },
}

impl L2Error {
    /// Whether Redis could not be reached or did not answer in time (rather than refusing
    /// what was asked): the caller should treat L2 as absent and go to the source.
    pub fn is_unavailable(&self) -> bool {
        match self {
            L2Error::Timeout { .. } => true,
            L2Error::Redis(e) => {
                e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
            }
            L2Error::Config(_) | L2Error::InvalidArgument(_) | L2Error::Corrupt { .. } => false,
        }
    }
}

// === L2Config ===

/// How to reach Redis and how long to wait for it.
#[derive(Clone)]
pub struct L2Config {
    /// `redis://host:port[/db]`.
    pub url: String,
    /// Bound on each operation as a whole ([`DEFAULT_OP_TIMEOUT`]), waiting for a connect
    /// included.
    pub op_timeout: Duration,
    /// Connect a new connection, handshake included ([`DEFAULT_CREATE_TIMEOUT`]).
    pub create_timeout: Duration,
    /// Wait for one command's answer ([`DEFAULT_RESPONSE_TIMEOUT`]).
    pub response_timeout: Duration,
    /// Prefix of every key written ([`DEFAULT_KEY_PREFIX`]); must not be empty.
    pub key_prefix: String,
    /// How long an invalidation's floor is remembered ([`DEFAULT_FLOOR_TTL`]).
    pub floor_ttl: Duration,
}

impl L2Config {
    /// The defaults, for the Redis at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        L2Config {
            url: url.into(),
            op_timeout: DEFAULT_OP_TIMEOUT,
            create_timeout: DEFAULT_CREATE_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
            floor_ttl: DEFAULT_FLOOR_TTL,
        }
    }
}

// The URL may carry a password; keep it out of logs.
impl fmt::Debug for L2Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = if self.url.contains('@') {
            "<redacted>"
        } else {
            &self.url
        };
        f.debug_struct("L2Config")
            .field("url", &url)
            .field("op_timeout", &self.op_timeout)
            .field("create_timeout", &self.create_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("key_prefix", &self.key_prefix)
            .field("floor_ttl", &self.floor_ttl)
            .finish()
    }
}

// === L2 ===

/// The Redis L2. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct L2 {
    link: Link,
    pub(crate) config: L2Config,
    set_script: Script,
    invalidate_script: Script,
    invalidate_tags_script: Script,
}

impl fmt::Debug for L2 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("L2")
            .field("config", &self.config)
            .field("connected", &self.link.is_connected())
            .finish_non_exhaustive()
    }
}

impl L2 {
    /// Checks `config`; connects lazily, on first use.
    pub fn new(config: L2Config) -> Result<Self, L2Error> {
        if config.key_prefix.is_empty() {
            return Err(L2Error::Config(
                "key_prefix must not be empty: flush deletes every key under it".into(),
            ));
        }
        ttl_millis(config.floor_ttl).map_err(|e| L2Error::Config(format!("floor_ttl: {e}")))?;
        let client = redis::Client::open(config.url.as_str())
            .map_err(|e| L2Error::Config(format!("url: {e}")))?;
        let connection = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.create_timeout))
            .set_response_timeout(Some(config.response_timeout));
        Ok(L2 {
            link: Link::new(client, connection),
            config,
            set_script: Script::new(SET_LUA),
            invalidate_script: Script::new(INVALIDATE_LUA),
            invalidate_tags_script: Script::new(INVALIDATE_TAGS_LUA),
        })
    }

    /// The entry for `key`, with `ttl` set to its remaining time to live; `None` on a miss.
    pub async fn get(&self, key: &str) -> Result<Option<Entry>, L2Error> {
        let keys = [key.to_owned()];
        let mut found = self.get_many(&keys).await?;
        Ok(found.pop().flatten())
    }

    /// The entries for `keys`, in order (`None` for a miss), in one round trip: one
    /// `MULTI`/`EXEC` pipeline, so each entry's value and TTL are read together.
    pub async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Entry>>, L2Error> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for key in keys {
            let entry_key = self.entry_key(key);
            pipe.cmd("HMGET").arg(&entry_key).arg("v").arg("d").arg("t");
            pipe.cmd("PTTL").arg(&entry_key);
        }
        let replies: Vec<Value> = self
            .bounded("get", async {
                let mut conn = self.conn().await?;
                Ok(pipe.query_async(&mut conn).await?)
            })
            .await?;
        if replies.len() != keys.len() * 2 {
            return Err(L2Error::Corrupt {
                key: keys[0].clone(),
                what: format!(
                    "expected {} replies to the read pipeline, got {}",
                    keys.len() * 2,
                    replies.len()
                ),
            });
        }
        // Two replies per key, as the length check above ensures.
        let mut replies = replies.into_iter();
        keys.iter()
            .map(|key| {
                let fields = replies.next().unwrap_or_default();
                let pttl = replies.next().unwrap_or_default();
                decode(key, fields, pttl)
            })
            .collect()
    }

    /// Stores `entry` under `key` for `entry.ttl` unless its version is older than the stored
    /// entry's or than the key's floor ([`SetOutcome::Stale`]); indexes it under its tags.
    pub async fn set(&self, key: &str, entry: &Entry) -> Result<SetOutcome, L2Error> {
        self.set_leased(key, entry, "").await
    }

    /// Like [`L2::set`], as the holder of `key`'s lease `token` (from [`L2::lease`]): refused
    /// with [`SetOutcome::LeaseMismatch`] unless the lease is still this one. The lease is
    /// released whether the entry is stored or found stale. An empty token is a plain set,
    /// which a lease held by another filler refuses too.
    pub async fn set_leased(
        &self,
        key: &str,
        entry: &Entry,
        token: &str,
    ) -> Result<SetOutcome, L2Error> {
        check_version(entry.version)?;
        let ttl = ttl_millis(entry.ttl).map_err(L2Error::InvalidArgument)?;
        check_tags(&entry.tags)?;
        let joined = entry.tags.join(&TAG_SEPARATOR.to_string());

        let mut call = self.set_script.key(self.entry_key(key));
        call.key(self.floor_key(key));
        call.key(self.lease_key(key));
        for tag in &entry.tags {
            call.key(self.tag_key(tag));
        }
        call.arg(entry.version.0)
            .arg(entry.value.as_ref())
            .arg(joined)
            .arg(ttl)
            .arg(key)
            .arg(token);
        let stored: i64 = self
            .bounded("set", async {
                let mut conn = self.conn().await?;
                Ok(call.invoke_async(&mut conn).await?)
            })
            .await?;
        Ok(match stored {
            1 => SetOutcome::Stored,
            -1 => SetOutcome::LeaseMismatch,
            _ => SetOutcome::Stale,
        })
    }

    /// Records that `key`'s row is now at `version` (raising its floor, remembered for
    /// `floor_ttl`) and deletes the entry, so no fill from an older row is stored after this.
    pub async fn invalidate(&self, key: &str, version: Version) -> Result<(), L2Error> {
        check_version(version)?;
        let floor_ttl = ttl_millis(self.config.floor_ttl).map_err(L2Error::Config)?;
        let mut call = self.invalidate_script.key(self.entry_key(key));
        call.key(self.floor_key(key)).arg(version.0).arg(floor_ttl);
        self.bounded("invalidate", async {
            let mut conn = self.conn().await?;
            let _: i64 = call.invoke_async(&mut conn).await?;
            Ok(())
        })
        .await
    }

    /// Deletes every entry that carries any of `tags`, atomically, reading only those tags'
    /// index sets; returns how many entries were deleted. Raises no floor.
    pub async fn invalidate_tags(&self, tags: &[String]) -> Result<u64, L2Error> {
        if tags.is_empty() {
            return Ok(0);
        }
        tags.iter().try_for_each(|tag| check_tag(tag))?;
        let mut call = self.invalidate_tags_script.prepare_invoke();
        for tag in tags {
            call.key(self.tag_key(tag));
        }
        call.arg(self.entry_key(""))
            .arg(self.lease_key(""))
            .arg(TAG_SEPARATOR.to_string());
        for tag in tags {
            call.arg(tag);
        }
        let dropped: u64 = self
            .bounded("invalidate_tags", async {
                let mut conn = self.conn().await?;
                Ok(call.invoke_async(&mut conn).await?)
            })
            .await?;
        Ok(dropped)
    }

    /// Deletes every key under the prefix (entries, floors, tag sets) with `SCAN` and
    /// `UNLINK` in batches; each step is bounded by `op_timeout`. Admin only: it forgets
    /// floors, so a slow filler may land stale data afterwards.
    pub async fn flush(&self) -> Result<(), L2Error> {
        let pattern = format!("{}*", escape_glob(&self.config.key_prefix));
        let mut conn = self.bounded("flush", self.conn()).await?;
        let mut cursor: u64 = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(FLUSH_BATCH);
            let (next, keys): (u64, Vec<Vec<u8>>) = self
                .bounded("flush", async { Ok(scan.query_async(&mut conn).await?) })
                .await?;
            if !keys.is_empty() {
                let mut unlink = redis::cmd("UNLINK");
                unlink.arg(&keys);
                let _: i64 = self
                    .bounded("flush", async { Ok(unlink.query_async(&mut conn).await?) })
                    .await?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// Checks that Redis answers.
    pub async fn ping(&self) -> Result<(), L2Error> {
        self.bounded("ping", async {
            let mut conn = self.conn().await?;
            let _: String = redis::cmd("PING").query_async(&mut conn).await?;
            Ok(())
        })
        .await
    }

    /// The shared connection, connecting first when there is none.
    pub(crate) async fn conn(&self) -> Result<Conn<'_>, L2Error> {
        Ok(self.link.conn().await?)
    }

    /// Runs `op`, giving up after `op_timeout`.
    pub(crate) async fn bounded<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, L2Error>>,
    ) -> Result<T, L2Error> {
        let after = self.config.op_timeout;
        tokio::time::timeout(after, fut)
            .await
            .map_err(|_| L2Error::Timeout { op, after })?
    }

    pub(crate) fn entry_key(&self, key: &str) -> String {
        format!("{}e:{key}", self.config.key_prefix)
    }

    fn floor_key(&self, key: &str) -> String {
        format!("{}f:{key}", self.config.key_prefix)
    }

    pub(crate) fn lease_key(&self, key: &str) -> String {
        format!("{}l:{key}", self.config.key_prefix)
    }

    pub(crate) fn tag_key(&self, tag: &str) -> String {
        format!("{}t:{tag}", self.config.key_prefix)
    }
}

// === Link ===

/// The one multiplexed connection every operation shares, replaced when it breaks (see the
/// module docs).
struct Link {
    client: redis::Client,
    config: AsyncConnectionConfig,
    /// The connection, if one is up; held only to clone or replace it, never across an await.
    current: Mutex<Option<Current>>,
    /// Held while connecting, so concurrent callers wait for one connect rather than each
    /// opening a socket; counts the connections made.
    connecting: tokio::sync::Mutex<u64>,
}

/// A connection and its number, so a failure on an old one cannot drop its successor.
#[derive(Clone)]
struct Current {
    generation: u64,
    conn: MultiplexedConnection,
}

impl Link {
    fn new(client: redis::Client, config: AsyncConnectionConfig) -> Self {
        Link {
            client,
            config,
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(0),
        }
    }

    fn current(&self) -> Option<Current> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn is_connected(&self) -> bool {
        self.current().is_some()
    }

    /// The connection, made first when there is none.
    async fn conn(&self) -> RedisResult<Conn<'_>> {
        let (current, reused) = match self.current() {
            Some(current) => (current, true),
            None => (self.connect().await?, false),
        };
        Ok(Conn {
            link: self,
            current,
            reused,
        })
    }

    /// Connects, unless another caller did while this one waited its turn.
    async fn connect(&self) -> RedisResult<Current> {
        let mut made = self.connecting.lock().await;
        if let Some(current) = self.current() {
            return Ok(current);
        }
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        *made += 1;
        let current = Current {
            generation: *made,
            conn,
        };
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(current.clone());
        Ok(current)
    }

    /// Forgets connection `generation` if it is still the current one. Operations still
    /// holding a clone finish on it; it closes with the last clone.
    fn discard(&self, generation: u64) {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.as_ref().is_some_and(|c| c.generation == generation) {
            *current = None;
        }
    }
}

// === Conn ===

/// The shared connection as one operation holds it: commands go to the multiplexed
/// connection, and a failure that says the connection is broken replaces it.
pub(crate) struct Conn<'a> {
    link: &'a Link,
    current: Current,
    /// Made before this operation, so it may have broken while idle.
    reused: bool,
}

impl Conn<'_> {
    /// Sends with `send` on the connection. A failure that shows it broken (or timed out)
    /// drops it; when it was made before this operation and had dropped, it broke while idle,
    /// and the command is sent once more on a new connection (see the module docs).
    async fn send<T, F>(&mut self, send: impl Fn(MultiplexedConnection) -> F) -> RedisResult<T>
    where
        F: Future<Output = RedisResult<T>>,
    {
        loop {
            let result = send(self.current.conn.clone()).await;
            let Err(e) = &result else {
                return result;
            };
            if !(e.is_unrecoverable_error() || e.is_timeout()) {
                return result;
            }
            self.link.discard(self.current.generation);
            if !(self.reused && e.is_connection_dropped()) {
                return result;
            }
            tracing::debug!(error = %e, "the shared redis connection had dropped; reconnecting");
            self.current = self.link.connect().await?;
            self.reused = false;
        }
    }
}

impl ConnectionLike for Conn<'_> {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(self.send(move |mut conn| async move { conn.send_packed_command(cmd).await }))
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(self.send(move |mut conn| async move {
            conn.send_packed_commands(pipeline, offset, count).await
        }))
    }

    fn get_db(&self) -> i64 {
        self.current.conn.get_db()
    }
}

// === decoding and checks ===

/// One entry from its `HMGET v d t` and `PTTL` replies.
fn decode(key: &str, fields: Value, pttl: Value) -> Result<Option<Entry>, L2Error> {
    let corrupt = |what: String| L2Error::Corrupt {
        key: key.to_owned(),
        what,
    };
    let (version, value, tags): (Option<String>, Option<Bytes>, Option<String>) =
        redis::from_redis_value(fields).map_err(|e| corrupt(e.to_string()))?;
    let pttl: i64 = redis::from_redis_value(pttl).map_err(|e| corrupt(e.to_string()))?;
    let (version, value, tags) = match (version, value, tags) {
        (None, None, None) => return Ok(None),
        (Some(version), Some(value), Some(tags)) => (version, value, tags),
        _ => return Err(corrupt("the hash lacks some of its fields v, d, t".into())),
    };
    let ttl = match pttl {
        // -2: gone; 0: expiring now.
        -2 | 0 => return Ok(None),
        -1 => return Err(corrupt("the entry has no expiry".into())),
        ms => Duration::from_millis(ms.unsigned_abs()),
    };
    let version = version
        .parse()
        .map_err(|_| corrupt(format!("version {version:?} is not an integer")))?;
    let tags = split_tags(&tags);
    Ok(Some(Entry {
        value,
        version: Version(version),
        tags,
        ttl,
    }))
}

/// Checks the tags of one entry (or one lease): how many, and each one.
pub(crate) fn check_tags(tags: &[String]) -> Result<(), L2Error> {
    if tags.len() > MAX_TAGS {
        return Err(L2Error::InvalidArgument(format!(
            "an entry may carry at most {MAX_TAGS} tags, got {}",
            tags.len()
        )));
    }
    tags.iter().try_for_each(|tag| check_tag(tag))
}

fn check_tag(tag: &str) -> Result<(), L2Error> {
    let wrong = if tag.is_empty() {
        "must not be empty".to_owned()
    } else if tag.len() > MAX_TAG_LEN {
        format!("must be at most {MAX_TAG_LEN} bytes, not {}", tag.len())
    } else if tag.chars().any(char::is_control) {
        "must not contain control characters".to_owned()
    } else {
        return Ok(());
    };
    Err(L2Error::InvalidArgument(format!("tag {tag:?} {wrong}")))
}

fn check_version(version: Version) -> Result<(), L2Error> {
    if version.0.unsigned_abs() > MAX_EXACT_VERSION.unsigned_abs() {
        return Err(L2Error::InvalidArgument(format!(
            "version {} is outside ±2^53, where Redis's Lua compares versions exactly",
            version.0
        )));
    }
    Ok(())
}

/// A TTL in whole milliseconds, between 1 ms and [`MAX_TTL`].
fn ttl_millis(ttl: Duration) -> Result<u64, String> {
    if ttl < Duration::from_millis(1) || ttl > MAX_TTL {
        return Err(format!(
            "ttl {ttl:?} must be between 1 ms and {} days",
            MAX_TTL.as_secs() / 86_400
        ));
    }
    Ok(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
}

/// `prefix` with glob metacharacters escaped, for `SCAN MATCH`.
fn escape_glob(prefix: &str) -> String {
    let mut escaped = String::with_capacity(prefix.len());
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// Tags as stored (joined by the separator), back into a list.
pub(crate) fn split_tags(joined: &str) -> Vec<String> {
    if joined.is_empty() {
        Vec::new()
    } else {
        joined.split(TAG_SEPARATOR).map(str::to_owned).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use convoy_testkit::Redis;

    use super::*;

    fn entry(version: i64) -> Entry {
        Entry {
            value: Bytes::from_static(b"v"),
            version: Version(version),
            tags: Vec::new(),
            ttl: Duration::from_secs(60),
        }
    }

    /// Clients connected to `redis`, as it counts them (this question's own included).
    async fn clients(redis: &Redis) -> usize {
        let client = redis::Client::open(redis.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut conn)
            .await
            .unwrap();
        list.lines().count()
    }

    #[tokio::test]
    async fn concurrent_operations_share_one_connection_made_once() {
        let redis = Redis::start().await.unwrap();
        let l2 = Arc::new(L2::new(L2Config::new(redis.url())).unwrap());
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let l2 = Arc::clone(&l2);
                tokio::spawn(async move { l2.set(&format!("k{i}"), &entry(1)).await })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap().unwrap(), SetOutcome::Stored);
        }
        assert_eq!(clients(&redis).await, 2, "L2's connection and the asker's");
    }

    #[tokio::test]
    async fn a_connection_broken_while_idle_is_replaced_without_failing_an_operation() {
        let mut redis = Redis::start().await.unwrap();
        let l2 = L2::new(L2Config::new(redis.url())).unwrap();
        l2.set("k", &entry(1)).await.unwrap();
        assert!(l2.link.is_connected());

        // Nothing is sent while Redis restarts: the first command after it meets the dead
        // connection, and is sent again on a new one.
        redis.restart().await.unwrap();
        assert_eq!(l2.get("k").await.unwrap(), None, "Redis came back empty");
        assert_eq!(l2.set("k", &entry(2)).await.unwrap(), SetOutcome::Stored);
        assert_eq!(
            l2.get("k").await.unwrap().map(|e| e.version),
            Some(Version(2))
        );
    }
}
