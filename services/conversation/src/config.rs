//! The conversation binary's configuration: flags with `CONVOY_*` environment fallbacks.
//!
//! Every default is declared here with the reason for its value. [`Config::summary`] prints
//! the effective configuration once at start-up, with passwords redacted.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use convoy_client::Discovery;
use convoy_discovery::{RegistrationArgs, ShardArgs};
use convoy_mesh::{LimitArgs, MeshTls, QueueArgs, ServerConfig, TlsArgs};
use convoy_store::PoolSettings;
use convoy_store::shard_map::redact_dsn;
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

    /// Where the shards are, and the pools to them.
    #[command(flatten)]
    pub shards: ShardArgs,

    /// Apply the schema migrations to every shard, then exit.
    #[arg(long, env = "CONVOY_MIGRATE_ONLY")]
    pub migrate_only: bool,

    /// Apply the schema migrations at start-up. Turn off where a separate job migrates
    /// (`--migrate-only`) and instances run without DDL rights.
    #[arg(long, env = "CONVOY_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate: bool,

    /// How long in-flight calls may drain at shutdown, in seconds. 20: below Kubernetes'
    /// default 30 s grace period.
    #[arg(long, env = "CONVOY_DRAIN_TIMEOUT_SECS", default_value_t = 20)]
    pub drain_timeout_secs: u64,

    /// Calls running at once before new ones queue, then are refused with
    /// RESOURCE_EXHAUSTED (the bulkhead, `convoy_mesh::bulkhead`).
    /// 256: a few times the database connections, so waiting calls stay bounded.
    #[arg(long, env = "CONVOY_MAX_CONCURRENT_CALLS", default_value_t = 256)]
    pub max_concurrent_calls: usize,

    /// The bulkhead's queue (`--max-queued-calls`, `--max-queue-wait-ms`).
    #[command(flatten)]
    pub queue: QueueArgs,

    /// Streams and authorization's buffered messages (`--max-streams`,
    /// `--max-streams-per-team`, `--stream-idle-timeout-ms`, `--client-stream-lifetime-s`,
    /// `--server-stream-lifetime-s`, `--auth-buffer-mib`, `--auth-read-timeout-ms`).
    #[command(flatten)]
    pub limits: LimitArgs,

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

    /// Longest a call to the cache tier may take, in milliseconds, before the read goes on
    /// to the database; a caller's shorter deadline wins (it travels as `grpc-timeout`).
    /// 100: a slow cache is a miss.
    #[arg(long, env = "CONVOY_CACHE_TIMEOUT_MS", default_value_t = 100)]
    pub cache_timeout_ms: u64,
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

    /// How long published outbox rows are kept (for inspection) before they are purged, in
    /// seconds. 3600: an hour of changes to look at after an incident. Rows a slot move in
    /// progress may still replay are kept past this (see `outbox_holds`).
    #[arg(long, env = "CONVOY_OUTBOX_RETENTION_SECS", default_value_t = 3600)]
    pub outbox_retention_secs: u64,

    /// How often old idempotency records and published outbox rows are purged, in seconds
    /// (at least 1). 600: the purge is one statement per shard and table; rows a little
    /// past their retention cost nothing.
    #[arg(long, env = "CONVOY_PURGE_INTERVAL_SECS", default_value_t = 600)]
    pub purge_interval_secs: u64,

    /// The invalidation bus's staleness bound (`--bus-stale-after-ms`), for the own L1.
    #[command(flatten)]
    pub bus: convoy_cache::subscriber::BusArgs,

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

    /// Mutual TLS with the fleet, for this server and its clients (`--tls-cert`,
    /// `--tls-key`, `--tls-ca`).
    #[command(flatten)]
    pub tls: TlsArgs,

    /// Who may call, and how often (`--auth-keys` or `--no-auth`, `--auth-token-file`,
    /// `--rate-limit-*`; see docs/security.md).
    #[command(flatten)]
    pub auth: convoy_auth::AuthArgs,
}

impl Config {
    /// Pool settings for every shard.
    pub fn pool_settings(&self) -> PoolSettings {
        self.shards.pool_settings("convoy-conversation")
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

    /// How long published outbox rows are kept.
    pub fn outbox_retention(&self) -> Duration {
        Duration::from_secs(self.outbox_retention_secs)
    }

    /// How often old rows are purged.
    pub fn purge_interval(&self) -> Duration {
        Duration::from_secs(self.purge_interval_secs.max(1))
    }

    /// Server settings, with `tls` (from [`Config::tls`], loaded once per process).
    pub fn server_config(&self, tls: Option<MeshTls>) -> ServerConfig {
        let config = self.queue.apply(ServerConfig {
            tls,
            drain_timeout: Duration::from_secs(self.drain_timeout_secs),
            reflection: self.reflection,
            max_concurrent_calls: self.max_concurrent_calls,
            ..ServerConfig::default()
        });
        self.limits.apply(config)
    }

    /// The effective configuration as one log-friendly line, without secrets.
    pub fn summary(&self) -> String {
        let shards = &self.shards;
        let dsns: Vec<String> = shards.shard_dsn.iter().map(|d| redact_dsn(d)).collect();
        format!(
            "listen={} shard_map={:?} shard_dsns={:?} pool_max_connections={} \
             pool_acquire_timeout_ms={} statement_timeout_ms={} slow_statement_ms={} \
             drain_timeout_secs={} \
             max_concurrent_calls={} reflection={} etcd_endpoints={:?} advertise_addr={:?} \
             zone={} registration_ttl_secs={} redis={} cache={:?} local_cache_mib={} \
             metrics_listen={:?} tls_cert={:?}",
            self.listen,
            shards.shard_map,
            dsns,
            shards.pool_max_connections,
            shards.pool_acquire_timeout_ms,
            shards.statement_timeout_ms,
            shards.slow_statement_ms,
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
            self.tls.tls_cert,
        )
    }
}
