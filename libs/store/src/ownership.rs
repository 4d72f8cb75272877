//! Write fencing: each shard's own record of the slots it owns (`slot_ownership`, see the
//! migration `20261123000001_slot_ownership.sql`).
//!
//! Every write to a conversation or its events passes a trigger that checks, inside the
//! write's transaction, that this shard owns the team's slot and that the slot is not
//! frozen. A service that routed by a stale map gets [`Fence::Moved`] (route by a map at
//! least that new) or [`Fence::Frozen`] (a move is cutting over: wait for the next map), so
//! a slot that moved can never take a write on its old shard. Ownership rows change only
//! when a shard is first seeded and in a move's steps (the shard-router's mover), which
//! run as `convoy.mover` sessions that the fence lets through.
//!
//! Not here: the map itself ([`crate::shard_map`]) or the move's data copy (the router).

use std::ops::RangeInclusive;
use std::time::Duration;

use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use crate::shard_map::{Epoch, ShardIndex, ShardMap};

/// Why the fence refused a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fence {
    /// The slot is not (or no longer, or not yet) this shard's: route by a map of at least
    /// this epoch (0 when the shard never owned it).
    Moved {
        /// The epoch at which the slot left (or has not yet reached) this shard.
        epoch: Epoch,
    },
    /// The slot is frozen while a move cuts over; the next map routes it elsewhere.
    Frozen {
        /// The epoch the slot had when it froze.
        epoch: Epoch,
    },
}

/// The advisory-lock class of the fence's per-slot locks ('CONV').
const LOCK_CLASS: i32 = 0x434F_4E56;

impl Fence {
    /// The fence's refusal in a database error, if that is what it is.
    pub fn from_error(error: &sqlx::Error) -> Option<Self> {
        let db = error.as_database_error()?;
        let epoch = || {
            db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .and_then(|pg| pg.detail())
                .and_then(|d| d.parse().ok())
                .map_or(Epoch(0), Epoch)
        };
        match db.code().as_deref() {
            Some("CV001") => Some(Self::Moved { epoch: epoch() }),
            Some("CV002") => Some(Self::Frozen { epoch: epoch() }),
            _ => None,
        }
    }

    /// The smallest map epoch that can route this write correctly.
    pub fn needs_epoch(self) -> Epoch {
        match self {
            Self::Moved { epoch } => epoch,
            // Frozen at epoch e: the cut-over publishes a newer map.
            Self::Frozen { epoch } => Epoch(epoch.0 + 1),
        }
    }
}

/// A slot's state on one shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    /// Writes allowed.
    Owned,
    /// Writes refused while a move cuts over.
    Frozen,
    /// A move is copying rows here; only the mover writes.
    Incoming,
    /// Moved away.
    Gone,
}

impl SlotState {
    /// Whether the shard holds the slot's current rows (owned, or frozen while a move cuts
    /// over): reads there are right.
    pub fn takes_reads(self) -> bool {
        matches!(self, Self::Owned | Self::Frozen)
    }

    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Owned => "owned",
            Self::Frozen => "frozen",
            Self::Incoming => "incoming",
            Self::Gone => "gone",
        }
    }
}

fn bounds(range: &RangeInclusive<u16>) -> (i16, i16) {
    (*range.start() as i16, *range.end() as i16)
}

/// Seeds shard `index`'s ownership from `map` if the shard has no ownership rows yet (a
/// fresh shard, or one from before fencing); a shard with rows keeps them, since only
/// moves change ownership. Concurrent seeders are serialized by a table lock.
pub async fn seed(pool: &PgPool, map: &ShardMap, index: ShardIndex) -> Result<u64, sqlx::Error> {
    let slots = owned_slots(map, index);
    let mut tx = pool.begin().await?;
    sqlx::query("LOCK TABLE slot_ownership IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    let seeded = sqlx::query(
        "INSERT INTO slot_ownership (slot, epoch, state) \
         SELECT s, $2, 'owned' FROM unnest($1::smallint[]) AS s \
         WHERE NOT EXISTS (SELECT 1 FROM slot_ownership)",
    )
    .bind(&slots)
    .bind(map.epoch().0 as i64)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(seeded)
}

