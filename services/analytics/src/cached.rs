//! Answers through the cache tier: a complete answer is stored under a key derived from
//! its query, tagged with its team (`team:{team}`, the tag every write's outbox row
//! carries), so the invalidation bus drops exactly that team's answers when one of its
//! conversations changes. Fleet answers carry no tag (every write would drop them) and age
//! out instead.
//!
//! Consistency tokens: a cached answer keeps, per shard it read, the WAL position its data
//! is at least as new as ([`crate::scatter::ShardAnswer::lsn`]). A read presenting a token
//! takes the cached answer only if the answer read the token's shard at or past the
//! token's position; otherwise the answer is computed again (from nodes that have the
//! write) and replaces the cached one. So a cached answer is never older than a token the
//! caller presents, even before the bus has delivered the write's invalidation.
//!
//! Fills are leased, so a burst of identical requests computes once: the others wait a
//! little and take the stored answer. Partial answers (a shard missing) are never stored.
//! Any cache failure is a miss: answers never fail because the cache did.

use std::collections::HashMap;
use std::time::Duration;

use convoy_client::CacheClient;
use convoy_proto::consistency::ConsistencyToken;
use convoy_proto::v1 as pb;
use convoy_proto::v1::lease_response::Outcome;
use prost::Message;

use crate::query::Query;

/// How long a filler may take between its lease and its set: a slow aggregate's time.
const LEASE_TTL: Duration = Duration::from_secs(5);
/// Times a reader asks while another fills before computing the answer itself.
const LEASE_ASKS: usize = 10;
/// Longest pause between those asks.
const MAX_LEASE_WAIT: Duration = Duration::from_millis(50);

/// An answer as the cache tier keeps it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CachedAnswer {
    /// The response message, encoded.
    #[prost(bytes = "vec", tag = "1")]
    pub response: Vec<u8>,
    /// Per shard read, the WAL position the answer's data is at least as new as.
    #[prost(map = "string, uint64", tag = "2")]
    pub lsns: HashMap<String, u64>,
}

impl CachedAnswer {
    /// Whether the answer reflects every write `token` stands for.
    pub fn satisfies(&self, token: Option<&ConsistencyToken>) -> bool {
        let Some(token) = token else {
            return true;
        };
        // A position of 0 or MAX was not measured: nothing cached can be shown to be newer.
        // A shard the answer did not read may have held the team when the write was made
        // (before a move): recompute rather than guess.
        token.lsn != 0
            && token.lsn != u64::MAX
            && self
                .lsns
                .get(&token.shard)
                .is_some_and(|at| *at >= token.lsn)
    }
}

/// What the cache said about a query's answer.
#[derive(Debug)]
pub enum Lookup {
    /// A stored answer fresh enough for the caller.
    Hit(CachedAnswer),
    /// No usable answer: compute it and store it with this lease token ("" when the key is
    /// not leased to this caller: the store then only replaces older answers).
    Fill(String),
    /// No cache, or it failed or stayed busy: compute without storing.
    Bypass,
}

/// The cache tier, as analytics uses it.
#[derive(Clone, Debug)]
pub struct AnswerCache {
    tier: Option<CacheClient>,
    team_ttl: Duration,
    fleet_ttl: Duration,
}

impl AnswerCache {
    /// Answers cached in `tier` (None: nothing is cached) for `team_ttl` (team answers) or
    /// `fleet_ttl` (fleet answers).
    pub fn new(tier: Option<CacheClient>, team_ttl: Duration, fleet_ttl: Duration) -> Self {
        Self {
            tier,
            team_ttl,
            fleet_ttl,
        }
    }

    /// The cache key of `query`'s answer: its team (for reading the tier by eye) and a hash
    /// of everything that shapes the answer. Fleet answers sit under the fleet's pseudo-team
    /// ([`convoy_auth::FLEET_TEAM`]), which the cache tier lets only holders of the
    /// fleet-wide grant reach: an admin of some teams cannot read the overview from there.
    pub fn key(query: &Query) -> String {
        let hash = xxhash_rust::xxh3::xxh3_128(query.canonical().as_bytes());
        match query.team() {
            Some(team) => format!("analytics:{team}:{hash:032x}"),
            None => format!("analytics:{}:{hash:032x}", convoy_auth::FLEET_TEAM),
        }
    }

