//! A per-endpoint circuit breaker that works as a readiness gate.
//!
//! After the design of linkerd2-proxy: responses are classified, the classification feeds a
//! small policy ([`BreakerState`], a pure state machine), and the policy opens or closes a
//! gate in `poll_ready`. The balancer in front never learns that breakers exist: a broken
//! endpoint is simply not ready, and power-of-two-choices skips it.
//!
//! - Closed → Open after `consecutive_failures` failures in a row, or when the success rate
//!   over the last `window` calls drops below `min_success_rate` (with at least
//!   `min_requests` calls in the window).
//! - Open for a jittered, exponentially growing backoff (1 s → 60 s), then Half-open: exactly
//!   one probe is admitted; its success closes the breaker (and resets the backoff), its
//!   failure opens it again for longer.
//! - Like Envoy's outlier detection, breakers that share an [`EjectionBudget`] never eject
//!   more than `max_ejection_share` of the endpoint set: past that, an endpoint stays in
//!   rotation however it fails, because shedding the whole fleet helps nobody.
//!
//! A failure is a transport error or a gRPC status that says the endpoint is unwell
//! (UNAVAILABLE, INTERNAL, UNKNOWN, DATA_LOSS). RESOURCE_EXHAUSTED is load, not failure: the
//! balancer's load estimate handles it.
//!
//! Each transition counts in `convoy_breaker_transitions_total{transition}`; a breaker that
//! knows its endpoint ([`BreakerLayer::for_endpoint`]) also publishes its state as the gauge
//! [`STATE_GAUGE`]`{endpoint}`: 0 closed, 1 half-open, 2 open.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::Response;
use pin_project_lite::pin_project;
use rand::Rng;
use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

/// The gauge of each endpoint's breaker state: 0 closed, 1 half-open, 2 open.
pub const STATE_GAUGE: &str = "convoy_breaker_state";

/// Breaker settings.
#[derive(Clone, Debug)]
pub struct BreakerConfig {
    /// Failures in a row that open the breaker. 7: linkerd's failure accrual default.
    pub consecutive_failures: u32,
    /// Calls remembered for the success rate. 100.
    pub window: usize,
    /// Calls needed in the window before the success rate counts. 20.
    pub min_requests: usize,
    /// Success rate below which the breaker opens. 0.5.
    pub min_success_rate: f64,
    /// First open period. 1 s.
    pub min_backoff: Duration,
    /// Longest open period. 60 s.
    pub max_backoff: Duration,
    /// Share of each open period added or removed at random, so endpoints that failed
    /// together are not probed together. 0.5.
    pub jitter: f64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 7,
            window: 100,
            min_requests: 20,
            min_success_rate: 0.5,
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            jitter: 0.5,
        }
    }
}

/// How many endpoints of a set may be ejected at once.
#[derive(Debug)]
pub struct EjectionBudget {
    max_share: f64,
    endpoints: AtomicUsize,
    ejected: AtomicUsize,
}

impl EjectionBudget {
    /// At most `max_share` of the endpoints (rounded down, but never below one when the
    /// share is positive and there are at least two endpoints) may be ejected. Envoy's
    /// default share is 10%; convoy defaults to 0.5 with few instances per service.
    pub fn new(max_share: f64) -> Arc<Self> {
        Arc::new(Self {
            max_share,
            endpoints: AtomicUsize::new(0),
            ejected: AtomicUsize::new(0),
        })
    }

    fn max_ejected(&self) -> usize {
        let endpoints = self.endpoints.load(Ordering::Acquire);
        let share = (endpoints as f64 * self.max_share).floor() as usize;
        if endpoints >= 2 && self.max_share > 0.0 {
            share.max(1).min(endpoints - 1)
        } else {
            0
        }
    }

