//! The server's bulkhead: a process-wide concurrency limit that sheds at once.
//!
//! Past the limit a call is answered RESOURCE_EXHAUSTED immediately, with
//! `grpc-retry-pushback-ms` telling well-behaved clients when to try again (gRFC A6), instead
//! of waiting in an unbounded queue where it would only add latency to everyone. Built from
//! tower's `ConcurrencyLimit` over one semaphore shared by every connection's clone of the
//! service (`ConcurrencyLimitLayer` would make one semaphore per connection) and `LoadShed`; this
//! module adds only the gRPC answer. A permit is held until the handler's response head is
//! ready: a server stream's body does not count against the limit. Health checks and
//! reflection are never shed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tokio::sync::Semaphore;
use tower::limit::ConcurrencyLimit;
use tower::load_shed::LoadShed;
use tower::load_shed::error::Overloaded;
use tower::util::Oneshot;
use tower::{BoxError, Layer, Service, ServiceExt};

/// Header that tells a client how long to wait before retrying (gRFC A6).
pub const RETRY_PUSHBACK: &str = "grpc-retry-pushback-ms";

/// Adds the bulkhead; see the module docs.
#[derive(Clone, Debug)]
pub struct BulkheadLayer {
    semaphore: Arc<Semaphore>,
    limit: usize,
    pushback: Duration,
}

impl BulkheadLayer {
    /// At most `limit` calls in flight across every connection; shed calls are told to come
    /// back after `pushback`.
    pub fn new(limit: usize, pushback: Duration) -> Self {
        Self {
            semaphore: Arc::new(Semaphore::new(limit)),
            limit,
            pushback,
        }
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> usize {
        self.limit - self.semaphore.available_permits()
    }
}

impl<S: Clone> Layer<S> for BulkheadLayer {
    type Service = Bulkhead<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Bulkhead {
            exempt: inner.clone(),
            semaphore: self.semaphore.clone(),
            inner: LoadShed::new(ConcurrencyLimit::with_semaphore(
                inner,
                self.semaphore.clone(),
            )),
            limit: self.limit,
            pushback: self.pushback,
        }
    }
}

/// Calls the bulkhead never sheds: health checks (a saturated instance is busy, not dead,
/// and a probe that is shed would get it restarted under load) and reflection.
fn is_exempt(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.") || path.starts_with("/grpc.reflection.")
}

/// The service made by [`BulkheadLayer`].
#[derive(Clone, Debug)]
pub struct Bulkhead<S> {
    inner: LoadShed<ConcurrencyLimit<S>>,
    /// The same service without the limit, for exempt calls.
    exempt: S,
    semaphore: Arc<Semaphore>,
    limit: usize,
    pushback: Duration,
}

// === impl Bulkhead ===

impl<S, B, RB> Service<Request<B>> for Bulkhead<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone,
    S::Error: Into<BoxError>,
    RB: Default,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = BulkheadFuture<
        <LoadShed<ConcurrencyLimit<S>> as Service<Request<B>>>::Future,
        Oneshot<S, Request<B>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // LoadShed is always ready: it remembers whether the limit was, and sheds if not.
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if is_exempt(request.uri().path()) {
            return BulkheadFuture::Exempt {
                inner: self.exempt.clone().oneshot(request),
            };
        }
        metrics::gauge!("convoy_server_in_flight")
            .set((self.limit - self.semaphore.available_permits()) as f64);
        BulkheadFuture::Limited {
            inner: self.inner.call(request),
            limit: self.limit,
            pushback: self.pushback,
        }
    }
}

pin_project! {
    /// Response future of [`Bulkhead`]. (Its fields are private in all but name:
    /// pin-project-lite cannot document enum fields.)
    #[allow(missing_docs)]
    #[project = BulkheadProj]
    pub enum BulkheadFuture<F, E> {
        /// A call that took a permit (or was shed).
        Limited {
            #[pin]
            inner: F,
            limit: usize,
            pushback: Duration,
        },
        /// An exempt call.
        Exempt {
            #[pin]
            inner: E,
        },
    }
}

impl<F, E, RB, EE> Future for BulkheadFuture<F, E>
where
    F: Future<Output = Result<Response<RB>, BoxError>>,
    E: Future<Output = Result<Response<RB>, EE>>,
    EE: Into<BoxError>,
    RB: Default,
{
    type Output = Result<Response<RB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            BulkheadProj::Exempt { inner } => inner.poll(cx).map_err(Into::into),
            BulkheadProj::Limited {
                inner,
                limit,
                pushback,
            } => match inner.poll(cx) {
                Poll::Ready(Err(e)) if e.is::<Overloaded>() => {
                    metrics::counter!("convoy_server_shed_total").increment(1);
                    let status = tonic::Status::resource_exhausted(format!(
                        "server is at its limit of {limit} concurrent calls; retry after {} ms",
                        pushback.as_millis()
                    ));
                    let mut response = status.into_http::<RB>();
                    response.headers_mut().insert(
                        RETRY_PUSHBACK,
                        HeaderValue::from(pushback.as_millis() as u64),
                    );
                    Poll::Ready(Ok(response))
                }
                other => other,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower::ServiceExt;

    fn status_of(response: &Response<String>) -> Option<&str> {
        response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn calls_past_the_limit_are_shed_at_once_and_the_rest_complete() {
        const LIMIT: usize = 3;
        const EXTRA: usize = 4;
        let layer = BulkheadLayer::new(LIMIT, Duration::from_millis(250));
        let slow = tower::service_fn(|_req: Request<()>| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, Infallible>(Response::new("done".to_string()))
        });
        let service = layer.layer(slow);

        let started = tokio::time::Instant::now();
        let calls: Vec<_> = (0..LIMIT + EXTRA)
            .map(|_| {
                let service = service.clone();
                tokio::spawn(async move {
                    let response = service.oneshot(Request::new(())).await.unwrap();
                    (response, started.elapsed())
                })
            })
            .collect();
        let mut shed = 0;
        let mut done = 0;
        for call in calls {
            let (response, elapsed) = call.await.unwrap();
            match status_of(&response) {
                Some("8") => {
                    shed += 1;
                    assert_eq!(elapsed, Duration::ZERO, "shedding must not wait");
                    assert_eq!(response.headers().get(RETRY_PUSHBACK).unwrap(), "250");
                }
                None => {
                    done += 1;
                    assert_eq!(elapsed, Duration::from_secs(5));
                }
                other => panic!("unexpected status {other:?}"),
            }
        }
        assert_eq!((done, shed), (LIMIT, EXTRA));
        assert_eq!(layer.in_flight(), 0, "every permit is returned");
    }

    #[tokio::test(start_paused = true)]
    async fn health_checks_are_answered_even_when_the_limit_is_reached() {
        let layer = BulkheadLayer::new(1, Duration::from_millis(250));
        let slow = tower::service_fn(|_req: Request<()>| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, Infallible>(Response::new("done".to_string()))
        });
        let service = layer.layer(slow);
        let busy = tokio::spawn(service.clone().oneshot(Request::new(())));
        tokio::task::yield_now().await;
        let health = Request::builder()
            .uri("/grpc.health.v1.Health/Check")
            .body(())
            .unwrap();
        let started = tokio::time::Instant::now();
        let response = service.clone().oneshot(health).await.unwrap();
        assert_eq!(status_of(&response), None, "not shed");
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        let other = service.oneshot(Request::new(())).await.unwrap();
        busy.await.unwrap().unwrap();
        let _ = other;
    }
}
