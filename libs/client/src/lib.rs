//! The Rust SDK for convoy.
//!
//! [`ConvoyClient::connect`] finds a service's instances (in etcd, or from a static list),
//! and gives typed clients whose every call goes through the mesh's client stack, outermost
//! first: RED metrics (one sample per logical call in `convoy_rpc_client_duration_seconds`),
//! the deadline (the smaller of the per-call timeout and the caller's own remaining
//! deadline, covering every attempt), retries for idempotent methods paid from a shared
//! budget, power-of-two-choices balancing over peak-EWMA load, a circuit breaker and a
//! connection-aware readiness gate per endpoint. Creates get a `request_id` when the caller
//! gave none (AIP-155), so retrying them is safe. A client is a session: a read of one
//! conversation carries the token of the session's latest write to it (if any: the caches
//! check it against their versions), a read across a team the newest token its writes
//! returned, so it reads its own writes. Watches ([`WatchClient`]) resume by themselves when
//! a server ends their stream (at its maximum lifetime, or going away). With
//! [`ClientConfig::with_tls`] every connection is mutual TLS ([`MeshTls`], from the
//! `--tls-*` flags of [`TlsArgs`]).

#![forbid(unsafe_code)]

mod analytics;
mod cache;
mod conversation;
mod session;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use convoy_discovery::{Endpoint, EtcdConfig, Metadata};
use convoy_mesh::metrics::Side;
use convoy_mesh::propagation::DeadlinePropagationLayer;
use convoy_mesh::{
    BalanceConfig, BalancedChannel, Deadline, RetryBudget, RetryConfig, RetryPolicy, RpcCall,
    RpcMetricsLayer, TraceLayer,
};
use convoy_proto::consistency::HEADER;
use convoy_proto::methods::idempotency;
use std::future::Future;
use tonic::{IntoRequest, Response, Status};
use tower::retry::Retry;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Layer, ServiceExt};

use session::{Scope, SharedSession};

pub use analytics::AnalyticsClient;
pub use cache::{CacheClient, CacheClientConfig};
pub use conversation::ConversationClient;
pub use convoy_auth::Credentials;
use convoy_auth::CredentialsLayer;
pub use convoy_mesh::tls::{MeshTls, TlsArgs};
pub use watch::{
    ConversationWatch, MAX_RETRIES, TeamWatch, TeamWatchItem, WATCH_CALL_TIMEOUT, WatchClient,
};

/// Where to find a service's instances.
#[derive(Clone, Debug)]
pub enum Discovery {
    /// Fixed `host:port` addresses (local runs, tests).
    Static(Vec<String>),
    /// Instances registered in etcd.
    Etcd(EtcdConfig),
}

/// Client settings; every default is documented where it is declared.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Longest time one call (all its attempts) may take when the caller sets no deadline.
    /// 10 s.
    pub per_call_timeout: Duration,
    /// Time kept back from an inherited deadline for the answer's way back. 5 ms.
    pub deadline_margin: Duration,
    /// Retries.
    pub retry: RetryConfig,
    /// Balancing, breakers and endpoint connections.
    pub balance: BalanceConfig,
    /// Reads carry consistency tokens of this client's writes (unless the call brings its
    /// own): a read of one conversation its latest write to it, a read across a team the
    /// newest. So a client always reads its own writes, caches and replicas or not, and
    /// reads of conversations it never wrote stay cache-friendly. On by default.
    pub session_consistency: bool,
    /// The token calls carry (and, inside a call a convoy server let through, the user's
    /// token forwarded beside it). None by default: for servers running `--no-auth`.
    pub credentials: Credentials,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            per_call_timeout: Duration::from_secs(10),
            deadline_margin: Duration::from_millis(5),
            retry: RetryConfig::default(),
            balance: BalanceConfig::default(),
            session_consistency: true,
            credentials: Credentials::None,
        }
    }
}

impl ClientConfig {
    /// These settings with every connection over mutual TLS with `tls` (or, with `None`,
    /// in plain text).
    pub fn with_tls(mut self, tls: Option<MeshTls>) -> Self {
        self.balance.endpoint.tls = tls;
        self
    }
}

