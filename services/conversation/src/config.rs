//! The conversation binary's configuration: flags with `CONVOY_*` environment fallbacks.
//!
//! Every default is declared here with the reason for its value. [`Config::summary`] prints
//! the effective configuration once at start-up, with passwords redacted.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use convoy_client::Discovery;
use convoy_discovery::RegistrationArgs;
use convoy_mesh::ServerConfig;
use convoy_store::shard_map::redact_dsn;
use convoy_store::{PoolSettings, ShardMap, StoreError};
use convoy_telemetry::TelemetryArgs;

/// The name this service registers under in discovery.
pub const SERVICE_NAME: &str = "conversation";

/// The conversation service: convoy's system of record over sharded PostgreSQL.
#[derive(Clone, Debug, Parser)]
#[command(name = "conversation", version, about)]
pub struct Config {
    /// Address for gRPC.
    #[arg(long, env = "CONVOY_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Shard map file (TOML: epoch, and shards with id, primary, replicas, slots).
    #[arg(long, env = "CONVOY_SHARD_MAP", conflicts_with = "shard_dsn")]
    pub shard_map: Option<PathBuf>,

    /// Primary DSN of each shard, in order; slots are split evenly over them. Repeat the
    /// flag, or separate with commas in the environment variable.
    #[arg(long = "shard-dsn", env = "CONVOY_SHARD_DSNS", value_delimiter = ',')]
    pub shard_dsn: Vec<String>,

    /// Apply the schema migrations to every shard, then exit.
    #[arg(long, env = "CONVOY_MIGRATE_ONLY")]
    pub migrate_only: bool,

    /// Apply the schema migrations at start-up. Turn off where a separate job migrates
    /// (`--migrate-only`) and instances run without DDL rights.
    #[arg(long, env = "CONVOY_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate: bool,

    /// Most connections per shard. 16: enough for two cores' worth of backends plus I/O
    /// waits; raise with the shard's core count.
    #[arg(long, env = "CONVOY_POOL_MAX_CONNECTIONS", default_value_t = 16)]
    pub pool_max_connections: u32,

    /// Longest wait for a pooled connection, in milliseconds, before UNAVAILABLE. 2000:
    /// fail fast when a shard is down (sqlx's default is 30 s).
    #[arg(long, env = "CONVOY_POOL_ACQUIRE_TIMEOUT_MS", default_value_t = 2000)]
    pub pool_acquire_timeout_ms: u64,

    /// Postgres statement_timeout, in milliseconds. 5000: well above any indexed query.
    #[arg(long, env = "CONVOY_STATEMENT_TIMEOUT_MS", default_value_t = 5000)]
    pub statement_timeout_ms: u64,

    /// How long in-flight calls may drain at shutdown, in seconds. 20: below Kubernetes'
    /// default 30 s grace period.
    #[arg(long, env = "CONVOY_DRAIN_TIMEOUT_SECS", default_value_t = 20)]
    pub drain_timeout_secs: u64,

    /// Calls in flight before new ones are shed with RESOURCE_EXHAUSTED (the bulkhead).
    /// 256: a few times the database connections, so waiting calls stay bounded.
    #[arg(long, env = "CONVOY_MAX_CONCURRENT_CALLS", default_value_t = 256)]
    pub max_concurrent_calls: usize,

    /// Redis of the cache tier (`redis://host:port`): the outbox relay publishes committed
    /// changes on its invalidation bus. None: no relay (writes still record their outbox
    /// rows, and any instance with Redis publishes them).
    #[arg(long, env = "CONVOY_REDIS_URL")]
    pub redis_url: Option<String>,

    /// Cache instances (`host:port`) for reads, chosen per key by consistent hashing.
    /// None: when etcd is configured, the `cache` instances registered there (see
    /// `--cache-from-etcd`); otherwise reads go to the primary.
    #[arg(long = "cache-addr", env = "CONVOY_CACHE_ADDRS", value_delimiter = ',')]
    pub cache_addr: Vec<String>,

    /// Without `--cache-addr`, find cache instances in etcd (when `--etcd-endpoint` is set).
    #[arg(long, env = "CONVOY_CACHE_FROM_ETCD", default_value_t = true, action = clap::ArgAction::Set)]
    pub cache_from_etcd: bool,

    /// This instance's own L1 for hot conversations, in MiB; 0 turns it off. 32. It needs
    /// `--redis-url`: it is kept coherent by the invalidation bus.
    #[arg(long, env = "CONVOY_LOCAL_CACHE_MIB", default_value_t = 32)]
    pub local_cache_mib: u64,

    /// How often the own L1's idle bus subscriber polls, in milliseconds. 10.
    #[arg(long, env = "CONVOY_BUS_POLL_MS", default_value_t = 10)]
    pub bus_poll_ms: u64,

