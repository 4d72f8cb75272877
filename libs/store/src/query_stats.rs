//! Query statistics: how often each statement runs and how long it takes, per normalized
//! statement and shard, exported through the `metrics` facade and kept in process for
//! quantiles; and the trigger for capturing a slow statement's plan ([`crate::plans`]).
//!
//! # How statements are seen
//!
//! sqlx times every statement it runs and reports it as a `tracing` event (target
//! `sqlx::query`: the text in `summary` or `db.statement`, the time in `elapsed_secs`), and
//! every pool acquire likewise (target `sqlx::pool::acquire`, `aquired_after_secs`, sic), at
//! the levels the connect and pool options set. The pools of [`crate::pool`] set both to
//! TRACE, and [`layer`], a `tracing_subscriber` layer behind its own filter that admits only
//! those events and the spans that name a shard, records them. No call site changes: every
//! query on a [`ShardPools`](crate::ShardPools) pool is counted, in a transaction or not.
//! The shard (and node) come from the nearest enclosing span with a `db.namespace` field,
//! [`crate::spans::db_span`]; a statement outside one counts under shard `unknown`.
//!
//! Why events and not a wrapper: sqlx has no per-statement hook on pools or connections,
//! and every store runs `sqlx::query(..).fetch_*(&pool)` on a `PgPool` or a transaction
//! directly, so a wrapper would change every call site and miss any it was not applied to.
//! The event costs what sqlx spends to build it once it is enabled: the summary (its first
//! four words joined: two small allocations) and one copy of the SQL text; 0.8 no longer
//! pretty-prints SQL (its `sqlformat` call is commented out in `logger.rs`). This layer then
//! hashes the text, takes one read lock and one mutex, and records (about a microsecond
//! in all: `benches/query_stats.rs`), against a statement's round trip of 50 µs or more.
//! With no layer admitting them the events are disabled where they are made, at the cost
//! of a cached interest check, as before.
//!
//! # Statements and their labels
//!
//! Our SQL is parameterized (values travel as `$n`), so a statement's text with whitespace
//! collapsed is already its normalized form. Each statement is labelled by its first words
//! and a stable fingerprint, the top 32 bits of the XXH3 of the collapsed text, in hex
//! (`SELECT id, title FROM #1f2e3d4c`); `convoyctl queries` shows the same fingerprint for
//! `pg_stat_statements` rows. At most [`QueryStatsSettings::max_statements`] statements are
//! tracked; any others fold into `other`, so no workload grows the series without bound.
//!
//! Not here: capturing plans ([`crate::plans`]) or the pool gauges
//! ([`crate::pool_metrics`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use metrics::{Key, Label};
use sketches_ddsketch::{Config, DDSketch};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber, span};
use tracing_subscriber::Registry;
use tracing_subscriber::layer::{Context, Filter, Layer};
use tracing_subscriber::registry::LookupSpan;
use xxhash_rust::xxh3::Xxh3;

use crate::plans::{CapturedPlan, PlanRequest};
use crate::pool_metrics::AcquireHistograms;

/// Each statement's duration in seconds, labelled `statement` and `shard`.
pub const STATEMENT_DURATION: &str = "convoy_db_statement_duration_seconds";
/// Statements at or over the slow threshold, labelled `statement`.
pub const SLOW_STATEMENTS: &str = "convoy_db_slow_statements_total";

/// The label of every statement past [`QueryStatsSettings::max_statements`].
pub const OTHER: &str = "other";
/// The shard (and node) of a statement run outside a span naming one.
pub const UNKNOWN: &str = "unknown";

/// The targets of sqlx's statement and acquire events.
const STATEMENT_TARGET: &str = "sqlx::query";
const ACQUIRE_TARGET: &str = "sqlx::pool::acquire";
/// What sqlx appends to `summary` when the statement is longer than it.
const SUMMARY_CUT: &str = " …";
/// Words of the statement in its label: sqlx's summary length.
const LABEL_WORDS: usize = 4;
/// Longest run of words in a label (bytes, cut at a character boundary).
const LABEL_CHARS: usize = 48;