/// The endpoint changes of `service` as `discovery` finds them.
pub(crate) fn changes(discovery: &Discovery, service: &str) -> convoy_discovery::Changes {
    match discovery {
        Discovery::Static(addrs) => convoy_discovery::static_endpoints(
            addrs
                .iter()
                .map(|addr| Endpoint {
                    addr: addr.clone(),
                    metadata: Metadata {
                        service: service.into(),
                        instance: addr.clone(),
                        version: String::new(),
                        zone: String::new(),
                        extra: Default::default(),
                    },
                })
                .collect(),
        ),
        Discovery::Etcd(etcd) => convoy_discovery::watch_service(etcd, service),
    }
}

/// What the SDK's calls run on: the balanced channel behind deadline propagation.
pub type Transport = BoxCloneSyncService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    TransportError,
>;

/// A failure below gRPC (the balancer's queue closed, a discovery error). A concrete type
/// rather than a boxed trait object, so the typed clients' futures are provably `Send`.
#[derive(Debug)]
pub struct TransportError(BoxError);

impl std::fmt::Display for TransportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for TransportError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.0.as_ref())
    }
}

/// A connection to the convoy fleet: one session (see [`ClientConfig::session_consistency`])
/// shared by its typed clients.
#[derive(Clone)]
pub struct ConvoyClient {
    conversation: ConversationClient,
    analytics: AnalyticsClient,
    watch: WatchClient,
}

/// What every typed client shares.
#[derive(Clone)]
pub(crate) struct Stack {
    pub(crate) transport: Transport,
    pub(crate) config: Arc<ClientConfig>,
    pub(crate) retry: Arc<RetryConfig>,
    pub(crate) budget: Arc<RetryBudget>,
}

impl Stack {
    fn new(discovery: &Discovery, service: &str, config: Arc<ClientConfig>) -> Self {
        let changes = changes(discovery, service);
        let balanced: BalancedChannel =
            convoy_mesh::balanced_channel(changes, config.balance.clone());
        let transport = BoxCloneSyncService::new(
            DeadlinePropagationLayer::new(config.per_call_timeout, config.deadline_margin)
                .layer(
                    TraceLayer::client()
                        .layer(CredentialsLayer::new(config.credentials.clone()).layer(balanced)),
                )
                .map_err(TransportError),
        );
        let retry = Arc::new(config.retry.clone());
        let budget = Arc::new(RetryBudget::new(&retry));
        Self {
            transport,
            config,
            retry,
            budget,
        }
    }