    /// The tags `query`'s answer carries: its team's, which every write to the team's
    /// conversations invalidates; none for the fleet.
    fn tags(query: &Query) -> Vec<String> {
        query
            .team()
            .map(|team| vec![format!("team:{team}")])
            .unwrap_or_default()
    }

    /// Looks `query`'s answer up for a caller presenting `token`. A lease is bound to the
    /// answer's tags: a write to the team while the answer is computed cancels it, so an
    /// answer that may have missed the write is not stored.
    pub async fn lookup(&self, query: &Query, token: Option<&ConsistencyToken>) -> Lookup {
        let Some(tier) = &self.tier else {
            return Lookup::Bypass;
        };
        let key = Self::key(query);
        let tags = Self::tags(query);
        for attempt in 0..LEASE_ASKS {
            let response = match tier.lease_tagged(&key, Some(LEASE_TTL), tags.clone()).await {
                Ok(response) => response,
                Err(status) => {
                    tracing::debug!(%status, key, "cache tier unavailable; computing");
                    return Lookup::Bypass;
                }
            };
            match response.outcome {
                Some(Outcome::Entry(entry)) => {
                    return match CachedAnswer::decode(entry.value.as_slice()) {
                        Ok(answer) if answer.satisfies(token) => Lookup::Hit(answer),
                        // Older than the caller's write (or unreadable): a fresh answer
                        // replaces it (its version is newer).
                        _ => Lookup::Fill(String::new()),
                    };
                }
                Some(Outcome::LeaseToken(lease)) => return Lookup::Fill(lease),
                Some(Outcome::RetryAfter(after)) if attempt + 1 < LEASE_ASKS => {
                    let after = Duration::try_from(after).unwrap_or(MAX_LEASE_WAIT);
                    tokio::time::sleep(after.min(MAX_LEASE_WAIT)).await;
                }
                Some(Outcome::RetryAfter(_)) | None => break,
            }
        }
        Lookup::Bypass
    }

    /// Stores `answer` for `query`, computed at `version` (milliseconds since the epoch, so
    /// a slower, older computation never replaces a newer one), with `lease` from
    /// [`Lookup::Fill`].
    pub async fn store(&self, query: &Query, answer: &CachedAnswer, version: i64, lease: String) {
        let Some(tier) = &self.tier else {
            return;
        };
        let ttl = match query.team() {
            Some(_) => self.team_ttl,
            None => self.fleet_ttl,
        };
        let tags = Self::tags(query);
        let entry = pb::CacheEntry {
            key: Self::key(query),
            value: answer.encode_to_vec(),
            version,
            tags,
            ttl: Some(prost_types::Duration {
                seconds: ttl.as_secs() as i64,
                nanos: ttl.subsec_nanos() as i32,
            }),
        };
        match tier.set(entry, lease).await {
            Ok(pb::SetOutcome::Stored) => {}
            Ok(outcome) => tracing::debug!(?outcome, "analytics answer not stored"),
            Err(status) => tracing::debug!(%status, "analytics answer not stored"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(shard: &str, lsn: u64) -> ConsistencyToken {
        ConsistencyToken {
            shard: shard.into(),
            lsn,
            conversation: Default::default(),
            version: 1,
        }
    }

    #[test]
    fn a_cached_answer_serves_only_tokens_it_has_read_past() {
        let answer = CachedAnswer {
            response: Vec::new(),
            lsns: HashMap::from([("shard-0".into(), 1000)]),
        };
        assert!(answer.satisfies(None));
        assert!(answer.satisfies(Some(&token("shard-0", 1000))));
        assert!(!answer.satisfies(Some(&token("shard-0", 1001))));
        // Unmeasured positions and shards the answer did not read: recompute.
        assert!(!answer.satisfies(Some(&token("shard-0", 0))));
        assert!(!answer.satisfies(Some(&token("shard-0", u64::MAX))));
        assert!(!answer.satisfies(Some(&token("shard-1", 5))));
    }
}