    /// Takes an ejection slot, if the share allows one more.
    fn try_eject(&self) -> bool {
        let max = self.max_ejected();
        self.ejected
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    fn readmit(&self) {
        let _ = self
            .ejected
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Endpoints ejected now.
    pub fn ejected(&self) -> usize {
        self.ejected.load(Ordering::Acquire)
    }

    /// Endpoints registered now.
    pub fn endpoints(&self) -> usize {
        self.endpoints.load(Ordering::Acquire)
    }
}

/// What the gate says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Take calls.
    Open,
    /// Take exactly one probe.
    Probe,
    /// Take nothing until then.
    ShutUntil(Instant),
    /// Take nothing until the probe that is out answers.
    AwaitProbe,
}

/// Why a breaker changed state, for metrics and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// Opened after failures in a row.
    OpenedConsecutive,
    /// Opened on a low success rate.
    OpenedSuccessRate,
    /// A probe failed; open again, for longer.
    ProbeFailed,
    /// A probe succeeded; closed.
    Closed,
    /// Would have opened, but the ejection share was used up.
    EjectionRefused,
}

impl Transition {
    /// The transition as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenedConsecutive => "opened_consecutive",
            Self::OpenedSuccessRate => "opened_success_rate",
            Self::ProbeFailed => "probe_failed",
            Self::Closed => "closed",
            Self::EjectionRefused => "ejection_refused",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { probing: bool },
}

impl Phase {
    /// The phase's value in [`STATE_GAUGE`].
    fn gauge(self) -> u8 {
        match self {
            Self::Closed => 0,
            Self::HalfOpen { .. } => 1,
            Self::Open { .. } => 2,
        }
    }
}

/// The breaker's policy: a pure state machine over outcomes and time.
#[derive(Debug)]
pub struct BreakerState {
    config: BreakerConfig,
    budget: Arc<EjectionBudget>,
    phase: Phase,
    consecutive: u32,
    window: std::collections::VecDeque<bool>,
    backoff: Duration,
}

impl BreakerState {
    /// A closed breaker counted in `budget`'s endpoint set.
    pub fn new(config: BreakerConfig, budget: Arc<EjectionBudget>) -> Self {
        budget.endpoints.fetch_add(1, Ordering::AcqRel);
        let backoff = config.min_backoff;
        Self {
            config,
            budget,
            phase: Phase::Closed,
            consecutive: 0,
            window: std::collections::VecDeque::new(),
            backoff,
        }
    }

    /// Whether calls may go through at `now` (moving Open to Half-open when its time is up).
    pub fn gate(&mut self, now: Instant) -> Gate {
        match self.phase {
            Phase::Closed => Gate::Open,
            Phase::Open { until } if now < until => Gate::ShutUntil(until),
            Phase::Open { .. } => {
                self.phase = Phase::HalfOpen { probing: false };
                Gate::Probe
            }
            Phase::HalfOpen { probing: false } => Gate::Probe,
            // A probe is out: nothing else until it answers.
            Phase::HalfOpen { probing: true } => Gate::AwaitProbe,
        }
    }

    /// Records that the one probe of a half-open breaker was sent.
    pub fn probe_sent(&mut self) {
        if let Phase::HalfOpen { probing } = &mut self.phase {
            *probing = true;
        }
    }

