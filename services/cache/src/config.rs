//! The cache binary's configuration: flags with `CONVOY_*` environment fallbacks.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use convoy_discovery::RegistrationArgs;
use convoy_mesh::{LimitArgs, MeshTls, QueueArgs, ServerConfig, TlsArgs};
use convoy_telemetry::TelemetryArgs;

/// The name this service registers under in discovery.
pub const SERVICE_NAME: &str = "cache";

/// The cache service: an in-process L1 in front of Redis, kept coherent by the bus.
#[derive(Clone, Debug, Parser)]
#[command(name = "cache", version, about)]
pub struct Config {
    /// Address for gRPC.
    #[arg(long, env = "CONVOY_LISTEN", default_value = "127.0.0.1:50061")]
    pub listen: SocketAddr,

    /// Redis (`redis://host:port`): L2, leases and the invalidation bus.
    #[arg(long, env = "CONVOY_REDIS_URL")]
    pub redis_url: String,

    /// L1 capacity in MiB. 64: the hot set of a team's conversations, per instance.
    #[arg(long, env = "CONVOY_L1_CAPACITY_MIB", default_value_t = 64)]
    pub l1_capacity_mib: u64,

    /// Longest TTL, in seconds, for any entry in either layer. 300.
    #[arg(long, env = "CONVOY_MAX_TTL_SECS", default_value_t = 300)]
    pub max_ttl_secs: u64,

    /// How often an idle bus subscriber polls, in milliseconds. 10: invalidations reach
    /// L1 within about that of their publication.
    #[arg(long, env = "CONVOY_BUS_POLL_MS", default_value_t = 10)]
    pub bus_poll_ms: u64,

    /// The invalidation bus's staleness bound (`--bus-stale-after-ms`): past it neither
    /// layer serves.
    #[command(flatten)]
    pub bus: convoy_cache::subscriber::BusArgs,

    /// Fault injection for coherence tests: the share of bus messages the L1's subscriber
    /// drops (it must notice each as a gap and flush). 0 in production.
    #[arg(long, hide = true, default_value_t = 0.0)]
    pub fault_bus_drop_ratio: f64,

    /// Registration in etcd.
    #[command(flatten)]
    pub registration: RegistrationArgs,

    /// Calls running at once before new ones queue (see `convoy_mesh::bulkhead`). 1024:
    /// cache calls are short.
    #[arg(long, env = "CONVOY_MAX_CONCURRENT_CALLS", default_value_t = 1024)]
    pub max_concurrent_calls: usize,

    /// The bulkhead's queue (`--max-queued-calls`, `--max-queue-wait-ms`).
    #[command(flatten)]
    pub queue: QueueArgs,

    /// Streams and authorization's buffered messages (`--max-streams`,
    /// `--max-streams-per-team`, `--stream-idle-timeout-ms`, `--client-stream-lifetime-s`,
    /// `--server-stream-lifetime-s`, `--auth-buffer-mib`, `--auth-read-timeout-ms`).
    #[command(flatten)]
    pub limits: LimitArgs,

    /// Logs and metrics (`--log-format`, `--metrics-listen`).
    #[command(flatten)]
    pub telemetry: TelemetryArgs,

    /// Mutual TLS with the fleet (`--tls-cert`, `--tls-key`, `--tls-ca`).
    #[command(flatten)]
    pub tls: TlsArgs,

    /// Who may call, and how often (`--auth-keys` or `--no-auth`, `--auth-token-file`,
    /// `--rate-limit-*`; see docs/security.md).
    #[command(flatten)]
    pub auth: convoy_auth::AuthArgs,
}

impl Config {
    /// Server settings, with `tls` (from [`Config::tls`], loaded once per process).
    pub fn server_config(&self, tls: Option<MeshTls>) -> ServerConfig {
        let config = self.queue.apply(ServerConfig {
            tls,
            max_concurrent_calls: self.max_concurrent_calls,
            ..ServerConfig::default()
        });
        self.limits.apply(config)
    }

    /// The longest TTL.
    pub fn max_ttl(&self) -> Duration {
        Duration::from_secs(self.max_ttl_secs.max(1))
    }
}
