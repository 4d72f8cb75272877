//! The layers' state moves their metrics (read through a debugging recorder).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use convoy_mesh::retry::{RetryBudget, RetryConfig, RetryPolicy};
use convoy_mesh::{BreakerConfig, BreakerLayer, BulkheadConfig, BulkheadLayer, EjectionBudget};
use convoy_proto::methods::Idempotency;
use http::{Request, Response};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tower::retry::Retry;
use tower::{Layer, Service, ServiceExt};

/// The counters recorded since the last snapshot (the debugging recorder hands out deltas),
/// by name and `label=value`.
fn counters(snapshotter: &Snapshotter) -> Vec<(String, u64)> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(key, _, _, value)| match value {
            DebugValue::Counter(n) => {
                let labels: Vec<String> = key
                    .key()
                    .labels()
                    .map(|l| format!("{}={}", l.key(), l.value()))
                    .collect();
                Some((format!("{}{{{}}}", key.key().name(), labels.join(",")), n))
            }
            _ => None,
        })
        .collect()
}

fn count(counters: &[(String, u64)], name: &str) -> u64 {
    counters
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test(start_paused = true)]
async fn retries_breaker_transitions_and_shedding_are_counted() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().expect("one recorder per test binary");

    // Retries: a failing idempotent call spends retries from the budget.
    let config = Arc::new(RetryConfig::default());
    let budget = Arc::new(RetryBudget::new(&config));
    let failing = tower::service_fn(|_req: tonic::Request<u32>| async {
        Err::<tonic::Response<()>, _>(tonic::Status::unavailable("down"))
    });
    let budget_counts = budget.clone();
    let policy = RetryPolicy::new(config, budget, Idempotency::NoSideEffects);
    let _ = Retry::new(policy, failing)
        .oneshot(tonic::Request::new(1))
        .await;
    assert_eq!(budget_counts.counts(), (1, 4, 0));
    let seen = counters(&snapshotter);
    assert_eq!(count(&seen, "convoy_client_requests_total{}"), 1);
    assert_eq!(count(&seen, "convoy_client_retries_total{budget=spent}"), 4);

    // Breaker: seven failures open it (in a set of two, so ejection is allowed).
    let ejection = EjectionBudget::new(0.5);
    let _other = BreakerLayer::new(BreakerConfig::default(), ejection.clone()).layer(
        tower::service_fn(|()| async { Ok::<_, Infallible>(Response::new(())) }),
    );
    let mut breaker = BreakerLayer::new(BreakerConfig::default(), ejection).layer(
        tower::service_fn(|()| async {
            let mut response = Response::new(());
            response
                .headers_mut()
                .insert("grpc-status", "14".parse().unwrap());
            Ok::<_, Infallible>(response)
        }),
    );
    for _ in 0..7 {
        breaker.ready().await.unwrap().call(()).await.unwrap();
    }
    let seen = counters(&snapshotter);
    assert_eq!(
        count(
            &seen,
            "convoy_breaker_transitions_total{transition=opened_consecutive}"
        ),
        1
    );

    // Bulkhead: a call past the limit is shed and counted.
    let bulkhead = BulkheadLayer::new(BulkheadConfig {
        limit: 1,
        queue: 0,
        max_wait: Duration::from_secs(1),
        pushback: Duration::from_millis(100),
    })
    .layer(tower::service_fn(|_req: Request<()>| async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok::<_, Infallible>(Response::new(String::new()))
    }));
    let busy = tokio::spawn(bulkhead.clone().oneshot(Request::new(())));
    tokio::task::yield_now().await;
    bulkhead.oneshot(Request::new(())).await.unwrap();
    busy.await.unwrap().unwrap();
    let seen = counters(&snapshotter);
    assert_eq!(
        count(&seen, "convoy_server_shed_total{reason=queue_full}"),
        1
    );
}
