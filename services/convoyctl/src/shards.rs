//! `convoyctl shards`: the shard map as the shard-router serves it, with every node's health
//! and replica lag.

use convoy_client::Discovery;
use convoy_discovery::EtcdConfig;
use convoy_proto::v1 as pb;
use convoy_proto::v1::shard_router_service_client::ShardRouterServiceClient;

use crate::access::Access;

/// A client of the shard-routers found in etcd, with `access`.
pub fn router(
    etcd: &EtcdConfig,
    access: &Access,
) -> ShardRouterServiceClient<convoy_client::Transport> {
    ShardRouterServiceClient::new(convoy_client::transport(
        &Discovery::Etcd(etcd.clone()),
        "shard-router",
        access.client_config(),
    ))
}

/// The shards (and the map's epoch) from a shard-router found in etcd.
pub async fn shards(etcd: &EtcdConfig, access: &Access) -> anyhow::Result<pb::ListShardsResponse> {
    Ok(router(etcd, access)
        .list_shards(pb::ListShardsRequest {})
        .await?
        .into_inner())
}

fn health(node: &pb::Node) -> &'static str {
    match node.health() {
        pb::NodeHealth::Healthy => "HEALTHY",
        pb::NodeHealth::Banned => "BANNED",
        pb::NodeHealth::Unspecified => "UNCHECKED",
    }
}

/// Renders the shards as an aligned table for a person: one line per node.
pub fn render(response: &pb::ListShardsResponse) -> String {
    let mut rows = Vec::new();
    for shard in &response.shards {
        if let Some(primary) = &shard.primary {
            rows.push(vec![
                shard.id.clone(),
                "primary".into(),
                primary.address.clone(),
                health(primary).into(),
                "-".into(),
                "-".into(),
            ]);
        }
        for (n, replica) in shard.replicas.iter().enumerate() {
            let lag = replica.lag.map_or_else(
                || "-".into(),
                |d| format!("{:.3}s", d.seconds as f64 + f64::from(d.nanos) / 1e9),
            );
            rows.push(vec![
                shard.id.clone(),
                format!("replica-{n}"),
                replica.address.clone(),
                health(replica).into(),
                format!("{} B / {lag}", replica.lag_bytes),
                replica.replay_lsn.clone(),
            ]);
        }
    }
    let mut out = format!("shard map epoch {}\n", response.epoch);
    out.push_str(&crate::table::render(
        &["SHARD", "NODE", "ADDRESS", "HEALTH", "LAG", "REPLAYED"],
        &rows,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_node_with_lag_for_replicas() {
        let response = pb::ListShardsResponse {
            epoch: 3,
            shards: vec![pb::Shard {
                id: "shard-0".into(),
                primary: Some(pb::Node {
                    address: "db0:5432".into(),
                    health: pb::NodeHealth::Healthy as i32,
                    ..Default::default()
                }),
                replicas: vec![pb::Node {
                    address: "db0r:5432".into(),
                    health: pb::NodeHealth::Banned as i32,
                    lag_bytes: 120,
                    lag: Some(prost_types::Duration {
                        seconds: 1,
                        nanos: 500_000_000,
                    }),
                    replay_lsn: "0/3000148".into(),
                    ..Default::default()
                }],
            }],
        };
        let text = render(&response);
        assert!(text.starts_with("shard map epoch 3\n"), "{text}");
        assert!(
            text.contains("shard-0  primary    db0:5432   HEALTHY  -"),
            "{text}"
        );
        assert!(
            text.contains("replica-0  db0r:5432  BANNED   120 B / 1.500s  0/3000148"),
            "{text}"
        );
    }
}
