//! The fleet harness for integration tests: real PostgreSQL shards (through
//! `convoy-testkit`), the conversation service and cache instances running in-process on
//! loopback ports, reached through real gRPC channels.
//!
//! Tests use it to assert what a client sees, and reach into the shards directly to assert
//! what was stored where.

#![forbid(unsafe_code)]

pub mod exposition;
pub mod otlp;

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use conversation::Config;
use convoy_proto::v1 as pb;
use convoy_proto::v1::cache_service_client::CacheServiceClient;
use convoy_proto::v1::conversation_service_client::ConversationServiceClient;
use convoy_proto::v1::shard_router_service_client::ShardRouterServiceClient;
use convoy_store::ShardMap;
use convoy_testkit::Postgres;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

/// A running conversation service over `n` real Postgres shards.
pub struct Fleet {
    /// The shards, in shard-map order (`shard-0`, `shard-1`, ...).
    pub shards: Vec<Postgres>,
    /// Where the first instance listens.
    pub addr: SocketAddr,
    /// The shard map the service routes by.
    pub map: ShardMap,
    /// Each shard's streaming replicas (empty unless started with replicas).
    pub replicas: Vec<Vec<Postgres>>,
    primary: Instance,
    /// The shard map file, when the fleet has replicas (kept as long as the fleet).
    _map_file: Option<tempfile::NamedTempFile>,
}

