//! A run's summary, for a person (aligned lines) and as JSON (for comparing runs): the
//! achieved rate, outcomes by status, latency percentiles and the generator's own CPU, with
//! each target's ratio to the baseline measured in the same run.
//!
//! Not here: recording ([`crate::record`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::drive::Mode;
use crate::record::Recorder;

/// The generator process's CPU time so far (user + system), from `getrusage`.
pub fn cpu_time() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(usage) => {
            let micros = |t: nix::sys::time::TimeVal| {
                Duration::from_secs(u64::try_from(t.tv_sec()).unwrap_or(0))
                    + Duration::from_micros(u64::try_from(t.tv_usec()).unwrap_or(0))
            };
            micros(usage.user_time()) + micros(usage.system_time())
        }
        Err(_) => Duration::ZERO,
    }
}

/// One target's figures over the measured phase.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Summary {
    /// What was driven: a scenario (`get`, ...) or a baseline (`baseline:tonic-echo`, ...).
    pub target: String,
    /// `open` or `closed`.
    pub mode: String,
    /// Requests per second offered (open loop), or the clients (closed loop).
    pub offered: f64,
    /// Measured seconds.
    pub seconds: f64,
    /// Requests answered OK per second.
    pub achieved_rate: f64,
    /// Requests answered OK.
    pub ok: u64,
    /// Failures by status name.
    pub failed: BTreeMap<String, u64>,
    /// Due but not sent: the in-flight cap was full.
    pub not_sent: u64,
    /// Unanswered when the run ended.
    pub unfinished: u64,
    /// Latency percentiles and the maximum, in microseconds (answered requests, from their
    /// scheduled send time in an open loop).
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Maximum.
    pub max_us: u64,
    /// The generator's CPU over the phase, in cores (1.0: one core busy).
    pub client_cpu_cores: f64,
    /// How late requests were sent after they were due (open loop), median and 99th
    /// percentile, in microseconds: the generator's share of the latencies above.
    pub send_lag_p50_us: u64,
    /// 99th percentile of the send lag.
    pub send_lag_p99_us: u64,
}

impl Summary {
    /// The figures of `recorded` over `measured`, the generator having kept
    /// `client_cpu_cores` cores busy meanwhile.
    pub fn new(
        target: &str,
        mode: Mode,
        recorded: &Recorder,
        measured: Duration,
        client_cpu_cores: f64,
    ) -> Self {
        let h = recorded.latencies();
        let seconds = measured.as_secs_f64().max(f64::MIN_POSITIVE);
        let (mode, offered) = match mode {
            Mode::Open { rate, .. } => ("open", rate),
            Mode::Closed { clients } => ("closed", clients as f64),
        };
        Self {
            target: target.to_owned(),
            mode: mode.to_owned(),
            offered,
            seconds,
            achieved_rate: recorded.ok() as f64 / seconds,
            ok: recorded.ok(),
            failed: recorded.failed().clone(),
            not_sent: recorded.not_sent_count(),
            unfinished: recorded.unfinished_count(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            client_cpu_cores,
            send_lag_p50_us: recorded.send_lags().value_at_quantile(0.5),
            send_lag_p99_us: recorded.send_lags().value_at_quantile(0.99),
        }
    }

    /// Requests that should have been answered OK and were not.
    pub fn errors(&self) -> u64 {
        self.failed.values().sum::<u64>() + self.not_sent + self.unfinished
    }

    /// Errors as a share of every request due in the measured phase.
    pub fn error_ratio(&self) -> f64 {
        let due = self.ok + self.errors();
        if due == 0 {
            0.0
        } else {
            self.errors() as f64 / due as f64
        }
    }
}

/// Every target of one run: the scenario first, then its baselines.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The scenario's name.
    pub scenario: String,
    /// The scenario's figures, then each baseline's.
    pub summaries: Vec<Summary>,
}

fn ms(micros: u64) -> String {
    format!("{:.3}", micros as f64 / 1000.0)
}

impl Report {
    /// Aligned lines for a person: one row per target, and the scenario's latencies as a
    /// ratio to each baseline's.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<26} {:>6} {:>10} {:>11} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>5} {:>9}  errors",
            "target",
            "mode",
            "offered",
            "achieved/s",
            "ok",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "cpu",
            "lag p99"
        );
        for s in &self.summaries {
            let mut errors: Vec<String> =
                s.failed.iter().map(|(k, v)| format!("{k} {v}")).collect();
            if s.not_sent > 0 {
                errors.push(format!("not sent {}", s.not_sent));
            }
            if s.unfinished > 0 {
                errors.push(format!("unfinished {}", s.unfinished));
            }
            let _ = writeln!(
                out,
                "{:<26} {:>6} {:>10.0} {:>11.1} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>5.2} {:>9}  {}",
                s.target,
                s.mode,
                s.offered,
                s.achieved_rate,
                s.ok,
                ms(s.p50_us),
                ms(s.p90_us),
                ms(s.p99_us),
                ms(s.p999_us),
                ms(s.max_us),
                s.client_cpu_cores,
                ms(s.send_lag_p99_us),
                if errors.is_empty() {
                    "none".to_owned()
                } else {
                    errors.join(", ")
                },
            );
        }
        if let Some((scenario, baselines)) = self.summaries.split_first() {
            for baseline in baselines {
                let ratio = |a: u64, b: u64| a as f64 / (b.max(1)) as f64;
                let _ = writeln!(
                    out,
                    "{} / {}: p50 x{:.2}, p99 x{:.2}, achieved rate x{:.2}",
                    scenario.target,
                    baseline.target,
                    ratio(scenario.p50_us, baseline.p50_us),
                    ratio(scenario.p99_us, baseline.p99_us),
                    scenario.achieved_rate / baseline.achieved_rate.max(f64::MIN_POSITIVE),
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Outcome;

    #[test]
    fn a_summary_reads_its_recorder_and_the_report_compares_with_baselines() {
        let mut recorded = Recorder::new();
        for ms in 1..=100 {
            recorded.record(Outcome::Ok, Duration::from_millis(ms));
        }
        recorded.record(
            Outcome::Failed(tonic::Code::ResourceExhausted),
            Duration::from_millis(1),
        );
        recorded.not_sent();
        let mode = Mode::Open {
            rate: 50.0,
            max_in_flight: 10,
        };
        let summary = Summary::new("get", mode, &recorded, Duration::from_secs(2), 0.25);
        assert_eq!(summary.achieved_rate, 50.0);
        assert_eq!(summary.errors(), 2);
        assert!((summary.error_ratio() - 2.0 / 102.0).abs() < 1e-9);
        assert!(
            (49_900..=50_100).contains(&summary.p50_us),
            "{}",
            summary.p50_us
        );
        assert!((99_000..=100_100).contains(&summary.max_us));
        assert_eq!(summary.client_cpu_cores, 0.25);

        let mut baseline = summary.clone();
        baseline.target = "baseline:tonic-echo".into();
        baseline.p50_us /= 2;
        let report = Report {
            scenario: "get".into(),
            summaries: vec![summary, baseline],
        };
        let text = report.render();
        assert!(text.contains("RESOURCE_EXHAUSTED 1, not sent 1"), "{text}");
        assert!(
            text.contains("get / baseline:tonic-echo: p50 x2.00"),
            "{text}"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["summaries"][0]["ok"], 100);
        assert_eq!(json["summaries"][1]["target"], "baseline:tonic-echo");
    }
}
