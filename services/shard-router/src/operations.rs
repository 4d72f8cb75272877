//! Slot moves as long-running operations: their records in etcd, and the leader's driver
//! that runs them one at a time, resumably.
//!
//! Any router accepts MoveSlots (it stores a PENDING record, idempotently by request id);
//! only the elected leader drives. Each phase's progress is written to the record before
//! the next begins, so a new leader resumes where the last one stopped: copying restarts
//! from the last slot done (copies are upserts), catch-up from the last watermark, and an
//! interrupted cut-over is finished if the map already routes the range to the target, or
//! undone (source unfrozen) and retried otherwise. Cancel is honoured before the cut-over
//! only: after it the move is finished instead.
//!
//! A move holds the source's outbox rows past its watermark from the purge
//! ([`crate::mover`]): from its first step until the step that ends it (clean-up, cancel,
//! or failure) drops the hold. A hold whose driver died before dropping it is tied to the
//! operation's record: the leader sweeps every [`HOLD_SWEEP_INTERVAL`] between moves and
//! drops holds whose operation is over or gone. So a hold lasts as long as its move is
//! unfinished, plus at most one sweep once a leader is free; while no router leads, holds
//! stay (`convoy_outbox_hold_age_seconds`, exported by the conversation service, shows it).
//!
//! Not here: the SQL of each step ([`crate::mover`]).

use std::ops::RangeInclusive;
use std::time::{Duration, Instant, SystemTime};

use convoy_discovery::records::{Records, Stored};
use convoy_discovery::shard_map::ShardMapStore;
use convoy_proto::v1 as pb;
use convoy_store::ownership::{self, SlotState};
use convoy_store::{Epoch, LivePools, ShardMap};
use serde::{Deserialize, Serialize};

use crate::mover::{Columns, Mover};

/// The etcd record kind of operations.
pub const KIND: &str = "operations";
/// Slots copied per step (the record is saved, with progress, after each step).
const COPY_SLOTS_PER_STEP: u16 = 16;
/// How often the leader, between moves, drops outbox holds whose operation is over or
/// gone. 60 s: a leftover hold only keeps published outbox rows (disk), so a minute's delay
/// costs little, and the sweep reads every shard and an etcd record per hold.
pub const HOLD_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// A move's phase, as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Accepted, not started.
    Pending,
    /// Copying the range's rows.
    Copying,
    /// Replaying changes made meanwhile.
    CatchingUp,
    /// Frozen, applying the tail and handing over.
    CuttingOver,
    /// Deleting the moved rows from the source.
    CleaningUp,
    /// Finished.
    Done,
    /// Cancelled before cut-over; the target's copies are gone.
    Cancelled,
    /// Failed; see `error`.
    Failed,
}

impl Phase {
    /// Whether the operation is over.
    pub fn is_done(self) -> bool {
        matches!(self, Self::Done | Self::Cancelled | Self::Failed)
    }

    fn wire(self) -> pb::operation::Phase {
        use pb::operation::Phase as P;
        match self {
            Self::Pending => P::Pending,
            Self::Copying => P::Copying,
            Self::CatchingUp => P::CatchingUp,
            Self::CuttingOver => P::CuttingOver,
            Self::CleaningUp => P::CleaningUp,
            Self::Done => P::Done,
            Self::Cancelled => P::Cancelled,
            Self::Failed => P::Failed,
        }
    }
}

/// A slot move, as stored in etcd.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoveOp {
    /// Operation id (the request id).
    pub id: String,
    /// First slot.
    pub start: u16,
    /// Last slot, inclusive.
    pub end: u16,
    /// Target shard id.
    pub to_shard: String,
    /// Source shard id, set when the move starts.
    #[serde(default)]
    pub from_shard: String,
    /// Current phase.
    pub phase: Phase,
    /// Next slot to copy.
    #[serde(default)]
    pub next_slot: u16,
    /// Outbox id up to which the source's changes are applied on the target.
    #[serde(default)]
    pub watermark: i64,
    /// Catch-up passes done.
    #[serde(default)]
    pub passes: u32,
    /// The epoch the cut-over publishes.
    #[serde(default)]
    pub cutover_epoch: u64,
    /// Rows copied.
    #[serde(default)]
    pub rows_copied: i64,
    /// Rows to copy (counted at start).
    #[serde(default)]
    pub rows_total: i64,
    /// How long the range's writes were frozen, in microseconds.
    #[serde(default)]
    pub write_pause_us: Option<u64>,
    /// Set by CancelOperation.
    #[serde(default)]
    pub cancel_requested: bool,
    /// Why it failed.
    #[serde(default)]
    pub error: String,
    /// Creation time, Unix milliseconds.
    pub create_ms: u64,
    /// Last update, Unix milliseconds.
    pub update_ms: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

