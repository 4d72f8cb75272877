//! The client's balanced channel: endpoints from discovery, each behind a connection-aware
//! readiness gate and a circuit breaker, chosen by power of two choices over peak-EWMA load
//! (with shedding endpoints ranked last), behind a bounded queue that fails fast when
//! nothing is ready.
//!
//! Discovery is consumed eagerly by a task of its own, which also builds each endpoint's
//! stack as soon as it appears, so connections are made before the first request needs them
//! and the watch never stalls. Not tonic's `balance_channel`: it balances on a constant load
//! (random choice) and its reconnecting channels make dead endpoints look ready.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use convoy_discovery::Changes;
use futures::{StreamExt, TryStreamExt};
use http::{Request, Response};
use tokio::time::Sleep;
use tonic::body::Body;
use tower::balance::p2c::Balance;
use tower::buffer::Buffer;
use tower::discover::Change;
use tower::load::{CompleteOnResponse, PeakEwmaDiscover};
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Layer, Service};

use crate::breaker::{BreakerConfig, BreakerLayer, EjectionBudget};
use crate::bulkhead::RETRY_PUSHBACK;
use crate::endpoint::{EndpointAbort, EndpointConfig, EndpointService};
use crate::shed_load::ShedAware;

/// The balanced channel's type: clone it freely, every clone shares the balancer.
pub type BalancedChannel = BoxCloneSyncService<Request<Body>, Response<Body>, BoxError>;

/// Balancing settings.
#[derive(Clone, Debug)]
pub struct BalanceConfig {
    /// How endpoints connect.
    pub endpoint: EndpointConfig,
    /// Each endpoint's breaker.
    pub breaker: BreakerConfig,
    /// Most endpoints ejected at once, as a share of the set. 0.5: with the few instances
    /// per service convoy runs, ejecting more would overload the rest.
    pub max_ejection_share: f64,
    /// Requests queued in front of the balancer. 1024; past it callers wait for room.
    pub queue_capacity: usize,
    /// How long the balancer may have no ready endpoint before queued and new calls fail
    /// with UNAVAILABLE instead of waiting. 1 s, as in linkerd's fail-fast.
    pub failfast_timeout: Duration,
    /// Load assumed for a new endpoint. 30 ms: linkerd's default.
    pub default_rtt: Duration,
    /// How quickly the peak-EWMA estimate forgets. 10 s: linkerd's default.
    pub decay: Duration,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        Self {
            endpoint: EndpointConfig::default(),
            breaker: BreakerConfig::default(),
            max_ejection_share: 0.5,
            queue_capacity: 1024,
            failfast_timeout: Duration::from_secs(1),
            default_rtt: Duration::from_millis(30),
            decay: Duration::from_secs(10),
        }
    }
}