/// One conversation service instance running in this process.
pub struct Instance {
    /// Where it listens.
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Instance {
    /// Starts an instance over `shards` with `extra` command-line flags.
    async fn launch(shards: &[Postgres], extra: &[&str]) -> (Instance, ShardMap) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let mut args = vec![
            "conversation".to_owned(),
            "--listen".into(),
            addr.to_string(),
        ];
        for shard in shards {
            args.push("--shard-dsn".into());
            args.push(shard.dsn());
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        auth_default(&mut args);
        let config = Config::try_parse_from(args).expect("config");
        let store = conversation::connect(&config)
            .await
            .expect("connect and migrate");
        let map = store.pools().map().clone();
        let (tx, rx) = oneshot::channel();
        let server = tokio::spawn(async move {
            conversation::serve(&config, store, listener, async {
                let _ = rx.await;
            })
            .await
        });
        let instance = Instance {
            addr,
            shutdown: Some(tx),
            server: Some(server),
        };
        instance.wait_until_serving().await;
        (instance, map)
    }

    /// Starts an instance outside any fleet, configured by `flags` alone (its shards
    /// included, for example `--shard-map-from-etcd`).
    pub async fn start_with_flags(flags: &[&str]) -> Instance {
        Instance::launch(&[], flags).await.0
    }

    /// Waits (at most 15 s) until the instance answers its health check with SERVING; it
    /// registers in etcd, when configured, before it starts serving.
    async fn wait_until_serving(&self) {
        wait_health(
            self.addr,
            "",
            ServingStatus::Serving,
            Duration::from_secs(15),
        )
        .await;
    }

    /// Stops gracefully (health NOT_SERVING, deregister, drain) and waits for the exit.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server
                .await
                .expect("server task")
                .expect("server exits cleanly");
        }
    }

    /// Stops at once, like SIGKILL: nothing is drained or deregistered.
    pub fn kill(mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

impl Fleet {
    /// Starts `n` shards and the service over them, with `extra` command-line flags.
    pub async fn start_with(n: usize, extra: &[&str]) -> Fleet {
        // Logs only when asked for (RUST_LOG=info cargo test ...): they go to stderr, which
        // the test harness does not capture.
        if std::env::var_os("RUST_LOG").is_some() {
            convoy_telemetry::init(convoy_telemetry::LogFormat::Text);
        }
        let shards = convoy_testkit::start_postgres_shards(n)
            .await
            .expect("start postgres shards");
        let (primary, map) = Instance::launch(&shards, extra).await;
        Fleet {
            addr: primary.addr,
            shards,
            map,
            replicas: Vec::new(),
            primary,
            _map_file: None,
        }
    }

    /// Starts `n` shards, each with `replicas` streaming replicas, and the service over them
    /// (through a shard map file), with `extra` command-line flags.
    pub async fn start_with_replicas(n: usize, replicas: usize, extra: &[&str]) -> Fleet {
        if std::env::var_os("RUST_LOG").is_some() {
            convoy_telemetry::init(convoy_telemetry::LogFormat::Text);
        }
        let shards = convoy_testkit::start_postgres_shards(n)
            .await
            .expect("start postgres shards");
        // The schema first, so the replicas start with it.
        let plain = ShardMap::evenly(&shards.iter().map(Postgres::dsn).collect::<Vec<_>>())
            .expect("shard map");
        convoy_store::ShardPools::connect_lazy(plain.clone(), &Default::default())
            .expect("pools")
            .migrate()
            .await
            .expect("migrate");
        let mut all = Vec::new();
        for shard in &shards {
            let mut of_shard = Vec::new();
            for _ in 0..replicas {
                of_shard.push(shard.start_replica().await.expect("start replica"));
            }
            all.push(of_shard);
        }
        let mut toml = String::from("epoch = 1\n");
        for (i, shard) in plain.shards().iter().enumerate() {
            let slots: Vec<String> = (0..convoy_store::SLOT_COUNT)
                .filter(|s| plain.owner(convoy_store::Slot::new(*s).expect("slot")) == i)
                .map(|s| format!("\"{s}\""))
                .collect();
            let replica_dsns: Vec<String> =
                all[i].iter().map(|r| format!("\"{}\"", r.dsn())).collect();
            toml.push_str(&format!(
                "[[shards]]\nid = \"{}\"\nprimary = \"{}\"\nreplicas = [{}]\nslots = [{}]\n",
                shard.id,
                shard.primary,
                replica_dsns.join(", "),
                slots.join(", ")
            ));
        }
        let map_file = tempfile::NamedTempFile::new().expect("map file");
        std::fs::write(map_file.path(), toml).expect("write map file");
        let path = map_file.path().display().to_string();
        let flags: Vec<&str> = [&["--shard-map", path.as_str()][..], extra].concat();
        let (primary, map) = Instance::launch(&[], &flags).await;
        Fleet {
            addr: primary.addr,
            shards,
            map,
            replicas: all,
            primary,
            _map_file: Some(map_file),
        }
    }

    /// Starts `n` shards and the service with default settings.
    pub async fn start(n: usize) -> Fleet {
        Self::start_with(n, &[]).await
    }

    /// Starts one more instance over the same shards.
    pub async fn spawn_instance(&self, extra: &[&str]) -> Instance {
        Instance::launch(&self.shards, extra).await.0
    }

    /// Starts one more instance whose `--shard-dsn` flags are all in `flags` (for example
    /// the same shards reached as another role).
    pub async fn spawn_instance_with_own_shards(&self, flags: &[&str]) -> Instance {
        Instance::launch(&[], flags).await.0
    }

    /// The flags that name this fleet's shards (and replicas) to another service.
    pub fn shard_flags(&self) -> Vec<String> {
        match &self._map_file {
            Some(file) => vec!["--shard-map".into(), file.path().display().to_string()],
            None => self
                .shards
                .iter()
                .flat_map(|shard| ["--shard-dsn".to_owned(), shard.dsn()])
                .collect(),
        }
    }

    /// Starts an analytics instance over this fleet's shards with `extra` flags.
    pub async fn start_analytics(&self, extra: &[&str]) -> Instance {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let mut args = vec!["analytics".to_owned(), "--listen".into(), addr.to_string()];
        args.extend(self.shard_flags());
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        auth_default(&mut args);
        let config = analytics::Config::try_parse_from(args).expect("analytics config");
        let shards = analytics::connect(&config).await.expect("analytics shards");
        let (tx, rx) = oneshot::channel();
        let server = tokio::spawn(async move {
            analytics::serve(&config, shards, listener, async {
                let _ = rx.await;
            })
            .await
        });
        let instance = Instance {
            addr,
            shutdown: Some(tx),
            server: Some(server),
        };
        instance.wait_until_serving().await;
        instance
    }

    /// A gRPC channel to the first instance.
    pub async fn channel(&self) -> Channel {
        channel_to(self.addr).await
    }

    /// A ConversationService client of the first instance.
    pub async fn client(&self) -> ConversationServiceClient<Channel> {
        ConversationServiceClient::new(self.channel().await)
    }

    /// A direct connection pool to shard `index`, for assertions on what was stored.
    pub async fn shard_pool(&self, index: usize) -> PgPool {
        PgPool::connect(&self.shards[index].dsn())
            .await
            .expect("connect to shard")
    }

    /// Waits (up to 20 s, a bound) until every shard's outbox is published: the
    /// invalidations of the writes so far have reached Redis and the bus.
    pub async fn wait_outbox_published(&self) {
        for index in 0..self.shards.len() {
            let pool = self.shard_pool(index).await;
            let mut left = i64::MAX;
            for _ in 0..400 {
                left = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
                    .fetch_one(&pool)
                    .await
                    .expect("count unpublished outbox rows");
                if left == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(left, 0, "shard {index}'s outbox was not published in 20 s");
        }
    }

    /// Stops the first instance gracefully and waits for it to exit.
    pub async fn stop_service(&mut self) {
        self.primary.stop().await;
    }
}

/// One cache service instance running in this process.
pub struct CacheInstance {
    /// Where it listens.
    pub addr: SocketAddr,
    server: JoinHandle<anyhow::Result<()>>,
}

impl CacheInstance {
    /// Starts a cache instance over the Redis at `redis_url` with `extra` flags, and waits
    /// until it serves with its bus subscriber synced (its first step flushes the L1).
    pub async fn start(redis_url: &str, extra: &[&str]) -> CacheInstance {
        Self::start_with_token(redis_url, extra, None).await
    }

    /// Like [`CacheInstance::start`], for an instance with authorization on: `token` (a
    /// service's or an admin's) is what the start-up probe presents.
    pub async fn start_with_token(
        redis_url: &str,
        extra: &[&str],
        token: Option<&str>,
    ) -> CacheInstance {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let mut args = vec![
            "cache".to_owned(),
            "--listen".into(),
            addr.to_string(),
            "--redis-url".into(),
            redis_url.to_owned(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        auth_default(&mut args);
        let config = cache_service::Config::try_parse_from(args).expect("cache config");
        let server = tokio::spawn(async move {
            cache_service::serve(&config, listener, std::future::pending()).await
        });
        let instance = CacheInstance { addr, server };
        let mut client = instance.client().await;
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let probe = authorized(pb::CacheStatsRequest {}, token);
                match client.stats(probe).await {
                    Ok(stats) if stats.get_ref().bus_flushes >= 1 => break,
                    _ => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        })
        .await
        .expect("the cache instance starts");
        instance
    }

    /// Waits (at most 15 s) until the instance serves from its layers: a relay vouches for
    /// the invalidation bus (health `convoy.bus` SERVING).
    pub async fn wait_bus_current(&self) {
        wait_health(
            self.addr,
            convoy_cache::subscriber::BUS_HEALTH_SERVICE,
            ServingStatus::Serving,
            Duration::from_secs(15),
        )
        .await;
    }

    /// A CacheService client of this instance.
    pub async fn client(&self) -> CacheServiceClient<Channel> {
        CacheServiceClient::new(channel_to(self.addr).await)
    }
}

impl Drop for CacheInstance {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// `message` as a request carrying `authorization: Bearer <token>` when `token` is given.
pub fn authorized<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("a token header"),
        );
    }
    request
}

/// A digest of everything a shard stores for conversations (their rows, events and
/// idempotency records, every column): equal digests, nothing written.
pub async fn stored_digest(pool: &PgPool) -> String {
    sqlx::query_scalar(
        "SELECT concat_ws(' ', \
           (SELECT md5(coalesce(string_agg(c::text, ',' ORDER BY team_id, id), '')) \
              FROM conversations c), \
           (SELECT md5(coalesce(string_agg(e::text, ',' ORDER BY team_id, conversation_id, sequence), '')) \
              FROM conversation_events e), \
           (SELECT md5(coalesce(string_agg(r::text, ',' ORDER BY team_id, request_id), '')) \
              FROM create_requests r))",
    )
    .fetch_one(pool)
    .await
    .expect("digest of the shard")
}

/// Tests run services with `--no-auth` unless they configure authorization themselves.
fn auth_default(args: &mut Vec<String>) {
    if !args.iter().any(|a| a == "--auth-keys" || a == "--no-auth") {
        args.push("--no-auth".into());
    }
}

/// What the server at `addr` answers a health check for `service` with (`""`: the whole
/// server); `None` when it does not answer.
pub async fn health_of(addr: SocketAddr, service: &str) -> Option<ServingStatus> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .ok()?
        .connect()
        .await
        .ok()?;
    let response = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .ok()?;
    Some(response.into_inner().status())
}

