//! The conversation queries, routed to the shard that owns the team.
//!
//! Each operation is one round of SQL against one shard, bounded in time so that a shard
//! that stops answering cannot hold a request forever, and built so that a write is either
//! wholly committed or not at all. Queries are written out here, next to the indexes they
//! rely on (see `libs/store/migrations`); the query-shape functions are public so the
//! EXPLAIN tests run exactly the SQL that the service runs.
//!
//! Pages and batches are bounded in bytes as well as rows ([`MAX_RESPONSE_BYTES`]): the
//! store converts each row with the caller's wire conversion, measures the message with
//! prost's `encoded_len`, and stops before the item that would pass the bound, reading rows
//! as a stream so that it never holds more than the bound and one row. Postgres itself
//! stops sending rows once an estimate of their sizes passes twice the bound
//! ([`SQL_BYTE_BUDGET`]), so a page of large rows costs the shard no more than that either.
//!
//! Not here: validation ([`crate::validate`]) or the wire format ([`crate::wire`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use convoy_proto::consistency::ConsistencyToken;
use std::sync::Arc;

use convoy_store::ownership::{self, Fence};
use convoy_store::spans::db_span;
use convoy_store::{DbFailure, Epoch, LivePools, Node, ShardPools, Slot};
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::{Connection, FromRow, PgPool, Postgres, QueryBuilder, Row};
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;
use uuid::Uuid;

use crate::error::ApiError;
use crate::limits::{MAX_CONVERSATION_BYTES, MAX_METADATA_ENTRIES, MAX_RESPONSE_BYTES};
use crate::model::*;
use crate::names::{ConversationName, TeamId};

/// The columns a create writes, in the order of its `$1`-`$8`.
const INSERT_COLUMNS: &str =
    "team_id, id, title, intent, status, content, metadata, effectiveness_score";

/// Columns of a conversation row, in [`ConversationRow`]'s order.
pub const COLUMNS: &str = "team_id, id, title, intent, status, content, metadata, \
    effectiveness_score, message_count, event_count, duration_seconds, input_tokens, \
    output_tokens, cache_creation_input_tokens, cache_read_input_tokens, first_event_at, \
    last_event_at, version, created_at, updated_at";

/// Columns of an event row, in [`EventRow`]'s order.
pub const EVENT_COLUMNS: &str = "sequence, event_id, parent_event_id, kind, role, occurred_at, \
    content, tool_name, tool_call_id, is_error, model, input_tokens, output_tokens, \
    cache_creation_input_tokens, cache_read_input_tokens, is_sidechain, raw_json";

/// One conversation by primary key.
pub const GET_SQL: &str = "SELECT team_id, id, title, intent, status, content, metadata, \
    effectiveness_score, message_count, event_count, duration_seconds, input_tokens, \
    output_tokens, cache_creation_input_tokens, cache_read_input_tokens, first_event_at, \
    last_event_at, version, created_at, updated_at \
    FROM conversations WHERE team_id = $1 AND id = $2";

/// Estimated encoded size of a conversation row: its text as stored, its metadata's jsonb
/// size, and 256 bytes for the rest. Reads no TOASTed value (`octet_length` of text and
/// `pg_column_size` take the stored length).
const CONVERSATION_ESTIMATE: &str = "(octet_length(title) + octet_length(content) \
    + pg_column_size(metadata) + 256)::bigint";

/// Estimated encoded size of an event row, as [`CONVERSATION_ESTIMATE`].
const EVENT_ESTIMATE: &str = "(octet_length(content) + coalesce(pg_column_size(raw_json), 0) \
    + 1024)::bigint";

/// Estimated bytes after which Postgres sends no more rows of a page or batch: twice
/// [`MAX_RESPONSE_BYTES`], because the estimate may be off by a few percent (or more for
/// compressed JSON) and the exact cut is made on the encoded messages.
pub const SQL_BYTE_BUDGET: i64 = 2 * MAX_RESPONSE_BYTES as i64;

/// Several conversations of one team by primary key (`$1` the team, `$2` the ids), no more
/// than [`SQL_BYTE_BUDGET`] (`$3`) of them by estimate; `found` counts every match.
pub static BATCH_GET_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {COLUMNS}, found FROM (SELECT *, count(*) OVER () AS found, \
           sum(est) OVER (ORDER BY id ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) - est \
             AS before \
         FROM (SELECT {COLUMNS}, {CONVERSATION_ESTIMATE} AS est FROM conversations \
           WHERE team_id = $1 AND id = ANY($2)) matched) sized \
         WHERE before < $3"
    )
});

/// A page of a conversation's events (`$1`, `$2` the conversation, after sequence `$3`, at
/// most `$4` rows, no more than `$5` bytes by estimate: see [`sized`]).
pub static LIST_EVENTS_SQL: LazyLock<String> = LazyLock::new(|| {
    let mut qb = QueryBuilder::<Postgres>::new("");
    sized(
        &mut qb,
        EVENT_COLUMNS,
        "sequence",
        |qb| {
            qb.push(format!(
                "SELECT {EVENT_COLUMNS}, {EVENT_ESTIMATE} AS est FROM conversation_events \
                 WHERE team_id = $1 AND conversation_id = $2 AND sequence > $3 \
                 ORDER BY sequence LIMIT $4"
            ));
        },
        |qb| {
            qb.push("$5");
        },
    );
    qb.into_sql()
});

