//! RED metrics per gRPC method: every call's duration, by service, method and status code,
//! on both sides of the wire.
//!
//! One histogram per side, after OpenTelemetry's RPC semantic conventions:
//! [`SERVER_DURATION`] and [`CLIENT_DURATION`], labelled `rpc_system="grpc"`, `rpc_service`
//! (`convoy.v1.ConversationService`), `rpc_method` (`CreateConversation`) and
//! `rpc_grpc_status_code` (the numeric code, `"0"` to `"16"`). Its count is the rate, the
//! non-zero codes are the errors, its buckets the durations.
//!
//! The status is where gRPC puts it: in the response headers of a trailers-only answer
//! (errors, shed calls), otherwise in the trailers that end the body. So [`RpcMetrics`]
//! records at the head when the status is there, and otherwise wraps the body
//! ([`MetricsBody`]) and records when the trailers arrive: a streaming call is measured to
//! its end. A call abandoned before it ends (its future or body dropped) is recorded
//! CANCELLED (1); a service error, a body error or a body that ends without a status,
//! UNKNOWN (2); a non-gRPC HTTP error by gRPC's HTTP-to-status mapping.
//!
//! Labels come from a table built once from the contract ([`convoy_proto::methods`]) plus
//! health and reflection, so recording a call allocates nothing. A path outside the table (a
//! typo, a scanner) is recorded as `_OTHER`, so no caller can grow the series without bound.
//!
//! Clients whose retries sit above the HTTP layer (the SDK's typed clients retry typed
//! requests) time each logical call with [`RpcCall`] instead, so a call and its retries make
//! one sample.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, ready};

use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use metrics::{Key, Label, Level, Metadata};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{Layer, Service};

/// Duration of calls this process served, in seconds.
pub const SERVER_DURATION: &str = "convoy_rpc_server_duration_seconds";
/// Duration of calls this process made, in seconds (each logical call once, retries
/// included).
pub const CLIENT_DURATION: &str = "convoy_rpc_client_duration_seconds";

/// The `rpc_service` and `rpc_method` of a path outside the table.
const OTHER: &str = "_OTHER";
/// The gRPC status codes, as label values.
const CODES: [&str; 17] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
];
const CANCELLED: usize = 1;
const UNKNOWN: usize = 2;

/// Methods every convoy server answers besides the contract's (see [`crate::server`]).
const PLATFORM_METHODS: [&str; 4] = [
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// Which side of a call is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Calls served: [`SERVER_DURATION`].
    Server,
    /// Calls made: [`CLIENT_DURATION`].
    Client,
}

impl Side {
    fn histogram(self) -> &'static str {
        match self {
            Self::Server => SERVER_DURATION,
            Self::Client => CLIENT_DURATION,
        }
    }
}

/// One method's label sets, one per status code.
#[derive(Debug)]
struct MethodLabels {
    by_code: [Vec<Label>; CODES.len()],
}

impl MethodLabels {
    fn new(service: &'static str, method: &'static str) -> Self {
        Self {
            by_code: std::array::from_fn(|code| {
                vec![
                    Label::from_static_parts("rpc_system", "grpc"),
                    Label::from_static_parts("rpc_service", service),
                    Label::from_static_parts("rpc_method", method),
                    Label::from_static_parts("rpc_grpc_status_code", CODES[code]),
                ]
            }),
        }
    }
}

/// Every known method's labels, by path.
#[derive(Debug)]
struct Table {
    methods: HashMap<&'static str, MethodLabels>,
    other: MethodLabels,
}

fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| Table {
        methods: convoy_proto::methods::all_methods()
            .chain(PLATFORM_METHODS)
            .filter_map(|path| {
                let (service, method) = path.strip_prefix('/')?.split_once('/')?;
                Some((path, MethodLabels::new(service, method)))
            })
            .collect(),
        other: MethodLabels::new(OTHER, OTHER),
    })
}

