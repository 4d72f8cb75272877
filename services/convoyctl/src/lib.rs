//! convoyctl's commands, as functions that return data; `main.rs` only parses arguments and
//! prints. Today: `status`, the fleet as etcd sees it, with each instance's gRPC health.

#![forbid(unsafe_code)]

pub mod status;
