//! Analytics requests become [`Query`] values here, or INVALID_ARGUMENT with every field
//! violation found. Past this module a query is known good: a team name parsed, a time
//! range that is ordered and bounded, enums known, limits clamped.

use chrono::{DateTime, TimeDelta, Utc};
use convoy_proto::names::parse_team_name;
use convoy_proto::v1 as pb;
use tonic_types::FieldViolation;

use crate::error::ApiError;
use crate::query::{Grouping, Query, Scope, Width, intent_text, status_text};

/// Longest time range one request covers: a year and a day.
pub const MAX_RANGE: TimeDelta = TimeDelta::days(366);
/// Most buckets one time series has.
pub const MAX_BUCKETS: i64 = 2000;
/// Rows a top-N request gets when it asks for 0.
pub const DEFAULT_LIMIT: u32 = 20;
/// Most rows a top-N request gets.
pub const MAX_LIMIT: u32 = 200;
/// Longest metadata key, in bytes: 128, the conversation API's own limit (no stored key is
/// longer).
pub const MAX_METADATA_KEY_BYTES: usize = 128;

/// Collects violations while a request is read.
#[derive(Default)]
struct Violations(Vec<FieldViolation>);

impl Violations {
    fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation::new(field, description));
    }

    fn finish<T>(self, value: impl FnOnce() -> T) -> Result<T, ApiError> {
        if self.0.is_empty() {
            Ok(value())
        } else {
            Err(ApiError::InvalidArgument(self.0))
        }
    }
}

/// GetTeamSummary.
pub fn team_summary(request: &pb::GetTeamSummaryRequest) -> Result<Query, ApiError> {
    team_query(
        request.filter.as_ref(),
        Grouping::Total,
        Violations::default(),
    )
}

/// GetIntentBreakdown.
pub fn intent_breakdown(request: &pb::GetIntentBreakdownRequest) -> Result<Query, ApiError> {
    team_query(
        request.filter.as_ref(),
        Grouping::Intent,
        Violations::default(),
    )
}

/// GetTimeSeries: at most [`MAX_BUCKETS`] buckets.
pub fn time_series(request: &pb::GetTimeSeriesRequest) -> Result<Query, ApiError> {
    let mut violations = Violations::default();
    let width = match pb::BucketWidth::try_from(request.bucket_width) {
        Ok(pb::BucketWidth::Hour) => Some(Width::Hour),
        Ok(pb::BucketWidth::Day) => Some(Width::Day),
        Ok(pb::BucketWidth::Unspecified) => {
            violations.add(
                "bucket_width",
                "is required: BUCKET_WIDTH_HOUR or BUCKET_WIDTH_DAY",
            );
            None
        }
        Err(_) => {
            violations.add(
                "bucket_width",
                format!("{} is not a known BucketWidth", request.bucket_width),
            );
            None
        }
    };
    let query = team_query(
        request.filter.as_ref(),
        Grouping::Bucket(width.unwrap_or(Width::Day)),
        violations,
    )?;
    let width = width.expect("a query is returned only without violations");
    let seconds = (query.end - query.start).num_seconds();
    let buckets = (seconds + width.seconds() - 1) / width.seconds();
    if buckets > MAX_BUCKETS {
        return Err(ApiError::invalid(
            "filter.end_time",
            format!(
                "the range spans {buckets} buckets of {}s; at most {MAX_BUCKETS} are allowed: \
                 shorten the range or use a wider bucket",
                width.seconds()
            ),
        ));
    }
    Ok(query)
}

/// GetMetadataBreakdown.
pub fn metadata_breakdown(request: &pb::GetMetadataBreakdownRequest) -> Result<Query, ApiError> {
    let mut violations = Violations::default();
    let key = request.key.trim();
    if key.is_empty() {
        violations.add("key", "is required: the metadata key to group by");
    } else if key.len() > MAX_METADATA_KEY_BYTES {
        violations.add(
            "key",
            format!("has {} bytes; at most {MAX_METADATA_KEY_BYTES}", key.len()),
        );
    }
    let limit = limit("limit", request.limit, &mut violations);
    team_query(
        request.filter.as_ref(),
        Grouping::TopMetadata {
            key: key.to_owned(),
            limit,
        },
        violations,
    )
}

/// GetUsage, priced with the table of fingerprint `prices`.
pub fn usage(request: &pb::GetUsageRequest, prices: u64) -> Result<Query, ApiError> {
    team_query(
        request.filter.as_ref(),
        Grouping::Usage { prices },
        Violations::default(),
    )
}

