//! Prometheus metrics: the process-wide recorder behind the `metrics` facade, and a small
//! HTTP endpoint that serves it as text at `GET /metrics`.
//!
//! The recorder is installed once per process ([`install`]), on first use: tests run several
//! services in one process, and each may serve the same registry on its own address.
//! Histograms are rendered as real Prometheus histograms with fixed buckets, never as
//! summaries, so they aggregate across pods: every `*_seconds` histogram gets
//! [`DURATION_BUCKETS`]. A histogram with another unit needs its buckets declared here, or it
//! renders as a summary.
//!
//! Not here: what is measured (each crate emits its own series through the facade) or
//! pushing anywhere (Prometheus scrapes).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// Upper bounds, in seconds, of every duration histogram's buckets: 0.5 ms to 10 s, 1-2.5-5
/// per decade, as Prometheus client libraries default to (with a finer low end for
/// in-memory cache calls, which take well under a millisecond).
pub const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The RPC duration histograms, named explicitly so their buckets stay put whatever
/// happens to the generic `_seconds` rule.
const RPC_HISTOGRAMS: [&str; 2] = [
    "convoy_rpc_server_duration_seconds",
    "convoy_rpc_client_duration_seconds",
];

/// How often histogram samples are folded into their buckets between scrapes, so memory
/// stays bounded when nobody scrapes. 5 s: the exporter's own default.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Longest wait for a scraper's request head. 10 s: a scrape is one small request.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The content type of Prometheus' text exposition format.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Why metrics could not be served.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Another recorder was installed first (a test's debugging recorder, say).
    #[error("another metrics recorder is already installed in this process")]
    RecorderTaken,
    /// The address could not be bound.
    #[error("binding the metrics endpoint on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// The recorder's builder with convoy's buckets.
fn builder() -> PrometheusBuilder {
    let mut builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &DURATION_BUCKETS)
        .expect("the duration buckets are not empty");
    for name in RPC_HISTOGRAMS {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(name.into()), &DURATION_BUCKETS)
            .expect("the duration buckets are not empty");
    }
    builder
}

/// Installs the Prometheus recorder as the process's global recorder, once; later calls
/// return the same handle. Fails if another recorder got there first.
pub fn install() -> Result<&'static PrometheusHandle, MetricsError> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = builder().install_recorder().ok()?;
            // A thread rather than a task: the recorder lives as long as the process, while
            // runtimes come and go (each test has its own).
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(UPKEEP_INTERVAL);
                        upkeep.run_upkeep();
                    }
                });
            if let Err(e) = spawned {
                // Scrapes still fold the samples in; only idle memory is unbounded.
                tracing::warn!(error = %e, "no metrics upkeep thread");
            }
            Some(handle)
        })
        .as_ref()
        .ok_or(MetricsError::RecorderTaken)
}

/// A running metrics endpoint; dropping it stops it (and the connections it serves).
#[derive(Debug)]
pub struct MetricsEndpoint {
    local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl MetricsEndpoint {
    /// Where it listens (the bound port, when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for MetricsEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Installs the recorder (see [`install`]) and serves it at `GET /metrics` on `addr` until
/// the returned endpoint is dropped. Must be called inside a tokio runtime.
pub async fn serve(addr: SocketAddr) -> Result<MetricsEndpoint, MetricsError> {
    let handle = install()?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| MetricsError::Bind { addr, source })?;
    tracing::info!(addr = %local_addr, "serving Prometheus metrics at /metrics");
    Ok(MetricsEndpoint {
        local_addr,
        task: tokio::spawn(accept(listener, handle)),
    })
}

/// Accepts scrapers until aborted; each connection is a task of a set that is dropped (and
/// so aborted) with this one.
async fn accept(listener: TcpListener, handle: &'static PrometheusHandle) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(async move {
                        let service = hyper::service::service_fn(move |request| {
                            std::future::ready(Ok::<_, Infallible>(answer(handle, &request)))
                        });
                        let served = hyper::server::conn::http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(HEADER_READ_TIMEOUT)
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                        if let Err(e) = served {
                            tracing::debug!(error = %e, "metrics connection failed");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors, typically: wait rather than spin.
                    tracing::warn!(error = %e, "accepting a metrics connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// The answer to one request: the exposition at `GET /metrics`, 405 for other methods
/// there, 404 elsewhere.
fn answer<B>(handle: &PrometheusHandle, request: &Request<B>) -> Response<String> {
    let (status, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, handle.render()),
        (_, "/metrics") => (StatusCode::METHOD_NOT_ALLOWED, "use GET\n".to_owned()),
        _ => (
            StatusCode::NOT_FOUND,
            "metrics are at /metrics\n".to_owned(),
        ),
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let content_type = if status == StatusCode::OK {
        TEXT_FORMAT
    } else {
        "text/plain; charset=utf-8"
    };
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    if status == StatusCode::METHOD_NOT_ALLOWED {
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A plain HTTP/1.1 request; returns the status line and the body.
    async fn request(addr: SocketAddr, method: &str, path: &str) -> (String, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).await.unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (head.lines().next().unwrap().to_owned(), body.to_owned())
    }

    #[test]
    fn duration_histograms_render_as_histograms_with_the_declared_buckets() {
        let recorder = builder().build_recorder();
        let handle = recorder.handle();
        ::metrics::with_local_recorder(&recorder, || {
            ::metrics::histogram!("convoy_rpc_server_duration_seconds", "rpc_method" => "Get")
                .record(0.003);
            ::metrics::histogram!("convoy_cache_bus_lag_seconds").record(0.2);
        });
        let text = handle.render();
        for line in [
            "# TYPE convoy_rpc_server_duration_seconds histogram",
            r#"convoy_rpc_server_duration_seconds_bucket{rpc_method="Get",le="0.0025"} 0"#,
            r#"convoy_rpc_server_duration_seconds_bucket{rpc_method="Get",le="0.005"} 1"#,
            r#"convoy_rpc_server_duration_seconds_bucket{rpc_method="Get",le="+Inf"} 1"#,
            r#"convoy_rpc_server_duration_seconds_count{rpc_method="Get"} 1"#,
            "# TYPE convoy_cache_bus_lag_seconds histogram",
            r#"convoy_cache_bus_lag_seconds_bucket{le="0.25"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(!text.contains("quantile"), "no summaries:\n{text}");
    }

    #[tokio::test]
    async fn the_endpoint_serves_the_registry_at_get_metrics_only_and_stops_when_dropped() {
        let endpoint = serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = endpoint.local_addr();
        ::metrics::counter!("convoy_telemetry_test_total", "case" => "served").increment(3);

        let (status, body) = request(addr, "GET", "/metrics").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(
            body.lines()
                .any(|l| l == r#"convoy_telemetry_test_total{case="served"} 3"#),
            "{body}"
        );
        assert_eq!(request(addr, "GET", "/").await.0, "HTTP/1.1 404 Not Found");
        assert_eq!(
            request(addr, "POST", "/metrics").await.0,
            "HTTP/1.1 405 Method Not Allowed"
        );

        // A second endpoint in the same process serves the same registry.
        let other = serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let (_, body) = request(other.local_addr(), "GET", "/metrics").await;
        assert!(body.contains("convoy_telemetry_test_total"));

        drop(endpoint);
        tokio::task::yield_now().await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }
}
