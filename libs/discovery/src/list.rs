//! One-shot reads of what is registered: the listing a watcher starts from, and
//! [`list_services`] for operator tools.
//!
//! Not here: following changes (see [`crate::watch`]).

use std::collections::BTreeMap;

use etcd_client::{Client, GetOptions};

use crate::config::EtcdConfig;
use crate::connection::{bounded, connect};
use crate::endpoint::{self, Endpoint};
use crate::keys;
use crate::{Error, Result};

/// Every instance of every service, ordered by service then instance id. One read, no
/// retries: an unreachable etcd is an error for the operator to see. Values that are not
/// endpoints are skipped with a warning.
pub async fn list_services(etcd: &EtcdConfig) -> Result<Vec<Endpoint>> {
    let mut client = connect(etcd).await?;
    let listing = read(&mut client, etcd, &keys::services_prefix(&etcd.prefix)).await?;
    let mut endpoints: Vec<Endpoint> = listing.endpoints.into_values().collect();
    // By names, not by key bytes: `a-b` sorts after `a`, unlike `services/a-b/` and `services/a/`.
    endpoints.sort_by(|x, y| {
        (&x.metadata.service, &x.metadata.instance)
            .cmp(&(&y.metadata.service, &y.metadata.instance))
    });
    Ok(endpoints)
}

/// Endpoints under a key prefix, as of one revision.
#[derive(Debug)]
pub(crate) struct Listing {
    /// The store's revision when read: watching from the next one misses nothing.
    pub(crate) revision: i64,
    /// The endpoints by key.
    pub(crate) endpoints: BTreeMap<String, Endpoint>,
}

/// Reads every endpoint under `key_prefix` (a prefix made in [`keys`]).
pub(crate) async fn read(
    client: &mut Client,
    etcd: &EtcdConfig,
    key_prefix: &str,
) -> Result<Listing> {
    let options = GetOptions::new().with_prefix();
    let response = bounded(
        "list",
        etcd.request_timeout,
        client.get(key_prefix, Some(options)),
    )
    .await?;
    let revision = response
        .header()
        .map(|h| h.revision())
        .ok_or_else(|| Error::etcd("list", "the response has no header (no revision)"))?;
    let endpoints = response
        .kvs()
        .iter()
        .filter_map(|kv| {
            let endpoint = endpoint::from_entry(&etcd.prefix, kv.key(), kv.value())?;
            Some((String::from_utf8_lossy(kv.key()).into_owned(), endpoint))
        })
        .collect();
    Ok(Listing {
        revision,
        endpoints,
    })
}