    /// Records the outcome of a call (`probe`: the half-open probe); returns the
    /// transition it caused, if any. While the breaker is not closed, only the probe's
    /// outcome counts: answers to calls admitted before it opened change nothing.
    pub fn record(&mut self, success: bool, probe: bool, now: Instant) -> Option<Transition> {
        match self.phase {
            Phase::HalfOpen { .. } if !probe => None,
            Phase::HalfOpen { .. } => {
                if success {
                    self.phase = Phase::Closed;
                    self.consecutive = 0;
                    self.window.clear();
                    self.backoff = self.config.min_backoff;
                    self.budget.readmit();
                    Some(Transition::Closed)
                } else {
                    self.backoff = (self.backoff * 2).min(self.config.max_backoff);
                    self.phase = Phase::Open {
                        until: now + self.jittered(self.backoff),
                    };
                    Some(Transition::ProbeFailed)
                }
            }
            // Answers to calls admitted before the breaker opened change nothing.
            Phase::Open { .. } => None,
            Phase::Closed => {
                self.consecutive = if success { 0 } else { self.consecutive + 1 };
                self.window.push_back(success);
                if self.window.len() > self.config.window {
                    self.window.pop_front();
                }
                let reason = if self.consecutive >= self.config.consecutive_failures {
                    Some(Transition::OpenedConsecutive)
                } else if self.window.len() >= self.config.min_requests
                    && self.success_rate() < self.config.min_success_rate
                {
                    Some(Transition::OpenedSuccessRate)
                } else {
                    None
                }?;
                if !self.budget.try_eject() {
                    // Keep counting: the next failure asks again.
                    self.consecutive = 0;
                    return Some(Transition::EjectionRefused);
                }
                self.phase = Phase::Open {
                    until: now + self.jittered(self.backoff),
                };
                Some(reason)
            }
        }
    }

    fn success_rate(&self) -> f64 {
        let ok = self.window.iter().filter(|s| **s).count();
        ok as f64 / self.window.len() as f64
    }

    fn jittered(&self, period: Duration) -> Duration {
        let spread = self.config.jitter.clamp(0.0, 1.0);
        let factor = 1.0 + spread * (rand::rng().random::<f64>() * 2.0 - 1.0);
        period.mul_f64(factor)
    }

    /// True while the breaker keeps calls out (open, or half-open with its probe out).
    pub fn is_ejected(&self) -> bool {
        !matches!(self.phase, Phase::Closed)
    }
}

