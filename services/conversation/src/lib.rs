//! The conversation service: convoy's system of record over sharded PostgreSQL.
//!
//! Data flows one way: [`service`] (gRPC) → [`validate`] (requests become [`model`] values)
//! → [`store`] (SQL on the owning shard) → [`wire`] (replies). [`error`] maps every failure
//! to a gRPC status in one place. GetConversation reads through the caches ([`cached`]).
//! [`ingest`] takes transcripts as a stream of lines into the same store; [`watch`] streams
//! conversations' events and teams' changes live, fed by the invalidation bus.
//! Every write leaves an outbox row that [`relay`] publishes on the invalidation bus, and
//! [`sampler`] checks a share of writes against every cache layer. The binary (`main.rs`)
//! only wires config, telemetry, backends and server together through [`serve`].

#![forbid(unsafe_code)]

pub mod cached;
pub mod config;
pub mod error;
pub mod fingerprint;
pub mod ingest;
pub mod limits;
pub mod model;
pub mod names;
pub mod page_token;
pub mod relay;
pub mod sampler;
pub mod service;
pub mod store;
pub mod validate;
pub mod watch;
pub mod wire;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use convoy_cache::l1::{L1, L1Config};
use convoy_cache::l2::{L2, L2Config};
use convoy_cache::subscriber::{self, Subscriber};
use convoy_client::{CacheClient, CacheClientConfig};
use convoy_mesh::{MeshTls, ServerBuilder};
use convoy_proto::v1::conversation_service_server::ConversationServiceServer;
use convoy_proto::v1::ingest_service_server::IngestServiceServer;
use convoy_proto::v1::watch_service_server::WatchServiceServer;
use convoy_store::ShardPools;
use tokio::net::TcpListener;
use tokio_util::task::AbortOnDropHandle;

pub use cached::{LocalCache, ReadThrough};
pub use config::Config;
pub use ingest::IngestApi;
use sampler::Sampler;
pub use service::ConversationApi;
pub use store::ConversationStore;

/// How long idempotency records are kept (the contract promises 24 h).
const REQUEST_ID_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// Builds the store from configuration and, unless `--migrate=false`, applies migrations to
/// every shard. With `--shard-map-from-etcd` the store follows the map as the shard-router
/// changes it; otherwise the configured map is fixed. Either way the store's background
/// tasks (map following, node checks) run until the store is dropped.
pub async fn connect(config: &Config) -> anyhow::Result<ConversationStore> {
    let settings = config.pool_settings();
    // One operation may wait for a connection, then run a few statements.
    let op_timeout = settings.acquire_timeout + settings.statement_timeout * 2;
    let (map, etcd_store) = config.shards.map(&config.registration).await?;
    let pools = ShardPools::connect_lazy(map, &settings)?;
    if config.migrate || config.migrate_only {
        pools.migrate().await?;
    }
    let shards = convoy_discovery::shards::live(pools, etcd_store.as_ref());
    Ok(ConversationStore::new(shards.pools, op_timeout).with_background(shards.tasks))
}

/// The gRPC service, with the contract's message-size limit.
pub fn grpc_service(api: ConversationApi) -> ConversationServiceServer<ConversationApi> {
    ConversationServiceServer::new(api)
        .max_decoding_message_size(limits::MAX_DECODING_MESSAGE_BYTES)
}

/// The ingestion service, with the same message-size limit.
pub fn ingest_service(api: IngestApi) -> IngestServiceServer<IngestApi> {
    IngestServiceServer::new(api).max_decoding_message_size(limits::MAX_DECODING_MESSAGE_BYTES)
}

/// Background tasks that end with the server, however it ends (a dropped `serve` future
/// included: an instance killed in a test must not leave its relay running).
#[derive(Default)]
struct Tasks(Vec<AbortOnDropHandle<()>>);

impl Tasks {
    fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.0.push(AbortOnDropHandle::new(tokio::spawn(task)));
    }
}

/// The own L1 and the cache tier client, as configured; their tasks join `tasks`.
fn caches(
    config: &Config,
    tasks: &mut Tasks,
    tls: Option<MeshTls>,
) -> anyhow::Result<(Option<LocalCache>, Option<CacheClient>)> {
    let local = match &config.redis_url {
        Some(url) if config.local_cache_mib > 0 => {
            let l1 = L1::new(L1Config {
                capacity_bytes: config.local_cache_mib << 20,
                ..L1Config::default()
            });
            let subscriber = Subscriber::new(L2::new(L2Config::new(url.clone()))?, l1.clone())
                .with_drop_ratio(config.fault_bus_drop_ratio)
                .with_stale_after(config.bus.stale_after());
            let (bus, task) =
                subscriber::spawn(subscriber, Duration::from_millis(config.bus_poll_ms.max(1)));
            tasks.0.push(AbortOnDropHandle::new(task));
            Some(LocalCache { l1, bus })
        }
        _ => None,
    };
    let credentials = config.auth.credentials()?;
    let tier = config.cache_discovery().map(|discovery| {
        let cache = CacheClientConfig {
            timeout: Duration::from_millis(config.cache_timeout_ms),
            credentials: credentials.clone(),
            ..CacheClientConfig::default()
        }
        .with_tls(tls);
        CacheClient::connect(&discovery, cache)
    });
    if tier.is_none() {
        tracing::info!("no cache tier configured: reads go to the primary");
    }
    Ok((local, tier))
}

