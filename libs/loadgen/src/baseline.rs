//! The ceilings each scenario is read against, measured in the same run on the same machine
//! with the same driver:
//!
//! - `tonic`: a bare tonic server in this process answering every GetConversationRequest
//!   with the same Conversation from memory, over plain tonic channels (no mesh stack), as
//!   many connections as the SDK gets: the gRPC floor for messages of the size the
//!   scenario moves;
//! - `redis`: a raw Redis GET of a value the size of that Conversation, on one multiplexed
//!   connection: the floor of a cache-tier hit;
//! - `sql`: the statements the fleet runs for each of the scenario's requests (the same
//!   draws), sent with sqlx to the primary of the shard that owns its team: for `get` the
//!   Get's statement (the floor of an uncached read), for `list-search` the List and Search
//!   queries, for `analytics` the summary's aggregate, for `write` the same rows inserted in
//!   two transactions without the outbox, idempotency record or token (the floor of a
//!   durable write). The statements come from the caller (`convoyctl`), which knows the
//!   services' SQL.
//!
//! Not here: the scenarios themselves ([`crate::scenario`]).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use convoy_proto::v1 as pb;
use convoy_store::ShardMap;
use futures::future::BoxFuture;
use prost::Message;
use rand::rngs::SmallRng;
use sqlx::PgPool;
use tokio_util::task::AbortOnDropHandle;
use tonic::body::Body;
use tonic::server::NamedService;

use crate::drive::Op;
use crate::record::Outcome;
use crate::scenario::{Draw, Scenario, draw, zipf_over};
use crate::seed::DataSet;

/// The bare server's one method.
const METHOD: &str = "/convoy.bench.Floor/Get";

/// A bare tonic server answering every request with `answer`.
#[derive(Clone)]
struct Floor {
    answer: Arc<pb::Conversation>,
}

impl NamedService for Floor {
    const NAME: &'static str = "convoy.bench.Floor";
}

struct Answer(Arc<pb::Conversation>);

impl tonic::server::UnaryService<pb::GetConversationRequest> for Answer {
    type Response = pb::Conversation;
    type Future = std::future::Ready<Result<tonic::Response<pb::Conversation>, tonic::Status>>;

    fn call(&mut self, _: tonic::Request<pb::GetConversationRequest>) -> Self::Future {
        std::future::ready(Ok(tonic::Response::new((*self.0).clone())))
    }
}

impl tower::Service<http::Request<Body>> for Floor {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let answer = Answer(self.answer.clone());
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.unary(answer, request).await)
        })
    }
}

/// The `tonic` baseline: starts the bare server (stopped when the op is dropped) and
/// returns its op, which asks it for `answer` by a name of `data`, over `connections`
/// plain channels in turn (as many HTTP/2 connections as the SDK is given).
pub async fn tonic_floor(
    answer: pb::Conversation,
    data: Arc<DataSet>,
    connections: usize,
) -> anyhow::Result<Op> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    // No Nagle delay on small answers, as convoy's own servers (libs/mesh): without it a
    // request waits out the peer's delayed ACK (~40 ms).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = tonic::transport::Server::builder()
        .add_service(Floor {
            answer: Arc::new(answer),
        })
        .serve_with_incoming(incoming);
    let server = Arc::new(AbortOnDropHandle::new(tokio::spawn(server)));
    let endpoint =
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.tcp_nodelay(true);
    let mut channels = Vec::new();
    for _ in 0..connections.max(1) {
        // connect(), not a clone: each channel is its own connection.
        channels.push(endpoint.connect().await?);
    }
    let channels = Arc::new(channels);
    let path = http::uri::PathAndQuery::from_static(METHOD);
    Ok(Arc::new(move |n| {
        let _server = server.clone();
        let channel = channels[(n as usize) % channels.len()].clone();
        let (path, data) = (path.clone(), data.clone());
        Box::pin(async move {
            let name = data.names[(n as usize) % data.names.len().max(1)].clone();
            let mut grpc = tonic::client::Grpc::new(channel);
            if let Err(e) = grpc.ready().await {
                tracing::debug!(error = %e, "bare channel not ready");
                return Outcome::Failed(tonic::Code::Unavailable);
            }
            let answered: Result<tonic::Response<pb::Conversation>, tonic::Status> = grpc
                .unary(
                    tonic::Request::new(pb::GetConversationRequest { name }),
                    path,
                    tonic_prost::ProstCodec::default(),
                )
                .await;
            Outcome::from(&answered)
        })
    }))
}

/// The `redis` baseline: stores `value`'s encoding under one key of the Redis at `url`,
/// then GETs it.
pub async fn redis_get(url: &str, value: &pb::Conversation) -> anyhow::Result<Op> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let key = "convoy:bench:baseline";
    redis::cmd("SET")
        .arg(key)
        .arg(value.encode_to_vec())
        .arg("EX")
        .arg(3600)
        .query_async::<()>(&mut conn)
        .await?;
    Ok(Arc::new(move |_| {
        let mut conn = conn.clone();
        Box::pin(async move {
            let got: redis::RedisResult<Option<Vec<u8>>> =
                redis::cmd("GET").arg(key).query_async(&mut conn).await;
            match got {
                Ok(Some(_)) => Outcome::Ok,
                Ok(None) => Outcome::Failed(tonic::Code::NotFound),
                Err(_) => Outcome::Failed(tonic::Code::Unavailable),
            }
        })
    }))
}

/// How the `sql` baseline sends one drawn request: the statements the fleet would run for
/// it, on the primary `pool` of the shard that owns its team; `Ok(false)` when what it
/// reads does not exist. The generator carries on the request's draws.
pub type SqlCall = Arc<
    dyn Fn(Draw, SmallRng, PgPool) -> BoxFuture<'static, Result<bool, sqlx::Error>> + Send + Sync,
>;

/// The `sql` baseline: each request of `scenario` as `seed` draws it over `data` (the same
/// ones the scenario sends), sent by `call` with sqlx on the primary of the shard that owns
/// its team (16 connections per shard, as the service's pools).
pub async fn sql(
    map: &ShardMap,
    scenario: Scenario,
    data: Arc<DataSet>,
    seed: u64,
    call: SqlCall,
) -> anyhow::Result<Op> {
    let mut pools = Vec::new();
    for shard in map.shards() {
        pools.push(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(std::time::Duration::from_secs(2))
                .connect(&shard.primary)
                .await?,
        );
    }
    let (map, pools, zipf) = (Arc::new(map.clone()), Arc::new(pools), zipf_over(&data));
    Ok(Arc::new(move |n| {
        let (draw, rng) = draw(scenario, &data, &zipf, seed, n);
        let pool = pools[map.owner_of_team(draw.team())].clone();
        let sent = call(draw, rng, pool);
        Box::pin(async move {
            match sent.await {
                Ok(true) => Outcome::Ok,
                Ok(false) => Outcome::Failed(tonic::Code::NotFound),
                Err(e) => {
                    tracing::debug!(error = %e, "baseline statement failed");
                    Outcome::Failed(tonic::Code::Unavailable)
                }
            }
        })
    }))
}
