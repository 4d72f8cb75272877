//! Leader election through etcd's election API: one instance of a service at a time holds
//! an election (for example the shard-router that drives slot moves).
//!
//! A candidate grants a lease, campaigns under it and, once elected, keeps the lease alive.
//! Leadership ends when the lease cannot be refreshed (etcd unreachable, the lease gone) or
//! the [`Leadership`] is dropped (which resigns by revoking the lease, so another candidate
//! is elected at once rather than after the TTL). A leader that loses its lease stops its
//! work when [`Leadership::lost`] completes; etcd elects another after the TTL.
//!
//! Not here: what the leader does.

use std::time::Duration;

use etcd_client::Client;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::config::EtcdConfig;
use crate::connection::{LeaseEnd, bounded, connect, keep_lease};
use crate::{Error, Result};

/// Lease TTL of a leader: how long a dead leader blocks a new election.
const LEADER_TTL_SECS: i64 = 10;
/// How often a leader refreshes its lease.
const LEADER_KEEPALIVE: Duration = Duration::from_secs(3);

/// An election won; held while this instance leads.
pub struct Leadership {
    lost: CancellationToken,
    lease: i64,
    client: Client,
    etcd: EtcdConfig,
    _keepalive: AbortOnDropHandle<()>,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("lease", &format_args!("{:x}", self.lease))
            .finish()
    }
}

/// Campaigns in election `<prefix>elections/<name>` as `candidate` until elected (or etcd
/// fails). Waits as long as another candidate leads.
pub async fn campaign(etcd: &EtcdConfig, name: &str, candidate: &str) -> Result<Leadership> {
    let mut client = connect(etcd).await?;
    let granted = bounded(
        "grant leader lease",
        etcd.request_timeout,
        client.lease_grant(LEADER_TTL_SECS, None),
    )
    .await?;
    let lease = granted.id();
    let lost = CancellationToken::new();
    // Keep the lease alive while campaigning too: a long wait must not lose it.
    let keepalive = {
        let mut client = client.clone();
        let lost = lost.clone();
        let limit = etcd.request_timeout;
        tokio::spawn(async move {
            let why = keep_lease(&mut client, lease, LEADER_KEEPALIVE, limit, || {}).await;
            match why {
                LeaseEnd::Gone => tracing::warn!("the leader lease expired"),
                LeaseEnd::Failed(e) => tracing::warn!(error = %e, "the leader lease lapsed"),
            }
            lost.cancel();
        })
    };
    // Held from here on: dropped at any point (this future cancelled mid-campaign
    // included), it stops the keepalive and revokes the lease.
    let leadership = Leadership {
        lost,
        lease,
        client,
        etcd: etcd.clone(),
        _keepalive: AbortOnDropHandle::new(keepalive),
    };
    let election = format!("{}elections/{name}", etcd.prefix);
    let mut elections = leadership.client.election_client();
    let campaigning = elections.campaign(election.as_str(), candidate, lease);
    tokio::select! {
        elected = campaigning => elected.map_err(|e| Error::etcd("campaign", e))?,
        () = leadership.lost.cancelled() => {
            return Err(Error::etcd("campaign", "the lease lapsed while campaigning"));
        }
    };
    tracing::info!(%election, candidate, "elected leader");
    Ok(leadership)
}

impl Leadership {
    /// Completes when leadership is lost: stop leading at once.
    pub async fn lost(&self) {
        self.lost.cancelled().await
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        // Resign: another candidate is elected at once instead of after the TTL.
        let mut client = self.client.clone();
        let (lease, limit) = (self.lease, self.etcd.request_timeout);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = bounded("resign", limit, client.lease_revoke(lease)).await;
            });
        }
    }
}