fn owned_slots(map: &ShardMap, index: ShardIndex) -> Vec<i16> {
    map.ranges()
        .into_iter()
        .filter(|(_, owner)| *owner == index)
        .flat_map(|(range, _)| range.map(|s| s as i16))
        .collect()
}

/// A transaction whose writes pass the fence: the mover's.
pub async fn mover_transaction(
    pool: &PgPool,
) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL convoy.mover = 'on'")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// Sets the state of every slot in `range` to `state` at `epoch`, creating rows as needed;
/// only slots now in one of `from` (every slot when `from` is empty) change. Returns how
/// many changed.
pub async fn set_state(
    conn: &mut PgConnection,
    range: &RangeInclusive<u16>,
    from: &[SlotState],
    state: SlotState,
    epoch: Epoch,
) -> Result<u64, sqlx::Error> {
    let (start, end) = bounds(range);
    let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
    Ok(sqlx::query(
        "INSERT INTO slot_ownership (slot, epoch, state) \
         SELECT s, $3, $4 FROM generate_series($1::int, $2::int) AS s \
         ON CONFLICT (slot) DO UPDATE SET epoch = EXCLUDED.epoch, state = EXCLUDED.state \
         WHERE cardinality($5::text[]) = 0 OR slot_ownership.state = ANY($5)",
    )
    .bind(start)
    .bind(end)
    .bind(epoch.0 as i64)
    .bind(state.as_str())
    .bind(&from)
    .execute(conn)
    .await?
    .rows_affected())
}

/// [`set_state`] in a transaction of its own on `pool`.
pub async fn set_state_on(
    pool: &PgPool,
    range: &RangeInclusive<u16>,
    from: &[SlotState],
    state: SlotState,
    epoch: Epoch,
) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let changed = set_state(&mut tx, range, from, state, epoch).await?;
    tx.commit().await?;
    Ok(changed)
}

/// Freezes the owned slots of `range`: takes the fence's locks exclusively, which waits
/// out every in-flight writer of the range (at most `lock_timeout`), then marks the slots
/// frozen. When this returns, no write to the range is in flight and none can start.
pub async fn freeze(
    pool: &PgPool,
    range: &RangeInclusive<u16>,
    epoch: Epoch,
    lock_timeout: Duration,
) -> Result<u64, sqlx::Error> {
    let (start, end) = bounds(range);
    let mut tx = pool.begin().await?;
    sqlx::query(&format!(
        "SET LOCAL lock_timeout = '{}ms'",
        lock_timeout.as_millis()
    ))
    .execute(&mut *tx)
    .await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1, s) FROM generate_series($2::int, $3::int) AS s")
        .bind(LOCK_CLASS)
        .bind(start)
        .bind(end)
        .execute(&mut *tx)
        .await?;
    let frozen = set_state(
        &mut tx,
        range,
        &[SlotState::Owned],
        SlotState::Frozen,
        epoch,
    )
    .await?;
    tx.commit().await?;
    Ok(frozen)
}

/// The states of `range`'s slots on a shard, in slot order (slots without a row absent).
pub async fn states(
    pool: &PgPool,
    range: &RangeInclusive<u16>,
) -> Result<Vec<(u16, SlotState, Epoch)>, sqlx::Error> {
    let (start, end) = bounds(range);
    let rows: Vec<(i16, String, i64)> = sqlx::query_as(
        "SELECT slot, state, epoch FROM slot_ownership WHERE slot BETWEEN $1 AND $2 ORDER BY slot",
    )
    .bind(start)
    .bind(end)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(slot, state, epoch)| {
            let state = match state.as_str() {
                "owned" => SlotState::Owned,
                "frozen" => SlotState::Frozen,
                "incoming" => SlotState::Incoming,
                "gone" => SlotState::Gone,
                _ => return None,
            };
            Some((slot as u16, state, Epoch(epoch as u64)))
        })
        .collect())
}
