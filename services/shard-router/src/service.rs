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

use convoy_discovery::records::Records;
use convoy_discovery::shard_map::ShardMapStore;
use convoy_store::{LivePools, Shard, ShardId, ShardPools};

use crate::operations::{MoveOp, Phase};

/// Longest team id, in bytes.
const MAX_TEAM_BYTES: usize = 128;

/// The ShardRouterService implementation.
#[derive(Clone, Debug)]
pub struct RouterApi {
    pools: LivePools,
    maps: ShardMapStore,
    operations: Records,
}

impl RouterApi {
    /// A service answering from the map in force (and its pools' node checks), changing
    /// the map in `maps` and recording moves in `operations`.
    pub fn new(pools: LivePools, maps: ShardMapStore, operations: Records) -> Self {
        Self {
            pools,
            maps,
            operations,
        }
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

fn etcd_error(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("etcd: {e}"))
}

/// `host:port` with a non-empty host and a numeric port.
fn valid_address(address: &str) -> bool {
    address.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty() && !host.contains(['/', '@', '?']) && port.parse::<u16>().is_ok()
    })
}

/// `template` (a DSN) pointing at `address` instead: same user, database and options.
fn dsn_at(template: &str, address: &str) -> Option<String> {
    let (scheme, rest) = template.split_once("://")?;
    let (userinfo, hostpart) = match rest.split_once('@') {
        Some((user, host)) => (format!("{user}@"), host),
        None => (String::new(), rest),
    };
    let tail = hostpart.find(['/', '?']).map_or("", |at| &hostpart[at..]);
    Some(format!("{scheme}://{userinfo}{address}{tail}"))
}

