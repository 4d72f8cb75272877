//! The invalidation bus: a Redis stream of committed changes, published from the outbox.
//!
//! A Redis Stream rather than plain pub/sub: pub/sub drops whatever a subscriber misses
//! while disconnected, a stream keeps a tail (about [`BUS_MAXLEN`] messages) that a
//! subscriber resumes from by id. Every message also carries a contiguous sequence number
//! (1, 2, 3, ...), assigned atomically with its append: a subscriber that sees a number
//! skipped (the message was trimmed before it read it, or lost on its way) or the stream
//! reset (a Redis restart, which may also lose the last second of an AOF) knows it may have
//! missed invalidations and flushes its L1. Stream ids are not contiguous, so they alone
//! cannot show a loss. Publishing is at-least-once (a relay may publish a row again after a
//! crash); duplicates are harmless because invalidations raise version floors, which is
//! idempotent.
//!
//!
//! Relays also append a [`Heartbeat`] at least every [`HEARTBEAT_INTERVAL`], numbered like
//! messages: it shows that a relay can still write to the bus and says how old the oldest
//! change it has not yet published is, so a subscriber knows when invalidations may be held
//! up (Redis refusing writes, every relay down or behind) and stops serving its L1 (see
//! [`crate::subscriber`]).
//!
//! Not here: reading the outbox (the conversation service's relay) or applying messages to
//! caches.

use std::sync::LazyLock;
use std::time::Duration;

use redis::{self, Script, Value};

use crate::entry::Version;
use crate::l2::{L2, L2Error};

/// Messages kept in the stream (approximately, `MAXLEN ~`): about a minute of a busy
/// fleet's writes, enough for a subscriber's reconnect without a flush.
pub const BUS_MAXLEN: usize = 100_000;

/// How often every relay appends a [`Heartbeat`], busy or idle. 1 s: a few small stream
/// entries a second per relay, and well inside the subscribers' staleness bound
/// (`--bus-stale-after-ms`, 3 s), so one late heartbeat does not stop the caches.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// Separates tags in a message (tags cannot contain control characters).
const TAG_SEPARATOR: char = '\u{1f}';

/// One committed change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BusMessage {
    /// The shard that committed it.
    pub shard: String,
    /// The outbox row's id on that shard.
    pub outbox_id: i64,
    /// The cache key it invalidates.
    pub key: String,
    /// The version after the change: caches must not keep anything older.
    pub version: Version,
    /// Tags it invalidates (for example `team:acme`).
    pub tags: Vec<String>,
    /// What the change was (`created`, `updated`, `deleted`, `events_appended`: the outbox
    /// row's kind), for live streams; empty when the publisher did not say.
    pub kind: String,
    /// When it was written (the outbox row's time), in microseconds since the Unix epoch;
    /// 0 when the publisher did not say.
    pub written_at_us: i64,
}

/// A relay's sign of life on the bus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    /// The relay (one per conversation instance, new at each start).
    pub relay: String,
    /// How old the oldest outbox row this relay knows to be unpublished is (an upper
    /// bound: a shard it could not read counts from its last reading); zero when none.
    pub backlog: Duration,
}

/// Appends a heartbeat, numbered from the bus's counter. KEYS: the stream, the counter.
/// ARGV: MAXLEN, the relay, the backlog in milliseconds.
const HEARTBEAT_LUA: &str = r#"
local seq = redis.call('INCR', KEYS[2])
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
  'seq', seq, 'heartbeat', ARGV[2], 'backlog_ms', ARGV[3])
"#;

/// Appends messages atomically, numbering them from the bus's counter. KEYS: the stream,
/// the counter. ARGV: MAXLEN, then seven fields per message.
const PUBLISH_LUA: &str = r#"
local ids = {}
for i = 2, #ARGV, 7 do
  local seq = redis.call('INCR', KEYS[2])
  ids[#ids + 1] = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
    'seq', seq, 'shard', ARGV[i], 'outbox_id', ARGV[i + 1], 'key', ARGV[i + 2],
    'version', ARGV[i + 3], 'tags', ARGV[i + 4], 'kind', ARGV[i + 5], 'at', ARGV[i + 6])
end
return ids
"#;

