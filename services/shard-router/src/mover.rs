//! The data steps of a slot move between two shards' primaries: copy, catch up, cut over,
//! clean up, abort. Each step is idempotent, so a move interrupted anywhere (the router
//! restarted, a shard briefly down) is resumed by running its current step again.
//!
//! - **Copy** upserts every conversation of the range (with its events and idempotency
//!   records) onto the target, slot by slot in keyset batches, as JSON rows so any column
//!   the schema has is carried (the column lists are read from the catalog).
//! - **Catch-up** replays the source's outbox: every committed change of a conversation left
//!   an outbox row, so the conversations changed since the last pass are re-read from the
//!   source and re-synced (newer version wins; events past the target's last sequence are
//!   added; a conversation gone from the source is deleted). A pass covers outbox ids up to
//!   a *safe watermark*: the largest id visible in a snapshot, taken only once every
//!   transaction in progress at that snapshot has ended, so no smaller id can still commit.
//! - **Cut-over** freezes the range on the source (waiting out in-flight writers, see
//!   `convoy_store::ownership::freeze`), applies the last tail, and hands ownership over.
//! - **Clean-up** deletes the moved rows from the source; **abort** deletes the copies from
//!   the target.
//! - **Outbox hold**: the catch-up needs every outbox row past the move's watermark, and
//!   the conversation service purges published rows after an hour. Before its first
//!   watermark a move sets a hold on the source (`outbox_holds`: rows past `after_id` are
//!   never purged), advances it to each watermark the operation records, and drops it
//!   when the operation ends; a catch-up whose hold is gone fails the move rather than
//!   miss a change. The hold is set only by the first step, so one found at a later step
//!   has stood since the watermark.
//!
//! Not here: the operation's record and ordering (see [`crate::operations`]).

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::time::Duration;

use convoy_store::Epoch;
use convoy_store::ownership::{self, SlotState};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// Conversations per copy batch.
const COPY_BATCH: i64 = 500;
/// Events per copy batch.
const EVENT_BATCH: i64 = 2000;
/// Rows per clean-up delete.
const DELETE_BATCH: i64 = 1000;
/// Longest wait for the transactions in progress at a watermark's snapshot to end.
const WATERMARK_WAIT: Duration = Duration::from_secs(30);

/// The insertable (non-generated) columns of the moved tables, read from the catalog.
#[derive(Clone, Debug)]
pub struct Columns {
    conversations: String,
    events: String,
    requests: String,
    /// `(a, b) = ROW(EXCLUDED.a, EXCLUDED.b)` for the conversations upsert.
    conversations_update: String,
}

async fn columns_of(pool: &PgPool, table: &str) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT quote_ident(column_name::text) FROM information_schema.columns \
         WHERE table_schema = current_schema() AND table_name = $1 AND is_generated = 'NEVER' \
         ORDER BY ordinal_position",
    )
    .bind(table)
    .fetch_all(pool)
    .await
}

impl Columns {
    /// Reads the column lists from `pool`'s catalog.
    pub async fn read(pool: &PgPool) -> Result<Self, sqlx::Error> {
        let conversations = columns_of(pool, "conversations").await?;
        let update = format!(
            "({}) = ROW({})",
            conversations.join(", "),
            conversations
                .iter()
                .map(|c| format!("EXCLUDED.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(Self {
            conversations: conversations.join(", "),
            events: columns_of(pool, "conversation_events").await?.join(", "),
            requests: columns_of(pool, "create_requests").await?.join(", "),
            conversations_update: update,
        })
    }
}

/// One side of a move.
#[derive(Clone, Debug)]
pub struct Mover {
    /// The source shard's primary.
    pub source: PgPool,
    /// The target shard's primary.
    pub target: PgPool,
    /// The range moved.
    pub range: RangeInclusive<u16>,
    /// Column lists.
    pub columns: Columns,
}

fn bounds(range: &RangeInclusive<u16>) -> (i16, i16) {
    (*range.start() as i16, *range.end() as i16)
}

/// A conversation's key.
type Key = (String, Uuid);

impl Mover {
    /// Conversations in the range on the source (for progress).
    pub async fn count(&self) -> Result<i64, sqlx::Error> {
        let (start, end) = bounds(&self.range);
        sqlx::query_scalar("SELECT count(*) FROM conversations WHERE slot BETWEEN $1 AND $2")
            .bind(start)
            .bind(end)
            .fetch_one(&self.source)
            .await
    }

