//! Telemetry set-up for every convoy binary: logs through `tracing` to stderr, human-readable
//! or JSON, filtered by `RUST_LOG` (default `info`); and Prometheus metrics ([`metrics`]):
//! the process-wide recorder behind the `metrics` facade, served at `GET /metrics`.
//!
//! Binaries flatten [`TelemetryArgs`] into their configuration. What is measured lives with
//! the code it measures (RED per gRPC method in `convoy-mesh`, cache and bus series in
//! `convoy-cache`); OpenTelemetry export will join here; nothing else belongs here.

#![forbid(unsafe_code)]

pub mod metrics;

use std::net::SocketAddr;

use tracing_subscriber::EnvFilter;

pub use metrics::{MetricsEndpoint, MetricsError};

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable, one line per event.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests starting several services in one process) is harmless.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// The telemetry flags every binary shares (flatten them into its `Config`), with
/// `CONVOY_*` environment fallbacks.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct TelemetryArgs {
    /// Log format. Default text: one human-readable line per event.
    #[arg(long, env = "CONVOY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Address to serve Prometheus metrics on, at `GET /metrics` (for example
    /// 127.0.0.1:9464). Default none: no endpoint, and no recorder is installed, so the
    /// metrics the code emits cost next to nothing.
    #[arg(long, env = "CONVOY_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

impl TelemetryArgs {
    /// Installs logging as [`init`] does.
    pub fn init(&self) {
        init(self.log_format);
    }

    /// Starts the metrics endpoint when `--metrics-listen` is given; it stops when the
    /// returned endpoint is dropped. Call it inside the tokio runtime, before serving, so
    /// the first calls are counted.
    pub async fn serve_metrics(&self) -> Result<Option<MetricsEndpoint>, MetricsError> {
        match self.metrics_listen {
            Some(addr) => metrics::serve(addr).await.map(Some),
            None => Ok(None),
        }
    }
}