fn operation_id(name: &str) -> Result<&str, Status> {
    name.strip_prefix("operations/")
        .filter(|id| !id.is_empty() && id.len() <= 64 && !id.contains('/'))
        .ok_or_else(|| invalid("name", "must be operations/{id}"))
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
        request: Request<pb::AddShardRequest>,
    ) -> Result<Response<pb::Shard>, Status> {
        let request = request.into_inner();
        let id = ShardId::new(request.shard_id.clone())
            .map_err(|e| invalid("shard_id", e.to_string()))?;
        for (field, address) in std::iter::once(("primary_address", &request.primary_address))
            .chain(
                request
                    .replica_addresses
                    .iter()
                    .map(|a| ("replica_addresses", a)),
            )
        {
            if !valid_address(address) {
                return Err(invalid(field, format!("{address:?} is not host:port")));
            }
        }
        let stored = self
            .maps
            .load()
            .await
            .map_err(etcd_error)?
            .ok_or_else(|| Status::failed_precondition("etcd holds no shard map yet"))?;
        let template = &stored.map.shards()[0].primary;
        let dsn = |address: &str| {
            dsn_at(template, address).ok_or_else(|| Status::internal("the map's DSNs do not parse"))
        };
        let shard = Shard {
            id: id.clone(),
            primary: dsn(&request.primary_address)?,
            replicas: request
                .replica_addresses
                .iter()
                .map(|a| dsn(a))
                .collect::<Result<_, _>>()?,
        };
        if let Some(index) = stored.map.index_of(id.as_str()) {
            if stored.map.shards()[index] == shard {
                return Ok(Response::new(shard_of(&self.current(), id.as_str())));
            }
            return Err(Status::already_exists(format!(
                "shard {id} exists with other servers"
            )));
        }
        let next = stored
            .map
            .with_shard(shard)
            .map_err(|e| invalid("shard_id", e.to_string()))?;
        // The schema first: a shard in the map is ready for moves.
        let pools = crate::router_pools(next.clone())
            .map_err(|e| invalid("primary_address", e.to_string()))?;
        pools
            .migrate_shard(next.shards().len() - 1)
            .await
            .map_err(|e| Status::unavailable(format!("preparing shard {id}: {e}")))?;
        self.maps
            .compare_and_swap(&stored, &next)
            .await
            .map_err(|e| Status::aborted(format!("the shard map changed meanwhile; retry: {e}")))?;
        pools.close().await;
        tracing::info!(shard = %id, epoch = next.epoch().0, "shard added");
        let mut waiting = self.pools.clone();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            waiting.wait_for(|p| p.map().epoch() >= next.epoch()),
        )
        .await;
        Ok(Response::new(shard_of(&self.current(), id.as_str())))
    }

    async fn move_slots(
        &self,
        request: Request<pb::MoveSlotsRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let request = request.into_inner();
        let slot = |field: &str, n: i32| {
            u16::try_from(n)
                .ok()
                .filter(|n| *n < SLOT_COUNT)
                .ok_or_else(|| invalid(field, format!("must be a slot in 0-{}", SLOT_COUNT - 1)))
        };
        let (start, end) = (slot("start", request.start)?, slot("end", request.end)?);
        if start > end {
            return Err(invalid("end", "must be at least start"));
        }
        if self.current().map().index_of(&request.to_shard).is_none() {
            return Err(Status::with_error_details(
                Code::FailedPrecondition,
                format!(
                    "shard {:?} is not in the map: AddShard it first",
                    request.to_shard
                ),
                ErrorDetails::with_precondition_failure_violation(
                    "SHARD",
                    request.to_shard.clone(),
                    "add the shard with AddShard",
                ),
            ));
        }
        let id = if request.request_id.is_empty() {
            uuid::Uuid::now_v7()
        } else {
            uuid::Uuid::parse_str(&request.request_id)
                .map_err(|_| invalid("request_id", "must be a UUID"))?
        }
        .to_string();
        let op = MoveOp::new(id.clone(), start..=end, request.to_shard);
        let stored = self.operations.create(&id, &op).await.map_err(etcd_error)?;
        let same = (stored.value.start, stored.value.end, &stored.value.to_shard)
            == (op.start, op.end, &op.to_shard);
        if !same {
            return Err(Status::already_exists(format!(
                "request_id {id} was used for another move"
            )));
        }
        Ok(Response::new(stored.value.wire()))
    }

    async fn get_operation(
        &self,
        request: Request<pb::GetOperationRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let name = request.into_inner().name;
        let id = operation_id(&name)?;
        let op = self
            .operations
            .get::<MoveOp>(id)
            .await
            .map_err(etcd_error)?
            .ok_or_else(|| Status::not_found(format!("{name} not found")))?;
        Ok(Response::new(op.value.wire()))
    }

    async fn list_operations(
        &self,
        request: Request<pb::ListOperationsRequest>,
    ) -> Result<Response<pb::ListOperationsResponse>, Status> {
        let request = request.into_inner();
        let size = match request.page_size {
            n if n <= 0 => 50,
            n => n.min(500) as usize,
        };
        let mut ops: Vec<MoveOp> = self
            .operations
            .list::<MoveOp>(10_000)
            .await
            .map_err(etcd_error)?
            .into_iter()
            .map(|s| s.value)
            .collect();
        ops.sort_by(|a, b| (b.create_ms, &b.id).cmp(&(a.create_ms, &a.id)));
        let skip = if request.page_token.is_empty() {
            0
        } else {
            ops.iter()
                .position(|op| op.id == request.page_token)
                .map(|at| at + 1)
                .ok_or_else(|| invalid("page_token", "is not a token this method returned"))?
        };
        let page: Vec<&MoveOp> = ops.iter().skip(skip).take(size).collect();
        let next_page_token = match page.last() {
            Some(last) if skip + page.len() < ops.len() => last.id.clone(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListOperationsResponse {
            operations: page.into_iter().map(MoveOp::wire).collect(),
            next_page_token,
        }))
    }

    async fn cancel_operation(
        &self,
        request: Request<pb::CancelOperationRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let name = request.into_inner().name;
        let id = operation_id(&name)?;
        for _ in 0..5 {
            let stored = self
                .operations
                .get::<MoveOp>(id)
                .await
                .map_err(etcd_error)?
                .ok_or_else(|| Status::not_found(format!("{name} not found")))?;
            let op = &stored.value;
            if op.phase.is_done() || op.cancel_requested {
                return Ok(Response::new(op.wire()));
            }
            if matches!(op.phase, Phase::CuttingOver | Phase::CleaningUp) {
                return Err(Status::with_error_details(
                    Code::FailedPrecondition,
                    format!("{name} is past its cut-over and will finish"),
                    ErrorDetails::with_precondition_failure_violation(
                        "PHASE",
                        name.clone(),
                        "a move can be cancelled only before its cut-over",
                    ),
                ));
            }
            let mut next = op.clone();
            next.cancel_requested = true;
            if let Some(saved) = self
                .operations
                .swap(id, stored.revision, &next)
                .await
                .map_err(etcd_error)?
            {
                return Ok(Response::new(saved.value.wire()));
            }
        }
        Err(Status::aborted("the operation kept changing; retry"))
    }
}

fn shard_of(pools: &ShardPools, id: &str) -> pb::Shard {
    match pools.map().index_of(id) {
        Some(index) => shard(pools, index),
        None => pb::Shard {
            id: id.to_owned(),
            ..Default::default()
        },
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

    #[test]
    fn new_shards_take_the_template_dsn_with_their_own_address() {
        assert_eq!(
            dsn_at(
                "postgres://convoy:pw@10.0.0.1:5432/convoy?sslmode=disable",
                "db-3:6432"
            )
            .as_deref(),
            Some("postgres://convoy:pw@db-3:6432/convoy?sslmode=disable")
        );
        assert_eq!(
            dsn_at("postgres://127.0.0.1:5432/convoy", "127.0.0.1:7000").as_deref(),
            Some("postgres://127.0.0.1:7000/convoy")
        );
        assert!(valid_address("db:5432"));
        assert!(!valid_address("db"));
        assert!(!valid_address("user@db:5432"));
        assert!(!valid_address(":5432"));
    }
}
