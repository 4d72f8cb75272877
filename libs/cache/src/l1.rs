//! The in-process L1: a byte-bounded moka cache (TinyLFU admission) of versioned entries.
//!
//! Every write to a key runs under moka's per-key lock (`and_compute_with`), and so does
//! every invalidation; an invalidation records a *floor* (the least version a later fill may
//! store) before it removes the entry. A fill that read an old row before a write and sets
//! after the write's invalidation therefore finds the floor and is refused, however the two
//! interleave: moka's own single-flight loads are not fenced against invalidations, this is.
//!
//! Tags map to the keys that carry them, so invalidating a tag touches only its keys. A key
//! stays in a tag's set until the tag is invalidated or [`L1::prune_tags`] finds it gone;
//! a stale member is harmless (invalidating a missing key does nothing).
//!
//! Not here: Redis (see [`crate::l2`]), leases, or the invalidation bus.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;
use moka::ops::compute::{CompResult, Op};

use crate::entry::{Entry, SetOutcome, Version};

/// L1 settings.
#[derive(Clone, Debug)]
pub struct L1Config {
    /// Bytes of entries kept (keys, values and tags, see [`Entry::weight`]). 64 MiB.
    pub capacity_bytes: u64,
    /// Longest time an entry is served, whatever its own TTL. 5 min: L1 is the layer that
    /// can miss an invalidation (until the bus notices the gap), so it holds data briefly.
    pub max_ttl: Duration,
    /// How long an invalidation's floor is remembered. 1 min: longer than any fill can take
    /// to land (an L2 read is bounded at 1 s, a leased fill by its lease, at most 10 s).
    /// Floors are bounded by this time only, never by count: a size-bounded cache would
    /// evict (or refuse to admit) floors, and a lost floor lets a stale fill land. Memory
    /// is about 100 bytes per invalidation in the last minute.
    pub floor_ttl: Duration,
}

impl Default for L1Config {
    fn default() -> Self {
        Self {
            capacity_bytes: 64 << 20,
            max_ttl: Duration::from_secs(300),
            floor_ttl: Duration::from_secs(60),
        }
    }
}

/// Each entry lives for its own TTL, capped by [`L1Config::max_ttl`].
struct EntryExpiry {
    max_ttl: Duration,
}

impl Expiry<String, Arc<Entry>> for EntryExpiry {
    fn expire_after_create(
        &self,
        _key: &String,
        entry: &Arc<Entry>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(entry.ttl.min(self.max_ttl))
    }

    fn expire_after_update(
        &self,
        _key: &String,
        entry: &Arc<Entry>,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.ttl.min(self.max_ttl))
    }
}

/// Hit and miss counts of an L1.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L1Stats {
    /// Gets answered.
    pub hits: u64,
    /// Gets not answered (absent, or older than asked for).
    pub misses: u64,
    /// Entries held now (approximate until pending maintenance runs).
    pub entries: u64,
    /// Bytes held now (approximate until pending maintenance runs).
    pub bytes: u64,
}

/// The in-process cache; cheap to clone (clones share the cache).
#[derive(Clone)]
pub struct L1 {
    entries: Cache<String, Arc<Entry>>,
    floors: Cache<String, Version>,
    tags: Arc<Mutex<HashMap<String, HashSet<String>>>>,
    hits: Arc<AtomicU64>,
    misses: Arc<AtomicU64>,
    /// Flushes so far; fenced fills hold the read side.
    fence: Arc<tokio::sync::RwLock<u64>>,
}

/// The L1's flush generation when a fill started; see [`L1::ticket`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FillTicket(u64);

impl L1 {
    /// An empty L1.
    pub fn new(config: L1Config) -> Self {
        let entries = Cache::builder()
            .max_capacity(config.capacity_bytes)
            .weigher(|key: &String, entry: &Arc<Entry>| entry.weight(key))
            .expire_after(EntryExpiry {
                max_ttl: config.max_ttl,
            })
            .build();
        let floors = Cache::builder().time_to_live(config.floor_ttl).build();
        Self {
            entries,
            floors,
            tags: Arc::default(),
            hits: Arc::default(),
            misses: Arc::default(),
            fence: Arc::default(),
        }
    }