impl MoveOp {
    /// A new pending move.
    pub fn new(id: String, range: RangeInclusive<u16>, to_shard: String) -> Self {
        let now = now_ms();
        Self {
            id,
            start: *range.start(),
            end: *range.end(),
            to_shard,
            from_shard: String::new(),
            phase: Phase::Pending,
            next_slot: *range.start(),
            watermark: 0,
            passes: 0,
            cutover_epoch: 0,
            rows_copied: 0,
            rows_total: 0,
            write_pause_us: None,
            cancel_requested: false,
            error: String::new(),
            create_ms: now,
            update_ms: now,
        }
    }

    /// The range moved.
    pub fn range(&self) -> RangeInclusive<u16> {
        self.start..=self.end
    }

    /// The contract's form.
    pub fn wire(&self) -> pb::Operation {
        pb::Operation {
            name: format!("operations/{}", self.id),
            move_slots: Some(pb::MoveSlotsRequest {
                start: i32::from(self.start),
                end: i32::from(self.end),
                to_shard: self.to_shard.clone(),
                request_id: self.id.clone(),
            }),
            phase: self.phase.wire() as i32,
            rows_copied: self.rows_copied,
            rows_total: self.rows_total,
            write_pause: self.write_pause_us.map(|us| prost_types::Duration {
                seconds: (us / 1_000_000) as i64,
                nanos: ((us % 1_000_000) * 1000) as i32,
            }),
            done: self.phase.is_done(),
            error: self.error.clone(),
            create_time: Some(timestamp(self.create_ms)),
            update_time: Some(timestamp(self.update_ms)),
        }
    }
}

/// How the driver runs moves.
#[derive(Clone, Debug)]
pub struct MoveSettings {
    /// Catch-up passes stop (and the cut-over begins) once a pass re-syncs at most this
    /// many conversations: the last tail, applied while frozen, is then that small.
    pub tail_threshold: usize,
    /// At most this many catch-up passes before cutting over anyway.
    pub max_passes: u32,
    /// Longest wait for in-flight writers when freezing.
    pub freeze_lock_timeout: Duration,
    /// Wait between the cut-over and deleting the moved rows from the source, so readers
    /// still routing by the old map find the rows until they follow the new one.
    pub cleanup_grace: Duration,
    /// Pause after each step (fault injection for tests; zero otherwise).
    pub step_pause: Duration,
}

impl Default for MoveSettings {
    fn default() -> Self {
        Self {
            tail_threshold: 20,
            max_passes: 30,
            freeze_lock_timeout: Duration::from_secs(2),
            cleanup_grace: Duration::from_secs(2),
            step_pause: Duration::ZERO,
        }
    }
}

/// Why a step stopped.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// A database or etcd failure: the step is retried.
    #[error("{0}")]
    Transient(String),
    /// The move cannot be done as asked.
    #[error("{0}")]
    Invalid(String),
    /// The record changed under the driver (another router leads now): stop.
    #[error("the operation record changed under this driver")]
    Superseded,
}

impl From<sqlx::Error> for StepError {
    fn from(e: sqlx::Error) -> Self {
        Self::Transient(format!("database: {e}"))
    }
}

impl From<convoy_discovery::Error> for StepError {
    fn from(e: convoy_discovery::Error) -> Self {
        Self::Transient(format!("etcd: {e}"))
    }
}

/// Drives moves: the leader's work.
pub struct Driver {
    records: Records,
    maps: ShardMapStore,
    pools: LivePools,
    settings: MoveSettings,
    /// The moved tables' column lists, read from the catalog once.
    columns: tokio::sync::OnceCell<Columns>,
}

impl Driver {
    /// A driver recording operations in `records`, swapping the map in `maps`, moving rows
    /// between the shards of the map `pools` follows.
    pub fn new(
        records: Records,
        maps: ShardMapStore,
        pools: LivePools,
        settings: MoveSettings,
    ) -> Self {
        Self {
            records,
            maps,
            pools,
            settings,
            columns: tokio::sync::OnceCell::new(),
        }
    }

