//! The gRPC plumbing every convoy service shares, so tonic stays behind this one seam.
//!
//! Server side: the server builder ([`server`]) gives every service RED metrics per method
//! ([`metrics`]), health checking, reflection, deadline enforcement ([`deadline`]), a
//! bulkhead with a short queue for unary calls ([`bulkhead`]), limits per team and per
//! instance, an idle timeout and a lifetime for streams ([`streams`]), panic recovery
//! ([`panic`]) and an ordered graceful shutdown; [`health`] adds named statuses that follow
//! a condition. Client side, outermost first: RED metrics per logical call ([`metrics`]),
//! deadline propagation ([`propagation`]), retries paid from a budget ([`retry`]), p2c
//! balancing over discovered endpoints ([`balance`], [`shed_load`]), a circuit breaker
//! ([`breaker`]) and a connection-aware endpoint ([`endpoint`]). Both sides speak mutual TLS
//! when given certificate files ([`tls`], reloaded as they change).
//!
//! Every layer reports its state through the `metrics` facade (the exporter is the
//! service's choice, see `convoy-telemetry`): `convoy_rpc_server_duration_seconds` and
//! `convoy_rpc_client_duration_seconds` (histograms by `rpc_service`, `rpc_method`,
//! `rpc_grpc_status_code`), `convoy_client_requests_total`,
//! `convoy_client_retries_total{budget}`, `convoy_breaker_transitions_total{transition}`,
//! `convoy_breaker_state{endpoint}`, `convoy_server_shed_total{reason}`,
//! `convoy_server_in_flight`, `convoy_server_queued`, `convoy_server_streams`,
//! `convoy_server_streams_refused_total{limit}`, `convoy_server_streams_ended_total{reason}`,
//! `convoy_client_endpoint_updates_total{change}`, `convoy_client_failfast_total`,
//! `convoy_client_reconnects_total`, `convoy_tls_reloads_total{outcome}`,
//! `convoy_tls_handshake_failures_total`.

#![forbid(unsafe_code)]

pub mod balance;
pub mod breaker;
pub mod bulkhead;
pub mod deadline;
pub mod endpoint;
pub mod health;
pub mod keyed;
pub mod metrics;
pub mod panic;
pub mod propagation;
pub mod retry;
pub mod server;
pub mod shed_load;
pub mod streams;
pub mod tls;
pub mod trace;

pub use balance::{BalanceConfig, BalancedChannel, balanced_channel};
pub use breaker::{BreakerConfig, BreakerLayer, EjectionBudget, LocalTimeout};
pub use bulkhead::{BulkheadConfig, BulkheadLayer};
pub use deadline::{Deadline, DeadlineLayer};
pub use keyed::{KeyedChannel, KeyedConfig, RouteKey};
pub use metrics::{RpcCall, RpcMetricsLayer};
pub use propagation::DeadlinePropagationLayer;
pub use retry::{RetryBudget, RetryConfig, RetryPolicy};
pub use server::{LimitArgs, QueueArgs, ServerBuilder, ServerConfig, ServerError};
pub use streams::{StreamArgs, StreamsConfig, StreamsLayer};
pub use tls::{MeshTls, TlsArgs};
pub use trace::TraceLayer;
