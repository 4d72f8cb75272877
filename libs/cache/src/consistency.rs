//! The fleet's consistency tally, after Meta's Polaris: samplers re-read a fraction of writes
//! from every cache layer and the primary at fixed delays after their acknowledgement, and
//! count, per delay, the writes some layer still contradicted. "Consistent within 10 s" is
//! then `1 - inconsistent / checks`, usually read as nines.
//!
//! The tally lives in Redis next to the bus, so every instance's samples add up to one
//! fleet-wide figure that `convoyctl cache consistency` reads: a hash of counters
//! (`consistency`: `checks:<ms>`, `bad:<ms>`, `bad:<ms>:<layer>`) and the latest
//! inconsistencies (`consistency:recent`, newest first, at most [`RECENT_KEPT`]).
//!
//! Not here: the sampling itself (the conversation service's `sampler`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use crate::l2::{L2, L2Error};

/// Inconsistencies kept for inspection.
pub const RECENT_KEPT: isize = 100;

/// A layer that contradicted a write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inconsistency {
    /// The layer (`local-l1`, `cache`, `l2`, `primary`).
    pub layer: String,
    /// The cache key.
    pub key: String,
    /// The version the write made.
    pub expected: i64,
    /// The older version the layer held.
    pub found: i64,
}

/// The tally of one delay.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DelayTally {
    /// Writes checked at this delay.
    pub checks: u64,
    /// Of those, writes some layer contradicted.
    pub inconsistent: u64,
    /// Contradictions per layer (a write can count in several).
    pub by_layer: BTreeMap<String, u64>,
}

impl DelayTally {
    /// The share of checked writes every layer agreed with; 1 when none were checked.
    pub fn ratio(&self) -> f64 {
        if self.checks == 0 {
            return 1.0;
        }
        1.0 - self.inconsistent as f64 / self.checks as f64
    }

    /// The ratio as nines (`-log10` of the inconsistent share); `None` when no check
    /// failed (then at least `log10(checks)` nines, which the report says).
    pub fn nines(&self) -> Option<f64> {
        (self.inconsistent > 0).then(|| -(self.inconsistent as f64 / self.checks as f64).log10())
    }
}

/// The fleet's tally, per delay.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConsistencyReport {
    /// Per delay.
    pub delays: BTreeMap<Duration, DelayTally>,
    /// The latest inconsistencies, newest first, as recorded.
    pub recent: Vec<String>,
}

impl ConsistencyReport {
    /// A table for operators.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if self.delays.is_empty() {
            out.push_str("no writes sampled yet (is the conversation service's sampler on?)\n");
            return out;
        }
        let _ = writeln!(
            out,
            "{:<8} {:>10} {:>13} {:>12} {:>7}  by layer",
            "WITHIN", "CHECKED", "INCONSISTENT", "CONSISTENT", "NINES"
        );
        for (delay, tally) in &self.delays {
            let nines = match tally.nines() {
                Some(n) => format!("{n:.2}"),
                None if tally.checks > 0 => format!(">={:.1}", (tally.checks as f64).log10()),
                None => "-".into(),
            };
            let layers = tally
                .by_layer
                .iter()
                .map(|(layer, n)| format!("{layer}={n}"))
                .collect::<Vec<_>>()
                .join(" ");
            let _ = writeln!(
                out,
                "{:<8} {:>10} {:>13} {:>11.4}% {:>7}  {}",
                format!("{:?}", delay),
                tally.checks,
                tally.inconsistent,
                tally.ratio() * 100.0,
                nines,
                if layers.is_empty() { "-" } else { &layers }
            );
        }
        if !self.recent.is_empty() {
            out.push_str("\nlatest inconsistencies (newest first):\n");
            for line in &self.recent {
                let _ = writeln!(out, "  {line}");
            }
        }
        out
    }
}

impl L2 {
    fn consistency_key(&self) -> String {
        format!("{}consistency", self.config.key_prefix)
    }

    fn consistency_recent_key(&self) -> String {
        format!("{}consistency:recent", self.config.key_prefix)
    }

    /// Adds one checked write to the tally of `delay`, with what contradicted it.
    pub async fn record_consistency(
        &self,
        delay: Duration,
        found: &[Inconsistency],
    ) -> Result<(), L2Error> {
        let ms = delay.as_millis();
        let hash = self.consistency_key();
        let mut pipe = redis::pipe();
        pipe.cmd("HINCRBY")
            .arg(&hash)
            .arg(format!("checks:{ms}"))
            .arg(1)
            .ignore();
        if !found.is_empty() {
            pipe.cmd("HINCRBY")
                .arg(&hash)
                .arg(format!("bad:{ms}"))
                .arg(1)
                .ignore();
            let recent = self.consistency_recent_key();
            for i in found {
                pipe.cmd("HINCRBY")
                    .arg(&hash)
                    .arg(format!("bad:{ms}:{}", i.layer))
                    .arg(1)
                    .ignore();
                pipe.cmd("LPUSH")
                    .arg(&recent)
                    .arg(format!(
                        "within={delay:?} layer={} key={} expected>=v{} found=v{}",
                        i.layer, i.key, i.expected, i.found
                    ))
                    .ignore();
            }
            pipe.cmd("LTRIM")
                .arg(&recent)
                .arg(0)
                .arg(RECENT_KEPT - 1)
                .ignore();
        }
        self.bounded("record_consistency", async {
            let mut conn = self.conn().await?;
            Ok(pipe.query_async::<()>(&mut conn).await?)
        })
        .await
    }

    /// The fleet's tally.
    pub async fn consistency_report(&self) -> Result<ConsistencyReport, L2Error> {
        let hash = self.consistency_key();
        let recent_key = self.consistency_recent_key();
        let (counters, recent): (Vec<(String, u64)>, Vec<String>) = self
            .bounded("consistency_report", async {
                let mut conn = self.conn().await?;
                let counters: BTreeMap<String, u64> = redis::cmd("HGETALL")
                    .arg(&hash)
                    .query_async(&mut conn)
                    .await?;
                let recent: Vec<String> = redis::cmd("LRANGE")
                    .arg(&recent_key)
                    .arg(0)
                    .arg(RECENT_KEPT - 1)
                    .query_async(&mut conn)
                    .await?;
                Ok((counters.into_iter().collect(), recent))
            })
            .await?;
        let mut report = ConsistencyReport {
            recent,
            ..ConsistencyReport::default()
        };
        for (field, count) in counters {
            let mut parts = field.splitn(3, ':');
            let (Some(kind), Some(ms)) = (parts.next(), parts.next()) else {
                continue;
            };
            let Ok(ms) = ms.parse::<u64>() else { continue };
            let tally = report.delays.entry(Duration::from_millis(ms)).or_default();
            match (kind, parts.next()) {
                ("checks", None) => tally.checks = count,
                ("bad", None) => tally.inconsistent = count,
                ("bad", Some(layer)) => {
                    tally.by_layer.insert(layer.to_owned(), count);
                }
                _ => {}
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nines_follow_the_inconsistent_share() {
        let tally = DelayTally {
            checks: 10_000,
            inconsistent: 1,
            by_layer: BTreeMap::new(),
        };
        assert!((tally.nines().unwrap() - 4.0).abs() < 1e-9);
        assert!((tally.ratio() - 0.9999).abs() < 1e-12);
        let clean = DelayTally {
            checks: 500,
            ..DelayTally::default()
        };
        assert_eq!(clean.nines(), None);
        assert_eq!(clean.ratio(), 1.0);
    }
}
