//! convoy's cache layers, shared by the cache service and by every process that keeps an
//! L1: an in-process, byte-bounded L1 ([`l1`]) and Redis as L2 ([`l2`]).
//!
//! Both layers are *versioned*: an entry carries the version of the row it was filled
//! from, and each layer remembers, per key, the least version a later fill may store (raised
//! by newer sets and by invalidations). So a slow filler that read version 1 before a write
//! made version 2 cannot put version 1 back after the invalidation: its set is refused as
//! [`SetOutcome::Stale`]. Leases ([`lease`]) stop thundering herds; the invalidation bus
//! ([`bus`]) is a Redis stream next to L2, applied to L1s by [`subscriber`]. Not here: the
//! gRPC service.

#![forbid(unsafe_code)]

pub mod bus;
pub mod consistency;
pub mod entry;
pub mod l1;
pub mod l2;
pub mod lease;
pub mod subscriber;

pub use bus::BusMessage;
pub use entry::{Entry, SetOutcome, Version};
