//! Mutual TLS between convoy services, with certificate files that may change under a
//! running process.
//!
//! One set of PEM files per process ([`TlsFiles`]: its certificate chain, its private key
//! and the CA bundle it trusts) makes a [`MeshTls`]: the server side requires a client
//! certificate issued by the CA and presents its own; the client side presents the same
//! certificate and verifies servers against the same CA. Only TLS 1.3 is offered (both
//! ends are convoy's) and ALPN says `h2`.
//!
//! Kubernetes updates a mounted Secret by swapping a symlink, so the files change while the
//! process runs. A reloader task ([`reload`]) reads them every
//! [`TlsOptions::reload_interval`] and swaps in new material only if it parses and the key
//! belongs to the certificate; anything else keeps the material in force and logs a warning
//! (`convoy_tls_reloads_total{outcome="ok|failed"}` counts both). The swap is of whole
//! rustls configurations: every handshake takes the ones current when it starts, so a
//! certificate, its key and the CA it is checked against always come from one load, and
//! established connections keep the material they were opened with.
//!
//! - [`material`]: reading and checking the files.
//! - [`reload`]: the handle a process shares between its server and its clients, and the
//!   reloader.
//! - [`accept`]: the server side, between the listener and tonic.
//! - [`connect`]: the client side, a connector for tonic's endpoints.
//! - [`args`]: the `--tls-*` flags every binary takes.
//!
//! Not here: who may call what (that is the caller's token, checked by the auth layer), or
//! TLS to Postgres, Redis and etcd (their clients' own, set by DSN, URL and etcd flags).

pub mod accept;
pub mod args;
pub mod connect;
pub mod material;
pub mod reload;

pub use args::TlsArgs;
pub use connect::TlsConnector;
pub use material::{TlsError, TlsFiles, TlsMaterial};
pub use reload::{MeshTls, Reload, ReloadCounts, TlsOptions};

/// The ALPN protocol both sides offer: gRPC is HTTP/2.
pub(crate) const ALPN_H2: &[u8] = b"h2";
