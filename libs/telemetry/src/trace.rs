//! OpenTelemetry traces: `tracing` spans exported over OTLP/gRPC, and the W3C trace
//! context (`traceparent`, `tracestate`) carried in gRPC metadata between services.
//!
//! Export is on when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the OpenTelemetry SDKs' own
//! variable, e.g. `http://otel-collector:4317`); the service name comes from
//! `OTEL_SERVICE_NAME` when set, else from the binary. Spans are batched off the request
//! path. Without an endpoint nothing is exported and the context helpers below do nothing:
//! spans stay plain `tracing` spans (visible in logs), and no `traceparent` is sent.
//!
//! Not here: which spans exist. The mesh opens one per gRPC call (client and server, named
//! and attributed per the OpenTelemetry RPC conventions), the data layer one per database
//! operation.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::registry::LookupSpan;

/// The variable that turns export on.
pub const ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// The variable that names the service in exported spans.
pub const SERVICE_NAME_ENV: &str = "OTEL_SERVICE_NAME";

/// Why the exporter could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("OTLP trace exporter: {0}")]
pub struct ExportError(String);

/// A running trace export pipeline; dropping it flushes what is buffered and stops it.
pub struct Traces {
    provider: SdkTracerProvider,
}

impl std::fmt::Debug for Traces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Traces").finish_non_exhaustive()
    }
}

impl Traces {
    /// Exports to `$OTEL_EXPORTER_OTLP_ENDPOINT`, if set, as `service`. Must be called
    /// inside a tokio runtime (the exporter is a tonic client).
    pub fn from_env(service: &str) -> Result<Option<Self>, ExportError> {
        match std::env::var(ENDPOINT_ENV) {
            Ok(endpoint) if !endpoint.trim().is_empty() => {
                Self::export_to(endpoint.trim(), service).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// Exports to the OTLP/gRPC receiver at `endpoint` (`http://host:4317`) as `service`
    /// (unless `OTEL_SERVICE_NAME` names it). Must be called inside a tokio runtime.
    pub fn export_to(endpoint: &str, service: &str) -> Result<Self, ExportError> {
        use opentelemetry_otlp::WithExportConfig as _;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| ExportError(e.to_string()))?;
        let mut resource = Resource::builder();
        if std::env::var_os(SERVICE_NAME_ENV).is_none() {
            resource = resource.with_service_name(service.to_owned());
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        Ok(Self { provider })
    }

    /// The `tracing` layer that turns spans into OpenTelemetry spans of this pipeline.
    pub fn layer<S>(&self) -> impl Layer<S> + Send + Sync + 'static
    where
        S: tracing::Subscriber + for<'span> LookupSpan<'span> + Send + Sync,
    {
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer("convoy"))
            // Spans only: events stay in the logs.
            .with_tracked_inactivity(false)
    }

    /// Exports every span ended so far (tests call it before they look).
    pub fn flush(&self) {
        if let Err(e) = self.provider.force_flush() {
            tracing::warn!(error = %e, "flushing spans failed");
        }
    }
}

impl Drop for Traces {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown() {
            // Already shut down, or the receiver is gone: nothing more to do.
            tracing::debug!(error = %e, "trace export shutdown");
        }
    }
}

/// Reads W3C trace context from HTTP/2 headers (gRPC metadata).
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Writes W3C trace context into HTTP/2 headers.
struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Makes `span` a child of the trace context `headers` carry (a caller's `traceparent`);
/// without one, `span` stays a root (or the child of the current span).
pub fn set_parent_from(span: &tracing::Span, headers: &http::HeaderMap) {
    let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    use opentelemetry::trace::TraceContextExt as _;
    if cx.span().span_context().is_valid() {
        // Fails only without an OpenTelemetry layer, when there is nothing to link.
        let _ = span.set_parent(cx);
    }
}

/// Writes the trace context of `span` (its `traceparent`) into `headers`, so the next hop's
/// spans join its trace. Writes nothing when spans are not exported.
pub fn inject_from(span: &tracing::Span, headers: &mut http::HeaderMap) {
    let cx = span.context();
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}