/// The status code a `grpc-status` value names; UNKNOWN for anything else.
fn code_of(value: &http::HeaderValue) -> usize {
    value
        .to_str()
        .ok()
        .and_then(|text| text.parse::<usize>().ok())
        .filter(|code| *code < CODES.len())
        .unwrap_or(UNKNOWN)
}

fn grpc_status(headers: &HeaderMap) -> Option<usize> {
    headers.get("grpc-status").map(code_of)
}

/// gRPC's mapping of an HTTP error without a gRPC status (from a proxy, say).
fn code_of_http(status: StatusCode) -> usize {
    match status.as_u16() {
        400 => 13,             // INTERNAL
        401 => 16,             // UNAUTHENTICATED
        403 => 7,              // PERMISSION_DENIED
        404 => 12,             // UNIMPLEMENTED
        429 | 502..=504 => 14, // UNAVAILABLE
        _ => UNKNOWN,
    }
}

/// The status a response head settles, if it does: a trailers-only answer, an HTTP error,
/// or an OK head whose body is already over (so no trailers can follow).
fn status_in_head<B: Body>(response: &Response<B>) -> Option<usize> {
    if let Some(code) = grpc_status(response.headers()) {
        Some(code)
    } else if response.status() != StatusCode::OK {
        Some(code_of_http(response.status()))
    } else if response.body().is_end_stream() {
        Some(UNKNOWN)
    } else {
        None
    }
}

/// One call being timed; recorded once, when [`RpcCall::finish`] settles its status, or
/// as CANCELLED if it is dropped first.
#[derive(Debug)]
pub struct RpcCall {
    side: Side,
    labels: &'static MethodLabels,
    started: Instant,
    recorded: bool,
}

impl RpcCall {
    /// Starts timing a call to `path` (`/convoy.v1.ConversationService/GetConversation`).
    pub fn start(side: Side, path: &str) -> Self {
        let table = table();
        Self {
            side,
            labels: table.methods.get(path).unwrap_or(&table.other),
            started: Instant::now(),
            recorded: false,
        }
    }

    /// Records the call as ended with `code`.
    pub fn finish(self, code: tonic::Code) {
        let code = usize::try_from(i32::from(code)).unwrap_or(UNKNOWN);
        self.finish_with(code.min(CODES.len() - 1));
    }

    fn finish_with(mut self, code: usize) {
        self.record(code);
    }

    fn record(&mut self, code: usize) {
        static METADATA: Metadata<'static> =
            Metadata::new(module_path!(), Level::INFO, Some(module_path!()));
        self.recorded = true;
        let key = Key::from_static_parts(self.side.histogram(), &self.labels.by_code[code]);
        metrics::with_recorder(|recorder| recorder.register_histogram(&key, &METADATA))
            .record(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for RpcCall {
    fn drop(&mut self) {
        if !self.recorded {
            self.record(CANCELLED);
        }
    }
}

/// Adds RED metrics to a server or client stack; see the module docs.
#[derive(Clone, Copy, Debug)]
pub struct RpcMetricsLayer {
    side: Side,
}

impl RpcMetricsLayer {
    /// Measures calls served, into [`SERVER_DURATION`]: outermost in the server stack, so
    /// calls refused by the layers inside (shed, expired, panicked) are counted too.
    pub fn server() -> Self {
        Self { side: Side::Server }
    }

    /// Measures calls made, into [`CLIENT_DURATION`]: outside any retries, so each logical
    /// call is one sample.
    pub fn client() -> Self {
        Self { side: Side::Client }
    }
}

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics {
            inner,
            side: self.side,
        }
    }
}

/// The service made by [`RpcMetricsLayer`].
#[derive(Clone, Debug)]
pub struct RpcMetrics<S> {
    inner: S,
    side: Side,
}

// === impl RpcMetrics ===

impl<S, B, RB> Service<Request<B>> for RpcMetrics<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    RB: Body,
{
    type Response = Response<MetricsBody<RB>>;
    type Error = S::Error;
    type Future = RpcMetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let call = RpcCall::start(self.side, request.uri().path());
        RpcMetricsFuture {
            inner: self.inner.call(request),
            call: Some(call),
        }
    }
}

