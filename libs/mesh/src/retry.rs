//! Retries with gRPC's semantics (gRFC A6), paid from a shared budget.
//!
//! A failed attempt is sent again only when all of these hold: the method is declared
//! idempotent in the contract ([`convoy_proto::methods`]); the status is UNAVAILABLE, or
//! RESOURCE_EXHAUSTED with server pushback; fewer than [`RetryConfig::max_attempts`] were
//! made; the server did not push back with a malformed or negative delay; the caller's
//! deadline leaves room for the wait and another attempt; and the shared [`RetryBudget`]
//! has a token. The wait is the server's pushback when it sent one, else exponential
//! backoff with full jitter. Each retry carries `grpc-previous-rpc-attempts`.
//!
//! The policy works above the codec on the typed request (prost messages are `Clone`), via
//! `tower::retry`; the budget is tower's `TpsBudget` (Finagle's design), shared by every
//! call of a client so that a full outage cannot multiply the load on a struggling fleet.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use convoy_proto::methods::Idempotency;
use rand::Rng;
use tonic::{Code, Status};
use tonic_types::StatusExt;
use tower::retry::Policy;
use tower::retry::budget::{Budget, TpsBudget};

use crate::bulkhead::RETRY_PUSHBACK;
use crate::deadline::Deadline;

/// Header naming how many attempts came before this one (gRFC A6).
pub const PREVIOUS_ATTEMPTS: &str = "grpc-previous-rpc-attempts";

/// Retry settings; defaults follow gRFC A6 and Finagle.
#[derive(Clone, Debug)]
pub struct RetryConfig {
    /// Most attempts per call, the first included. 5: gRFC A6's cap.
    pub max_attempts: u32,
    /// Backoff ceiling before the first retry. 50 ms.
    pub initial_backoff: Duration,
    /// Backoff ceiling for any retry. 2 s.
    pub max_backoff: Duration,
    /// Growth of the ceiling per retry. 2.
    pub backoff_multiplier: f64,
    /// Time an attempt needs at least; no retry starts with less of the deadline left. 10 ms.
    pub min_attempt_time: Duration,
    /// Retries allowed as a share of requests. 0.2: Finagle's default.
    pub budget_ratio: f32,
    /// Retries always allowed per second, whatever the traffic. 10: Finagle's default.
    pub budget_min_per_sec: u32,
    /// Window over which requests earn retries. 10 s: Finagle's default.
    pub budget_ttl: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            backoff_multiplier: 2.0,
            min_attempt_time: Duration::from_millis(10),
            budget_ratio: 0.2,
            budget_min_per_sec: 10,
            budget_ttl: Duration::from_secs(10),
        }
    }
}

/// The retry budget shared by every call of one client, with its counters.
#[derive(Debug)]
pub struct RetryBudget {
    budget: TpsBudget,
    requests: AtomicU64,
    retries: AtomicU64,
    refused: AtomicU64,
}

impl RetryBudget {
    /// A budget from `config`.
    pub fn new(config: &RetryConfig) -> Self {
        Self {
            budget: TpsBudget::new(
                config.budget_ttl,
                config.budget_min_per_sec,
                config.budget_ratio,
            ),
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// Records a request (earning a share of a retry).
    pub fn deposit(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("convoy_client_requests_total").increment(1);
        self.budget.deposit();
    }

    /// Takes a retry token; false when the budget is spent.
    pub fn withdraw(&self) -> bool {
        let granted = self.budget.withdraw();
        let (counter, outcome) = if granted {
            (&self.retries, "spent")
        } else {
            (&self.refused, "refused")
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("convoy_client_retries_total", "budget" => outcome).increment(1);
        granted
    }

    /// Requests, retries spent and retries refused so far.
    pub fn counts(&self) -> (u64, u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.retries.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        )
    }
}

/// The `tower::retry` policy of one method; clone it per call.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    config: Arc<RetryConfig>,
    budget: Arc<RetryBudget>,
    idempotency: Idempotency,
    /// Attempts made so far by this call.
    attempts: u32,
}

impl RetryPolicy {
    /// The policy for a method of `idempotency`, paid from `budget`.
    pub fn new(
        config: Arc<RetryConfig>,
        budget: Arc<RetryBudget>,
        idempotency: Idempotency,
    ) -> Self {
        Self {
            config,
            budget,
            idempotency,
            attempts: 0,
        }
    }

