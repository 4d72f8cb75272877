//! The server's bulkhead: a process-wide concurrency limit with a short, bounded queue.
//!
//! At most `limit` calls run at once across every connection (one semaphore shared by every
//! connection's clone of the service). A call past the limit waits its turn, first come
//! first served, in a queue of at most `queue` calls and for at most `max_wait` (less when
//! its deadline is nearer: [`crate::DeadlineLayer`] outside ends the wait with
//! DEADLINE_EXCEEDED). A call that finds the queue full, or whose wait runs out, is answered
//! RESOURCE_EXHAUSTED at once with `grpc-retry-pushback-ms`, telling well-behaved clients when
//! to come back (gRFC A6). A permit is held until the handler's response head is ready: a
//! server stream's body does not count against the limit. Health checks and reflection are
//! never limited.
//!
//! Why a queue rather than refusing everything past the limit: a parked call costs a task
//! and its buffered request, while a refused one costs a whole round of HTTP/2, the span,
//! authorization and the client's retry, and each retry is refused again while the burst
//! lasts. With 10,000 clients on one instance, refusing at once turned most of the CPU into
//! refusals and goodput collapsed (docs/benchmarks.md, 2026-12-06).
//!
//! [`BulkheadLayer::early_shed`] gives the same refusal to the layers in front of the costly
//! ones (authorization reads the body and verifies the token): when every permit is taken
//! and the queue is full, a call is refused from its path alone. It only looks and takes
//! nothing, so callers who are never authorized cannot fill the queue.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::util::Oneshot;
use tower::{BoxError, Layer, Service, ServiceExt};

/// Header that tells a client how long to wait before retrying (gRFC A6).
pub const RETRY_PUSHBACK: &str = "grpc-retry-pushback-ms";

/// How a bulkhead is sized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BulkheadConfig {
    /// Calls running at once.
    pub limit: usize,
    /// Calls waiting for one of them to finish, at most.
    pub queue: usize,
    /// Longest a call waits in the queue before it is refused.
    pub max_wait: Duration,
    /// How long a refused client is told to wait before it tries again.
    pub pushback: Duration,
}

/// Adds the bulkhead; see the module docs.
#[derive(Clone, Debug)]
pub struct BulkheadLayer {
    limits: Arc<Limits>,
}

/// The state one bulkhead's services share: its permits and its queue.
#[derive(Debug)]
pub struct Limits {
    config: BulkheadConfig,
    running: Arc<Semaphore>,
    queue: Arc<Semaphore>,
}

/// Why a call was refused (the `reason` label of `convoy_server_shed_total`).
#[derive(Clone, Copy, Debug)]
enum Shed {
    /// Every permit was taken and the queue was full, as [`EarlyShed`] saw it.
    Early,
    /// Every permit was taken and the queue was full.
    QueueFull,
    /// It waited `max_wait` in the queue.
    Waited,
}

impl BulkheadLayer {
    /// A bulkhead sized by `config`.
    pub fn new(config: BulkheadConfig) -> Self {
        Self {
            limits: Arc::new(Limits {
                config,
                running: Arc::new(Semaphore::new(config.limit)),
                queue: Arc::new(Semaphore::new(config.queue)),
            }),
        }
    }

    /// The layer that refuses, before the costly layers, the calls this bulkhead would refuse
    /// on arrival; see the module docs.
    pub fn early_shed(&self) -> EarlyShedLayer {
        EarlyShedLayer {
            limits: self.limits.clone(),
        }
    }

    /// Calls running now.
    pub fn in_flight(&self) -> usize {
        self.limits.in_flight()
    }

    /// Calls waiting in the queue now.
    pub fn queued(&self) -> usize {
        self.limits.queued()
    }
}

impl Limits {
    fn in_flight(&self) -> usize {
        self.config.limit - self.running.available_permits()
    }

    fn queued(&self) -> usize {
        self.config.queue - self.queue.available_permits()
    }

    /// Whether a call arriving now would be refused: nothing to run on, no room to wait.
    fn full(&self) -> bool {
        self.running.available_permits() == 0 && self.queue.available_permits() == 0
    }

    /// The answer to a refused call.
    fn refusal<B: Default>(&self, why: Shed) -> Response<B> {
        let BulkheadConfig {
            limit,
            queue,
            pushback,
            ..
        } = self.config;
        let reason = match why {
            Shed::Early => "early",
            Shed::QueueFull => "queue_full",
            Shed::Waited => "waited",
        };
        metrics::counter!("convoy_server_shed_total", "reason" => reason).increment(1);
        let message = match why {
            Shed::Early | Shed::QueueFull => format!(
                "server is at its limit of {limit} concurrent calls with {queue} waiting; \
                 retry after {} ms",
                pushback.as_millis()
            ),
            Shed::Waited => format!(
                "server is at its limit of {limit} concurrent calls and this call waited {} ms; \
                 retry after {} ms",
                self.config.max_wait.as_millis(),
                pushback.as_millis()
            ),
        };
        let mut response = tonic::Status::resource_exhausted(message).into_http::<B>();
        response.headers_mut().insert(
            RETRY_PUSHBACK,
            HeaderValue::from(pushback.as_millis() as u64),
        );
        response
    }

