//! One endpoint's connection, as a service that is ready only while it is connected.
//!
//! tonic's own `Channel` reconnects lazily and always looks ready, so a balancer over plain
//! channels keeps picking a dead endpoint. Here background tasks connect (and reconnect,
//! with backoff) and the service is ready only while it holds a live connection; the first
//! transport error of a call marks that connection down, answers the call UNAVAILABLE, and
//! wakes its task. The balancer therefore sees a dead endpoint as not ready, at once, and a
//! recovered one as ready again.
//!
//! An endpoint keeps [`EndpointConfig::connections`] HTTP/2 connections and spreads calls
//! over the live ones in turn: one HTTP/2 connection tops out near 85-100k calls/s (one
//! socket, one lock on the connection's state), so a hot endpoint needs several.
//!
//! With [`EndpointConfig::tls`] every connection is mutual TLS ([`crate::tls`]), opened
//! with the material in force when it connects; a reconnect after a certificate rotation
//! takes the new one.
//!
//! Not here: choosing between endpoints (the balancer) or judging answers (the breaker).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;
use tokio::task::AbortHandle;
use tonic::body::Body;
use tonic::transport::Channel;
use tower::{BoxError, Service};

use crate::tls::{MeshTls, TlsConnector};

/// How endpoints connect.
#[derive(Clone, Debug)]
pub struct EndpointConfig {
    /// Longest wait for a TCP + HTTP/2 connection. 1 s: on a LAN, longer means down.
    pub connect_timeout: Duration,
    /// First wait before reconnecting. 100 ms.
    pub min_backoff: Duration,
    /// Longest wait between reconnection attempts. 5 s.
    pub max_backoff: Duration,
    /// HTTP/2 keepalive ping interval, so a silently dead peer is noticed. 10 s.
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered. 5 s.
    pub keepalive_timeout: Duration,
    /// HTTP/2 connections per endpoint. 2: twice one connection's ceiling for little cost;
    /// raise it for endpoints that take tens of thousands of calls a second.
    pub connections: usize,
    /// Mutual TLS for every connection. Default none: plain text (local runs, tests).
    pub tls: Option<MeshTls>,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            connections: 2,
            tls: None,
        }
    }
}

/// One of an endpoint's connections.
#[derive(Debug)]
struct Slot {
    /// The live connection, if any, with its generation (one per successful connect).
    channel: Mutex<Option<(u64, Channel)>>,
    /// Woken when a call finds this connection broken.
    broken: Notify,
}

impl Slot {
    fn channel(&self) -> Option<(u64, Channel)> {
        self.channel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn connect(&self, generation: u64, channel: Channel) {
        *self.channel.lock().unwrap_or_else(|e| e.into_inner()) = Some((generation, channel));
    }

    /// Marks connection `generation` broken, unless it was already replaced: many calls
    /// fail together when a connection dies, and only the first may trigger a reconnect.
    fn mark_broken(&self, generation: u64) {
        let mut current = self.channel.lock().unwrap_or_else(|e| e.into_inner());
        if current.as_ref().is_some_and(|(g, _)| *g == generation) {
            *current = None;
            self.broken.notify_one();
        }
    }
}

#[derive(Debug)]
struct Shared {
    slots: Vec<Slot>,
    /// Woken when any connection is made.
    connected: Arc<Notify>,
    /// Where the next call starts looking for a live connection.
    next: AtomicUsize,
}

impl Shared {
    /// The next live connection in turn: (slot, generation, channel).
    fn pick(&self) -> Option<(usize, u64, Channel)> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..self.slots.len()).find_map(|i| {
            let slot = (start + i) % self.slots.len();
            self.slots[slot]
                .channel()
                .map(|(generation, channel)| (slot, generation, channel))
        })
    }
}

/// A connection-aware endpoint service; see the module docs.
pub struct EndpointService {
    addr: String,
    shared: Arc<Shared>,
    /// The connection the current call will use, taken at readiness.
    ready: Option<(usize, u64, Channel)>,
    waiting: Option<std::pin::Pin<Box<OwnedNotified>>>,
    tasks: Arc<AbortOnDrop>,
}

/// Stops an endpoint's connection tasks.
#[derive(Clone, Debug)]
pub struct EndpointAbort(Vec<AbortHandle>);

impl EndpointAbort {
    /// Stops every connection task.
    pub fn abort(&self) {
        self.0.iter().for_each(AbortHandle::abort);
    }
}

struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.iter().for_each(tokio::task::JoinHandle::abort);
    }
}

impl EndpointService {
    /// Starts connecting to `addr` (`host:port`) in the background.
    pub fn new(addr: String, config: EndpointConfig) -> Result<Self, BoxError> {
        let endpoint = endpoint(&addr, &config)?;
        let shared = Arc::new(Shared {
            slots: (0..config.connections.max(1))
                .map(|_| Slot {
                    channel: Mutex::new(None),
                    broken: Notify::new(),
                })
                .collect(),
            connected: Arc::new(Notify::new()),
            next: AtomicUsize::new(0),
        });
        let tasks = (0..shared.slots.len())
            .map(|slot| {
                tokio::spawn(connect_loop(
                    addr.clone(),
                    endpoint.clone(),
                    config.clone(),
                    shared.clone(),
                    slot,
                ))
            })
            .collect();
        Ok(Self {
            addr,
            shared,
            ready: None,
            waiting: None,
            tasks: Arc::new(AbortOnDrop(tasks)),
        })
    }