    /// How long to wait before retrying after `status`, or `None` not to retry (before
    /// the budget and the deadline are consulted).
    fn wait_for(&self, status: &Status) -> Option<Duration> {
        if !self.idempotency.retryable() || self.attempts >= self.config.max_attempts {
            return None;
        }
        // The server's word on when to come back: `grpc-retry-pushback-ms`, else a
        // `google.rpc.RetryInfo` detail (rate limits send both).
        let pushback = status
            .metadata()
            .get(RETRY_PUSHBACK)
            .map(|v| {
                v.to_str()
                    .ok()
                    .and_then(|text| text.parse::<u64>().ok())
                    .map(Duration::from_millis)
            })
            .or_else(|| {
                status
                    .get_details_retry_info()
                    .and_then(|info| info.retry_delay)
                    .map(Some)
            });
        match (status.code(), pushback) {
            // A malformed or negative pushback means "do not retry" (gRFC A6).
            (_, Some(None)) => None,
            (Code::Unavailable | Code::ResourceExhausted, Some(Some(delay))) => Some(delay),
            (Code::Unavailable, None) => Some(self.backoff()),
            _ => None,
        }
    }

    /// Full jitter: uniform in [0, min(max, initial × multiplier^(retries so far))].
    fn backoff(&self) -> Duration {
        let exponent = self.attempts.saturating_sub(1) as i32;
        let ceiling = self
            .config
            .initial_backoff
            .mul_f64(self.config.backoff_multiplier.powi(exponent))
            .min(self.config.max_backoff);
        ceiling.mul_f64(rand::rng().random::<f64>())
    }
}

impl<M: Clone, R> Policy<tonic::Request<M>, tonic::Response<R>, Status> for RetryPolicy {
    type Future = Pin<Box<dyn Future<Output = ()> + Send>>;

    fn retry(
        &mut self,
        request: &mut tonic::Request<M>,
        result: &mut Result<tonic::Response<R>, Status>,
    ) -> Option<Self::Future> {
        self.attempts += 1;
        if self.attempts == 1 {
            self.budget.deposit();
        }
        let status = result.as_ref().err()?;
        let wait = self.wait_for(status)?;
        let deadline = request
            .extensions()
            .get::<Deadline>()
            .copied()
            .or_else(Deadline::current);
        if let Some(deadline) = deadline
            && deadline.remaining() < wait + self.config.min_attempt_time
        {
            return None;
        }
        if !self.budget.withdraw() {
            return None;
        }
        if let Ok(value) = self.attempts.to_string().parse() {
            request.metadata_mut().insert(PREVIOUS_ATTEMPTS, value);
        }
        Some(Box::pin(tokio::time::sleep(wait)))
    }

