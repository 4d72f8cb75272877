//! Telemetry set-up for every convoy binary: logs through `tracing` to stderr, human-readable
//! or JSON, filtered by `RUST_LOG` (default `info`); and Prometheus metrics ([`metrics`]):
//! the process-wide recorder behind the `metrics` facade, served at `GET /metrics`.
//!
//! Binaries flatten [`TelemetryArgs`] into their configuration. What is measured lives with
//! the code it measures (RED per gRPC method in `convoy-mesh`, cache and bus series in
//! `convoy-cache`, statement statistics in `convoy-store`, whose `tracing` layer a binary
//! with shards hands to [`TelemetryArgs::init_with`], so this crate never depends on the
//! data layer); OpenTelemetry export is here ([`trace`]); nothing else belongs here.

#![forbid(unsafe_code)]

pub mod metrics;
pub mod trace;

use std::net::SocketAddr;

use tracing::Level;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, filter};

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

/// A `tracing` layer for the global subscriber, with its own filter.
pub type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// Installs the global subscriber, logging only. Call once, first thing in `main`
/// (binaries use [`TelemetryArgs::init`], which adds trace export).
pub fn init(format: LogFormat) {
    init_with(format, None, Vec::new());
}

/// Installs the global subscriber: logs to stderr in `format`, filtered by `RUST_LOG`
/// (default `info`), and, with `traces`, every span at INFO or above (and WARN and ERROR
/// events, as span events) exported to OpenTelemetry whatever `RUST_LOG` says; then the
/// `extra` layers. Each layer filters for itself (per-layer filters), so an extra layer may
/// take events the logs leave out, as the store's statement statistics take sqlx's TRACE
/// events. A second call (tests starting several services in one process) changes nothing.
pub fn init_with(format: LogFormat, traces: Option<&trace::Traces>, extra: Vec<BoxedLayer>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Text => logs.with_filter(filter).boxed(),
        LogFormat::Json => logs.json().with_filter(filter).boxed(),
    };
    let mut layers: Vec<BoxedLayer> = vec![logs];
    if let Some(traces) = traces {
        let exported = filter::filter_fn(|meta| {
            let level = *meta.level();
            (meta.is_span() && level <= Level::INFO) || level <= Level::WARN
        });
        layers.push(traces.layer().with_filter(exported).boxed());
    }
    layers.extend(extra);
    let _ = tracing_subscriber::registry().with(layers).try_init();
}

/// What [`TelemetryArgs::init`] set up; keep it for the life of the process (dropping it
/// flushes and stops trace export).
#[derive(Debug, Default)]
pub struct Telemetry {
    traces: Option<trace::Traces>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exports_traces(&self) -> bool {
        self.traces.is_some()
    }
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
    /// Installs logging, and trace export as `service` when `OTEL_EXPORTER_OTLP_ENDPOINT`
    /// is set (see [`trace`]). Call once, first thing in `main`, inside the tokio runtime.
    pub fn init(&self, service: &str) -> Result<Telemetry, trace::ExportError> {
        self.init_with(service, Vec::new())
    }

    /// [`TelemetryArgs::init`], with `extra` layers beside the logs and trace export (see
    /// [`init_with`]): a binary with shards passes the store's statement statistics.
    pub fn init_with(
        &self,
        service: &str,
        extra: Vec<BoxedLayer>,
    ) -> Result<Telemetry, trace::ExportError> {
        let traces = trace::Traces::from_env(service)?;
        init_with(self.log_format, traces.as_ref(), extra);
        if let Some(endpoint) = std::env::var(trace::ENDPOINT_ENV)
            .ok()
            .filter(|_| traces.is_some())
        {
            tracing::info!(%endpoint, "exporting traces over OTLP");
        }
        Ok(Telemetry { traces })
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
