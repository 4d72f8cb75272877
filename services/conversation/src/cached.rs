//! GetConversation through the caches: this instance's own small L1 for hot keys, then the
//! cache tier (the key's owning instance, found by consistent hashing), then the database
//! (a replica the read may use, or the primary; "primary" below means that source).
//!
//! Fills are leased: on a miss the cache tier gives one caller a lease token; that caller
//! reads the primary and stores the row with the token, while concurrent callers for the
//! same key wait briefly and ask again (and read the primary themselves if the fill takes
//! too long). Every layer is versioned, so a fill that read an older row than a write
//! already invalidated is refused (`SetOutcome::Stale`) instead of putting stale data back.
//!
//! Consistency tokens: a read carrying a token for the conversation it reads never takes a
//! cached value older than the token's version from any layer; a token for another
//! conversation says nothing about this one's cached versions, so such a read goes to the
//! primary. The own L1 serves only while its bus subscriber is current; the cache tier's
//! instances follow the same rule. The own L1 takes copies of what it fills itself, of what
//! the tier read from Redis (the relay drops a key there before it publishes), and of what
//! the tier's L1 served only if that L1 was past every invalidation the own L1 skipped by
//! flushing (it reports its bus position).
//!
//! Any cache failure is a miss: reads never fail because a cache did.

use std::time::Duration;

use bytes::Bytes;
use convoy_cache::bus::StreamId;
use convoy_cache::l1::{FillTicket, L1};
use convoy_cache::subscriber::SubscriberHandle;
use convoy_cache::{Entry, SetOutcome, Version};
use convoy_client::CacheClient;
use convoy_proto::consistency::ConsistencyToken;
use convoy_proto::v1 as pb;
use convoy_proto::v1::lease_response::Outcome;
use prost::Message;

use crate::error::ApiError;
use crate::names::ConversationName;
use crate::relay::cache_key;
use crate::store::{ConversationStore, ReadAt};
use crate::wire;

/// How long a cached conversation may be served without an invalidation. 5 minutes: the
/// bus invalidates on every write; the TTL only bounds what a lost cache node leaves behind.
const ENTRY_TTL: Duration = Duration::from_secs(300);
/// How long a filler may take between its lease and its set. 1 s: a primary read takes
/// milliseconds; past this, waiting readers stop waiting anyway.
const LEASE_TTL: Duration = Duration::from_secs(1);
/// Times a reader asks while another fills (waiting between asks), before reading the
/// primary itself.
const LEASE_ASKS: usize = 4;
/// Longest pause between those asks, whatever the cache tier suggests.
const MAX_LEASE_WAIT: Duration = Duration::from_millis(20);

/// This instance's own L1 and the subscriber that keeps it coherent.
#[derive(Clone)]
pub struct LocalCache {
    /// The cache.
    pub l1: L1,
    /// Its bus subscriber.
    pub bus: SubscriberHandle,
}

/// Where a read was answered, for metrics and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// This instance's L1.
    Local,
    /// The cache tier (its L1 or L2).
    Tier,
    /// The primary, after a miss the reader filled.
    Filled,
    /// The primary, without touching the caches.
    Primary,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Tier => "tier",
            Self::Filled => "filled",
            Self::Primary => "primary",
        }
    }
}

/// Conversation reads through the caches; see the module docs.
#[derive(Clone, Default)]
pub struct ReadThrough {
    local: Option<LocalCache>,
    tier: Option<CacheClient>,
}

impl std::fmt::Debug for ReadThrough {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadThrough")
            .field("local", &self.local.is_some())
            .field("tier", &self.tier)
            .finish()
    }
}

impl ReadThrough {
    /// Reads through `local` (if any), then `tier` (if any), then the primary.
    pub fn new(local: Option<LocalCache>, tier: Option<CacheClient>) -> Self {
        Self { local, tier }
    }

    /// The conversation `name`, never older than `token`'s version when the token names it.
    pub async fn get(
        &self,
        store: &ConversationStore,
        name: &ConversationName,
        token: Option<&ConsistencyToken>,
    ) -> Result<(pb::Conversation, Source), ApiError> {
        // Whatever the caches hold, the database read behind them honours the token's LSN.
        let at = ReadAt::from_token(token);
        let min = match token {
            Some(t) if t.conversation == name.id => Some(Version(t.version)),
            Some(_) => return self.source(store, name, &at, Source::Primary).await,
            None => None,
        };
        let key = cache_key(name.team.as_str(), name.id);
        let result = self.lookup(store, name, &key, min, &at).await;
        if let Ok((_, source)) = &result {
            metrics::counter!("convoy_conversation_reads_total", "source" => source.as_str())
                .increment(1);
        }
        result
    }