    fn clone_request(&mut self, request: &tonic::Request<M>) -> Option<tonic::Request<M>> {
        let mut copy = tonic::Request::new(request.get_ref().clone());
        *copy.metadata_mut() = request.metadata().clone();
        if let Some(deadline) = request.extensions().get::<Deadline>() {
            copy.extensions_mut().insert(*deadline);
        }
        Some(copy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Mutex;
    use tower::ServiceExt;
    use tower::retry::Retry;

    /// Each attempt's grpc-previous-rpc-attempts and arrival time.
    type Attempts = Arc<Mutex<Vec<(Option<String>, tokio::time::Instant)>>>;

    /// A backend answering the same to everything, recording each attempt.
    #[derive(Clone, Default)]
    struct Backend {
        seen: Attempts,
    }

    impl Backend {
        fn service(
            &self,
            answer: impl Fn() -> Result<tonic::Response<()>, Status> + Clone + Send + 'static,
        ) -> impl tower::Service<
            tonic::Request<u32>,
            Response = tonic::Response<()>,
            Error = Status,
            Future = impl Future<Output = Result<tonic::Response<()>, Status>>,
        > + Clone {
            let seen = self.seen.clone();
            tower::service_fn(move |req: tonic::Request<u32>| {
                let previous = req
                    .metadata()
                    .get(PREVIOUS_ATTEMPTS)
                    .map(|v| v.to_str().unwrap().to_owned());
                seen.lock()
                    .unwrap()
                    .push((previous, tokio::time::Instant::now()));
                let answer = answer.clone();
                async move { answer() }
            })
        }

        fn attempts(&self) -> usize {
            self.seen.lock().unwrap().len()
        }

        /// The gaps between consecutive attempts.
        fn gaps(&self) -> Vec<Duration> {
            let seen = self.seen.lock().unwrap();
            seen.windows(2).map(|pair| pair[1].1 - pair[0].1).collect()
        }
    }

    fn new_policy(idempotency: Idempotency) -> (RetryPolicy, Arc<RetryBudget>) {
        let config = Arc::new(RetryConfig::default());
        let budget = Arc::new(RetryBudget::new(&config));
        (
            RetryPolicy::new(config, budget.clone(), idempotency),
            budget,
        )
    }

    fn unavailable() -> Result<tonic::Response<()>, Status> {
        Err(Status::unavailable("down"))
    }

    #[tokio::test(start_paused = true)]
    async fn idempotent_calls_are_retried_up_to_five_attempts_with_the_attempt_count() {
        let backend = Backend::default();
        let (policy, _) = new_policy(Idempotency::NoSideEffects);
        let status = Retry::new(policy, backend.service(unavailable))
            .oneshot(tonic::Request::new(7))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        let previous: Vec<_> = backend
            .seen
            .lock()
            .unwrap()
            .iter()
            .map(|(p, _)| p.clone())
            .collect();
        assert_eq!(
            previous,
            vec![
                None,
                Some("1".into()),
                Some("2".into()),
                Some("3".into()),
                Some("4".into())
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn calls_not_marked_idempotent_and_other_statuses_are_never_retried() {
        let backend = Backend::default();
        let (policy, _) = new_policy(Idempotency::Unknown);
        Retry::new(policy, backend.service(unavailable))
            .oneshot(tonic::Request::new(7))
            .await
            .unwrap_err();
        assert_eq!(backend.attempts(), 1);

        for code in [
            Code::Internal,
            Code::InvalidArgument,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
        ] {
            let backend = Backend::default();
            let (policy, _) = new_policy(Idempotency::Idempotent);
            Retry::new(
                policy,
                backend.service(move || Err(Status::new(code, "no"))),
            )
            .oneshot(tonic::Request::new(7))
            .await
            .unwrap_err();
            assert_eq!(backend.attempts(), 1, "{code:?} must not be retried");
        }
    }

    fn pushback(
        code: Code,
        value: &'static str,
    ) -> impl Fn() -> Result<tonic::Response<()>, Status> + Clone {
        move || {
            let mut status = Status::new(code, "busy");
            status
                .metadata_mut()
                .insert(RETRY_PUSHBACK, value.parse().unwrap());
            Err(status)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn server_pushback_sets_the_wait_and_a_bad_one_stops_retries() {
        let backend = Backend::default();
        let (policy, _) = new_policy(Idempotency::NoSideEffects);
        Retry::new(
            policy,
            backend.service(pushback(Code::ResourceExhausted, "200")),
        )
        .oneshot(tonic::Request::new(7))
        .await
        .unwrap_err();
        assert_eq!(
            backend.attempts(),
            5,
            "RESOURCE_EXHAUSTED with pushback is retried"
        );
        assert_eq!(backend.gaps(), vec![Duration::from_millis(200); 4]);

        for bad in ["-1", "soon"] {
            let backend = Backend::default();
            let (policy, _) = new_policy(Idempotency::NoSideEffects);
            Retry::new(policy, backend.service(pushback(Code::Unavailable, bad)))
                .oneshot(tonic::Request::new(7))
                .await
                .unwrap_err();
            assert_eq!(backend.attempts(), 1, "pushback {bad:?} means do not retry");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retry_info_sets_the_wait_when_no_pushback_header_came() {
        use tonic_types::ErrorDetails;
        let backend = Backend::default();
        let (policy, _) = new_policy(Idempotency::Idempotent);
        let limited = || {
            Err(Status::with_error_details(
                Code::ResourceExhausted,
                "over the team's rate",
                ErrorDetails::with_retry_info(Some(Duration::from_millis(300))),
            ))
        };
        Retry::new(policy, backend.service(limited))
            .oneshot(tonic::Request::new(7))
            .await
            .unwrap_err();
        assert!(backend.attempts() > 1, "retried after the RetryInfo delay");
        let gaps = backend.gaps();
        assert!(
            gaps.iter().all(|gap| *gap == Duration::from_millis(300)),
            "{gaps:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_retry_starts_without_time_for_the_wait_and_an_attempt() {
        let backend = Backend::default();
        let (policy, _) = new_policy(Idempotency::NoSideEffects);
        let mut request = tonic::Request::new(7);
        request
            .extensions_mut()
            .insert(Deadline::after(Duration::from_millis(150)));
        Retry::new(policy, backend.service(pushback(Code::Unavailable, "100")))
            .oneshot(request)
            .await
            .unwrap_err();
        // 0 ms: first attempt; 100 ms: second (50 ms left); then no time for another.
        assert_eq!(backend.attempts(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_outage_costs_at_most_the_budget_in_retries() {
        let backend = Backend::default();
        let (policy, budget) = new_policy(Idempotency::NoSideEffects);
        let service = Retry::new(policy, backend.service(unavailable));
        const REQUESTS: usize = 2000;
        let started = tokio::time::Instant::now();
        // 500 concurrent requests a second for 4 s against a backend that fails everything.
        for _ in 0..4 {
            let batch = (0..REQUESTS / 4).map(|_| service.clone().oneshot(tonic::Request::new(7)));
            futures::future::join_all(batch).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let elapsed = started.elapsed().as_secs().max(10);
        let attempts = backend.attempts();
        // 10 retries/s are always allowed: the floor over the time the outage lasted.
        let floor = 10 * elapsed as usize;
        let ceiling = REQUESTS + (REQUESTS as f64 * 0.2) as usize + floor;
        assert!(
            attempts <= ceiling,
            "{attempts} attempts for {REQUESTS} requests in {elapsed} s exceeds the budget's {ceiling}"
        );
        let (requests, retries, refused) = budget.counts();
        assert_eq!(requests as usize, REQUESTS);
        assert_eq!(attempts, REQUESTS + retries as usize);
        assert!(refused > 0, "the budget refused retries during the outage");
        // Without a budget the same outage would have cost 5 attempts per request.
        assert!(attempts < REQUESTS * 2);
    }

    proptest! {
        /// Whatever the interleaving of requests and retry attempts over time, granted
        /// retries never exceed ratio × requests + the floor of the window.
        #[test]
        fn the_budget_never_grants_more_than_its_ratio_plus_floor(
            ops in proptest::collection::vec((any::<bool>(), 0u64..400), 1..3000),
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            runtime.block_on(async {
                let config = RetryConfig::default();
                let budget = RetryBudget::new(&config);
                let mut elapsed = Duration::ZERO;
                for (is_request, advance_ms) in ops {
                    let step = Duration::from_millis(advance_ms);
                    tokio::time::advance(step).await;
                    elapsed += step;
                    if is_request { budget.deposit() } else { let _ = budget.withdraw(); }
                }
                let (requests, retries, _) = budget.counts();
                // Tokens expire with the window; over the whole run, the floor is earned
                // once per window started.
                let windows = 1 + elapsed.as_secs() / config.budget_ttl.as_secs();
                let floor = u64::from(config.budget_min_per_sec) * config.budget_ttl.as_secs() * windows;
                let allowed = (requests as f64 * f64::from(config.budget_ratio)).ceil() as u64 + floor;
                prop_assert!(retries <= allowed, "{retries} retries for {requests} requests (allowed {allowed})");
                Ok(())
            })?;
        }
    }
}