/// Wraps a page's query, which `inner` pushes (it selects `columns` and `est`, the row's
/// estimated encoded size, in `order`, with its LIMIT), so that Postgres sends only the rows
/// that start within a byte budget (`budget` pushes it), and says of each row whether
/// another follows it (`more_after`): the caller knows the page was cut even when Postgres
/// cut it. The inner query keeps its plan (an index scan under a limit).
fn sized<'a>(
    qb: &mut QueryBuilder<'a, Postgres>,
    columns: &str,
    order: &str,
    inner: impl FnOnce(&mut QueryBuilder<'a, Postgres>),
    budget: impl FnOnce(&mut QueryBuilder<'a, Postgres>),
) {
    qb.push(format!(
        "SELECT {columns}, more_after FROM (SELECT *, \
           lead(true, 1, false) OVER w AS more_after, sum(est) OVER w - est AS before FROM ("
    ));
    inner(qb);
    qb.push(format!(
        ") page WINDOW w AS (ORDER BY {order} ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT \
         ROW)) sized WHERE before < "
    ));
    budget(qb);
    qb.push(format!(" ORDER BY {order}"));
}

#[derive(sqlx::FromRow)]
struct ConversationRow {
    team_id: String,
    id: Uuid,
    title: String,
    intent: String,
    status: String,
    content: String,
    metadata: Json<BTreeMap<String, String>>,
    effectiveness_score: Option<f64>,
    message_count: i64,
    event_count: i64,
    duration_seconds: f64,
    input_tokens: i64,
    output_tokens: i64,
    cache_creation_input_tokens: i64,
    cache_read_input_tokens: i64,
    first_event_at: Option<DateTime<Utc>>,
    last_event_at: Option<DateTime<Utc>>,
    version: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl ConversationRow {
    fn into_model(self) -> Result<Conversation, ApiError> {
        let corrupt = |what: &str, value: &str| {
            ApiError::Internal(format!("stored {what} {value:?} of {} is unknown", self.id))
        };
        let team = TeamId::parse(&self.team_id).map_err(|_| corrupt("team", &self.team_id))?;
        Ok(Conversation {
            fields: ConversationFields {
                intent: Intent::from_db(&self.intent)
                    .ok_or_else(|| corrupt("intent", &self.intent))?,
                status: Status::from_db(&self.status)
                    .ok_or_else(|| corrupt("status", &self.status))?,
                title: self.title,
                content: self.content,
                metadata: self.metadata.0,
                effectiveness_score: self.effectiveness_score,
            },
            name: ConversationName { team, id: self.id },
            message_count: self.message_count,
            event_count: self.event_count,
            duration_seconds: self.duration_seconds,
            usage: TokenUsage {
                input: self.input_tokens,
                output: self.output_tokens,
                cache_creation: self.cache_creation_input_tokens,
                cache_read: self.cache_read_input_tokens,
            },
            created_at: self.created_at,
            updated_at: self.updated_at,
            first_event_at: self.first_event_at,
            last_event_at: self.last_event_at,
            version: Version(self.version),
        })
    }
}

#[derive(sqlx::FromRow)]
struct EventRow {
    sequence: i64,
    event_id: Option<String>,
    parent_event_id: Option<String>,
    kind: String,
    role: Option<String>,
    occurred_at: DateTime<Utc>,
    content: String,
    tool_name: Option<String>,
    tool_call_id: Option<String>,
    is_error: bool,
    model: Option<String>,
    input_tokens: i64,
    output_tokens: i64,
    cache_creation_input_tokens: i64,
    cache_read_input_tokens: i64,
    is_sidechain: bool,
    raw_json: Option<serde_json::Value>,
}

impl EventRow {
    fn into_model(self) -> Result<Event, ApiError> {
        let kind = EventKind::from_db(&self.kind).ok_or_else(|| {
            ApiError::Internal(format!("stored event kind {:?} is unknown", self.kind))
        })?;
        let role = match &self.role {
            None => None,
            Some(r) => Some(
                Role::from_db(r)
                    .ok_or_else(|| ApiError::Internal(format!("stored role {r:?} is unknown")))?,
            ),
        };
        Ok(Event {
            sequence: self.sequence,
            event: NewEvent {
                event_id: self.event_id,
                parent_event_id: self.parent_event_id,
                kind,
                role,
                occurred_at: self.occurred_at,
                content: self.content,
                tool_name: self.tool_name,
                tool_call_id: self.tool_call_id,
                is_error: self.is_error,
                model: self.model,
                usage: TokenUsage {
                    input: self.input_tokens,
                    output: self.output_tokens,
                    cache_creation: self.cache_creation_input_tokens,
                    cache_read: self.cache_read_input_tokens,
                },
                is_sidechain: self.is_sidechain,
                raw_json: self.raw_json,
            },
        })
    }
}

/// Pushes the List/Search filters. Enum values are pushed as literals (they are our own
/// closed set, never client text), so Postgres can match the partial index on
/// `status = 'active'` in every plan, generic ones included.
fn push_filters(qb: &mut QueryBuilder<'_, Postgres>, filters: &Filters) {
    if let Some(status) = filters.status {
        qb.push(" AND status = '").push(status.as_str()).push("'");
    }
    if let Some(intent) = filters.intent {
        qb.push(" AND intent = '").push(intent.as_str()).push("'");
    }
    if let Some(from) = filters.created_from {
        qb.push(" AND created_at >= ").push_bind(from);
    }
    if let Some(until) = filters.created_until {
        qb.push(" AND created_at < ").push_bind(until);
    }
}

/// Ends a page's inner query: its order, and one row more than the page (which tells that
/// another page follows).
fn order_and_limit(qb: &mut QueryBuilder<'_, Postgres>, order: &str, page_size: usize) {
    qb.push(" ORDER BY ")
        .push(order)
        .push(" LIMIT ")
        .push_bind(page_size as i64 + 1);
}

/// Binds [`SQL_BYTE_BUDGET`] as a client page's budget in [`sized`].
fn sql_byte_budget(qb: &mut QueryBuilder<'_, Postgres>) {
    qb.push_bind(SQL_BYTE_BUDGET);
}

/// The List query, newest first with keyset pagination, bounded in bytes by estimate
/// ([`sized`]); `prefix` is `""` or an EXPLAIN.
pub fn list_query(prefix: &str, q: &ListQuery) -> QueryBuilder<'static, Postgres> {
    let mut qb = QueryBuilder::new(prefix);
    let order = "created_at DESC, id DESC";
    sized(
        &mut qb,
        COLUMNS,
        order,
        |qb| {
            qb.push("SELECT ")
                .push(COLUMNS)
                .push(", ")
                .push(CONVERSATION_ESTIMATE)
                .push(" AS est FROM conversations WHERE team_id = ")
                .push_bind(q.team.as_str().to_owned());
            push_filters(qb, &q.filters);
            if let Some(cursor) = q.cursor {
                let created = DateTime::<Utc>::from_timestamp_micros(cursor.created_at_micros)
                    .unwrap_or(DateTime::<Utc>::MIN_UTC);
                qb.push(" AND (created_at, id) < (")
                    .push_bind(created)
                    .push(", ")
                    .push_bind(cursor.id)
                    .push(")");
            }
            order_and_limit(qb, order, q.page_size);
        },
        sql_byte_budget,
    );
    qb
}

/// The Search query, best rank first with keyset pagination on (rank, id), bounded in bytes
/// by estimate ([`sized`]). The tsquery is written inline (not joined from a function in
/// FROM) so the planner sees a constant and can use the (team_id, search_vector) GIN index
/// for both conditions.
pub fn search_query(prefix: &str, q: &SearchQuery) -> QueryBuilder<'static, Postgres> {
    let tsquery = |qb: &mut QueryBuilder<'static, Postgres>| {
        qb.push("websearch_to_tsquery('english', ")
            .push_bind(q.query.clone())
            .push(")");
    };
    let mut qb = QueryBuilder::new(prefix);
    let order = "rank DESC, id DESC";
    sized(
        &mut qb,
        &format!("{COLUMNS}, rank"),
        order,
        |qb| {
            qb.push("SELECT ")
                .push(COLUMNS)
                .push(", ")
                .push(CONVERSATION_ESTIMATE)
                .push(" AS est, ts_rank(search_vector, ");
            tsquery(qb);
            qb.push(") AS rank FROM conversations WHERE team_id = ")
                .push_bind(q.team.as_str().to_owned())
                .push(" AND search_vector @@ ");
            tsquery(qb);
            push_filters(qb, &q.filters);
            if let Some(cursor) = q.cursor {
                qb.push(" AND (ts_rank(search_vector, ");
                tsquery(qb);
                qb.push("), id) < (")
                    .push_bind(cursor.rank)
                    .push("::real, ")
                    .push_bind(cursor.id)
                    .push(")");
            }
            order_and_limit(qb, order, q.page_size);
        },
        sql_byte_budget,
    );
    qb
}

/// A page of results and whether more follow.
pub struct Page<T, K = ()> {
    /// The rows.
    pub items: Vec<T>,
    /// True when another page exists.
    pub more: bool,
    /// The position of the last item when another page exists: the next page starts after
    /// it.
    pub next: Option<K>,
}

/// A row of a [`sized`] page: the row, and whether another follows it.
struct Sized<R> {
    row: R,
    more_after: bool,
}

impl<'r, R: sqlx::FromRow<'r, PgRow>> sqlx::FromRow<'r, PgRow> for Sized<R> {
    fn from_row(row: &'r PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            row: R::from_row(row)?,
            more_after: row.try_get("more_after")?,
        })
    }
}

/// The encoded size of `item` as one element of a response's repeated field: its tag, its
/// length and itself.
fn framed_len(item: &impl prost::Message) -> usize {
    let len = item.encoded_len();
    1 + prost::length_delimiter_len(len) + len
}

