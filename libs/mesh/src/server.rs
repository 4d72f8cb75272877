//! Our gRPC server builder: the one place a convoy service meets tonic's server.
//!
//! Every service gets, without asking: RED metrics per method ([`crate::RpcMetricsLayer`]),
//! `grpc.health.v1.Health` (SERVING per service name and
//! for the whole server, ""), server reflection v1 and v1alpha over the embedded convoy
//! descriptors (so grpcurl and grpcio can call without .proto files), deadline enforcement
//! ([`crate::DeadlineLayer`]), a bulkhead for unary calls with a short queue
//! ([`crate::BulkheadLayer`]), limits of their own for streams ([`crate::streams`]), panics
//! answered INTERNAL ([`crate::panic`]), HTTP/2 keepalives, and an ordered graceful
//! shutdown:
//! health turns NOT_SERVING, then the listener stops accepting and in-flight calls drain,
//! bounded by [`ServerConfig::drain_timeout`]. A drain hook runs between the two (see
//! [`ServerBuilder::serve_with_drain_hook`]): services deregister from etcd there.
//!
//! With [`ServerConfig::tls`] the listener takes only mutual TLS ([`crate::tls::accept`]),
//! but for plain-text health checks, which the kubelet's gRPC probes need.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::{Routes, RoutesBuilder};
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tower::Service;

use crate::streams::{StreamsConfig, StreamsLayer};
use crate::{BulkheadConfig, BulkheadLayer, DeadlineLayer, RpcMetricsLayer};

/// Services every convoy server answers besides its own.
const ALWAYS_SERVED: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// How a server listens and stops.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Longest time in-flight calls get to finish after shutdown begins. Default 20 s,
    /// below Kubernetes' default 30 s termination grace period.
    pub drain_timeout: Duration,
    /// Whether to serve gRPC reflection. Default on: stock clients depend on it.
    pub reflection: bool,
    /// HTTP/2 keepalive ping interval, to find dead peers. Default 30 s.
    pub http2_keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered. Default 10 s.
    pub http2_keepalive_timeout: Duration,
    /// Concurrent HTTP/2 streams per connection. Default 1024.
    pub max_concurrent_streams: u32,
    /// The bulkhead ([`crate::bulkhead`]): calls running at once across all connections.
    /// Default 256: a few times a service's database connections, so calls waiting for a
    /// connection stay bounded.
    pub max_concurrent_calls: usize,
    /// Calls past `max_concurrent_calls` that wait for their turn, first come first served;
    /// past that, new calls are refused with RESOURCE_EXHAUSTED. Default 1024.
    pub max_queued_calls: usize,
    /// Longest a call waits for its turn before it is refused (less when its deadline is
    /// nearer). Default 1 s.
    pub max_queue_wait: Duration,
    /// How long a refused client is told to wait (`grpc-retry-pushback-ms`). Default 100 ms.
    pub shed_pushback: Duration,
    /// Mutual TLS on the listener: clients must present a certificate from the CA. Default
    /// none: plain text (local runs, tests).
    pub tls: Option<crate::tls::MeshTls>,
    /// Authentication, authorization and per-team rate limits for every `/convoy.*` call
    /// (see `convoy_auth`). `None`: every caller may call everything (`--no-auth`).
    pub auth: Option<Arc<convoy_auth::Authorizer>>,
    /// Largest request message accepted, in bytes (tonic's decoding limit, and what the
    /// authorization layer buffers at most). Default 4 MiB.
    pub max_message_bytes: usize,
    /// The bytes the authorization layer holds at once, across every call, and how long a
    /// message may take to arrive ([`convoy_auth::BodyBudget`]). Default 64 MiB and 10 s.
    pub auth_buffer: convoy_auth::BufferConfig,
    /// How many streams may be open, per instance and per team, and for how long
    /// ([`crate::streams`]). Defaults in [`StreamsConfig::default`].
    pub streams: StreamsConfig,
    /// Largest header block a client may send, in bytes. Default 16 KiB (a bearer token and
    /// a forwarded one fit several times over).
    pub max_header_list_bytes: u32,
}

/// [`ServerConfig::max_queued_calls`]'s default.
pub const DEFAULT_MAX_QUEUED_CALLS: usize = 1024;

/// [`ServerConfig::max_queue_wait`]'s default, in milliseconds.
pub const DEFAULT_MAX_QUEUE_WAIT_MS: u64 = 1000;

