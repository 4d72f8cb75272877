//! Service discovery over etcd: each instance registers its address under a lease that it keeps
//! alive, and balancers watch a service's instances as a stream of [`Change`]s.
//!
//! - [`Registrar::register`] puts `services/<service>/<instance>` under a lease and keeps it
//!   alive, re-registering by itself after etcd outages; [`Registration::deregister`] revokes the
//!   lease on graceful shutdown.
//! - [`watch_service`] lists then watches one service and survives etcd restarts and
//!   compaction without losing or repeating changes; [`static_endpoints`] stands in for it in
//!   tests and local runs.
//! - [`list_services`] reads everything registered once, for operator tools.
//!
//! Values are JSON in the layout of etcd's own gRPC naming resolver (see [`Endpoint`]), so
//! `etcdctl` and Go clients read them too. Not here: turning endpoints into channels and
//! balancing between them (the mesh's job).
//!
//! [`Change`]: tower::discover::Change

#![forbid(unsafe_code)]

pub mod args;
mod backoff;
pub mod config;
mod connection;
pub mod endpoint;
pub mod keys;
pub mod leader;
mod list;
pub mod records;
pub mod registration;
mod service_set;
pub mod shard_map;
pub mod shards;
mod static_list;
mod watch;

use std::time::Duration;

use futures::stream::BoxStream;
use tower::discover::Change;

pub use args::{EtcdTlsArgs, RegistrationArgs};
pub use config::{Backoff, EtcdConfig, EtcdTls, RegistrationConfig};
pub use endpoint::{Endpoint, Metadata};
pub use list::list_services;
pub use registration::{Registrar, Registration, RegistrationStatus};
pub use shards::{ShardArgs, Shards, ShardsError};
pub use static_list::static_endpoints;
pub use watch::watch_service;

/// The changes to one service's set of instances, keyed by instance id, as a balancer consumes
/// them: an `Insert` of a known id replaces its endpoint.
pub type Changes = BoxStream<'static, Result<Change<String, Endpoint>>>;

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The error type boxed inside [`Error::Etcd`].
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Everything that can go wrong in discovery.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A service name or instance id cannot be used as one segment of an etcd key.
    #[error("invalid {what} {name:?}: it must be non-empty and contain no '/'")]
    InvalidName {
        /// Which name: `service` or `instance`.
        what: &'static str,
        /// The name given.
        name: String,
    },
    /// The configuration can never work (no etcd endpoints, an endpoint URL that does not
    /// parse, a lease TTL under a second, ...); retrying will not help.
    #[error("invalid discovery configuration: {0}")]
    InvalidConfig(String),
    /// An etcd request failed or etcd ended a stream; usually transient.
    #[error("etcd {op} failed: {source}")]
    Etcd {
        /// What was being done.
        op: &'static str,
        /// Why it failed.
        source: BoxError,
    },
    /// An etcd request got no answer in time; etcd is down or unreachable.
    #[error("etcd {op} got no answer within {after:?}")]
    Timeout {
        /// What was being done.
        op: &'static str,
        /// How long it waited.
        after: Duration,
    },
    /// A value is not an endpoint in etcd's naming-resolver JSON
    /// (`{"Op":0,"Addr":"host:port","Metadata":{...}}`).
    #[error(
        "invalid endpoint JSON (expected {{\"Op\":0,\"Addr\":\"host:port\",\"Metadata\":{{...}}}}): {0}"
    )]
    Decode(#[from] serde_json::Error),
}

// === impl Error ===

impl Error {
    /// Whether trying again later may succeed: true for etcd failures and timeouts, false
    /// for invalid names, configuration and values.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Etcd { .. } | Error::Timeout { .. })
    }

    /// An [`Error::Etcd`] for `op`.
    pub(crate) fn etcd(op: &'static str, source: impl Into<BoxError>) -> Error {
        Error::Etcd {
            op,
            source: source.into(),
        }
    }
}
