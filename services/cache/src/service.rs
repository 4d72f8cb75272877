//! The gRPC face of the cache tier: L1 (only while the bus subscriber is current) in front of
//! Redis (only while the relays vouch for the bus), with versioned sets and leases.
//!
//! A read is served by L1 only while this instance's bus subscriber is current: when the bus
//! cannot be read, an L1 entry might have missed an invalidation, so the read goes to Redis,
//! and when Redis is down too it is a miss. Redis is served only while the relays vouch for
//! the bus (`SubscriberHandle::bus_vouched`: no invalidation older than the staleness bound
//! is held up in an outbox): otherwise it may hold entries whose invalidations the relays
//! could not apply (Redis refusing writes keeps their floors from rising and their entries
//! from being dropped), so reads are misses and a lease request gets neither an entry nor
//! a lease, and callers read their database. Redis errors never fail a read (a cache that
//! cannot answer misses); they fail writes with UNAVAILABLE, since the caller should know
//! its fill did not land. A set while the bus is stale still reaches Redis: its value was
//! read after its lease, and the relays apply the held-up invalidations to Redis before
//! they vouch for the bus again, so nothing it stores outlives an invalidation.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use convoy_cache::bus::StreamId;
use convoy_cache::l1::L1;
use convoy_cache::l2::{L2, L2Error};
use convoy_cache::lease::LeaseOutcome;
use convoy_cache::subscriber::SubscriberHandle;
use convoy_cache::{Entry, SetOutcome, Version};
use convoy_proto::v1 as pb;
use convoy_proto::v1::cache_service_server::CacheService;
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Longest key, in bytes (the contract's limit).
const MAX_KEY_BYTES: usize = 512;
/// Most keys per BatchGet.
const MAX_BATCH_KEYS: usize = 256;
/// Most tags per entry.
const MAX_ENTRY_TAGS: usize = 8;
/// Most tags per InvalidateTags.
const MAX_INVALIDATE_TAGS: usize = 64;
/// Largest value, in bytes (1 MiB).
const MAX_VALUE_BYTES: usize = 1 << 20;
/// What a caller that must wait for another's fill is told.
const LEASE_RETRY_AFTER: Duration = Duration::from_millis(10);
/// Default lease time when the request names none.
const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(2);
/// Longest lease a request may ask for (L2 caps it there too).
const MAX_LEASE_TTL: Duration = Duration::from_secs(10);

fn invalid(field: &str, description: impl Into<String>) -> Status {
    let description = description.into();
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{field}: {description}"),
        ErrorDetails::with_bad_request_violation(field, description),
    )
}

