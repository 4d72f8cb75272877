//! The span of one database operation, so a trace shows where a request's time went in
//! Postgres: named and attributed per the OpenTelemetry database conventions
//! (`db.system.name`, `db.namespace`), plus the node that answered.

use crate::replicas::Node;

/// A client span for an operation on `node` of shard `shard`; enter it, or instrument the
/// operation's future with it.
pub fn db_span(shard: &str, node: Node) -> tracing::Span {
    let node = match node {
        Node::Primary => "primary".to_owned(),
        Node::Replica(n) => format!("replica-{n}"),
    };
    tracing::info_span!(
        "postgresql",
        otel.kind = "client",
        db.system.name = "postgresql",
        db.namespace = shard,
        convoy.node = node,
    )
}
