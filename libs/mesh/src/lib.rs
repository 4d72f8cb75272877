//! The gRPC plumbing every convoy service shares.
//!
//! Today: the server builder ([`server`]) that gives every service health checking, server
//! reflection, deadline enforcement and an ordered graceful shutdown; and the deadline
//! ([`deadline`]) that travels as `grpc-timeout`. The client stack (retry budgets,
//! balancing, breakers) joins it here, so tonic stays behind this one seam.

#![forbid(unsafe_code)]

pub mod deadline;
pub mod server;

pub use deadline::{Deadline, DeadlineLayer};
pub use server::{ServerBuilder, ServerConfig, ServerError};