/// Reads a page from `rows` (a [`sized`] query's, in page order): each row becomes a model
/// (`model`), its position (`position`) and its wire form (`wire`), kept while the page has
/// fewer than `page_size` items and their encoded sizes stay within [`MAX_RESPONSE_BYTES`].
/// The first item always fits ([`crate::limits`] holds every stored item within the bound).
/// Rows are read as they arrive, so no more than the bound and one row are held.
async fn collect_page<R, M, W, K>(
    mut rows: impl futures::Stream<Item = Result<Sized<R>, sqlx::Error>> + Unpin,
    page_size: usize,
    model: impl Fn(R) -> Result<M, ApiError>,
    position: impl Fn(&M) -> K,
    wire: impl Fn(M) -> W,
) -> Result<Page<W, K>, OpError>
where
    W: prost::Message,
{
    use futures::TryStreamExt as _;
    let mut items = Vec::new();
    let mut bytes = 0;
    let mut last = None;
    let mut more = false;
    while let Some(Sized { row, more_after }) = rows.try_next().await? {
        if items.len() == page_size {
            more = true;
            break;
        }
        let value = model(row)?;
        let at = position(&value);
        let item = wire(value);
        let size = framed_len(&item);
        if !items.is_empty() && bytes + size > MAX_RESPONSE_BYTES {
            more = true;
            break;
        }
        bytes += size;
        items.push(item);
        last = Some(at);
        // Postgres may have cut the page by its estimate: the last row it sent knows.
        more = more_after;
    }
    Ok(Page {
        items,
        more,
        next: if more { last } else { None },
    })
}

/// A created conversation, or the one a replayed request created earlier.
pub struct Created {
    /// The conversation.
    pub conversation: Conversation,
    /// False when a retried request_id returned an earlier result.
    pub fresh: bool,
}

/// A write's outcome and the WAL position for its consistency token.
pub struct Written<T> {
    /// What the write returned.
    pub value: T,
    /// At or after the write's commit on its shard's primary (see [`token_lsn`]).
    pub lsn: u64,
}

/// The outcome of an append.
pub struct Appended {
    /// The conversation after the append.
    pub conversation: Conversation,
    /// The events stored, in request order.
    pub events: Vec<Event>,
    /// Events skipped because their event_id was already stored.
    pub duplicates: usize,
}

/// The conversation store over every shard of the map in force.
#[derive(Clone, Debug)]
pub struct ConversationStore {
    pools: LivePools,
    /// Tasks that keep `pools` current (map following, node checks), ended with the store.
    background: Arc<Vec<AbortOnDropHandle<()>>>,
    /// Longest time one operation may take on a shard.
    op_timeout: Duration,
}

/// Where a read may be served from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ReadAt {
    /// Any node of the shard: an eligible replica (within the lag bound), else the primary.
    #[default]
    Any,
    /// A node of shard `shard` that has replayed WAL position `lsn` (a consistency token's);
    /// on other shards, any node.
    After {
        /// The shard the token's write committed on.
        shard: String,
        /// The primary's WAL position after that commit.
        lsn: u64,
    },
    /// The primary only.
    Primary,
}

impl ReadAt {
    /// What a read presenting `token` may use.
    pub fn from_token(token: Option<&ConsistencyToken>) -> Self {
        match token {
            Some(t) => Self::After {
                shard: t.shard.clone(),
                lsn: t.lsn,
            },
            None => Self::Any,
        }
    }
}

/// The share of the operation timeout a replica gets before the read moves to the primary.
const REPLICA_SHARE: u32 = 4;
/// How long a write's answer waits for the primary's WAL position for its token.
const COMMIT_LSN_TIMEOUT: Duration = Duration::from_millis(200);
/// How long a fenced operation waits for a newer map before it tries again anyway (a move
/// cancelled while frozen unfreezes without a new map).
const FENCE_PAUSE: Duration = Duration::from_millis(50);

impl ConversationStore {
    /// A store over the pools of the map in force, bounding each operation by `op_timeout`.
    pub fn new(pools: LivePools, op_timeout: Duration) -> Self {
        Self {
            pools,
            background: Arc::default(),
            op_timeout,
        }
    }

    /// The store, owning `tasks` that keep its pools current: they end when the store (and
    /// every clone of it) is dropped.
    pub fn with_background(mut self, tasks: Vec<AbortOnDropHandle<()>>) -> Self {
        self.background = Arc::new(tasks);
        self
    }

    /// The pools of the map in force.
    pub fn pools(&self) -> Arc<ShardPools> {
        self.pools.borrow().clone()
    }

    /// After the fence refused an operation routed by `used`: the pools of a map that can
    /// route it (at least the epoch the fence named), waiting at most [`FENCE_PAUSE`] for
    /// one; the newest map either way.
    async fn after_fence(&self, used: &ShardPools, fence: Fence) -> Arc<ShardPools> {
        let needs = fence.needs_epoch().max(Epoch(used.map().epoch().0 + 1));
        let mut pools = self.pools.clone();
        let _ =
            tokio::time::timeout(FENCE_PAUSE, pools.wait_for(|p| p.map().epoch() >= needs)).await;
        metrics::counter!("convoy_conversation_fenced_total", "why" => match fence {
            Fence::Moved { .. } => "moved",
            Fence::Frozen { .. } => "frozen",
        })
        .increment(1);
        self.pools()
    }

    /// The id of the shard that holds `team` in the map in force.
    pub fn shard(&self, team: &TeamId) -> String {
        let pools = self.pools();
        let (index, _) = pools.for_team(team.as_str());
        pools.map().shards()[index].id.to_string()
    }

    /// Runs read `op` on a node of `team`'s shard allowed by `at`: an eligible replica when
    /// there is one, else the primary. A replica gets a quarter of the operation timeout;
    /// when it fails, times out or says NOT_FOUND (it may be behind a create), the read runs
    /// again on the primary, so a replica never fails a client read. One that cannot be
    /// reached, or times out, is reported (banned).
    async fn on_shard_read<T, F, Fut>(
        &self,
        team: &TeamId,
        at: &ReadAt,
        op: F,
    ) -> Result<T, ApiError>
    where
        F: Fn(PgPool) -> Fut,
        Fut: Future<Output = Result<T, OpError>>,
    {
        let on_primary = |pool: PgPool, _replicas: bool| op(pool);
        let pools = self.pools();
        let (index, _) = pools.for_team(team.as_str());
        let shard = pools.map().shards()[index].id.as_str();
        let min_lsn = match at {
            ReadAt::Primary => return self.on_shard(team, on_primary).await,
            ReadAt::Any => 0,
            ReadAt::After { shard: on, lsn } if on == shard && *lsn > 0 => *lsn,
            // A token from another shard (or from before this shard had replicas) says
            // nothing of what this shard's replicas have replayed: only the primary is sure
            // to hold every write the token's session made here.
            ReadAt::After { .. } => return self.on_shard(team, on_primary).await,
        };
        let (node, pool, in_flight) = pools.read_target(index, min_lsn);
        let Node::Replica(n) = node else {
            drop(in_flight);
            metrics::counter!("convoy_conversation_shard_reads_total", "node" => "primary")
                .increment(1);
            return self.on_shard(team, on_primary).await;
        };
        metrics::counter!("convoy_conversation_shard_reads_total", "node" => "replica")
            .increment(1);
        let attempt = op(pool.clone()).instrument(db_span(shard, node));
        let result = tokio::time::timeout(self.op_timeout / REPLICA_SHARE, attempt).await;
        drop(in_flight);
        let why = match result {
            Ok(Ok(value)) => return Ok(value),
            // A replica may not have replayed the row yet: only the primary says it is gone.
            Ok(Err(OpError::Api(ApiError::NotFound(_)))) => "not found",
            Ok(Err(OpError::Api(e))) => return Err(e),
            // Down, cancelled for a recovery conflict, blocked behind replay: the primary
            // answers instead; only a replica that cannot be reached is banned.
            Ok(Err(OpError::Db(e))) => {
                if DbFailure::classify(&e) == DbFailure::Unavailable {
                    pools.replicas(index).report_failure(n);
                }
                tracing::debug!(shard, replica = n, error = %e, "replica read failed; reading the primary");
                "failed"
            }
            Err(_) => {
                pools.replicas(index).report_failure(n);
                "timed out"
            }
        };
        metrics::counter!("convoy_conversation_replica_fallbacks_total", "why" => why).increment(1);
        self.on_shard(team, on_primary).await
    }

