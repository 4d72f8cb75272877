//! Partial aggregates: what one shard answers for one group, and how answers merge.
//!
//! Counts and sums merge exactly. Duration quantiles come from a DDSketch
//! (`sketches-ddsketch`, DataDog's algorithm): every value lands in a logarithmic bin
//! `floor(ln(v) / ln(γ))` with `γ = (1 + α) / (1 - α)`, and any quantile it reports is
//! within relative error `α` of the true value at that rank. The bins are computed by the
//! shard itself, in SQL, with the same formula (so a shard sends at most a couple of
//! thousand `(bin, count)` pairs per group, never its rows), and each pair goes into the
//! sketch at the bin's representative value, which maps back to the same bin. Sketches
//! of different shards merge bin by bin, so the merged answer has the same error bound as
//! one sketch over all the rows.
//!
//! Counts and sums saturate at i64::MAX rather than overflow: the shards cap their sums
//! there too (a team's token sums can pass i64 only with absurd data, but no request may
//! turn that into an error), so a figure of i64::MAX reads "at least this much".

use std::collections::HashMap;

use convoy_proto::v1 as pb;
use sketches_ddsketch::{Config, DDSketch};

use crate::query::{STATUSES, status_of};

/// The sketch's relative error: 1%, DDSketch's customary setting.
pub const RELATIVE_ERROR: f64 = 0.01;
/// Most bins per sketch. 2048 covers durations from a nanosecond to decades at 1% without
/// collapsing a bin.
const MAX_BINS: u32 = 2048;
/// Values at or below this are counted as zero (a conversation without events lasts 0 s).
pub const MIN_VALUE: f64 = 1e-9;

/// The sketch configuration every partial uses (merging needs one configuration).
pub fn sketch_config() -> Config {
    Config::new(RELATIVE_ERROR, MAX_BINS, MIN_VALUE)
}

/// `ln(γ)`: the divisor of the bin formula, sent to the shards as a parameter.
pub fn gamma_ln() -> f64 {
    ((1.0 + RELATIVE_ERROR) / (1.0 - RELATIVE_ERROR)).ln()
}

/// One group's figures from one or more shards.
#[derive(Clone)]
pub struct Partial {
    /// Conversations.
    pub count: i64,
    /// Conversations per status, in [`STATUSES`] order.
    pub by_status: [i64; 4],
    /// Sum of message counts.
    pub messages: i64,
    /// Sum of durations, in seconds.
    pub duration_sum: f64,
    /// Sum of effectiveness scores, over the scored conversations.
    pub effectiveness_sum: f64,
    /// Conversations with a score.
    pub scored: i64,
    /// Durations, sketched.
    pub durations: DDSketch,
    /// Event groupings: tokens by kind (input, output, cache creation, cache read).
    pub tokens: [i64; 4],
    /// Event groupings: tool calls.
    pub calls: i64,
    /// Event groupings: tool results flagged as errors.
    pub errors: i64,
}

impl std::fmt::Debug for Partial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partial")
            .field("count", &self.count)
            .field("by_status", &self.by_status)
            .field("sketched", &self.durations.count())
            .finish_non_exhaustive()
    }
}

impl Default for Partial {
    fn default() -> Self {
        Self {
            count: 0,
            by_status: [0; 4],
            messages: 0,
            duration_sum: 0.0,
            effectiveness_sum: 0.0,
            scored: 0,
            durations: DDSketch::new(sketch_config()),
            tokens: [0; 4],
            calls: 0,
            errors: 0,
        }
    }
}

impl Partial {
    /// Adds the figures of the conversations with `status` (its stored text).
    pub fn add_status(&mut self, status: &str, figures: StatusFigures) {
        if let Some(i) = STATUSES.iter().position(|s| *s == status) {
            add(&mut self.by_status[i], figures.count);
        }
        add(&mut self.count, figures.count);
        add(&mut self.messages, figures.messages);
        self.duration_sum += figures.duration_sum;
        self.effectiveness_sum += figures.effectiveness_sum;
        add(&mut self.scored, figures.scored);
    }

