//! A channel that routes each call by a key: consistent hashing with bounded loads over the
//! endpoints discovery announces, for services that keep per-key state (the cache tier's
//! L1). Each endpoint sits behind the same connection-aware readiness gate and circuit
//! breaker as in the balanced channel.
//!
//! Every endpoint owns [`KeyedConfig::virtual_nodes`] points on a hash ring; a call goes to
//! the first endpoint clockwise from its key's hash that is usable (connected, its breaker
//! admitting calls) and under its load bound: at most `load_factor` times the mean number
//! of calls in flight per usable endpoint, counting this call (Mirrokni, Thorup and
//! Zadimoghaddam, "Consistent Hashing with Bounded Loads", 2016; Vimeo uses 1.25). So a key
//! stays on one instance while the set and the load are steady, moves only when its owner
//! leaves or fails, and a hot key spills over to the next instance instead of overloading
//! its owner. A call without a [`RouteKey`] goes by a random key.
//!
//! Not here: retries (the caller's, per method) or queueing: with nothing usable a call
//! fails at once with UNAVAILABLE, because for a cache a miss now beats an answer later.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use convoy_discovery::Changes;
use futures::FutureExt;
use futures::StreamExt;
use futures::future::BoxFuture;
use http::{Request, Response};
use tokio_util::task::AbortOnDropHandle;
use tonic::body::Body;
use tower::discover::Change;
use tower::{BoxError, Layer, Service, ServiceExt};

use crate::breaker::{Breaker, BreakerConfig, BreakerLayer, EjectionBudget};
use crate::bulkhead::RETRY_PUSHBACK;
use crate::endpoint::{EndpointConfig, EndpointService};

/// The key a call is routed by, in its request's extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RouteKey(pub u64);

impl RouteKey {
    /// The route key of `key`'s bytes: the same in every process and every release.
    pub fn of(key: &[u8]) -> Self {
        Self(xxhash_rust::xxh3::xxh3_64(key))
    }
}

/// Keyed routing settings.
#[derive(Clone, Debug)]
pub struct KeyedConfig {
    /// How endpoints connect.
    pub endpoint: EndpointConfig,
    /// Each endpoint's breaker.
    pub breaker: BreakerConfig,
    /// Most endpoints ejected at once, as a share of the set. 0.5, as for balancing.
    pub max_ejection_share: f64,
    /// Ring points per endpoint. 100: the keys' spread over 2 to 10 endpoints stays within
    /// about 10% of even.
    pub virtual_nodes: usize,
    /// An endpoint's bound on calls in flight, as a multiple of the mean. 1.25.
    pub load_factor: f64,
}

impl Default for KeyedConfig {
    fn default() -> Self {
        Self {
            endpoint: EndpointConfig::default(),
            breaker: BreakerConfig::default(),
            max_ejection_share: 0.5,
            virtual_nodes: 100,
            load_factor: 1.25,
        }
    }
}

/// One endpoint of the ring.
struct Member {
    instance: String,
    service: Breaker<EndpointService>,
    in_flight: Arc<AtomicUsize>,
}

impl Member {
    /// Holding a live connection (the breaker is asked at dispatch).
    fn connected(&self) -> bool {
        self.service.get_ref().live_connections() > 0
    }

    /// Connected, and its breaker would let a call through now.
    fn usable(&self) -> bool {
        self.connected() && self.service.admits_now()
    }
}

/// The endpoints and their points, rebuilt on every membership change.
#[derive(Default)]
struct Ring {
    members: Vec<Member>,
    /// (point, index into `members`), sorted by point.
    points: Vec<(u64, usize)>,
}

impl Ring {
    fn build(members: Vec<Member>, virtual_nodes: usize) -> Self {
        let mut points: Vec<(u64, usize)> = members
            .iter()
            .enumerate()
            .flat_map(|(index, member)| {
                (0..virtual_nodes.max(1)).map(move |v| {
                    let point = format!("{}#{v}", member.instance);
                    (RouteKey::of(point.as_bytes()).0, index)
                })
            })
            .collect();
        points.sort_unstable();
        Self { members, points }
    }

