//! `convoyctl status`: every registered instance, and whether it answers its health check.

use std::time::Duration;

use convoy_client::MeshTls;
use convoy_discovery::{Endpoint, EtcdConfig};
use convoy_mesh::endpoint::EndpointConfig;
use futures::future::join_all;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// How long one instance's health check may take.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// One instance and its health.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceStatus {
    /// As registered.
    pub endpoint: Endpoint,
    /// `SERVING`, `NOT_SERVING`, or why the check failed.
    pub health: String,
}

/// Lists every registered instance and checks each one's health concurrently, over mutual
/// TLS with `tls`.
pub async fn status(
    etcd: &EtcdConfig,
    tls: Option<&MeshTls>,
) -> anyhow::Result<Vec<InstanceStatus>> {
    let endpoints = convoy_discovery::list_services(etcd).await?;
    let config = EndpointConfig {
        connect_timeout: HEALTH_TIMEOUT,
        tls: tls.cloned(),
        ..EndpointConfig::default()
    };
    Ok(join_all(endpoints.into_iter().map(|endpoint| {
        let config = &config;
        async move {
            let health = check(&endpoint.addr, config).await;
            InstanceStatus { endpoint, health }
        }
    }))
    .await)
}

async fn check(addr: &str, config: &EndpointConfig) -> String {
    let attempt = async {
        let channel = convoy_mesh::endpoint::connect(addr, config).await?;
        let response = HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(response.into_inner().status)
    };
    match tokio::time::timeout(HEALTH_TIMEOUT, attempt).await {
        Ok(Ok(status)) => ServingStatus::try_from(status)
            .map(|s| s.as_str_name().to_owned())
            .unwrap_or_else(|_| format!("UNKNOWN_STATUS({status})")),
        Ok(Err(e)) => format!("UNREACHABLE ({e})"),
        Err(_) => format!("UNREACHABLE (no answer within {HEALTH_TIMEOUT:?})"),
    }
}

/// Renders the instances as an aligned table for a person.
pub fn render(rows: &[InstanceStatus]) -> String {
    let header = [
        "SERVICE", "INSTANCE", "ADDRESS", "VERSION", "ZONE", "HEALTH",
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let m = &r.endpoint.metadata;
            vec![
                m.service.clone(),
                m.instance.clone(),
                r.endpoint.addr.clone(),
                m.version.clone(),
                m.zone.clone(),
                r.health.clone(),
            ]
        })
        .collect();
    let mut out = crate::table::render(&header, &cells);
    if rows.is_empty() {
        out.push_str("(no instances registered)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use convoy_discovery::Metadata;

    #[test]
    fn the_table_is_aligned_and_says_when_it_is_empty() {
        let row = InstanceStatus {
            endpoint: Endpoint {
                addr: "127.0.0.1:50051".into(),
                metadata: Metadata {
                    service: "conversation".into(),
                    instance: "a".into(),
                    version: "0.1.0".into(),
                    zone: "local".into(),
                    extra: Default::default(),
                },
            },
            health: "SERVING".into(),
        };
        let table = render(&[row]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].find("ADDRESS"), lines[1].find("127.0.0.1:50051"));
        assert!(lines[1].ends_with("SERVING"));
        assert!(render(&[]).contains("no instances registered"));
    }
}
