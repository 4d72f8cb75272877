//! An endpoint keeps its configured number of HTTP/2 connections to a real tonic server, and
//! calls through it use those and no others.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use convoy_mesh::endpoint::{EndpointConfig, EndpointService};
use futures::StreamExt;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// A real gRPC server (health only) that counts the connections it accepts.
async fn server() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let incoming = TcpListenerStream::new(listener).inspect(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
    });
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(incoming),
    );
    (addr, accepted)
}

#[tokio::test]
async fn an_endpoint_keeps_exactly_its_configured_connections() {
    let (addr, accepted) = server().await;
    let endpoint = EndpointService::new(
        addr,
        EndpointConfig {
            connections: 3,
            ..EndpointConfig::default()
        },
    )
    .unwrap();
    let probe = endpoint.clone();
    tokio::time::timeout(Duration::from_secs(10), async {
        while probe.live_connections() < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("three connections within 10 s");

    let client = HealthClient::new(endpoint);
    let calls = (0..60).map(|_| {
        let mut client = client.clone();
        async move { client.check(HealthCheckRequest::default()).await }
    });
    for result in futures::future::join_all(calls).await {
        result.expect("every call answered");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        3,
        "no connection beyond the three"
    );
}
