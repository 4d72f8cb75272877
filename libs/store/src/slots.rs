//! Teams to slots: the one placement function of the fleet.
//!
//! A team's slot is the partition PostgreSQL itself would choose for the team id in a table
//! `PARTITION BY HASH (team_id)` with modulus [`SLOT_COUNT`]: `hashtextextended(team,
//! HASH_PARTITION_SEED)` combined as in `compute_partition_hash_value`, then reduced modulo
//! the slot count. Using Postgres' own function (as pgcat and PgDog do) means a row's
//! placement can be checked inside Postgres: `convoy_slot(team_id)` in the schema computes the
//! same number, and native hash partitions by slot agree with it. Slots are never derived
//! from the number of shards (`hash % shards` would move almost every team when a shard is
//! added); the shard map assigns slot ranges to shards instead.
//!
//! Not here: which shard owns a slot (see [`crate::shard_map`]).

use std::fmt;

/// Number of slots. A power of two, so that the reduction is a mask that SQL can compute
/// without 64-bit unsigned arithmetic, and so that slot ranges split evenly.
pub const SLOT_COUNT: u16 = 1024;

/// `HASH_PARTITION_SEED` from PostgreSQL's `partbounds.c`.
const HASH_PARTITION_SEED: u64 = 0x7A5B_2236_7996_DCFD;
/// The additive constant of PostgreSQL's `hash_combine64`.
const HASH_COMBINE64_CONSTANT: u64 = 0x49a0_f4dd_15e5_a8e3;

/// One of [`SLOT_COUNT`] slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slot(u16);

impl Slot {
    /// The slot with this number, if it is below [`SLOT_COUNT`].
    pub fn new(n: u16) -> Option<Self> {
        (n < SLOT_COUNT).then_some(Self(n))
    }

    /// The slot's number.
    pub fn get(self) -> u16 {
        self.0
    }

    /// The slot a team lives in: the hash partition Postgres would pick for `team` among
    /// [`SLOT_COUNT`] partitions.
    pub fn for_team(team: &str) -> Self {
        let hash = hash_bytes_extended(team.as_bytes(), HASH_PARTITION_SEED);
        // hash_combine64(0, hash), then `% modulus` on the unsigned value.
        let row_hash = hash.wrapping_add(HASH_COMBINE64_CONSTANT);
        Self((row_hash % u64::from(SLOT_COUNT)) as u16)
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// PostgreSQL's `hash_bytes_extended` (Bob Jenkins' lookup3, as in `src/common/hashfn.c`),
/// for little-endian byte order, which is what `hashtextextended` computes on x86-64 and
/// aarch64 servers.
fn hash_bytes_extended(key: &[u8], seed: u64) -> u64 {
    let init = 0x9e37_79b9_u32
        .wrapping_add(key.len() as u32)
        .wrapping_add(3_923_095);
    let (mut a, mut b, mut c) = (init, init, init);

    if seed != 0 {
        a = a.wrapping_add((seed >> 32) as u32);
        b = b.wrapping_add(seed as u32);
        mix(&mut a, &mut b, &mut c);
    }

    let mut chunks = key.chunks_exact(12);
    for chunk in &mut chunks {
        a = a.wrapping_add(le_u32(&chunk[0..4]));
        b = b.wrapping_add(le_u32(&chunk[4..8]));
        c = c.wrapping_add(le_u32(&chunk[8..12]));
        mix(&mut a, &mut b, &mut c);
    }

    // The last 0..=11 bytes: `a` and `b` take whole little-endian words, `c` takes bytes
    // 8..11 shifted up by one byte (its lowest byte is reserved for the length).
    let tail = chunks.remainder();
    let mut padded = [0u8; 12];
    padded[..tail.len()].copy_from_slice(tail);
    a = a.wrapping_add(le_u32(&padded[0..4]));
    b = b.wrapping_add(le_u32(&padded[4..8]));
    c = c.wrapping_add(le_u32(&padded[8..12]) << 8);

    final_mix(&mut a, &mut b, &mut c);
    (u64::from(b) << 32) | u64::from(c)
}

fn le_u32(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes.try_into().expect("four bytes"))
}

fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

fn final_mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(24));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_in_range_and_stable() {
        for team in ["a", "acme", "team-with-a-rather-long-name-0123456789", ""] {
            let slot = Slot::for_team(team);
            assert!(slot.get() < SLOT_COUNT);
            assert_eq!(slot, Slot::for_team(team));
        }
    }

    #[test]
    fn slot_numbers_outside_the_range_are_refused() {
        assert!(Slot::new(SLOT_COUNT).is_none());
        assert_eq!(
            Slot::new(SLOT_COUNT - 1).map(Slot::get),
            Some(SLOT_COUNT - 1)
        );
    }

    #[test]
    fn teams_spread_over_the_slots() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..20_000 {
            seen.insert(Slot::for_team(&format!("team-{i}")));
        }
        // 20k teams into 1024 slots: every slot is hit with overwhelming probability.
        assert_eq!(seen.len(), usize::from(SLOT_COUNT));
    }
}