/// Waits until the server at `addr` reports `service` as `status`; panics after `within`.
pub async fn wait_health(addr: SocketAddr, service: &str, status: ServingStatus, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let now = health_of(addr, service).await;
        if now == Some(status) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{addr} reported {service:?} as {now:?}, not {status:?}, for {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A gRPC channel to `addr`.
pub async fn channel_to(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to the service")
}

/// A conversation with a title, intent and content, for `teams/{team}`.
pub fn new_conversation(team: &str, title: &str, content: &str) -> pb::CreateConversationRequest {
    pb::CreateConversationRequest {
        parent: format!("teams/{team}"),
        conversation: Some(pb::Conversation {
            title: title.into(),
            intent: pb::Intent::Debug as i32,
            content: content.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A MESSAGE event at `seconds` past the epoch.
pub fn message(seconds: i64, content: &str) -> pb::ConversationEvent {
    pb::ConversationEvent {
        kind: pb::EventKind::Message as i32,
        role: pb::Role::User as i32,
        occur_time: Some(prost_types::Timestamp { seconds, nanos: 0 }),
        content: content.into(),
        ..Default::default()
    }
}

/// The field paths of a status's BadRequest details.
pub fn violated_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// A shard-router running in this process until dropped (dropping it is a crash: no
/// graceful shutdown).
pub struct Router {
    /// A client of it.
    pub client: ShardRouterServiceClient<Channel>,
    /// Where it listens.
    pub addr: SocketAddr,
    _task: tokio_util::task::AbortOnDropHandle<anyhow::Result<()>>,
    _seed: tempfile::NamedTempFile,
}

impl Router {
    /// Starts a router on the etcd at `etcd_endpoint`, seeding `seed` if etcd holds no map,
    /// with `extra` flags.
    pub async fn start(etcd_endpoint: &str, seed: &ShardMap, extra: &[&str]) -> Router {
        Self::start_with_token(etcd_endpoint, seed, extra, None).await
    }

    /// Like [`Router::start`], for a router with authorization on: `token` (a service's or
    /// an admin's) is what the start-up probe presents.
    pub async fn start_with_token(
        etcd_endpoint: &str,
        seed: &ShardMap,
        extra: &[&str],
        token: Option<&str>,
    ) -> Router {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), seed.to_toml()).expect("write the seed map");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let mut args = vec![
            "shard-router".to_owned(),
            "--listen".into(),
            addr.to_string(),
            "--etcd-endpoint".into(),
            etcd_endpoint.to_owned(),
            "--shard-map".into(),
            file.path().display().to_string(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        auth_default(&mut args);
        let config = shard_router::Config::try_parse_from(args).expect("router config");
        let task = tokio::spawn(async move {
            shard_router::serve(&config, listener, std::future::pending()).await
        });
        // Serving once the map is read (the listener accepts connections before that).
        let mut client = None;
        for _ in 0..200 {
            if let Ok(channel) = Channel::from_shared(format!("http://{addr}"))
                .expect("uri")
                .connect()
                .await
            {
                let mut candidate = ShardRouterServiceClient::new(channel);
                let probe = authorized(pb::GetShardMapRequest {}, token);
                if candidate.get_shard_map(probe).await.is_ok() {
                    client = Some(candidate);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Router {
            client: client.expect("the router starts"),
            addr,
            _task: tokio_util::task::AbortOnDropHandle::new(task),
            _seed: file,
        }
    }
}
