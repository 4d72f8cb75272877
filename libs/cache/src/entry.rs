//! What the cache layers store and answer.

use std::time::Duration;

use bytes::Bytes;

/// The version of the source row a value was filled from (the row's `version` column).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(pub i64);

/// A cached value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The value's bytes (an encoded protobuf message for convoy's own callers).
    pub value: Bytes,
    /// The version it was filled from.
    pub version: Version,
    /// Tags for group invalidation (for example `team:acme`).
    pub tags: Vec<String>,
    /// How long it may be served.
    pub ttl: Duration,
}

impl Entry {
    /// Bytes the entry holds, for size-aware eviction (value, tags and a fixed overhead).
    pub fn weight(&self, key: &str) -> u32 {
        const OVERHEAD: usize = 64;
        let bytes = key.len()
            + self.value.len()
            + self.tags.iter().map(String::len).sum::<usize>()
            + OVERHEAD;
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }
}

/// What a set did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetOutcome {
    /// Stored.
    Stored,
    /// Refused: a newer version, or an invalidation of this one, was already seen.
    Stale,
    /// Refused: the key is leased to another filler (or the caller's lease expired).
    LeaseMismatch,
}