    /// Runs `op` on the primary of `team`'s shard, within the operation timeout, mapping
    /// database errors. When the write fence refuses it (the slot moved, or is frozen for a
    /// move), the operation runs again on the shard a newer map names, as long as time
    /// remains: a refused write committed nothing, and the client never sees the move.
    /// A NOT_FOUND from a shard that no longer owns the slot is a refusal too.
    /// `op` is told whether the shard has replicas (a write's token then needs its WAL
    /// position).
    async fn on_shard<T, F, Fut>(&self, team: &TeamId, op: F) -> Result<T, ApiError>
    where
        F: Fn(PgPool, bool) -> Fut,
        Fut: Future<Output = Result<T, OpError>>,
    {
        let deadline = tokio::time::Instant::now() + self.op_timeout;
        let mut pools = self.pools();
        loop {
            let (index, pool) = pools.for_team(team.as_str());
            let shard = pools.map().shards()[index].id.as_str();
            let replicas = !pools.replicas(index).is_empty();
            let attempt = op(pool.clone(), replicas).instrument(db_span(shard, Node::Primary));
            let fence = match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(OpError::Api(ApiError::NotFound(what)))) => {
                    match moved_away(pool, team).await {
                        Some(fence) => fence,
                        None => return Err(ApiError::NotFound(what)),
                    }
                }
                Ok(Err(OpError::Api(e))) => return Err(e),
                Ok(Err(OpError::Db(e))) => match DbFailure::classify(&e) {
                    DbFailure::Fenced(fence) => fence,
                    _ => return Err(ApiError::from_db(shard, e)),
                },
                Err(_) => {
                    return Err(ApiError::DeadlineExceeded(format!(
                        "shard {shard} did not answer within {:?}",
                        self.op_timeout
                    )));
                }
            };
            if tokio::time::Instant::now() + FENCE_PAUSE >= deadline {
                return Err(ApiError::Unavailable {
                    shard: shard.to_owned(),
                    detail: format!(
                        "team {team}'s slot is moving ({fence:?}) and no map routes it yet; retry"
                    ),
                });
            }
            pools = self.after_fence(&pools, fence).await;
        }
    }

    /// Creates a conversation, idempotently by request id. Without a request id this is
    /// one autocommit statement; with one, the claim of the request id and the insert
    /// commit together.
    pub async fn create(&self, new: NewConversation) -> Result<Written<Created>, ApiError> {
        let team = new.name.team.clone();
        let new = &new;
        self.on_shard(&team, |pool: PgPool, replicas| async move {
            let pool = &pool;
            let mut conn = pool.acquire().await?;
            let Some((request_id, fingerprint)) = new.request else {
                let row = insert_conversation(&mut *conn, new).await?;
                let value = Created {
                    conversation: row.into_model()?,
                    fresh: true,
                };
                let lsn = token_lsn(&mut conn, replicas).await;
                return Ok(Written { value, lsn });
            };
            // One statement, so one (autocommit) transaction and one round trip: the claim
            // of the request id, the conversation and its outbox row commit together. A
            // taken conversation id fails the whole statement, so no claim outlives it.
            let row: Option<ConversationRow> = bind_new(sqlx::query_as(&CLAIMED_INSERT), new)
                .bind(request_id)
                .bind(&fingerprint[..])
                .fetch_optional(&mut *conn)
                .await
                .map_err(|e| claimed_insert_error(e, new))?;
            let value = match row {
                Some(row) => Created {
                    conversation: row.into_model()?,
                    fresh: true,
                },
                None => replay(&mut conn, &new.name.team, request_id, &fingerprint).await?,
            };
            let lsn = token_lsn(&mut conn, replicas).await;
            Ok(Written { value, lsn })
        })
        .await
    }

    /// Gets one conversation.
    pub async fn get(
        &self,
        name: &ConversationName,
        at: &ReadAt,
    ) -> Result<Conversation, ApiError> {
        self.on_shard_read(&name.team, at, |pool: PgPool| async move {
            let pool = &pool;
            let row: Option<ConversationRow> = sqlx::query_as(GET_SQL)
                .bind(name.team.as_str())
                .bind(name.id)
                .fetch_optional(pool)
                .await?;
            match row {
                Some(row) => Ok(row.into_model()?),
                None => Err(OpError::Api(ApiError::NotFound(name.to_string()))),
            }
        })
        .await
    }

    /// Gets every named conversation of one team, each converted by `wire`, in the order of
    /// `names` (a name given twice is answered twice); NOT_FOUND names the first missing
    /// one. All or nothing: when the answer would take more than [`MAX_RESPONSE_BYTES`]
    /// encoded, the call is refused ([`ApiError::TooLarge`]), having read no more than that
    /// and one row.
    pub async fn batch_get<W>(
        &self,
        team: &TeamId,
        names: &[ConversationName],
        at: &ReadAt,
        wire: impl Fn(Conversation) -> W + Sync,
    ) -> Result<Vec<W>, ApiError>
    where
        W: prost::Message + Clone,
    {
        let mut wanted: HashMap<Uuid, usize> = HashMap::with_capacity(names.len());
        for name in names {
            *wanted.entry(name.id).or_default() += 1;
        }
        let ids: Vec<Uuid> = wanted.keys().copied().collect();
        let (ids, wanted, wire) = (&ids, &wanted, &wire);
        let read = |pool: PgPool| async move {
            use futures::TryStreamExt as _;
            let mut rows = sqlx::query(BATCH_GET_SQL.as_str())
                .bind(team.as_str())
                .bind(ids)
                .bind(SQL_BYTE_BUDGET)
                .fetch(&pool);
            let mut by_id = HashMap::with_capacity(ids.len());
            let mut found = 0;
            let mut bytes = 0;
            while let Some(row) = rows.try_next().await? {
                found = row.try_get::<i64, _>("found")?;
                let conversation = ConversationRow::from_row(&row)?.into_model()?;
                let id = conversation.name.id;
                let item = wire(conversation);
                bytes += framed_len(&item) * wanted.get(&id).copied().unwrap_or(1);
                if bytes > MAX_RESPONSE_BYTES {
                    return Err(OpError::Api(too_large(names.len())));
                }
                by_id.insert(id, item);
            }
            // Postgres stopped sending by its estimate: the answer is surely too large.
            if by_id.len() < usize::try_from(found).unwrap_or(usize::MAX) {
                return Err(OpError::Api(too_large(names.len())));
            }
            Ok(by_id)
        };
        let mut fetched = self.on_shard_read(team, at, &read).await?;
        // Some missing: a replica may be behind a create; only the primary says it is gone.
        if fetched.len() < ids.len() && *at != ReadAt::Primary {
            fetched = self.on_shard_read(team, &ReadAt::Primary, &read).await?;
        }
        names
            .iter()
            .map(|name| {
                fetched
                    .get(&name.id)
                    .cloned()
                    .ok_or_else(|| ApiError::NotFound(name.to_string()))
            })
            .collect()
    }

    /// Lists a page of a team's conversations, each converted by `wire`, bounded in rows and
    /// bytes (see [`collect_page`]).
    pub async fn list<W: prost::Message>(
        &self,
        q: &ListQuery,
        at: &ReadAt,
        wire: impl Fn(Conversation) -> W + Sync,
    ) -> Result<Page<W, ListCursor>, ApiError> {
        let wire = &wire;
        self.on_shard_read(&q.team, at, |pool: PgPool| async move {
            let mut query = list_query("", q);
            let rows = query
                .build_query_as::<Sized<ConversationRow>>()
                .fetch(&pool);
            collect_page(
                rows,
                q.page_size,
                ConversationRow::into_model,
                |c| ListCursor {
                    created_at_micros: c.created_at.timestamp_micros(),
                    id: c.name.id,
                },
                wire,
            )
            .await
        })
        .await
    }

    /// Searches a team's conversations; each hit (with its rank) converted by `wire`, the
    /// page bounded in rows and bytes (see [`collect_page`]).
    pub async fn search<W: prost::Message>(
        &self,
        q: &SearchQuery,
        at: &ReadAt,
        wire: impl Fn(Conversation, f32) -> W + Sync,
    ) -> Result<Page<W, SearchCursor>, ApiError> {
        #[derive(sqlx::FromRow)]
        struct Hit {
            #[sqlx(flatten)]
            row: ConversationRow,
            rank: f32,
        }
        let wire = &wire;
        self.on_shard_read(&q.team, at, |pool: PgPool| async move {
            let mut query = search_query("", q);
            let rows = query.build_query_as::<Sized<Hit>>().fetch(&pool);
            collect_page(
                rows,
                q.page_size,
                |hit| Ok((hit.row.into_model()?, hit.rank)),
                |(c, rank)| SearchCursor {
                    rank: *rank,
                    id: c.name.id,
                },
                |(c, rank)| wire(c, rank),
            )
            .await
        })
        .await
    }

    /// Applies a patch, if `expected` (when given) is still the current version.
    pub async fn update(
        &self,
        name: &ConversationName,
        patch: &ConversationPatch,
        expected: Option<Version>,
    ) -> Result<Written<Conversation>, ApiError> {
        self.on_shard(&name.team, |pool: PgPool, replicas| async move {
            let mut conn = pool.acquire().await?;
            // The update, wrapped as `with_outbox` does (QueryBuilder needs it inline).
            let mut qb =
                QueryBuilder::<Postgres>::new("WITH changed AS (UPDATE conversations SET ");
            {
                let mut set = qb.separated(", ");
                if let Some(title) = &patch.title {
                    set.push("title = ").push_bind_unseparated(title.clone());
                }
                if let Some(intent) = patch.intent {
                    set.push("intent = ").push_bind_unseparated(intent.as_str());
                }
                if let Some(status) = patch.status {
                    set.push("status = ").push_bind_unseparated(status.as_str());
                }
                if let Some(content) = &patch.content {
                    set.push("content = ")
                        .push_bind_unseparated(content.clone());
                }
                if let Some(metadata) = &patch.metadata {
                    set.push("metadata = ")
                        .push_bind_unseparated(Json(metadata.clone()));
                }
                if let Some(score) = patch.effectiveness_score {
                    set.push("effectiveness_score = ")
                        .push_bind_unseparated(score);
                }
                set.push("version = version + 1");
                set.push("updated_at = now()");
            }
            qb.push(" WHERE team_id = ")
                .push_bind(name.team.as_str().to_owned())
                .push(" AND id = ")
                .push_bind(name.id);
            if let Some(Version(v)) = expected {
                qb.push(" AND version = ").push_bind(v);
            }
            qb.push(" RETURNING ")
                .push(COLUMNS)
                .push(")")
                .push(outbox_suffix(Change::Updated));
            let row: Option<ConversationRow> =
                qb.build_query_as().fetch_optional(&mut *conn).await?;
            match row {
                Some(row) => {
                    let value = row.into_model()?;
                    let lsn = token_lsn(&mut conn, replicas).await;
                    Ok(Written { value, lsn })
                }
                None => Err(OpError::Api(missing_or_stale(&mut conn, name).await?)),
            }
        })
        .await
    }

    /// Deletes a conversation and its events, if `expected` (when given) is current.
    /// Returns the version the conversation had.
    pub async fn delete(
        &self,
        name: &ConversationName,
        expected: Option<Version>,
    ) -> Result<Written<Version>, ApiError> {
        self.on_shard(&name.team, |pool: PgPool, replicas| async move {
            let mut conn = pool.acquire().await?;
            // The deletion's outbox row carries the version after the last one the row had.
            let version: Option<i64> = sqlx::query_scalar(
                "WITH deleted AS (DELETE FROM conversations WHERE team_id = $1 AND id = $2 \
                   AND ($3::bigint IS NULL OR version = $3) RETURNING team_id, id, version), \
                 outboxed AS (INSERT INTO outbox (team_id, conversation_id, version, kind, tags) \
                   SELECT team_id, id, version + 1, 'deleted', ARRAY['team:' || team_id] \
                   FROM deleted) \
                 SELECT version FROM deleted",
            )
            .bind(name.team.as_str())
            .bind(name.id)
            .bind(expected.map(|v| v.0))
            .fetch_optional(&mut *conn)
            .await?;
            match version {
                Some(v) => {
                    let lsn = token_lsn(&mut conn, replicas).await;
                    Ok(Written {
                        value: Version(v),
                        lsn,
                    })
                }
                None => Err(OpError::Api(missing_or_stale(&mut conn, name).await?)),
            }
        })
        .await
    }

    /// Appends events in one transaction, skipping those whose event_id is stored, and
    /// updates the conversation's counters.
    pub async fn append_events(
        &self,
        name: &ConversationName,
        events: Vec<NewEvent>,
    ) -> Result<Written<Appended>, ApiError> {
        let events = &events;
        self.on_shard(&name.team, |pool: PgPool, replicas| async move {
            let mut conn = pool.acquire().await?;
            let mut tx = conn.begin().await?;
            // The row lock serializes appends to one conversation, so sequences are
            // gap-free and the duplicate check below cannot race.
            let event_count: Option<i64> = sqlx::query_scalar(
                "SELECT event_count FROM conversations WHERE team_id = $1 AND id = $2 FOR UPDATE",
            )
            .bind(name.team.as_str())
            .bind(name.id)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(event_count) = event_count else {
                return Err(OpError::Api(ApiError::NotFound(name.to_string())));
            };

            let ids: Vec<&str> = events
                .iter()
                .filter_map(|e| e.event_id.as_deref())
                .collect();
            let stored: Vec<String> = if ids.is_empty() {
                Vec::new()
            } else {
                sqlx::query_scalar(
                    "SELECT event_id FROM conversation_events \
                     WHERE team_id = $1 AND conversation_id = $2 AND event_id = ANY($3)",
                )
                .bind(name.team.as_str())
                .bind(name.id)
                .bind(&ids)
                .fetch_all(&mut *tx)
                .await?
            };
            let mut seen: HashSet<String> = stored.into_iter().collect();
            let total = events.len();
            let fresh: Vec<NewEvent> = events
                .iter()
                .filter(|e| e.event_id.as_ref().is_none_or(|id| seen.insert(id.clone())))
                .cloned()
                .collect();
            let duplicates = total - fresh.len();

            if fresh.is_empty() {
                let row: ConversationRow = sqlx::query_as(GET_SQL)
                    .bind(name.team.as_str())
                    .bind(name.id)
                    .fetch_one(&mut *tx)
                    .await?;
                tx.commit().await?;
                let value = Appended {
                    conversation: row.into_model()?,
                    events: Vec::new(),
                    duplicates,
                };
                let lsn = token_lsn(&mut conn, replicas).await;
                return Ok(Written { value, lsn });
            }

            let stored: Vec<Event> = fresh
                .into_iter()
                .enumerate()
                .map(|(i, event)| Event {
                    sequence: event_count + 1 + i as i64,
                    event,
                })
                .collect();
            let messages = stored
                .iter()
                .filter(|e| e.event.kind == EventKind::Message)
                .count() as i64;
            // Within i64 by validation (500 events of at most a billion each); saturating
            // all the same, as the stored totals are.
            let sum = |f: fn(&TokenUsage) -> i64| {
                stored
                    .iter()
                    .fold(0_i64, |sum, e| sum.saturating_add(f(&e.event.usage)))
            };
            let first = stored.iter().map(|e| e.event.occurred_at).min();
            let last = stored.iter().map(|e| e.event.occurred_at).max();
            let row: ConversationRow = bind_events(sqlx::query_as(&APPEND), name, &stored)
                .bind(stored.len() as i64)
                .bind(messages)
                .bind(sum(|u| u.input))
                .bind(sum(|u| u.output))
                .bind(sum(|u| u.cache_creation))
                .bind(sum(|u| u.cache_read))
                .bind(first)
                .bind(last)
                .fetch_one(&mut *tx)
                .await?;
            tx.commit().await?;
            let value = Appended {
                conversation: row.into_model()?,
                events: stored,
                duplicates,
            };
            let lsn = token_lsn(&mut conn, replicas).await;
            Ok(Written { value, lsn })
        })
        .await
    }

    /// Declares a conversation for ingestion: creates it, or updates its title, intent and
    /// metadata (merged key by key) where they differ. A merge that would leave more than
    /// [`MAX_METADATA_ENTRIES`] entries is refused (INVALID_ARGUMENT, nothing written), so a
    /// stored conversation stays within [`MAX_CONVERSATION_BYTES`] however often it is
    /// declared. A declaration that changes nothing
    /// writes nothing (no version, no outbox row), so re-importing a transcript is a no-op.
    /// Returns the conversation when it was written.
    pub async fn declare(&self, c: &IngestConversation) -> Result<Option<Conversation>, ApiError> {
        let statement = format!(
            "WITH changed AS (\
               INSERT INTO conversations AS c (team_id, id, title, intent, status, metadata) \
               VALUES ($1, $2, $3, COALESCE($4, 'other'), 'active', $5) \
               ON CONFLICT (team_id, id) DO UPDATE SET \
                 title = EXCLUDED.title, \
                 intent = COALESCE($4, c.intent), \
                 metadata = c.metadata || EXCLUDED.metadata, \
                 version = c.version + 1, \
                 updated_at = now() \
               WHERE (c.title, c.intent, c.metadata) IS DISTINCT FROM \
                     (EXCLUDED.title, COALESCE($4, c.intent), c.metadata || EXCLUDED.metadata) \
                 AND {MERGED_KEYS} <= {MAX_METADATA_ENTRIES} \
               RETURNING {COLUMNS}, xmax = 0 AS inserted), \
             outboxed AS (INSERT INTO outbox (team_id, conversation_id, version, kind, tags) \
               SELECT team_id, id, version, \
                 CASE WHEN inserted THEN 'created' ELSE 'updated' END, \
                 ARRAY['team:' || team_id] FROM changed) \
             SELECT {COLUMNS} FROM changed"
        );
        let statement = &statement;
        let row: Option<ConversationRow> = self
            .on_shard(&c.name.team, |pool: PgPool, _replicas| async move {
                let row = sqlx::query_as(statement)
                    .bind(c.name.team.as_str())
                    .bind(c.name.id)
                    .bind(&c.title)
                    .bind(c.intent.map(Intent::as_str))
                    .bind(Json(&c.metadata))
                    .fetch_optional(&pool)
                    .await?;
                if row.is_none() && !c.metadata.is_empty() {
                    // Nothing written: unchanged, or refused because the merged metadata
                    // would pass its limit (asked only when the declaration has metadata).
                    let merged: Option<i64> = sqlx::query_scalar(
                        "SELECT (SELECT count(*) FROM jsonb_object_keys(metadata || $3)) \
                         FROM conversations WHERE team_id = $1 AND id = $2",
                    )
                    .bind(c.name.team.as_str())
                    .bind(c.name.id)
                    .bind(Json(&c.metadata))
                    .fetch_optional(&pool)
                    .await?;
                    if let Some(merged) = merged.filter(|n| *n > MAX_METADATA_ENTRIES as i64) {
                        return Err(OpError::Api(ApiError::invalid(
                            "conversation.metadata",
                            format!(
                                "would hold {merged} entries once merged with the stored ones; \
                                 at most {MAX_METADATA_ENTRIES} are allowed"
                            ),
                        )));
                    }
                }
                Ok(row)
            })
            .await?;
        row.map(ConversationRow::into_model).transpose()
    }

    /// Lists a page of a conversation's events, each converted by `wire`, bounded in rows and
    /// bytes (see [`collect_page`]).
    pub async fn list_events_page<W: prost::Message>(
        &self,
        q: &EventsQuery,
        at: &ReadAt,
        wire: impl Fn(Event) -> W + Sync,
    ) -> Result<Page<W, i64>, ApiError> {
        let name = &q.conversation;
        let wire = &wire;
        self.on_shard_read(&name.team, at, |pool: PgPool| async move {
            let pool = &pool;
            let rows = sqlx::query_as::<_, Sized<EventRow>>(LIST_EVENTS_SQL.as_str())
                .bind(name.team.as_str())
                .bind(name.id)
                .bind(q.after_sequence)
                .bind(q.page_size as i64 + 1)
                .bind(SQL_BYTE_BUDGET)
                .fetch(pool);
            let page = collect_page(
                rows,
                q.page_size,
                EventRow::into_model,
                |e| e.sequence,
                wire,
            )
            .await?;
            if page.items.is_empty() && !exists(pool, name).await? {
                return Err(OpError::Api(ApiError::NotFound(name.to_string())));
            }
            Ok(page)
        })
        .await
    }

    /// Lists a page of a conversation's events, bounded in rows only: a page shorter than
    /// `page_size` is the last. For readers that take events one at a time (watch streams);
    /// answers to clients use [`ConversationStore::list_events_page`].
    pub async fn list_events(&self, q: &EventsQuery, at: &ReadAt) -> Result<Page<Event>, ApiError> {
        let name = &q.conversation;
        let rows: Vec<EventRow> = self
            .on_shard_read(&name.team, at, |pool: PgPool| async move {
                let pool = &pool;
                let rows: Vec<EventRow> = sqlx::query_as(LIST_EVENTS_SQL.as_str())
                    .bind(name.team.as_str())
                    .bind(name.id)
                    .bind(q.after_sequence)
                    .bind(q.page_size as i64 + 1)
                    .bind(i64::MAX)
                    .fetch_all(pool)
                    .await?;
                if rows.is_empty() && !exists(pool, name).await? {
                    return Err(OpError::Api(ApiError::NotFound(name.to_string())));
                }
                Ok(rows)
            })
            .await?;
        page(rows, q.page_size, EventRow::into_model)
    }

    /// Deletes idempotency records older than `age` on every shard; returns how many.
    pub async fn purge_create_requests(&self, age: Duration) -> Result<u64, sqlx::Error> {
        self.purge(
            "DELETE FROM create_requests WHERE created_at < now() - make_interval(secs => $1)",
            age,
        )
        .await
    }

    /// Deletes outbox rows published more than `age` ago on every shard; returns how many.
    /// Unpublished rows are never deleted, nor rows a slot move in progress may still
    /// replay: those past the least hold in `outbox_holds` (set by the shard-router's mover).
    pub async fn purge_published_outbox(&self, age: Duration) -> Result<u64, sqlx::Error> {
        self.purge(
            "DELETE FROM outbox WHERE published_at < now() - make_interval(secs => $1) \
             AND id <= (SELECT coalesce(min(after_id), 9223372036854775807) FROM outbox_holds)",
            age,
        )
        .await
    }

    /// How long the oldest outbox hold (a slot move's, see `outbox_holds`) has kept rows
    /// from the purge, over every shard; `None` when no shard has one.
    pub async fn oldest_outbox_hold(&self) -> Result<Option<Duration>, sqlx::Error> {
        let pools = self.pools();
        let mut oldest: Option<Duration> = None;
        for index in 0..pools.map().shards().len() {
            let age: Option<f64> = sqlx::query_scalar(
                "SELECT EXTRACT(EPOCH FROM now() - min(created_at))::float8 FROM outbox_holds",
            )
            .fetch_one(pools.pool(index))
            .await?;
            if let Some(age) = age.and_then(|s| Duration::try_from_secs_f64(s.max(0.0)).ok()) {
                oldest = Some(oldest.map_or(age, |o| o.max(age)));
            }
        }
        Ok(oldest)
    }

    /// Runs a `DELETE ... $1 seconds` statement on every shard; returns the rows deleted.
    async fn purge(&self, statement: &'static str, age: Duration) -> Result<u64, sqlx::Error> {
        let mut purged = 0;
        let pools = self.pools();
        for index in 0..pools.map().shards().len() {
            purged += sqlx::query(statement)
                .bind(age.as_secs_f64())
                .execute(pools.pool(index))
                .await?
                .rows_affected();
        }
        Ok(purged)
    }
}

