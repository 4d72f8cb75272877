//! convoyctl's commands, as functions that return data; `main.rs` only parses arguments and
//! prints: `status`, the fleet as etcd sees it, with each instance's gRPC health, and
//! `cache consistency`, the consistency sampler's fleet-wide tally, and `shards`, the shard
//! map with every node's health and lag, from the shard-router, `reshard`, an online
//! slot move followed to its end, `queries`, each shard's slowest statements and
//! sequentially scanned large tables, from Postgres' statistics, and `bench`, a load
//! scenario with its same-run baselines, and `import claude-code`, Claude Code transcripts
//! into conversations.

#![forbid(unsafe_code)]

pub mod access;
pub mod bench;
pub mod bench_sql;
pub mod cache;
pub mod claude_code;
pub mod import;
pub mod queries;
pub mod reshard;
pub mod shards;
pub mod status;
mod table;
pub mod token;
