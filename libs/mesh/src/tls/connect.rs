//! The client side: a connector for tonic's `Endpoint::connect_with_connector` that dials
//! TCP (with `TCP_NODELAY`, which tonic sets only on its own connector) and opens TLS with
//! the material in force when it dials ([`MeshTls::current`]).
//!
//! The endpoint's URI stays `http://host:port`: the TLS is ours, so tonic must not add its
//! own (it would for `https`). The server's certificate is verified against the CA and the
//! host dialled, or [`super::TlsOptions::server_name`] when set.
//!
//! Not here: reconnecting or readiness (`crate::endpoint`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tower::{BoxError, Service};

use super::MeshTls;

/// Opens mutual-TLS connections for tonic; see the module docs.
#[derive(Clone, Debug)]
pub struct TlsConnector {
    tls: MeshTls,
}

impl TlsConnector {
    /// A connector presenting `tls`'s certificate and verifying servers against its CA.
    pub fn new(tls: MeshTls) -> Self {
        Self { tls }
    }
}

// === impl TlsConnector ===

impl Service<Uri> for TlsConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| format!("no host to dial in {uri}"))?
                .to_owned();
            let port = uri
                .port_u16()
                .ok_or_else(|| format!("no port to dial in {uri}"))?;
            let name = tls.server_name(&host)?;
            let tcp =
                TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port))
                    .await?;
            // Or Nagle's algorithm meets the server's delayed ACK and small requests wait
            // ~40 ms (see `crate::server`).
            tcp.set_nodelay(true)?;
            let connector = tokio_rustls::TlsConnector::from(tls.current().client_config());
            let stream = connector.connect(name, tcp).await?;
            Ok(TokioIo::new(stream))
        })
    }
}