/// Why an operation on a shard failed: a database error (classified later, knowing the
/// shard) or an API error decided by the operation itself.
enum OpError {
    Db(sqlx::Error),
    Api(ApiError),
}

impl From<sqlx::Error> for OpError {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(e)
    }
}

impl From<ApiError> for OpError {
    fn from(e: ApiError) -> Self {
        Self::Api(e)
    }
}

fn page<R, T>(
    mut rows: Vec<R>,
    page_size: usize,
    convert: impl Fn(R) -> Result<T, ApiError>,
) -> Result<Page<T>, ApiError> {
    let more = rows.len() > page_size;
    rows.truncate(page_size);
    Ok(Page {
        items: rows.into_iter().map(convert).collect::<Result<_, _>>()?,
        more,
        next: None,
    })
}

async fn exists<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    name: &ConversationName,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM conversations WHERE team_id = $1 AND id = $2)")
        .bind(name.team.as_str())
        .bind(name.id)
        .fetch_one(executor)
        .await
}

/// The number of keys of a declaration's merged metadata, in its upsert.
const MERGED_KEYS: &str =
    "(SELECT count(*) FROM jsonb_object_keys(c.metadata || EXCLUDED.metadata))";

/// A BatchGet whose answer would pass [`MAX_RESPONSE_BYTES`].
fn too_large(names: usize) -> ApiError {
    let always = MAX_RESPONSE_BYTES / MAX_CONVERSATION_BYTES;
    ApiError::TooLarge {
        subject: "names".into(),
        why: format!(
            "the {names} conversations named take more than {MAX_RESPONSE_BYTES} bytes encoded, \
             the most one answer carries: ask for fewer at a time ({always} always fit)"
        ),
    }
}

