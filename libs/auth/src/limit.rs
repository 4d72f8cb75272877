//! Per-team rate limits: one token bucket per team and role, so one team's burst cannot
//! starve another's calls.
//!
//! A bucket holds one period's worth of calls (`100/s` allows a burst of 100, refilled at
//! 100 a second). Services calling on their own behalf are not limited here (the users
//! they serve were, at the edge); a service acting for a user is counted as that user.

use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::claims::Role;

/// A rate: `count` calls per `per`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Calls per period (also the burst).
    pub count: NonZeroU32,
    /// The period.
    pub per: Duration,
}

impl FromStr for Rate {
    type Err = String;

    /// `100/s`, `30/m` or `1000/h`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (count, unit) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected COUNT/UNIT, e.g. 100/s"))?;
        let count: NonZeroU32 = count
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: the count must be a whole number above 0"))?;
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            other => return Err(format!("{s:?}: unit {other:?} is not s, m or h")),
        };
        Ok(Self { count, per })
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

/// The rate of each role; `None`: unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Per team, for readers.
    pub reader: Option<Rate>,
    /// Per team, for writers.
    pub writer: Option<Rate>,
    /// Per team (or for fleet calls), for admins.
    pub admin: Option<Rate>,
}

/// The buckets; see the module docs.
#[derive(Debug)]
pub struct RateLimits {
    reader: Option<DefaultKeyedRateLimiter<u64>>,
    writer: Option<DefaultKeyedRateLimiter<u64>>,
    admin: Option<DefaultKeyedRateLimiter<u64>>,
}

fn limiter(rate: Option<Rate>) -> Option<DefaultKeyedRateLimiter<u64>> {
    let rate = rate?;
    let period = rate.per / rate.count.get();
    let quota = Quota::with_period(period)?.allow_burst(rate.count);
    Some(RateLimiter::keyed(quota))
}

impl RateLimits {
    /// Buckets for `config`.
    pub fn new(config: RateLimitConfig) -> Self {
        Self {
            reader: limiter(config.reader),
            writer: limiter(config.writer),
            admin: limiter(config.admin),
        }
    }

    /// Takes a token from `team`'s bucket for `role`, or says how long until one is there.
    pub fn check(&self, team: &str, role: Role) -> Result<(), Duration> {
        let limiter = match role {
            Role::Reader => &self.reader,
            Role::Writer => &self.writer,
            Role::Admin => &self.admin,
            Role::Service => return Ok(()),
        };
        let Some(limiter) = limiter else {
            return Ok(());
        };
        // Keyed by the team's 64-bit hash, so a call allocates nothing (two teams share a
        // bucket only on a hash collision).
        limiter
            .check_key(&xxhash_rust::xxh3::xxh3_64(team.as_bytes()))
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// Forgets buckets that are full again (teams idle for a period), bounding memory to
    /// the teams active lately.
    pub fn shrink(&self) {
        for limiter in [&self.reader, &self.writer, &self.admin]
            .into_iter()
            .flatten()
        {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_refuse_nonsense() {
        assert_eq!(
            "100/s".parse::<Rate>().unwrap(),
            Rate {
                count: NonZeroU32::new(100).unwrap(),
                per: Duration::from_secs(1)
            }
        );
        assert_eq!("3/m".parse::<Rate>().unwrap().to_string(), "3/m");
        for bad in ["0/s", "10", "10/d", "x/s", "-1/s"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_team_past_its_burst_waits_and_other_teams_do_not() {
        let limits = RateLimits::new(RateLimitConfig {
            writer: Some("3/m".parse().unwrap()),
            ..RateLimitConfig::default()
        });
        for _ in 0..3 {
            assert_eq!(limits.check("acme", Role::Writer), Ok(()));
        }
        let wait = limits.check("acme", Role::Writer).unwrap_err();
        // One token comes back every 20 s.
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        assert_eq!(limits.check("globex", Role::Writer), Ok(()));
        // Readers have no limit here; services are never limited.
        assert_eq!(limits.check("acme", Role::Reader), Ok(()));
        assert_eq!(limits.check("acme", Role::Service), Ok(()));
    }
}
