//! The registration flags every convoy service takes, and registering with them.
//!
//! One definition (a clap `Args` group that services flatten into their own configuration)
//! so `--etcd-endpoint`, `--advertise-addr`, `--instance-id`, `--zone`,
//! `--registration-ttl-secs` and etcd's TLS (`--etcd-ca`, `--etcd-cert`, `--etcd-key`, also
//! taken by `convoyctl`) mean the same everywhere.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::{
    Endpoint, Error, EtcdConfig, EtcdTls, Metadata, Registrar, Registration, RegistrationConfig,
    RegistrationStatus, Result,
};

/// How long start-up waits for the registration before serving without it (it keeps
/// retrying in the background).
const REGISTRATION_WAIT: Duration = Duration::from_secs(3);

/// Registration flags, with `CONVOY_*` environment fallbacks.
#[derive(Clone, Debug, clap::Args)]
pub struct RegistrationArgs {
    /// etcd endpoints to register this instance with (repeat, or comma-separate in the
    /// environment variable). None: no registration (static set-ups and tests).
    #[arg(
        long = "etcd-endpoint",
        env = "CONVOY_ETCD_ENDPOINTS",
        value_delimiter = ','
    )]
    pub etcd_endpoints: Vec<String>,

    /// Address peers dial to reach this instance (host:port). Default: the listening
    /// address, which must then be a specific one (in Kubernetes, pass the pod IP).
    #[arg(long, env = "CONVOY_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,

    /// This instance's id in discovery. Default: a fresh random id per process.
    #[arg(long, env = "CONVOY_INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// Zone label published with the registration, for zone-aware clients.
    #[arg(long, env = "CONVOY_ZONE", default_value = "local")]
    pub zone: String,

    /// Lease TTL of the registration, in seconds. 10: a crashed instance leaves the
    /// endpoint set within 10 s; the lease is kept alive every third of it.
    #[arg(long, env = "CONVOY_REGISTRATION_TTL_SECS", default_value_t = 10)]
    pub registration_ttl_secs: u64,

    /// TLS to etcd.
    #[command(flatten)]
    pub etcd_tls: EtcdTlsArgs,
}

/// TLS to etcd, with `CONVOY_ETCD_*` environment fallbacks (global flags, so `convoyctl`
/// takes them after its subcommand too).
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args)]
pub struct EtcdTlsArgs {
    /// CA certificate (PEM) etcd's server certificates chain to; turns TLS to etcd on (the
    /// endpoints must then be https://). None: plain text.
    #[arg(long, env = "CONVOY_ETCD_CA", global = true)]
    pub etcd_ca: Option<PathBuf>,

    /// Client certificate (PEM) to present to an etcd that runs with --client-cert-auth.
    #[arg(long, env = "CONVOY_ETCD_CERT", requires_all = ["etcd_key", "etcd_ca"], global = true)]
    pub etcd_cert: Option<PathBuf>,

    /// The private key (PEM) of --etcd-cert.
    #[arg(long, env = "CONVOY_ETCD_KEY", requires_all = ["etcd_cert", "etcd_ca"], global = true)]
    pub etcd_key: Option<PathBuf>,
}

impl EtcdTlsArgs {
    /// The TLS these flags configure, if any.
    pub fn tls(&self) -> Option<EtcdTls> {
        self.etcd_ca.clone().map(|ca| EtcdTls {
            ca,
            identity: self.etcd_cert.clone().zip(self.etcd_key.clone()),
        })
    }
}

impl RegistrationArgs {
    /// The etcd cluster these flags name, if any (for finding peers as well as registering).
    pub fn etcd_config(&self) -> Option<EtcdConfig> {
        (!self.etcd_endpoints.is_empty()).then(|| EtcdConfig {
            endpoints: self.etcd_endpoints.clone(),
            tls: self.etcd_tls.tls(),
            ..EtcdConfig::default()
        })
    }

    /// What to register for `service` (at `version`), if registration is configured;
    /// `listening` is advertised when `--advertise-addr` is not given.
    pub fn plan(
        &self,
        service: &str,
        version: &str,
        listening: SocketAddr,
    ) -> Result<Option<(EtcdConfig, Endpoint, RegistrationConfig)>> {
        if self.etcd_endpoints.is_empty() {
            return Ok(None);
        }
        let addr = match &self.advertise_addr {
            Some(addr) => addr.clone(),
            None if listening.ip().is_unspecified() => {
                return Err(Error::InvalidConfig(format!(
                    "listening on {listening} with etcd registration: pass --advertise-addr \
                     with the address peers should dial"
                )));
            }
            None => listening.to_string(),
        };
        let instance = self.instance_id.clone().unwrap_or_else(random_instance_id);
        let endpoint = Endpoint {
            addr,
            metadata: Metadata {
                service: service.into(),
                instance,
                version: version.into(),
                zone: self.zone.clone(),
                extra: Default::default(),
            },
        };
        let ttl = Duration::from_secs(self.registration_ttl_secs.max(2));
        let Some(etcd) = self.etcd_config() else {
            return Ok(None);
        };
        let registration = RegistrationConfig {
            ttl,
            keepalive_interval: ttl / 3,
            ..RegistrationConfig::default()
        };
        Ok(Some((etcd, endpoint, registration)))
    }

    /// Registers `service` if configured, waiting briefly until etcd confirms it (a healthy
    /// start is then visible to peers at once); serves either way.
    pub async fn register(
        &self,
        service: &str,
        version: &str,
        listening: SocketAddr,
    ) -> Result<Option<Registration>> {
        let Some((etcd, endpoint, settings)) = self.plan(service, version, listening)? else {
            return Ok(None);
        };
        tracing::info!(addr = %endpoint.addr, instance = %endpoint.metadata.instance, "registering in etcd");
        let registration = Registrar::register(&etcd, endpoint, settings).await?;
        let mut status = registration.status();
        let registered = tokio::time::timeout(
            REGISTRATION_WAIT,
            status.wait_for(|s| *s == RegistrationStatus::Registered),
        )
        .await;
        if !matches!(registered, Ok(Ok(_))) {
            tracing::warn!(wait = ?REGISTRATION_WAIT, "not registered yet; serving anyway, registration retries in the background");
        }
        Ok(Some(registration))
    }

    /// Registers `service` as [`RegistrationArgs::register`] does and returns the future to
    /// run as the server's drain hook: it deregisters (if registered), so peers drop this
    /// instance at once when it starts draining.
    pub async fn register_until_drained(
        &self,
        service: &str,
        version: &str,
        listening: SocketAddr,
    ) -> Result<impl std::future::Future<Output = ()> + Send + 'static> {
        let registration = self.register(service, version, listening).await?;
        Ok(deregister_if_any(registration))
    }
}

/// Deregisters `registration`, if there is one, logging instead of failing: at shutdown a
/// lease that cannot be revoked simply expires.
async fn deregister_if_any(registration: Option<Registration>) {
    if let Some(registration) = registration
        && let Err(e) = registration.deregister().await
    {
        tracing::warn!(error = %e, "deregistering failed; the lease will expire instead");
    }
}

/// A random instance id: 128 bits from the process's randomness, in hex.
fn random_instance_id() -> String {
    use rand::Rng;
    let id: u128 = rand::rng().random();
    format!("{id:032x}")
}