/// Builds a balanced channel over the endpoints `changes` announces. Must be called inside
/// a tokio runtime (it spawns the discovery and buffer tasks).
pub fn balanced_channel(mut changes: Changes, config: BalanceConfig) -> BalancedChannel {
    let budget = EjectionBudget::new(config.max_ejection_share);
    let breaker = BreakerLayer::new(config.breaker.clone(), budget);
    let endpoint_config = config.endpoint.clone();
    // Unbounded: the task must never wait on an idle balancer (which reads changes only
    // when a request comes), and membership changes are few and small.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        // Each endpoint's connection task, stopped as soon as the endpoint leaves the set
        // (the balancer drops its service only when it next applies changes).
        let mut connecting: HashMap<String, EndpointAbort> = HashMap::new();
        loop {
            let change = tokio::select! {
                () = tx.closed() => break, // the balancer is gone
                change = changes.next() => match change {
                    Some(change) => change,
                    // The set stays as it is; its endpoints live as long as the balancer.
                    None => return,
                },
            };
            let change = match change {
                Ok(Change::Insert(key, endpoint)) => {
                    metrics::counter!("convoy_client_endpoint_updates_total", "change" => "insert")
                        .increment(1);
                    match EndpointService::new(endpoint.addr.clone(), endpoint_config.clone()) {
                        Ok(service) => {
                            if let Some(old) =
                                connecting.insert(key.clone(), service.abort_handle())
                            {
                                old.abort();
                            }
                            let breaker = breaker.for_endpoint(service.addr());
                            Ok(Change::Insert(key, breaker.layer(service)))
                        }
                        Err(e) => {
                            tracing::warn!(addr = %endpoint.addr, error = %e, "unusable endpoint address");
                            continue;
                        }
                    }
                }
                Ok(Change::Remove(key)) => {
                    metrics::counter!("convoy_client_endpoint_updates_total", "change" => "remove")
                        .increment(1);
                    if let Some(old) = connecting.remove(&key) {
                        old.abort();
                    }
                    Ok(Change::Remove(key))
                }
                Err(e) => Err(BoxError::from(e)),
            };
            if tx.send(change).is_err() {
                break;
            }
        }
        // The balancer is gone: stop every connection task it left.
        for (_, task) in connecting {
            task.abort();
        }
    });
    let discover = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
    let discover = PeakEwmaDiscover::new::<Request<Body>>(
        discover,
        config.default_rtt,
        config.decay,
        CompleteOnResponse::default(),
    );
    // Shedding endpoints rank last, whatever their latency (see `shed_load`).
    let discover = discover.map_ok(|change| match change {
        Change::Insert(key, service) => Change::Insert(key, ShedAware::new(service)),
        Change::Remove(key) => Change::Remove(key),
    });
    let balance = Balance::new(discover);
    let failfast = FailFast::new(balance, config.failfast_timeout);
    let buffer = Buffer::new(failfast, config.queue_capacity);
    BoxCloneSyncService::new(buffer)
}

/// Fails calls fast while the inner service has been unready for too long; see
/// [`BalanceConfig::failfast_timeout`]. The answer says not to retry.
pub struct FailFast<S> {
    inner: S,
    timeout: Duration,
    unready_since: Option<Pin<Box<Sleep>>>,
    failing: bool,
}

impl<S> FailFast<S> {
    /// Wraps `inner`, failing fast after `timeout` without readiness.
    pub fn new(inner: S, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            unready_since: None,
            failing: false,
        }
    }
}

// === impl FailFast ===

impl<S> Service<Request<Body>> for FailFast<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match self.inner.poll_ready(cx) {
            Poll::Ready(result) => {
                self.unready_since = None;
                if self.failing {
                    tracing::info!("an endpoint is ready again; leaving fail-fast");
                }
                self.failing = false;
                Poll::Ready(result.map_err(Into::into))
            }
            Poll::Pending if self.failing => Poll::Ready(Ok(())),
            Poll::Pending => {
                let timeout = self.timeout;
                let sleep = self
                    .unready_since
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                std::task::ready!(sleep.as_mut().poll(cx));
                tracing::warn!(?timeout, "no endpoint ready; failing fast");
                self.failing = true;
                Poll::Ready(Ok(()))
            }
        }
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        if self.failing {
            metrics::counter!("convoy_client_failfast_total").increment(1);
            let mut response = tonic::Status::unavailable("no endpoint of the service is ready")
                .into_http::<Body>();
            // Negative pushback means "do not retry" (gRFC A6): with nothing ready, another
            // attempt would only spend the retry budget.
            response
                .headers_mut()
                .insert(RETRY_PUSHBACK, http::HeaderValue::from_static("-1"));
            return Box::pin(std::future::ready(Ok(response)));
        }
        let future = self.inner.call(request);
        Box::pin(async move { future.await.map_err(Into::into) })
    }
}

impl<S> std::fmt::Debug for FailFast<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailFast")
            .field("timeout", &self.timeout)
            .field("failing", &self.failing)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test(start_paused = true)]
    async fn with_nothing_ready_calls_fail_fast_and_say_not_to_retry() {
        // A balancer whose discovery never yields an endpoint.
        let channel = balanced_channel(
            convoy_discovery::static_endpoints(Vec::new()),
            BalanceConfig::default(),
        );
        let started = tokio::time::Instant::now();
        let response = channel.oneshot(Request::new(Body::empty())).await.unwrap();
        assert_eq!(response.headers().get("grpc-status").unwrap(), "14");
        assert_eq!(response.headers().get(RETRY_PUSHBACK).unwrap(), "-1");
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(1),
            "after the fail-fast timeout"
        );
    }
}
