//! The typed client of `convoy.v1.CacheService`: each call goes to the instance that owns its
//! key (consistent hashing with bounded loads, [`convoy_mesh::keyed`]), so each key's L1
//! lives mostly on one instance.
//!
//! Cache calls get a short deadline of their own ([`CacheClientConfig::timeout`]) and no
//! retries: a cache that cannot answer quickly should be treated as a miss by the caller,
//! which has the database to fall back on.

use std::time::Duration;

use convoy_mesh::TraceLayer;
use convoy_mesh::propagation::DeadlinePropagationLayer;
use convoy_mesh::{KeyedChannel, KeyedConfig, RouteKey};
use convoy_proto::v1 as pb;
use convoy_proto::v1::cache_service_client::CacheServiceClient;
use tonic::{Response, Status};
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt};

use crate::{Discovery, Transport, TransportError, changes};

/// Cache client settings.
#[derive(Clone, Debug)]
pub struct CacheClientConfig {
    /// Longest time one cache call may take (less when the caller's own deadline is
    /// nearer). 100 ms: an order of magnitude over a LAN round trip to Redis and back; past
    /// it the database is the faster answer.
    pub timeout: Duration,
    /// Routing, breakers and endpoint connections.
    pub keyed: KeyedConfig,
    /// The service's own token; calls made inside a user's call forward the user's token
    /// beside it (see `convoy_auth`).
    pub credentials: convoy_auth::Credentials,
}

impl Default for CacheClientConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_millis(100),
            keyed: KeyedConfig::default(),
            credentials: convoy_auth::Credentials::None,
        }
    }
}

impl CacheClientConfig {
    /// These settings with every connection over mutual TLS with `tls` (or, with `None`,
    /// in plain text).
    pub fn with_tls(mut self, tls: Option<convoy_mesh::MeshTls>) -> Self {
        self.keyed.endpoint.tls = tls;
        self
    }
}

/// CacheService, routed by key; cheap to clone.
#[derive(Clone)]
pub struct CacheClient {
    channel: KeyedChannel,
    inner: CacheServiceClient<Transport>,
}

impl std::fmt::Debug for CacheClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheClient")
            .field("channel", &self.channel)
            .finish()
    }
}

fn routed<M>(key: &str, message: M) -> tonic::Request<M> {
    let mut request = tonic::Request::new(message);
    request
        .extensions_mut()
        .insert(RouteKey::of(key.as_bytes()));
    request
}

impl CacheClient {
    /// Connects to the cache instances `discovery` finds (service `cache`). Must be called
    /// inside a tokio runtime.
    pub fn connect(discovery: &Discovery, config: CacheClientConfig) -> Self {
        let channel = KeyedChannel::new(changes(discovery, "cache"), config.keyed);
        // Cache calls are never retried: each is timed once, around its deadline.
        let transport = crate::measured(BoxCloneSyncService::new(
            DeadlinePropagationLayer::new(config.timeout, Duration::ZERO)
                .layer(
                    TraceLayer::client().layer(
                        convoy_auth::CredentialsLayer::new(config.credentials.clone())
                            .layer(channel.clone()),
                    ),
                )
                .map_err(TransportError),
        ));
        Self {
            channel,
            inner: CacheServiceClient::new(transport),
        }
    }

    /// The address of the instance a call for `key` would go to now.
    pub fn owner(&self, key: &str) -> Option<String> {
        self.channel.route(RouteKey::of(key.as_bytes()))
    }

    /// Looks `key` up (L1, then L2) at its instance. With `peek`, the lookup changes
    /// nothing there (no promotion, not counted).
    pub async fn get(
        &self,
        key: &str,
        min_version: i64,
        peek: bool,
    ) -> Result<pb::CacheGetResponse, Status> {
        Ok(self
            .inner
            .clone()
            .get(routed(
                key,
                pb::CacheGetRequest {
                    key: key.to_owned(),
                    min_version,
                    peek,
                },
            ))
            .await?
            .into_inner())
    }

    /// Get-or-lease for a read-through fill.
    pub async fn lease(
        &self,
        key: &str,
        lease_ttl: Option<Duration>,
    ) -> Result<pb::LeaseResponse, Status> {
        self.lease_tagged(key, lease_ttl, Vec::new()).await
    }

    /// Get-or-lease for a fill that will carry `tags`: invalidating any of them while the
    /// lease is out refuses the fill's Set (LEASE_MISMATCH).
    pub async fn lease_tagged(
        &self,
        key: &str,
        lease_ttl: Option<Duration>,
        tags: Vec<String>,
    ) -> Result<pb::LeaseResponse, Status> {
        let lease_ttl = lease_ttl.map(|d| prost_types::Duration {
            seconds: d.as_secs() as i64,
            nanos: d.subsec_nanos() as i32,
        });
        let response = self
            .inner
            .clone()
            .lease(routed(
                key,
                pb::LeaseRequest {
                    key: key.to_owned(),
                    lease_ttl,
                    tags,
                },
            ))
            .await?
            .into_inner();
        if response.outcome.is_none() {
            return Err(Status::internal("a Lease answer without an outcome"));
        }
        Ok(response)
    }

    /// Stores `entry` (with the lease token when the key is leased).
    pub async fn set(
        &self,
        entry: pb::CacheEntry,
        lease_token: String,
    ) -> Result<pb::SetOutcome, Status> {
        let key = entry.key.clone();
        let response = self
            .inner
            .clone()
            .set(routed(
                &key,
                pb::CacheSetRequest {
                    entry: Some(entry),
                    lease_token,
                },
            ))
            .await?;
        Ok(response.into_inner().outcome())
    }

    /// Drops `key` at its instance (L1 and Redis) and raises its floor to `version`. Other
    /// instances' L1s hear of it only through the invalidation bus, which this does not
    /// publish to: writers invalidate through the outbox.
    pub async fn invalidate(&self, key: &str, version: i64) -> Result<(), Status> {
        self.inner
            .clone()
            .invalidate(routed(
                key,
                pb::CacheInvalidateRequest {
                    key: key.to_owned(),
                    version,
                },
            ))
            .await
            .map(Response::into_inner)
            .map(drop)
    }
}
