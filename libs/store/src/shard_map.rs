//! The shard map: which shard owns each slot, and where each shard's servers are.
//!
//! A map is read from configuration (a TOML file or a list of DSNs split evenly) or from
//! etcd, where the shard-router publishes it in the same shape. A map is validated once
//! when built ("parse, don't validate"): every slot has exactly one owner, shard ids are
//! unique labels, and every shard has a primary.
//!
//! Not here: connections (see [`crate::pool`]) or the hash (see [`crate::slots`]).

use std::fmt;
use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};

use crate::slots::{SLOT_COUNT, Slot};

/// A shard's stable id, such as `shard-0`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(String);

impl ShardId {
    /// A shard id: 1 to 63 characters of `[a-z0-9-]`.
    pub fn new(id: impl Into<String>) -> Result<Self, ShardMapError> {
        let id = id.into();
        let valid = !id.is_empty()
            && id.len() <= 63
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if valid {
            Ok(Self(id))
        } else {
            Err(ShardMapError::BadShardId(id))
        }
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The shard map's version: incremented by every change of placement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub u64);

/// One shard: a primary and its replicas.
#[derive(Clone, PartialEq, Eq)]
pub struct Shard {
    /// The shard's id.
    pub id: ShardId,
    /// Connection string of the primary (`postgres://...`); may hold credentials, so it is
    /// never logged (see [`redact_dsn`]).
    pub primary: String,
    /// Connection strings of streaming replicas.
    pub replicas: Vec<String>,
}

/// Shows the DSNs redacted ([`redact_dsn`]): a shard (or a map) printed with `{:?}` in a
/// log line or an assertion carries no password.
impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("id", &self.id)
            .field("primary", &redact_dsn(&self.primary))
            .field(
                "replicas",
                &self
                    .replicas
                    .iter()
                    .map(|r| redact_dsn(r))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Index of a shard in [`ShardMap::shards`].
pub type ShardIndex = usize;

/// A validated shard map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardMap {
    epoch: Epoch,
    shards: Vec<Shard>,
    /// `owner[slot]` is the index of the shard owning the slot.
    owner: Vec<u16>,
}

/// Why a shard map is invalid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShardMapError {
    /// A shard id with characters other than `[a-z0-9-]` or of a bad length.
    #[error("shard id {0:?} is invalid: use 1 to 63 characters of [a-z0-9-]")]
    BadShardId(String),
    /// Two shards with one id.
    #[error("shard id {0:?} appears twice")]
    DuplicateShard(String),
    /// No shards at all.
    #[error("the shard map has no shards: configure at least one")]
    NoShards,
    /// A slot range that does not parse or is out of bounds.
    #[error("slot range {0:?} is invalid: write `start-end` with 0 <= start <= end < {SLOT_COUNT}")]
    BadRange(String),
    /// A slot owned by two shards.
    #[error("slot {slot} is assigned to both {first} and {second}")]
    Overlap {
        /// The slot.
        slot: u16,
        /// One owner.
        first: String,
        /// The other.
        second: String,
    },
    /// A slot owned by nobody.
    #[error("slot {0} is not assigned to any shard: the ranges must cover 0-{max}", max = SLOT_COUNT - 1)]
    Uncovered(u16),
    /// A shard with no primary.
    #[error("shard {0} has an empty primary DSN")]
    NoPrimary(String),
    /// The TOML does not parse.
    #[error("shard map file: {0}")]
    Toml(String),
}

/// The TOML form of a shard map.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ShardMapFile {
    #[serde(default = "first_epoch")]
    epoch: u64,
    shards: Vec<ShardFile>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ShardFile {
    id: String,
    primary: String,
    #[serde(default)]
    replicas: Vec<String>,
    /// Ranges such as `"0-511"`.
    slots: Vec<String>,
}

fn first_epoch() -> u64 {
    1
}

impl ShardMap {
    /// Builds a map from shards and the slot ranges each owns.
    pub fn new(
        epoch: Epoch,
        shards: Vec<(Shard, Vec<RangeInclusive<u16>>)>,
    ) -> Result<Self, ShardMapError> {
        if shards.is_empty() {
            return Err(ShardMapError::NoShards);
        }
        const UNOWNED: u16 = u16::MAX;
        let mut owner = vec![UNOWNED; usize::from(SLOT_COUNT)];
        let mut seen = std::collections::HashSet::new();
        for (index, (shard, ranges)) in shards.iter().enumerate() {
            if !seen.insert(shard.id.clone()) {
                return Err(ShardMapError::DuplicateShard(shard.id.0.clone()));
            }
            if shard.primary.trim().is_empty() {
                return Err(ShardMapError::NoPrimary(shard.id.0.clone()));
            }
            for range in ranges {
                if range.start() > range.end() || *range.end() >= SLOT_COUNT {
                    return Err(ShardMapError::BadRange(format!(
                        "{}-{}",
                        range.start(),
                        range.end()
                    )));
                }
                for slot in range.clone() {
                    let cell = &mut owner[usize::from(slot)];
                    if *cell != UNOWNED {
                        return Err(ShardMapError::Overlap {
                            slot,
                            first: shards[usize::from(*cell)].0.id.0.clone(),
                            second: shard.id.0.clone(),
                        });
                    }
                    *cell = index as u16;
                }
            }
        }
        if let Some(slot) = owner.iter().position(|&o| o == UNOWNED) {
            return Err(ShardMapError::Uncovered(slot as u16));
        }
        Ok(Self {
            epoch,
            shards: shards.into_iter().map(|(shard, _)| shard).collect(),
            owner,
        })
    }

