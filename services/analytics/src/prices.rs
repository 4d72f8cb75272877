//! The price table GetUsage estimates cost with: US dollars per million tokens of each
//! kind, per model, from a TOML file (`--prices`):
//!
//! ```toml
//! [models."claude-sonnet-4"]
//! input = 3.0
//! output = 15.0
//! cache_creation = 3.75
//! cache_read = 0.30
//! ```
//!
//! A model is priced by the longest entry its name starts with, so `claude-sonnet-4` prices
//! `claude-sonnet-4-20250514`. A model with no entry is reported unpriced (cost 0), never
//! guessed.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use convoy_proto::v1 as pb;
use serde::Deserialize;

/// Dollars per million tokens of each kind.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Prompt tokens.
    #[serde(default)]
    pub input: f64,
    /// Completion tokens.
    #[serde(default)]
    pub output: f64,
    /// Prompt tokens written to the provider's cache.
    #[serde(default)]
    pub cache_creation: f64,
    /// Prompt tokens read from the provider's cache.
    #[serde(default)]
    pub cache_read: f64,
}

/// Prices by model name (prefix).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Prices {
    /// By model name or prefix.
    #[serde(default)]
    pub models: BTreeMap<String, Price>,
}

impl Prices {
    /// Reads a price table; every price must be a finite, non-negative number.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the price table {}", path.display()))?;
        let prices: Self = toml::from_str(&text)
            .with_context(|| format!("{} is not a price table", path.display()))?;
        for (model, p) in &prices.models {
            for value in [p.input, p.output, p.cache_creation, p.cache_read] {
                anyhow::ensure!(
                    value.is_finite() && value >= 0.0,
                    "{}: model {model:?} has a price of {value}; prices are dollars per \
                     million tokens, 0 or more",
                    path.display()
                );
            }
        }
        Ok(prices)
    }

    /// The price of `model`: its longest matching entry.
    pub fn of(&self, model: &str) -> Option<&Price> {
        self.models
            .iter()
            .filter(|(prefix, _)| model.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, price)| price)
    }

    /// The estimated cost of `tokens` of `model`, and whether it is priced.
    pub fn cost(&self, model: &str, tokens: &pb::TokenUsage) -> (f64, bool) {
        match self.of(model) {
            None => (0.0, false),
            Some(p) => (
                (tokens.input_tokens as f64 * p.input
                    + tokens.output_tokens as f64 * p.output
                    + tokens.cache_creation_input_tokens as f64 * p.cache_creation
                    + tokens.cache_read_input_tokens as f64 * p.cache_read)
                    / 1e6,
                true,
            ),
        }
    }

    /// A fingerprint of the table: answers priced with it are cached under it.
    pub fn fingerprint(&self) -> u64 {
        let mut text = String::new();
        for (model, p) in &self.models {
            text.push_str(&format!(
                "{model}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1e}",
                p.input, p.output, p.cache_creation, p.cache_read
            ));
        }
        xxhash_rust::xxh3::xxh3_64(text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Prices {
        toml::from_str(
            r#"
            [models."claude-sonnet-4"]
            input = 3.0
            output = 15.0
            cache_creation = 3.75
            cache_read = 0.3
            [models."claude-sonnet-4-5"]
            input = 4.0
            "#,
        )
        .unwrap()
    }

    #[test]
    fn the_longest_prefix_prices_a_model() {
        let prices = table();
        assert_eq!(prices.of("claude-sonnet-4-20250514").unwrap().input, 3.0);
        assert_eq!(prices.of("claude-sonnet-4-5-20250929").unwrap().input, 4.0);
        assert!(prices.of("gpt-4o").is_none());
    }

    #[test]
    fn cost_is_tokens_times_price_per_million() {
        let tokens = pb::TokenUsage {
            input_tokens: 1_000_000,
            output_tokens: 100_000,
            cache_creation_input_tokens: 0,
            cache_read_input_tokens: 2_000_000,
        };
        let (cost, priced) = table().cost("claude-sonnet-4", &tokens);
        assert!(priced);
        assert!((cost - (3.0 + 1.5 + 0.6)).abs() < 1e-9, "{cost}");
        assert_eq!(table().cost("unknown", &tokens), (0.0, false));
        assert_ne!(table().fingerprint(), Prices::default().fingerprint());
    }
}