static METADATA: metrics::Metadata<'static> =
    metrics::Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// How statements are tracked; every default is documented where it is declared.
#[derive(Clone, Debug)]
pub struct QueryStatsSettings {
    /// A statement that takes this long or longer is slow: counted in [`SLOW_STATEMENTS`]
    /// and its plan captured. Default 100 ms: ten times a p99 we expect from an indexed
    /// point query, well under the 5 s statement timeout. Adjustable at run time with
    /// [`QueryStats::set_slow_threshold`].
    pub slow_threshold: Duration,
    /// Most distinct statements tracked; others fold into [`OTHER`]. Default 500: several
    /// times the statements convoy's services run, and a bound on the series exported.
    pub max_statements: usize,
    /// At most one plan per statement per this long. Default 60 s: a plan changes with
    /// statistics, not from one call to the next.
    pub plan_interval: Duration,
    /// Plan requests waiting per shard; more are dropped. Default 16: planning takes
    /// milliseconds, so a full queue means a burst of distinct slow statements, and a few
    /// of their plans are enough to start with.
    pub plan_queue: usize,
}

impl Default for QueryStatsSettings {
    fn default() -> Self {
        Self {
            slow_threshold: Duration::from_millis(100),
            max_statements: 500,
            plan_interval: Duration::from_secs(60),
            plan_queue: 16,
        }
    }
}

/// One statement's numbers, from process start (see [`QueryStats::snapshot`]).
#[derive(Clone, Debug, PartialEq)]
pub struct StatementStats {
    /// Its label: first words and fingerprint ([`statement_label`]), or [`OTHER`].
    pub label: String,
    /// Its text, whitespace collapsed (empty for [`OTHER`]).
    pub sql: String,
    /// Times it ran, on every shard.
    pub count: u64,
    /// Mean duration.
    pub mean: Duration,
    /// Median duration (within 1%: a DDSketch's relative accuracy).
    pub p50: Duration,
    /// 95th percentile duration.
    pub p95: Duration,
    /// 99th percentile duration.
    pub p99: Duration,
    /// Longest duration.
    pub max: Duration,
    /// Runs at or over the slow threshold.
    pub slow: u64,
}

/// Statement statistics and slow-statement plans, shared by [`layer`] (which records into
/// it) and the pools (whose background tasks capture plans for it). Cheap to clone.
#[derive(Clone)]
pub struct QueryStats {
    inner: Arc<Inner>,
}

struct Inner {
    slow_threshold_nanos: AtomicU64,
    max_statements: usize,
    plan_interval: Duration,
    plan_queue: usize,
    /// By fingerprint.
    statements: RwLock<HashMap<u64, Arc<Statement>>>,
    other: Arc<Statement>,
    /// Each shard's plan queue, by shard id.
    planners: RwLock<HashMap<String, mpsc::Sender<PlanRequest>>>,
    /// The latest plan of each statement, by fingerprint.
    plans: Mutex<HashMap<u64, CapturedPlan>>,
    /// Bumped at every plan stored, for waiters.
    plans_stored: watch::Sender<u64>,
    plans_dropped: AtomicU64,
    acquire: AcquireHistograms,
}

/// A tracked statement.
pub(crate) struct Statement {
    fingerprint: u64,
    pub(crate) label: Arc<str>,
    /// As first run, for EXPLAIN (whitespace kept: it may sit inside a literal).
    pub(crate) sql: Arc<str>,
    normalized: Box<str>,
    other: bool,
    slow_key: Key,
    recorded: Mutex<Recorded>,
    pub(crate) slow: AtomicU64,
    last_plan: Mutex<Option<Instant>>,
}

