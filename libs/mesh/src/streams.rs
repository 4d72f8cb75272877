//! Long-lived streams as a resource of their own: how many may be open, for how long, and
//! what ends them.
//!
//! A unary call holds the bulkhead's permit ([`crate::bulkhead`]) for moments; a stream may
//! stay open for hours doing nothing. Were streams to hold permits, a few hundred idle ones
//! would take the instance from everyone, so they never do (the bulkhead lets every
//! streaming method through, told apart by the contract's own declarations:
//! [`convoy_proto::methods::shape`]). They are limited here instead, on arrival and without
//! a queue:
//!
//! - at most `max_streams` open on the instance ([`DEFAULT_MAX_STREAMS`]), and at most
//!   `max_streams_per_team` of one team ([`DEFAULT_MAX_STREAMS_PER_TEAM`]), so a team that
//!   opens many streams exhausts only its own share. The team is the one the authorization
//!   layer found in the request ([`StreamTeam`]: a server stream's request, a client
//!   stream's first message). A stream naming no team (fleet-scoped, or a server without
//!   authorization) counts against the instance's limit only. Past a limit, a new stream is
//!   answered RESOURCE_EXHAUSTED at once with `google.rpc.QuotaFailure` naming the team (or
//!   the instance) and `google.rpc.RetryInfo`.
//! - a client stream with no message for `idle_timeout` ([`DEFAULT_STREAM_IDLE_TIMEOUT_MS`])
//!   ends DEADLINE_EXCEEDED with the `ErrorInfo` reason `STREAM_IDLE`. (Not CANCELLED: tonic
//!   reads a CANCELLED request stream as a clean end, and the service would take a cut
//!   stream for a finished one.)
//! - every stream ends at its maximum lifetime, `client_lifetime` or `server_lifetime`
//!   ([`DEFAULT_CLIENT_STREAM_LIFETIME_S`], [`DEFAULT_SERVER_STREAM_LIFETIME_S`]; a server
//!   stream's is shortened by up to [`LIFETIME_JITTER`] at random, so streams opened
//!   together do not all come back together), with UNAVAILABLE and the `ErrorInfo` reason
//!   `STREAM_LIFETIME`: the client resumes (a watch after the last sequence it received,
//!   which the SDK does by itself) or sends again (ingestion is idempotent).
//! - at the caller's deadline (`grpc-timeout`), DEADLINE_EXCEEDED: [`crate::DeadlineLayer`]
//!   bounds the wait for the response's head, this layer the rest of the stream.
//! - when its rights end ([`StreamRights`]: a token expires, or a key reload no longer
//!   verifies it), UNAUTHENTICATED with the verifier's `ErrorInfo` reason.
//!
//! A stream that ends early ends at once: before the response's head the service's future
//! is dropped and the status answered; after it, the response body ends with the status in
//! its trailers. A stream's place counts until its response body is over.
//!
//! Not here: the bytes of the messages read to authorize a stream (`convoy_auth`'s budget),
//! or what a stream may do (authorization).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use convoy_auth::{StreamRights, StreamTeam};
use convoy_proto::methods::{self, Shape};
use http::{HeaderMap, Request, Response};
use http_body::{Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tonic::body::Body;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use tower::{BoxError, Layer, Service};

use crate::deadline::Deadline;

/// `--max-streams`' default: 1024 streams open on one instance. An idle stream costs tens of
/// KiB (its HTTP/2 state, a task, a few buffers); a busy one at most what its service lets
/// it hold (an ingest batch, a watcher's queue: see docs/security.md), so this bounds the
/// instance's memory to a small share of a node's.
pub const DEFAULT_MAX_STREAMS: usize = 1024;

/// `--max-streams-per-team`' default: 64, a sixteenth of the instance, so sixteen teams
/// at their limit still leave nothing exhausted, and one team never can.
pub const DEFAULT_MAX_STREAMS_PER_TEAM: usize = 64;

/// `--stream-idle-timeout-ms`' default: 60 s without a message ends a client stream. An
/// import sends its lines as fast as it reads them, so a minute of silence is a client
/// that is gone or holding a place for nothing.
pub const DEFAULT_STREAM_IDLE_TIMEOUT_MS: u64 = 60_000;

/// `--client-stream-lifetime-s`' default: 10 min, twice the longest call `convoyctl import`
/// makes (300 s for a stream of 5,000 lines).
pub const DEFAULT_CLIENT_STREAM_LIFETIME_S: u64 = 600;

/// `--server-stream-lifetime-s`' default: 30 min. Resuming a watch costs one read; ending
/// watches now and then lets them spread over new instances and frees what a
/// forgotten watcher holds.
pub const DEFAULT_SERVER_STREAM_LIFETIME_S: u64 = 1800;

/// Share of a server stream's lifetime taken off at random: 10%, like gRPC's
/// `MAX_CONNECTION_AGE` jitter, so watchers opened together resume at different times.
pub const LIFETIME_JITTER: f64 = 0.1;

/// How long a refused stream is told to wait before it tries again: 1 s. Streams end far
/// more slowly than calls, so an earlier retry would most likely be refused again.
pub const STREAM_PUSHBACK: Duration = Duration::from_secs(1);

/// `google.rpc.ErrorInfo.domain` of the statuses this layer ends streams with.
pub const ERROR_DOMAIN: &str = "streams.convoy.dev";

/// How many streams may be open, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamsConfig {
    /// Streams open at once on the instance.
    pub max_streams: usize,
    /// Streams open at once for one team.
    pub max_streams_per_team: usize,
    /// Longest a client stream may go without a message.
    pub idle_timeout: Duration,
    /// Longest a client (or bidi) stream may stay open.
    pub client_lifetime: Duration,
    /// Longest a server stream may stay open (less its jitter).
    pub server_lifetime: Duration,
    /// How long a refused client is told to wait.
    pub pushback: Duration,
}