/// The bulkhead's queue, as flags every convoy server takes. (Its limit,
/// `--max-concurrent-calls`, is each service's own: their calls cost different things.)
#[derive(Clone, Debug, clap::Args)]
pub struct QueueArgs {
    /// Calls that wait for their turn once `--max-concurrent-calls` are running; past them,
    /// new calls are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "CONVOY_MAX_QUEUED_CALLS", default_value_t = DEFAULT_MAX_QUEUED_CALLS)]
    pub max_queued_calls: usize,
    /// Longest a call waits for its turn, in milliseconds (less when its deadline is nearer).
    #[arg(long, env = "CONVOY_MAX_QUEUE_WAIT_MS", default_value_t = DEFAULT_MAX_QUEUE_WAIT_MS)]
    pub max_queue_wait_ms: u64,
}

impl QueueArgs {
    /// `config` with this queue.
    pub fn apply(&self, config: ServerConfig) -> ServerConfig {
        ServerConfig {
            max_queued_calls: self.max_queued_calls,
            max_queue_wait: Duration::from_millis(self.max_queue_wait_ms),
            ..config
        }
    }
}

/// What callers may hold open besides the bulkhead's places, as flags every convoy server
/// takes: streams ([`crate::streams::StreamArgs`]: `--max-streams`,
/// `--max-streams-per-team`, `--stream-idle-timeout-ms`, `--client-stream-lifetime-s`,
/// `--server-stream-lifetime-s`) and the messages authorization holds to read their teams
/// ([`convoy_auth::BufferArgs`]: `--auth-buffer-mib`, `--auth-read-timeout-ms`).
#[derive(Clone, Debug, clap::Args)]
pub struct LimitArgs {
    /// Streams.
    #[command(flatten)]
    pub streams: crate::streams::StreamArgs,
    /// Authorization's buffered messages.
    #[command(flatten)]
    pub buffer: convoy_auth::BufferArgs,
}

impl LimitArgs {
    /// `config` with these limits.
    pub fn apply(&self, config: ServerConfig) -> ServerConfig {
        ServerConfig {
            streams: self.streams.config(),
            auth_buffer: self.buffer.config(),
            ..config
        }
    }
}

/// tonic's own default decoding limit, named: the authorization layer buffers no more.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 << 20;

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            drain_timeout: Duration::from_secs(20),
            reflection: true,
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(10),
            max_concurrent_streams: 1024,
            max_concurrent_calls: 256,
            max_queued_calls: DEFAULT_MAX_QUEUED_CALLS,
            max_queue_wait: Duration::from_millis(DEFAULT_MAX_QUEUE_WAIT_MS),
            shed_pushback: Duration::from_millis(100),
            tls: None,
            auth: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_header_list_bytes: 16 << 10,
            auth_buffer: convoy_auth::BufferConfig::default(),
            streams: StreamsConfig::default(),
        }
    }
}

impl ServerConfig {
    /// These settings with the authorization `args` ask for (none with `--no-auth`).
    pub fn with_auth(
        mut self,
        args: &convoy_auth::AuthArgs,
    ) -> Result<Self, convoy_auth::AuthConfigError> {
        self.auth = args.authorizer(self.max_message_bytes)?;
        Ok(self)
    }
}

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The transport failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Reflection could not load the descriptors (a build problem).
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Collects a process's gRPC services and serves them; see the module docs.
pub struct ServerBuilder {
    config: ServerConfig,
    routes: RoutesBuilder,
    names: Vec<&'static str>,
    health: HealthReporter,
    /// The health service alone, answered in plain text beside TLS (for the kubelet).
    probes: Routes,
}

impl ServerBuilder {
    /// A server with health checking and, if configured, reflection.
    pub fn new(config: ServerConfig) -> Self {
        let (health, health_service) = tonic_health::server::health_reporter();
        let probes = Routes::new(health_service.clone());
        let mut routes = RoutesBuilder::default();
        routes.add_service(health_service);
        Self {
            config,
            routes,
            names: Vec::new(),
            health,
            probes,
        }
    }

