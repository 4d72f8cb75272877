//! One span per gRPC call, on both sides of the wire, joined into one trace by the W3C
//! `traceparent` header.
//!
//! The server side continues the caller's trace (the span's parent is the `traceparent` the
//! request carries); the client side writes its own span's context into the request, so the
//! next hop's spans hang under it. Spans follow the OpenTelemetry RPC conventions: named
//! `{rpc.service}/{rpc.method}` (as `otel.name`), kind server or client, with `rpc.system`,
//! `rpc.service`, `rpc.method` and, when the answer carries it in its headers (every error
//! does: tonic answers errors trailers-only), `rpc.grpc.status_code` and an error status.
//!
//! Spans are plain `tracing` spans: exported when `convoy-telemetry` installs its
//! OpenTelemetry layer, otherwise only context for log lines. Not here: timing for metrics
//! ([`crate::metrics`]) and the exporter ([`convoy_telemetry::trace`]).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tracing::Span;
use tracing::field::Empty;

use crate::metrics::Side;

/// Adds a span per call; see the module docs.
#[derive(Clone, Copy, Debug)]
pub struct TraceLayer {
    side: Side,
}

impl TraceLayer {
    /// Spans for calls this process serves.
    pub fn server() -> Self {
        Self { side: Side::Server }
    }

    /// Spans for calls this process makes.
    pub fn client() -> Self {
        Self { side: Side::Client }
    }
}

impl<S> Layer<S> for TraceLayer {
    type Service = Trace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Trace {
            inner,
            side: self.side,
        }
    }
}

/// The service [`TraceLayer`] makes.
#[derive(Clone, Debug)]
pub struct Trace<S> {
    inner: S,
    side: Side,
}

// === impl Trace ===

/// The span of a call to `path` (`/package.Service/Method`) on `side`.
fn span_for(side: Side, path: &str) -> Span {
    let name = path.strip_prefix('/').unwrap_or(path);
    let (service, method) = name.split_once('/').unwrap_or((name, ""));
    match side {
        Side::Server => tracing::info_span!(
            "grpc.server",
            otel.name = name,
            otel.kind = "server",
            otel.status_code = Empty,
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
            rpc.grpc.status_code = Empty,
        ),
        Side::Client => tracing::info_span!(
            "grpc.client",
            otel.name = name,
            otel.kind = "client",
            otel.status_code = Empty,
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
            rpc.grpc.status_code = Empty,
        ),
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Trace<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = TraceFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let span = span_for(self.side, request.uri().path());
        match self.side {
            Side::Server => convoy_telemetry::trace::set_parent_from(&span, request.headers()),
            Side::Client => convoy_telemetry::trace::inject_from(&span, request.headers_mut()),
        }
        let inner = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        TraceFuture { inner, span }
    }
}

pin_project! {
    /// The call, polled inside its span; the status is recorded when the answer's head
    /// carries it.
    pub struct TraceFuture<F> {
        #[pin]
        inner: F,
        span: Span,
    }
}

impl<F, ResBody, E> Future for TraceFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        let result = ready!(this.inner.poll(cx));
        match &result {
            Ok(response) => {
                let code = response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i64>().ok());
                if let Some(code) = code {
                    this.span.record("rpc.grpc.status_code", code);
                    if code != 0 {
                        this.span.record("otel.status_code", "ERROR");
                    }
                }
            }
            Err(_) => {
                this.span.record("otel.status_code", "ERROR");
            }
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    use tower::{ServiceExt, service_fn};
    use tracing_subscriber::layer::SubscriberExt;

    /// Records the spans a test opens: name, and the `otel.name` field.
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<(String, String)>>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Seen {
        fn on_new_span(
            &self,
            attrs: &tracing::span::Attributes<'_>,
            _id: &tracing::span::Id,
            _ctx: tracing_subscriber::layer::Context<'_, S>,
        ) {
            struct Name(String);
            impl tracing::field::Visit for Name {
                fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                    if field.name() == "otel.name" {
                        self.0 = value.to_owned();
                    }
                }
                fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
            }
            let mut name = Name(String::new());
            attrs.record(&mut name);
            self.0
                .lock()
                .unwrap()
                .push((attrs.metadata().name().to_owned(), name.0));
        }
    }

    #[tokio::test]
    async fn every_call_gets_a_span_named_after_its_method_on_its_side() {
        let seen = Seen::default();
        let subscriber = tracing_subscriber::registry().with(seen.clone());
        let _default = tracing::subscriber::set_default(subscriber);
        let backend = service_fn(|_: Request<()>| async {
            Ok::<_, std::convert::Infallible>(Response::new(()))
        });
        let request = || {
            Request::builder()
                .uri("/convoy.v1.ConversationService/GetConversation")
                .body(())
                .unwrap()
        };
        TraceLayer::server()
            .layer(backend)
            .oneshot(request())
            .await
            .unwrap();
        TraceLayer::client()
            .layer(backend)
            .oneshot(request())
            .await
            .unwrap();
        assert_eq!(
            *seen.0.lock().unwrap(),
            [
                (
                    "grpc.server".to_owned(),
                    "convoy.v1.ConversationService/GetConversation".to_owned()
                ),
                (
                    "grpc.client".to_owned(),
                    "convoy.v1.ConversationService/GetConversation".to_owned()
                ),
            ]
        );
    }
}