    /// The members in ring order from `key`, each once.
    fn walk(&self, key: RouteKey) -> impl Iterator<Item = usize> + '_ {
        let start = self.points.partition_point(|(point, _)| *point < key.0);
        let mut seen = vec![false; self.members.len()];
        self.points[start..]
            .iter()
            .chain(&self.points[..start])
            .filter_map(move |&(_, index)| {
                (!std::mem::replace(&mut seen[index], true)).then_some(index)
            })
    }

    /// The members a call for `key` may go to, in order of preference: the usable ones
    /// under their load bound in ring order, then the other usable ones in ring order.
    fn candidates(
        &self,
        key: RouteKey,
        load_factor: f64,
        usable: impl Fn(&Member) -> bool,
    ) -> Vec<usize> {
        let usable: Vec<usize> = self
            .walk(key)
            .filter(|&i| usable(&self.members[i]))
            .collect();
        if usable.is_empty() {
            return usable;
        }
        let load = |i: usize| self.members[i].in_flight.load(Ordering::Relaxed);
        let total: usize = usable.iter().map(|&i| load(i)).sum();
        // Counting this call, so an idle set always admits it at its owner.
        let bound = ((total + 1) as f64 * load_factor / usable.len() as f64).ceil() as usize;
        let (under, over): (Vec<usize>, Vec<usize>) =
            usable.into_iter().partition(|&i| load(i) < bound);
        under.into_iter().chain(over).collect()
    }

    /// The member a call for `key` goes to first.
    fn choose(
        &self,
        key: RouteKey,
        load_factor: f64,
        usable: impl Fn(&Member) -> bool,
    ) -> Option<usize> {
        self.candidates(key, load_factor, usable).first().copied()
    }
}

/// A channel routing each call by its [`RouteKey`]; see the module docs. Clones share the
/// ring.
#[derive(Clone)]
pub struct KeyedChannel {
    ring: Arc<RwLock<Arc<Ring>>>,
    load_factor: f64,
    /// The discovery task, stopped (with its endpoints' connection tasks) when the last
    /// clone is dropped.
    _discovery: Arc<AbortOnDropHandle<()>>,
}

impl std::fmt::Debug for KeyedChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedChannel")
            .field("endpoints", &self.current().members.len())
            .finish()
    }
}

impl KeyedChannel {
    /// Routes over the endpoints `changes` announces. Must be called inside a tokio
    /// runtime (it spawns the discovery task, which is stopped when the last clone is
    /// dropped).
    pub fn new(mut changes: Changes, config: KeyedConfig) -> Self {
        let ring = Arc::new(RwLock::new(Arc::new(Ring::default())));
        let weak = Arc::downgrade(&ring);
        let budget = EjectionBudget::new(config.max_ejection_share);
        let breaker = BreakerLayer::new(config.breaker.clone(), budget);
        let discovery = tokio::spawn(async move {
            let mut endpoints: HashMap<String, Breaker<EndpointService>> = HashMap::new();
            // Calls in flight per instance, kept across membership changes.
            let mut loads: HashMap<String, Arc<AtomicUsize>> = HashMap::new();
            while let Some(change) = changes.next().await {
                let Some(ring) = weak.upgrade() else {
                    return;
                };
                match change {
                    Ok(Change::Insert(instance, endpoint)) => {
                        match EndpointService::new(endpoint.addr.clone(), config.endpoint.clone()) {
                            Ok(service) => {
                                let breaker = breaker.for_endpoint(service.addr());
                                if let Some(old) =
                                    endpoints.insert(instance, breaker.layer(service))
                                {
                                    old.get_ref().abort_handle().abort();
                                }
                            }
                            Err(e) => {
                                tracing::warn!(addr = %endpoint.addr, error = %e, "unusable endpoint address");
                                continue;
                            }
                        }
                    }
                    Ok(Change::Remove(instance)) => {
                        if let Some(old) = endpoints.remove(&instance) {
                            old.get_ref().abort_handle().abort();
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "discovery failed; keeping the endpoint set");
                        continue;
                    }
                }
                loads.retain(|instance, _| endpoints.contains_key(instance));
                let members = endpoints
                    .iter()
                    .map(|(instance, service)| Member {
                        instance: instance.clone(),
                        service: service.clone(),
                        in_flight: loads.entry(instance.clone()).or_default().clone(),
                    })
                    .collect();
                let next = Arc::new(Ring::build(members, config.virtual_nodes));
                *ring.write().unwrap_or_else(|e| e.into_inner()) = next;
            }
            // Discovery ended: the set stays as it is for as long as the channel lives.
        });
        Self {
            ring,
            load_factor: config.load_factor,
            _discovery: Arc::new(AbortOnDropHandle::new(discovery)),
        }
    }

