//! convoy's public gRPC contract, generated from `proto/convoy/v1`.
//!
//! This crate holds only generated code, the descriptor set that servers publish through
//! reflection, and the few wire-level conventions every service shares (the consistency
//! token header, each method's idempotency, the bounds of an error status). Domain logic
//! lives in the services and the other libs.

#![forbid(unsafe_code)]

pub mod consistency;
pub mod errors;
pub mod methods;
pub mod names;

/// Package `convoy.v1`: every service, message and enum of the public API.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("convoy.v1");
}

/// The encoded `FileDescriptorSet` of every convoy proto (with its imports), for server
/// reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("convoy_descriptor");

/// Fully qualified gRPC service names, as health checks and reflection report them.
pub mod service_names {
    /// `convoy.v1.ConversationService`.
    pub const CONVERSATION: &str = "convoy.v1.ConversationService";
    /// `convoy.v1.CacheService`.
    pub const CACHE: &str = "convoy.v1.CacheService";
    /// `convoy.v1.ShardRouterService`.
    pub const SHARD_ROUTER: &str = "convoy.v1.ShardRouterService";
    /// `convoy.v1.AnalyticsService`.
    pub const ANALYTICS: &str = "convoy.v1.AnalyticsService";
}