    /// Sets the gauges (on each arrival).
    fn record(&self) {
        metrics::gauge!("convoy_server_in_flight").set(self.in_flight() as f64);
        metrics::gauge!("convoy_server_queued").set(self.queued() as f64);
    }
}

/// Waits in the queue (holding `place` there) for a permit to run, for at most `max_wait`.
async fn wait_turn(
    running: Arc<Semaphore>,
    place: OwnedSemaphorePermit,
    max_wait: Duration,
) -> Option<OwnedSemaphorePermit> {
    let permit = tokio::time::timeout(max_wait, running.acquire_owned()).await;
    drop(place);
    // The semaphore is never closed.
    permit.ok()?.ok()
}

/// Calls the bulkhead never limits: health checks (a saturated instance is busy, not dead,
/// and a probe that is refused would get it restarted under load), reflection, and
/// streaming methods (limited by [`crate::streams`] instead).
fn is_exempt(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.")
        || path.starts_with("/grpc.reflection.")
        || convoy_proto::methods::shape(path).is_streaming()
}

impl<S> Layer<S> for BulkheadLayer {
    type Service = Bulkhead<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Bulkhead {
            inner,
            limits: self.limits.clone(),
        }
    }
}

/// The service made by [`BulkheadLayer`].
#[derive(Clone, Debug)]
pub struct Bulkhead<S> {
    inner: S,
    limits: Arc<Limits>,
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
    type Future = BulkheadFuture<S, Request<B>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each call is made on a clone of the inner service once it may run (`oneshot`).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if is_exempt(request.uri().path()) {
            return BulkheadFuture::Running {
                inner: self.inner.clone().oneshot(request),
                permit: None,
            };
        }
        let limits = &self.limits;
        let future = match limits.running.clone().try_acquire_owned() {
            Ok(permit) => BulkheadFuture::Running {
                inner: self.inner.clone().oneshot(request),
                permit: Some(permit),
            },
            Err(_) => match limits.queue.clone().try_acquire_owned() {
                Ok(place) => BulkheadFuture::Queued {
                    turn: Box::pin(wait_turn(
                        limits.running.clone(),
                        place,
                        limits.config.max_wait,
                    )),
                    call: Some((self.inner.clone(), request)),
                    limits: limits.clone(),
                },
                Err(_) => BulkheadFuture::Refused {
                    limits: limits.clone(),
                },
            },
        };
        limits.record();
        future
    }
}

/// What [`Bulkhead`] waits on while a call is queued.
type Turn = Pin<Box<dyn Future<Output = Option<OwnedSemaphorePermit>> + Send>>;

pin_project! {
    /// Response future of [`Bulkhead`]. (Its fields are private in all but name:
    /// pin-project-lite cannot document enum fields.)
    #[allow(missing_docs)]
    #[project = BulkheadProj]
    pub enum BulkheadFuture<S, R>
    where
        S: Service<R>,
    {
        /// Running, with its permit (none for an exempt call).
        Running {
            #[pin]
            inner: Oneshot<S, R>,
            permit: Option<OwnedSemaphorePermit>,
        },
        /// Waiting for its turn.
        Queued {
            turn: Turn,
            call: Option<(S, R)>,
            limits: Arc<Limits>,
        },
        /// Refused on arrival.
        Refused { limits: Arc<Limits> },
    }
}

impl<S, R, RB> Future for BulkheadFuture<S, R>
where
    S: Service<R, Response = Response<RB>>,
    S::Error: Into<BoxError>,
    RB: Default,
{
    type Output = Result<Response<RB>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project() {
                BulkheadProj::Running { inner, .. } => return inner.poll(cx).map_err(Into::into),
                BulkheadProj::Refused { limits } => {
                    return Poll::Ready(Ok(limits.refusal(Shed::QueueFull)));
                }
                BulkheadProj::Queued { turn, call, limits } => {
                    let Some(permit) = ready!(turn.as_mut().poll(cx)) else {
                        return Poll::Ready(Ok(limits.refusal(Shed::Waited)));
                    };
                    let (service, request) = call.take().expect("polled after completion");
                    self.set(BulkheadFuture::Running {
                        inner: service.oneshot(request),
                        permit: Some(permit),
                    });
                }
            }
        }
    }
}

