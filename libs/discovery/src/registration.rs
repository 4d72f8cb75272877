//! Registering an instance: its endpoint is put under a lease that a background task keeps
//! alive, and the task re-registers by itself whenever etcd was unreachable or the lease was
//! lost, until the registration is deregistered or dropped.
//!
//! Not here: when to deregister (the service's shutdown sequence: stop taking new work,
//! drain, then [`Registration::deregister`]), or reading registrations (see
//! [`crate::watch_service`] and [`crate::list_services`]).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use etcd_client::{Client, PutOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use tracing::{debug, info, warn};

use crate::backoff::Delays;
use crate::config::{EtcdConfig, RegistrationConfig};
use crate::connection::{LeaseEnd, bounded, connect, keep_lease};
use crate::endpoint::Endpoint;
use crate::{Error, Result};

/// Where a registration stands, published on [`Registration::status`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegistrationStatus {
    /// The key is in etcd under a lease that etcd confirmed at the last keepalive.
    Registered,
    /// etcd cannot confirm the registration (unreachable, or the lease expired or was
    /// revoked); retrying until it is registered again. Watchers may not see the instance.
    Lost,
    /// Deregistered on purpose: the lease was revoked (or revoking it failed and the key
    /// expires with it) and nothing is kept alive any more.
    Deregistered,
}

/// Registers instances in etcd; see [`Registrar::register`].
#[derive(Debug)]
pub struct Registrar;

/// One instance's registration, kept alive in the background while this value lives.
///
/// [`deregister`](Registration::deregister) it on graceful shutdown so watchers drop the
/// instance at once. Dropping it without deregistering only stops the keepalive: the key
/// expires with its lease, within the TTL, as if the process had crashed.
#[derive(Debug)]
pub struct Registration {
    shared: Arc<Shared>,
    etcd: EtcdConfig,
    task: Option<JoinHandle<()>>,
}

/// What the registration and its keepalive task share.
#[derive(Debug)]
struct Shared {
    key: String,
    status: watch::Sender<RegistrationStatus>,
    /// The lease the key is (or is being) put under; recorded as soon as it is granted, so a
    /// deregistration that interrupts the put still revokes it.
    lease: Mutex<Option<i64>>,
}

/// The background task's state.
struct Keeper {
    etcd: EtcdConfig,
    shared: Arc<Shared>,
    /// The value stored: the endpoint's JSON.
    value: String,
    /// The lease TTL in whole seconds, as etcd counts it.
    ttl_secs: i64,
    keepalive_interval: Duration,
    delays: Delays,
    client: Option<Client>,
}

// === impl Registrar ===

impl Registrar {
    /// Registers `endpoint` at its key under [`EtcdConfig::prefix`]: grants a lease of
    /// `config.ttl`, puts the endpoint's JSON under it, and keeps the lease alive every
    /// `config.keepalive_interval` from a background task.
    ///
    /// Fails only for input that can never work: invalid names, configuration or etcd
    /// endpoints. When etcd is merely unreachable it returns a registration whose status is
    /// [`RegistrationStatus::Lost`] and keeps trying in the background, so a service can
    /// start while etcd is down; wait on [`Registration::status`] to know when it is seen.
    pub async fn register(
        etcd: &EtcdConfig,
        endpoint: Endpoint,
        config: RegistrationConfig,
    ) -> Result<Registration> {
        endpoint.check_names()?;
        let ttl_secs = lease_ttl_secs(&config)?;
        let shared = Arc::new(Shared {
            key: endpoint.key(&etcd.prefix),
            status: watch::Sender::new(RegistrationStatus::Lost),
            lease: Mutex::new(None),
        });
        let mut keeper = Keeper {
            etcd: etcd.clone(),
            shared: shared.clone(),
            value: endpoint.to_json(),
            ttl_secs,
            keepalive_interval: config.keepalive_interval,
            delays: Delays::new(config.retry_backoff),
            client: None,
        };
        match keeper.register_anew().await {
            Ok(_) => {}
            Err(error) if error.is_transient() => {
                warn!(key = %shared.key, %error, "etcd unreachable; registering in the background");
            }
            Err(error) => return Err(error),
        }
        Ok(Registration {
            shared,
            etcd: etcd.clone(),
            task: Some(tokio::spawn(keeper.run())),
        })
    }
}

