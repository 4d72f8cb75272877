//! The analytics binary's configuration: flags with `CONVOY_*` environment fallbacks.
//!
//! Every default is declared here with the reason for its value.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use convoy_client::Discovery;
use convoy_discovery::{RegistrationArgs, ShardArgs};
use convoy_mesh::{LimitArgs, MeshTls, QueueArgs, ServerConfig, TlsArgs};
use convoy_telemetry::TelemetryArgs;

/// The name this service registers under in discovery.
pub const SERVICE_NAME: &str = "analytics";

/// The analytics service: aggregates over every shard, cached in the cache tier.
#[derive(Clone, Debug, Parser)]
#[command(name = "analytics", version, about)]
pub struct Config {
    /// Address for gRPC.
    #[arg(long, env = "CONVOY_LISTEN", default_value = "127.0.0.1:50081")]
    pub listen: SocketAddr,

    /// Where the shards are.
    #[command(flatten)]
    pub shards: ShardArgs,

    /// Longest time one shard may take to answer, in milliseconds, before the answer goes
    /// out without it (named in `missing_shards`). Also bounded by the call's deadline.
    /// 3000: an aggregate over a team's year of conversations is an index-only scan of
    /// well under a second; a shard slower than this is in trouble.
    #[arg(long, env = "CONVOY_SHARD_TIMEOUT_MS", default_value_t = 3000)]
    pub shard_timeout_ms: u64,

    /// Cache instances (`host:port`) for results, chosen per key by consistent hashing.
    /// None: when etcd is configured, the `cache` instances registered there (see
    /// `--cache-from-etcd`); otherwise every answer is computed.
    #[arg(long = "cache-addr", env = "CONVOY_CACHE_ADDRS", value_delimiter = ',')]
    pub cache_addr: Vec<String>,

    /// Without `--cache-addr`, find cache instances in etcd (when `--etcd-endpoint` is set).
    #[arg(long, env = "CONVOY_CACHE_FROM_ETCD", default_value_t = true, action = clap::ArgAction::Set)]
    pub cache_from_etcd: bool,

    /// Longest a call to the cache tier may take, in milliseconds, before the answer is
    /// computed instead; a caller's shorter deadline wins. 100: a slow cache is a miss (the
    /// conversation service's flag of the same name).
    #[arg(long, env = "CONVOY_CACHE_TIMEOUT_MS", default_value_t = 100)]
    pub cache_timeout_ms: u64,

    /// How long a team's cached answer may be served, in seconds. 60: writes invalidate a
    /// team's answers through the bus; the TTL bounds what a fill that raced a write (it
    /// read before the write, stored after the invalidation) can leave behind.
    #[arg(long, env = "CONVOY_ANALYTICS_TEAM_TTL_SECS", default_value_t = 60)]
    pub team_ttl_secs: u64,

    /// How long a cached fleet overview may be served, in seconds. 30: every write in the
    /// fleet changes it, so it is not invalidated by writes, only aged out.
    #[arg(long, env = "CONVOY_ANALYTICS_FLEET_TTL_SECS", default_value_t = 30)]
    pub fleet_ttl_secs: u64,

    /// The price table GetUsage estimates cost with (TOML: dollars per million tokens per
    /// model; see `infra/local/prices.toml`). Without one every model is unpriced.
    #[arg(long, env = "CONVOY_PRICES")]
    pub prices: Option<std::path::PathBuf>,

    /// How long in-flight calls may drain at shutdown, in seconds. 20: below Kubernetes'
    /// default 30 s grace period.
    #[arg(long, env = "CONVOY_DRAIN_TIMEOUT_SECS", default_value_t = 20)]
    pub drain_timeout_secs: u64,

    /// Calls running at once before new ones queue, then are refused with
    /// RESOURCE_EXHAUSTED (the bulkhead, `convoy_mesh::bulkhead`).
    /// 64: each call holds a connection on every shard it reads.
    #[arg(long, env = "CONVOY_MAX_CONCURRENT_CALLS", default_value_t = 64)]
    pub max_concurrent_calls: usize,

    /// The bulkhead's queue (`--max-queued-calls`, `--max-queue-wait-ms`).
    #[command(flatten)]
    pub queue: QueueArgs,

    /// Streams and authorization's buffered messages (`--max-streams`,
    /// `--max-streams-per-team`, `--stream-idle-timeout-ms`, `--client-stream-lifetime-s`,
    /// `--server-stream-lifetime-s`, `--auth-buffer-mib`, `--auth-read-timeout-ms`).
    #[command(flatten)]
    pub limits: LimitArgs,

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
    /// Longest time one shard may take.
    pub fn shard_timeout(&self) -> Duration {
        Duration::from_millis(self.shard_timeout_ms)
    }

    /// Where the cache tier's instances are found, if answers are cached.
    pub fn cache_discovery(&self) -> Option<Discovery> {
        if !self.cache_addr.is_empty() {
            return Some(Discovery::Static(self.cache_addr.clone()));
        }
        self.registration
            .etcd_config()
            .filter(|_| self.cache_from_etcd)
            .map(Discovery::Etcd)
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
}