/// GetToolStats.
pub fn tool_stats(request: &pb::GetToolStatsRequest) -> Result<Query, ApiError> {
    let mut violations = Violations::default();
    let limit = limit("limit", request.limit, &mut violations);
    team_query(
        request.filter.as_ref(),
        Grouping::Tools { limit },
        violations,
    )
}

/// GetFleetOverview.
pub fn fleet_overview(request: &pb::GetFleetOverviewRequest) -> Result<Query, ApiError> {
    let mut violations = Violations::default();
    let limit = limit("limit", request.limit, &mut violations);
    let range = range(
        request.start_time.as_ref(),
        request.end_time.as_ref(),
        "",
        &mut violations,
    );
    violations.finish(|| {
        let (start, end) = range.expect("a range without violations");
        Query {
            scope: Scope::Fleet,
            start,
            end,
            intent: None,
            status: None,
            require_complete: request.require_complete,
            grouping: Grouping::TopTeams { limit },
        }
    })
}

/// A team-scoped query from `filter`, adding its violations to those already found.
fn team_query(
    filter: Option<&pb::AnalyticsFilter>,
    grouping: Grouping,
    mut violations: Violations,
) -> Result<Query, ApiError> {
    let Some(filter) = filter else {
        violations.add(
            "filter",
            "is required: parent, start_time and end_time at least",
        );
        return Err(ApiError::InvalidArgument(violations.0));
    };
    let team = match parse_team_name(&filter.parent) {
        Ok(team) => Some(team),
        Err(why) => {
            violations.add("filter.parent", why);
            None
        }
    };
    let range = range(
        filter.start_time.as_ref(),
        filter.end_time.as_ref(),
        "filter.",
        &mut violations,
    );
    let intent = match pb::Intent::try_from(filter.intent) {
        Ok(intent) => intent_text(intent),
        Err(_) => {
            violations.add(
                "filter.intent",
                format!("{} is not a known Intent", filter.intent),
            );
            None
        }
    };
    let status = match pb::ConversationStatus::try_from(filter.status) {
        Ok(status) => status_text(status),
        Err(_) => {
            violations.add(
                "filter.status",
                format!("{} is not a known ConversationStatus", filter.status),
            );
            None
        }
    };
    violations.finish(|| {
        let (start, end) = range.expect("a range without violations");
        Query {
            scope: Scope::Team(team.expect("a team without violations")),
            start,
            end,
            intent,
            status,
            require_complete: filter.require_complete,
            grouping,
        }
    })
}

/// `[start, end)`, both required, ordered, at most [`MAX_RANGE`] apart.
fn range(
    start: Option<&prost_types::Timestamp>,
    end: Option<&prost_types::Timestamp>,
    prefix: &str,
    violations: &mut Violations,
) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let start = timestamp(start, &format!("{prefix}start_time"), violations);
    let end = timestamp(end, &format!("{prefix}end_time"), violations);
    let (start, end) = (start?, end?);
    if end <= start {
        violations.add(
            format!("{prefix}end_time"),
            "must be after start_time (the range is [start_time, end_time))",
        );
        return None;
    }
    if end - start > MAX_RANGE {
        violations.add(
            format!("{prefix}end_time"),
            format!(
                "the range spans {} days; at most {} are allowed",
                (end - start).num_days(),
                MAX_RANGE.num_days()
            ),
        );
        return None;
    }
    Some((start, end))
}

fn timestamp(
    value: Option<&prost_types::Timestamp>,
    field: &str,
    violations: &mut Violations,
) -> Option<DateTime<Utc>> {
    let Some(value) = value else {
        violations.add(field, "is required");
        return None;
    };
    let parsed = u32::try_from(value.nanos)
        .ok()
        .filter(|nanos| *nanos < 1_000_000_000)
        .and_then(|nanos| DateTime::from_timestamp(value.seconds, nanos))
        // Postgres timestamptz covers 4713 BC to 294276 AD; the contract years 1 to 9999.
        .filter(|t| (1..=9999).contains(&chrono::Datelike::year(t)));
    if parsed.is_none() {
        violations.add(field, "is not a valid timestamp between years 1 and 9999");
    }
    parsed
}