/// The TTL etcd is asked for: whole seconds, rounded up.
fn lease_ttl_secs(config: &RegistrationConfig) -> Result<i64> {
    let ttl = config.ttl;
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    if secs == 0 {
        return Err(Error::InvalidConfig(format!(
            "lease TTL {ttl:?} is under etcd's 1 s granularity; use at least 2 s"
        )));
    }
    if config.keepalive_interval.is_zero() || config.keepalive_interval >= ttl {
        return Err(Error::InvalidConfig(format!(
            "keepalive interval {:?} must be above zero and shorter than the lease TTL {ttl:?} \
             (a third of it is usual)",
            config.keepalive_interval
        )));
    }
    i64::try_from(secs)
        .map_err(|_| Error::InvalidConfig(format!("lease TTL {ttl:?} is too long for etcd")))
}

// === impl Registration ===

impl Registration {
    /// The etcd key this instance is registered at.
    pub fn key(&self) -> &str {
        &self.shared.key
    }

    /// The registration's status, updated as it changes. After the registration is dropped
    /// the channel closes and its last value is stale.
    pub fn status(&self) -> watch::Receiver<RegistrationStatus> {
        self.shared.status.subscribe()
    }

    /// Stops the keepalive and revokes the lease, which deletes the key at once so watchers
    /// drop the instance now rather than after the TTL. An error means the revocation did not
    /// reach etcd; the key then expires with the lease, within the TTL.
    pub async fn deregister(mut self) -> Result<()> {
        if let Some(task) = self.task.take() {
            task.abort();
            // Wait until it is gone, so it cannot grant or put anything after this.
            let _ = task.await;
        }
        let lease = self.shared.take_lease();
        let revoked = match lease {
            Some(lease) => revoke(&self.etcd, lease).await,
            None => Ok(()),
        };
        self.shared
            .set_status(RegistrationStatus::Deregistered, revoked.as_ref().err());
        revoked
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Revokes `lease`; one that is already gone (expired) counts as revoked.
async fn revoke(etcd: &EtcdConfig, lease: i64) -> Result<()> {
    let mut client = connect(etcd).await?;
    let limit = etcd.request_timeout;
    match tokio::time::timeout(limit, client.lease_revoke(lease)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(etcd_client::Error::GRpcStatus(s))) if s.code() == tonic::Code::NotFound => {
            debug!(lease = format_args!("{lease:x}"), "lease already gone");
            Ok(())
        }
        Ok(Err(e)) => Err(Error::etcd("revoke lease", e)),
        Err(_) => Err(Error::Timeout {
            op: "revoke lease",
            after: limit,
        }),
    }
}

// === impl Shared ===

impl Shared {
    /// Publishes `status` and logs the transition, if it is one.
    fn set_status(&self, status: RegistrationStatus, error: Option<&Error>) {
        let changed = self.status.send_if_modified(|current| {
            let changed = *current != status;
            *current = status;
            changed
        });
        if !changed {
            return;
        }
        let key = &self.key;
        match (status, error) {
            (RegistrationStatus::Registered, _) => info!(%key, "registered"),
            (RegistrationStatus::Lost, Some(error)) => {
                warn!(%key, %error, "registration lost; re-registering")
            }
            (RegistrationStatus::Lost, None) => warn!(%key, "registration lost; re-registering"),
            (RegistrationStatus::Deregistered, None) => info!(%key, "deregistered"),
            (RegistrationStatus::Deregistered, Some(error)) => {
                warn!(%key, %error, "deregistered, but the lease was not revoked; the key expires with it")
            }
        }
    }

