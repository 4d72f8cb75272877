//! The ceilings each scenario is read against, measured in the same run on the same machine
//! with the same driver:
//!
//! - `tonic`: a bare tonic server in this process answering every GetConversationRequest
//!   with the same Conversation from memory, over plain tonic channels (no mesh stack), as
//!   many connections as the SDK gets: the gRPC floor for messages of the size the
//!   scenario moves;
//! - `redis`: a raw Redis GET of a value the size of that Conversation, on one multiplexed
//!   connection: the floor of a cache-tier hit;
//! - `sql`: the conversation service's own Get statement, sent with sqlx to the primary of
//!   the shard that owns the conversation, for the same Zipf-drawn conversations: the floor
//!   of an uncached read.
//!
//! Not here: the scenarios themselves ([`crate::scenario`]).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use convoy_proto::v1 as pb;
use convoy_store::ShardMap;
use prost::Message;
use tokio_util::task::AbortOnDropHandle;
use tonic::body::Body;
use tonic::server::NamedService;

use crate::drive::Op;
use crate::record::Outcome;
use crate::scenario::{hot_name, rng, zipf_over};
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

/// The `sql` baseline: `statement` (taking the team and the conversation's id) on the
/// primary that owns each Zipf-drawn conversation of `data`, as `seed` draws them.
pub async fn sql_get(
    map: &ShardMap,
    statement: &'static str,
    data: Arc<DataSet>,
    seed: u64,
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
        let (map, pools, data) = (map.clone(), pools.clone(), data.clone());
        Box::pin(async move {
            let mut rng = rng(seed, n);
            let name = hot_name(&data, &zipf, &mut rng);
            let Some((team, id)) = name
                .strip_prefix("teams/")
                .and_then(|rest| rest.split_once("/conversations/"))
                .and_then(|(team, id)| Some((team, uuid::Uuid::parse_str(id).ok()?)))
            else {
                return Outcome::Failed(tonic::Code::InvalidArgument);
            };
            let pool = &pools[map.owner_of_team(team)];
            match sqlx::query(statement)
                .bind(team)
                .bind(id)
                .fetch_optional(pool)
                .await
            {
                Ok(Some(_)) => Outcome::Ok,
                Ok(None) => Outcome::Failed(tonic::Code::NotFound),
                Err(_) => Outcome::Failed(tonic::Code::Unavailable),
            }
        })
    }))
}