/// Adds the early refusal of [`BulkheadLayer::early_shed`].
#[derive(Clone, Debug)]
pub struct EarlyShedLayer {
    limits: Arc<Limits>,
}

impl<S> Layer<S> for EarlyShedLayer {
    type Service = EarlyShed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        EarlyShed {
            inner,
            limits: self.limits.clone(),
        }
    }
}

/// The service made by [`EarlyShedLayer`].
#[derive(Clone, Debug)]
pub struct EarlyShed<S> {
    inner: S,
    limits: Arc<Limits>,
}

impl<S, B, RB> Service<Request<B>> for EarlyShed<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
    RB: Default,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = EarlyShedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if self.limits.full() && !is_exempt(request.uri().path()) {
            return EarlyShedFuture::Refused {
                limits: self.limits.clone(),
            };
        }
        EarlyShedFuture::Passed {
            inner: self.inner.call(request),
        }
    }
}

pin_project! {
    /// Response future of [`EarlyShed`]. (Its fields are private in all but name:
    /// pin-project-lite cannot document enum fields.)
    #[allow(missing_docs)]
    #[project = EarlyShedProj]
    pub enum EarlyShedFuture<F> {
        /// Passed on.
        Passed {
            #[pin]
            inner: F,
        },
        /// Refused on arrival.
        Refused { limits: Arc<Limits> },
    }
}