    /// Adds a shard's figures of events: how many, tool calls, failed tool results and
    /// tokens by kind (input, output, cache creation, cache read).
    pub fn add_events(&mut self, events: i64, calls: i64, errors: i64, tokens: [i64; 4]) {
        add(&mut self.count, events);
        add(&mut self.calls, calls);
        add(&mut self.errors, errors);
        for (mine, theirs) in self.tokens.iter_mut().zip(tokens) {
            add(mine, theirs);
        }
    }

    /// Adds `count` durations in sketch bin `bin` (None: durations of zero).
    pub fn add_bin(&mut self, bin: Option<i32>, count: i64) {
        let Ok(count) = u64::try_from(count) else {
            return;
        };
        let value = bin.map_or(0.0, |bin| sketch_config().value(bin));
        self.durations.add_with_count(value, count);
    }

    /// Merges `other` (another shard's figures for the same group) into this one.
    pub fn merge(&mut self, other: &Partial) {
        add(&mut self.count, other.count);
        for (mine, theirs) in self.by_status.iter_mut().zip(other.by_status) {
            add(mine, theirs);
        }
        add(&mut self.messages, other.messages);
        self.duration_sum += other.duration_sum;
        self.effectiveness_sum += other.effectiveness_sum;
        add(&mut self.scored, other.scored);
        self.durations
            .merge(&other.durations)
            .expect("every partial uses sketch_config()");
        for (mine, theirs) in self.tokens.iter_mut().zip(other.tokens) {
            add(mine, theirs);
        }
        add(&mut self.calls, other.calls);
        add(&mut self.errors, other.errors);
    }

    /// The tokens on the wire.
    pub fn token_usage(&self) -> pb::TokenUsage {
        let [input, output, creation, read] = self.tokens;
        pb::TokenUsage {
            input_tokens: input,
            output_tokens: output,
            cache_creation_input_tokens: creation,
            cache_read_input_tokens: read,
        }
    }

    /// The figures on the wire.
    pub fn to_proto(&self) -> pb::Aggregates {
        let quantile = |q| self.durations.quantile(q).ok().flatten().unwrap_or(0.0);
        let mean = |sum: f64, n: i64| if n > 0 { sum / n as f64 } else { 0.0 };
        pb::Aggregates {
            conversation_count: self.count,
            by_status: STATUSES
                .iter()
                .zip(self.by_status)
                .filter(|(_, count)| *count > 0)
                .map(|(status, count)| pb::StatusCount {
                    status: status_of(status) as i32,
                    count,
                })
                .collect(),
            message_total: self.messages,
            mean_duration_seconds: mean(self.duration_sum, self.count),
            p50_duration_seconds: quantile(0.5),
            p95_duration_seconds: quantile(0.95),
            p99_duration_seconds: quantile(0.99),
            mean_effectiveness: mean(self.effectiveness_sum, self.scored),
            scored_count: self.scored,
            quantile_relative_error: RELATIVE_ERROR,
        }
    }
}

/// Adds `n` to `total`, saturating at the bounds of i64 (see the module docs).
fn add(total: &mut i64, n: i64) {
    *total = total.saturating_add(n);
}

/// The figures of one status in one group, as a shard sums them.
#[derive(Clone, Copy, Debug, Default)]
pub struct StatusFigures {
    /// Conversations.
    pub count: i64,
    /// Sum of message counts.
    pub messages: i64,
    /// Sum of durations.
    pub duration_sum: f64,
    /// Sum of effectiveness scores.
    pub effectiveness_sum: f64,
    /// Conversations with a score.
    pub scored: i64,
}

/// Figures per group (an intent, a bucket's start, a team, a metadata value; "" for the
/// total), from one shard or merged from several.
pub type Groups = HashMap<String, Partial>;

