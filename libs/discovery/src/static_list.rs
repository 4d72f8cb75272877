//! A fixed list of endpoints in place of etcd, for tests and local runs.
//!
//! Not for production: nothing is ever removed, and nothing notices an instance that died.

use futures::StreamExt;
use futures::stream;
use tower::discover::Change;

use crate::Changes;
use crate::endpoint::Endpoint;

/// Yields an `Insert` for each endpoint, keyed by its instance id, then stays pending for ever,
/// so a balancer fed by it never sees its discovery end. Give each endpoint a distinct
/// instance id: a repeated one replaces the earlier endpoint, as it would in etcd.
pub fn static_endpoints(endpoints: Vec<Endpoint>) -> Changes {
    let inserts = endpoints
        .into_iter()
        .map(|e| Ok(Change::Insert(e.metadata.instance.clone(), e)));
    stream::iter(inserts).chain(stream::pending()).boxed()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::endpoint::Metadata;

    #[tokio::test(start_paused = true)]
    async fn static_list_yields_each_endpoint_then_stays_pending() {
        let endpoint = |instance: &str| Endpoint {
            addr: format!("{instance}:1"),
            metadata: Metadata {
                instance: instance.into(),
                ..Metadata::default()
            },
        };
        let mut changes = static_endpoints(vec![endpoint("a"), endpoint("b")]);
        for id in ["a", "b"] {
            match changes.next().await {
                Some(Ok(Change::Insert(got, e))) => {
                    assert_eq!(got, id);
                    assert_eq!(e, endpoint(id));
                }
                other => panic!("expected Insert({id}), got {other:?}"),
            }
        }
        // A day of (paused) time passes without the stream ending.
        let rest = tokio::time::timeout(Duration::from_secs(86_400), changes.next()).await;
        assert!(rest.is_err(), "the stream yielded or ended: {rest:?}");
    }
}