    /// The endpoint's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// How many of its connections are live now.
    pub fn live_connections(&self) -> usize {
        self.shared
            .slots
            .iter()
            .filter(|s| s.channel().is_some())
            .count()
    }

    /// Stops the background connection tasks (the endpoint left the set).
    pub fn abort_handle(&self) -> EndpointAbort {
        EndpointAbort(self.tasks.0.iter().map(|t| t.abort_handle()).collect())
    }
}

/// One connection to `addr` (`host:port`) with `config`'s settings, TLS included, for
/// one-off callers such as an operator tool's health check. Calls that should outlive a
/// broken connection go through an [`EndpointService`].
pub async fn connect(addr: &str, config: &EndpointConfig) -> Result<Channel, BoxError> {
    Ok(open(&endpoint(addr, config)?, config.tls.as_ref()).await?)
}

/// tonic's endpoint for `addr`. Always `http://`: TLS, when configured, is ours
/// ([`TlsConnector`]), and tonic would add its own to an `https://` URI.
fn endpoint(addr: &str, config: &EndpointConfig) -> Result<tonic::transport::Endpoint, BoxError> {
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(config.keepalive_interval)
            .keep_alive_timeout(config.keepalive_timeout),
    )
}

/// Opens one connection (TCP + TLS when configured + HTTP/2).
async fn open(
    endpoint: &tonic::transport::Endpoint,
    tls: Option<&MeshTls>,
) -> Result<Channel, tonic::transport::Error> {
    match tls {
        None => endpoint.connect().await,
        Some(tls) => {
            endpoint
                .connect_with_connector(TlsConnector::new(tls.clone()))
                .await
        }
    }
}

/// Whether a channel error is tonic's own deadline timer rather than a transport failure.
fn is_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.is::<tonic::TimeoutExpired>() {
            return true;
        }
        current = e.source();
    }
    false
}

async fn connect_loop(
    addr: String,
    endpoint: tonic::transport::Endpoint,
    config: EndpointConfig,
    shared: Arc<Shared>,
    slot: usize,
) {
    let slot_state = &shared.slots[slot];
    let mut backoff = config.min_backoff;
    let mut generation = 0;
    loop {
        match open(&endpoint, config.tls.as_ref()).await {
            Ok(channel) => {
                tracing::debug!(%addr, "endpoint connected");
                backoff = config.min_backoff;
                generation += 1;
                let broken = slot_state.broken.notified();
                tokio::pin!(broken);
                broken.as_mut().enable();
                slot_state.connect(generation, channel);
                shared.connected.notify_waiters();
                broken.await;
                tracing::info!(%addr, slot, "endpoint connection failed; reconnecting");
                metrics::counter!("convoy_client_reconnects_total").increment(1);
            }
            Err(e) => {
                tracing::debug!(%addr, error = %e, ?backoff, "endpoint connect failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(config.max_backoff);
            }
        }
    }
}

impl Clone for EndpointService {
    fn clone(&self) -> Self {
        Self {
            addr: self.addr.clone(),
            shared: self.shared.clone(),
            ready: None,
            waiting: None,
            tasks: self.tasks.clone(),
        }
    }
}

// === impl EndpointService ===

impl Service<Request<Body>> for EndpointService {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response<Body>, BoxError>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        loop {
            let waiting = self
                .waiting
                .get_or_insert_with(|| Box::pin(self.shared.connected.clone().notified_owned()));
            waiting.as_mut().enable();
            if let Some((slot, generation, mut channel)) = self.shared.pick() {
                self.waiting = None;
                return match channel.poll_ready(cx) {
                    Poll::Ready(Ok(())) => {
                        self.ready = Some((slot, generation, channel));
                        Poll::Ready(Ok(()))
                    }
                    Poll::Ready(Err(e)) => {
                        self.shared.slots[slot].mark_broken(generation);
                        tracing::debug!(addr = %self.addr, error = %e, "endpoint not ready");
                        continue;
                    }
                    Poll::Pending => Poll::Pending,
                };
            }
            std::task::ready!(waiting.as_mut().poll(cx));
            self.waiting = None;
        }
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let (slot, generation, mut channel) = self
            .ready
            .take()
            .expect("poll_ready must return Ready before call");
        let shared = self.shared.clone();
        let addr = self.addr.clone();
        Box::pin(async move {
            match channel.call(request).await {
                Ok(response) => Ok(response),
                // tonic's channel enforces the grpc-timeout header too: its timer firing is
                // the caller's deadline, not a broken connection. Marked, so the breaker
                // counts an endpoint that does not answer in time against it.
                Err(e) if is_timeout(&e) => {
                    let mut response = crate::deadline::expired().into_http::<Body>();
                    response
                        .extensions_mut()
                        .insert(crate::breaker::LocalTimeout);
                    Ok(response)
                }
                Err(e) => {
                    // A transport error: this connection is gone, and the endpoint is not
                    // ready until it reconnects. The caller gets UNAVAILABLE, which the
                    // retry policy understands (the call may not have reached the server,
                    // so only idempotent methods are retried).
                    shared.slots[slot].mark_broken(generation);
                    Ok(
                        tonic::Status::unavailable(format!("connection to {addr} failed: {e}"))
                            .into_http(),
                    )
                }
            }
        })
    }
}