    /// Share of acknowledged writes the consistency sampler re-reads from every cache layer
    /// and the primary (see `--consistency-check-after-ms`). 0.01: enough for the nines of a
    /// busy fleet at a cost of a few reads per hundred writes. Needs `--redis-url`.
    #[arg(long, env = "CONVOY_CONSISTENCY_SAMPLE_RATIO", default_value_t = 0.01)]
    pub consistency_sample_ratio: f64,

    /// When, after a sampled write's acknowledgement, it is checked, in milliseconds.
    /// 1000 and 10000: "consistent within 1 s" and "within 10 s".
    #[arg(
        long = "consistency-check-after-ms",
        env = "CONVOY_CONSISTENCY_CHECK_AFTER_MS",
        value_delimiter = ',',
        default_values_t = [1000, 10000]
    )]
    pub consistency_check_after_ms: Vec<u64>,

    /// Take the shard map from etcd (where the shard-router keeps it) instead of
    /// `--shard-map`/`--shard-dsn`; needs `--etcd-endpoint`. Read at start-up: a new map
    /// takes effect at the next start until services follow it live.
    #[arg(long, env = "CONVOY_SHARD_MAP_FROM_ETCD")]
    pub shard_map_from_etcd: bool,

    /// Fault injection for coherence tests: the share of bus messages the own L1's
    /// subscriber drops (it must notice each as a gap and flush). 0 in production.
    #[arg(long, hide = true, default_value_t = 0.0)]
    pub fault_bus_drop_ratio: f64,

    /// Fault injection for coherence tests: run no outbox relay, as if this instance always
    /// died between a commit and its publication (other instances' relays deliver).
    #[arg(long, hide = true)]
    pub fault_no_relay: bool,

    /// Registration in etcd.
    #[command(flatten)]
    pub registration: RegistrationArgs,

    /// Serve gRPC reflection (for grpcurl and other stock clients).
    #[arg(long, env = "CONVOY_REFLECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub reflection: bool,

    /// Logs and metrics (`--log-format`, `--metrics-listen`).
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

impl Config {
    /// The shard map from `--shard-map` or `--shard-dsn`.
    pub fn shard_map(&self) -> anyhow::Result<ShardMap> {
        match &self.shard_map {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("reading shard map {}: {e}", path.display()))?;
                Ok(ShardMap::from_toml(&text).map_err(StoreError::from)?)
            }
            None if self.shard_dsn.is_empty() => anyhow::bail!(
                "no shards configured: pass --shard-dsn (or CONVOY_SHARD_DSNS) or --shard-map"
            ),
            None => Ok(ShardMap::evenly(&self.shard_dsn).map_err(StoreError::from)?),
        }
    }

    /// Pool settings for every shard.
    pub fn pool_settings(&self) -> PoolSettings {
        PoolSettings {
            max_connections: self.pool_max_connections,
            acquire_timeout: Duration::from_millis(self.pool_acquire_timeout_ms),
            statement_timeout: Duration::from_millis(self.statement_timeout_ms),
            application_name: "convoy-conversation".into(),
            ..PoolSettings::default()
        }
    }

    /// Where the cache tier's instances are found, if reads go through it.
    pub fn cache_discovery(&self) -> Option<Discovery> {
        if !self.cache_addr.is_empty() {
            return Some(Discovery::Static(self.cache_addr.clone()));
        }
        self.registration
            .etcd_config()
            .filter(|_| self.cache_from_etcd)
            .map(Discovery::Etcd)
    }

    /// Server settings.
    pub fn server_config(&self) -> ServerConfig {
        ServerConfig {
            drain_timeout: Duration::from_secs(self.drain_timeout_secs),
            reflection: self.reflection,
            max_concurrent_calls: self.max_concurrent_calls,
            ..ServerConfig::default()
        }
    }

    /// The effective configuration as one log-friendly line, without secrets.
    pub fn summary(&self) -> String {
        let dsns: Vec<String> = self.shard_dsn.iter().map(|d| redact_dsn(d)).collect();
        format!(
            "listen={} shard_map={:?} shard_dsns={:?} pool_max_connections={} \
             pool_acquire_timeout_ms={} statement_timeout_ms={} drain_timeout_secs={} \
             max_concurrent_calls={} reflection={} etcd_endpoints={:?} advertise_addr={:?} \
             zone={} registration_ttl_secs={} redis={} cache={:?} local_cache_mib={} \
             metrics_listen={:?}",
            self.listen,
            self.shard_map,
            dsns,
            self.pool_max_connections,
            self.pool_acquire_timeout_ms,
            self.statement_timeout_ms,
            self.drain_timeout_secs,
            self.max_concurrent_calls,
            self.reflection,
            self.registration.etcd_endpoints,
            self.registration.advertise_addr,
            self.registration.zone,
            self.registration.registration_ttl_secs,
            self.redis_url.as_deref().map_or("none", |_| "set"),
            self.cache_discovery(),
            self.local_cache_mib,
            self.telemetry.metrics_listen,
        )
    }
}
