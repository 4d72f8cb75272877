//! Leases stop thundering herds (after Facebook's memcache): on a miss exactly one caller is
//! granted a lease and loads from the database; the others are told to wait and look again,
//! so a thousand concurrent misses on one key cost one load. A set while the key is leased
//! needs the lease's token ([`L2::set_leased`]), so a filler that lost its lease (it
//! expired) cannot overwrite the one that holds it now.

use std::time::Duration;

use redis::{self, Value};

use crate::entry::{Entry, Version};
use crate::l2::{L2, L2Error};

/// Lease times are capped, so a crashed filler blocks others for at most this long.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(10);

/// What a lease request got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// A hit: no load needed.
    Hit(Entry),
    /// A miss, and this caller holds the lease: load, then [`L2::set_leased`] with the token.
    Granted(String),
    /// A miss while another caller loads: look again after a short wait.
    Wait,
}

/// Returns the entry when present; otherwise takes the lease if free, and enters the key in
/// the index set of each tag the fill will carry (kept at least as long as the lease), so a
/// tag invalidation finds the lease and cancels it. KEYS: entry, lease, tag sets. ARGV:
/// token, lease ttl ms, key.
const LEASE_LUA: &str = r"
local found = redis.call('HMGET', KEYS[1], 'v', 'd', 't')
if found[1] then
  return {'hit', found[1], found[2], found[3] or '', redis.call('PTTL', KEYS[1])}
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local ttl = tonumber(ARGV[2])
  for i = 3, #KEYS do
    redis.call('SADD', KEYS[i], ARGV[3])
    if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
  end
  return {'granted'}
end
return {'wait'}
";

impl L2 {
    /// A hit, the lease, or "wait": see [`LeaseOutcome`]. The lease lasts `ttl` (capped by
    /// [`MAX_LEASE_TTL`]) unless released by [`L2::set_leased`].
    pub async fn lease(&self, key: &str, ttl: Duration) -> Result<LeaseOutcome, L2Error> {
        self.lease_tagged(key, ttl, &[]).await
    }

    /// Like [`L2::lease`], for a fill that will carry `tags`: invalidating any of them
    /// ([`L2::invalidate_tags`]) while the lease is out cancels it, so the filler's
    /// [`L2::set_leased`] is refused ([`SetOutcome::LeaseMismatch`]) rather than storing
    /// what it read before the change.
    ///
    /// [`SetOutcome::LeaseMismatch`]: crate::SetOutcome::LeaseMismatch
    pub async fn lease_tagged(
        &self,
        key: &str,
        ttl: Duration,
        tags: &[String],
    ) -> Result<LeaseOutcome, L2Error> {
        crate::l2::check_tags(tags)?;
        let ttl_ms = ttl.min(MAX_LEASE_TTL).as_millis().max(1) as u64;
        let token = uuid::Uuid::now_v7().simple().to_string();
        let script = redis::Script::new(LEASE_LUA);
        let mut call = script.key(self.entry_key(key));
        call.key(self.lease_key(key));
        for tag in tags {
            call.key(self.tag_key(tag));
        }
        call.arg(&token).arg(ttl_ms).arg(key);
        let reply: Vec<Value> = self
            .bounded("lease", async {
                let mut conn = self.conn().await?;
                Ok(call.invoke_async(&mut conn).await?)
            })
            .await?;
        let corrupt = |what: &str| L2Error::Corrupt {
            key: key.to_owned(),
            what: what.to_owned(),
        };
        let text = |v: &Value| -> Option<Vec<u8>> { redis::from_redis_value(v.clone()).ok() };
        let kind = reply
            .first()
            .and_then(text)
            .ok_or_else(|| corrupt("lease reply"))?;
        match kind.as_slice() {
            b"granted" => Ok(LeaseOutcome::Granted(token)),
            b"wait" => Ok(LeaseOutcome::Wait),
            b"hit" => {
                let field = |i: usize| reply.get(i).and_then(text);
                let version = field(1)
                    .and_then(|v| String::from_utf8(v).ok())
                    .and_then(|v| v.parse::<i64>().ok())
                    .ok_or_else(|| corrupt("version"))?;
                let value = field(2).unwrap_or_default();
                let tags = field(3)
                    .and_then(|v| String::from_utf8(v).ok())
                    .unwrap_or_default();
                let pttl: i64 = reply
                    .get(4)
                    .and_then(|v| redis::from_redis_value(v.clone()).ok())
                    .unwrap_or(0);
                Ok(LeaseOutcome::Hit(Entry {
                    value: value.into(),
                    version: Version(version),
                    tags: crate::l2::split_tags(&tags),
                    ttl: Duration::from_millis(pttl.max(0) as u64),
                }))
            }
            _ => Err(corrupt("unknown lease reply")),
        }
    }
}
