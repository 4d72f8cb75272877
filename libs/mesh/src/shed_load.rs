//! Load as the balancer sees it: peak-EWMA latency, ranked behind any endpoint that is
//! shedding.
//!
//! An endpoint whose bulkhead and queue are full answers RESOURCE_EXHAUSTED at once, and
//! peak-EWMA reads a fast answer as a light load: left alone, a shedding endpoint would attract more traffic
//! exactly when it has no room for it. [`ShedAware`] remembers a shed answer until the
//! endpoint's pushback has passed (`grpc-retry-pushback-ms`, or one second) and ranks the
//! endpoint after every endpoint that is not shedding, so p2c picks it only when its
//! alternative is shedding too.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::Response;
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::Service;
use tower::load::Load;

use crate::bulkhead::RETRY_PUSHBACK;

/// How long a shed answer without pushback keeps an endpoint ranked last.
const DEFAULT_SHED_PENALTY: Duration = Duration::from_secs(1);

/// Wraps an endpoint's load with a shedding rank; see the module docs.
#[derive(Debug)]
pub struct ShedAware<S> {
    inner: S,
    shedding_until: Arc<Mutex<Option<Instant>>>,
}

impl<S> ShedAware<S> {
    /// Tracks `inner`'s shed answers.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            shedding_until: Arc::new(Mutex::new(None)),
        }
    }

    fn shedding(&self) -> bool {
        let until = *self
            .shedding_until
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        until.is_some_and(|until| Instant::now() < until)
    }
}

impl<S: Load> Load for ShedAware<S> {
    /// `(shedding, inner load)`: tuples order by their first element first.
    type Metric = (bool, S::Metric);

    fn load(&self) -> Self::Metric {
        (self.shedding(), self.inner.load())
    }
}

// === impl ShedAware ===

impl<S, Req, B> Service<Req> for ShedAware<S>
where
    S: Service<Req, Response = Response<B>>,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = ShedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        ShedFuture {
            inner: self.inner.call(request),
            shedding_until: self.shedding_until.clone(),
        }
    }
}

pin_project! {
    /// Response future of [`ShedAware`].
    pub struct ShedFuture<F> {
        #[pin]
        inner: F,
        shedding_until: Arc<Mutex<Option<Instant>>>,
    }
}

impl<F, B, E> Future for ShedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        if let Ok(response) = &result {
            let headers = response.headers();
            if headers.get("grpc-status").is_some_and(|v| v == "8") {
                let penalty = headers
                    .get(RETRY_PUSHBACK)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(Duration::from_millis)
                    .unwrap_or(DEFAULT_SHED_PENALTY);
                *this
                    .shedding_until
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + penalty);
            }
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::ServiceExt;
    use tower::balance::p2c::Balance;
    use tower::discover::Change;
    use tower::load::{CompleteOnResponse, PeakEwma};

    /// An endpoint that answers after `delay`, shedding (RESOURCE_EXHAUSTED with 500 ms
    /// pushback) when `shed` is set; counts its calls.
    fn endpoint(
        delay: Duration,
        shed: bool,
        calls: Arc<AtomicUsize>,
    ) -> impl Service<(), Response = Response<()>, Error = Infallible, Future = impl Send> + Clone + Send
    {
        tower::service_fn(move |()| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(delay).await;
                let mut response = Response::new(());
                if shed {
                    response
                        .headers_mut()
                        .insert("grpc-status", "8".parse().unwrap());
                    response
                        .headers_mut()
                        .insert(RETRY_PUSHBACK, "500".parse().unwrap());
                }
                Ok(response)
            }
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_shedding_endpoint_does_not_attract_traffic_with_its_fast_answers() {
        let (shedder, healthy) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let wrap = |service| {
            ShedAware::new(PeakEwma::new(
                service,
                Duration::from_millis(30),
                Duration::from_secs(10).as_nanos() as f64,
                CompleteOnResponse::default(),
            ))
        };
        let endpoints = vec![
            Change::Insert(
                0,
                wrap(endpoint(Duration::from_micros(50), true, shedder.clone()).boxed_clone()),
            ),
            Change::Insert(
                1,
                wrap(endpoint(Duration::from_millis(5), false, healthy.clone()).boxed_clone()),
            ),
        ];
        let discover = futures::stream::iter(endpoints.into_iter().map(Ok::<_, Infallible>));
        let mut balance = Balance::new(discover);
        for _ in 0..100 {
            balance.ready().await.unwrap().call(()).await.unwrap();
        }
        let shed_calls = shedder.load(Ordering::SeqCst);
        // Without the rank, the 50 µs shedder would win almost every pick against 5 ms.
        assert!(shed_calls <= 2, "the shedder got {shed_calls} of 100 calls");
        assert_eq!(healthy.load(Ordering::SeqCst) + shed_calls, 100);
    }
}