/// Merges `from` into `into`, group by group.
pub fn merge_groups(into: &mut Groups, from: &Groups) {
    for (group, partial) in from {
        into.entry(group.clone()).or_default().merge(partial);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the shard's SQL computes for one value.
    fn bin_of(v: f64) -> Option<i32> {
        (v > MIN_VALUE).then(|| (v.ln() / gamma_ln()).floor() as i32)
    }

    fn partial_of(values: &[f64]) -> Partial {
        let mut p = Partial::default();
        for v in values {
            p.add_bin(bin_of(*v), 1);
        }
        p
    }

    fn exact(sorted: &[f64], q: f64) -> f64 {
        sorted[(q * (sorted.len() as f64 - 1.0)) as usize]
    }

    #[test]
    fn bins_from_sql_give_quantiles_within_the_stated_error() {
        // Durations from 0 to about 3 hours, skewed like real sessions.
        let values: Vec<f64> = (0..5000)
            .map(|i| {
                if i % 50 == 0 {
                    0.0
                } else {
                    (i as f64).powf(1.3) * 0.17
                }
            })
            .collect();
        let mut sorted = values.clone();
        sorted.sort_by(f64::total_cmp);
        let p = partial_of(&values);
        for q in [0.5, 0.95, 0.99] {
            let got = p.durations.quantile(q).unwrap().unwrap();
            let want = exact(&sorted, q);
            assert!(
                (got - want).abs() <= RELATIVE_ERROR * want + 1e-12,
                "q{q}: sketch {got}, exact {want}"
            );
        }
    }

    #[test]
    fn merged_shards_equal_one_sketch_over_all_rows() {
        let a: Vec<f64> = (1..400).map(|i| i as f64 * 1.7).collect();
        let b: Vec<f64> = (1..900).map(|i| 3.0 + i as f64 * 0.3).collect();
        let mut merged = partial_of(&a);
        merged.merge(&partial_of(&b));
        let all: Vec<f64> = a.iter().chain(&b).copied().collect();
        let whole = partial_of(&all);
        for q in [0.1, 0.5, 0.9, 0.99] {
            assert_eq!(
                merged.durations.quantile(q).unwrap(),
                whole.durations.quantile(q).unwrap()
            );
        }
    }

    #[test]
    fn status_figures_sum_exactly_and_means_ignore_unscored() {
        let mut p = Partial::default();
        let figures = |count, scored| StatusFigures {
            count,
            messages: count * 3,
            duration_sum: count as f64 * 10.0,
            effectiveness_sum: scored as f64 * 0.5,
            scored,
        };
        p.add_status("active", figures(4, 0));
        p.add_status("completed", figures(6, 2));
        let wire = p.to_proto();
        assert_eq!(wire.conversation_count, 10);
        assert_eq!(wire.message_total, 30);
        assert_eq!(wire.mean_duration_seconds, 10.0);
        assert_eq!(wire.mean_effectiveness, 0.5);
        assert_eq!(wire.scored_count, 2);
        assert_eq!(
            wire.by_status
                .iter()
                .map(|s| (s.status, s.count))
                .collect::<Vec<_>>(),
            [
                (pb::ConversationStatus::Active as i32, 4),
                (pb::ConversationStatus::Completed as i32, 6)
            ]
        );
        assert_eq!(Partial::default().to_proto().mean_duration_seconds, 0.0);
    }

    #[test]
    fn sums_past_i64_saturate_instead_of_overflowing() {
        let mut shard_a = Partial::default();
        shard_a.add_events(i64::MAX, 1, 0, [i64::MAX, 7, 0, 0]);
        shard_a.add_events(5, 0, 0, [i64::MAX, 0, 0, 0]);
        let mut shard_b = Partial::default();
        shard_b.add_status(
            "active",
            StatusFigures {
                count: i64::MAX,
                messages: i64::MAX,
                ..StatusFigures::default()
            },
        );
        shard_b.add_events(0, 0, 0, [i64::MAX, 0, 0, 0]);
        let mut merged = Partial::default();
        merged.merge(&shard_a);
        merged.merge(&shard_b);
        merged.merge(&shard_b);
        assert_eq!(merged.count, i64::MAX);
        assert_eq!(merged.by_status[0], i64::MAX);
        assert_eq!(merged.messages, i64::MAX);
        assert_eq!(merged.tokens, [i64::MAX, 7, 0, 0]);
        assert_eq!(merged.token_usage().input_tokens, i64::MAX);
        assert_eq!(merged.to_proto().message_total, i64::MAX);
    }
}