    async fn lookup(
        &self,
        store: &ConversationStore,
        name: &ConversationName,
        key: &str,
        min: Option<Version>,
        at: &ReadAt,
    ) -> Result<(pb::Conversation, Source), ApiError> {
        if let Some(local) = &self.local
            && local.bus.is_current()
            && let Some(entry) = local.l1.get(key, min).await
            && let Some(conversation) = decode(key, &entry.value)
        {
            return Ok((conversation, Source::Local));
        }
        let Some(tier) = &self.tier else {
            return self.source(store, name, at, Source::Primary).await;
        };
        // Taken before the tier is asked: a flush of the own L1 in between refuses the copy.
        let ticket = match &self.local {
            Some(local) => Some(local.l1.ticket().await),
            None => None,
        };
        for attempt in 0..LEASE_ASKS {
            let response = match tier.lease(key, Some(LEASE_TTL)).await {
                Ok(response) => response,
                Err(status) => {
                    tracing::debug!(%status, key, "cache tier unavailable; reading the primary");
                    metrics::counter!("convoy_conversation_cache_errors_total").increment(1);
                    break;
                }
            };
            let copyable = self.copyable(&response.layer(), &response.bus_position);
            match response.outcome {
                Some(Outcome::Entry(entry)) => {
                    if min.is_some_and(|m| entry.version < m.0) {
                        // The tier has not seen the token's write yet: the primary has.
                        break;
                    }
                    let Some(conversation) = decode(key, &entry.value) else {
                        break;
                    };
                    if copyable {
                        self.keep_locally(key, entry.value.into(), entry.version, ticket)
                            .await;
                    }
                    return Ok((conversation, Source::Tier));
                }
                Some(Outcome::LeaseToken(lease)) => {
                    let row = RowRead { store, name, at };
                    return self.fill(row, key, tier, lease, ticket).await;
                }
                Some(Outcome::RetryAfter(after)) if attempt + 1 < LEASE_ASKS => {
                    let after = Duration::try_from(after).unwrap_or(MAX_LEASE_WAIT);
                    tokio::time::sleep(after.min(MAX_LEASE_WAIT)).await;
                }
                Some(Outcome::RetryAfter(_)) | None => break,
            }
        }
        self.source(store, name, at, Source::Primary).await
    }

    /// Reads the primary as the lease holder and stores what it read.
    async fn fill(
        &self,
        row: RowRead<'_>,
        key: &str,
        tier: &CacheClient,
        lease: String,
        ticket: Option<FillTicket>,
    ) -> Result<(pb::Conversation, Source), ApiError> {
        // A NOT_FOUND leaves the lease to expire: waiting readers then read the primary.
        let (conversation, version) = read_source(row.store, row.name, row.at).await?;
        let value = Bytes::from(conversation.encode_to_vec());
        let entry = pb::CacheEntry {
            key: key.to_owned(),
            value: value.to_vec(),
            version,
            tags: Vec::new(),
            ttl: Some(prost_types::Duration {
                seconds: ENTRY_TTL.as_secs() as i64,
                nanos: 0,
            }),
        };
        match tier.set(entry, lease).await {
            Ok(pb::SetOutcome::Stored) => self.keep_locally(key, value, version, ticket).await,
            Ok(outcome) => {
                metrics::counter!("convoy_conversation_fills_refused_total", "outcome" => outcome.as_str_name())
                    .increment(1);
            }
            Err(status) => tracing::debug!(%status, key, "cache fill failed"),
        }
        Ok((conversation, Source::Filled))
    }

    async fn source(
        &self,
        store: &ConversationStore,
        name: &ConversationName,
        at: &ReadAt,
        source: Source,
    ) -> Result<(pb::Conversation, Source), ApiError> {
        let (conversation, _) = read_source(store, name, at).await?;
        Ok((conversation, source))
    }

    /// Whether a value the tier answered may be copied into the own L1: one from Redis
    /// always (the relay drops a key there before it publishes the invalidation); one from
    /// the instance's L1 only if that L1 had applied every invalidation the own L1 skipped
    /// by flushing (see `SubscriberHandle::may_copy_from`).
    fn copyable(&self, layer: &pb::CacheLayer, position: &str) -> bool {
        let Some(local) = &self.local else {
            return false;
        };
        match layer {
            pb::CacheLayer::L2 => true,
            pb::CacheLayer::L1 => {
                StreamId::parse(position).is_some_and(|position| local.bus.may_copy_from(position))
            }
            pb::CacheLayer::Unspecified => false,
        }
    }

    /// Puts a value the tier holds (or just stored) into the own L1, which refuses it if an
    /// invalidation of a newer version already arrived.
    async fn keep_locally(
        &self,
        key: &str,
        value: Bytes,
        version: i64,
        ticket: Option<FillTicket>,
    ) {
        let (Some(local), Some(ticket)) = (&self.local, ticket) else {
            return;
        };
        if !local.bus.is_current() {
            return;
        }
        let entry = Entry {
            value,
            version: Version(version),
            tags: Vec::new(),
            ttl: ENTRY_TTL,
        };
        if local.l1.set_fenced(key, entry, ticket).await == SetOutcome::Stale {
            metrics::counter!("convoy_conversation_fills_refused_total", "outcome" => "LOCAL_STALE")
                .increment(1);
        }
    }
}

/// A row to read from the database, and where it may be read from.
#[derive(Clone, Copy)]
struct RowRead<'a> {
    store: &'a ConversationStore,
    name: &'a ConversationName,
    at: &'a ReadAt,
}

/// The row from the shard (a replica the read may use, or the primary), on the wire, with
/// its version.
async fn read_source(
    store: &ConversationStore,
    name: &ConversationName,
    at: &ReadAt,
) -> Result<(pb::Conversation, i64), ApiError> {
    let conversation = store.get(name, at).await?;
    let version = conversation.version.0;
    Ok((wire::conversation(conversation), version))
}

/// The cached conversation, or `None` (a miss) when the bytes do not decode.
fn decode(key: &str, value: &[u8]) -> Option<pb::Conversation> {
    match pb::Conversation::decode(value) {
        Ok(conversation) => Some(conversation),
        Err(e) => {
            tracing::warn!(key, error = %e, "undecodable cached conversation; reading the primary");
            None
        }
    }
}