fn check_key(field: &str, key: &str) -> Result<(), Status> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(invalid(
            field,
            format!("must have 1 to {MAX_KEY_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// A client's non-negative duration, capped at `max` (and never an overflow: the client picks
/// the numbers).
fn bounded_duration(d: &prost_types::Duration, max: Duration) -> Duration {
    let seconds = u64::try_from(d.seconds).unwrap_or(0);
    let nanos = u64::try_from(d.nanos).unwrap_or(0).min(999_999_999);
    Duration::from_secs(seconds.min(max.as_secs().saturating_add(1)))
        .saturating_add(Duration::from_nanos(nanos))
        .min(max)
}

fn unavailable(e: L2Error) -> Status {
    Status::unavailable(format!("cache store unavailable: {e}"))
}

/// Counters of the layers that answered, for Stats and for metrics
/// (`convoy_cache_lookups_total{layer}`).
#[derive(Debug, Default)]
struct Counters {
    l1_hits: AtomicU64,
    l2_hits: AtomicU64,
    misses: AtomicU64,
}

/// Where a lookup ended.
#[derive(Clone, Copy, Debug)]
enum Layer {
    L1,
    L2,
    Miss,
}

impl Counters {
    fn count(&self, layer: Layer) {
        let (counter, label) = match layer {
            Layer::L1 => (&self.l1_hits, "l1"),
            Layer::L2 => (&self.l2_hits, "l2"),
            Layer::Miss => (&self.misses, "miss"),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("convoy_cache_lookups_total", "layer" => label).increment(1);
    }
}

/// What a lookup found, and where.
struct Found {
    entry: Option<Entry>,
    layer: pb::CacheLayer,
    /// With an L1 answer: the bus position that L1 was coherent through before the read.
    position: Option<StreamId>,
}

/// The CacheService implementation.
#[derive(Clone)]
pub struct CacheApi {
    l1: L1,
    l2: Arc<L2>,
    bus: SubscriberHandle,
    max_ttl: Duration,
    l1_capacity_bytes: u64,
    counters: Arc<Counters>,
}

impl CacheApi {
    /// A service over `l1` (kept coherent by the subscriber behind `bus`) and `l2`.
    pub fn new(
        l1: L1,
        l2: Arc<L2>,
        bus: SubscriberHandle,
        max_ttl: Duration,
        l1_capacity_bytes: u64,
    ) -> Self {
        Self {
            l1,
            l2,
            bus,
            max_ttl,
            l1_capacity_bytes,
            counters: Arc::default(),
        }
    }

    fn wire(key: &str, entry: &Entry) -> pb::CacheEntry {
        pb::CacheEntry {
            key: key.to_owned(),
            value: entry.value.to_vec(),
            version: entry.version.0,
            tags: entry.tags.clone(),
            ttl: Some(prost_types::Duration {
                seconds: entry.ttl.as_secs() as i64,
                nanos: entry.ttl.subsec_nanos() as i32,
            }),
        }
    }

    /// L1 (when current), then L2 (promoting into L1 unless `peek`), else a miss; a miss
    /// while the relays do not vouch for the bus.
    async fn lookup(&self, key: &str, min: Option<Version>, peek: bool) -> Found {
        let miss = Found {
            entry: None,
            layer: pb::CacheLayer::Unspecified,
            position: None,
        };
        if !self.bus.bus_vouched() {
            self.count(peek, Layer::Miss);
            return miss;
        }
        let current = self.bus.is_current();
        // Read before L1 is: every invalidation through it was applied before the lookup.
        let position = self.bus.coherent_through();
        // Taken before L2 is read: a flush in between refuses the promotion.
        let ticket = self.l1.ticket().await;
        let l1 = if peek {
            self.l1
                .peek(key)
                .await
                .filter(|e| min.is_none_or(|m| e.version >= m))
        } else {
            self.l1.get(key, min).await
        };
        if current && let Some(entry) = l1 {
            self.count(peek, Layer::L1);
            return Found {
                entry: Some((*entry).clone()),
                layer: pb::CacheLayer::L1,
                position,
            };
        }
        match self.l2.get(key).await {
            Ok(Some(entry)) if min.is_none_or(|m| entry.version >= m) => {
                if current && !peek {
                    self.l1.set_fenced(key, entry.clone(), ticket).await;
                }
                self.count(peek, Layer::L2);
                Found {
                    entry: Some(entry),
                    layer: pb::CacheLayer::L2,
                    position: None,
                }
            }
            Ok(_) => {
                self.count(peek, Layer::Miss);
                miss
            }
            Err(e) => {
                tracing::debug!(error = %e, "L2 unavailable; answering a miss");
                self.count(peek, Layer::Miss);
                miss
            }
        }
    }

    fn count(&self, peek: bool, layer: Layer) {
        if !peek {
            self.counters.count(layer);
        }
    }

    fn entry_from(&self, e: &pb::CacheEntry) -> Result<(String, Entry), Status> {
        check_key("entry.key", &e.key)?;
        if e.value.len() > MAX_VALUE_BYTES {
            return Err(invalid(
                "entry.value",
                format!("is over {MAX_VALUE_BYTES} bytes"),
            ));
        }
        if e.version < 0 {
            return Err(invalid("entry.version", "is negative"));
        }
        if e.tags.len() > MAX_ENTRY_TAGS {
            return Err(invalid(
                "entry.tags",
                format!("has over {MAX_ENTRY_TAGS} tags"),
            ));
        }
        let ttl = match &e.ttl {
            None => self.max_ttl,
            Some(d) if d.seconds < 0 || d.nanos < 0 => {
                return Err(invalid("entry.ttl", "is negative"));
            }
            Some(d) if d.seconds == 0 && d.nanos == 0 => self.max_ttl,
            Some(d) => bounded_duration(d, self.max_ttl),
        };
        Ok((
            e.key.clone(),
            Entry {
                value: Bytes::copy_from_slice(&e.value),
                version: Version(e.version),
                tags: e.tags.clone(),
                ttl,
            },
        ))
    }
}

#[tonic::async_trait]
impl CacheService for CacheApi {
    async fn get(
        &self,
        request: Request<pb::CacheGetRequest>,
    ) -> Result<Response<pb::CacheGetResponse>, Status> {
        let r = request.into_inner();
        check_key("key", &r.key)?;
        let min = (r.min_version > 0).then_some(Version(r.min_version));
        let found = self.lookup(&r.key, min, r.peek).await;
        Ok(Response::new(pb::CacheGetResponse {
            entry: found.entry.map(|e| Self::wire(&r.key, &e)),
            layer: found.layer as i32,
            bus_position: found.position.map(|p| p.to_string()).unwrap_or_default(),
        }))
    }

    async fn batch_get(
        &self,
        request: Request<pb::CacheBatchGetRequest>,
    ) -> Result<Response<pb::CacheBatchGetResponse>, Status> {
        let keys = request.into_inner().keys;
        if keys.len() > MAX_BATCH_KEYS {
            return Err(invalid("keys", format!("has over {MAX_BATCH_KEYS} keys")));
        }
        for (i, key) in keys.iter().enumerate() {
            check_key(&format!("keys[{i}]"), key)?;
        }
        // L1 first, then every L1 miss from Redis in one round trip, promoted as Get does;
        // nothing while the relays do not vouch for the bus.
        if !self.bus.bus_vouched() {
            for _ in &keys {
                self.counters.count(Layer::Miss);
            }
            return Ok(Response::new(pb::CacheBatchGetResponse {
                entries: Vec::new(),
            }));
        }
        let current = self.bus.is_current();
        let ticket = self.l1.ticket().await;
        let mut found: Vec<Option<Entry>> = Vec::with_capacity(keys.len());
        let mut missing = Vec::new();
        for key in &keys {
            let hit = if current {
                self.l1.get(key, None).await
            } else {
                None
            };
            match hit {
                Some(entry) => {
                    self.counters.count(Layer::L1);
                    found.push(Some((*entry).clone()));
                }
                None => {
                    missing.push((found.len(), key.clone()));
                    found.push(None);
                }
            }
        }
        if !missing.is_empty() {
            let wanted: Vec<String> = missing.iter().map(|(_, key)| key.clone()).collect();
            let from_l2 = self.l2.get_many(&wanted).await.unwrap_or_else(|e| {
                tracing::debug!(error = %e, "L2 unavailable; answering misses");
                vec![None; wanted.len()]
            });
            for ((slot, key), entry) in missing.into_iter().zip(from_l2) {
                match entry {
                    Some(entry) => {
                        self.counters.count(Layer::L2);
                        if current {
                            self.l1.set_fenced(&key, entry.clone(), ticket).await;
                        }
                        found[slot] = Some(entry);
                    }
                    None => self.counters.count(Layer::Miss),
                }
            }
        }
        let entries = keys
            .iter()
            .zip(found)
            .filter_map(|(key, entry)| entry.map(|e| Self::wire(key, &e)))
            .collect();
        Ok(Response::new(pb::CacheBatchGetResponse { entries }))
    }

    async fn set(
        &self,
        request: Request<pb::CacheSetRequest>,
    ) -> Result<Response<pb::CacheSetResponse>, Status> {
        let r = request.into_inner();
        let entry = r
            .entry
            .as_ref()
            .ok_or_else(|| invalid("entry", "is required"))?;
        let (key, entry) = self.entry_from(entry)?;
        let ticket = self.l1.ticket().await;
        let outcome = self
            .l2
            .set_leased(&key, &entry, &r.lease_token)
            .await
            .map_err(unavailable)?;
        if outcome == SetOutcome::Stored && self.bus.is_current() {
            self.l1.set_fenced(&key, entry, ticket).await;
        }
        let outcome = match outcome {
            SetOutcome::Stored => pb::SetOutcome::Stored,
            SetOutcome::Stale => pb::SetOutcome::Stale,
            SetOutcome::LeaseMismatch => pb::SetOutcome::LeaseMismatch,
        };
        Ok(Response::new(pb::CacheSetResponse {
            outcome: outcome as i32,
        }))
    }

    async fn invalidate(
        &self,
        request: Request<pb::CacheInvalidateRequest>,
    ) -> Result<Response<pb::CacheInvalidateResponse>, Status> {
        let r = request.into_inner();
        check_key("key", &r.key)?;
        self.l2
            .invalidate(&r.key, Version(r.version))
            .await
            .map_err(unavailable)?;
        self.l1.invalidate(&r.key, Version(r.version)).await;
        Ok(Response::new(pb::CacheInvalidateResponse {}))
    }

    async fn invalidate_tags(
        &self,
        request: Request<pb::InvalidateTagsRequest>,
    ) -> Result<Response<pb::InvalidateTagsResponse>, Status> {
        let tags = request.into_inner().tags;
        if tags.is_empty() || tags.len() > MAX_INVALIDATE_TAGS {
            return Err(invalid(
                "tags",
                format!("must name 1 to {MAX_INVALIDATE_TAGS} tags"),
            ));
        }
        let dropped = self.l2.invalidate_tags(&tags).await.map_err(unavailable)?;
        let local = self.l1.invalidate_tags(&tags).await;
        Ok(Response::new(pb::InvalidateTagsResponse {
            dropped_count: (dropped + local) as i64,
        }))
    }

    async fn lease(
        &self,
        request: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::LeaseResponse>, Status> {
        let r = request.into_inner();
        check_key("key", &r.key)?;
        if r.tags.len() > MAX_ENTRY_TAGS {
            return Err(invalid("tags", format!("has over {MAX_ENTRY_TAGS} tags")));
        }
        if !self.bus.bus_vouched() {
            // Neither an entry that may be stale nor a lease: the caller reads its source
            // and stores nothing (its store could not land in Redis while it refuses
            // writes, which is the usual reason).
            self.counters.count(Layer::Miss);
            return Ok(Response::new(pb::LeaseResponse {
                outcome: None,
                layer: pb::CacheLayer::Unspecified as i32,
                bus_position: String::new(),
            }));
        }
        // Read before L1 is; see `lookup`.
        let position = self.bus.coherent_through();
        if self.bus.is_current()
            && let Some(entry) = self.l1.get(&r.key, None).await
        {
            self.counters.count(Layer::L1);
            return Ok(Response::new(pb::LeaseResponse {
                outcome: Some(pb::lease_response::Outcome::Entry(Self::wire(
                    &r.key, &entry,
                ))),
                layer: pb::CacheLayer::L1 as i32,
                bus_position: position.map(|p| p.to_string()).unwrap_or_default(),
            }));
        }
        // Taken before L2 is read: a flush in between refuses the promotion.
        let ticket = self.l1.ticket().await;
        let ttl = r
            .lease_ttl
            .map(|d| bounded_duration(&d, MAX_LEASE_TTL))
            .filter(|d| !d.is_zero())
            .unwrap_or(DEFAULT_LEASE_TTL);
        let leased = self
            .l2
            .lease_tagged(&r.key, ttl, &r.tags)
            .await
            .map_err(|e| match e {
                L2Error::InvalidArgument(why) => invalid("tags", why),
                e => {
                    // Unanswered: the caller reads its source, as after a miss.
                    self.counters.count(Layer::Miss);
                    unavailable(e)
                }
            })?;
        let layer = match &leased {
            LeaseOutcome::Hit(_) => pb::CacheLayer::L2,
            _ => pb::CacheLayer::Unspecified,
        };
        let outcome = match leased {
            LeaseOutcome::Hit(entry) => {
                self.counters.count(Layer::L2);
                let wire = Self::wire(&r.key, &entry);
                if self.bus.is_current() {
                    self.l1.set_fenced(&r.key, entry, ticket).await;
                }
                pb::lease_response::Outcome::Entry(wire)
            }
            LeaseOutcome::Granted(token) => {
                self.counters.count(Layer::Miss);
                pb::lease_response::Outcome::LeaseToken(token)
            }
            LeaseOutcome::Wait => pb::lease_response::Outcome::RetryAfter(prost_types::Duration {
                seconds: 0,
                nanos: LEASE_RETRY_AFTER.as_nanos() as i32,
            }),
        };
        Ok(Response::new(pb::LeaseResponse {
            outcome: Some(outcome),
            layer: layer as i32,
            bus_position: String::new(),
        }))
    }

    async fn stats(
        &self,
        _request: Request<pb::CacheStatsRequest>,
    ) -> Result<Response<pb::CacheStatsResponse>, Status> {
        let l1 = self.l1.stats().await;
        Ok(Response::new(pb::CacheStatsResponse {
            l1_hits: self.counters.l1_hits.load(Ordering::Relaxed) as i64,
            l2_hits: self.counters.l2_hits.load(Ordering::Relaxed) as i64,
            misses: self.counters.misses.load(Ordering::Relaxed) as i64,
            l1_entries: l1.entries as i64,
            l1_bytes: l1.bytes as i64,
            l1_capacity_bytes: self.l1_capacity_bytes as i64,
            l2_healthy: self.l2.ping().await.is_ok(),
            bus_flushes: self.bus.flushes() as i64,
        }))
    }

    async fn flush(
        &self,
        _request: Request<pb::CacheFlushRequest>,
    ) -> Result<Response<pb::CacheFlushResponse>, Status> {
        self.l2.flush().await.map_err(unavailable)?;
        self.l1.flush().await;
        Ok(Response::new(pb::CacheFlushResponse {}))
    }
}