impl<F, RB, E> Future for EarlyShedFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
    E: Into<BoxError>,
    RB: Default,
{
    type Output = Result<Response<RB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            EarlyShedProj::Passed { inner } => inner.poll(cx).map_err(Into::into),
            EarlyShedProj::Refused { limits } => Poll::Ready(Ok(limits.refusal(Shed::Early))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::time::Instant;
    use tower::ServiceExt;

    const WORK: Duration = Duration::from_secs(1);

    fn status_of(response: &Response<String>) -> Option<&str> {
        response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap())
    }

    fn bulkhead(limit: usize, queue: usize, max_wait: Duration) -> BulkheadLayer {
        BulkheadLayer::new(BulkheadConfig {
            limit,
            queue,
            max_wait,
            pushback: Duration::from_millis(250),
        })
    }

    /// A handler that works for [`WORK`] and counts its calls.
    fn slow(
        calls: Arc<AtomicUsize>,
    ) -> impl Service<Request<()>, Response = Response<String>, Error = Infallible, Future: Send>
    + Clone
    + Send
    + 'static {
        tower::service_fn(move |_req: Request<()>| {
            calls.fetch_add(1, Ordering::Relaxed);
            async {
                tokio::time::sleep(WORK).await;
                Ok::<_, Infallible>(Response::new("done".to_string()))
            }
        })
    }

    /// Starts `n` calls through `service`, each a moment after the last (so they arrive in
    /// order), and returns each one's status and how long it took.
    async fn start<S>(
        service: &S,
        n: usize,
    ) -> Vec<tokio::task::JoinHandle<(Option<String>, Duration)>>
    where
        S: Service<Request<()>, Response = Response<String>, Error = BoxError, Future: Send>
            + Clone
            + Send
            + 'static,
    {
        let mut calls = Vec::new();
        for _ in 0..n {
            let service = service.clone();
            calls.push(tokio::spawn(async move {
                let started = Instant::now();
                let response = service.oneshot(Request::new(())).await.unwrap();
                if status_of(&response).is_some() {
                    assert_eq!(response.headers().get(RETRY_PUSHBACK).unwrap(), "250");
                }
                (status_of(&response).map(str::to_owned), started.elapsed())
            }));
            tokio::task::yield_now().await;
        }
        calls
    }

    async fn outcomes(
        calls: Vec<tokio::task::JoinHandle<(Option<String>, Duration)>>,
    ) -> Vec<(Option<String>, Duration)> {
        let mut out = Vec::new();
        for call in calls {
            out.push(call.await.unwrap());
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_limit_calls_wait_their_turn_and_past_the_queue_are_refused_at_once() {
        let layer = bulkhead(2, 3, Duration::from_secs(60));
        let calls = Arc::new(AtomicUsize::new(0));
        let service = layer.layer(slow(calls.clone()));

        let started = start(&service, 7).await;
        assert_eq!((layer.in_flight(), layer.queued()), (2, 3));
        let got = outcomes(started).await;
        let ok = |rounds: u32| (None, WORK * rounds);
        let refused = (Some("8".to_string()), Duration::ZERO);
        assert_eq!(
            got,
            [ok(1), ok(1), ok(2), ok(2), ok(3), refused.clone(), refused],
            "two run, three wait in arrival order, two are refused without waiting"
        );
        assert_eq!(
            calls.load(Ordering::Relaxed),
            5,
            "refused calls never reach the handler"
        );
        assert_eq!(
            (layer.in_flight(), layer.queued()),
            (0, 0),
            "every permit is returned"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_waits_too_long_is_refused_and_leaves_the_queue() {
        let max_wait = Duration::from_millis(300);
        let layer = bulkhead(1, 4, max_wait);
        let calls = Arc::new(AtomicUsize::new(0));
        let service = layer.layer(slow(calls.clone()));

        let got = outcomes(start(&service, 3).await).await;
        let refused = (Some("8".to_string()), max_wait);
        assert_eq!(got, [(None, WORK), refused.clone(), refused]);
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        assert_eq!((layer.in_flight(), layer.queued()), (0, 0));

        // The queue is usable again.
        let got = outcomes(start(&service, 1).await).await;
        assert_eq!(got, [(None, WORK)]);
    }

    #[tokio::test(start_paused = true)]
    async fn early_shed_refuses_before_the_inner_layers_only_when_the_bulkhead_is_full() {
        let layer = bulkhead(1, 1, Duration::from_secs(60));
        let calls = Arc::new(AtomicUsize::new(0));
        // In the server, authorization sits between the two; here a counter does.
        let reached = Arc::new(AtomicUsize::new(0));
        let counted = {
            let reached = reached.clone();
            tower::ServiceBuilder::new()
                .map_request(move |request: Request<()>| {
                    reached.fetch_add(1, Ordering::Relaxed);
                    request
                })
                .layer(layer.clone())
                .service(slow(calls.clone()))
        };
        let service = tower::ServiceBuilder::new()
            .layer(layer.early_shed())
            .service(counted);

        let running_and_waiting = start(&service, 2).await;
        assert_eq!(reached.load(Ordering::Relaxed), 2, "room left: passed on");
        let refused = outcomes(start(&service, 1).await).await;
        assert_eq!(refused, [(Some("8".to_string()), Duration::ZERO)]);
        assert_eq!(reached.load(Ordering::Relaxed), 2, "full: refused in front");
        let got = outcomes(running_and_waiting).await;
        assert_eq!(got, [(None, WORK), (None, WORK * 2)]);
        let again = outcomes(start(&service, 1).await).await;
        assert_eq!(again, [(None, WORK)], "room again: passed on");
    }

    #[tokio::test(start_paused = true)]
    async fn streaming_methods_never_take_or_wait_for_a_permit() {
        let layer = bulkhead(1, 0, Duration::from_secs(60));
        let calls = Arc::new(AtomicUsize::new(0));
        let service = tower::ServiceBuilder::new()
            .layer(layer.early_shed())
            .layer(layer.clone())
            .service(slow(calls.clone()));
        let busy = start(&service, 1).await;
        assert_eq!(
            layer.in_flight(),
            1,
            "full: the next unary call would be refused"
        );
        let mut streams = Vec::new();
        for path in [
            "/convoy.v1.IngestService/IngestEvents",
            "/convoy.v1.WatchService/WatchConversation",
            "/convoy.v1.WatchService/WatchTeam",
        ] {
            for _ in 0..3 {
                let stream = Request::builder().uri(path).body(()).unwrap();
                streams.push(tokio::spawn(service.clone().oneshot(stream)));
            }
        }
        tokio::task::yield_now().await;
        assert_eq!(layer.in_flight(), 1, "the streams hold no permit");
        let unary = outcomes(start(&service, 1).await).await;
        assert_eq!(
            unary,
            [(Some("8".to_string()), Duration::ZERO)],
            "a unary call still is"
        );
        let started = Instant::now();
        for stream in streams {
            let response = stream.await.unwrap().unwrap();
            assert_eq!(status_of(&response), None, "not refused");
        }
        assert_eq!(started.elapsed(), WORK, "and none waited for one");
        assert_eq!(outcomes(busy).await, [(None, WORK)]);
    }

    #[tokio::test(start_paused = true)]
    async fn health_checks_are_answered_even_when_the_bulkhead_is_full() {
        let layer = bulkhead(1, 0, Duration::from_secs(60));
        let calls = Arc::new(AtomicUsize::new(0));
        let service = tower::ServiceBuilder::new()
            .layer(layer.early_shed())
            .layer(layer.clone())
            .service(slow(calls.clone()));
        let busy = start(&service, 1).await;
        let health = Request::builder()
            .uri("/grpc.health.v1.Health/Check")
            .body(())
            .unwrap();
        let started = Instant::now();
        let response = service.clone().oneshot(health).await.unwrap();
        assert_eq!(status_of(&response), None, "not refused");
        assert_eq!(started.elapsed(), WORK);
        assert_eq!(outcomes(busy).await, [(None, WORK)]);
    }
}
