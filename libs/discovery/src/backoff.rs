//! The delays between retries that a [`Backoff`] describes, with jitter.
//!
//! Not here: deciding whether to retry (callers do, by [`crate::Error::is_transient`]).

use std::time::Duration;

use rand::Rng;

use crate::config::Backoff;

/// The smallest step, so a zero `initial` cannot make a retry loop spin.
const MIN_STEP: Duration = Duration::from_millis(1);

/// Produces successive retry delays; reset after a success.
#[derive(Debug)]
pub(crate) struct Delays {
    backoff: Backoff,
    step: Duration,
}

// === impl Delays ===

impl Delays {
    /// Delays that start at `backoff.initial`.
    pub(crate) fn new(backoff: Backoff) -> Self {
        let mut delays = Self {
            backoff,
            step: Duration::ZERO,
        };
        delays.reset();
        delays
    }

    /// Starts again from the initial delay.
    pub(crate) fn reset(&mut self) {
        self.step = self
            .backoff
            .initial
            .max(MIN_STEP)
            .min(self.backoff.max.max(MIN_STEP));
    }

    /// The next delay: the current step less a random part of up to half of it ("equal
    /// jitter"), then the step doubles up to the maximum.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (step * 2).min(self.backoff.max.max(MIN_STEP));
        let half = step / 2;
        step - rand::rng().random_range(Duration::ZERO..=half)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn delays_double_up_to_the_max_with_at_most_half_jitter() {
        let mut delays = Delays::new(Backoff {
            initial: ms(100),
            max: ms(1000),
        });
        for step in [100, 200, 400, 800, 1000, 1000] {
            let d = delays.next_delay();
            assert!(
                d >= ms(step / 2) && d <= ms(step),
                "{d:?} for step {step} ms"
            );
        }
        delays.reset();
        assert!(delays.next_delay() <= ms(100));
    }

    #[test]
    fn zero_initial_delay_still_waits() {
        let mut delays = Delays::new(Backoff {
            initial: Duration::ZERO,
            max: Duration::ZERO,
        });
        assert!(delays.next_delay() >= MIN_STEP / 2);
    }
}