/// After a conditional write touched no row: was the row missing, or its etag stale?
async fn missing_or_stale(
    conn: &mut sqlx::PgConnection,
    name: &ConversationName,
) -> Result<ApiError, sqlx::Error> {
    Ok(if exists(conn, name).await? {
        ApiError::StaleEtag {
            name: name.to_string(),
        }
    } else {
        ApiError::NotFound(name.to_string())
    })
}

/// What a write did, as the outbox records it.
#[derive(Clone, Copy, Debug)]
enum Change {
    Created,
    Updated,
    EventsAppended,
}

impl Change {
    fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Updated => "updated",
            Self::EventsAppended => "events_appended",
        }
    }
}

/// Wraps a statement that changes one conversation and returns its [`COLUMNS`] so that the
/// same statement (hence the same transaction) also writes the change's outbox row: a write
/// without its invalidation cannot commit. The result is the statement's own rows.
fn with_outbox(statement: &str, change: Change) -> String {
    with_outbox_after("", statement, change)
}

/// [`with_outbox`] behind other common table expressions (`ctes`: `name AS (...), ` each,
/// which `statement` may read).
fn with_outbox_after(ctes: &str, statement: &str, change: Change) -> String {
    format!(
        "WITH {ctes}changed AS ({statement}){}",
        outbox_suffix(change)
    )
}