    fn current(&self) -> Arc<Ring> {
        self.ring.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The address a call with `key` would go to now, if any endpoint is usable.
    pub fn route(&self, key: RouteKey) -> Option<String> {
        let ring = self.current();
        let index = ring.choose(key, self.load_factor, Member::usable)?;
        Some(ring.members[index].service.get_ref().addr().to_owned())
    }
}

/// Decrements an endpoint's in-flight count when its call ends, however it ends.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Service<Request<Body>> for KeyedChannel {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The endpoint is chosen per call, by its key.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let key = request
            .extensions()
            .get::<RouteKey>()
            .copied()
            .unwrap_or_else(|| RouteKey(rand::random()));
        let ring = self.current();
        // The first candidate whose readiness is immediate: an endpoint whose breaker is
        // open, or half-open with its probe out, would make the call wait; skip it.
        for index in ring.candidates(key, self.load_factor, Member::connected) {
            let member = &ring.members[index];
            let mut service = member.service.clone();
            if !matches!(service.ready().now_or_never(), Some(Ok(_))) {
                continue;
            }
            member.in_flight.fetch_add(1, Ordering::Relaxed);
            let guard = InFlight(member.in_flight.clone());
            let call = service.call(request);
            return Box::pin(async move {
                let response = call.await;
                drop(guard);
                response
            });
        }
        metrics::counter!("convoy_client_keyed_unavailable_total").increment(1);
        let mut response =
            tonic::Status::unavailable("no endpoint of the service is usable").into_http::<Body>();
        // Another attempt would find the same set: do not retry (gRFC A6).
        response
            .headers_mut()
            .insert(RETRY_PUSHBACK, http::HeaderValue::from_static("-1"));
        Box::pin(std::future::ready(Ok(response)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(instances: &[&str]) -> Ring {
        let layer = BreakerLayer::new(BreakerConfig::default(), EjectionBudget::new(0.5));
        let members = instances
            .iter()
            .map(|instance| Member {
                instance: (*instance).to_owned(),
                service: layer.layer(
                    EndpointService::new(format!("{instance}:1"), EndpointConfig::default())
                        .unwrap(),
                ),
                in_flight: Arc::new(AtomicUsize::new(0)),
            })
            .collect();
        Ring::build(members, 100)
    }

    fn owners(ring: &Ring, keys: u64) -> Vec<String> {
        (0..keys)
            .map(|k| {
                let i = ring
                    .choose(RouteKey::of(&k.to_le_bytes()), 1.25, |_| true)
                    .unwrap();
                ring.members[i].instance.clone()
            })
            .collect()
    }

    #[tokio::test]
    async fn keys_spread_evenly_and_move_only_when_their_owner_leaves() {
        let three = ring(&["a", "b", "c"]);
        let before = owners(&three, 30_000);
        for instance in ["a", "b", "c"] {
            let share = before.iter().filter(|o| *o == instance).count() as f64 / 30_000.0;
            assert!((0.25..0.42).contains(&share), "{instance} owns {share}");
        }
        // `c` leaves: only its keys move.
        let two = ring(&["a", "b"]);
        let after = owners(&two, 30_000);
        for (b, a) in before.iter().zip(&after) {
            if b != "c" {
                assert_eq!(b, a, "a key of a remaining instance moved");
            }
        }
    }

    #[tokio::test]
    async fn an_unusable_owner_passes_its_keys_to_the_next_instance() {
        let ring = ring(&["a", "b", "c"]);
        let key = RouteKey::of(b"conv:acme:1");
        let owner = ring.choose(key, 1.25, |_| true).unwrap();
        let next = ring.walk(key).nth(1).unwrap();
        let chosen = ring
            .choose(key, 1.25, |m| m.instance != ring.members[owner].instance)
            .unwrap();
        assert_eq!(chosen, next);
        assert!(ring.choose(key, 1.25, |_| false).is_none());
    }

    #[tokio::test]
    async fn a_loaded_owner_spills_over_within_the_bound() {
        let ring = ring(&["a", "b", "c", "d"]);
        let key = RouteKey::of(b"hot");
        let order: Vec<usize> = ring.walk(key).collect();
        // Calls for one hot key arrive and stay in flight.
        for _ in 0..100 {
            let i = ring.choose(key, 1.25, |_| true).unwrap();
            ring.members[i].in_flight.fetch_add(1, Ordering::Relaxed);
        }
        let loads: Vec<usize> = order
            .iter()
            .map(|&i| ring.members[i].in_flight.load(Ordering::Relaxed))
            .collect();
        // The bound is ceil(1.25 * total / 4) = 32 at most; the owner fills first.
        assert!(loads.iter().all(|&l| l <= 32), "{loads:?}");
        assert!(loads[0] >= loads[3], "{loads:?}");
        assert_eq!(loads.iter().sum::<usize>(), 100);
    }
}