struct Recorded {
    sketch: DDSketch,
    /// The duration histogram's key on each shard seen (as many as the shard map has).
    keys: Vec<(Box<str>, Key)>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

fn secs(value: f64) -> Duration {
    Duration::try_from_secs_f64(value).unwrap_or_default()
}

// === impl QueryStats ===

impl QueryStats {
    /// Empty statistics with these settings.
    pub fn new(settings: QueryStatsSettings) -> Self {
        let nanos = u64::try_from(settings.slow_threshold.as_nanos()).unwrap_or(u64::MAX);
        Self {
            inner: Arc::new(Inner {
                slow_threshold_nanos: AtomicU64::new(nanos),
                max_statements: settings.max_statements,
                plan_interval: settings.plan_interval,
                plan_queue: settings.plan_queue.max(1),
                statements: RwLock::default(),
                other: Arc::new(Statement::other()),
                planners: RwLock::default(),
                plans: Mutex::default(),
                plans_stored: watch::channel(0).0,
                plans_dropped: AtomicU64::new(0),
                acquire: AcquireHistograms::default(),
            }),
        }
    }

    /// The process-wide statistics, with default settings: what
    /// [`PoolSettings`](crate::PoolSettings) use unless told otherwise, and what telemetry
    /// should hand to [`layer`].
    pub fn global() -> Self {
        static GLOBAL: OnceLock<QueryStats> = OnceLock::new();
        GLOBAL
            .get_or_init(|| QueryStats::new(QueryStatsSettings::default()))
            .clone()
    }

    /// The slow threshold in force.
    pub fn slow_threshold(&self) -> Duration {
        Duration::from_nanos(self.inner.slow_threshold_nanos.load(Ordering::Relaxed))
    }

    /// Changes the slow threshold (a service's flag, say).
    pub fn set_slow_threshold(&self, threshold: Duration) {
        let nanos = u64::try_from(threshold.as_nanos()).unwrap_or(u64::MAX);
        self.inner
            .slow_threshold_nanos
            .store(nanos, Ordering::Relaxed);
    }

    /// Every statement seen (and [`OTHER`], once it has counted any), by label.
    pub fn snapshot(&self) -> Vec<StatementStats> {
        let mut all: Vec<StatementStats> = read(&self.inner.statements)
            .values()
            .map(|s| s.stats())
            .collect();
        let other = self.inner.other.stats();
        if other.count > 0 {
            all.push(other);
        }
        all.sort_by(|a, b| a.label.cmp(&b.label));
        all
    }

    /// The numbers of statement `sql` (whitespace does not matter), if it has run.
    pub fn statement(&self, sql: &str) -> Option<StatementStats> {
        read(&self.inner.statements)
            .get(&fingerprint(sql))
            .map(|s| s.stats())
    }

    /// The latest plan captured for statement `sql`, if any.
    pub fn plan(&self, sql: &str) -> Option<CapturedPlan> {
        lock(&self.inner.plans).get(&fingerprint(sql)).cloned()
    }

    /// Waits until a plan of statement `sql` has been captured, and returns it.
    pub async fn wait_for_plan(&self, sql: &str) -> CapturedPlan {
        let mut stored = self.inner.plans_stored.subscribe();
        loop {
            if let Some(plan) = self.plan(sql) {
                return plan;
            }
            // The sender lives as long as `self`: this cannot fail while we wait.
            let _ = stored.changed().await;
        }
    }

    /// Plan requests dropped because their shard's queue was full.
    pub fn plans_dropped(&self) -> u64 {
        self.inner.plans_dropped.load(Ordering::Relaxed)
    }

    /// A plan queue for shard `shard`, replacing any earlier one (the task that reads it is
    /// the shard's planner, see [`crate::plans`]).
    pub(crate) fn register_planner(&self, shard: &str) -> mpsc::Receiver<PlanRequest> {
        let (tx, rx) = mpsc::channel(self.inner.plan_queue);
        write(&self.inner.planners).insert(shard.to_owned(), tx);
        rx
    }