/// What follows `WITH changed AS (...)` in [`with_outbox`].
fn outbox_suffix(change: Change) -> String {
    format!(
        ", outboxed AS (INSERT INTO outbox (team_id, conversation_id, version, kind, tags) \
           SELECT team_id, id, version, '{}', ARRAY['team:' || team_id] FROM changed) \
         SELECT {COLUMNS} FROM changed",
        change.as_str()
    )
}

/// The WAL position for the token of a write that `conn` just made (committed): read on
/// that same connection, so a write takes one connection, not two (a second acquire waited
/// behind other writes: docs/benchmarks.md). 0 on a shard without replicas (its reads all
/// go to the primary); `u64::MAX` when the primary cannot say in time, so reads with the
/// token go to the primary. Never fails: the write has committed.
async fn token_lsn(conn: &mut sqlx::PgConnection, replicas: bool) -> u64 {
    if !replicas {
        return 0;
    }
    match tokio::time::timeout(COMMIT_LSN_TIMEOUT, convoy_store::replicas::commit_lsn(conn)).await {
        Ok(Ok(lsn)) => lsn,
        _ => u64::MAX,
    }
}

/// Inserts a new conversation; ALREADY_EXISTS if its id is taken.
async fn insert_conversation<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    new: &NewConversation,
) -> Result<ConversationRow, OpError> {
    let row: Option<ConversationRow> = bind_new(sqlx::query_as(&INSERT), new)
        .fetch_optional(executor)
        .await?;
    row.ok_or_else(|| id_taken(new))
}

/// A create's insert, with its outbox row; none is returned when the id is taken.
static INSERT: LazyLock<String> = LazyLock::new(|| {
    with_outbox(
        &format!(
            "INSERT INTO conversations ({INSERT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (team_id, id) DO NOTHING RETURNING {COLUMNS}"
        ),
        Change::Created,
    )
});

/// Binds a create's `$1`-`$8` ([`INSERT_COLUMNS`]).
fn bind_new<'q, O>(
    query: sqlx::query::QueryAs<'q, Postgres, O, sqlx::postgres::PgArguments>,
    new: &'q NewConversation,
) -> sqlx::query::QueryAs<'q, Postgres, O, sqlx::postgres::PgArguments> {
    query
        .bind(new.name.team.as_str())
        .bind(new.name.id)
        .bind(&new.fields.title)
        .bind(new.fields.intent.as_str())
        .bind(new.fields.status.as_str())
        .bind(&new.fields.content)
        .bind(Json(&new.fields.metadata))
        .bind(new.fields.effectiveness_score)
}

/// ALREADY_EXISTS for a create whose conversation id is taken.
fn id_taken(new: &NewConversation) -> OpError {
    OpError::Api(ApiError::AlreadyExists {
        what: new.name.to_string(),
        why: "a conversation with this id exists; omit conversation_id to get a fresh one".into(),
    })
}