/// The server's run id, then, when the stream exists, its first and last ids and the last
/// sequence, read atomically. KEYS: the stream.
const EXTENT_LUA: &str = r#"
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)') or ''
if redis.call('EXISTS', KEYS[1]) == 0 then return {run_id} end
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if not last[1] then return {run_id} end
local seq = '0'
local fields = last[1][2]
for i = 1, #fields, 2 do
  if fields[i] == 'seq' then seq = fields[i + 1] end
end
return {run_id, first[1][1], last[1][1], seq}
"#;

static PUBLISH: LazyLock<Script> = LazyLock::new(|| Script::new(PUBLISH_LUA));
static EXTENT: LazyLock<Script> = LazyLock::new(|| Script::new(EXTENT_LUA));
static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| Script::new(HEARTBEAT_LUA));

/// A stream entry as XRANGE returns it: its id and its fields, values as raw bytes.
type RawEntry = (String, Vec<(String, Vec<u8>)>);

/// A message as read from the bus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    /// Its stream id.
    pub id: StreamId,
    /// Its place in the bus's numbering (1, 2, 3, ...); `None` if it has none.
    pub seq: Option<u64>,
    /// The change; `None` if the entry is not a well-formed message.
    pub message: Option<BusMessage>,
    /// The relay's heartbeat, when the entry is one (its `message` is then `None`).
    pub heartbeat: Option<Heartbeat>,
}

impl Received {
    /// Neither a well-formed message nor a heartbeat: what it said is unknown.
    pub fn is_malformed(&self) -> bool {
        self.message.is_none() && self.heartbeat.is_none()
    }
}

impl L2 {
    fn bus_key(&self) -> String {
        format!("{}invalidations", self.config.key_prefix)
    }

    fn bus_seq_key(&self) -> String {
        format!("{}invalidations:seq", self.config.key_prefix)
    }

    /// Appends `messages` to the bus, atomically and in one round trip; returns their
    /// stream ids.
    pub async fn publish(&self, messages: &[BusMessage]) -> Result<Vec<String>, L2Error> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = PUBLISH.key(self.bus_key());
        invocation.key(self.bus_seq_key()).arg(BUS_MAXLEN);
        for m in messages {
            invocation
                .arg(&m.shard)
                .arg(m.outbox_id)
                .arg(&m.key)
                .arg(m.version.0)
                .arg(m.tags.join(&TAG_SEPARATOR.to_string()))
                .arg(&m.kind)
                .arg(m.written_at_us);
        }
        self.bounded("publish", async {
            let mut conn = self.conn().await?;
            Ok(invocation.invoke_async(&mut conn).await?)
        })
        .await
    }

    /// Appends `heartbeat` to the bus, numbered like messages; returns its stream id.
    pub async fn heartbeat(&self, heartbeat: &Heartbeat) -> Result<String, L2Error> {
        let mut invocation = HEARTBEAT.key(self.bus_key());
        invocation
            .key(self.bus_seq_key())
            .arg(BUS_MAXLEN)
            .arg(&heartbeat.relay)
            .arg(u64::try_from(heartbeat.backlog.as_millis()).unwrap_or(u64::MAX));
        self.bounded("heartbeat", async {
            let mut conn = self.conn().await?;
            Ok(invocation.invoke_async(&mut conn).await?)
        })
        .await
    }

    /// Messages after stream id `after` (`0` for the start), at most `count`, without
    /// blocking. Subscribers use it to resume; tests use it to look.
    pub async fn read_bus(&self, after: &str, count: usize) -> Result<Vec<Received>, L2Error> {
        let key = self.bus_key();
        let reply: Value = self
            .bounded("read_bus", async {
                let mut conn = self.conn().await?;
                Ok(redis::cmd("XRANGE")
                    .arg(&key)
                    .arg(format!("({after}"))
                    .arg("+")
                    .arg("COUNT")
                    .arg(count)
                    .query_async(&mut conn)
                    .await?)
            })
            .await?;
        let entries: Vec<RawEntry> =
            redis::from_redis_value(reply).map_err(|e| L2Error::Corrupt {
                key: key.clone(),
                what: format!("bus entries: {e}"),
            })?;
        entries
            .into_iter()
            .map(|(id, fields)| {
                // A field that is not UTF-8 makes the message malformed (the subscriber
                // flushes), not the whole read.
                let field = |name: &str| {
                    fields
                        .iter()
                        .find(|(k, _)| k == name)
                        .and_then(|(_, v)| String::from_utf8(v.clone()).ok())
                };
                let message = (|| {
                    Some(BusMessage {
                        shard: field("shard")?,
                        outbox_id: field("outbox_id")?.parse().ok()?,
                        key: field("key")?,
                        version: Version(field("version")?.parse().ok()?),
                        tags: field("tags")?
                            .split(TAG_SEPARATOR)
                            .filter(|t| !t.is_empty())
                            .map(str::to_owned)
                            .collect(),
                        // Absent from messages published before these fields existed.
                        kind: field("kind").unwrap_or_default(),
                        written_at_us: field("at").and_then(|at| at.parse().ok()).unwrap_or(0),
                    })
                })();
                let heartbeat = field("heartbeat").and_then(|relay| {
                    Some(Heartbeat {
                        relay,
                        backlog: Duration::from_millis(field("backlog_ms")?.parse().ok()?),
                    })
                });
                Ok(Received {
                    id: StreamId::parse(&id).ok_or_else(|| L2Error::Corrupt {
                        key: key.clone(),
                        what: format!("stream id {id:?}"),
                    })?,
                    seq: field("seq").and_then(|s| s.parse().ok()),
                    message,
                    heartbeat,
                })
            })
            .collect()
    }
}