    /// Keeps `plan` as its statement's latest.
    pub(crate) fn store_plan(&self, statement: &Statement, plan: CapturedPlan) {
        lock(&self.inner.plans).insert(statement.fingerprint, plan);
        self.inner.plans_stored.send_modify(|n| *n += 1);
    }

    /// The tracked statement `sql`, tracking it if there is room, else [`OTHER`].
    fn resolve(&self, sql: &str) -> Arc<Statement> {
        let inner = &self.inner;
        let fingerprint = fingerprint(sql);
        {
            let statements = read(&inner.statements);
            if let Some(statement) = statements.get(&fingerprint) {
                return statement.clone();
            }
            if statements.len() >= inner.max_statements {
                return inner.other.clone();
            }
        }
        let mut statements = write(&inner.statements);
        if statements.len() >= inner.max_statements && !statements.contains_key(&fingerprint) {
            return inner.other.clone();
        }
        statements
            .entry(fingerprint)
            .or_insert_with(|| Arc::new(Statement::new(fingerprint, sql)))
            .clone()
    }

    /// Records one run of `statement` on `shard` that took `seconds`.
    fn record(&self, statement: &Arc<Statement>, shard: &str, seconds: f64) {
        {
            let mut recorded = lock(&statement.recorded);
            recorded.sketch.add(seconds);
            let key = recorded.key(shard, &statement.label);
            metrics::with_recorder(|r| r.register_histogram(key, &METADATA)).record(seconds);
        }
        if secs(seconds) >= self.slow_threshold() {
            metrics::with_recorder(|r| r.register_counter(&statement.slow_key, &METADATA))
                .increment(1);
            statement.slow.fetch_add(1, Ordering::Relaxed);
            self.request_plan(statement, shard, seconds);
        }
    }

    /// Queues a plan capture for a slow run of `statement` on `shard`, unless one was
    /// queued within the plan interval, the shard has no planner, or its queue is full.
    /// Never waits: this runs on the statement's own path.
    fn request_plan(&self, statement: &Arc<Statement>, shard: &str, seconds: f64) {
        if statement.other {
            // No text kept to plan with.
            return;
        }
        let now = Instant::now();
        let mut last = lock(&statement.last_plan);
        if last.is_some_and(|at| now.saturating_duration_since(at) < self.inner.plan_interval) {
            return;
        }
        let sent = read(&self.inner.planners).get(shard).map(|planner| {
            planner.try_send(PlanRequest {
                statement: statement.clone(),
                elapsed: secs(seconds),
            })
        });
        match sent {
            Some(Ok(())) => *last = Some(now),
            Some(Err(mpsc::error::TrySendError::Full(_))) => {
                self.inner.plans_dropped.fetch_add(1, Ordering::Relaxed);
            }
            Some(Err(mpsc::error::TrySendError::Closed(_))) => {
                write(&self.inner.planners).retain(|_, planner| !planner.is_closed());
            }
            None => {}
        }
    }
}

impl std::fmt::Debug for QueryStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryStats")
            .field("statements", &read(&self.inner.statements).len())
            .field("slow_threshold", &self.slow_threshold())
            .finish()
    }
}

// === impl Statement ===

impl Statement {
    fn new(fingerprint: u64, sql: &str) -> Self {
        let label: Arc<str> = label_of(fingerprint, sql).into();
        Self {
            fingerprint,
            slow_key: Key::from_parts(
                SLOW_STATEMENTS,
                vec![Label::new("statement", label.clone())],
            ),
            label,
            sql: sql.into(),
            normalized: collapse(sql).into(),
            other: false,
            recorded: Mutex::new(Recorded::default()),
            slow: AtomicU64::new(0),
            last_plan: Mutex::new(None),
        }
    }

    /// Where statements past the cap are counted; it keeps no text.
    fn other() -> Self {
        let label: Arc<str> = OTHER.into();
        Self {
            other: true,
            slow_key: Key::from_parts(
                SLOW_STATEMENTS,
                vec![Label::new("statement", label.clone())],
            ),
            label,
            ..Self::new(0, "")
        }
    }

