//! Mutual TLS through the mesh's own server and client, on real sockets: only clients with a
//! certificate from the CA are answered, and rotated files take effect in a running server.
//!
//! Certificates come from `convoy_testkit::certs` (rcgen: SANs `localhost` and 127.0.0.1),
//! in folders laid out as the kubelet mounts a Secret, updated the way it updates them.

use std::path::Path;
use std::time::Duration;

use convoy_discovery::{Endpoint, Metadata};
use convoy_mesh::endpoint::EndpointConfig;
use convoy_mesh::tls::{MeshTls, ReloadCounts, TlsFiles, TlsOptions};
use convoy_mesh::{BalanceConfig, ServerBuilder, ServerConfig};
use convoy_testkit::certs::{SecretDir, TestCa, TestLeaf};
use tokio::net::TcpListener;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;

/// Longest wait for the reloader to act on changed files (its interval is 50 ms here).
const RELOAD_WAIT: Duration = Duration::from_secs(5);

/// How the reloaders of these tests run: often, so the tests wait briefly.
fn options() -> TlsOptions {
    TlsOptions {
        reload_interval: Duration::from_millis(50),
        ..TlsOptions::default()
    }
}

/// A Secret folder in `dir` holding `leaf` and the bundle of `cas`, and its handle.
fn identity(dir: &Path, leaf: &TestLeaf, cas: &[&TestCa]) -> (SecretDir, MeshTls) {
    std::fs::create_dir_all(dir).unwrap();
    let secret = SecretDir::create(dir, leaf, cas).unwrap();
    let files = TlsFiles::secret_dir(secret.root());
    let tls = MeshTls::load(files, options()).unwrap();
    (secret, tls)
}

/// A convoy server (health and reflection) on a loopback port, serving until the test ends.
async fn server(tls: Option<MeshTls>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let config = ServerConfig {
        tls,
        ..ServerConfig::default()
    };
    tokio::spawn(ServerBuilder::new(config).serve(listener, std::future::pending()));
    addr
}

/// One health check of `addr` through the SDK's path (a balanced channel over the one
/// endpoint, freshly connected, with `tls` or in plain text).
async fn check(addr: &str, tls: Option<&MeshTls>) -> Result<ServingStatus, tonic::Status> {
    let endpoint = Endpoint {
        addr: addr.to_owned(),
        metadata: Metadata {
            service: "test".into(),
            instance: addr.to_owned(),
            version: String::new(),
            zone: String::new(),
            extra: Default::default(),
        },
    };
    let config = BalanceConfig {
        endpoint: EndpointConfig {
            tls: tls.cloned(),
            ..EndpointConfig::default()
        },
        ..BalanceConfig::default()
    };
    let channel =
        convoy_mesh::balanced_channel(convoy_discovery::static_endpoints(vec![endpoint]), config);
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await?;
    Ok(answer.into_inner().status())
}

/// A check that is answered: connecting may take a moment on a busy machine, so a refusal
/// is tried again, for up to 10 s.
async fn answered(addr: &str, tls: &MeshTls) -> ServingStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match check(addr, Some(tls)).await {
            Ok(status) => return status,
            Err(status) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(%status, "not answered yet");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("never answered: {status}"),
        }
    }
}

/// A check that must fail below gRPC: the connection is refused, so the mesh answers
/// UNAVAILABLE (never the server's own status).
async fn refused(addr: &str, tls: Option<&MeshTls>) {
    match check(addr, tls).await {
        Ok(status) => panic!("answered {status:?} although the connection must be refused"),
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status}"),
    }
}

