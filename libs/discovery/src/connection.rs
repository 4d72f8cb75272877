//! Opens etcd clients with discovery's timeouts, bounds every etcd request in time, and turns
//! etcd-client's errors into [`Error`]s.
//!
//! Not here: what is read or written (registration, watch and list do that), or retrying
//! (the callers' loops decide, by [`Error::is_transient`]).

use std::future::Future;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use crate::config::{EtcdConfig, EtcdTls};
use crate::{Error, Result};

/// A client for `etcd.endpoints`. etcd-client connects lazily, so this succeeds while etcd is
/// down; it fails only for configuration that can never work.
pub(crate) async fn connect(etcd: &EtcdConfig) -> Result<Client> {
    if etcd.endpoints.is_empty() {
        return Err(Error::InvalidConfig(
            "no etcd endpoints; give at least one URL such as http://127.0.0.1:2379".into(),
        ));
    }
    let mut options = ConnectOptions::new()
        .with_connect_timeout(etcd.connect_timeout)
        .with_keep_alive(etcd.http2_keepalive_interval, etcd.http2_keepalive_timeout);
    if let Some(tls) = &etcd.tls {
        if let Some(plain) = etcd.endpoints.iter().find(|e| e.starts_with("http://")) {
            return Err(Error::InvalidConfig(format!(
                "etcd TLS is configured, but endpoint {plain} is http://: give https:// URLs"
            )));
        }
        options = options.with_tls(tls_options(tls)?);
    }
    let connecting = Client::connect(&etcd.endpoints, Some(options));
    match tokio::time::timeout(etcd.request_timeout, connecting).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e @ (etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_)))) => {
            Err(Error::InvalidConfig(format!(
                "etcd endpoints {:?} are not URLs such as http://127.0.0.1:2379: {e}",
                etcd.endpoints
            )))
        }
        Ok(Err(e)) => Err(Error::etcd("connect", e)),
        Err(_) => Err(Error::Timeout {
            op: "connect",
            after: etcd.request_timeout,
        }),
    }
}

/// etcd-client's TLS settings, from the files named in `tls` (read now).
fn tls_options(tls: &EtcdTls) -> Result<TlsOptions> {
    let read = |what: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| {
            Error::InvalidConfig(format!(
                "reading the etcd TLS {what} {}: {e}",
                path.display()
            ))
        })
    };
    let mut options = TlsOptions::new().ca_certificate(Certificate::from_pem(read("CA", &tls.ca)?));
    if let Some((cert, key)) = &tls.identity {
        options = options.identity(Identity::from_pem(
            read("certificate", cert)?,
            read("key", key)?,
        ));
    }
    Ok(options)
}

/// Runs one etcd request, giving up after `limit`: etcd-client itself waits forever on a
/// connection that stopped answering.
pub(crate) async fn bounded<T>(
    op: &'static str,
    limit: Duration,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T> {
    match tokio::time::timeout(limit, request).await {
        Ok(result) => result.map_err(|e| Error::etcd(op, e)),
        Err(_) => Err(Error::Timeout { op, after: limit }),
    }
}

/// Why [`keep_lease`] stopped.
pub(crate) enum LeaseEnd {
    /// etcd no longer has the lease (it expired or was revoked).
    Gone,
    /// etcd could not be reached or answered with an error.
    Failed(Error),
}

/// Refreshes `lease` every `period` (each round bounded by `limit`), calling `refreshed`
/// once the keepalive stream is open; returns why it stopped.
pub(crate) async fn keep_lease(
    client: &mut Client,
    lease: i64,
    period: Duration,
    limit: Duration,
    mut refreshed: impl FnMut(),
) -> LeaseEnd {
    let (mut keeper, mut responses) =
        match tokio::time::timeout(limit, client.lease_keep_alive(lease)).await {
            Ok(Ok(pair)) => pair,
            // etcd-client's answer to a first response with TTL 0: no such lease.
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(_))) => return LeaseEnd::Gone,
            Ok(Err(e)) => return LeaseEnd::Failed(Error::etcd("keepalive", e)),
            Err(_) => {
                return LeaseEnd::Failed(Error::Timeout {
                    op: "keepalive",
                    after: limit,
                });
            }
        };
    // Opening the stream refreshed the lease.
    refreshed();
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let round = async {
            keeper.keep_alive().await?;
            responses.message().await
        };
        match bounded("keepalive", limit, round).await {
            Ok(Some(response)) if response.ttl() > 0 => {}
            Ok(Some(_)) => return LeaseEnd::Gone,
            Ok(None) => {
                return LeaseEnd::Failed(Error::etcd(
                    "keepalive",
                    "etcd closed the keepalive stream",
                ));
            }
            Err(error) => return LeaseEnd::Failed(error),
        }
    }
}