    fn stats(&self) -> StatementStats {
        let recorded = lock(&self.recorded);
        let sketch = &recorded.sketch;
        let quantile = |q| secs(sketch.quantile(q).ok().flatten().unwrap_or(0.0));
        let count = sketch.count() as u64;
        StatementStats {
            label: self.label.to_string(),
            sql: self.normalized.to_string(),
            count,
            mean: if count == 0 {
                Duration::ZERO
            } else {
                secs(sketch.sum().unwrap_or(0.0) / count as f64)
            },
            p50: quantile(0.5),
            p95: quantile(0.95),
            p99: quantile(0.99),
            max: secs(sketch.max().unwrap_or(0.0)),
            slow: self.slow.load(Ordering::Relaxed),
        }
    }
}

impl Default for Recorded {
    fn default() -> Self {
        Self {
            sketch: DDSketch::new(Config::defaults()),
            keys: Vec::new(),
        }
    }
}

impl Recorded {
    /// The duration histogram's key for `shard`, made on first use.
    fn key(&mut self, shard: &str, label: &Arc<str>) -> &Key {
        let at = match self.keys.iter().position(|(s, _)| &**s == shard) {
            Some(at) => at,
            None => {
                let key = Key::from_parts(
                    STATEMENT_DURATION,
                    vec![
                        Label::new("statement", label.clone()),
                        Label::new("shard", shard.to_owned()),
                    ],
                );
                self.keys.push((shard.into(), key));
                self.keys.len() - 1
            }
        };
        &self.keys[at].1
    }
}

// === statement text ===

/// `sql` with runs of whitespace collapsed to one space: the normalized form of a
/// parameterized statement.
pub fn collapse(sql: &str) -> String {
    sql.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The statement's stable fingerprint: the XXH3 (64 bits) of [`collapse`]`(sql)`, computed
/// without building it.
pub fn fingerprint(sql: &str) -> u64 {
    let mut hasher = Xxh3::new();
    for (i, word) in sql.split_whitespace().enumerate() {
        if i > 0 {
            hasher.update(b" ");
        }
        hasher.update(word.as_bytes());
    }
    hasher.digest()
}

/// The label of statement `sql` in metrics and `convoyctl queries`: its first words and
/// `#` with the top 32 bits of its [`fingerprint`] in hex, as `SELECT id, title FROM
/// #1f2e3d4c`.
pub fn statement_label(sql: &str) -> String {
    label_of(fingerprint(sql), sql)
}

/// The short id of statement `sql` in labels and `convoyctl queries`: `#` and the top 32
/// bits of its [`fingerprint`] in hex, as `#1f2e3d4c`.
pub fn statement_id(sql: &str) -> String {
    id_of(fingerprint(sql))
}

fn id_of(fingerprint: u64) -> String {
    format!("#{:08x}", fingerprint >> 32)
}

fn label_of(fingerprint: u64, sql: &str) -> String {
    let mut words = String::new();
    for word in sql.split_whitespace().take(LABEL_WORDS) {
        if !words.is_empty() {
            words.push(' ');
        }
        words.push_str(word);
    }
    if words.len() > LABEL_CHARS {
        let mut cut = LABEL_CHARS;
        while !words.is_char_boundary(cut) {
            cut -= 1;
        }
        words.truncate(cut);
    }
    format!("{words} {}", id_of(fingerprint))
}

// === the layer ===

/// A layer recording sqlx's statement and acquire events into `stats`, behind its own
/// filter: it sees only those events (TRACE, as the store's pools emit them) and the spans
/// that name a shard, whatever the log filter says.
///
/// Compose it beside the other layers, each with a filter of its own, as
/// `convoy_telemetry::init_with` builds its list:
///
/// ```no_run
/// use tracing_subscriber::prelude::*;
/// use tracing_subscriber::{EnvFilter, Layer, Registry, fmt};
///
/// let logs = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
/// let layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = vec![
///     fmt::layer().with_writer(std::io::stderr).with_filter(logs).boxed(),
///     convoy_store::query_stats::layer(convoy_store::QueryStats::global()).boxed(),
/// ];
/// let _ = tracing_subscriber::registry().with(layers).try_init();
/// ```
///
/// A filter given to the whole subscriber instead (`fmt().with_env_filter(..)`, or an
/// `EnvFilter` added with `.with(filter)`) disables the TRACE events before this layer
/// sees them, and nothing is recorded. Every other layer needs a filter of its own that
/// leaves out TRACE events (as the log and OpenTelemetry filters do), or it would see every
/// statement.
pub fn layer<S>(stats: QueryStats) -> impl Layer<S> + Send + Sync + 'static
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    StatementLayer { stats }.with_filter(StoreEvents)
}