impl Drop for BreakerState {
    fn drop(&mut self) {
        if self.is_ejected() {
            self.budget.readmit();
        }
        self.budget.endpoints.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Marks a response the client made up because the endpoint did not answer in time (see
/// [`crate::endpoint`]): a failure of the endpoint, unlike a DEADLINE_EXCEEDED it sent.
#[derive(Clone, Copy, Debug)]
pub struct LocalTimeout;

/// Whether a response (or a transport error) counts against the endpoint.
pub fn is_failure<B>(result: &Result<Response<B>, impl Sized>) -> bool {
    match result {
        Err(_) => true,
        Ok(response) if response.extensions().get::<LocalTimeout>().is_some() => true,
        Ok(response) => {
            let code = response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok());
            // UNKNOWN 2, INTERNAL 13, UNAVAILABLE 14, DATA_LOSS 15; 5xx from a proxy too.
            matches!(code, Some(2 | 13 | 14 | 15)) || response.status().is_server_error()
        }
    }
}

/// Adds a breaker to an endpoint; see the module docs.
#[derive(Clone, Debug)]
pub struct BreakerLayer {
    config: BreakerConfig,
    budget: Arc<EjectionBudget>,
    endpoint: Option<Arc<str>>,
}

impl BreakerLayer {
    /// Breakers with `config`, sharing `budget` across the endpoint set.
    pub fn new(config: BreakerConfig, budget: Arc<EjectionBudget>) -> Self {
        Self {
            config,
            budget,
            endpoint: None,
        }
    }

    /// The same layer for the breaker of `endpoint` (its address), which then publishes its
    /// state as [`STATE_GAUGE`]`{endpoint}`. Without it the breaker publishes no state: one
    /// unlabelled gauge for every breaker of the process would say nothing.
    pub fn for_endpoint(&self, endpoint: &str) -> Self {
        Self {
            endpoint: Some(endpoint.into()),
            ..self.clone()
        }
    }
}

impl<S> Layer<S> for BreakerLayer {
    type Service = Breaker<S>;

    fn layer(&self, inner: S) -> Self::Service {
        let shared = Shared {
            state: Mutex::new(BreakerState::new(self.config.clone(), self.budget.clone())),
            probe_answered: Arc::new(Notify::new()),
            endpoint: self.endpoint.clone(),
        };
        shared.publish(Phase::Closed);
        Breaker {
            inner,
            shared: Arc::new(shared),
            sleep: None,
            notified: None,
            probe: false,
        }
    }
}

/// What a breaker's service and its response futures share.
#[derive(Debug)]
struct Shared {
    state: Mutex<BreakerState>,
    /// Woken when a half-open probe answers, so a gate waiting on it re-checks.
    probe_answered: Arc<Notify>,
    /// The endpoint's address, for [`STATE_GAUGE`].
    endpoint: Option<Arc<str>>,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        // The state is a few counters: a panic while holding the lock cannot leave it
        // unusable, so a poisoned lock is taken as is.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the state, then publishes the state gauge if the phase changed (the
    /// gauge is set on changes only: `gate` runs at every readiness check). Published under
    /// the lock, so racing changes reach the gauge in their order.
    fn with_state<T>(&self, f: impl FnOnce(&mut BreakerState) -> T) -> T {
        let mut state = self.state();
        let before = state.phase.gauge();
        let result = f(&mut state);
        if state.phase.gauge() != before {
            self.publish(state.phase);
        }
        result
    }

    fn publish(&self, phase: Phase) {
        if let Some(endpoint) = &self.endpoint {
            metrics::gauge!(STATE_GAUGE, "endpoint" => endpoint.clone())
                .set(f64::from(phase.gauge()));
        }
    }
}

impl Drop for Shared {
    /// An endpoint that left the set ejects nothing any more: its last state must not keep
    /// reading open.
    fn drop(&mut self) {
        self.publish(Phase::Closed);
    }
}

/// The service made by [`BreakerLayer`]: one per endpoint.
pub struct Breaker<S> {
    inner: S,
    shared: Arc<Shared>,
    sleep: Option<Pin<Box<Sleep>>>,
    notified: Option<Pin<Box<OwnedNotified>>>,
    /// The next call is the half-open probe.
    probe: bool,
}

impl<S> Breaker<S> {
    /// True while the breaker keeps calls out.
    pub fn is_ejected(&self) -> bool {
        self.shared.state().is_ejected()
    }

    /// Whether a call made now would be let through (closed, or half-open with no probe
    /// out), for routers that choose an endpoint before polling it.
    pub fn admits_now(&self) -> bool {
        matches!(
            self.shared.with_state(|state| state.gate(Instant::now())),
            Gate::Open | Gate::Probe
        )
    }

    /// The endpoint behind the breaker.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

/// A clone shares the breaker's state (one breaker per endpoint, however many handles).
impl<S: Clone> Clone for Breaker<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            sleep: None,
            notified: None,
            probe: false,
        }
    }
}

// === impl Breaker ===

impl<S, Req, B> Service<Req> for Breaker<S>
where
    S: Service<Req, Response = Response<B>>,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = BreakerFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        loop {
            // Register for the probe's answer before looking, so it cannot be missed.
            let notified = self.notified.get_or_insert_with(|| {
                Box::pin(self.shared.probe_answered.clone().notified_owned())
            });
            notified.as_mut().enable();
            let gate = self.shared.with_state(|state| state.gate(Instant::now()));
            match gate {
                Gate::Open => {
                    self.sleep = None;
                    self.probe = false;
                    return self.inner.poll_ready(cx);
                }
                Gate::Probe => {
                    self.sleep = None;
                    ready!(self.inner.poll_ready(cx))?;
                    self.probe = true;
                    return Poll::Ready(Ok(()));
                }
                Gate::AwaitProbe => {
                    ready!(notified.as_mut().poll(cx));
                    self.notified = None;
                }
                Gate::ShutUntil(until) => {
                    let sleep = self
                        .sleep
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
                    if sleep.deadline() != until {
                        sleep.as_mut().reset(until);
                    }
                    ready!(sleep.as_mut().poll(cx));
                    self.sleep = None;
                }
            }
        }
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let probe = std::mem::take(&mut self.probe);
        if probe {
            self.shared.state().probe_sent();
        }
        BreakerFuture {
            inner: self.inner.call(request),
            shared: self.shared.clone(),
            probe,
            recorded: false,
        }
    }
}

