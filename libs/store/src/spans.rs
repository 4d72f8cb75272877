//! The span of one database operation, so a trace shows where a request's time went in
//! Postgres: named and attributed per the OpenTelemetry database conventions
//! (`db.system.name`, `db.namespace`), plus the node that answered.

use crate::replicas::Node;

/// A client span for an operation on `node` of shard `shard`; enter it, or instrument the
/// operation's future with it.
pub fn db_span(shard: &str, node: Node) -> tracing::Span {
    tracing::info_span!(
        "postgresql",
        otel.kind = "client",
        db.system.name = "postgresql",
        db.namespace = shard,
        convoy.node = %node,
    )
}

/// A span naming `shard` and `node` for the statements the store runs on its own (node
/// checks), so [`crate::query_stats`] attributes them; TRACE, so neither the logs nor the
/// trace export see it.
pub(crate) fn check_span(shard: &str, node: Node) -> tracing::Span {
    tracing::trace_span!(
        "convoy_store.check",
        db.namespace = shard,
        convoy.node = %node,
    )
}