/// [`layer`] over [`QueryStats::global`], boxed for the global subscriber: what a binary
/// with shards hands to `convoy_telemetry::TelemetryArgs::init_with`.
pub fn global_layer() -> Box<dyn Layer<Registry> + Send + Sync> {
    Box::new(layer(QueryStats::global()))
}

/// Admits sqlx's statement and acquire events (and `enabled!` checks for them), and spans
/// with a `db.namespace` field. Decided per call site, once.
struct StoreEvents;

impl StoreEvents {
    fn admits(meta: &Metadata<'_>) -> bool {
        if meta.is_span() {
            meta.fields().field("db.namespace").is_some()
        } else {
            matches!(meta.target(), STATEMENT_TARGET | ACQUIRE_TARGET)
        }
    }
}

impl<S> Filter<S> for StoreEvents {
    fn enabled(&self, meta: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        Self::admits(meta)
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if Self::admits(meta) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::TRACE)
    }
}

/// The shard and node a span names, kept in its extensions.
struct DbScope {
    shard: String,
    node: String,
}

struct StatementLayer {
    stats: QueryStats,
}

impl<S> Layer<S> for StatementLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let mut scope = ScopeFields::default();
        attrs.record(&mut scope);
        if let (Some(shard), Some(span)) = (scope.shard, ctx.span(id)) {
            span.extensions_mut().insert(DbScope {
                shard,
                node: scope.node.unwrap_or_else(|| UNKNOWN.to_owned()),
            });
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = EventFields {
            stats: &self.stats,
            statement: None,
            elapsed: None,
            acquired: None,
        };
        event.record(&mut fields);
        let with_scope = |f: &mut dyn FnMut(&str, &str)| {
            // Only spans naming a shard pass the filter, so the nearest one is ours.
            if let Some(span) = ctx.event_span(event) {
                for span in span.scope() {
                    if let Some(scope) = span.extensions().get::<DbScope>() {
                        return f(&scope.shard, &scope.node);
                    }
                }
            }
            f(UNKNOWN, UNKNOWN)
        };
        match fields {
            EventFields {
                statement: Some(statement),
                elapsed: Some(elapsed),
                ..
            } => with_scope(&mut |shard, _| self.stats.record(&statement, shard, elapsed)),
            EventFields {
                acquired: Some(acquired),
                ..
            } => with_scope(&mut |shard, node| {
                self.stats.inner.acquire.record(shard, node, acquired)
            }),
            _ => {}
        }
    }
}

/// A shard-naming span's fields.
#[derive(Default)]
struct ScopeFields {
    shard: Option<String>,
    node: Option<String>,
}

impl Visit for ScopeFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "db.namespace" => self.shard = Some(value.to_owned()),
            "convoy.node" => self.node = Some(value.to_owned()),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "db.namespace" => self.shard = Some(format!("{value:?}")),
            "convoy.node" => self.node = Some(format!("{value:?}")),
            _ => {}
        }
    }
}