pin_project! {
    /// Response future of [`RpcMetrics`]: settles the status from the head if it can,
    /// otherwise hands the call to the body.
    pub struct RpcMetricsFuture<F> {
        #[pin]
        inner: F,
        call: Option<RpcCall>,
    }
}

impl<F, RB, E> Future for RpcMetricsFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
    RB: Body,
{
    type Output = Result<Response<MetricsBody<RB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let call = this.call.take();
        Poll::Ready(match result {
            Ok(response) => {
                let call = match (call, status_in_head(&response)) {
                    (Some(call), Some(code)) => {
                        call.finish_with(code);
                        None
                    }
                    (call, _) => call,
                };
                Ok(response.map(|inner| MetricsBody { inner, call }))
            }
            Err(e) => {
                if let Some(call) = call {
                    call.finish_with(UNKNOWN);
                }
                Err(e)
            }
        })
    }
}

pin_project! {
    /// A response body that records its call when the trailers carrying its status
    /// arrive (or as the module docs say when they do not).
    pub struct MetricsBody<B> {
        #[pin]
        inner: B,
        call: Option<RpcCall>,
    }
}

// === impl MetricsBody ===

impl<B: Body> Body for MetricsBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        if this.call.is_some() {
            let code = match &frame {
                Some(Ok(frame)) => match frame.trailers_ref() {
                    Some(trailers) => Some(grpc_status(trailers).unwrap_or(UNKNOWN)),
                    // The last data frame: no trailers will follow.
                    None if this.inner.is_end_stream() => Some(UNKNOWN),
                    None => None,
                },
                Some(Err(_)) | None => Some(UNKNOWN),
            };
            if let Some(code) = code
                && let Some(call) = this.call.take()
            {
                call.finish_with(code);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::convert::Infallible;
    use std::time::Duration;

    use bytes::Bytes;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
    use tower::ServiceExt;

    use crate::{BulkheadConfig, BulkheadLayer};

    /// A response body made of the frames given.
    #[derive(Default)]
    struct TestBody(VecDeque<Frame<Bytes>>);

    impl TestBody {
        /// A unary answer: one message, then trailers with `grpc-status`.
        fn unary(status: &'static str) -> Self {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", status.parse().unwrap());
            Self(VecDeque::from([
                Frame::data(Bytes::from_static(b"\0\0\0\0\0")),
                Frame::trailers(trailers),
            ]))
        }
    }

    impl Body for TestBody {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }
    }