/// A stream id (`<ms>-<seq>`), ordered as Redis orders them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct StreamId(pub u64, pub u64);

impl StreamId {
    /// Parses `<ms>-<seq>`.
    pub fn parse(text: &str) -> Option<Self> {
        let (ms, seq) = text.split_once('-')?;
        Some(Self(ms.parse().ok()?, seq.parse().ok()?))
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// Where the bus stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BusExtent {
    /// The Redis server's run id: a new one means a restart (or a failover), after which
    /// even a persisted stream may have lost its last messages.
    pub run_id: String,
    /// The stream, if it exists (it does not before the first publish, nor after a restart
    /// without persistence).
    pub stream: Option<StreamExtent>,
}

/// The stream's ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamExtent {
    /// The oldest message still kept.
    pub first: StreamId,
    /// The newest message.
    pub last: StreamId,
    /// The newest message's sequence.
    pub last_seq: u64,
}

impl L2 {
    /// The bus's extent and the server's run id, read atomically.
    pub async fn bus_extent(&self) -> Result<BusExtent, L2Error> {
        let key = self.bus_key();
        let reply: Vec<String> = self
            .bounded("bus_extent", async {
                let mut conn = self.conn().await?;
                Ok(EXTENT.key(&key).invoke_async(&mut conn).await?)
            })
            .await?;
        let corrupt = |what: String| L2Error::Corrupt {
            key: key.clone(),
            what,
        };
        let id = |text: &str| {
            StreamId::parse(text).ok_or_else(|| corrupt(format!("stream id {text:?}")))
        };
        match reply.as_slice() {
            [run_id] => Ok(BusExtent {
                run_id: run_id.clone(),
                stream: None,
            }),
            [run_id, first, last, seq] => Ok(BusExtent {
                run_id: run_id.clone(),
                stream: Some(StreamExtent {
                    first: id(first)?,
                    last: id(last)?,
                    last_seq: seq
                        .parse()
                        .map_err(|_| corrupt(format!("sequence {seq:?}")))?,
                }),
            }),
            other => Err(corrupt(format!("extent reply {other:?}"))),
        }
    }

    /// The Redis server's run id (new after every restart or failover).
    pub async fn server_run_id(&self) -> Result<String, L2Error> {
        let info: String = self
            .bounded("server_run_id", async {
                let mut conn = self.conn().await?;
                Ok(redis::cmd("INFO")
                    .arg("server")
                    .query_async(&mut conn)
                    .await?)
            })
            .await?;
        info.lines()
            .find_map(|line| line.strip_prefix("run_id:"))
            .map(|id| id.trim().to_owned())
            .ok_or_else(|| L2Error::Corrupt {
                key: "INFO server".into(),
                what: "no run_id".into(),
            })
    }
}
