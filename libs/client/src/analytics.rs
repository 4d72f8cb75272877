//! The typed client of `convoy.v1.AnalyticsService`. Every call reads across a team (or
//! the fleet), so it carries the session's newest consistency token: a count read after
//! this session's write includes it, whatever the analytics cache holds.

use convoy_proto::v1 as pb;
use convoy_proto::v1::analytics_service_client::AnalyticsServiceClient;
use tonic::{IntoRequest, Response, Status};

use crate::session::{Scope, SharedSession};
use crate::{Stack, Transport};

/// AnalyticsService through the mesh; cheap to clone.
#[derive(Clone)]
pub struct AnalyticsClient {
    stack: Stack,
    inner: AnalyticsServiceClient<Transport>,
    session: SharedSession,
}

impl AnalyticsClient {
    pub(crate) fn new(stack: Stack, session: SharedSession) -> Self {
        let inner = AnalyticsServiceClient::new(stack.transport.clone());
        Self {
            stack,
            inner,
            session,
        }
    }
}

macro_rules! rpc {
    ($(#[$doc:meta])* $name:ident, $path:literal, $req:ty => $res:ty) => {
        $(#[$doc])*
        pub async fn $name(
            &self,
            request: impl IntoRequest<$req>,
        ) -> Result<Response<$res>, Status> {
            self.stack
                .call(
                    &self.inner,
                    &self.session,
                    concat!("/convoy.v1.AnalyticsService/", $path),
                    Scope::Team,
                    request,
                    |mut client: AnalyticsServiceClient<Transport>, request| async move {
                        client.$name(request).await
                    },
                )
                .await
        }
    };
}

impl AnalyticsClient {
    rpc!(
        /// GetTeamSummary.
        get_team_summary, "GetTeamSummary", pb::GetTeamSummaryRequest => pb::TeamSummary
    );
    rpc!(
        /// GetIntentBreakdown.
        get_intent_breakdown, "GetIntentBreakdown",
        pb::GetIntentBreakdownRequest => pb::IntentBreakdown
    );
    rpc!(
        /// GetTimeSeries.
        get_time_series, "GetTimeSeries", pb::GetTimeSeriesRequest => pb::TimeSeries
    );
    rpc!(
        /// GetMetadataBreakdown.
        get_metadata_breakdown, "GetMetadataBreakdown",
        pb::GetMetadataBreakdownRequest => pb::MetadataBreakdown
    );
    rpc!(
        /// GetFleetOverview (operators).
        get_fleet_overview, "GetFleetOverview",
        pb::GetFleetOverviewRequest => pb::FleetOverview
    );
}