impl Default for StreamsConfig {
    fn default() -> Self {
        Self {
            max_streams: DEFAULT_MAX_STREAMS,
            max_streams_per_team: DEFAULT_MAX_STREAMS_PER_TEAM,
            idle_timeout: Duration::from_millis(DEFAULT_STREAM_IDLE_TIMEOUT_MS),
            client_lifetime: Duration::from_secs(DEFAULT_CLIENT_STREAM_LIFETIME_S),
            server_lifetime: Duration::from_secs(DEFAULT_SERVER_STREAM_LIFETIME_S),
            pushback: STREAM_PUSHBACK,
        }
    }
}

/// The stream limits, as flags every convoy server takes (with `CONVOY_*` environment
/// fallbacks).
#[derive(Clone, Debug, clap::Args)]
pub struct StreamArgs {
    /// Streams (watches, ingestion) open at once on this instance; past it a new stream is
    /// refused RESOURCE_EXHAUSTED. Streams never take the bulkhead's places.
    #[arg(long, env = "CONVOY_MAX_STREAMS", default_value_t = DEFAULT_MAX_STREAMS)]
    pub max_streams: usize,
    /// Streams open at once for one team on this instance; past it the team's new streams
    /// are refused RESOURCE_EXHAUSTED, other teams' are not.
    #[arg(long, env = "CONVOY_MAX_STREAMS_PER_TEAM", default_value_t = DEFAULT_MAX_STREAMS_PER_TEAM)]
    pub max_streams_per_team: usize,
    /// Longest a client stream may go without a message, in milliseconds; then it ends
    /// DEADLINE_EXCEEDED (reason STREAM_IDLE).
    #[arg(long, env = "CONVOY_STREAM_IDLE_TIMEOUT_MS", default_value_t = DEFAULT_STREAM_IDLE_TIMEOUT_MS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub stream_idle_timeout_ms: u64,
    /// Longest a client stream may stay open, in seconds; then it ends UNAVAILABLE (reason
    /// STREAM_LIFETIME) and the client sends again.
    #[arg(long, env = "CONVOY_CLIENT_STREAM_LIFETIME_S", default_value_t = DEFAULT_CLIENT_STREAM_LIFETIME_S,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub client_stream_lifetime_s: u64,
    /// Longest a server stream (a watch) may stay open, in seconds, less up to 10% at
    /// random; then it ends UNAVAILABLE (reason STREAM_LIFETIME) and the client resumes.
    #[arg(long, env = "CONVOY_SERVER_STREAM_LIFETIME_S", default_value_t = DEFAULT_SERVER_STREAM_LIFETIME_S,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub server_stream_lifetime_s: u64,
}