    /// Reads a body to its end.
    async fn drain<B: Body + Unpin>(mut body: B) {
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            assert!(frame.is_ok());
        }
    }

    fn request(path: &str) -> Request<()> {
        Request::builder().uri(path).body(()).unwrap()
    }

    /// Runs `test` on a current-thread runtime with a paused clock, recording into a
    /// debugging recorder of its own.
    fn run<F: Future<Output = ()>>(test: impl FnOnce(Snapshotter) -> F) {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        metrics::with_local_recorder(&recorder, || runtime.block_on(test(snapshotter)));
    }

    /// The histogram samples recorded since the last snapshot: (histogram, `k=v` labels
    /// in order, seconds).
    fn samples(snapshotter: &Snapshotter) -> Vec<(String, String, Vec<f64>)> {
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter_map(|(key, _, _, value)| match value {
                DebugValue::Histogram(values) if !values.is_empty() => {
                    let labels: Vec<String> = key
                        .key()
                        .labels()
                        .map(|l| format!("{}={}", l.key(), l.value()))
                        .collect();
                    Some((
                        key.key().name().to_owned(),
                        labels.join(","),
                        values.into_iter().map(|v| v.into_inner()).collect(),
                    ))
                }
                _ => None,
            })
            .collect()
    }

    fn labels(service: &str, method: &str, code: &str) -> String {
        format!(
            "rpc_system=grpc,rpc_service={service},rpc_method={method},rpc_grpc_status_code={code}"
        )
    }

    const CREATE: &str = "/convoy.v1.ConversationService/CreateConversation";

    #[test]
    fn a_unary_call_is_recorded_once_when_its_trailers_arrive() {
        run(|snapshotter| async move {
            let backend = tower::service_fn(|_req: Request<()>| async {
                tokio::time::sleep(Duration::from_millis(250)).await;
                Ok::<_, Infallible>(Response::new(TestBody::unary("0")))
            });
            let response = RpcMetricsLayer::server()
                .layer(backend)
                .oneshot(request(CREATE))
                .await
                .unwrap();
            assert_eq!(samples(&snapshotter), vec![], "nothing before the trailers");
            tokio::time::sleep(Duration::from_millis(50)).await;
            drain(response.into_body()).await;
            assert_eq!(
                samples(&snapshotter),
                vec![(
                    SERVER_DURATION.to_owned(),
                    labels("convoy.v1.ConversationService", "CreateConversation", "0"),
                    vec![0.3]
                )]
            );
        });
    }

    #[test]
    fn a_trailers_only_error_is_recorded_from_its_head_without_reading_the_body() {
        run(|snapshotter| async move {
            let backend = tower::service_fn(|_req: Request<()>| async {
                let mut response = Response::new(TestBody::default());
                response
                    .headers_mut()
                    .insert("grpc-status", "3".parse().unwrap());
                Ok::<_, Infallible>(response)
            });
            let response = RpcMetricsLayer::client()
                .layer(backend)
                .oneshot(request(CREATE))
                .await
                .unwrap();
            drop(response);
            assert_eq!(
                samples(&snapshotter),
                vec![(
                    CLIENT_DURATION.to_owned(),
                    labels("convoy.v1.ConversationService", "CreateConversation", "3"),
                    vec![0.0]
                )]
            );
        });
    }

    #[test]
    fn calls_shed_by_the_bulkhead_inside_are_recorded_resource_exhausted() {
        run(|snapshotter| async move {
            let backend = tower::service_fn(|_req: Request<()>| async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok::<_, Infallible>(Response::new(TestBody::unary("0")))
            });
            let service = RpcMetricsLayer::server().layer(
                BulkheadLayer::new(BulkheadConfig {
                    limit: 1,
                    queue: 0,
                    max_wait: Duration::from_secs(1),
                    pushback: Duration::from_millis(100),
                })
                .layer(backend),
            );
            let busy = tokio::spawn(service.clone().oneshot(request(CREATE)));
            tokio::task::yield_now().await;
            for _ in 0..2 {
                let shed = service.clone().oneshot(request(CREATE)).await.unwrap();
                assert_eq!(shed.headers().get("grpc-status").unwrap(), "8");
            }
            drain(busy.await.unwrap().unwrap().into_body()).await;
            let mut seen = samples(&snapshotter);
            seen.sort_by(|a, b| a.1.cmp(&b.1));
            let method = ("convoy.v1.ConversationService", "CreateConversation");
            assert_eq!(
                seen,
                vec![
                    (
                        SERVER_DURATION.to_owned(),
                        labels(method.0, method.1, "0"),
                        vec![1.0]
                    ),
                    (
                        SERVER_DURATION.to_owned(),
                        labels(method.0, method.1, "8"),
                        vec![0.0, 0.0]
                    ),
                ]
            );
        });
    }

    #[test]
    fn calls_abandoned_before_their_end_are_recorded_cancelled() {
        run(|snapshotter| async move {
            let backend = tower::service_fn(|_req: Request<()>| async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok::<_, Infallible>(Response::new(TestBody::unary("0")))
            });
            let service = RpcMetricsLayer::server().layer(backend);
            // The future dropped half-way (the client reset the stream).
            let call = service.clone().oneshot(request(CREATE));
            let _ = tokio::time::timeout(Duration::from_millis(400), call).await;
            // The body dropped before its trailers (a stream the client stopped reading).
            let response = service.oneshot(request(CREATE)).await.unwrap();
            drop(response);
            assert_eq!(
                samples(&snapshotter),
                vec![(
                    SERVER_DURATION.to_owned(),
                    labels("convoy.v1.ConversationService", "CreateConversation", "1"),
                    vec![0.4, 1.0]
                )]
            );
        });
    }

    #[test]
    fn unknown_paths_share_one_label_set_and_platform_methods_have_their_own() {
        run(|snapshotter| async move {
            let backend = tower::service_fn(|_req: Request<()>| async {
                Ok::<_, Infallible>(Response::new(TestBody::unary("12")))
            });
            let service = RpcMetricsLayer::server().layer(backend);
            for path in [
                "/no.Such/Method",
                "/scanner",
                "/grpc.health.v1.Health/Check",
            ] {
                let response = service.clone().oneshot(request(path)).await.unwrap();
                drain(response.into_body()).await;
            }
            let mut seen = samples(&snapshotter);
            seen.sort_by(|a, b| a.1.cmp(&b.1));
            assert_eq!(
                seen.iter()
                    .map(|(_, l, v)| (l.clone(), v.len()))
                    .collect::<Vec<_>>(),
                vec![
                    (labels("_OTHER", "_OTHER", "12"), 2),
                    (labels("grpc.health.v1.Health", "Check", "12"), 1),
                ]
            );
        });
    }

    #[test]
    fn http_errors_a_body_without_status_and_service_errors_get_their_codes() {
        run(|snapshotter| async move {
            let backend = tower::service_fn(|req: Request<()>| async move {
                match req.uri().path() {
                    "/grpc.health.v1.Health/Check" => {
                        let mut response = Response::new(TestBody::default());
                        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                        Ok(response)
                    }
                    "/grpc.health.v1.Health/Watch" => Ok(Response::new(TestBody(VecDeque::from(
                        [Frame::data(Bytes::from_static(b"x"))],
                    )))),
                    _ => Err("transport failed"),
                }
            });
            let service = RpcMetricsLayer::client().layer(backend);
            let unavailable = service
                .clone()
                .oneshot(request("/grpc.health.v1.Health/Check"))
                .await
                .unwrap();
            drop(unavailable);
            let no_status = service
                .clone()
                .oneshot(request("/grpc.health.v1.Health/Watch"))
                .await
                .unwrap();
            drain(no_status.into_body()).await;
            assert!(service.oneshot(request(CREATE)).await.is_err());
            let mut seen: Vec<String> = samples(&snapshotter)
                .into_iter()
                .map(|(_, labels, values)| format!("{labels} x{}", values.len()))
                .collect();
            seen.sort();
            assert_eq!(
                seen,
                vec![
                    format!(
                        "{} x1",
                        labels("convoy.v1.ConversationService", "CreateConversation", "2")
                    ),
                    format!("{} x1", labels("grpc.health.v1.Health", "Check", "14")),
                    format!("{} x1", labels("grpc.health.v1.Health", "Watch", "2")),
                ]
            );
        });
    }

    #[test]
    fn a_timed_call_is_recorded_with_its_final_code_or_cancelled() {
        run(|snapshotter| async move {
            let call = RpcCall::start(Side::Client, CREATE);
            tokio::time::sleep(Duration::from_millis(20)).await;
            call.finish(tonic::Code::InvalidArgument);
            drop(RpcCall::start(Side::Client, CREATE));
            let mut seen = samples(&snapshotter);
            seen.sort_by(|a, b| a.1.cmp(&b.1));
            let method = ("convoy.v1.ConversationService", "CreateConversation");
            assert_eq!(
                seen,
                vec![
                    (
                        CLIENT_DURATION.to_owned(),
                        labels(method.0, method.1, "1"),
                        vec![0.0]
                    ),
                    (
                        CLIENT_DURATION.to_owned(),
                        labels(method.0, method.1, "3"),
                        vec![0.02]
                    ),
                ]
            );
        });
    }
}