/// An sqlx event's fields: the statement is resolved while its text is at hand.
struct EventFields<'a> {
    stats: &'a QueryStats,
    statement: Option<Arc<Statement>>,
    elapsed: Option<f64>,
    acquired: Option<f64>,
}

impl Visit for EventFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            // sqlx puts a statement of four words or fewer in `summary` alone; a longer one
            // gets a cut summary and its full text in `db.statement`, as "\n\n{sql}\n".
            "summary" if !value.ends_with(SUMMARY_CUT) => {
                self.statement = Some(self.stats.resolve(value));
            }
            "db.statement" if !value.is_empty() => {
                let sql = value
                    .strip_prefix("\n\n")
                    .and_then(|v| v.strip_suffix('\n'))
                    .unwrap_or(value);
                self.statement = Some(self.stats.resolve(sql));
            }
            _ => {}
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        match field.name() {
            "elapsed_secs" => self.elapsed = Some(value),
            // sqlx 0.8 spells it so; the fixed spelling too, should it be corrected.
            "aquired_after_secs" | "acquired_after_secs" => self.acquired = Some(value),
            _ => {}
        }
    }

    fn record_debug(&mut self, _: &Field, _: &dyn std::fmt::Debug) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::prelude::*;

    /// Emits what sqlx emits for one statement.
    fn statement_event(sql: &str, elapsed: Duration) {
        let summary = sql.split_whitespace().take(4).collect::<Vec<_>>().join(" ");
        let (summary, full) = if summary == sql {
            (summary, String::new())
        } else {
            (format!("{summary}{SUMMARY_CUT}"), format!("\n\n{sql}\n"))
        };
        tracing::trace!(
            target: "sqlx::query",
            summary,
            db.statement = full,
            rows_affected = 0u64,
            rows_returned = 1u64,
            ?elapsed,
            elapsed_secs = elapsed.as_secs_f64(),
        );
    }

    fn settings() -> QueryStatsSettings {
        QueryStatsSettings {
            slow_threshold: Duration::from_millis(100),
            max_statements: 3,
            plan_interval: Duration::from_secs(60),
            plan_queue: 2,
        }
    }

    #[test]
    fn labels_ignore_whitespace_and_are_stable() {
        let a = "SELECT id, title\n   FROM conversations WHERE team_id = $1";
        let b = "SELECT id, title FROM conversations WHERE team_id = $1";
        assert_eq!(fingerprint(a), fingerprint(b));
        assert_eq!(fingerprint(b), xxhash_rust::xxh3::xxh3_64(b.as_bytes()));
        assert_eq!(statement_label(a), statement_label(b));
        assert!(
            statement_label(b).starts_with("SELECT id, title FROM #"),
            "{}",
            statement_label(b)
        );
        assert_ne!(fingerprint(b), fingerprint("SELECT 1"));
        assert_eq!(statement_label("SELECT 1").len(), "SELECT 1 #".len() + 8);
    }

    #[test]
    fn statements_past_the_cap_fold_into_other() {
        let stats = QueryStats::new(settings());
        let _guard = tracing::subscriber::set_default(
            tracing_subscriber::registry().with(layer(stats.clone())),
        );
        for n in 0..5 {
            statement_event(
                &format!("SELECT {n} FROM t WHERE a = $1"),
                Duration::from_millis(1),
            );
        }
        statement_event("SELECT 0 FROM t WHERE a = $1", Duration::from_millis(1));
        let all = stats.snapshot();
        let labels: Vec<&str> = all.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(all.len(), 4, "three tracked and other: {labels:?}");
        assert_eq!(
            stats
                .statement("SELECT 0 FROM t WHERE a = $1")
                .unwrap()
                .count,
            2
        );
        let other = all.iter().find(|s| s.label == OTHER).unwrap();
        assert_eq!(other.count, 2);
    }

    #[test]
    fn short_and_long_statements_are_both_read_from_the_event() {
        let stats = QueryStats::new(settings());
        let _guard = tracing::subscriber::set_default(
            tracing_subscriber::registry().with(layer(stats.clone())),
        );
        statement_event("BEGIN", Duration::from_millis(2));
        statement_event(
            "SELECT  a,\n b FROM t WHERE x = $1 AND y = $2",
            Duration::from_millis(4),
        );
        assert_eq!(stats.statement("BEGIN").unwrap().count, 1);
        let long = stats
            .statement("SELECT a, b FROM t WHERE x = $1 AND y = $2")
            .unwrap();
        assert_eq!(long.sql, "SELECT a, b FROM t WHERE x = $1 AND y = $2");
        assert!(long.max >= Duration::from_millis(3), "{long:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn one_plan_per_statement_per_interval_and_a_full_queue_drops() {
        let stats = QueryStats::new(QueryStatsSettings {
            max_statements: 10,
            ..settings()
        });
        let _guard = tracing::subscriber::set_default(
            tracing_subscriber::registry().with(layer(stats.clone())),
        );
        let mut plans = stats.register_planner(UNKNOWN);
        let slow = Duration::from_millis(150);
        let sql = "UPDATE t SET a = $1 WHERE id = $2";
        for _ in 0..5 {
            statement_event(sql, slow);
        }
        assert_eq!(stats.statement(sql).unwrap().slow, 5);
        assert!(
            plans.try_recv().is_ok(),
            "the first slow run asks for a plan"
        );
        assert!(
            plans.try_recv().is_err(),
            "the others within the interval do not"
        );

        tokio::time::advance(Duration::from_secs(59)).await;
        statement_event(sql, slow);
        assert!(
            plans.try_recv().is_err(),
            "59 s later: still within the interval"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        statement_event(sql, slow);
        assert!(plans.try_recv().is_ok(), "60 s later: another plan");

        // Fast runs never ask; a queue of two takes two statements' requests, the third
        // is dropped, not waited for.
        statement_event("SELECT 1", Duration::from_millis(1));
        for n in 0..3 {
            statement_event(&format!("DELETE FROM t{n} WHERE id = $1"), slow);
        }
        assert_eq!(stats.plans_dropped(), 1);
        assert!(plans.try_recv().is_ok() && plans.try_recv().is_ok());
        assert!(plans.try_recv().is_err());
    }

    #[test]
    fn spans_naming_a_shard_attribute_statements_and_acquire_waits() {
        let stats = QueryStats::new(settings());
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _metrics = metrics::set_default_local_recorder(&recorder);
        let _guard = tracing::subscriber::set_default(
            tracing_subscriber::registry().with(layer(stats.clone())),
        );
        tracing::info_span!("postgresql", db.namespace = "shard-7", convoy.node = "replica-1")
            .in_scope(|| {
                tracing::trace!(target: "sqlx::pool::acquire", aquired_after_secs = 0.003, "acquired connection");
                statement_event("SELECT 1", Duration::from_millis(2));
            });
        statement_event("SELECT 1", Duration::from_millis(2));
        let label = statement_label("SELECT 1");
        let mut seen = Vec::new();
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            let labels: Vec<String> = key
                .key()
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            let samples = match value {
                metrics_util::debugging::DebugValue::Histogram(v) => v.len(),
                _ => 0,
            };
            seen.push((key.key().name().to_owned(), labels, samples));
        }
        seen.sort();
        assert_eq!(
            seen,
            vec![
                (
                    crate::pool_metrics::POOL_ACQUIRE_DURATION.to_owned(),
                    vec!["shard=shard-7".to_owned(), "node=replica-1".to_owned()],
                    1
                ),
                (
                    STATEMENT_DURATION.to_owned(),
                    vec![format!("statement={label}"), "shard=shard-7".to_owned()],
                    1
                ),
                (
                    STATEMENT_DURATION.to_owned(),
                    vec![format!("statement={label}"), "shard=unknown".to_owned()],
                    1
                ),
            ]
        );
    }
}