/// A top-N limit: 0 means [`DEFAULT_LIMIT`], above [`MAX_LIMIT`] is clamped, negative is
/// invalid.
fn limit(field: &str, value: i32, violations: &mut Violations) -> u32 {
    match u32::try_from(value) {
        Ok(0) => DEFAULT_LIMIT,
        Ok(n) => n.min(MAX_LIMIT),
        Err(_) => {
            violations.add(
                field,
                format!("{value} is negative; 0 means {DEFAULT_LIMIT}"),
            );
            DEFAULT_LIMIT
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(seconds: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos: 0 })
    }

    fn filter(parent: &str, start: i64, end: i64) -> Option<pb::AnalyticsFilter> {
        Some(pb::AnalyticsFilter {
            parent: parent.into(),
            start_time: ts(start),
            end_time: ts(end),
            ..Default::default()
        })
    }

    fn fields(error: ApiError) -> Vec<String> {
        match error {
            ApiError::InvalidArgument(v) => v.into_iter().map(|v| v.field).collect(),
            other => panic!("not INVALID_ARGUMENT: {other}"),
        }
    }

    #[test]
    fn a_well_formed_summary_becomes_a_team_query() {
        let query = team_summary(&pb::GetTeamSummaryRequest {
            filter: filter("teams/acme", 0, 86_400),
        })
        .unwrap();
        assert_eq!(query.team().unwrap().as_str(), "acme");
        assert_eq!(query.grouping, Grouping::Total);
        assert_eq!((query.end - query.start).num_seconds(), 86_400);
    }

    #[test]
    fn every_violation_is_reported_with_its_field() {
        let error = team_summary(&pb::GetTeamSummaryRequest {
            filter: Some(pb::AnalyticsFilter {
                parent: "acme".into(),
                start_time: None,
                end_time: ts(10),
                intent: 99,
                status: -1,
                require_complete: false,
            }),
        })
        .unwrap_err();
        assert_eq!(
            fields(error),
            [
                "filter.parent",
                "filter.start_time",
                "filter.intent",
                "filter.status"
            ]
        );
        assert_eq!(
            fields(team_summary(&pb::GetTeamSummaryRequest { filter: None }).unwrap_err()),
            ["filter"]
        );
    }

    #[test]
    fn ranges_must_be_ordered_bounded_and_valid() {
        let summary = |start, end| {
            team_summary(&pb::GetTeamSummaryRequest {
                filter: filter("teams/acme", start, end),
            })
        };
        assert_eq!(fields(summary(10, 10).unwrap_err()), ["filter.end_time"]);
        assert_eq!(
            fields(summary(0, 367 * 86_400).unwrap_err()),
            ["filter.end_time"]
        );
        assert_eq!(
            fields(summary(i64::MAX, 0).unwrap_err()),
            ["filter.start_time"]
        );
        let bad_nanos = team_summary(&pb::GetTeamSummaryRequest {
            filter: Some(pb::AnalyticsFilter {
                parent: "teams/acme".into(),
                start_time: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -1,
                }),
                end_time: ts(10),
                ..Default::default()
            }),
        });
        assert_eq!(fields(bad_nanos.unwrap_err()), ["filter.start_time"]);
    }

    #[test]
    fn time_series_bounds_its_bucket_count() {
        let series = |width: pb::BucketWidth, days: i64| {
            time_series(&pb::GetTimeSeriesRequest {
                filter: filter("teams/acme", 0, days * 86_400),
                bucket_width: width as i32,
            })
        };
        assert!(series(pb::BucketWidth::Day, 366).is_ok());
        assert!(series(pb::BucketWidth::Hour, 83).is_ok());
        assert_eq!(
            fields(series(pb::BucketWidth::Hour, 84).unwrap_err()),
            ["filter.end_time"]
        );
        assert_eq!(
            fields(series(pb::BucketWidth::Unspecified, 1).unwrap_err()),
            ["bucket_width"]
        );
    }

    #[test]
    fn limits_default_clamp_and_refuse_negatives() {
        let fleet = |limit| {
            fleet_overview(&pb::GetFleetOverviewRequest {
                start_time: ts(0),
                end_time: ts(60),
                limit,
                require_complete: false,
            })
        };
        assert_eq!(
            fleet(0).unwrap().grouping,
            Grouping::TopTeams {
                limit: DEFAULT_LIMIT
            }
        );
        assert_eq!(
            fleet(5000).unwrap().grouping,
            Grouping::TopTeams { limit: MAX_LIMIT }
        );
        assert_eq!(fields(fleet(-1).unwrap_err()), ["limit"]);
        let metadata = metadata_breakdown(&pb::GetMetadataBreakdownRequest {
            filter: filter("teams/acme", 0, 60),
            key: " ".into(),
            limit: 0,
        });
        assert_eq!(fields(metadata.unwrap_err()), ["key"]);
    }
}