/// Serves the conversation API on `listener` until `shutdown` completes.
pub async fn serve(
    config: &Config,
    store: ConversationStore,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    // Served for as long as this function runs, from before the first call it could count.
    let _metrics = config.telemetry.serve_metrics().await?;
    let tls = config.tls.load()?;
    let store = Arc::new(store);
    // Shutdown order: health NOT_SERVING, then deregister (peers drop us at once), then
    // stop accepting and drain.
    let deregister = config
        .registration
        .register_until_drained(
            config::SERVICE_NAME,
            env!("CARGO_PKG_VERSION"),
            listener.local_addr()?,
        )
        .await?;
    let mut tasks = Tasks::default();
    tasks.spawn(purge_old_rows(
        store.clone(),
        config.outbox_retention(),
        config.purge_interval(),
    ));
    match &config.redis_url {
        Some(_) if config.fault_no_relay => {
            tracing::warn!("fault injection: this instance relays nothing");
        }
        Some(url) => tasks.spawn(relay::run(
            store.clone(),
            L2::new(L2Config::new(url.clone()))?,
        )),
        None => {
            tracing::warn!("no --redis-url: the outbox is not relayed to the invalidation bus");
        }
    }
    let (local, tier) = caches(config, &mut tasks, tls.clone())?;
    let bus_current = local.as_ref().map(|local| local.bus.current_changes());
    let mut api =
        ConversationApi::new(store.clone(), ReadThrough::new(local.clone(), tier.clone()));
    let mut sampler = None;
    if let Some(url) = &config.redis_url
        && config.consistency_sample_ratio > 0.0
    {
        sampler = Some(Arc::new(Sampler::new(
            config.consistency_sample_ratio,
            config
                .consistency_check_after_ms
                .iter()
                .map(|ms| Duration::from_millis(*ms))
                .collect(),
            store.clone(),
            local,
            tier,
            L2::new(L2Config::new(url.clone()))?,
        )));
    }
    if let Some(sampler) = &sampler {
        api = api.with_sampler(sampler.clone());
    }
    let ingest = IngestApi::new(store.clone()).with_sampler(sampler);
    // Live streams follow the bus this instance's writes are relayed to.
    let hub = match &config.redis_url {
        Some(url) => {
            let hub = watch::WatchHub::new(store.clone());
            tasks.spawn(watch::follow_bus(
                hub.clone(),
                L2::new(L2Config::new(url.clone()))?,
                Duration::from_millis(config.bus_poll_ms.max(1)),
            ));
            Some(hub)
        }
        None => None,
    };
    let server = ServerBuilder::new(config.server_config(tls).with_auth(&config.auth)?)
        .add_service(grpc_service(api))
        .add_service(ingest_service(ingest))
        .add_service(WatchServiceServer::new(watch::WatchApi::new(hub)));
    // `convoy.bus`: whether the own L1 serves; reads go on to the database either way.
    if let Some(current) = bus_current {
        tasks.spawn(convoy_mesh::health::follow(
            server.health(),
            subscriber::BUS_HEALTH_SERVICE,
            current,
        ));
    }
    let result = server
        .serve_with_drain_hook(listener, shutdown, deregister)
        .await;
    drop(tasks);
    store.pools().close().await;
    Ok(result?)
}

/// Purges expired idempotency records and outbox rows published over `outbox_retention`
/// ago (except those a slot move still needs) every `interval`, until dropped. Exports
/// `convoy_outbox_hold_age_seconds`: how long the oldest slot move's hold has kept outbox
/// rows (0 when none), for an alert on a move that no router finishes.
async fn purge_old_rows(
    store: Arc<ConversationStore>,
    outbox_retention: Duration,
    interval: Duration,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match store.purge_create_requests(REQUEST_ID_RETENTION).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "purged expired idempotency records"),
            Err(e) => tracing::warn!(error = %e, "purging idempotency records failed"),
        }
        match store.purge_published_outbox(outbox_retention).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "purged published outbox rows"),
            Err(e) => tracing::warn!(error = %e, "purging the outbox failed"),
        }
        match store.oldest_outbox_hold().await {
            Ok(age) => metrics::gauge!("convoy_outbox_hold_age_seconds")
                .set(age.unwrap_or_default().as_secs_f64()),
            Err(e) => tracing::debug!(error = %e, "reading the outbox holds failed"),
        }
    }
}