impl Shared {
    fn record(&self, success: bool, probe: bool) {
        let transition = self.with_state(|state| state.record(success, probe, Instant::now()));
        if let Some(transition) = transition {
            metrics::counter!("convoy_breaker_transitions_total", "transition" => transition.as_str())
                .increment(1);
            if matches!(transition, Transition::Closed | Transition::ProbeFailed) {
                self.probe_answered.notify_waiters();
            }
            if matches!(transition, Transition::EjectionRefused) {
                tracing::debug!(?transition, "circuit breaker");
            } else {
                tracing::info!(?transition, "circuit breaker");
            }
        }
    }
}

pin_project! {
    /// Response future of [`Breaker`]: classifies the outcome. A probe dropped before it
    /// answers (its caller gave up) counts as a failed probe, so the breaker never waits
    /// for an answer that cannot come.
    pub struct BreakerFuture<F> {
        #[pin]
        inner: F,
        shared: Arc<Shared>,
        probe: bool,
        recorded: bool,
    }

    impl<F> PinnedDrop for BreakerFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if *this.probe && !*this.recorded {
                this.shared.record(false, true);
            }
        }
    }
}

impl<F, B, E> Future for BreakerFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        *this.recorded = true;
        this.shared.record(!is_failure(&result), *this.probe);
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::AtomicBool;
    use std::task::Poll;
    use tower::ServiceExt;

    /// An endpoint that answers OK or UNAVAILABLE as its flag says, counting calls.
    #[derive(Clone, Default)]
    struct Endpoint {
        healthy: Arc<AtomicBool>,
        calls: Arc<AtomicUsize>,
    }

    impl Endpoint {
        fn service(
            &self,
        ) -> impl Service<
            (),
            Response = Response<()>,
            Error = std::convert::Infallible,
            Future = impl Send,
        > + Clone {
            let (healthy, calls) = (self.healthy.clone(), self.calls.clone());
            tower::service_fn(move |()| {
                calls.fetch_add(1, Ordering::SeqCst);
                let ok = healthy.load(Ordering::SeqCst);
                async move {
                    let mut response = Response::new(());
                    if !ok {
                        response
                            .headers_mut()
                            .insert("grpc-status", "14".parse().unwrap());
                    }
                    Ok(response)
                }
            })
        }
    }

    fn config() -> BreakerConfig {
        BreakerConfig {
            jitter: 0.0,
            ..BreakerConfig::default()
        }
    }

    /// A breaker in a set of two endpoints (the other one healthy and never called), so
    /// the ejection share allows ejecting this one.
    fn breaker(
        endpoint: &Endpoint,
        config: BreakerConfig,
    ) -> (
        Breaker<impl Service<(), Response = Response<()>, Error = std::convert::Infallible>>,
        BreakerState,
    ) {
        let budget = EjectionBudget::new(0.5);
        let other = BreakerState::new(config.clone(), budget.clone());
        (
            BreakerLayer::new(config, budget).layer(endpoint.service()),
            other,
        )
    }

    fn ready<S: Service<()>>(service: &mut S) -> bool {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        matches!(service.poll_ready(&mut cx), Poll::Ready(Ok(())))
    }

    async fn call<S>(service: &mut S)
    where
        S: Service<(), Response = Response<()>>,
        S::Error: std::fmt::Debug,
    {
        service.ready().await.unwrap().call(()).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn seven_failures_in_a_row_open_the_breaker_and_one_probe_closes_it() {
        let endpoint = Endpoint::default();
        let (mut service, _other) = breaker(&endpoint, config());
        for _ in 0..6 {
            call(&mut service).await;
        }
        assert!(ready(&mut service), "six failures leave the breaker closed");
        call(&mut service).await;
        assert!(!ready(&mut service), "the seventh opens it");
        assert!(service.is_ejected());

        // Open for the first backoff (1 s, no jitter here).
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(!ready(&mut service));
        tokio::time::advance(Duration::from_millis(1)).await;
        endpoint.healthy.store(true, Ordering::SeqCst);

        // Half-open: exactly one probe goes out; nothing else until it answers.
        assert!(ready(&mut service));
        let probe = service.call(());
        assert!(!ready(&mut service), "a second call waits for the probe");
        probe.await.unwrap();
        assert!(ready(&mut service), "a successful probe closes the breaker");
        assert!(!service.is_ejected());
        assert_eq!(endpoint.calls.load(Ordering::SeqCst), 8);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_twice_as_long() {
        let endpoint = Endpoint::default();
        let (mut service, _other) = breaker(&endpoint, config());
        for _ in 0..7 {
            call(&mut service).await;
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        call(&mut service).await; // the probe fails
        tokio::time::advance(Duration::from_millis(1999)).await;
        assert!(!ready(&mut service), "reopened for 2 s");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(ready(&mut service));
    }

    #[tokio::test(start_paused = true)]
    async fn a_low_success_rate_opens_the_breaker_without_a_failure_streak() {
        let endpoint = Endpoint::default();
        let (mut service, _other) = breaker(&endpoint, config());
        // Two failures, one success, repeated: never seven in a row, 30% success once the
        // window holds its minimum of 20 calls.
        for i in 0..20 {
            endpoint.healthy.store(i % 3 == 2, Ordering::SeqCst);
            assert!(ready(&mut service), "still closed after {i} calls");
            call(&mut service).await;
        }
        assert!(
            !ready(&mut service),
            "opened on the success rate at the 20th call"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_ejection_share_keeps_part_of_the_set_in_rotation() {
        let budget = EjectionBudget::new(0.5);
        let endpoints: Vec<Endpoint> = (0..4).map(|_| Endpoint::default()).collect();
        let mut services: Vec<_> = endpoints
            .iter()
            .map(|e| BreakerLayer::new(config(), budget.clone()).layer(e.service()))
            .collect();
        for service in &mut services {
            for _ in 0..7 {
                call(service).await;
            }
        }
        assert_eq!(
            budget.ejected(),
            2,
            "at most half of four endpoints are ejected"
        );
        let in_rotation = services.iter_mut().map(ready).filter(|r| *r).count();
        assert_eq!(in_rotation, 2);
        drop(services);
        assert_eq!((budget.endpoints(), budget.ejected()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_whose_caller_gives_up_counts_as_failed_and_the_next_one_is_admitted() {
        let endpoint = Endpoint::default();
        let (mut service, _other) = breaker(&endpoint, config());
        for _ in 0..7 {
            call(&mut service).await;
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(ready(&mut service));
        drop(service.call(())); // the probe's caller went away
        // Reopened for 2 s, then probed again: never shut out for good.
        tokio::time::advance(Duration::from_millis(1999)).await;
        assert!(!ready(&mut service));
        tokio::time::advance(Duration::from_millis(1)).await;
        endpoint.healthy.store(true, Ordering::SeqCst);
        assert!(ready(&mut service));
        service.call(()).await.unwrap();
        assert!(!service.is_ejected());
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_probe_decides_a_half_open_breaker() {
        let endpoint = Endpoint::default();
        let (mut service, _other) = breaker(&endpoint, config());
        for _ in 0..6 {
            call(&mut service).await;
        }
        // A slow call admitted while closed, answered after the breaker opened and its open
        // period passed.
        endpoint.healthy.store(true, Ordering::SeqCst);
        assert!(ready(&mut service));
        let late = service.call(());
        endpoint.healthy.store(false, Ordering::SeqCst);
        call(&mut service).await; // the 7th failure opens it
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(ready(&mut service));
        let probe = service.call(());
        late.await.unwrap(); // a success, but not the probe's
        assert!(!ready(&mut service), "still waiting for the probe");
        probe.await.unwrap(); // the probe fails: reopened
        assert!(service.is_ejected());
    }

    #[test]
    fn a_breaker_that_knows_its_endpoint_publishes_closed_open_and_half_open() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        // The gauge's value now (the debugging recorder resets a gauge it reports).
        let state = || -> Vec<(String, f64)> {
            snapshotter
                .snapshot()
                .into_vec()
                .into_iter()
                .filter_map(|(key, _, _, value)| match value {
                    DebugValue::Gauge(v) if key.key().name() == STATE_GAUGE => {
                        let labels: Vec<String> = key
                            .key()
                            .labels()
                            .map(|l| format!("{}={}", l.key(), l.value()))
                            .collect();
                        Some((labels.join(","), v.into_inner()))
                    }
                    _ => None,
                })
                .collect()
        };
        let gauge = |value: f64| vec![("endpoint=10.0.0.7:50051".to_owned(), value)];
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        metrics::with_local_recorder(&recorder, || {
            runtime.block_on(async {
                let endpoint = Endpoint::default();
                let budget = EjectionBudget::new(0.5);
                let _other = BreakerState::new(config(), budget.clone());
                let layer = BreakerLayer::new(config(), budget);
                let _unlabelled = layer.layer(endpoint.service());
                let mut service = layer
                    .for_endpoint("10.0.0.7:50051")
                    .layer(endpoint.service());
                assert_eq!(state(), gauge(0.0), "closed from the start");
                for _ in 0..7 {
                    call(&mut service).await;
                }
                assert_eq!(state(), gauge(2.0), "open");
                tokio::time::advance(Duration::from_secs(1)).await;
                endpoint.healthy.store(true, Ordering::SeqCst);
                assert!(ready(&mut service));
                assert_eq!(state(), gauge(1.0), "half-open");
                call(&mut service).await;
                assert_eq!(state(), gauge(0.0), "closed by the probe");
            })
        });
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_the_client_made_up_on_timeout_is_a_failure() {
        let mut timed_out = Response::new(());
        timed_out.extensions_mut().insert(LocalTimeout);
        timed_out
            .headers_mut()
            .insert("grpc-status", "4".parse().unwrap());
        assert!(is_failure(&Ok::<_, ()>(timed_out)));
        let mut sent = Response::new(());
        sent.headers_mut()
            .insert("grpc-status", "4".parse().unwrap());
        assert!(
            !is_failure(&Ok::<_, ()>(sent)),
            "a server's own DEADLINE_EXCEEDED is neutral"
        );
    }

    proptest! {
        /// No sequence of outcomes and clock steps ejects more than the share allows.
        #[test]
        fn no_sequence_ejects_more_than_the_maximum_share(
            endpoints in 2usize..7,
            share in 0.1f64..0.9,
            steps in proptest::collection::vec((0usize..7, any::<bool>(), 0u64..3000), 1..400),
        ) {
            let budget = EjectionBudget::new(share);
            let mut states: Vec<BreakerState> = (0..endpoints)
                .map(|_| BreakerState::new(BreakerConfig::default(), budget.clone()))
                .collect();
            let max = budget.max_ejected();
            prop_assert!(max < endpoints, "never the whole set");
            let mut now = Instant::now();
            for (index, success, advance_ms) in steps {
                now += Duration::from_millis(advance_ms);
                let state = &mut states[index % endpoints];
                let gate = state.gate(now);
                if matches!(gate, Gate::Open | Gate::Probe) {
                    let probe = gate == Gate::Probe;
                    if probe {
                        state.probe_sent();
                    }
                    state.record(success, probe, now);
                }
                let ejected = states.iter().filter(|s| s.is_ejected()).count();
                prop_assert!(ejected <= max, "{ejected} ejected of {endpoints} (max {max})");
                prop_assert_eq!(ejected, budget.ejected());
            }
        }
    }
}