    fn tags(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashSet<String>>> {
        self.tags.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The entry for `key`, if present and at least `min_version`.
    pub async fn get(&self, key: &str, min_version: Option<Version>) -> Option<Arc<Entry>> {
        let found = self
            .entries
            .get(key)
            .await
            .filter(|e| min_version.is_none_or(|min| e.version >= min));
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// The entry for `key`, if present, without counting a hit or a miss (for samplers).
    pub async fn peek(&self, key: &str) -> Option<Arc<Entry>> {
        self.entries.get(key).await
    }

    /// A ticket for a fill: take it before reading the value from elsewhere (L2, the cache
    /// tier, a database), and store with [`L1::set_fenced`].
    pub async fn ticket(&self) -> FillTicket {
        FillTicket(*self.fence.read().await)
    }

    /// Stores `entry` if no flush happened since `ticket` was taken, and [`L1::set`] would.
    /// A flush drops entries but keeps floors, which only know the invalidations that
    /// arrived: a value read before a flush may predate an invalidation the flush stood in
    /// for, so it is refused ([`SetOutcome::Stale`]).
    pub async fn set_fenced(&self, key: &str, entry: Entry, ticket: FillTicket) -> SetOutcome {
        let generation = self.fence.read().await;
        if *generation != ticket.0 {
            return SetOutcome::Stale;
        }
        // Holding the read side keeps a flush out until the entry is in.
        let outcome = self.set(key, entry).await;
        drop(generation);
        outcome
    }

    /// Stores `entry` unless a newer version, or an invalidation at a newer version, was
    /// seen for `key` (an equal version is a harmless refill and is stored). Unfenced
    /// against flushes: values read from elsewhere go through [`L1::set_fenced`].
    pub async fn set(&self, key: &str, entry: Entry) -> SetOutcome {
        let floor = self.floors.clone();
        let tags = self.tags.clone();
        let owned_key = key.to_owned();
        let result = self
            .entries
            .entry(key.to_owned())
            .and_compute_with(|current| async move {
                let floor = floor.get(&owned_key).await;
                let older_than_floor = floor.is_some_and(|f| entry.version < f);
                let older_than_stored = current
                    .as_ref()
                    .is_some_and(|c| c.value().version > entry.version);
                if older_than_floor || older_than_stored {
                    return Op::Nop;
                }
                let mut tags = tags.lock().unwrap_or_else(|e| e.into_inner());
                for tag in &entry.tags {
                    tags.entry(tag.clone())
                        .or_default()
                        .insert(owned_key.clone());
                }
                Op::Put(Arc::new(entry))
            })
            .await;
        match result {
            CompResult::Inserted(_) | CompResult::ReplacedWith(_) => SetOutcome::Stored,
            _ => SetOutcome::Stale,
        }
    }

    /// Drops `key` and remembers `version` as the least version a later set may store.
    pub async fn invalidate(&self, key: &str, version: Version) {
        let floors = self.floors.clone();
        let owned_key = key.to_owned();
        self.entries
            .entry(key.to_owned())
            .and_compute_with(|_current| async move {
                let floor = floors.get(&owned_key).await;
                if floor.is_none_or(|f| f < version) {
                    floors.insert(owned_key, version).await;
                }
                Op::Remove
            })
            .await;
    }

    /// Drops every entry carrying any of `tags`; returns how many were present.
    pub async fn invalidate_tags(&self, tags: &[String]) -> u64 {
        let keys: HashSet<String> = {
            let mut index = self.tags();
            tags.iter()
                .filter_map(|tag| index.remove(tag))
                .flatten()
                .collect()
        };
        let mut dropped = 0;
        for key in keys {
            if self.entries.remove(&key).await.is_some() {
                dropped += 1;
            }
        }
        dropped
    }

    /// Drops everything (after a gap on the invalidation bus, for instance). Floors stay:
    /// they only ever refuse data that is known to be stale.
    pub async fn flush(&self) {
        let mut generation = self.fence.write().await;
        *generation += 1;
        self.entries.invalidate_all();
        self.tags().clear();
        self.entries.run_pending_tasks().await;
        drop(generation);
    }

    /// Removes tag members whose entry is gone, each under its key's lock so a concurrent
    /// set is never unlisted. Run it now and then; it only bounds memory.
    pub async fn prune_tags(&self) -> usize {
        let members: Vec<(String, String)> = self
            .tags()
            .iter()
            .flat_map(|(tag, keys)| keys.iter().map(move |k| (tag.clone(), k.clone())))
            .collect();
        let mut pruned = 0;
        for (tag, key) in members {
            let index = self.tags.clone();
            let removed = Arc::new(AtomicU64::new(0));
            let removed_in = removed.clone();
            self.entries
                .entry(key.clone())
                .and_compute_with(|current| async move {
                    if current.is_none() {
                        let mut index = index.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(keys) = index.get_mut(&tag) {
                            if keys.remove(&key) {
                                removed_in.fetch_add(1, Ordering::Relaxed);
                            }
                            if keys.is_empty() {
                                index.remove(&tag);
                            }
                        }
                    }
                    Op::Nop
                })
                .await;
            pruned += removed.load(Ordering::Relaxed) as usize;
        }
        pruned
    }

    /// Hits, misses and size.
    pub async fn stats(&self) -> L1Stats {
        self.entries.run_pending_tasks().await;
        L1Stats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: self.entries.entry_count(),
            bytes: self.entries.weighted_size(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn entry(version: i64, tags: &[&str]) -> Entry {
        Entry {
            value: Bytes::from(format!("value at v{version}")),
            version: Version(version),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            ttl: Duration::from_secs(60),
        }
    }

    #[tokio::test]
    async fn a_fill_that_started_before_a_flush_is_refused() {
        let l1 = L1::new(L1Config::default());
        let before = l1.ticket().await;
        // The flush stands for invalidations the L1 never saw, so no floor refuses v1.
        l1.flush().await;
        assert_eq!(
            l1.set_fenced("k", entry(1, &[]), before).await,
            SetOutcome::Stale
        );
        assert!(l1.get("k", None).await.is_none());
        let after = l1.ticket().await;
        assert_eq!(
            l1.set_fenced("k", entry(1, &[]), after).await,
            SetOutcome::Stored
        );
    }

    #[tokio::test]
    async fn a_set_is_read_back_and_min_version_is_respected() {
        let l1 = L1::new(L1Config::default());
        assert_eq!(l1.set("k", entry(3, &[])).await, SetOutcome::Stored);
        assert_eq!(l1.get("k", None).await.unwrap().version, Version(3));
        assert!(
            l1.get("k", Some(Version(4))).await.is_none(),
            "older than the token"
        );
        assert_eq!(l1.stats().await.hits, 1);
        assert_eq!(l1.stats().await.misses, 1);
    }

    #[tokio::test]
    async fn an_older_version_never_replaces_a_newer_one() {
        let l1 = L1::new(L1Config::default());
        l1.set("k", entry(5, &[])).await;
        assert_eq!(l1.set("k", entry(4, &[])).await, SetOutcome::Stale);
        assert_eq!(
            l1.set("k", entry(5, &[])).await,
            SetOutcome::Stored,
            "a refill"
        );
        assert_eq!(l1.set("k", entry(6, &[])).await, SetOutcome::Stored);
        assert_eq!(l1.get("k", None).await.unwrap().version, Version(6));
    }

    #[tokio::test]
    async fn a_stale_set_after_invalidation_is_refused() {
        let l1 = L1::new(L1Config::default());
        // A fill read v1; a write made v2 and invalidated; the fill now sets v1.
        l1.invalidate("k", Version(2)).await;
        assert_eq!(l1.set("k", entry(1, &[])).await, SetOutcome::Stale);
        assert!(l1.get("k", None).await.is_none());
        assert_eq!(l1.set("k", entry(2, &[])).await, SetOutcome::Stored);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_set_racing_an_invalidation_never_outlives_it() {
        let l1 = L1::new(L1Config::default());
        for round in 0..300 {
            let key = format!("k{round}");
            l1.set(&key, entry(1, &[])).await;
            let (a, b) = (l1.clone(), l1.clone());
            let (k1, k2) = (key.clone(), key.clone());
            let stale_fill = tokio::spawn(async move { a.set(&k1, entry(1, &[])).await });
            let invalidation = tokio::spawn(async move { b.invalidate(&k2, Version(2)).await });
            stale_fill.await.unwrap();
            invalidation.await.unwrap();
            // Whatever the order, once the invalidation is done v1 is not served.
            assert!(
                l1.get(&key, None).await.is_none(),
                "round {round}: v1 survived"
            );
        }
    }

    #[tokio::test]
    async fn invalidating_a_tag_drops_exactly_its_entries() {
        let l1 = L1::new(L1Config::default());
        l1.set("a", entry(1, &["team:acme"])).await;
        l1.set("b", entry(1, &["team:acme", "kind:summary"])).await;
        l1.set("c", entry(1, &["team:other"])).await;
        assert_eq!(l1.invalidate_tags(&["team:acme".into()]).await, 2);
        assert!(l1.get("a", None).await.is_none());
        assert!(l1.get("b", None).await.is_none());
        assert!(l1.get("c", None).await.is_some());
        // Invalidated again: nothing left under the tag.
        assert_eq!(l1.invalidate_tags(&["team:acme".into()]).await, 0);
    }

    #[tokio::test]
    async fn pruning_drops_members_whose_entries_are_gone_and_keeps_live_ones() {
        let l1 = L1::new(L1Config::default());
        l1.set("gone", entry(1, &["t"])).await;
        l1.set("live", entry(1, &["t"])).await;
        l1.invalidate("gone", Version(2)).await;
        assert_eq!(l1.prune_tags().await, 1);
        assert_eq!(
            l1.invalidate_tags(&["t".into()]).await,
            1,
            "the live one is still indexed"
        );
    }

    #[tokio::test]
    async fn the_cache_holds_at_most_its_byte_capacity() {
        let l1 = L1::new(L1Config {
            capacity_bytes: 64 * 1024,
            ..L1Config::default()
        });
        for i in 0..1000 {
            let mut e = entry(1, &[]);
            e.value = Bytes::from(vec![0u8; 1000]);
            l1.set(&format!("k{i}"), e).await;
        }
        let stats = l1.stats().await;
        assert!(stats.bytes <= 64 * 1024, "{} bytes held", stats.bytes);
        assert!(stats.entries > 0 && stats.entries < 1000);
    }
}
