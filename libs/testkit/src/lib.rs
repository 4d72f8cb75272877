//! Real, private servers for tests: PostgreSQL, Redis and etcd, each started
//! on free loopback ports (127.0.0.1) in its own temporary folder, and
//! stopped and deleted when its handle is dropped. And certificates for TLS tests
//! ([`certs`]).
//!
//! Not for production or shared environments: the servers are tuned for speed
//! over safety, trust every loopback client, and keep nothing after a test.
//! The programs must be installed (Debian: `postgresql`, `redis-server`,
//! `etcd-server`); a missing one gives [`Error::MissingBinary`] saying how.
//! When run as root, PostgreSQL programs run as the `postgres` OS user.
//!
//! ```no_run
//! # async fn demo() -> convoy_testkit::Result<()> {
//! let shards = convoy_testkit::start_postgres_shards(2).await?;
//! let redis = convoy_testkit::Redis::start().await?;
//! let etcd = convoy_testkit::Etcd::start().await?;
//! println!("{} {} {}", shards[0].dsn(), redis.url(), etcd.endpoint());
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

pub mod certs;
mod error;
mod etcd;
mod ports;
mod postgres;
mod process;
mod redis;

pub use error::{Error, Result};
pub use etcd::{ETCD_BIN_ENV, Etcd, is_healthy as etcd_is_healthy};
pub use ports::free_port;
pub use postgres::{DATABASE, PG_BIN_ENV, Postgres, start_postgres_shards};
pub use redis::{REDIS_BIN_ENV, Redis, answers_ping as redis_answers_ping};
