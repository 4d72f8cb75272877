//! The gRPC face of the shard-router: the map in force, as the contract spells it.
//!
//! Node addresses are `host:port` only: DSNs may carry credentials, which never leave the
//! router (services take theirs from their own configuration).

use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use convoy_proto::v1 as pb;
use convoy_proto::v1::shard_router_service_server::ShardRouterService;
use convoy_store::replicas::ReplicaHealth;
use convoy_store::{SLOT_COUNT, Slot};
use futures::{Stream, StreamExt};
use sqlx::postgres::PgConnectOptions;
use tokio_stream::wrappers::WatchStream;
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use convoy_store::{LivePools, ShardPools};

/// Longest team id, in bytes.
const MAX_TEAM_BYTES: usize = 128;

/// The ShardRouterService implementation.
#[derive(Clone, Debug)]
pub struct RouterApi {
    pools: LivePools,
}

impl RouterApi {
    /// A service answering from the map in force (and its pools' node checks).
    pub fn new(pools: LivePools) -> Self {
        Self { pools }
    }

    fn current(&self) -> Arc<ShardPools> {
        self.pools.borrow().clone()
    }
}

/// `host:port` of a DSN, without credentials.
fn address(dsn: &str) -> String {
    PgConnectOptions::from_str(dsn)
        .map(|o| format!("{}:{}", o.get_host(), o.get_port()))
        .unwrap_or_else(|_| "<unparsable DSN>".into())
}

/// A WAL position as Postgres prints it (`16/B374D848`).
fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

fn timestamp(at: SystemTime) -> prost_types::Timestamp {
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    prost_types::Timestamp {
        seconds: since.as_secs() as i64,
        nanos: since.subsec_nanos() as i32,
    }
}

fn replica_node(dsn: &str, health: &ReplicaHealth) -> pb::Node {
    let now = Instant::now();
    let banned = health.banned_until.is_some_and(|t| t > now);
    let state = if health.healthy && !banned {
        pb::NodeHealth::Healthy
    } else if banned || health.failures > 0 {
        pb::NodeHealth::Banned
    } else {
        pb::NodeHealth::Unspecified
    };
    pb::Node {
        address: address(dsn),
        health: state as i32,
        lag_bytes: i64::try_from(health.lag_bytes).unwrap_or(i64::MAX),
        lag: Some(prost_types::Duration {
            seconds: health.lag.as_secs() as i64,
            nanos: health.lag.subsec_nanos() as i32,
        }),
        replay_lsn: lsn_text(health.replay_lsn),
        banned_until: health
            .banned_until
            .filter(|t| *t > now)
            .map(|t| timestamp(SystemTime::now() + (t - now))),
        check_time: None,
    }
}

fn shard(pools: &ShardPools, index: usize) -> pb::Shard {
    let shard = &pools.map().shards()[index];
    let replicas = pools.replicas(index);
    let (primary_ok, _) = replicas.primary_health();
    let primary = pb::Node {
        address: address(&shard.primary),
        health: match primary_ok {
            Some(true) => pb::NodeHealth::Healthy,
            Some(false) => pb::NodeHealth::Banned,
            None => pb::NodeHealth::Unspecified,
        } as i32,
        ..Default::default()
    };
    pb::Shard {
        id: shard.id.to_string(),
        primary: Some(primary),
        replicas: shard
            .replicas
            .iter()
            .zip(replicas.health())
            .map(|(dsn, health)| replica_node(dsn, &health))
            .collect(),
    }
}

fn wire_map(pools: &ShardPools) -> pb::ShardMap {
    let map = pools.map();
    pb::ShardMap {
        epoch: map.epoch().0 as i64,
        slot_count: i32::from(SLOT_COUNT),
        ranges: map
            .ranges()
            .into_iter()
            .map(|(range, owner)| pb::SlotRange {
                start: i32::from(*range.start()),
                end: i32::from(*range.end()),
                shard: map.shards()[owner].id.to_string(),
                frozen: false,
            })
            .collect(),
        shards: (0..map.shards().len()).map(|i| shard(pools, i)).collect(),
        update_time: None,
    }
}

fn invalid(field: &str, description: impl Into<String>) -> Status {
    let description = description.into();
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{field}: {description}"),
        ErrorDetails::with_bad_request_violation(field, description),
    )
}

fn not_yet() -> Status {
    Status::unimplemented("online resharding is not built yet: the map changes only by CAS in etcd")
}

type MapStream = Pin<Box<dyn Stream<Item = Result<pb::ShardMap, Status>> + Send>>;

#[tonic::async_trait]
impl ShardRouterService for RouterApi {
    async fn get_shard_map(
        &self,
        _request: Request<pb::GetShardMapRequest>,
    ) -> Result<Response<pb::ShardMap>, Status> {
        Ok(Response::new(wire_map(&self.current())))
    }

    type WatchShardMapStream = MapStream;

    async fn watch_shard_map(
        &self,
        request: Request<pb::WatchShardMapRequest>,
    ) -> Result<Response<MapStream>, Status> {
        let after = request.into_inner().after_epoch;
        let maps = WatchStream::new(self.pools.clone())
            .filter(move |p| std::future::ready(p.map().epoch().0 as i64 > after))
            .map(|p| Ok(wire_map(&p)));
        Ok(Response::new(Box::pin(maps)))
    }

    async fn locate(
        &self,
        request: Request<pb::LocateRequest>,
    ) -> Result<Response<pb::LocateResponse>, Status> {
        let name = request.into_inner().team;
        let team = name
            .strip_prefix("teams/")
            .filter(|t| !t.is_empty() && t.len() <= MAX_TEAM_BYTES && !t.contains('/'))
            .ok_or_else(|| {
                invalid(
                    "team",
                    format!("must be teams/{{team}} with a team of 1 to {MAX_TEAM_BYTES} bytes"),
                )
            })?;
        let pools = self.current();
        let slot = Slot::for_team(team);
        let owner = pools.map().owner(slot);
        Ok(Response::new(pb::LocateResponse {
            slot: i32::from(slot.get()),
            shard: Some(shard(&pools, owner)),
            epoch: pools.map().epoch().0 as i64,
        }))
    }

    async fn list_shards(
        &self,
        _request: Request<pb::ListShardsRequest>,
    ) -> Result<Response<pb::ListShardsResponse>, Status> {
        let pools = self.current();
        Ok(Response::new(pb::ListShardsResponse {
            shards: (0..pools.map().shards().len())
                .map(|i| shard(&pools, i))
                .collect(),
            epoch: pools.map().epoch().0 as i64,
        }))
    }

    async fn add_shard(
        &self,
        _request: Request<pb::AddShardRequest>,
    ) -> Result<Response<pb::Shard>, Status> {
        Err(not_yet())
    }

    async fn move_slots(
        &self,
        _request: Request<pb::MoveSlotsRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        Err(not_yet())
    }

    async fn get_operation(
        &self,
        _request: Request<pb::GetOperationRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        Err(not_yet())
    }

    async fn list_operations(
        &self,
        _request: Request<pb::ListOperationsRequest>,
    ) -> Result<Response<pb::ListOperationsResponse>, Status> {
        Err(not_yet())
    }

    async fn cancel_operation(
        &self,
        _request: Request<pb::CancelOperationRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        Err(not_yet())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_drop_credentials_and_lsns_print_as_postgres_does() {
        assert_eq!(
            address("postgres://convoy:secret@db.example:6432/convoy"),
            "db.example:6432"
        );
        assert_eq!(lsn_text(0x16_B374_D848), "16/B374D848");
        assert_eq!(lsn_text(0), "0/0");
    }
}
