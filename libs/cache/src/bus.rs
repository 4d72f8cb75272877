//! The invalidation bus: a Redis stream of committed changes, published from the outbox.
//!
//! A Redis Stream rather than plain pub/sub: pub/sub drops whatever a subscriber misses
//! while disconnected, a stream keeps a tail (about [`BUS_MAXLEN`] messages) that a
//! subscriber resumes from by id. Each message's stream id is its sequence: a subscriber
//! whose last id has been trimmed away, or that finds the stream reset (a Redis restart),
//! knows it may have missed invalidations and flushes its L1. Publishing is at-least-once
//! (a relay may publish a row again after a crash); duplicates are harmless because
//! invalidations raise version floors, which is idempotent.
//!
//! Not here: reading the outbox (the conversation service's relay) or applying messages to
//! caches.

use deadpool_redis::redis::{self, Value};

use crate::entry::Version;
use crate::l2::{L2, L2Error};

/// Messages kept in the stream (approximately, `MAXLEN ~`): about a minute of a busy
/// fleet's writes, enough for a subscriber's reconnect without a flush.
pub const BUS_MAXLEN: usize = 100_000;

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
}

impl L2 {
    fn bus_key(&self) -> String {
        format!("{}bus", self.config.key_prefix)
    }

    /// Appends `messages` to the bus in one round trip; returns their stream ids.
    pub async fn publish(&self, messages: &[BusMessage]) -> Result<Vec<String>, L2Error> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let key = self.bus_key();
        let mut pipe = redis::pipe();
        for m in messages {
            let tags: String = m.tags.join(&TAG_SEPARATOR.to_string());
            pipe.cmd("XADD")
                .arg(&key)
                .arg("MAXLEN")
                .arg("~")
                .arg(BUS_MAXLEN)
                .arg("*")
                .arg("shard")
                .arg(&m.shard)
                .arg("outbox_id")
                .arg(m.outbox_id)
                .arg("key")
                .arg(&m.key)
                .arg("version")
                .arg(m.version.0)
                .arg("tags")
                .arg(tags);
        }
        self.bounded("publish", async {
            let mut conn = self.conn().await?;
            Ok(pipe.query_async(&mut conn).await?)
        })
        .await
    }

    /// Messages after stream id `after` (`0` for the start), at most `count`, without
    /// blocking. Subscribers use it to resume; tests use it to look.
    pub async fn read_bus(
        &self,
        after: &str,
        count: usize,
    ) -> Result<Vec<(String, BusMessage)>, L2Error> {
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
        let entries: Vec<(String, Vec<(String, String)>)> = redis::from_redis_value(reply)
            .map_err(|e| L2Error::Corrupt {
                key: key.clone(),
                what: format!("bus entries: {e}"),
            })?;
        Ok(entries
            .into_iter()
            .filter_map(|(id, fields)| {
                let field = |name: &str| {
                    fields
                        .iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.clone())
                };
                let message = BusMessage {
                    shard: field("shard")?,
                    outbox_id: field("outbox_id")?.parse().ok()?,
                    key: field("key")?,
                    version: Version(field("version")?.parse().ok()?),
                    tags: field("tags")?
                        .split(TAG_SEPARATOR)
                        .filter(|t| !t.is_empty())
                        .map(str::to_owned)
                        .collect(),
                };
                Some((id, message))
            })
            .collect())
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

/// Where the bus stands: its oldest retained message and the last id it ever issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BusExtent {
    /// The oldest message still kept, if any.
    pub first: Option<StreamId>,
    /// The last id Redis generated for the stream (survives trimming, not a restart
    /// without persistence).
    pub last_generated: StreamId,
}

impl L2 {
    /// The bus's extent; `None` when the stream does not exist (never written, or lost
    /// with a Redis restart).
    pub async fn bus_extent(&self) -> Result<Option<BusExtent>, L2Error> {
        let key = self.bus_key();
        let reply: Value = self
            .bounded("bus_extent", async {
                let mut conn = self.conn().await?;
                let exists: bool = redis::cmd("EXISTS")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await?;
                if !exists {
                    return Ok(Value::Nil);
                }
                let last: Value = redis::cmd("XINFO")
                    .arg("STREAM")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await?;
                let first: Value = redis::cmd("XRANGE")
                    .arg(&key)
                    .arg("-")
                    .arg("+")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(&mut conn)
                    .await?;
                Ok(Value::Array(vec![last, first]))
            })
            .await?;
        let Value::Array(parts) = reply else {
            return Ok(None);
        };
        let corrupt = |what: &str| L2Error::Corrupt {
            key: key.clone(),
            what: what.to_owned(),
        };
        let mut parts = parts.into_iter();
        let info = parts.next().ok_or_else(|| corrupt("no XINFO reply"))?;
        let first = parts.next().ok_or_else(|| corrupt("no XRANGE reply"))?;
        let info: std::collections::HashMap<String, Value> =
            redis::from_redis_value(info).map_err(|e| corrupt(&format!("XINFO: {e}")))?;
        let last_generated = info
            .get("last-generated-id")
            .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
            .and_then(|v| StreamId::parse(&v))
            .ok_or_else(|| corrupt("XINFO has no last-generated-id"))?;
        let first: Vec<(String, Vec<(String, String)>)> =
            redis::from_redis_value(first).map_err(|e| corrupt(&format!("XRANGE: {e}")))?;
        Ok(Some(BusExtent {
            first: first.first().and_then(|(id, _)| StreamId::parse(id)),
            last_generated,
        }))
    }
}