/// [`CLAIMED_INSERT`]'s failure: a taken id is ALREADY_EXISTS, anything else as it is.
fn claimed_insert_error(e: sqlx::Error, new: &NewConversation) -> OpError {
    match &e {
        sqlx::Error::Database(db)
            if db.is_unique_violation() && db.constraint() == Some("conversations_pkey") =>
        {
            id_taken(new)
        }
        _ => e.into(),
    }
}

/// [`insert_conversation`]'s insert behind the claim of a request id (`$9`, with the
/// request's fingerprint `$10`), as one statement: the conversation is inserted only when
/// the claim is new (none is returned for a claim already made: a replay), and a taken id
/// is an error (no `ON CONFLICT`), so the claim is not kept either.
static CLAIMED_INSERT: LazyLock<String> = LazyLock::new(|| {
    with_outbox_after(
        "claim AS (INSERT INTO create_requests (team_id, request_id, conversation_id, \
           fingerprint) VALUES ($1, $9, $2, $10) ON CONFLICT DO NOTHING RETURNING 1), ",
        &format!(
            "INSERT INTO conversations ({INSERT_COLUMNS}) \
             SELECT $1, $2, $3, $4, $5, $6, $7, $8 WHERE EXISTS (SELECT 1 FROM claim) \
             RETURNING {COLUMNS}"
        ),
        Change::Created,
    )
});

/// Answers a create whose request_id was already claimed.
async fn replay(
    conn: &mut sqlx::PgConnection,
    team: &TeamId,
    request_id: Uuid,
    fingerprint: &[u8; 8],
) -> Result<Created, OpError> {
    let (conversation_id, stored): (Uuid, Vec<u8>) = sqlx::query_as(
        "SELECT conversation_id, fingerprint FROM create_requests WHERE team_id = $1 AND request_id = $2",
    )
    .bind(team.as_str())
    .bind(request_id)
    .fetch_one(&mut *conn)
    .await?;
    if stored != fingerprint {
        return Err(OpError::Api(ApiError::AlreadyExists {
            what: format!("request_id {request_id}"),
            why: "it was used for a different request; use a new request_id per logical request"
                .into(),
        }));
    }
    let name = ConversationName {
        team: team.clone(),
        id: conversation_id,
    };
    let row: Option<ConversationRow> = sqlx::query_as(GET_SQL)
        .bind(team.as_str())
        .bind(conversation_id)
        .fetch_optional(&mut *conn)
        .await?;
    match row {
        Some(row) => Ok(Created {
            conversation: row.into_model()?,
            fresh: false,
        }),
        None => Err(OpError::Api(ApiError::NotFound(name.to_string()))),
    }
}

/// The append's writes as one statement (one round trip, inside the transaction that holds
/// the conversation's row lock): the events (`$1`, `$2` name the conversation, `$3`-`$19`
/// are the events' columns, see [`bind_events`]), and the conversation's counters (`$20`
/// events, `$21` messages, `$22`-`$25` tokens, `$26`/`$27` the first and last event times)
/// with its outbox row. Returns the conversation's new [`COLUMNS`].
///
/// Token totals saturate at i64::MAX (added as numeric, then capped): each event brings at
/// most [`crate::limits::MAX_TOKENS_PER_EVENT`] of each kind, but appends to one
/// conversation have no end, and a total must never fail the append that passes it. Event
/// and message counts grow by at most 500 per append, so they would need 10^16 appends to
/// overflow: they add plainly (a sequence must stay exact).
static APPEND: LazyLock<String> = LazyLock::new(|| {
    with_outbox_after(
        "inserted AS (INSERT INTO conversation_events (team_id, conversation_id, sequence, \
           event_id, parent_event_id, kind, role, occurred_at, content, tool_name, tool_call_id, \
           is_error, model, input_tokens, output_tokens, cache_creation_input_tokens, \
           cache_read_input_tokens, is_sidechain, raw_json) \
         SELECT $1, $2, * FROM UNNEST($3::bigint[], $4::text[], $5::text[], $6::text[], \
           $7::text[], $8::timestamptz[], $9::text[], $10::text[], $11::text[], $12::bool[], \
           $13::text[], $14::bigint[], $15::bigint[], $16::bigint[], $17::bigint[], $18::bool[], \
           $19::jsonb[])), ",
        &format!(
            "UPDATE conversations SET \
               event_count = event_count + $20, \
               message_count = message_count + $21, \
               input_tokens = {}, \
               output_tokens = {}, \
               cache_creation_input_tokens = {}, \
               cache_read_input_tokens = {}, \
               first_event_at = LEAST(first_event_at, $26), \
               last_event_at = GREATEST(last_event_at, $27), \
               duration_seconds = EXTRACT(EPOCH FROM \
                   GREATEST(last_event_at, $27) - LEAST(first_event_at, $26))::double precision, \
               version = version + 1, \
               updated_at = now() \
             WHERE team_id = $1 AND id = $2 RETURNING {COLUMNS}",
            saturating_add("input_tokens", "$22"),
            saturating_add("output_tokens", "$23"),
            saturating_add("cache_creation_input_tokens", "$24"),
            saturating_add("cache_read_input_tokens", "$25"),
        ),
        Change::EventsAppended,
    )
});

/// SQL for `column + addend` on bigints, saturated at i64::MAX instead of failing.
fn saturating_add(column: &str, addend: &str) -> String {
    format!("LEAST({column}::numeric + {addend}, {})::bigint", i64::MAX)
}

/// Binds [`APPEND`]'s `$1`-`$19`: the conversation and its new events, a column each.
fn bind_events<'q, O>(
    query: sqlx::query::QueryAs<'q, Postgres, O, sqlx::postgres::PgArguments>,
    name: &'q ConversationName,
    events: &[Event],
) -> sqlx::query::QueryAs<'q, Postgres, O, sqlx::postgres::PgArguments> {
    fn col<T>(events: &[Event], f: impl Fn(&Event) -> T) -> Vec<T> {
        events.iter().map(f).collect()
    }
    query
        .bind(name.team.as_str())
        .bind(name.id)
        .bind(col(events, |e| e.sequence))
        .bind(col(events, |e| e.event.event_id.clone()))
        .bind(col(events, |e| e.event.parent_event_id.clone()))
        .bind(col(events, |e| e.event.kind.as_str()))
        .bind(col(events, |e| e.event.role.map(Role::as_str)))
        .bind(col(events, |e| e.event.occurred_at))
        .bind(col(events, |e| e.event.content.clone()))
        .bind(col(events, |e| e.event.tool_name.clone()))
        .bind(col(events, |e| e.event.tool_call_id.clone()))
        .bind(col(events, |e| e.event.is_error))
        .bind(col(events, |e| e.event.model.clone()))
        .bind(col(events, |e| e.event.usage.input))
        .bind(col(events, |e| e.event.usage.output))
        .bind(col(events, |e| e.event.usage.cache_creation))
        .bind(col(events, |e| e.event.usage.cache_read))
        .bind(col(events, |e| e.event.is_sidechain))
        .bind(col(events, |e| e.event.raw_json.clone()))
}

/// Whether `team`'s slot has left (or not yet reached) the shard of `pool`: a NOT_FOUND
/// there means nothing. Asked only after a NOT_FOUND; an error counts as "no".
async fn moved_away(pool: &PgPool, team: &TeamId) -> Option<Fence> {
    let slot = Slot::for_team(team.as_str()).get();
    let states = ownership::states(pool, &(slot..=slot)).await.ok()?;
    match states.first() {
        Some((_, state, _)) if state.takes_reads() => None,
        Some((_, _, epoch)) => Some(Fence::Moved { epoch: *epoch }),
        None => Some(Fence::Moved { epoch: Epoch(0) }),
    }
}
