//! convoy's load generator, behind `convoyctl bench`: scenarios sent through the SDK users
//! use, open loop at a target rate (latency from each request's scheduled time, so a stall
//! counts for every request it delays) or closed loop (saturation), into HdrHistograms;
//! and the ceilings they are read against (bare tonic, raw Redis, direct SQL), driven the
//! same way in the same run.
//!
//! Modules: [`drive`] (offering load), [`record`] (what was measured), [`report`] (the
//! summary, for a person and as JSON), [`scenario`] (what each request does), [`seed`]
//! (the data set), [`baseline`] (the ceilings).

#![forbid(unsafe_code)]

pub mod baseline;
pub mod drive;
pub mod record;
pub mod report;
pub mod scenario;
pub mod seed;

pub use drive::{Mode, Op, Phases};
pub use record::{Outcome, Recorder};
pub use report::{Report, Summary};
pub use scenario::Scenario;
pub use seed::DataSet;
