//! The two ways to drive load: open loop (requests scheduled on a clock, at a target rate,
//! whatever the answers do) and closed loop (a fixed number of clients, each sending its
//! next request when the last one returns: saturation).
//!
//! Open-loop latency is measured from each request's *scheduled* send time, not from when
//! it was actually sent (wrk2's correction for coordinated omission): when the target
//! stalls, the requests that should have gone out meanwhile count the whole stall, as the
//! users behind them would. The in-flight cap bounds what a stalled target can cost the
//! generator; a request due while the cap is full is not sent and is counted as such
//! (`not_sent`), never silently dropped from the schedule.
//!
//! The generator's own lateness (tokio's timer has millisecond resolution, and the generator
//! shares the machine) is part of that latency; each request's send lag is recorded apart,
//! so a report shows how much of a latency is the generator's.
//!
//! Requests due during the warm-up run but are not recorded.
//!
//! Not here: what a request does ([`crate::scenario`]) or how numbers are summarised
//! ([`crate::record`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::record::{Outcome, Recorder};

/// One request: called with its sequence number, it resolves to its outcome.
pub type Op = Arc<dyn Fn(u64) -> Pin<Box<dyn Future<Output = Outcome> + Send>> + Send + Sync>;

/// How load is offered.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// Requests at `rate` per second on a fixed schedule, at most `max_in_flight` at once.
    Open {
        /// Requests per second.
        rate: f64,
        /// Most requests outstanding; one due beyond it is counted as not sent.
        max_in_flight: usize,
    },
    /// `clients` clients, each sending its next request as soon as its last one returns.
    Closed {
        /// Concurrent clients.
        clients: usize,
    },
}

/// How long a run lasts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Phases {
    /// Load offered but not recorded, first.
    pub warmup: Duration,
    /// Load offered and recorded.
    pub measure: Duration,
    /// Longest wait, after the last request is due, for the ones in flight; any still
    /// outstanding then are recorded as [`Outcome::Unfinished`].
    pub drain: Duration,
}

/// Offers `op` in `mode` for `phases` and returns what was recorded.
pub async fn run(op: Op, mode: Mode, phases: Phases) -> Recorder {
    match mode {
        Mode::Open {
            rate,
            max_in_flight,
        } => open_loop(op, rate, max_in_flight, phases).await,
        Mode::Closed { clients } => closed_loop(op, clients, phases).await,
    }
}

async fn open_loop(op: Op, rate: f64, max_in_flight: usize, phases: Phases) -> Recorder {
    let recorder = Arc::new(Mutex::new(Recorder::new()));
    let max_in_flight = max_in_flight.max(1);
    let slots = Arc::new(Semaphore::new(max_in_flight));
    let rate = rate.max(f64::MIN_POSITIVE);
    let start = Instant::now();
    let measured_from = start + phases.warmup;
    let end = measured_from + phases.measure;
    let mut n: u64 = 0;
    loop {
        // From the start each time, so rounding never accumulates.
        let due = start + Duration::from_secs_f64(n as f64 / rate);
        if due >= end {
            break;
        }
        tokio::time::sleep_until(due).await;
        let measured = due >= measured_from;
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                let (op, recorder) = (op.clone(), recorder.clone());
                let lag = Instant::now().saturating_duration_since(due);
                tokio::spawn(async move {
                    let outcome = op(n).await;
                    if measured {
                        let latency = Instant::now().saturating_duration_since(due);
                        // One lock per request, on its way out.
                        let mut recorder = lock(&recorder);
                        recorder.send_lag(lag);
                        recorder.record(outcome, latency);
                    }
                    drop(slot);
                });
            }
            Err(_) if measured => lock(&recorder).not_sent(),
            Err(_) => {}
        }
        n += 1;
    }
    finish(recorder, &slots, max_in_flight, phases.drain, end).await
}

async fn closed_loop(op: Op, clients: usize, phases: Phases) -> Recorder {
    let recorder = Arc::new(Mutex::new(Recorder::new()));
    let clients = clients.max(1);
    let slots = Arc::new(Semaphore::new(clients));
    let start = Instant::now();
    let measured_from = start + phases.warmup;
    let end = measured_from + phases.measure;
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    for _ in 0..clients {
        let slot = slots
            .clone()
            .try_acquire_owned()
            .expect("one slot per client");
        let (op, recorder, next) = (op.clone(), recorder.clone(), next.clone());
        tokio::spawn(async move {
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let outcome = op(n).await;
                if sent >= measured_from {
                    lock(&recorder).record(outcome, sent.elapsed());
                }
            }
            drop(slot);
        });
    }
    finish(recorder, &slots, clients, phases.drain, end).await
}

