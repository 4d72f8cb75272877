//! Per-method facts read from the contract itself: each RPC's `idempotency_level`.
//!
//! The retry layer may retry only methods the `.proto` marks NO_SIDE_EFFECTS or IDEMPOTENT
//! (gRFC A6), so the table is derived from the embedded descriptor set rather than written
//! by hand: a new RPC gets the right behaviour from its declaration.

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

fn table() -> &'static HashMap<String, Idempotency> {
    static TABLE: OnceLock<HashMap<String, Idempotency>> = OnceLock::new();
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
                    let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
                    table.insert(path, idempotency);
                }
            }
        }
        table
    })
}

/// The idempotency of the method at `path` (`/convoy.v1.ConversationService/GetConversation`).
pub fn idempotency(path: &str) -> Idempotency {
    table().get(path).copied().unwrap_or(Idempotency::Unknown)
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
}