/// Waits until `tls`'s reloader has counted `counts`.
async fn reloaded(tls: &MeshTls, counts: ReloadCounts) {
    tokio::time::timeout(RELOAD_WAIT, async {
        while tls.counts() != counts {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("reloader never got to {counts:?}: {:?}", tls.counts()));
}

#[tokio::test]
async fn a_client_with_a_certificate_from_the_ca_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("fleet");
    let (_server_secret, server_tls) = identity(&dir.path().join("server"), &ca.leaf(), &[&ca]);
    let (_client_secret, client_tls) = identity(&dir.path().join("client"), &ca.leaf(), &[&ca]);
    let addr = server(Some(server_tls)).await;
    assert_eq!(answered(&addr, &client_tls).await, ServingStatus::Serving);
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("fleet");
    let (_server_secret, server_tls) = identity(&dir.path().join("server"), &ca.leaf(), &[&ca]);
    let addr = server(Some(server_tls)).await;

    // Trusts the server, but has no certificate of its own to show: a rustls client
    // configuration with the CA and no client authentication.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der(ca.cert_pem())).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(AnonymousTls(std::sync::Arc::new(config)))
        .await;
    // TLS 1.3 lets a client finish its side before the server checks it, so the refusal
    // shows either when connecting or on the first call: the server's alert, below gRPC.
    let error: Box<dyn std::error::Error> = match channel {
        Err(error) => Box::new(error),
        Ok(channel) => match HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
        {
            Ok(answer) => panic!("answered {answer:?} without a client certificate"),
            Err(status) => Box::new(status),
        },
    };
    assert!(
        io_error_saying(error.as_ref(), "CertificateRequired"),
        "refused by the server's alert, not {error:?}"
    );
}

/// Whether an I/O error in `error`'s chain says `what` (h2 keeps an I/O error's kind and
/// text, not the error itself, so rustls' alert is known by its name).
fn io_error_saying(error: &(dyn std::error::Error + 'static), what: &str) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.to_string().contains(what))
        {
            return true;
        }
        current = e.source();
    }
    false
}

#[tokio::test]
async fn a_client_with_a_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, other) = (TestCa::new("fleet"), TestCa::new("other"));
    let (_server_secret, server_tls) =
        identity(&dir.path().join("server"), &fleet.leaf(), &[&fleet]);
    // Trusts the fleet's CA, but its own certificate is from another.
    let (_client_secret, stranger) = identity(&dir.path().join("client"), &other.leaf(), &[&fleet]);
    let addr = server(Some(server_tls)).await;
    refused(&addr, Some(&stranger)).await;
}

#[tokio::test]
async fn a_plain_text_client_gets_health_only() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("fleet");
    let (_server_secret, server_tls) = identity(&dir.path().join("server"), &ca.leaf(), &[&ca]);
    let addr = server(Some(server_tls)).await;

    // The kubelet's gRPC probes speak plain text: health answers.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .unwrap();
    assert_eq!(health.into_inner().status(), ServingStatus::Serving);

    // Everything else needs TLS with a client certificate.
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let listed = ServerReflectionClient::new(channel)
        .server_reflection_info(futures::stream::iter([request]))
        .await;
    let Err(status) = listed else {
        panic!("reflection answered in plain text");
    };
    assert_eq!(status.code(), Code::Unauthenticated, "{status}");
    assert!(status.message().contains("mutual TLS"), "{status}");
}

#[tokio::test]
async fn a_tls_client_is_refused_by_a_plain_text_server() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("fleet");
    let (_client_secret, client_tls) = identity(&dir.path().join("client"), &ca.leaf(), &[&ca]);
    let addr = server(None).await;
    refused(&addr, Some(&client_tls)).await;
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (TestCa::new("old"), TestCa::new("new"));
    let (server_secret, server_tls) = identity(&dir.path().join("server"), &old.leaf(), &[&old]);
    // Trusts only the new CA (and shows a certificate from it).
    let (_client_secret, new_client) = identity(&dir.path().join("client"), &new.leaf(), &[&new]);
    let addr = server(Some(server_tls.clone())).await;
    refused(&addr, Some(&new_client)).await;

    // The rotation: a leaf from the new CA, and the CA bundle with both CAs.
    server_secret.update(&new.leaf(), &[&old, &new]).unwrap();
    reloaded(
        &server_tls,
        ReloadCounts {
            reloaded: 1,
            refused: 0,
        },
    )
    .await;
    assert_eq!(answered(&addr, &new_client).await, ServingStatus::Serving);
}

#[tokio::test]
async fn a_broken_new_certificate_keeps_the_old_one_serving() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("fleet");
    let leaf = ca.leaf();
    let (server_secret, server_tls) = identity(&dir.path().join("server"), &leaf, &[&ca]);
    let (_client_secret, client_tls) = identity(&dir.path().join("client"), &ca.leaf(), &[&ca]);
    let addr = server(Some(server_tls.clone())).await;
    assert_eq!(answered(&addr, &client_tls).await, ServingStatus::Serving);

    let truncated = &leaf.cert_pem[..leaf.cert_pem.len() / 2];
    server_secret
        .update_raw(truncated, &leaf.key_pem, ca.cert_pem())
        .unwrap();
    reloaded(
        &server_tls,
        ReloadCounts {
            reloaded: 0,
            refused: 1,
        },
    )
    .await;
    // New connections still get the old certificate.
    assert_eq!(answered(&addr, &client_tls).await, ServingStatus::Serving);
}

/// The DER of a PEM certificate.
fn der(pem: &str) -> rustls::pki_types::CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

/// A connector opening TLS with a given client configuration (one without a certificate).
#[derive(Clone)]
struct AnonymousTls(std::sync::Arc<rustls::ClientConfig>);

impl tower::Service<http::Uri> for AnonymousTls {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let config = self.0.clone();
        Box::pin(async move {
            let tcp =
                tokio::net::TcpStream::connect((uri.host().unwrap(), uri.port_u16().unwrap()))
                    .await?;
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}
