//! Per-method facts read from the contract itself: each RPC's `idempotency_level` and
//! whether its requests or responses stream.
//!
//! The retry layer may retry only methods the `.proto` marks NO_SIDE_EFFECTS or IDEMPOTENT
//! (gRFC A6), and the server keeps streams apart from unary calls (they have limits of their
//! own), so the table is derived from the embedded descriptor set rather than written by
//! hand: a new RPC gets the right behaviour from its declaration.

use std::collections::HashMap;
use std::sync::OnceLock;

use prost::Message;
use prost_types::FileDescriptorSet;
use prost_types::method_options::IdempotencyLevel;

/// Whether a method may be sent twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Idempotency {
    /// Reads: safe to retry and to hedge.
    NoSideEffects,
    /// Writes whose repetition has the same effect: safe to retry.
    Idempotent,
    /// Anything else, and methods this table does not know: never retried.
    Unknown,
}

impl Idempotency {
    /// True when a failed attempt may be sent again.
    pub fn retryable(self) -> bool {
        matches!(self, Self::NoSideEffects | Self::Idempotent)
    }
}

/// Which sides of a method stream, as its `.proto` declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// One request, one response; also what this table answers for methods it does not
    /// know (health checks, typos).
    Unary,
    /// The client streams requests, the server answers once.
    ClientStreaming,
    /// One request, a stream of responses.
    ServerStreaming,
    /// Both sides stream.
    Bidi,
}

impl Shape {
    /// Whether either side streams: a call that may stay open as long as its peers like.
    pub fn is_streaming(self) -> bool {
        self != Self::Unary
    }

    /// Whether the client sends a stream of requests.
    pub fn client_streams(self) -> bool {
        matches!(self, Self::ClientStreaming | Self::Bidi)
    }

    /// Whether the server answers with a stream of responses.
    pub fn server_streams(self) -> bool {
        matches!(self, Self::ServerStreaming | Self::Bidi)
    }
}

/// What the table knows of one method.
#[derive(Clone, Copy, Debug)]
struct Facts {
    idempotency: Idempotency,
    shape: Shape,
}

fn table() -> &'static HashMap<String, Facts> {
    static TABLE: OnceLock<HashMap<String, Facts>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let set = FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET)
            .expect("the embedded descriptor set decodes");
        let mut table = HashMap::new();
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    let level = method
                        .options
                        .as_ref()
                        .map(|o| o.idempotency_level())
                        .unwrap_or(IdempotencyLevel::IdempotencyUnknown);
                    let idempotency = match level {
                        IdempotencyLevel::NoSideEffects => Idempotency::NoSideEffects,
                        IdempotencyLevel::Idempotent => Idempotency::Idempotent,
                        IdempotencyLevel::IdempotencyUnknown => Idempotency::Unknown,
                    };
                    let shape = match (method.client_streaming(), method.server_streaming()) {
                        (false, false) => Shape::Unary,
                        (true, false) => Shape::ClientStreaming,
                        (false, true) => Shape::ServerStreaming,
                        (true, true) => Shape::Bidi,
                    };
                    let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
                    table.insert(path, Facts { idempotency, shape });
                }
            }
        }
        table
    })
}

/// The idempotency of the method at `path` (`/convoy.v1.ConversationService/GetConversation`).
pub fn idempotency(path: &str) -> Idempotency {
    table()
        .get(path)
        .map_or(Idempotency::Unknown, |f| f.idempotency)
}

/// The shape of the method at `path`; [`Shape::Unary`] for a path outside the contract.
pub fn shape(path: &str) -> Shape {
    table().get(path).map_or(Shape::Unary, |f| f.shape)
}

/// Every method path of the contract.
pub fn all_methods() -> impl Iterator<Item = &'static str> {
    table().keys().map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_come_from_the_proto_declarations() {
        assert_eq!(
            idempotency("/convoy.v1.ConversationService/GetConversation"),
            Idempotency::NoSideEffects
        );
        assert_eq!(
            idempotency("/convoy.v1.ConversationService/CreateConversation"),
            Idempotency::Idempotent
        );
        assert_eq!(
            idempotency("/convoy.v1.ConversationService/AppendEvents"),
            Idempotency::Unknown
        );
        assert_eq!(idempotency("/no.Such/Method"), Idempotency::Unknown);
        assert!(!Idempotency::Unknown.retryable());
        // Every service of the contract is in the table.
        for service in [
            "ConversationService",
            "CacheService",
            "ShardRouterService",
            "AnalyticsService",
        ] {
            assert!(all_methods().any(|m| m.starts_with(&format!("/convoy.v1.{service}/"))));
        }
    }

    #[test]
    fn shapes_come_from_the_proto_declarations() {
        assert_eq!(
            shape("/convoy.v1.ConversationService/GetConversation"),
            Shape::Unary
        );
        assert_eq!(
            shape("/convoy.v1.IngestService/IngestEvents"),
            Shape::ClientStreaming
        );
        assert_eq!(
            shape("/convoy.v1.WatchService/WatchConversation"),
            Shape::ServerStreaming
        );
        assert_eq!(
            shape("/convoy.v1.ShardRouterService/WatchShardMap"),
            Shape::ServerStreaming
        );
        assert_eq!(shape("/no.Such/Method"), Shape::Unary);
        assert!(
            Shape::ClientStreaming.client_streams() && !Shape::ClientStreaming.server_streams()
        );
        assert!(Shape::Bidi.client_streams() && Shape::Bidi.server_streams());
        assert!(!Shape::Unary.is_streaming());
    }
}