/// Waits (until `end` + `drain`) for every slot to be returned, counts the requests still
/// outstanding as unfinished, and hands back the recorder with the measured span.
async fn finish(
    recorder: Arc<Mutex<Recorder>>,
    slots: &Arc<Semaphore>,
    total: usize,
    drain: Duration,
    end: Instant,
) -> Recorder {
    let all = u32::try_from(total).unwrap_or(u32::MAX);
    let outstanding =
        match tokio::time::timeout_at(end.max(Instant::now()) + drain, slots.acquire_many(all))
            .await
        {
            Ok(_) => 0,
            Err(_) => total - slots.available_permits(),
        };
    let mut recorder = lock(&recorder).clone();
    for _ in 0..outstanding {
        recorder.unfinished();
    }
    recorder
}

fn lock(recorder: &Mutex<Recorder>) -> std::sync::MutexGuard<'_, Recorder> {
    recorder.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An op that takes `took`, except that nothing answers between `stall_from` and
    /// `stall_until` (after the run's start): requests then wait until it ends.
    fn op(took: Duration, stall: Option<(Duration, Duration)>) -> Op {
        let start = Instant::now();
        Arc::new(move |_| {
            Box::pin(async move {
                tokio::time::sleep(took).await;
                if let Some((from, until)) = stall {
                    let now = start.elapsed();
                    if now >= from && now < until {
                        tokio::time::sleep_until(start + until).await;
                    }
                }
                Outcome::Ok
            })
        })
    }

    fn phases(warmup_ms: u64, measure_ms: u64) -> Phases {
        Phases {
            warmup: Duration::from_millis(warmup_ms),
            measure: Duration::from_millis(measure_ms),
            drain: Duration::from_secs(5),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_loop_sends_on_its_schedule_and_records_only_after_the_warmup() {
        let mode = Mode::Open {
            rate: 100.0,
            max_in_flight: 1000,
        };
        let recorded = run(op(Duration::from_millis(10), None), mode, phases(500, 1000)).await;
        // 100/s over the measured second; the 50 warm-up requests are not recorded.
        assert_eq!(recorded.ok(), 100);
        assert_eq!(recorded.not_sent_count(), 0);
        let latencies = recorded.latencies();
        assert_eq!(latencies.min(), 10_000, "10 ms, in µs");
        assert!(latencies.max() < 10_100, "{}", latencies.max());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_counts_for_every_request_scheduled_during_it() {
        // 100/s for 1 s; nothing answers from 500 ms to 700 ms.
        let stall = Some((Duration::from_millis(500), Duration::from_millis(700)));
        let mode = Mode::Open {
            rate: 100.0,
            max_in_flight: 1000,
        };
        let open = run(op(Duration::from_millis(1), stall), mode, phases(0, 1000)).await;
        let slow = open.latencies().count_between(50_000, u64::MAX);
        // Requests due from 500 ms up to ~650 ms wait at least 50 ms for the stall's end.
        assert!((14..=16).contains(&slow), "{slow} slow requests");
        assert!(
            open.latencies().max() >= 199_000,
            "the first waited ~200 ms"
        );

        // A closed loop of one client sends nothing while it waits: one slow sample only
        // (the coordinated omission the open loop corrects).
        let closed = run(
            op(Duration::from_millis(1), stall),
            Mode::Closed { clients: 1 },
            phases(0, 1000),
        )
        .await;
        let slow = closed.latencies().count_between(50_000, u64::MAX);
        assert_eq!(slow, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_in_flight_cap_requests_are_counted_not_sent_and_stragglers_unfinished() {
        // Each request takes 10 s; the run lasts 1 s at 100/s with at most 5 in flight.
        let mode = Mode::Open {
            rate: 100.0,
            max_in_flight: 5,
        };
        let mut short_drain = phases(0, 1000);
        short_drain.drain = Duration::from_secs(1);
        let recorded = run(op(Duration::from_secs(10), None), mode, short_drain).await;
        assert_eq!(recorded.not_sent_count(), 95);
        assert_eq!(recorded.unfinished_count(), 5);
        assert_eq!(recorded.ok(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_loop_keeps_its_clients_busy() {
        let recorded = run(
            op(Duration::from_millis(10), None),
            Mode::Closed { clients: 4 },
            phases(100, 1000),
        )
        .await;
        // 4 clients, 10 ms each, for the measured second: 400 requests (give or take the
        // ones straddling its edges).
        assert!((396..=404).contains(&recorded.ok()), "{}", recorded.ok());
    }
}