    /// Adds a service; it is reported SERVING once the server starts.
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.routes.add_service(service);
        self
    }

    /// The health reporter, for services that change their status while running.
    pub fn health(&self) -> HealthReporter {
        self.health.clone()
    }

    /// Serves on `listener` until `shutdown` completes, then shuts down in order.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServerError> {
        self.serve_with_drain_hook(listener, shutdown, async {})
            .await
    }

    /// Like [`ServerBuilder::serve`], running `before_drain` after health turns NOT_SERVING
    /// and before the listener stops accepting: the place to deregister from discovery, so
    /// peers stop sending new calls while in-flight ones still finish.
    pub async fn serve_with_drain_hook(
        mut self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
        before_drain: impl Future<Output = ()> + Send,
    ) -> Result<(), ServerError> {
        if self.config.reflection {
            // Advertise only what this process serves: the descriptor set holds every
            // convoy service, and listing one that answers UNIMPLEMENTED would mislead.
            let reflection = || {
                let mut builder = tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(convoy_proto::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                    .include_reflection_service(false);
                for name in self.names.iter().copied().chain(ALWAYS_SERVED) {
                    builder = builder.with_service_name(name);
                }
                builder
            };
            let v1 = reflection().build_v1()?;
            let v1alpha = reflection().build_v1alpha()?;
            self.routes.add_service(v1);
            self.routes.add_service(v1alpha);
        }

        let local: Option<SocketAddr> = listener.local_addr().ok();
        for name in self.names.iter().copied().chain([""]) {
            self.health
                .set_service_status(name, ServingStatus::Serving)
                .await;
        }
        let tls = self.config.tls.is_some();
        tracing::info!(addr = ?local, services = ?self.names, tls, "serving gRPC");

        let health = self.health.clone();
        let names = self.names.clone();
        let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
        let signal = async move {
            shutdown.await;
            tracing::info!("shutting down: health NOT_SERVING, draining in-flight calls");
            for name in names.iter().copied().chain([""]) {
                health
                    .set_service_status(name, ServingStatus::NotServing)
                    .await;
            }
            before_drain.await;
            let _ = stopping_tx.send(());
        };

        let bulkhead = BulkheadLayer::new(BulkheadConfig {
            limit: self.config.max_concurrent_calls,
            queue: self.config.max_queued_calls,
            max_wait: self.config.max_queue_wait,
            pushback: self.config.shed_pushback,
        });
        let budget = convoy_auth::BodyBudget::new(self.config.auth_buffer);
        let router = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(self.config.http2_keepalive_interval))
            .http2_keepalive_timeout(Some(self.config.http2_keepalive_timeout))
            .max_concurrent_streams(Some(self.config.max_concurrent_streams))
            .http2_max_header_list_size(self.config.max_header_list_bytes)
            // Outermost first: every call is measured, those refused inside included (shed
            // RESOURCE_EXHAUSTED, expired DEADLINE_EXCEEDED, panicked INTERNAL); a unary call
            // the full bulkhead would refuse is refused next, before a span, the body or a
            // token cost anything; a panic anywhere becomes INTERNAL; a call's deadline
            // bounds its wait in the bulkhead's queue (and a stream's life, in the stream
            // layer).
            .layer(RpcMetricsLayer::server())
            .layer(bulkhead.early_shed())
            .layer(crate::trace::TraceLayer::server())
            .layer(crate::panic::catch_panic_layer())
            .layer(DeadlineLayer::default())
            // Authorized and charged before it may queue or run: a stranger or a team over
            // its rate cannot crowd out admitted calls. The messages it reads for that are
            // held within one budget of bytes for the instance, each read with a timeout.
            .layer(tower::util::option_layer(self.config.auth.clone().map(
                |auth| convoy_auth::AuthLayer::new(auth).with_budget(budget.clone()),
            )))
            // Streams, admitted by their team's and the instance's limits (the team is the
            // one authorization found) and ended when idle, too old, past their deadline or
            // their rights; they never reach the bulkhead, which limits unary calls.
            .layer(StreamsLayer::new(self.config.streams))
            .layer(bulkhead)
            .add_routes(self.routes.routes());
        // `Server::tcp_nodelay` applies only to listeners tonic binds itself: set it on
        // every accepted socket here, or Nagle's algorithm meets the client's delayed
        // ACK and small responses wait ~40 ms (measured: 44 ms per cache Get).
        let accepted = TcpIncoming::from(listener).with_nodelay(Some(true));
        let (tls, probes) = (self.config.tls.clone(), self.probes.clone());
        let serve = async move {
            match tls {
                None => router.serve_with_incoming_shutdown(accepted, signal).await,
                Some(tls) => {
                    let incoming = crate::tls::accept::incoming(accepted, tls, probes);
                    router.serve_with_incoming_shutdown(incoming, signal).await
                }
            }
        };

        // Key reloads and rate-bucket upkeep, for as long as the server runs.
        let _maintenance =
            self.config.auth.clone().map(|auth| {
                tokio_util::task::AbortOnDropHandle::new(tokio::spawn(auth.maintain()))
            });
        let drain_timeout = self.config.drain_timeout;
        tokio::select! {
            result = serve => result?,
            () = async {
                if stopping_rx.await.is_ok() {
                    tokio::time::sleep(drain_timeout).await;
                } else {
                    std::future::pending::<()>().await;
                }
            } => {
                tracing::warn!(?drain_timeout, "drain timed out; abandoning calls still in flight");
            }
        }
        tracing::info!("server stopped");
        Ok(())
    }
}

/// Completes on SIGTERM or SIGINT: the shutdown signal every convoy binary waits for.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}