    /// Splits the slots evenly, in contiguous ranges, over shards `shard-0`, `shard-1`, ...
    /// with the given primary DSNs, in order.
    pub fn evenly(primaries: &[String]) -> Result<Self, ShardMapError> {
        let n = primaries.len();
        if n == 0 {
            return Err(ShardMapError::NoShards);
        }
        let slots = usize::from(SLOT_COUNT);
        let shards = primaries
            .iter()
            .enumerate()
            .map(|(i, dsn)| {
                let start = (i * slots / n) as u16;
                let end = ((i + 1) * slots / n - 1) as u16;
                let shard = Shard {
                    id: ShardId::new(format!("shard-{i}"))?,
                    primary: dsn.clone(),
                    replicas: Vec::new(),
                };
                Ok((shard, vec![start..=end]))
            })
            .collect::<Result<Vec<_>, ShardMapError>>()?;
        Self::new(Epoch(1), shards)
    }

    /// Parses the TOML form:
    ///
    /// ```toml
    /// epoch = 1
    /// [[shards]]
    /// id = "shard-0"
    /// primary = "postgres://convoy@127.0.0.1:5432/convoy"
    /// slots = ["0-511"]
    /// ```
    pub fn from_toml(text: &str) -> Result<Self, ShardMapError> {
        let file: ShardMapFile =
            toml::from_str(text).map_err(|e| ShardMapError::Toml(e.to_string()))?;
        let shards = file
            .shards
            .into_iter()
            .map(|s| {
                let ranges = s
                    .slots
                    .iter()
                    .map(|r| parse_range(r))
                    .collect::<Result<Vec<_>, _>>()?;
                let shard = Shard {
                    id: ShardId::new(s.id)?,
                    primary: s.primary,
                    replicas: s.replicas,
                };
                Ok((shard, ranges))
            })
            .collect::<Result<Vec<_>, ShardMapError>>()?;
        Self::new(Epoch(file.epoch), shards)
    }

    /// The TOML form [`ShardMap::from_toml`] reads (each shard's slots as contiguous
    /// ranges). It carries the DSNs as given, credentials included: for configuration and
    /// the shard map's store, never for logs.
    pub fn to_toml(&self) -> String {
        let ranges = self.ranges();
        let file = ShardMapFile {
            epoch: self.epoch.0,
            shards: self
                .shards
                .iter()
                .enumerate()
                .map(|(index, shard)| ShardFile {
                    id: shard.id.0.clone(),
                    primary: shard.primary.clone(),
                    replicas: shard.replicas.clone(),
                    slots: ranges
                        .iter()
                        .filter(|(_, owner)| *owner == index)
                        .map(|(range, _)| format!("{}-{}", range.start(), range.end()))
                        .collect(),
                })
                .collect(),
        };
        toml::to_string(&file).expect("a shard map always has a TOML form")
    }

    /// The same placement at another epoch.
    pub fn with_epoch(mut self, epoch: Epoch) -> Self {
        self.epoch = epoch;
        self
    }