    /// Marks the range incoming on the target (only the mover writes there).
    pub async fn prepare(&self, epoch: Epoch) -> Result<(), sqlx::Error> {
        // A slot the target owns already cannot be moved onto it; others become incoming.
        ownership::set_state_on(
            &self.target,
            &self.range,
            &[SlotState::Gone, SlotState::Incoming],
            SlotState::Incoming,
            epoch,
        )
        .await?;
        Ok(())
    }

    /// Sets `operation`'s outbox hold on the source at the outbox's largest id now, which is
    /// at most the watermark taken after it; a hold set already stays as it is (a first
    /// step run again, or by a deposed driver).
    pub async fn hold(&self, operation: &str) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO outbox_holds (operation_id, after_id) \
             SELECT $1, coalesce(max(id), 0) FROM outbox \
             ON CONFLICT (operation_id) DO NOTHING",
        )
        .bind(operation)
        .execute(&self.source)
        .await?;
        Ok(())
    }

    /// Moves `operation`'s hold to `after`, a watermark the operation has recorded (rows up
    /// to it are never replayed again); false when the hold is gone, and with it, perhaps,
    /// rows the catch-up needs.
    pub async fn advance_hold(&self, operation: &str, after: i64) -> Result<bool, sqlx::Error> {
        let moved = sqlx::query(
            "UPDATE outbox_holds SET after_id = $2, updated_at = now() WHERE operation_id = $1",
        )
        .bind(operation)
        .bind(after)
        .execute(&self.source)
        .await?
        .rows_affected();
        Ok(moved == 1)
    }

    /// A safe watermark of the source's outbox (see the module docs).
    pub async fn safe_watermark(&self) -> Result<i64, sqlx::Error> {
        let (xmax, max_id): (i64, i64) = sqlx::query_as(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint, \
                    coalesce((SELECT max(id) FROM outbox), 0)",
        )
        .fetch_one(&self.source)
        .await?;
        let deadline = tokio::time::Instant::now() + WATERMARK_WAIT;
        loop {
            let xmin: i64 =
                sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
                    .fetch_one(&self.source)
                    .await?;
            if xmin >= xmax {
                return Ok(max_id);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(sqlx::Error::Protocol(format!(
                    "transactions older than xid {xmax} still run on the source after {WATERMARK_WAIT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Copies the conversations of `slots` (with their events and idempotency records)
    /// onto the target; returns how many conversations.
    pub async fn copy(&self, slots: RangeInclusive<u16>) -> Result<i64, sqlx::Error> {
        let mut copied = 0;
        for slot in slots {
            let mut after: Key = (String::new(), Uuid::nil());
            loop {
                let rows: Vec<Value> = sqlx::query_scalar(
                    "SELECT to_jsonb(c) FROM conversations c WHERE slot = $1 \
                     AND (team_id, id) > ($2, $3) ORDER BY team_id, id LIMIT $4",
                )
                .bind(slot as i16)
                .bind(&after.0)
                .bind(after.1)
                .bind(COPY_BATCH)
                .fetch_all(&self.source)
                .await?;
                let Some(last) = rows.last() else { break };
                after = key_of(last, "id")?;
                let keys = rows
                    .iter()
                    .map(|r| key_of(r, "id"))
                    .collect::<Result<Vec<_>, _>>()?;
                copied += rows.len() as i64;
                let full = rows.len() as i64 == COPY_BATCH;
                let mut tx = ownership::mover_transaction(&self.target).await?;
                self.upsert_conversations(&mut tx, rows).await?;
                self.copy_events(&mut tx, &keys, &HashMap::new()).await?;
                self.copy_requests(&mut tx, &keys).await?;
                tx.commit().await?;
                if !full {
                    break;
                }
            }
        }
        Ok(copied)
    }

    async fn upsert_conversations(
        &self,
        conn: &mut PgConnection,
        rows: Vec<Value>,
    ) -> Result<(), sqlx::Error> {
        let c = &self.columns;
        let rows = Value::Array(rows);
        // A conversation deleted and created again under its id starts over: drop the
        // target's old incarnation (and its events) first.
        sqlx::query(
            "DELETE FROM conversations t USING jsonb_populate_recordset(NULL::conversations, $1) s \
             WHERE t.team_id = s.team_id AND t.id = s.id AND t.created_at <> s.created_at",
        )
        .bind(&rows)
        .execute(&mut *conn)
        .await?;
        let newer = format!(
            "ON CONFLICT (team_id, id) DO UPDATE SET {} \
             WHERE conversations.version < EXCLUDED.version",
            c.conversations_update
        );
        insert_json(conn, "conversations", &c.conversations, rows, &newer).await
    }

    /// Copies the events of `keys` past the sequence `after` gives each (0 when absent).
    async fn copy_events(
        &self,
        conn: &mut PgConnection,
        keys: &[Key],
        after: &HashMap<Key, i64>,
    ) -> Result<(), sqlx::Error> {
        let (teams, ids) = unzip(keys);
        let from: Vec<i64> = keys
            .iter()
            .map(|k| after.get(k).copied().unwrap_or(0))
            .collect();
        let mut position: (String, Uuid, i64) = (String::new(), Uuid::nil(), 0);
        loop {
            let rows: Vec<Value> = sqlx::query_scalar(
                "SELECT to_jsonb(e) FROM conversation_events e \
                 JOIN unnest($1::text[], $2::uuid[], $3::bigint[]) AS w(team, id, after) \
                   ON e.team_id = w.team AND e.conversation_id = w.id AND e.sequence > w.after \
                 WHERE (e.team_id, e.conversation_id, e.sequence) > ($4, $5, $6) \
                 ORDER BY e.team_id, e.conversation_id, e.sequence LIMIT $7",
            )
            .bind(&teams)
            .bind(&ids)
            .bind(&from)
            .bind(&position.0)
            .bind(position.1)
            .bind(position.2)
            .bind(EVENT_BATCH)
            .fetch_all(&self.source)
            .await?;
            let Some(last) = rows.last() else { break };
            let (team, id) = key_of(last, "conversation_id")?;
            let sequence = last.get("sequence").and_then(Value::as_i64).unwrap_or(0);
            position = (team, id, sequence);
            let full = rows.len() as i64 == EVENT_BATCH;
            let rows = Value::Array(rows);
            insert_json(
                conn,
                "conversation_events",
                &self.columns.events,
                rows,
                KEEP,
            )
            .await?;
            if !full {
                break;
            }
        }
        Ok(())
    }

    /// Copies the idempotency records that name `keys`' conversations.
    async fn copy_requests(
        &self,
        conn: &mut PgConnection,
        keys: &[Key],
    ) -> Result<(), sqlx::Error> {
        let (teams, ids) = unzip(keys);
        let rows: Vec<Value> = sqlx::query_scalar(
            "SELECT to_jsonb(r) FROM create_requests r \
             JOIN unnest($1::text[], $2::uuid[]) AS w(team, id) \
               ON r.team_id = w.team AND r.conversation_id = w.id",
        )
        .bind(&teams)
        .bind(&ids)
        .fetch_all(&self.source)
        .await?;
        if rows.is_empty() {
            return Ok(());
        }
        let rows = Value::Array(rows);
        insert_json(conn, "create_requests", &self.columns.requests, rows, KEEP).await
    }

    /// Re-syncs every conversation of the range changed by outbox rows past `after` (up to
    /// `until` when given); returns how many conversations.
    pub async fn catch_up(&self, after: i64, until: Option<i64>) -> Result<usize, sqlx::Error> {
        let (start, end) = bounds(&self.range);
        let changed: Vec<Key> = sqlx::query_as(
            "SELECT DISTINCT team_id, conversation_id FROM outbox \
             WHERE id > $1 AND ($2::bigint IS NULL OR id <= $2) \
               AND convoy_slot(team_id) BETWEEN $3 AND $4",
        )
        .bind(after)
        .bind(until)
        .bind(start)
        .bind(end)
        .fetch_all(&self.source)
        .await?;
        for keys in changed.chunks(COPY_BATCH as usize) {
            self.resync(keys).await?;
        }
        Ok(changed.len())
    }

    /// Makes the target's copy of `keys` what the source holds now.
    async fn resync(&self, keys: &[Key]) -> Result<(), sqlx::Error> {
        let (teams, ids) = unzip(keys);
        let rows: Vec<Value> = sqlx::query_scalar(
            "SELECT to_jsonb(c) FROM conversations c \
             JOIN unnest($1::text[], $2::uuid[]) AS w(team, id) ON c.team_id = w.team AND c.id = w.id",
        )
        .bind(&teams)
        .bind(&ids)
        .fetch_all(&self.source)
        .await?;
        let present = rows
            .iter()
            .map(|r| key_of(r, "id"))
            .collect::<Result<Vec<_>, _>>()?;
        let mut tx = ownership::mover_transaction(&self.target).await?;
        // Gone from the source: gone from the target (its events cascade).
        let gone: Vec<Key> = keys
            .iter()
            .filter(|k| !present.contains(k))
            .cloned()
            .collect();
        if !gone.is_empty() {
            let (teams, ids) = unzip(&gone);
            sqlx::query(
                "DELETE FROM conversations c USING unnest($1::text[], $2::uuid[]) AS w(team, id) \
                 WHERE c.team_id = w.team AND c.id = w.id",
            )
            .bind(teams)
            .bind(ids)
            .execute(&mut *tx)
            .await?;
        }
        if !rows.is_empty() {
            self.upsert_conversations(&mut tx, rows).await?;
            let (teams, ids) = unzip(&present);
            let last: Vec<(String, Uuid, i64)> = sqlx::query_as(
                "SELECT team_id, conversation_id, max(sequence) FROM conversation_events \
                 WHERE (team_id, conversation_id) IN \
                   (SELECT * FROM unnest($1::text[], $2::uuid[])) \
                 GROUP BY team_id, conversation_id",
            )
            .bind(teams)
            .bind(ids)
            .fetch_all(&mut *tx)
            .await?;
            let after = last
                .into_iter()
                .map(|(team, id, seq)| ((team, id), seq))
                .collect();
            self.copy_events(&mut tx, &present, &after).await?;
            self.copy_requests(&mut tx, &present).await?;
        }
        tx.commit().await
    }

    /// Deletes the range's rows from `pool` in batches (the source after a cut-over, the
    /// target after an abort); returns how many conversations.
    pub async fn delete_range(&self, pool: &PgPool) -> Result<u64, sqlx::Error> {
        let (start, end) = bounds(&self.range);
        let mut deleted = 0;
        for statement in [
            "DELETE FROM conversations WHERE ctid = ANY(ARRAY(SELECT ctid FROM conversations \
             WHERE slot BETWEEN $1 AND $2 LIMIT $3))",
            "DELETE FROM create_requests WHERE ctid = ANY(ARRAY(SELECT ctid FROM create_requests \
             WHERE convoy_slot(team_id) BETWEEN $1 AND $2 LIMIT $3))",
        ] {
            loop {
                let mut tx = ownership::mover_transaction(pool).await?;
                let n = sqlx::query(statement)
                    .bind(start)
                    .bind(end)
                    .bind(DELETE_BATCH)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                tx.commit().await?;
                if statement.contains("conversations") {
                    deleted += n;
                }
                if n == 0 {
                    break;
                }
            }
        }
        Ok(deleted)
    }
}

/// The operations holding outbox rows on `pool` (see [`Mover::hold`]).
pub async fn holds(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT operation_id FROM outbox_holds ORDER BY created_at")
        .fetch_all(pool)
        .await
}

/// Drops `operation`'s outbox hold on `pool`, if any.
pub async fn release_hold(pool: &PgPool, operation: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM outbox_holds WHERE operation_id = $1")
        .bind(operation)
        .execute(pool)
        .await?;
    Ok(())
}

/// Rows stored already are kept as they are.
const KEEP: &str = "ON CONFLICT DO NOTHING";

/// Inserts JSON `rows` (an array of objects, as `to_jsonb` made them) into `table`, whose
/// insertable columns are `cols`, resolving conflicts by `on_conflict`.
async fn insert_json(
    conn: &mut PgConnection,
    table: &str,
    cols: &str,
    rows: Value,
    on_conflict: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "INSERT INTO {table} ({cols}) \
         SELECT {cols} FROM jsonb_populate_recordset(NULL::{table}, $1) {on_conflict}"
    ))
    .bind(rows)
    .execute(conn)
    .await?;
    Ok(())
}

/// The team ids and conversation ids of `keys`, as two arrays for `unnest`.
fn unzip(keys: &[Key]) -> (Vec<&str>, Vec<Uuid>) {
    keys.iter().map(|(team, id)| (team.as_str(), *id)).unzip()
}

/// The `(team_id, <id field>)` of a JSON row.
fn key_of(row: &Value, id_field: &str) -> Result<Key, sqlx::Error> {
    let team = row.get("team_id").and_then(Value::as_str);
    let id = row
        .get(id_field)
        .and_then(Value::as_str)
        .and_then(|s| Uuid::parse_str(s).ok());
    match (team, id) {
        (Some(team), Some(id)) => Ok((team.to_owned(), id)),
        _ => Err(sqlx::Error::Protocol(format!(
            "a copied row lacks team_id or {id_field}"
        ))),
    }
}
