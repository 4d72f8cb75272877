//! Deadlines: parsing `grpc-timeout`, and a server layer that enforces it.
//!
//! tonic's server enforces `grpc-timeout` too, but answers CANCELLED; gRPC says
//! DEADLINE_EXCEEDED. [`DeadlineLayer`] sits inside tonic's own timer and fires a little
//! earlier ([`DeadlineLayer::margin`]), so the client gets the right status while it is still
//! listening. It also rejects calls whose deadline has already passed before they queue, puts
//! the [`Deadline`] in the request's extensions, and makes it the handler's
//! [`Deadline::current`], from which the client stack ([`crate::propagation`]) carries it to
//! the next hop. A task the handler spawns does not inherit it: detached work is not bounded
//! by the caller.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{HeaderMap, Request, Response};
use pin_project_lite::pin_project;
use tokio::task::futures::TaskLocalFuture;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

tokio::task_local! {
    /// The deadline of the inbound call this task is serving, if it had one.
    static CURRENT: Option<Deadline>;
}

/// Name of the gRPC deadline header.
pub const GRPC_TIMEOUT: &str = "grpc-timeout";

/// The instant by which a call must be answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline(pub Instant);

impl Deadline {
    /// The deadline `timeout` from now.
    pub fn after(timeout: Duration) -> Self {
        Self(Instant::now() + timeout)
    }

    /// The deadline of the inbound call being served by this task, if any.
    pub fn current() -> Option<Self> {
        CURRENT.try_with(|d| *d).ok().flatten()
    }

    /// Runs `future` with `deadline` as its [`Deadline::current`].
    pub fn scope<F: Future>(
        deadline: Option<Self>,
        future: F,
    ) -> tokio::task::futures::TaskLocalFuture<Option<Self>, F> {
        CURRENT.scope(deadline, future)
    }

    /// Time left, zero when passed.
    pub fn remaining(&self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    /// Reads the deadline that `grpc-timeout` in `headers` sets, measured from now.
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Self>, BadTimeout> {
        match headers.get(GRPC_TIMEOUT) {
            None => Ok(None),
            Some(value) => {
                let text = value.to_str().map_err(|_| BadTimeout)?;
                parse_grpc_timeout(text).map(|t| Some(Self::after(t)))
            }
        }
    }
}

/// A `grpc-timeout` value that does not follow the gRPC spec.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed grpc-timeout header: expected 1 to 8 digits and a unit (H, M, S, m, u, n)")]
pub struct BadTimeout;

/// Parses a `grpc-timeout` value: at most 8 ASCII digits followed by one unit letter.
pub fn parse_grpc_timeout(text: &str) -> Result<Duration, BadTimeout> {
    let (digits, unit) = text.split_at(text.len().checked_sub(1).ok_or(BadTimeout)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(BadTimeout);
    }
    let n: u64 = digits.parse().map_err(|_| BadTimeout)?;
    Ok(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return Err(BadTimeout),
    })
}

/// Formats a duration as a `grpc-timeout` value, in the finest unit that fits 8 digits.
pub fn format_grpc_timeout(timeout: Duration) -> String {
    const MAX: u128 = 99_999_999;
    let units: [(u128, &str); 6] = [
        (1, "n"),
        (1_000, "u"),
        (1_000_000, "m"),
        (1_000_000_000, "S"),
        (60_000_000_000, "M"),
        (3_600_000_000_000, "H"),
    ];
    let nanos = timeout.as_nanos();
    for (per, unit) in units {
        // Round up to the unit: at most one unit longer than ours, and never zero for a
        // positive timeout.
        let n = nanos.div_ceil(per);
        if n <= MAX {
            return format!("{n}{unit}");
        }
    }
    format!("{MAX}H")
}

/// Enforces each call's deadline; see the module docs.
#[derive(Clone, Copy, Debug)]
pub struct DeadlineLayer {
    margin: Duration,
}

impl DeadlineLayer {
    /// A layer that answers DEADLINE_EXCEEDED `margin` before the caller's deadline.
    pub fn margin(margin: Duration) -> Self {
        Self { margin }
    }
}

impl Default for DeadlineLayer {
    /// 2 ms: enough for the answer to leave before tonic's own timer fires.
    fn default() -> Self {
        Self::margin(Duration::from_millis(2))
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = DeadlineService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DeadlineService {
            inner,
            margin: self.margin,
        }
    }
}

/// The service made by [`DeadlineLayer`].
#[derive(Clone, Debug)]
pub struct DeadlineService<S> {
    inner: S,
    margin: Duration,
}

// === impl DeadlineService ===

