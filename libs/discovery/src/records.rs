//! Small JSON records under one etcd prefix, changed by compare-and-swap: the state of
//! long-running operations (the shard-router's slot moves) that must survive a restart of
//! whoever drives them.
//!
//! Not here: what the records mean.

use etcd_client::{Client, Compare, CompareOp, GetOptions, SortOrder, SortTarget, Txn, TxnOp};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::EtcdConfig;
use crate::connection::{bounded, connect};
use crate::{Error, Result};

/// A record as stored, with the revision a swap must name.
#[derive(Clone, Debug, PartialEq)]
pub struct Stored<T> {
    /// The record.
    pub value: T,
    /// Its key's modification revision.
    pub revision: i64,
}

/// JSON records under `<prefix><kind>/`.
#[derive(Clone)]
pub struct Records {
    client: Client,
    etcd: EtcdConfig,
    prefix: String,
}

impl std::fmt::Debug for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Records")
            .field("prefix", &self.prefix)
            .finish()
    }
}

fn decode<T: DeserializeOwned>(kv: &etcd_client::KeyValue) -> Result<Stored<T>> {
    let value = serde_json::from_slice(kv.value()).map_err(|e| {
        Error::InvalidConfig(format!(
            "record {:?} is not valid JSON for its kind: {e}",
            kv.key_str().unwrap_or("<non-UTF-8 key>")
        ))
    })?;
    Ok(Stored {
        value,
        revision: kv.mod_revision(),
    })
}

fn encode<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("records serialize to JSON")
}

impl Records {
    /// The records of `kind` in the etcd `etcd` names.
    pub async fn connect(etcd: &EtcdConfig, kind: &str) -> Result<Self> {
        Ok(Self {
            client: connect(etcd).await?,
            prefix: format!("{}{kind}/", etcd.prefix),
            etcd: etcd.clone(),
        })
    }

    /// Stores `value` as `id` unless a record `id` exists; returns the stored record either
    /// way (so a retried create returns the first one).
    pub async fn create<T: Serialize + DeserializeOwned + Clone>(
        &self,
        id: &str,
        value: &T,
    ) -> Result<Stored<T>> {
        let key = format!("{}{id}", self.prefix);
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), encode(value), None)])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let mut kv = self.client.kv_client();
        let response = bounded("create record", self.etcd.request_timeout, kv.txn(txn)).await?;
        if response.succeeded() {
            let revision = response.header().map_or(0, |h| h.revision());
            return Ok(Stored {
                value: value.clone(),
                revision,
            });
        }
        self.get(id)
            .await?
            .ok_or_else(|| Error::InvalidConfig(format!("record {id} vanished while created")))
    }

    /// Record `id`, if stored.
    pub async fn get<T: DeserializeOwned>(&self, id: &str) -> Result<Option<Stored<T>>> {
        let key = format!("{}{id}", self.prefix);
        let mut kv = self.client.kv_client();
        let response = bounded(
            "get record",
            self.etcd.request_timeout,
            kv.get(key.as_str(), None),
        )
        .await?;
        response.kvs().first().map(decode).transpose()
    }

    /// Every record, oldest key first, at most `limit`.
    pub async fn list<T: DeserializeOwned>(&self, limit: i64) -> Result<Vec<Stored<T>>> {
        let options = GetOptions::new()
            .with_prefix()
            .with_limit(limit)
            .with_sort(SortTarget::Create, SortOrder::Ascend);
        let mut kv = self.client.kv_client();
        let response = bounded(
            "list records",
            self.etcd.request_timeout,
            kv.get(self.prefix.as_str(), Some(options)),
        )
        .await?;
        response.kvs().iter().map(decode).collect()
    }

    /// Replaces record `id` stored at `expected` with `value`; `None` when it changed since.
    pub async fn swap<T: Serialize + DeserializeOwned + Clone>(
        &self,
        id: &str,
        expected: i64,
        value: &T,
    ) -> Result<Option<Stored<T>>> {
        let key = format!("{}{id}", self.prefix);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.as_str(),
                CompareOp::Equal,
                expected,
            )])
            .and_then([TxnOp::put(key.as_str(), encode(value), None)]);
        let mut kv = self.client.kv_client();
        let response = bounded("swap record", self.etcd.request_timeout, kv.txn(txn)).await?;
        if !response.succeeded() {
            return Ok(None);
        }
        Ok(Some(Stored {
            value: value.clone(),
            revision: response.header().map_or(0, |h| h.revision()),
        }))
    }
}
