//! `convoy.v1.AnalyticsService`: requests are validated into queries ([`crate::validate`]),
//! answered from the cache tier when it holds a fresh enough answer ([`crate::cached`]),
//! else scattered to the shards ([`crate::scatter`]) and merged here.

use std::collections::HashMap;

use convoy_proto::consistency::{ConsistencyToken, HEADER};
use convoy_proto::v1 as pb;
use convoy_proto::v1::analytics_service_server::AnalyticsService;
use prost::Message;
use tonic::{Request, Response, Status};

use crate::aggregate::{Groups, Partial, merge_groups};
use crate::cached::{AnswerCache, CachedAnswer, Lookup};
use crate::error::ApiError;
use crate::prices::Prices;
use crate::query::{Query, intent_of};
use crate::scatter::{Scatter, bucket_start};
use crate::validate;

/// The analytics API over the shards and the cache tier.
#[derive(Clone, Debug)]
pub struct AnalyticsApi {
    scatter: Scatter,
    cache: AnswerCache,
    prices: std::sync::Arc<Prices>,
}

/// A response that says which shards it covers.
trait Answer: Message + Default + Sized {
    fn coverage(&mut self) -> &mut Option<pb::Coverage>;
}

macro_rules! answers {
    ($($response:ty),+) => {
        $(impl Answer for $response {
            fn coverage(&mut self) -> &mut Option<pb::Coverage> {
                &mut self.coverage
            }
        })+
    };
}

answers!(
    pb::TeamSummary,
    pb::IntentBreakdown,
    pb::TimeSeries,
    pb::MetadataBreakdown,
    pb::FleetOverview,
    pb::UsageReport,
    pb::ToolStats
);

impl AnalyticsApi {
    /// Answers from `scatter`, cached in `cache`.
    pub fn new(scatter: Scatter, cache: AnswerCache) -> Self {
        Self {
            scatter,
            cache,
            prices: Default::default(),
        }
    }

    /// Estimates GetUsage's cost with `prices`.
    pub fn with_prices(mut self, prices: Prices) -> Self {
        self.prices = std::sync::Arc::new(prices);
        self
    }

    /// `query`'s answer, shaped by `build` from the merged figures: from the cache when it
    /// is fresh enough for `token`, else computed (and stored when complete).
    async fn answer<R: Answer>(
        &self,
        query: Query,
        token: Option<ConsistencyToken>,
        build: impl FnOnce(Groups) -> R,
    ) -> Result<R, ApiError> {
        let lease = match self.cache.lookup(&query, token.as_ref()).await {
            Lookup::Hit(cached) => match R::decode(cached.response.as_slice()) {
                Ok(mut response) => {
                    metrics::counter!("convoy_analytics_cache_total", "result" => "hit")
                        .increment(1);
                    if let Some(coverage) = response.coverage() {
                        coverage.cached = true;
                    }
                    return Ok(response);
                }
                Err(_) => Some(String::new()),
            },
            Lookup::Fill(lease) => Some(lease),
            Lookup::Bypass => None,
        };
        let result = if lease.is_some() { "miss" } else { "bypass" };
        metrics::counter!("convoy_analytics_cache_total", "result" => result).increment(1);

        let version = chrono::Utc::now().timestamp_millis();
        let gathered = self
            .scatter
            .gather(&query, token.as_ref(), lease.is_some())
            .await;
        let mut missing = gathered.missing;
        missing.sort();
        if query.require_complete && !missing.is_empty() {
            return Err(ApiError::Incomplete(missing));
        }
        let mut merged = Groups::new();
        let mut lsns = HashMap::new();
        let mut shards = Vec::new();
        for answer in &gathered.answers {
            merge_groups(&mut merged, &answer.groups);
            lsns.insert(answer.shard.clone(), answer.lsn);
            shards.push(answer.shard.clone());
        }
        shards.sort();
        if let Some(most) = query.grouping.max_groups()
            && merged.len() > most
        {
            return Err(ApiError::TooLarge {
                subject: "filter".into(),
                why: format!(
                    "the answer would have more than {most} rows, the most one answer holds: \
                     narrow the time range"
                ),
            });
        }
        let cacheable = missing.is_empty() && gathered.answers.iter().all(|a| a.fresh);
        let mut response = build(merged);
        *response.coverage() = Some(pb::Coverage {
            shards,
            missing_shards: missing,
            cached: false,
            compute_time: Some(timestamp(version)),
        });
        if let Some(lease) = lease
            && cacheable
        {
            let cached = CachedAnswer {
                response: response.encode_to_vec(),
                lsns,
            };
            self.cache.store(&query, &cached, version, lease).await;
        }
        Ok(response)
    }
}

