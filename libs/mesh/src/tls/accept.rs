//! The server side: accepted TCP connections become TLS streams for tonic, each handshake
//! with the material in force when it starts ([`MeshTls::current`]).
//!
//! Handshakes run concurrently (a slow client must not hold up the next accept), at most
//! [`MAX_HANDSHAKES`] at once and each within [`HANDSHAKE_TIMEOUT`]; one that fails is
//! logged and its connection closed. The streams are tokio-rustls' own, for which tonic
//! implements `Connected`: a request's extensions carry tonic's `TlsConnectInfo`, with the
//! peer's address and its verified certificate chain.
//!
//! One exception to TLS: the kubelet's gRPC probes speak plain text only, so a connection
//! whose first byte does not open a TLS record is handed to a server that answers only
//! `grpc.health.v1.Health` (the same health states as the TLS side) and refuses every other
//! call UNAUTHENTICATED. Health says nothing a probe may not know; everything else needs a
//! client certificate.
//!
//! Not here: the material ([`super::reload`]) or the gRPC server itself (`crate::server`).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::Either;
use futures::{Stream, StreamExt};
use http::{Request, Response};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_util::task::AbortOnDropHandle;
use tonic::body::Body;
use tonic::service::Routes;
use tower::Service;

use super::MeshTls;

/// Longest a client may take to open TLS, from its connection being accepted. 10 s: a
/// handshake on a LAN takes milliseconds; a client still silent after this is not one.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once; past it, accepting waits for one to finish (the kernel's
/// backlog holds the rest). 256: a fleet's worth of reconnecting peers at once.
pub const MAX_HANDSHAKES: usize = 256;

/// The first byte of a TLS handshake record (RFC 8446, 5.1: `ContentType.handshake`).
const TLS_HANDSHAKE: u8 = 0x16;

/// The path prefix of the one service answered in plain text.
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// The TLS streams of the connections `accepted` yields, for
/// `tonic::transport::Server::serve_with_incoming_shutdown`. Plain-text connections go to a
/// server of `probes` only (see the module docs), which stops when the stream is dropped.
pub(crate) fn incoming(
    accepted: impl Stream<Item = std::io::Result<TcpStream>> + Send + 'static,
    tls: MeshTls,
    probes: Routes,
) -> impl Stream<Item = std::io::Result<TlsStream<TcpStream>>> + Send + 'static {
    let (plain_tx, plain_rx) = tokio::sync::mpsc::channel::<std::io::Result<TcpStream>>(64);
    let probe_server = tonic::transport::Server::builder()
        .layer(tower::layer::layer_fn(PlainTextGate))
        .add_routes(probes)
        .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(plain_rx));
    let probe_task = AbortOnDropHandle::new(tokio::spawn(async move {
        if let Err(error) = probe_server.await {
            tracing::warn!(%error, "the plain-text health server stopped");
        }
    }));
    let streams = accepted
        .map(move |accepted| {
            let (tls, plain_tx) = (tls.clone(), plain_tx.clone());
            async move {
                let tcp = match accepted {
                    Ok(tcp) => tcp,
                    Err(error) => return Some(Err(error)),
                };
                let peer = tcp.peer_addr().ok();
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(tcp, &tls)).await {
                    Ok(Ok(Opened::Tls(stream))) => Some(Ok(*stream)),
                    Ok(Ok(Opened::Plain(tcp))) => {
                        // A full queue of probes waits here, like a handshake.
                        let _ = plain_tx.send(Ok(tcp)).await;
                        None
                    }
                    Ok(Ok(Opened::Closed)) => None,
                    Ok(Err(error)) => {
                        tracing::debug!(?peer, %error, "TLS handshake failed");
                        metrics::counter!("convoy_tls_handshake_failures_total").increment(1);
                        None
                    }
                    Err(_) => {
                        tracing::debug!(?peer, timeout = ?HANDSHAKE_TIMEOUT, "TLS handshake timed out");
                        metrics::counter!("convoy_tls_handshake_failures_total").increment(1);
                        None
                    }
                }
            }
        })
        .buffer_unordered(MAX_HANDSHAKES)
        .filter_map(std::future::ready);
    Incoming {
        streams,
        _probes: probe_task,
    }
}

pin_project_lite::pin_project! {
    /// The TLS streams, and the plain-text health server, which lives as long as they do.
    struct Incoming<S> {
        #[pin]
        streams: S,
        _probes: AbortOnDropHandle<()>,
    }
}

impl<S: Stream> Stream for Incoming<S> {
    type Item = S::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        self.project().streams.poll_next(cx)
    }
}

/// What an accepted connection turned out to be.
enum Opened {
    /// Boxed: a TLS stream is over a kilobyte, a TCP stream a few words.
    Tls(Box<TlsStream<TcpStream>>),
    Plain(TcpStream),
    /// Closed before sending anything.
    Closed,
}

async fn handshake(tcp: TcpStream, tls: &MeshTls) -> std::io::Result<Opened> {
    let mut first = [0u8; 1];
    if tcp.peek(&mut first).await? == 0 {
        return Ok(Opened::Closed);
    }
    if first[0] != TLS_HANDSHAKE {
        return Ok(Opened::Plain(tcp));
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.current().server_config());
    Ok(Opened::Tls(Box::new(acceptor.accept(tcp).await?)))
}

/// Passes health calls to the inner service and answers every other call UNAUTHENTICATED.
#[derive(Clone, Debug)]
struct PlainTextGate<S>(S);

// === impl PlainTextGate ===

impl<S> Service<Request<Body>> for PlainTextGate<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Either<S::Future, std::future::Ready<Result<Response<Body>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        if request.uri().path().starts_with(HEALTH_PREFIX) {
            return Either::Left(self.0.call(request));
        }
        let refused = tonic::Status::unauthenticated(
            "this server takes only mutual TLS (a client certificate from its CA); in plain \
             text it answers grpc.health.v1.Health alone",
        );
        Either::Right(std::future::ready(Ok(refused.into_http())))
    }
}