impl StreamArgs {
    /// The limits these flags ask for.
    pub fn config(&self) -> StreamsConfig {
        StreamsConfig {
            max_streams: self.max_streams,
            max_streams_per_team: self.max_streams_per_team,
            idle_timeout: Duration::from_millis(self.stream_idle_timeout_ms),
            client_lifetime: Duration::from_secs(self.client_stream_lifetime_s),
            server_lifetime: Duration::from_secs(self.server_stream_lifetime_s),
            pushback: STREAM_PUSHBACK,
        }
    }
}

/// Adds the stream limits; see the module docs. Goes inside authorization (which names the
/// team and the rights) and outside the bulkhead.
#[derive(Clone, Debug)]
pub struct StreamsLayer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: StreamsConfig,
    open: Mutex<Open>,
}

/// The streams open now: in all, and per team (a team with none has no entry, so the map
/// holds at most `max_streams` entries).
#[derive(Debug, Default)]
struct Open {
    total: usize,
    teams: HashMap<Arc<str>, usize>,
}

impl StreamsLayer {
    /// Limits sized by `config`.
    pub fn new(config: StreamsConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                config,
                open: Mutex::new(Open::default()),
            }),
        }
    }

    /// Streams open now.
    pub fn open(&self) -> usize {
        self.shared.lock().total
    }

    /// Streams of `team` open now.
    pub fn open_for(&self, team: &str) -> usize {
        self.shared.lock().teams.get(team).copied().unwrap_or(0)
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A place for a new stream of `team`, or the refusal.
    fn admit(self: &Arc<Self>, team: Option<Arc<str>>) -> Result<Slot, Status> {
        let StreamsConfig {
            max_streams,
            max_streams_per_team,
            pushback,
            ..
        } = self.config;
        let mut open = self.lock();
        if let Some(team) = &team
            && open.teams.get(team).copied().unwrap_or(0) >= max_streams_per_team
        {
            drop(open);
            metrics::counter!("convoy_server_streams_refused_total", "limit" => "team")
                .increment(1);
            return Err(convoy_auth::exhausted(
                format!(
                    "team {team:?} has {max_streams_per_team} streams open on this instance, \
                     its limit; close one, or retry in {} ms",
                    pushback.as_millis()
                ),
                &format!("teams/{team}"),
                "the team's concurrent streams on this instance are used up",
                pushback,
            ));
        }
        if open.total >= max_streams {
            drop(open);
            metrics::counter!("convoy_server_streams_refused_total", "limit" => "instance")
                .increment(1);
            let whose = team
                .as_deref()
                .map_or(String::new(), |t| format!(" (for team {t:?})"));
            return Err(convoy_auth::exhausted(
                format!(
                    "this instance has {max_streams} streams open, its limit; this stream{whose} \
                     was refused: retry in {} ms, another instance may have room",
                    pushback.as_millis()
                ),
                "instance",
                "the instance's concurrent streams are used up",
                pushback,
            ));
        }
        open.total += 1;
        if let Some(team) = &team {
            *open.teams.entry(team.clone()).or_default() += 1;
        }
        metrics::gauge!("convoy_server_streams").set(open.total as f64);
        Ok(Slot {
            shared: self.clone(),
            team,
        })
    }

    /// How long a stream of `shape` may live, its jitter taken off.
    fn lifetime(&self, shape: Shape) -> Duration {
        if shape.client_streams() {
            self.config.client_lifetime
        } else {
            let cut = rand::random::<f64>() * LIFETIME_JITTER;
            self.config.server_lifetime.mul_f64(1.0 - cut)
        }
    }
}

/// A stream's place in the limits, given back when dropped.
#[derive(Debug)]
struct Slot {
    shared: Arc<Shared>,
    team: Option<Arc<str>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.shared.lock();
        open.total -= 1;
        if let Some(team) = &self.team
            && let Some(n) = open.teams.get_mut(team)
        {
            *n -= 1;
            if *n == 0 {
                open.teams.remove(team);
            }
        }
        metrics::gauge!("convoy_server_streams").set(open.total as f64);
    }
}