/// A protobuf timestamp `millis` after the epoch.
fn timestamp(millis: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: millis.div_euclid(1000),
        nanos: (millis.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// The token a request presents, or INVALID_ARGUMENT naming the header.
fn token<T>(request: &Request<T>) -> Result<Option<ConsistencyToken>, ApiError> {
    ConsistencyToken::from_metadata(request.metadata()).map_err(|e| {
        ApiError::invalid(
            format!("metadata[{HEADER}]"),
            format!("{e}: pass the token exactly as a write returned it"),
        )
    })
}

/// Groups ordered by size, largest first (ties by name), at most `limit`.
fn top(groups: Groups, limit: u32) -> Vec<(String, Partial)> {
    let mut rows: Vec<_> = groups.into_iter().collect();
    rows.sort_by(|(a, pa), (b, pb)| pb.count.cmp(&pa.count).then_with(|| a.cmp(b)));
    rows.truncate(limit as usize);
    rows
}

#[tonic::async_trait]
impl AnalyticsService for AnalyticsApi {
    async fn get_team_summary(
        &self,
        request: Request<pb::GetTeamSummaryRequest>,
    ) -> Result<Response<pb::TeamSummary>, Status> {
        let token = token(&request)?;
        let query = validate::team_summary(request.get_ref())?;
        let answer = self
            .answer(query, token, |mut groups| pb::TeamSummary {
                aggregates: Some(groups.remove("").unwrap_or_default().to_proto()),
                coverage: None,
            })
            .await?;
        Ok(Response::new(answer))
    }

    async fn get_intent_breakdown(
        &self,
        request: Request<pb::GetIntentBreakdownRequest>,
    ) -> Result<Response<pb::IntentBreakdown>, Status> {
        let token = token(&request)?;
        let query = validate::intent_breakdown(request.get_ref())?;
        let answer = self
            .answer(query, token, |groups| {
                let mut rows: Vec<pb::IntentRow> = groups
                    .into_iter()
                    .map(|(intent, partial)| pb::IntentRow {
                        intent: intent_of(&intent) as i32,
                        aggregates: Some(partial.to_proto()),
                    })
                    .collect();
                rows.sort_by_key(|row| row.intent);
                pb::IntentBreakdown {
                    rows,
                    coverage: None,
                }
            })
            .await?;
        Ok(Response::new(answer))
    }

    async fn get_time_series(
        &self,
        request: Request<pb::GetTimeSeriesRequest>,
    ) -> Result<Response<pb::TimeSeries>, Status> {
        let token = token(&request)?;
        let query = validate::time_series(request.get_ref())?;
        let answer = self
            .answer(query, token, |groups| {
                let mut buckets: Vec<(i64, pb::TimeBucket)> = groups
                    .into_iter()
                    .filter_map(|(group, partial)| {
                        let start = bucket_start(&group)?;
                        Some((
                            start.timestamp(),
                            pb::TimeBucket {
                                start_time: Some(timestamp(start.timestamp_millis())),
                                aggregates: Some(partial.to_proto()),
                            },
                        ))
                    })
                    .collect();
                buckets.sort_by_key(|(start, _)| *start);
                pb::TimeSeries {
                    buckets: buckets.into_iter().map(|(_, bucket)| bucket).collect(),
                    coverage: None,
                }
            })
            .await?;
        Ok(Response::new(answer))
    }

    async fn get_usage(
        &self,
        request: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::UsageReport>, Status> {
        let token = token(&request)?;
        let query = validate::usage(request.get_ref(), self.prices.fingerprint())?;
        let prices = self.prices.clone();
        let answer = self
            .answer(query, token, |groups| {
                let mut rows: Vec<(i64, pb::UsageRow)> = groups
                    .into_iter()
                    .filter_map(|(group, partial)| {
                        let (day, model) = group.split_once('|')?;
                        let start = bucket_start(day)?;
                        let token_usage = partial.token_usage();
                        let (estimated_cost_usd, priced) = prices.cost(model, &token_usage);
                        Some((
                            start.timestamp(),
                            pb::UsageRow {
                                day: Some(timestamp(start.timestamp_millis())),
                                model: model.to_owned(),
                                token_usage: Some(token_usage),
                                estimated_cost_usd,
                                priced,
                            },
                        ))
                    })
                    .collect();
                rows.sort_by(|(a, ra), (b, rb)| a.cmp(b).then_with(|| ra.model.cmp(&rb.model)));
                pb::UsageReport {
                    rows: rows.into_iter().map(|(_, row)| row).collect(),
                    coverage: None,
                }
            })
            .await?;
        Ok(Response::new(answer))
    }

    async fn get_tool_stats(
        &self,
        request: Request<pb::GetToolStatsRequest>,
    ) -> Result<Response<pb::ToolStats>, Status> {
        let token = token(&request)?;
        let query = validate::tool_stats(request.get_ref())?;
        let limit = query.grouping.limit() as usize;
        let answer = self
            .answer(query, token, |groups| {
                let mut rows: Vec<pb::ToolRow> = groups
                    .into_iter()
                    .map(|(tool_name, partial)| pb::ToolRow {
                        tool_name,
                        call_count: partial.calls,
                        error_count: partial.errors,
                    })
                    .collect();
                rows.sort_by(|a, b| {
                    b.call_count
                        .cmp(&a.call_count)
                        .then_with(|| a.tool_name.cmp(&b.tool_name))
                });
                rows.truncate(limit);
                pb::ToolStats {
                    rows,
                    coverage: None,
                }
            })
            .await?;
        Ok(Response::new(answer))
    }

    async fn get_metadata_breakdown(
        &self,
        request: Request<pb::GetMetadataBreakdownRequest>,
    ) -> Result<Response<pb::MetadataBreakdown>, Status> {
        let token = token(&request)?;
        let query = validate::metadata_breakdown(request.get_ref())?;
        let limit = query.grouping.limit();
        let answer = self
            .answer(query, token, |groups| pb::MetadataBreakdown {
                rows: top(groups, limit)
                    .into_iter()
                    .map(|(value, partial)| pb::MetadataRow {
                        value,
                        aggregates: Some(partial.to_proto()),
                    })
                    .collect(),
                coverage: None,
            })
            .await?;
        Ok(Response::new(answer))
    }

    async fn get_fleet_overview(
        &self,
        request: Request<pb::GetFleetOverviewRequest>,
    ) -> Result<Response<pb::FleetOverview>, Status> {
        let token = token(&request)?;
        let query = validate::fleet_overview(request.get_ref())?;
        let limit = query.grouping.limit();
        let answer = self
            .answer(query, token, |groups| pb::FleetOverview {
                rows: top(groups, limit)
                    .into_iter()
                    .map(|(team, partial)| pb::TeamRow {
                        team: format!("teams/{team}"),
                        aggregates: Some(partial.to_proto()),
                    })
                    .collect(),
                coverage: None,
            })
            .await?;
        Ok(Response::new(answer))
    }
}
