//! The gRPC plumbing every convoy service shares.
//!
//! Today: the server builder ([`server`]) that gives every service health checking, server
//! reflection, deadline enforcement, a shedding bulkhead ([`bulkhead`]), panic recovery
//! ([`panic`]) and an ordered graceful shutdown; and the deadline ([`deadline`]) that
//! travels as `grpc-timeout`. The client stack (retry budgets,
//! balancing, breakers) joins it here, so tonic stays behind this one seam.

#![forbid(unsafe_code)]

pub mod balance;
pub mod breaker;
pub mod bulkhead;
pub mod deadline;
pub mod endpoint;
pub mod panic;
pub mod propagation;
pub mod retry;
pub mod server;
pub mod shed_load;

pub use balance::{BalanceConfig, BalancedChannel, balanced_channel};
pub use breaker::{BreakerConfig, BreakerLayer, EjectionBudget, LocalTimeout};
pub use bulkhead::BulkheadLayer;
pub use deadline::{Deadline, DeadlineLayer};
pub use propagation::DeadlinePropagationLayer;
pub use retry::{RetryBudget, RetryConfig, RetryPolicy};
pub use server::{ServerBuilder, ServerConfig, ServerError};