impl<S, B, RB> Service<Request<B>> for DeadlineService<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    RB: Default,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = DeadlineFuture<TaskLocalFuture<Option<Deadline>, S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let deadline = match Deadline::from_headers(request.headers()) {
            Ok(deadline) => deadline,
            Err(e) => {
                return DeadlineFuture::rejected(tonic::Status::invalid_argument(e.to_string()));
            }
        };
        let Some(deadline) = deadline else {
            return DeadlineFuture::unbounded(Deadline::scope(None, self.inner.call(request)));
        };
        let fire_at = deadline.0.checked_sub(self.margin).unwrap_or(deadline.0);
        if fire_at <= Instant::now() {
            return DeadlineFuture::rejected(expired());
        }
        request.extensions_mut().insert(deadline);
        DeadlineFuture {
            state: State::Running {
                inner: Deadline::scope(Some(deadline), self.inner.call(request)),
                sleep: Some(tokio::time::sleep_until(fire_at)),
            },
        }
    }
}

/// The status of a call whose deadline passed.
pub(crate) fn expired() -> tonic::Status {
    tonic::Status::deadline_exceeded("the caller's deadline passed before the call completed")
}

pin_project! {
    /// Response future of [`DeadlineService`].
    pub struct DeadlineFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Running { #[pin] inner: F, #[pin] sleep: Option<Sleep> },
        Rejected { status: Option<tonic::Status> },
    }
}

impl<F> DeadlineFuture<F> {
    fn unbounded(inner: F) -> Self {
        Self {
            state: State::Running { inner, sleep: None },
        }
    }

    fn rejected(status: tonic::Status) -> Self {
        Self {
            state: State::Rejected {
                status: Some(status),
            },
        }
    }
}

impl<F, RB, E> Future for DeadlineFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
    RB: Default,
{
    type Output = Result<Response<RB>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Rejected { status } => {
                let status = status.take().expect("polled after completion");
                Poll::Ready(Ok(status.into_http()))
            }
            StateProj::Running { inner, sleep } => {
                if let Poll::Ready(out) = inner.poll(cx) {
                    return Poll::Ready(out);
                }
                match sleep.as_pin_mut() {
                    Some(sleep) => {
                        ready!(sleep.poll(cx));
                        Poll::Ready(Ok(expired().into_http()))
                    }
                    None => Poll::Pending,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower::ServiceExt;

    #[test]
    fn grpc_timeout_values_parse_per_spec() {
        assert_eq!(parse_grpc_timeout("100m"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Ok(Duration::from_secs(3600)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Ok(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "m", "100", "123456789m", "10x", "-1S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), Err(BadTimeout), "{bad:?}");
        }
    }

    #[test]
    fn formatted_timeouts_round_trip_without_growing() {
        for d in [
            Duration::from_nanos(1),
            Duration::from_millis(250),
            Duration::from_secs(30),
            Duration::from_secs(86_400 * 30),
        ] {
            let back = parse_grpc_timeout(&format_grpc_timeout(d)).unwrap();
            assert!(back >= d, "{d:?} came back as {back:?}");
        }
    }

    fn slow_service(
        delay: Duration,
    ) -> impl Service<Request<()>, Response = Response<String>, Error = Infallible> + Clone {
        tower::service_fn(move |_req: Request<()>| async move {
            tokio::time::sleep(delay).await;
            Ok::<_, Infallible>(Response::new("done".to_string()))
        })
    }

    fn grpc_status(response: &Response<String>) -> Option<String> {
        response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_owned())
    }

    #[tokio::test(start_paused = true)]
    async fn slow_call_past_its_deadline_gets_deadline_exceeded() {
        let svc = DeadlineLayer::default().layer(slow_service(Duration::from_secs(10)));
        let request = Request::builder()
            .header(GRPC_TIMEOUT, "100m")
            .body(())
            .unwrap();
        let started = Instant::now();
        let response = svc.oneshot(request).await.unwrap();
        assert_eq!(grpc_status(&response).as_deref(), Some("4"));
        assert_eq!(started.elapsed(), Duration::from_millis(98));
    }

    #[tokio::test(start_paused = true)]
    async fn call_within_its_deadline_is_untouched() {
        let svc = DeadlineLayer::default().layer(slow_service(Duration::from_millis(50)));
        let request = Request::builder()
            .header(GRPC_TIMEOUT, "1S")
            .body(())
            .unwrap();
        let response = svc.oneshot(request).await.unwrap();
        assert_eq!(grpc_status(&response), None);
        assert_eq!(response.into_body(), "done");
    }

    #[tokio::test(start_paused = true)]
    async fn calls_without_a_deadline_are_not_bounded_and_bad_ones_are_refused() {
        let svc = DeadlineLayer::default().layer(slow_service(Duration::from_secs(3600)));
        let response = svc.clone().oneshot(Request::new(())).await.unwrap();
        assert_eq!(response.into_body(), "done");

        let request = Request::builder()
            .header(GRPC_TIMEOUT, "soon")
            .body(())
            .unwrap();
        let response = svc.clone().oneshot(request).await.unwrap();
        assert_eq!(grpc_status(&response).as_deref(), Some("3"));

        // Already (nearly) expired: rejected before the handler runs.
        let request = Request::builder()
            .header(GRPC_TIMEOUT, "1m")
            .body(())
            .unwrap();
        let response = svc.oneshot(request).await.unwrap();
        assert_eq!(grpc_status(&response).as_deref(), Some("4"));
    }
}