impl<S> Layer<S> for StreamsLayer {
    type Service = Streams<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Streams {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service made by [`StreamsLayer`].
#[derive(Clone, Debug)]
pub struct Streams<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// What ends a stream early: its status.
type End = Pin<Box<dyn Future<Output = Status> + Send>>;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

// === impl Streams ===

impl<S> Service<Request<Body>> for Streams<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = StreamsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let shape = methods::shape(request.uri().path());
        if !shape.is_streaming() {
            return StreamsFuture::Unary {
                inner: self.inner.call(request),
            };
        }
        let team = request
            .extensions()
            .get::<StreamTeam>()
            .map(|t| t.0.clone());
        let slot = match self.shared.admit(team) {
            Ok(slot) => slot,
            Err(status) => {
                return StreamsFuture::Stream {
                    inner: Box::pin(std::future::ready(Ok(status.into_http()))),
                };
            }
        };
        let end = Box::pin(end(
            self.shared.lifetime(shape),
            request.extensions().get::<Deadline>().copied(),
            request.extensions_mut().remove::<StreamRights>(),
        ));
        if shape.client_streams() {
            let idle = self.shared.config.idle_timeout;
            request = request.map(|body| Body::new(IdleBody::new(body, idle)));
        }
        // The clone that was polled ready serves this call (tower's usual dance).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        StreamsFuture::Stream {
            inner: Box::pin(run(inner, request, end, slot)),
        }
    }
}

/// Runs a stream's call until its response's head, or until `end` ends it first.
async fn run<S>(
    mut inner: S,
    request: Request<Body>,
    mut end: End,
    slot: Slot,
) -> Result<Response<Body>, BoxError>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Error: Into<BoxError>,
{
    let response = tokio::select! {
        biased;
        status = &mut end => return Ok(status.into_http()),
        response = inner.call(request) => response.map_err(Into::into)?,
    };
    Ok(response.map(|body| {
        Body::new(Guarded {
            inner: body,
            end: Some(end),
            slot: Some(slot),
        })
    }))
}

/// Resolves with the status that ends a stream early: at `lifetime`, at its caller's
/// `deadline`, or when its `rights` end.
async fn end(
    lifetime: Duration,
    deadline: Option<Deadline>,
    rights: Option<StreamRights>,
) -> Status {
    let rights = async {
        match rights {
            Some(rights) => rights.ended().await,
            None => std::future::pending().await,
        }
    };
    let deadline = async {
        match deadline {
            Some(deadline) => tokio::time::sleep_until(deadline.0).await,
            None => std::future::pending().await,
        }
    };
    let (reason, status) = tokio::select! {
        status = rights => ("rights", status),
        () = tokio::time::sleep(lifetime) => ("lifetime", lifetime_over(lifetime)),
        () = deadline => ("deadline", crate::deadline::expired()),
    };
    metrics::counter!("convoy_server_streams_ended_total", "reason" => reason).increment(1);
    status
}

/// UNAVAILABLE with reason STREAM_LIFETIME: resume (or send again), now.
fn lifetime_over(lifetime: Duration) -> Status {
    let mut details = ErrorDetails::with_error_info(
        "STREAM_LIFETIME",
        ERROR_DOMAIN,
        HashMap::from([("lifetime_ms".to_owned(), lifetime.as_millis().to_string())]),
    );
    details.set_retry_info(Some(Duration::ZERO));
    Status::with_error_details(
        Code::Unavailable,
        format!(
            "the stream reached its maximum lifetime of {} s on this instance; resume it \
             (a watch after the last sequence it received) or send it again",
            lifetime.as_secs()
        ),
        details,
    )
}

/// DEADLINE_EXCEEDED with reason STREAM_IDLE.
fn idle(timeout: Duration) -> Status {
    metrics::counter!("convoy_server_streams_ended_total", "reason" => "idle").increment(1);
    Status::with_error_details(
        Code::DeadlineExceeded,
        format!(
            "the stream sent no message for {} ms, this server's idle timeout for client \
             streams; it is closed (open a new one to send more)",
            timeout.as_millis()
        ),
        ErrorDetails::with_error_info("STREAM_IDLE", ERROR_DOMAIN, HashMap::new()),
    )
}

pin_project! {
    /// Response future of [`Streams`]. (Its fields are private in all but name:
    /// pin-project-lite cannot document enum fields.)
    #[allow(missing_docs)]
    #[project = StreamsProj]
    pub enum StreamsFuture<F> {
        /// A unary call, passed through.
        Unary {
            #[pin]
            inner: F,
        },
        /// A stream, admitted or refused.
        Stream {
            inner: BoxFuture<Result<Response<Body>, BoxError>>,
        },
    }
}