    fn lease(&self) -> Option<i64> {
        *self.lease.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_lease(&self, lease: Option<i64>) {
        *self.lease.lock().unwrap_or_else(PoisonError::into_inner) = lease;
    }

    fn take_lease(&self) -> Option<i64> {
        self.lease
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

// === impl Keeper ===

impl Keeper {
    /// Keeps the instance registered until aborted: never gives up.
    async fn run(mut self) {
        loop {
            let error = self.keep_registered().await;
            self.client = None;
            self.shared
                .set_status(RegistrationStatus::Lost, Some(&error));
            let delay = self.delays.next_delay();
            debug!(key = %self.shared.key, %error, ?delay, "retrying registration");
            tokio::time::sleep(delay).await;
        }
    }

    /// Registers if there is no lease, then keeps the lease alive; returns why that stopped.
    async fn keep_registered(&mut self) -> Error {
        let lease = match self.shared.lease() {
            Some(lease) => lease,
            None => match self.register_anew().await {
                Ok(lease) => lease,
                Err(error) => return error,
            },
        };
        self.keep_alive(lease).await
    }

    /// Grants a new lease and puts the key under it.
    async fn register_anew(&mut self) -> Result<i64> {
        let limit = self.etcd.request_timeout;
        let mut client = self.client().await?;
        let granted = bounded(
            "grant lease",
            limit,
            client.lease_grant(self.ttl_secs, None),
        )
        .await?;
        let lease = granted.id();
        self.shared.set_lease(Some(lease));
        let options = PutOptions::new().with_lease(lease);
        let put = client.put(self.shared.key.as_str(), self.value.as_str(), Some(options));
        if let Err(error) = bounded("put", limit, put).await {
            // Forget it: it expires unused, and the next attempt grants another.
            self.shared.set_lease(None);
            return Err(error);
        }
        debug!(key = %self.shared.key, lease = format_args!("{lease:x}"), ttl = granted.ttl(), "put under a new lease");
        self.shared.set_status(RegistrationStatus::Registered, None);
        self.delays.reset();
        Ok(lease)
    }

    /// Refreshes `lease` every keepalive interval; returns why that stopped. A lease etcd no
    /// longer has is forgotten, so the next attempt registers anew.
    async fn keep_alive(&mut self, lease: i64) -> Error {
        let mut client = match self.client().await {
            Ok(client) => client,
            Err(error) => return error,
        };
        let shared = self.shared.clone();
        let delays = &mut self.delays;
        let ended = keep_lease(
            &mut client,
            lease,
            self.keepalive_interval,
            self.etcd.request_timeout,
            || {
                shared.set_status(RegistrationStatus::Registered, None);
                delays.reset();
            },
        )
        .await;
        match ended {
            LeaseEnd::Gone => self.lease_gone(lease),
            LeaseEnd::Failed(error) => error,
        }
    }

    /// Forgets a lease etcd no longer has and says so.
    fn lease_gone(&mut self, lease: i64) -> Error {
        self.shared.set_lease(None);
        Error::etcd(
            "keepalive",
            format!("lease {lease:x} expired or was revoked; registering anew"),
        )
    }

    /// The client, connecting if there is none.
    async fn client(&mut self) -> Result<Client> {
        if self.client.is_none() {
            self.client = Some(connect(&self.etcd).await?);
        }
        Ok(self.client.clone().expect("connected above"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::Metadata;

    #[test]
    fn lease_ttl_is_whole_seconds_rounded_up_and_outlives_the_keepalive() {
        let config = |ttl_ms, keepalive_ms| RegistrationConfig {
            ttl: Duration::from_millis(ttl_ms),
            keepalive_interval: Duration::from_millis(keepalive_ms),
            ..RegistrationConfig::default()
        };
        assert_eq!(lease_ttl_secs(&RegistrationConfig::default()).unwrap(), 10);
        assert_eq!(lease_ttl_secs(&config(2_500, 500)).unwrap(), 3);
        for bad in [config(0, 0), config(2_000, 0), config(2_000, 2_000)] {
            assert!(matches!(lease_ttl_secs(&bad), Err(Error::InvalidConfig(_))));
        }
    }

    #[tokio::test]
    async fn invalid_names_are_refused_before_touching_etcd() {
        let endpoint = Endpoint {
            addr: "h:1".into(),
            metadata: Metadata {
                service: "conversation".into(),
                instance: "a/1".into(),
                ..Metadata::default()
            },
        };
        // No etcd listens on port 1: a name check that reached etcd would time out instead.
        let etcd = EtcdConfig {
            endpoints: vec!["http://127.0.0.1:1".into()],
            ..EtcdConfig::default()
        };
        let refused = Registrar::register(&etcd, endpoint, RegistrationConfig::default()).await;
        assert!(matches!(
            refused,
            Err(Error::InvalidName {
                what: "instance",
                ..
            })
        ));
    }
}