    /// Runs every unfinished move, oldest first, then waits for more; forever. Sweeps
    /// leftover outbox holds between moves.
    pub async fn run(&self) {
        let mut swept: Option<Instant> = None;
        loop {
            if swept.is_none_or(|at| at.elapsed() >= HOLD_SWEEP_INTERVAL) {
                self.sweep_holds().await;
                swept = Some(Instant::now());
            }
            match self.records.list::<MoveOp>(1000).await {
                Ok(ops) => {
                    for op in ops.into_iter().filter(|op| !op.value.phase.is_done()) {
                        self.drive(op).await;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "listing operations failed"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Drops, on every shard, the outbox holds whose operation is over or has no record
    /// (its driver died between ending it and dropping the hold). An unreadable shard or
    /// record is left for the next sweep.
    pub async fn sweep_holds(&self) {
        let pools = self.pools.borrow().clone();
        for index in 0..pools.map().shards().len() {
            let pool = pools.pool(index);
            let held = match crate::mover::holds(pool).await {
                Ok(held) => held,
                Err(e) => {
                    tracing::debug!(shard = index, error = %e, "reading outbox holds failed");
                    continue;
                }
            };
            for operation in held {
                let over = match self.records.get::<MoveOp>(&operation).await {
                    Ok(Some(op)) => op.value.phase.is_done(),
                    Ok(None) => true,
                    Err(_) => false,
                };
                if over {
                    match crate::mover::release_hold(pool, &operation).await {
                        Ok(()) => {
                            tracing::info!(shard = index, %operation, "dropped the outbox hold of a move that is over")
                        }
                        Err(e) => {
                            tracing::debug!(shard = index, error = %e, "dropping an outbox hold failed")
                        }
                    }
                }
            }
        }
    }

    /// Drops `op`'s outbox hold, best effort: the sweep drops what this misses.
    async fn release_hold(&self, op: &MoveOp) {
        if op.from_shard.is_empty() {
            return;
        }
        if let Ok(mover) = self.mover(op).await
            && let Err(e) = crate::mover::release_hold(&mover.source, &op.id).await
        {
            tracing::warn!(op = %op.id, error = %e, "dropping the outbox hold failed; the sweep will");
        }
    }

    /// Drives one move to its end, retrying transient failures.
    async fn drive(&self, mut op: Stored<MoveOp>) {
        loop {
            if op.value.phase.is_done() {
                return;
            }
            match self.step(&op.value).await {
                Ok(next) => match self.save(&op, next).await {
                    Ok(saved) => {
                        op = saved;
                        tokio::time::sleep(self.settings.step_pause).await;
                    }
                    Err(StepError::Superseded) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "saving operation progress failed; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                },
                Err(StepError::Invalid(why)) => {
                    self.release_hold(&op.value).await;
                    let mut failed = op.value.clone();
                    failed.phase = Phase::Failed;
                    failed.error = why;
                    match self.save(&op, failed).await {
                        Ok(saved) => op = saved,
                        Err(_) => return,
                    }
                }
                Err(StepError::Superseded) => return,
                Err(StepError::Transient(why)) => {
                    tracing::warn!(op = %op.value.id, phase = ?op.value.phase, %why, "move step failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    // Pick up a cancel (or another driver's progress).
                    match self.records.get::<MoveOp>(&op.value.id).await {
                        Ok(Some(fresh)) => op = fresh,
                        Ok(None) => return,
                        Err(_) => {}
                    }
                }
            }
        }
    }

    /// Stores `next` over `op`; Superseded if the record changed meanwhile, except by a
    /// cancel request, which is merged in.
    async fn save(
        &self,
        op: &Stored<MoveOp>,
        mut next: MoveOp,
    ) -> Result<Stored<MoveOp>, StepError> {
        next.update_ms = now_ms();
        if let Some(saved) = self.records.swap(&op.value.id, op.revision, &next).await? {
            return Ok(saved);
        }
        let fresh = self
            .records
            .get::<MoveOp>(&op.value.id)
            .await?
            .ok_or(StepError::Superseded)?;
        let only_cancelled = MoveOp {
            cancel_requested: op.value.cancel_requested,
            update_ms: op.value.update_ms,
            ..fresh.value.clone()
        } == op.value;
        if !only_cancelled {
            return Err(StepError::Superseded);
        }
        next.cancel_requested = true;
        self.records
            .swap(&op.value.id, fresh.revision, &next)
            .await?
            .ok_or(StepError::Superseded)
    }

    /// The mover of `op` over the map in force.
    async fn mover(&self, op: &MoveOp) -> Result<Mover, StepError> {
        let pools = self.pools.borrow().clone();
        let columns = self
            .columns
            .get_or_try_init(|| Columns::read(pools.pool(0)))
            .await?
            .clone();
        let map = pools.map();
        let index = |id: &str| {
            map.index_of(id)
                .ok_or_else(|| StepError::Invalid(format!("shard {id} is not in the map")))
        };
        Ok(Mover {
            source: pools.pool(index(&op.from_shard)?).clone(),
            target: pools.pool(index(&op.to_shard)?).clone(),
            range: op.range(),
            columns,
        })
    }

    /// Runs `op`'s current phase; returns the record to store after it.
    async fn step(&self, op: &MoveOp) -> Result<MoveOp, StepError> {
        let mut next = op.clone();
        let before_cutover = matches!(
            op.phase,
            Phase::Pending | Phase::Copying | Phase::CatchingUp
        );
        if op.cancel_requested && before_cutover {
            if op.phase != Phase::Pending {
                let mover = self.mover(op).await?;
                self.abort(&mover).await?;
                crate::mover::release_hold(&mover.source, &op.id).await?;
            }
            next.phase = Phase::Cancelled;
            return Ok(next);
        }
        match op.phase {
            Phase::Pending => {
                let map = self.current_map().await?;
                let range = op.range();
                let from = map.sole_owner(&range).ok_or_else(|| {
                    StepError::Invalid(format!(
                        "slots {}-{} are not owned by one shard: move each shard's part separately",
                        op.start, op.end
                    ))
                })?;
                let to = map.index_of(&op.to_shard).ok_or_else(|| {
                    StepError::Invalid(format!("shard {} is not in the map", op.to_shard))
                })?;
                if from == to {
                    return Err(StepError::Invalid(format!(
                        "slots {}-{} are on {} already",
                        op.start, op.end, op.to_shard
                    )));
                }
                next.from_shard = map.shards()[from].id.to_string();
                let mover = self.mover(&next).await?;
                mover.prepare(map.epoch()).await?;
                next.rows_total = mover.count().await?;
                // Changes from here on are replayed from the outbox past this watermark,
                // kept from the purge by the hold set before it.
                mover.hold(&op.id).await?;
                next.watermark = mover.safe_watermark().await?;
                next.next_slot = op.start;
                next.phase = Phase::Copying;
            }
            Phase::Copying => {
                let mover = self.mover(op).await?;
                let last = op
                    .next_slot
                    .saturating_add(COPY_SLOTS_PER_STEP - 1)
                    .min(op.end);
                next.rows_copied += mover.copy(op.next_slot..=last).await?;
                if last == op.end {
                    next.phase = Phase::CatchingUp;
                } else {
                    next.next_slot = last + 1;
                }
            }
            Phase::CatchingUp => {
                let mover = self.mover(op).await?;
                self.advance_hold(op, &mover).await?;
                let until = mover.safe_watermark().await?;
                let changed = mover.catch_up(op.watermark, Some(until)).await?;
                next.watermark = until;
                next.passes += 1;
                tracing::debug!(op = %op.id, pass = next.passes, changed, "catch-up pass");
                if changed <= self.settings.tail_threshold
                    || next.passes >= self.settings.max_passes
                {
                    next.cutover_epoch = self.current_map().await?.epoch().0 + 1;
                    next.phase = Phase::CuttingOver;
                }
            }
            Phase::CuttingOver => {
                let mover = self.mover(op).await?;
                next.write_pause_us = self
                    .cut_over(op, &mover)
                    .await?
                    .map(|pause| pause.as_micros() as u64);
                next.phase = Phase::CleaningUp;
            }
            Phase::CleaningUp => {
                tokio::time::sleep(self.settings.cleanup_grace).await;
                let mover = self.mover(op).await?;
                // Cut over: nothing is replayed from the outbox any more.
                crate::mover::release_hold(&mover.source, &op.id).await?;
                let deleted = mover.delete_range(&mover.source).await?;
                tracing::info!(op = %op.id, deleted, "moved rows deleted from the source");
                next.phase = Phase::Done;
            }
            Phase::Done | Phase::Cancelled | Phase::Failed => {}
        }
        Ok(next)
    }

    /// Moves `op`'s outbox hold to its recorded watermark; fails the move if the hold is
    /// gone, since rows past the watermark may have been purged unreplayed.
    async fn advance_hold(&self, op: &MoveOp, mover: &Mover) -> Result<(), StepError> {
        if mover.advance_hold(&op.id, op.watermark).await? {
            return Ok(());
        }
        Err(StepError::Invalid(format!(
            "the outbox hold of this move on {} is gone: changes since outbox id {} may have \
             been purged before they were replayed; move the slots again",
            op.from_shard, op.watermark
        )))
    }

    async fn current_map(&self) -> Result<ShardMap, StepError> {
        Ok(self
            .maps
            .load()
            .await?
            .ok_or_else(|| StepError::Invalid("etcd holds no shard map".into()))?
            .map)
    }

    /// Freezes the range on the source, applies the last tail, and hands the range to the
    /// target: target owned, map swapped, source gone. Returns how long writes were frozen.
    /// Resumed after an interruption, it finishes the hand-over if the map already routes
    /// the range to the target (the pause is then unknown: the interrupted driver measured
    /// it), and otherwise starts again from the freeze.
    async fn cut_over(&self, op: &MoveOp, mover: &Mover) -> Result<Option<Duration>, StepError> {
        let range = op.range();
        let epoch = Epoch(op.cutover_epoch);
        let stored = self
            .maps
            .load()
            .await?
            .ok_or_else(|| StepError::Invalid("etcd holds no shard map".into()))?;
        let to = stored
            .map
            .index_of(&op.to_shard)
            .ok_or_else(|| StepError::Invalid(format!("shard {} left the map", op.to_shard)))?;
        if stored.map.sole_owner(&range) == Some(to) {
            // Swapped before an interruption: finish the hand-over.
            self.hand_over(mover, epoch).await?;
            return Ok(None);
        }
        self.advance_hold(op, mover).await?;
        let frozen_at = Instant::now();
        ownership::freeze(
            &mover.source,
            &range,
            stored.map.epoch(),
            self.settings.freeze_lock_timeout,
        )
        .await?;
        let swapped = async {
            mover.catch_up(op.watermark, None).await?;
            ownership::set_state_on(
                &mover.target,
                &range,
                &[SlotState::Incoming],
                SlotState::Owned,
                epoch,
            )
            .await?;
            let next = stored
                .map
                .with_range_moved(range.clone(), to)
                .map_err(|e| StepError::Invalid(e.to_string()))?
                .with_epoch(epoch);
            self.maps
                .compare_and_swap(&stored, &next)
                .await
                .map_err(|e| StepError::Transient(format!("swapping the map: {e}")))?;
            Ok::<_, StepError>(())
        }
        .await;
        if let Err(e) = swapped {
            // Undo only when the map surely does not route the range to the target (a swap
            // whose answer was lost may have happened): otherwise stay frozen, and the
            // retried step finds out.
            let now = self.maps.load().await?.map(|s| s.map);
            match now {
                Some(map) if map.sole_owner(&range) == map.index_of(&op.to_shard) => {}
                Some(_) => {
                    self.unfreeze(mover, stored.map.epoch()).await?;
                    return Err(e);
                }
                None => return Err(e),
            }
        }
        ownership::set_state_on(
            &mover.source,
            &range,
            &[SlotState::Frozen],
            SlotState::Gone,
            epoch,
        )
        .await?;
        let pause = frozen_at.elapsed();
        metrics::histogram!("convoy_shard_router_write_pause_seconds").record(pause.as_secs_f64());
        tracing::info!(op = %op.id, pause_us = pause.as_micros() as u64, epoch = epoch.0, "cut over");
        Ok(Some(pause))
    }

    /// The hand-over's ownership changes, idempotently.
    async fn hand_over(&self, mover: &Mover, epoch: Epoch) -> Result<(), StepError> {
        ownership::set_state_on(
            &mover.target,
            &mover.range,
            &[SlotState::Incoming],
            SlotState::Owned,
            epoch,
        )
        .await?;
        ownership::set_state_on(
            &mover.source,
            &mover.range,
            &[SlotState::Frozen, SlotState::Owned],
            SlotState::Gone,
            epoch,
        )
        .await?;
        Ok(())
    }

    /// Undoes a freeze that did not hand over: the source owns the range again, the
    /// target's copy is incoming again.
    async fn unfreeze(&self, mover: &Mover, epoch: Epoch) -> Result<(), StepError> {
        ownership::set_state_on(
            &mover.target,
            &mover.range,
            &[SlotState::Owned],
            SlotState::Incoming,
            epoch,
        )
        .await?;
        ownership::set_state_on(
            &mover.source,
            &mover.range,
            &[SlotState::Frozen],
            SlotState::Owned,
            epoch,
        )
        .await?;
        Ok(())
    }

    /// Abandons a move before its cut-over: the source keeps the range, the target's
    /// copies and its incoming marks are removed.
    async fn abort(&self, mover: &Mover) -> Result<(), StepError> {
        let epoch = self.current_map().await?.epoch();
        self.unfreeze(mover, epoch).await?;
        mover.delete_range(&mover.target).await?;
        ownership::set_state_on(
            &mover.target,
            &mover.range,
            &[SlotState::Incoming],
            SlotState::Gone,
            epoch,
        )
        .await?;
        Ok(())
    }
}