    /// The next epoch's map with `shard` added, owning no slots yet.
    pub fn with_shard(&self, shard: Shard) -> Result<Self, ShardMapError> {
        let mut shards = self.placement();
        shards.push((shard, Vec::new()));
        Self::new(Epoch(self.epoch.0 + 1), shards)
    }

    /// The next epoch's map with the slots of `range` owned by shard `to`.
    pub fn with_range_moved(
        &self,
        range: RangeInclusive<u16>,
        to: ShardIndex,
    ) -> Result<Self, ShardMapError> {
        if range.start() > range.end() || *range.end() >= SLOT_COUNT || to >= self.shards.len() {
            return Err(ShardMapError::BadRange(format!(
                "{}-{}",
                range.start(),
                range.end()
            )));
        }
        let mut next = self.clone();
        for slot in range {
            next.owner[usize::from(slot)] = to as u16;
        }
        next.epoch = Epoch(self.epoch.0 + 1);
        Ok(next)
    }

    /// This placement with the servers (primary and replicas) `other` gives each shard of
    /// the same id, at the next epoch: a configuration file's addresses, never its slots
    /// (only moves change placement).
    pub fn with_servers_of(&self, other: &ShardMap) -> Result<Self, ShardMapError> {
        let placement = self
            .placement()
            .into_iter()
            .map(|(mut shard, ranges)| {
                if let Some(o) = other.shards.iter().find(|o| o.id == shard.id) {
                    shard.primary = o.primary.clone();
                    shard.replicas = o.replicas.clone();
                }
                (shard, ranges)
            })
            .collect();
        Self::new(Epoch(self.epoch.0 + 1), placement)
    }

    /// The shards with the ranges each owns, as [`ShardMap::new`] takes them.
    fn placement(&self) -> Vec<(Shard, Vec<RangeInclusive<u16>>)> {
        let ranges = self.ranges();
        self.shards
            .iter()
            .enumerate()
            .map(|(index, shard)| {
                let owned = ranges
                    .iter()
                    .filter(|(_, owner)| *owner == index)
                    .map(|(range, _)| range.clone())
                    .collect();
                (shard.clone(), owned)
            })
            .collect()
    }

    /// The index of shard `id`.
    pub fn index_of(&self, id: &str) -> Option<ShardIndex> {
        self.shards.iter().position(|s| s.id.as_str() == id)
    }

    /// The one shard owning every slot of `range`, if a single shard does.
    pub fn sole_owner(&self, range: &RangeInclusive<u16>) -> Option<ShardIndex> {
        let first = usize::from(*self.owner.get(usize::from(*range.start()))?);
        range
            .clone()
            .all(|slot| {
                self.owner
                    .get(usize::from(slot))
                    .is_some_and(|&o| usize::from(o) == first)
            })
            .then_some(first)
    }

    /// The map's epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The shards, in configuration order.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// Index of the shard that owns `slot`.
    pub fn owner(&self, slot: Slot) -> ShardIndex {
        usize::from(self.owner[usize::from(slot.get())])
    }

    /// Index of the shard that holds `team`'s data.
    pub fn owner_of_team(&self, team: &str) -> ShardIndex {
        self.owner(Slot::for_team(team))
    }

    /// The contiguous slot ranges and their owners, in slot order.
    pub fn ranges(&self) -> Vec<(RangeInclusive<u16>, ShardIndex)> {
        let mut ranges: Vec<(RangeInclusive<u16>, ShardIndex)> = Vec::new();
        for (slot, &owner) in self.owner.iter().enumerate() {
            let slot = slot as u16;
            match ranges.last_mut() {
                Some((range, o)) if *o == usize::from(owner) => *range = *range.start()..=slot,
                _ => ranges.push((slot..=slot, usize::from(owner))),
            }
        }
        ranges
    }
}

fn parse_range(text: &str) -> Result<RangeInclusive<u16>, ShardMapError> {
    let bad = || ShardMapError::BadRange(text.to_owned());
    let (start, end) = match text.split_once('-') {
        Some((s, e)) => (s.trim(), e.trim()),
        None => (text.trim(), text.trim()),
    };
    let start: u16 = start.parse().map_err(|_| bad())?;
    let end: u16 = end.parse().map_err(|_| bad())?;
    if start > end || end >= SLOT_COUNT {
        return Err(bad());
    }
    Ok(start..=end)
}

/// Query parameters of a DSN whose values [`redact_dsn`] shows: libpq's and sqlx's that
/// name places, modes and timeouts. Every other parameter's value is `***`: `password`,
/// `sslpassword`, `passfile`, `sslkey`, `options` (it can carry settings) and any name not
/// listed here, so a secret parameter this list does not know is hidden too.
const SHOWN_DSN_PARAMETERS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "sslcert",
    "application_name",
    "connect_timeout",
    "target_session_attrs",
    "load_balance_hosts",
    "statement-cache-capacity",
];

