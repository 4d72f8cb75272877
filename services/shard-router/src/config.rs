//! The shard-router binary's configuration: flags with `CONVOY_*` environment fallbacks.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use convoy_discovery::RegistrationArgs;
use convoy_mesh::{LimitArgs, MeshTls, ServerConfig, TlsArgs};
use convoy_store::{ShardMap, StoreError};
use convoy_telemetry::TelemetryArgs;

/// The name this service registers under in discovery.
pub const SERVICE_NAME: &str = "shard-router";

/// The shard-router: owns the shard map in etcd and watches the shards' health and lag.
#[derive(Clone, Debug, Parser)]
#[command(name = "shard-router", version, about)]
pub struct Config {
    /// Address for gRPC.
    #[arg(long, env = "CONVOY_LISTEN", default_value = "127.0.0.1:50071")]
    pub listen: SocketAddr,

    /// The map to publish when etcd holds none yet (a TOML shard map); ignored once one is
    /// published: the map in etcd is the truth.
    #[arg(long, env = "CONVOY_SHARD_MAP")]
    pub shard_map: Option<PathBuf>,

    /// Publish the servers (addresses) of `--shard-map` over a stored map whose servers
    /// differ, as the next epoch: for fleets whose configuration file knows the addresses,
    /// like the local one, whose ports may change between runs. The placement of slots is
    /// never taken from the file once a map is stored: only moves change it. Off: the map
    /// in etcd wins entirely.
    #[arg(long, env = "CONVOY_PUBLISH_SHARD_MAP")]
    pub publish_shard_map: bool,

    /// Registration in etcd, whose etcd also holds the shard map (required).
    #[command(flatten)]
    pub registration: RegistrationArgs,

    /// Catch-up passes of a move stop, and its cut-over begins, once a pass re-syncs at
    /// most this many conversations (they are applied while the range is frozen).
    #[arg(long, env = "CONVOY_MOVE_TAIL_THRESHOLD", default_value_t = 20)]
    pub move_tail_threshold: usize,

    /// Milliseconds between a move's cut-over and deleting its rows from the source.
    #[arg(long, env = "CONVOY_MOVE_CLEANUP_GRACE_MS", default_value_t = 2000)]
    pub move_cleanup_grace_ms: u64,

    /// Fault injection for tests: pause this many milliseconds after each step of a move,
    /// so a test can interrupt it in a given phase.
    #[arg(
        long,
        env = "CONVOY_FAULT_MOVE_STEP_PAUSE_MS",
        default_value_t = 0,
        hide = true
    )]
    pub fault_move_step_pause_ms: u64,

    /// Streams (the shard map's watchers) and authorization's buffered messages
    /// (`--max-streams`, `--max-streams-per-team`, `--stream-idle-timeout-ms`,
    /// `--client-stream-lifetime-s`, `--server-stream-lifetime-s`, `--auth-buffer-mib`,
    /// `--auth-read-timeout-ms`).
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
    /// The seed map from `--shard-map`, if given.
    pub fn seed_map(&self) -> anyhow::Result<Option<ShardMap>> {
        let Some(path) = &self.shard_map else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading shard map {}: {e}", path.display()))?;
        Ok(Some(ShardMap::from_toml(&text).map_err(StoreError::from)?))
    }

    /// How moves run.
    pub fn move_settings(&self) -> crate::operations::MoveSettings {
        crate::operations::MoveSettings {
            tail_threshold: self.move_tail_threshold,
            cleanup_grace: std::time::Duration::from_millis(self.move_cleanup_grace_ms),
            step_pause: std::time::Duration::from_millis(self.fault_move_step_pause_ms),
            ..Default::default()
        }
    }

    /// Server settings, with `tls` (from [`Config::tls`], loaded once per process).
    pub fn server_config(&self, tls: Option<MeshTls>) -> ServerConfig {
        self.limits.apply(ServerConfig {
            tls,
            ..ServerConfig::default()
        })
    }
}