impl<F, E> Future for StreamsFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            StreamsProj::Unary { inner } => inner.poll(cx).map_err(Into::into),
            StreamsProj::Stream { inner } => inner.as_mut().poll(cx),
        }
    }
}

/// The trailers that end a stream with `status`.
fn trailers(status: &Status) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    if status.add_header(&mut trailers).is_err() {
        // Only a message or details that cannot be headers fail; the code always can.
        trailers.insert(Status::GRPC_STATUS, (status.code() as i32).into());
    }
    trailers
}

pin_project! {
    /// A stream's response body: ended with `end`'s status if that comes first, holding the
    /// stream's place until it is over.
    struct Guarded {
        #[pin]
        inner: Body,
        end: Option<End>,
        slot: Option<Slot>,
    }
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let mut this = self.project();
        if this.slot.is_none() {
            return Poll::Ready(None);
        }
        if let Some(end) = this.end
            && let Poll::Ready(status) = end.as_mut().poll(cx)
        {
            *this.end = None;
            *this.slot = None;
            return Poll::Ready(Some(Ok(Frame::trailers(trailers(&status)))));
        }
        let frame = std::task::ready!(this.inner.as_mut().poll_frame(cx));
        let over = match &frame {
            None | Some(Err(_)) => true,
            Some(Ok(frame)) => frame.is_trailers(),
        };
        if over {
            *this.end = None;
            *this.slot = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.slot.is_none() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Where a request stream is in its gRPC framing (a 5-byte header, then the message), to
/// tell when a message has arrived whole.
#[derive(Debug, Default)]
struct Framing {
    header: [u8; 5],
    /// Header bytes read of the current message.
    have: usize,
    /// Message bytes still to come once the header is whole.
    left: usize,
}

impl Framing {
    /// Reads `data`; whether a message ended in it.
    fn feed(&mut self, mut data: &[u8]) -> bool {
        let mut ended = false;
        while !data.is_empty() {
            if self.have < 5 {
                let n = (5 - self.have).min(data.len());
                self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
                self.have += n;
                data = &data[n..];
                if self.have == 5 {
                    let len = [
                        self.header[1],
                        self.header[2],
                        self.header[3],
                        self.header[4],
                    ];
                    self.left = u32::from_be_bytes(len) as usize;
                }
            } else {
                let n = self.left.min(data.len());
                self.left -= n;
                data = &data[n..];
            }
            if self.have == 5 && self.left == 0 {
                ended = true;
                self.have = 0;
            }
        }
        ended
    }
}

pin_project! {
    /// A client stream's request body, ended with STREAM_IDLE once the service has waited
    /// `idle` since the last whole message (or since the stream was admitted).
    struct IdleBody {
        #[pin]
        inner: Body,
        idle: Duration,
        timer: Pin<Box<Sleep>>,
        framing: Framing,
        failed: bool,
    }
}

impl IdleBody {
    fn new(inner: Body, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            framing: Framing::default(),
            failed: false,
        }
    }
}

impl http_body::Body for IdleBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.project();
        if *this.failed {
            return Poll::Ready(None);
        }
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && this.framing.feed(data)
                {
                    this.timer.as_mut().reset(Instant::now() + *this.idle);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending if this.timer.as_mut().poll(cx).is_ready() => {
                *this.failed = true;
                Poll::Ready(Some(Err(idle(*this.idle))))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::ServiceExt;

    const INGEST: &str = "/convoy.v1.IngestService/IngestEvents";
    const WATCH: &str = "/convoy.v1.WatchService/WatchConversation";
    const GET: &str = "/convoy.v1.ConversationService/GetConversation";

    fn config() -> StreamsConfig {
        StreamsConfig {
            max_streams: 10,
            max_streams_per_team: 2,
            idle_timeout: Duration::from_secs(30),
            client_lifetime: Duration::from_secs(600),
            server_lifetime: Duration::from_secs(1800),
            pushback: STREAM_PUSHBACK,
        }
    }

    /// A body that never yields: a watch with nothing to say.
    struct Quiet;

    impl http_body::Body for Quiet {
        type Data = Bytes;
        type Error = Status;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            Poll::Pending
        }
    }

    /// A client stream's body, fed by the test.
    struct Feed(tokio::sync::mpsc::Receiver<Bytes>);

    impl http_body::Body for Feed {
        type Data = Bytes;
        type Error = Status;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            self.0.poll_recv(cx).map(|c| c.map(|c| Ok(Frame::data(c))))
        }
    }

    fn framed(message: &[u8]) -> Bytes {
        let mut out = vec![0u8];
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(message);
        Bytes::from(out)
    }

    /// The service behind the layer: a client stream reads its messages until the stream
    /// ends or fails and answers that; a server stream says nothing for ever; a unary call
    /// answers at once. Counts the calls that reach it.
    fn service(
        config: StreamsConfig,
    ) -> (
        StreamsLayer,
        Arc<AtomicUsize>,
        impl Service<Request<Body>, Response = Response<Body>, Error = BoxError, Future: Send>
        + Clone
        + Send
        + 'static,
    ) {
        let reached = Arc::new(AtomicUsize::new(0));
        let counter = reached.clone();
        let handler = tower::service_fn(move |request: Request<Body>| {
            counter.fetch_add(1, Ordering::Relaxed);
            async move {
                let response = match methods::shape(request.uri().path()) {
                    Shape::ClientStreaming => {
                        let mut body = Box::pin(request.into_body());
                        loop {
                            match std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
                                Some(Ok(_)) => continue,
                                Some(Err(status)) => break status.into_http(),
                                None => break Response::new(Body::empty()),
                            }
                        }
                    }
                    Shape::ServerStreaming => Response::new(Body::new(Quiet)),
                    _ => Response::new(Body::empty()),
                };
                Ok::<_, Infallible>(response)
            }
        });
        let layer = StreamsLayer::new(config);
        (layer.clone(), reached, layer.layer(handler))
    }

    fn request(path: &str, team: Option<&str>, body: Body) -> Request<Body> {
        let mut request = Request::builder().uri(path).body(body).unwrap();
        if let Some(team) = team {
            request.extensions_mut().insert(StreamTeam(Arc::from(team)));
        }
        request
    }

    fn status_in(headers: &HeaderMap) -> Option<Status> {
        Status::from_header_map(headers)
    }

    /// The next frame of `body`.
    async fn frame(body: &mut Pin<Box<Body>>) -> Option<Result<Frame<Bytes>, Status>> {
        std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await
    }

    /// The status the trailers ending `body` carry, and when they came.
    async fn ending(body: Body) -> (Status, Instant) {
        let mut body = Box::pin(body);
        loop {
            match frame(&mut body).await {
                Some(Ok(frame)) if frame.is_trailers() => {
                    let trailers = frame.into_trailers().unwrap();
                    return (status_in(&trailers).expect("a status"), Instant::now());
                }
                Some(Ok(_)) => {}
                other => panic!("the stream ended without trailers: {other:?}"),
            }
        }
    }

    fn reason(status: &Status) -> String {
        status
            .get_error_details()
            .error_info()
            .unwrap()
            .reason
            .clone()
    }

    #[tokio::test(start_paused = true)]
    async fn a_team_past_its_share_is_refused_at_once_and_other_teams_are_not() {
        let (layer, reached, service) = service(config());
        let mut open = Vec::new();
        for _ in 0..2 {
            let response = service
                .clone()
                .oneshot(request(WATCH, Some("acme"), Body::empty()))
                .await
                .unwrap();
            assert!(status_in(response.headers()).is_none(), "admitted");
            open.push(response);
        }
        assert_eq!((layer.open(), layer.open_for("acme")), (2, 2));

        let started = Instant::now();
        let refused = service
            .clone()
            .oneshot(request(INGEST, Some("acme"), Body::empty()))
            .await
            .unwrap();
        assert_eq!(started.elapsed(), Duration::ZERO, "refused at once");
        assert_eq!(refused.headers()["grpc-retry-pushback-ms"], "1000");
        let status = status_in(refused.headers()).unwrap();
        assert_eq!(status.code(), Code::ResourceExhausted);
        let details = status.get_error_details();
        assert_eq!(
            details.quota_failure().unwrap().violations[0].subject,
            "teams/acme"
        );
        assert_eq!(
            details.retry_info().unwrap().retry_delay,
            Some(STREAM_PUSHBACK)
        );
        assert_eq!(
            reached.load(Ordering::Relaxed),
            2,
            "never reached the service"
        );

        let globex = service
            .clone()
            .oneshot(request(WATCH, Some("globex"), Body::empty()))
            .await
            .unwrap();
        assert!(
            status_in(globex.headers()).is_none(),
            "another team is admitted"
        );
        assert_eq!(layer.open_for("globex"), 1);

        // A stream of acme's ends: its place is free again.
        drop(open.pop());
        assert_eq!(layer.open_for("acme"), 1);
        let again = service
            .clone()
            .oneshot(request(WATCH, Some("acme"), Body::empty()))
            .await
            .unwrap();
        assert!(status_in(again.headers()).is_none());
        drop((open, globex, again));
        assert_eq!(layer.open(), 0, "every place is given back");
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_instance_limit_every_new_stream_is_refused_naming_the_instance() {
        let (layer, _, service) = service(StreamsConfig {
            max_streams: 3,
            max_streams_per_team: 10,
            ..config()
        });
        let mut open = Vec::new();
        for team in [Some("acme"), Some("globex"), None] {
            open.push(
                service
                    .clone()
                    .oneshot(request(WATCH, team, Body::empty()))
                    .await
                    .unwrap(),
            );
        }
        assert_eq!(layer.open(), 3);
        for team in [Some("initech"), None] {
            let refused = service
                .clone()
                .oneshot(request(WATCH, team, Body::empty()))
                .await
                .unwrap();
            let status = status_in(refused.headers()).unwrap();
            assert_eq!(status.code(), Code::ResourceExhausted);
            let quota = status.get_error_details().quota_failure().unwrap().clone();
            assert_eq!(quota.violations[0].subject, "instance");
        }
        // Unary calls are not streams: they pass whatever the streams hold.
        let unary = service
            .clone()
            .oneshot(request(GET, Some("initech"), Body::empty()))
            .await
            .unwrap();
        assert!(status_in(unary.headers()).is_none());
        assert_eq!(layer.open(), 3, "a unary call holds no place");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_stream_without_a_whole_message_for_the_idle_timeout_ends_deadline_exceeded() {
        let (layer, _, service) = service(config());
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let call = tokio::spawn(service.clone().oneshot(request(
            INGEST,
            Some("acme"),
            Body::new(Feed(rx)),
        )));
        let started = Instant::now();
        tx.send(framed(b"first")).await.unwrap();
        tokio::time::sleep(Duration::from_secs(20)).await;
        tx.send(framed(b"second")).await.unwrap();
        tokio::time::sleep(Duration::from_secs(20)).await;
        // Half a message: bytes, but not a message.
        tx.send(framed(b"third").slice(..4)).await.unwrap();
        let response = call.await.unwrap().unwrap();
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(50),
            "30 s after the last whole message"
        );
        let status = status_in(response.headers()).unwrap();
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert_eq!(reason(&status), "STREAM_IDLE");
        drop(response);
        assert_eq!(layer.open(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_stream_ends_at_its_lifetime_however_busy() {
        let (layer, _, service) = service(StreamsConfig {
            client_lifetime: Duration::from_secs(60),
            ..config()
        });
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let started = Instant::now();
        let call = tokio::spawn(service.clone().oneshot(request(
            INGEST,
            Some("acme"),
            Body::new(Feed(rx)),
        )));
        let sender = tokio::spawn(async move {
            while tx.send(framed(b"line")).await.is_ok() {
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        });
        let response = call.await.unwrap().unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(60));
        let status = status_in(response.headers()).unwrap();
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(reason(&status), "STREAM_LIFETIME");
        drop(response);
        assert_eq!(layer.open(), 0);
        sender.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_stream_ends_unavailable_at_its_lifetime_less_its_jitter_and_frees_its_place()
    {
        let lifetime = Duration::from_secs(1000);
        let (layer, _, service) = service(StreamsConfig {
            server_lifetime: lifetime,
            ..config()
        });
        let started = Instant::now();
        let response = service
            .clone()
            .oneshot(request(WATCH, Some("acme"), Body::empty()))
            .await
            .unwrap();
        assert_eq!(layer.open(), 1);
        let (status, at) = ending(response.into_body()).await;
        let lived = at - started;
        assert!(
            lived <= lifetime && lived >= lifetime.mul_f64(1.0 - LIFETIME_JITTER),
            "{lived:?}"
        );
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(reason(&status), "STREAM_LIFETIME");
        assert_eq!(
            status.get_error_details().retry_info().unwrap().retry_delay,
            Some(Duration::ZERO),
            "resume at once"
        );
        assert_eq!(layer.open(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_ends_deadline_exceeded_at_its_callers_deadline() {
        let (layer, _, service) = service(config());
        let mut watch = request(WATCH, Some("acme"), Body::empty());
        let deadline = Deadline::after(Duration::from_secs(5));
        watch.extensions_mut().insert(deadline);
        let response = service.clone().oneshot(watch).await.unwrap();
        let (status, at) = ending(response.into_body()).await;
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert_eq!(at, deadline.0);
        assert_eq!(layer.open(), 0);
    }

    /// A key directory with one key, its signer and a verifier over it.
    struct Keys {
        dir: tempfile::TempDir,
        signer: convoy_auth::Signer,
        verifier: Arc<convoy_auth::Verifier>,
    }

    fn keys() -> Keys {
        let dir = tempfile::tempdir().unwrap();
        let pair = convoy_auth::generate_key_pair().unwrap();
        std::fs::write(dir.path().join("k1.pem"), &pair.public_pem).unwrap();
        let signer = convoy_auth::Signer::from_pem("k1", pair.private_pem.as_bytes()).unwrap();
        let verifier = Arc::new(convoy_auth::Verifier::from_dir(dir.path()).unwrap());
        Keys {
            dir,
            signer,
            verifier,
        }
    }

    impl Keys {
        /// A watch request whose token (valid for `ttl`) was verified by the layer before.
        fn watch(&self, ttl: Duration) -> Request<Body> {
            let token = self
                .signer
                .mint("t", &["acme".into()], convoy_auth::Role::Reader, ttl)
                .unwrap();
            let exp = self.verifier.verify(&token).unwrap().exp;
            let rights = StreamRights::new(
                self.verifier.clone(),
                vec![("authorization", Arc::from(token))],
                exp,
            );
            let mut watch = request(WATCH, Some("acme"), Body::empty());
            watch.extensions_mut().insert(rights);
            watch
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_ends_unauthenticated_when_its_token_expires() {
        let keys = keys();
        let (layer, _, service) = service(config());
        let started = Instant::now();
        let response = service
            .clone()
            .oneshot(keys.watch(Duration::from_secs(60)))
            .await
            .unwrap();
        let (status, at) = ending(response.into_body()).await;
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(reason(&status), "TOKEN_EXPIRED");
        // Its remaining minute, plus the leeway every token gets, within `exp`'s second.
        let least = Duration::from_secs(60 + convoy_auth::LEEWAY_SECS);
        let lived = at - started;
        assert!(
            lived >= least && lived <= least + Duration::from_secs(2),
            "{lived:?}"
        );
        assert_eq!(layer.open(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_ends_unauthenticated_at_the_key_reload_that_removes_its_key() {
        let keys = keys();
        let (layer, _, service) = service(config());
        let response = service
            .clone()
            .oneshot(keys.watch(Duration::from_secs(3600)))
            .await
            .unwrap();
        let ended = tokio::spawn(ending(response.into_body()));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!ended.is_finished(), "valid until the key goes");
        let pair = convoy_auth::generate_key_pair().unwrap();
        std::fs::write(keys.dir.path().join("k2.pem"), &pair.public_pem).unwrap();
        std::fs::remove_file(keys.dir.path().join("k1.pem")).unwrap();
        let reloaded = Instant::now();
        assert!(matches!(
            keys.verifier.reload(),
            convoy_auth::Reload::Changed
        ));
        let (status, at) = ended.await.unwrap();
        assert_eq!(at, reloaded, "at the reload, no later");
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(reason(&status), "TOKEN_UNKNOWN_KEY");
        assert_eq!(layer.open(), 0);
    }

    #[test]
    fn framing_tells_whole_messages_from_bytes() {
        let mut framing = Framing::default();
        let two = [framed(b"ab"), framed(b"")].concat();
        assert!(framing.feed(&two), "two whole messages");
        let three = framed(b"xyz");
        assert!(!framing.feed(&three[..3]), "half a header");
        assert!(!framing.feed(&three[3..6]), "the header and a byte");
        assert!(framing.feed(&three[6..]), "the rest");
    }
}
