//! Named health statuses that follow a condition of the process rather than a gRPC service,
//! beside the per-service statuses the server keeps ([`crate::server`]). The cache tier and
//! the conversation service report `convoy.bus` this way: NOT_SERVING while their L1 may
//! be missing invalidations, while the server itself (`""`) stays SERVING, since reads
//! still go through to the database.
//!
//! Not here: what the condition means (its owner decides) or the server's own statuses.

use tokio::sync::watch;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// Reports `name` as SERVING while `serving` holds true and NOT_SERVING otherwise, from now
/// until `serving`'s sender is dropped (then NOT_SERVING: nobody vouches for it any more).
/// Run it on a task of its own; get `reporter` from [`crate::ServerBuilder::health`].
pub async fn follow(
    reporter: HealthReporter,
    name: &'static str,
    mut serving: watch::Receiver<bool>,
) {
    loop {
        let status = if *serving.borrow_and_update() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        reporter.set_service_status(name, status).await;
        if serving.changed().await.is_err() {
            reporter
                .set_service_status(name, ServingStatus::NotServing)
                .await;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use tokio_stream::StreamExt;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus as Wire;
    use tonic_health::pb::health_server::Health;
    use tonic_health::server::HealthService;

    /// Reads `watch` until it reports `want` (bounded, so a wrong status fails, not hangs).
    async fn until(watch: &mut (impl tokio_stream::Stream<Item = Wire> + Unpin), want: Wire) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(status) = watch.next().await {
                if status == want {
                    return;
                }
            }
            panic!("the watch ended before {want:?}");
        })
        .await
        .unwrap_or_else(|_| panic!("never {want:?}"));
    }

    #[tokio::test]
    async fn a_named_status_follows_its_condition_and_ends_not_serving() {
        let reporter = HealthReporter::new();
        let service = HealthService::from_health_reporter(reporter.clone());
        // Known to the health service before the follower reports, so it can be watched.
        reporter
            .set_service_status("convoy.bus", ServingStatus::Unknown)
            .await;
        let watched = service
            .watch(tonic::Request::new(HealthCheckRequest {
                service: "convoy.bus".into(),
            }))
            .await
            .unwrap()
            .into_inner();
        let mut watch = watched.map(|r| r.unwrap().status());
        let (tx, rx) = watch::channel(false);
        let follower = tokio::spawn(follow(reporter, "convoy.bus", rx));
        until(&mut watch, Wire::NotServing).await;
        tx.send(true).unwrap();
        until(&mut watch, Wire::Serving).await;
        tx.send(false).unwrap();
        until(&mut watch, Wire::NotServing).await;
        tx.send(true).unwrap();
        until(&mut watch, Wire::Serving).await;
        drop(tx);
        follower.await.unwrap();
        until(&mut watch, Wire::NotServing).await;
        let checked = service
            .check(tonic::Request::new(HealthCheckRequest {
                service: "convoy.bus".into(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(checked.status(), Wire::NotServing);
    }
}