    /// The deadline of a call: the per-call timeout, shortened to a timeout set on the
    /// request and to the caller's own deadline (from the request, or the inbound call this
    /// task serves) minus the margin.
    pub(crate) fn deadline_for<M>(&self, request: &tonic::Request<M>) -> Deadline {
        let mut own = Deadline::after(self.config.per_call_timeout);
        // A timeout the caller set on the request itself (`Request::set_timeout`).
        if let Some(set) = request
            .metadata()
            .get(convoy_mesh::deadline::GRPC_TIMEOUT)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| convoy_mesh::deadline::parse_grpc_timeout(v).ok())
        {
            own = own.min(Deadline::after(set));
        }
        let inherited = request
            .extensions()
            .get::<Deadline>()
            .copied()
            .or_else(Deadline::current)
            .map(|d| Deadline(d.0.checked_sub(self.config.deadline_margin).unwrap_or(d.0)));
        match inherited {
            Some(inherited) if inherited < own => inherited,
            _ => own,
        }
    }

    /// Requests made, retries spent and retries refused by the budget.
    pub(crate) fn retry_counts(&self) -> (u64, u64, u64) {
        self.budget.counts()
    }

    /// Runs one call of `path` on `client`: the session's token for `scope` (unless the
    /// request brings its own), one deadline over every attempt, retries by the method's
    /// idempotency, and the token the answer returns remembered.
    pub(crate) async fn call<C, M, R, F, Fut>(
        &self,
        client: &C,
        session: &SharedSession,
        path: &'static str,
        scope: Scope,
        request: impl IntoRequest<M>,
        send: F,
    ) -> Result<Response<R>, Status>
    where
        C: Clone + Send + 'static,
        M: Clone + Send + 'static,
        F: Fn(C, tonic::Request<M>) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Result<Response<R>, Status>> + Send + 'static,
    {
        // One sample per logical call in `convoy_rpc_client_duration_seconds`, whatever its
        // attempts; a call its caller gives up on is recorded CANCELLED.
        let timer = RpcCall::start(Side::Client, path);
        let mut request = request.into_request();
        // Session consistency: a call without a token of its own carries the newest one
        // this session's writes returned, so it reads them (replicas that have not replayed
        // them are skipped).
        let consistent = self.config.session_consistency;
        if consistent && request.metadata().get(HEADER).is_none() {
            let token = session::lock(session).token_for(&scope);
            if let Some(token) = token {
                request.metadata_mut().insert(HEADER, token);
            }
        }
        let deadline = self.deadline_for(&request);
        request.extensions_mut().insert(deadline);
        let policy = RetryPolicy::new(self.retry.clone(), self.budget.clone(), idempotency(path));
        let client = client.clone();
        let attempt = tower::service_fn(move |request: tonic::Request<M>| {
            send.clone()(client.clone(), request)
        });
        let result =
            match tokio::time::timeout_at(deadline.0, Retry::new(policy, attempt).oneshot(request))
                .await
            {
                Ok(result) => {
                    if consistent
                        && let Ok(response) = &result
                        && let Some(token) = response.metadata().get(HEADER)
                    {
                        session::lock(session).record(&scope, token);
                    }
                    result
                }
                Err(_) => Err(Status::deadline_exceeded(
                    "the call's deadline passed (all attempts included)",
                )),
            };
        timer.finish(
            result
                .as_ref()
                .map_or_else(Status::code, |_| tonic::Code::Ok),
        );
        result
    }
}

/// Why connecting failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Must be called inside a tokio runtime.
    #[error("convoy-client needs a tokio runtime")]
    NoRuntime,
}

impl ConvoyClient {
    /// Connects to the fleet. Instances are found and connected in the background; calls
    /// made before any is ready wait (up to the fail-fast timeout) rather than fail.
    pub fn connect(discovery: Discovery, config: ClientConfig) -> Result<Self, Error> {
        tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        // A watch's stream lasts far longer than a call: its own deadline.
        let watching = Arc::new(ClientConfig {
            per_call_timeout: WATCH_CALL_TIMEOUT,
            ..config.clone()
        });
        let config = Arc::new(config);
        let session = SharedSession::default();
        Ok(Self {
            conversation: ConversationClient::new(
                Stack::new(&discovery, "conversation", config.clone()),
                session.clone(),
            ),
            analytics: AnalyticsClient::new(Stack::new(&discovery, "analytics", config), session),
            watch: WatchClient::new(measured(
                Stack::new(&discovery, "conversation", watching).transport,
            )),
        })
    }

    /// The conversation service.
    pub fn conversations(&self) -> ConversationClient {
        self.conversation.clone()
    }

    /// The analytics service.
    pub fn analytics(&self) -> AnalyticsClient {
        self.analytics.clone()
    }

    /// The conversation service's live streams.
    pub fn watches(&self) -> WatchClient {
        self.watch.clone()
    }
}

/// The mesh transport to one service, for generated clients the SDK does not wrap yet (and
/// for health checks): RED metrics per call, balancing, breakers and deadline propagation,
/// without retries (they need the typed request).
pub fn transport(discovery: &Discovery, service: &str, config: ClientConfig) -> Transport {
    measured(Stack::new(discovery, service, Arc::new(config)).transport)
}

/// `transport` with each call timed in `convoy_rpc_client_duration_seconds`: for transports
/// whose calls are not retried above them (the typed clients' retried calls are timed in
/// [`Stack::call`] instead, once per logical call).
pub(crate) fn measured(transport: Transport) -> Transport {
    BoxCloneSyncService::new(
        RpcMetricsLayer::client()
            .layer(transport)
            .map_response(|response| response.map(tonic::body::Body::new)),
    )
}