/// A DSN safe for logs and error messages: the password in its userinfo and the value of
/// every query parameter not known to be harmless ([`SHOWN_DSN_PARAMETERS`]) become `***`,
/// and a fragment is dropped. A DSN whose parts cannot be told apart (an `@` after the
/// host, which a password holding `/`, `?` or `#` unencoded leaves) shows only its scheme.
pub fn redact_dsn(dsn: &str) -> String {
    // postgres://user:password@host:port/db?param=value
    let Some((scheme, rest)) = dsn.split_once("://") else {
        return "<unparsable dsn>".into();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    if tail.contains('@') {
        return format!("{scheme}://<redacted: unparsable dsn>");
    }
    let mut out = format!("{scheme}://");
    let host = match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            match userinfo.split_once(':') {
                Some((user, _)) => out.push_str(&format!("{user}:***@")),
                None => out.push_str(&format!("{userinfo}@")),
            }
            host
        }
        None => authority,
    };
    out.push_str(host);
    let tail = tail.split_once('#').map_or(tail, |(kept, _)| kept);
    let (path, query) = match tail.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (tail, None),
    };
    out.push_str(path);
    if let Some(query) = query {
        out.push('?');
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _))
                    if !SHOWN_DSN_PARAMETERS
                        .iter()
                        .any(|shown| shown.eq_ignore_ascii_case(name)) =>
                {
                    format!("{name}=***")
                }
                _ => pair.to_owned(),
            })
            .collect();
        out.push_str(&pairs.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dsns(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("postgres://localhost/s{i}"))
            .collect()
    }

    #[test]
    fn even_split_covers_every_slot_in_contiguous_ranges() {
        let map = ShardMap::evenly(&dsns(2)).unwrap();
        let ranges = map.ranges();
        assert_eq!(ranges, vec![(0..=511, 0), (512..=1023, 1)]);
        let map = ShardMap::evenly(&dsns(3)).unwrap();
        assert_eq!(map.ranges().len(), 3);
        assert_eq!(map.owner(Slot::new(1023).unwrap()), 2);
    }

    #[test]
    fn toml_maps_parse_and_gaps_or_overlaps_are_refused() {
        let ok = r#"
            epoch = 7
            [[shards]]
            id = "shard-a"
            primary = "postgres://a"
            slots = ["0-99", "200-1023"]
            [[shards]]
            id = "shard-b"
            primary = "postgres://b"
            replicas = ["postgres://b-replica"]
            slots = ["100-199"]
        "#;
        let map = ShardMap::from_toml(ok).unwrap();
        assert_eq!(map.epoch(), Epoch(7));
        assert_eq!(map.sole_owner(&(0..=99)), Some(0));
        assert_eq!(map.sole_owner(&(90..=110)), None);
        let moved = map.with_range_moved(50..=99, 1).unwrap();
        assert_eq!(moved.epoch(), Epoch(8));
        assert_eq!(moved.owner(Slot::new(50).unwrap()), 1);
        assert_eq!(moved.owner(Slot::new(49).unwrap()), 0);
        let grown = map
            .with_shard(Shard {
                id: ShardId::new("shard-c").unwrap(),
                primary: "postgres://c".into(),
                replicas: Vec::new(),
            })
            .unwrap();
        assert_eq!(grown.shards().len(), 3);
        assert_eq!(grown.ranges(), map.ranges());
        assert_eq!(ShardMap::from_toml(&grown.to_toml()).unwrap(), grown);
        assert_eq!(map.owner(Slot::new(150).unwrap()), 1);
        assert_eq!(map.owner(Slot::new(250).unwrap()), 0);

        assert_eq!(
            ShardMap::from_toml(&map.to_toml()).unwrap(),
            map,
            "round trip"
        );

        let gap = ok.replace("\"100-199\"", "\"100-198\"");
        assert_eq!(
            ShardMap::from_toml(&gap),
            Err(ShardMapError::Uncovered(199))
        );
        let overlap = ok.replace("\"100-199\"", "\"99-199\"");
        assert!(matches!(
            ShardMap::from_toml(&overlap),
            Err(ShardMapError::Overlap { slot: 99, .. })
        ));
        let out_of_range = ok.replace("\"200-1023\"", "\"200-1024\"");
        assert!(matches!(
            ShardMap::from_toml(&out_of_range),
            Err(ShardMapError::BadRange(_))
        ));
        let dup = ok.replace("shard-b", "shard-a");
        assert!(matches!(
            ShardMap::from_toml(&dup),
            Err(ShardMapError::DuplicateShard(_))
        ));
    }

    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(
            redact_dsn("postgres://convoy:s3cret@db:5432/convoy"),
            "postgres://convoy:***@db:5432/convoy"
        );
        assert_eq!(redact_dsn("postgres://db/convoy"), "postgres://db/convoy");
        assert_eq!(
            redact_dsn("postgres://convoy@db/convoy"),
            "postgres://convoy@db/convoy"
        );
        assert_eq!(redact_dsn("host=db password=x"), "<unparsable dsn>");
    }

    #[test]
    fn every_secret_a_dsn_can_carry_is_redacted_wherever_it_sits() {
        for (dsn, expected) in [
            // An `@` in the password: the userinfo ends at the authority's last one.
            (
                "postgres://convoy:s3c@ret@db/convoy",
                "postgres://convoy:***@db/convoy",
            ),
            (
                "postgres://convoy:s3%40cret@db/convoy",
                "postgres://convoy:***@db/convoy",
            ),
            // Query parameters, first or later, any case.
            (
                "postgres://db/convoy?password=s3cret",
                "postgres://db/convoy?password=***",
            ),
            (
                "postgres://db/convoy?sslmode=require&PassWord=s3cret&port=5432",
                "postgres://db/convoy?sslmode=require&PassWord=***&port=5432",
            ),
            (
                "postgres://u:s3cret@db/convoy?sslpassword=s3cret&passfile=/s3cret/pgpass",
                "postgres://u:***@db/convoy?sslpassword=***&passfile=***",
            ),
            (
                "postgres://db/convoy?sslkey=/keys/client.key&options=-c%20secret%3Ds3cret",
                "postgres://db/convoy?sslkey=***&options=***",
            ),
            // A parameter nobody listed is hidden too.
            (
                "postgres://db/convoy?auth_token=s3cret",
                "postgres://db/convoy?auth_token=***",
            ),
            // A fragment is dropped.
            ("postgres://db/convoy#s3cret", "postgres://db/convoy"),
            // Parts that cannot be told apart: a raw `/` or `?` in a password.
            (
                "postgres://convoy:s3/cret@db/convoy",
                "postgres://<redacted: unparsable dsn>",
            ),
            (
                "postgres://convoy:s3?cret@db/convoy",
                "postgres://<redacted: unparsable dsn>",
            ),
            (
                "postgres://db/convoy?password=s3@cret",
                "postgres://<redacted: unparsable dsn>",
            ),
            // Harmless parameters stay readable.
            (
                "postgres://db:5432/convoy?sslmode=verify-full&application_name=conversation",
                "postgres://db:5432/convoy?sslmode=verify-full&application_name=conversation",
            ),
        ] {
            let redacted = redact_dsn(dsn);
            assert_eq!(redacted, expected, "{dsn}");
            assert!(
                !redacted.contains("s3") && !redacted.contains("cret"),
                "no piece of the secret is left: {dsn} -> {redacted}"
            );
        }
    }

    #[test]
    fn a_shards_debug_form_hides_its_dsns() {
        let shard = Shard {
            id: ShardId::new("shard-a").unwrap(),
            primary: "postgres://convoy:s3cret@db/convoy".into(),
            replicas: vec!["postgres://db-r/convoy?password=s3cret".into()],
        };
        let debug = format!("{shard:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("postgres://convoy:***@db/convoy"), "{debug}");
    }
}
