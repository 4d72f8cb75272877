//! Client side of deadlines: every outgoing call carries the time its caller has left.
//!
//! The budget of an outgoing call is the smaller of the configured per-call timeout and the
//! inbound call's remaining time ([`Deadline::current`], or a [`Deadline`] put in the
//! request's extensions) minus a margin for the answer's way back. It travels as
//! `grpc-timeout`, so the next hop stops working when nobody is waiting any more, and it is
//! enforced here too, answering DEADLINE_EXCEEDED. This layer sits outside retries, so one
//! budget covers every attempt. tonic's `Endpoint::timeout` neither sends `grpc-timeout` nor
//! knows the caller's deadline; no Rust anchor propagates deadlines (Finagle does).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::{Layer, Service};

use crate::deadline::{Deadline, GRPC_TIMEOUT, expired, format_grpc_timeout, parse_grpc_timeout};

/// Adds deadline propagation; see the module docs.
#[derive(Clone, Copy, Debug)]
pub struct DeadlinePropagationLayer {
    per_call: Duration,
    margin: Duration,
}

impl DeadlinePropagationLayer {
    /// Calls get at most `per_call`, and at most the caller's remaining time minus `margin`.
    pub fn new(per_call: Duration, margin: Duration) -> Self {
        Self { per_call, margin }
    }
}

impl Default for DeadlinePropagationLayer {
    /// 10 s per call; 5 ms kept back for the answer to travel back up the chain.
    fn default() -> Self {
        Self::new(Duration::from_secs(10), Duration::from_millis(5))
    }
}

impl<S> Layer<S> for DeadlinePropagationLayer {
    type Service = DeadlinePropagation<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DeadlinePropagation {
            inner,
            per_call: self.per_call,
            margin: self.margin,
        }
    }
}

/// The service made by [`DeadlinePropagationLayer`].
#[derive(Clone, Debug)]
pub struct DeadlinePropagation<S> {
    inner: S,
    per_call: Duration,
    margin: Duration,
}

impl<S> DeadlinePropagation<S> {
    /// The budget of a call that inherits `inherited`.
    fn budget(&self, inherited: Option<Deadline>) -> Duration {
        match inherited {
            Some(d) => self.per_call.min(d.remaining().saturating_sub(self.margin)),
            None => self.per_call,
        }
    }
}

// === impl DeadlinePropagation ===

impl<S, B, RB> Service<Request<B>> for DeadlinePropagation<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    RB: Default,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = PropagationFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let inherited = request
            .extensions()
            .get::<Deadline>()
            .copied()
            .or_else(Deadline::current);
        let mut budget = self.budget(inherited);
        // A shorter grpc-timeout already on the request (set by the caller) stands.
        if let Some(existing) = request
            .headers()
            .get(GRPC_TIMEOUT)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_grpc_timeout(v).ok())
        {
            budget = budget.min(existing);
        }
        if budget.is_zero() {
            return PropagationFuture {
                inner: None,
                sleep: None,
            };
        }
        let header = HeaderValue::try_from(format_grpc_timeout(budget))
            .expect("a formatted grpc-timeout is a valid header value");
        request.headers_mut().insert(GRPC_TIMEOUT, header);
        PropagationFuture {
            inner: Some(self.inner.call(request)),
            sleep: Some(tokio::time::sleep(budget)),
        }
    }
}

pin_project! {
    /// Response future of [`DeadlinePropagation`].
    pub struct PropagationFuture<F> {
        #[pin]
        inner: Option<F>,
        #[pin]
        sleep: Option<Sleep>,
    }
}

impl<F, RB, E> Future for PropagationFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
    RB: Default,
{
    type Output = Result<Response<RB>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            // No time left: answer without calling.
            return Poll::Ready(Ok(expired().into_http()));
        };
        if let Poll::Ready(out) = inner.poll(cx) {
            return Poll::Ready(out);
        }
        if let Some(sleep) = this.sleep.as_pin_mut() {
            ready!(sleep.poll(cx));
            return Poll::Ready(Ok(expired().into_http()));
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DeadlineLayer;
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};
    use tower::ServiceExt;

    type Seen = Arc<Mutex<Vec<Duration>>>;

    /// A downstream hop that records the grpc-timeout it receives, then takes `delay`.
    fn downstream(
        seen: Seen,
        delay: Duration,
    ) -> impl Service<Request<()>, Response = Response<String>, Error = Infallible> + Clone {
        tower::service_fn(move |req: Request<()>| {
            let seen = seen.clone();
            async move {
                let header = req
                    .headers()
                    .get(GRPC_TIMEOUT)
                    .map(|v| v.to_str().unwrap().to_owned());
                seen.lock()
                    .unwrap()
                    .push(parse_grpc_timeout(&header.expect("grpc-timeout sent")).unwrap());
                tokio::time::sleep(delay).await;
                Ok::<_, Infallible>(Response::new("ok".to_string()))
            }
        })
    }

    fn status(response: &Response<String>) -> Option<&str> {
        response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn the_outer_callers_deadline_reaches_the_second_hop() {
        let seen = Seen::default();
        let client =
            DeadlinePropagationLayer::new(Duration::from_secs(10), Duration::from_millis(5))
                .layer(downstream(seen.clone(), Duration::ZERO));
        // The first hop's handler: spends 100 ms, then calls the second hop.
        let first_hop = tower::service_fn(move |_req: Request<()>| {
            let client = client.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                client.oneshot(Request::new(())).await
            }
        });
        let server = DeadlineLayer::default().layer(first_hop);
        let request = Request::builder()
            .header(GRPC_TIMEOUT, "1S")
            .body(())
            .unwrap();
        let response = server.oneshot(request).await.unwrap();
        assert_eq!(status(&response), None);
        // 1 s - 100 ms spent - 5 ms margin.
        assert_eq!(*seen.lock().unwrap(), vec![Duration::from_millis(895)]);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_caller_deadline_the_per_call_timeout_applies_and_is_enforced() {
        let seen = Seen::default();
        let client =
            DeadlinePropagationLayer::new(Duration::from_millis(300), Duration::from_millis(5))
                .layer(downstream(seen.clone(), Duration::from_secs(60)));
        let started = tokio::time::Instant::now();
        let response = client.oneshot(Request::new(())).await.unwrap();
        assert_eq!(status(&response), Some("4"));
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        assert_eq!(*seen.lock().unwrap(), vec![Duration::from_millis(300)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_shorter_timeout_set_by_the_caller_stands() {
        let seen = Seen::default();
        let client =
            DeadlinePropagationLayer::default().layer(downstream(seen.clone(), Duration::ZERO));
        let request = Request::builder()
            .header(GRPC_TIMEOUT, "100m")
            .body(())
            .unwrap();
        client.oneshot(request).await.unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![Duration::from_millis(100)]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_caller_deadline_sends_nothing() {
        let seen = Seen::default();
        let client =
            DeadlinePropagationLayer::default().layer(downstream(seen.clone(), Duration::ZERO));
        let mut request = Request::new(());
        request
            .extensions_mut()
            .insert(Deadline::after(Duration::from_millis(3)));
        let response = client.oneshot(request).await.unwrap();
        assert_eq!(status(&response), Some("4"));
        assert!(seen.lock().unwrap().is_empty(), "no call past the deadline");
    }
}
