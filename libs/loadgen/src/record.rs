//! What a run recorded: each measured request's latency in an HdrHistogram (microseconds,
//! 3 significant figures, 1 µs to 1 h), and its outcome by gRPC status; requests the
//! in-flight cap kept from being sent, and requests still unanswered when the run ended.
//!
//! Not here: how load is offered ([`crate::drive`]) or the summary ([`crate::report`]).

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Longest latency recorded exactly, in microseconds (1 h); longer ones are clamped to it.
const MAX_MICROS: u64 = 3_600_000_000;

/// How one request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answered OK.
    Ok,
    /// Answered with this gRPC status.
    Failed(tonic::Code),
    /// Still unanswered when the run ended (only [`crate::drive`] makes these).
    Unfinished,
}

impl<T> From<&Result<T, tonic::Status>> for Outcome {
    fn from(result: &Result<T, tonic::Status>) -> Self {
        match result {
            Ok(_) => Outcome::Ok,
            Err(status) => Outcome::Failed(status.code()),
        }
    }
}

/// The numbers of one run, or of several merged.
#[derive(Clone, Debug)]
pub struct Recorder {
    /// Latency of every answered request (OK or not), in microseconds.
    latencies: Histogram<u64>,
    /// How late each request was sent after it was due, in microseconds (open loop: the
    /// generator's own timer and scheduling, included in `latencies`).
    send_lags: Histogram<u64>,
    ok: u64,
    /// Failures by status name (`UNAVAILABLE`, ...).
    failed: BTreeMap<String, u64>,
    not_sent: u64,
    unfinished: u64,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    /// Nothing recorded yet.
    pub fn new() -> Self {
        let histogram = || {
            Histogram::new_with_bounds(1, MAX_MICROS, 3)
                .expect("1 µs to 1 h at 3 significant figures are valid bounds")
        };
        Self {
            latencies: histogram(),
            send_lags: histogram(),
            ok: 0,
            failed: BTreeMap::new(),
            not_sent: 0,
            unfinished: 0,
        }
    }

    /// Records one answered request.
    pub fn record(&mut self, outcome: Outcome, latency: Duration) {
        let micros = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .clamp(1, MAX_MICROS);
        match outcome {
            Outcome::Ok => self.ok += 1,
            Outcome::Failed(code) => *self.failed.entry(code_name(code)).or_default() += 1,
            Outcome::Unfinished => {
                self.unfinished += 1;
                return;
            }
        }
        self.latencies.saturating_record(micros);
    }

    /// Records how late a request was sent after it was due.
    pub fn send_lag(&mut self, lag: Duration) {
        let micros = u64::try_from(lag.as_micros())
            .unwrap_or(u64::MAX)
            .clamp(1, MAX_MICROS);
        self.send_lags.saturating_record(micros);
    }

    /// Counts a request that was due while the in-flight cap was full.
    pub fn not_sent(&mut self) {
        self.not_sent += 1;
    }

    /// Counts a request still unanswered at the end.
    pub fn unfinished(&mut self) {
        self.unfinished += 1;
    }

    /// Adds `other`'s numbers to these.
    pub fn merge(&mut self, other: &Recorder) {
        self.latencies
            .add(&other.latencies)
            .expect("recorders share their bounds");
        self.send_lags
            .add(&other.send_lags)
            .expect("recorders share their bounds");
        self.ok += other.ok;
        for (code, n) in &other.failed {
            *self.failed.entry(code.clone()).or_default() += n;
        }
        self.not_sent += other.not_sent;
        self.unfinished += other.unfinished;
    }

    /// Latencies of answered requests, in microseconds.
    pub fn latencies(&self) -> &Histogram<u64> {
        &self.latencies
    }

    /// How late requests were sent after they were due, in microseconds (open loop).
    pub fn send_lags(&self) -> &Histogram<u64> {
        &self.send_lags
    }

    /// Requests answered OK.
    pub fn ok(&self) -> u64 {
        self.ok
    }

    /// Failed requests by status name.
    pub fn failed(&self) -> &BTreeMap<String, u64> {
        &self.failed
    }

    /// Requests that were due but not sent (in-flight cap).
    pub fn not_sent_count(&self) -> u64 {
        self.not_sent
    }

    /// Requests unanswered at the end.
    pub fn unfinished_count(&self) -> u64 {
        self.unfinished
    }

    /// Every request that should have been answered and was not: failed, not sent or
    /// unfinished.
    pub fn errors(&self) -> u64 {
        self.failed.values().sum::<u64>() + self.not_sent + self.unfinished
    }
}

/// A status code's canonical name, as grpcurl and the gRPC docs spell it.
pub fn code_name(code: tonic::Code) -> String {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
    .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_counted_and_merged() {
        let mut a = Recorder::new();
        a.record(Outcome::Ok, Duration::from_millis(2));
        a.record(
            Outcome::Failed(tonic::Code::Unavailable),
            Duration::from_millis(1),
        );
        a.not_sent();
        let mut b = Recorder::new();
        b.record(Outcome::Ok, Duration::from_secs(7200));
        b.unfinished();
        a.merge(&b);
        assert_eq!(a.ok(), 2);
        assert_eq!(a.failed().get("UNAVAILABLE"), Some(&1));
        assert_eq!(
            (a.not_sent_count(), a.unfinished_count(), a.errors()),
            (1, 1, 3)
        );
        assert_eq!(a.latencies().len(), 3);
        // Two hours is clamped to the histogram's hour, not lost.
        assert!(a.latencies().max() >= MAX_MICROS - MAX_MICROS / 1000);
    }
}
