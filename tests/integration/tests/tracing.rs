//! One trace across the fleet: spans exported over OTLP to a receiver in this process, joined
//! by the `traceparent` every hop carries. SDK → conversation → cache tier → Postgres, and
//! SDK → analytics → every shard, each span under the right parent.

use convoy_client::{ClientConfig, ConvoyClient, Discovery};
use convoy_integration_tests::otlp::{OtlpReceiver, ReceivedSpan};
use convoy_integration_tests::{CacheInstance, Fleet, new_conversation};
use convoy_proto::v1 as pb;
use convoy_telemetry::trace::Traces;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

const SERVER: i32 = 2;
const CLIENT: i32 = 3;

/// The one span of `spans` named `name` of `kind` whose parent is `parent`.
fn child<'a>(
    spans: &'a [ReceivedSpan],
    parent: &ReceivedSpan,
    name: &str,
    kind: i32,
) -> &'a ReceivedSpan {
    let found: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.span.name == name && s.span.kind == kind)
        .filter(|s| s.span.parent_span_id == parent.span.span_id)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one {name} (kind {kind}) under {}: {:#?}",
        parent.span.name,
        spans
            .iter()
            .map(|s| (&s.span.name, s.span.kind))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        found[0].span.trace_id, parent.span.trace_id,
        "{name} is in the trace"
    );
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_holds_the_sdk_the_services_the_cache_and_the_database() {
    let (receiver, endpoint) = OtlpReceiver::start().await;
    let traces = Traces::export_to(&endpoint, "convoy-tests").unwrap();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(traces.layer()))
        .unwrap();

    let redis = convoy_testkit::Redis::start().await.unwrap();
    let url = redis.url();
    let cache = CacheInstance::start(&url, &[]).await;
    let cache_addr = cache.addr.to_string();
    let fleet = Fleet::start_with(2, &["--redis-url", &url, "--cache-addr", &cache_addr]).await;
    let analytics = fleet.start_analytics(&[]).await;
    let sdk = |addr: String| {
        ConvoyClient::connect(Discovery::Static(vec![addr]), ClientConfig::default()).unwrap()
    };
    let conversations = sdk(fleet.addr.to_string()).conversations();
    let created = conversations
        .create_conversation(new_conversation("acme", "traced", ""))
        .await
        .unwrap()
        .into_inner();

    // A Get that misses every cache: conversation asks the cache tier, then the database.
    let get = tracing::info_span!("test.get");
    conversations
        .get_conversation(pb::GetConversationRequest {
            name: created.name.clone(),
        })
        .instrument(get.clone())
        .await
        .unwrap();
    drop(get);
    // The fleet's busiest teams: analytics asks both shards.
    let fleet_view = tracing::info_span!("test.fleet");
    let now = chrono::Utc::now().timestamp();
    sdk(analytics.addr.to_string())
        .analytics()
        .get_fleet_overview(pb::GetFleetOverviewRequest {
            start_time: Some(prost_types::Timestamp {
                seconds: now - 60,
                nanos: 0,
            }),
            end_time: Some(prost_types::Timestamp {
                seconds: now + 60,
                nanos: 0,
            }),
            limit: 5,
            require_complete: true,
        })
        .instrument(fleet_view.clone())
        .await
        .unwrap();
    drop(fleet_view);
    traces.flush();

    let spans = receiver.spans();
    let root = |name: &str| {
        spans
            .iter()
            .find(|s| s.span.name == name)
            .unwrap_or_else(|| panic!("no {name} span among {} exported", spans.len()))
            .clone()
    };
    let get = root("test.get");
    let in_trace: Vec<ReceivedSpan> = spans
        .iter()
        .filter(|s| s.span.trace_id == get.span.trace_id)
        .cloned()
        .collect();
    let method = "convoy.v1.ConversationService/GetConversation";
    let sdk_call = child(&in_trace, &get, method, CLIENT);
    let served = child(&in_trace, sdk_call, method, SERVER);
    assert_eq!(served.attribute("rpc.system").as_deref(), Some("grpc"));
    assert_eq!(
        served.attribute("rpc.method").as_deref(),
        Some("GetConversation")
    );
    let lease = child(&in_trace, served, "convoy.v1.CacheService/Lease", CLIENT);
    child(&in_trace, lease, "convoy.v1.CacheService/Lease", SERVER);
    let db = child(&in_trace, served, "postgresql", CLIENT);
    assert_eq!(
        db.attribute("db.system.name").as_deref(),
        Some("postgresql")
    );
    let shard = format!("shard-{}", fleet.map.owner_of_team("acme"));
    assert_eq!(db.attribute("db.namespace"), Some(shard));

    let fleet_view = root("test.fleet");
    let in_trace: Vec<ReceivedSpan> = spans
        .iter()
        .filter(|s| s.span.trace_id == fleet_view.span.trace_id)
        .cloned()
        .collect();
    let method = "convoy.v1.AnalyticsService/GetFleetOverview";
    let sdk_call = child(&in_trace, &fleet_view, method, CLIENT);
    let served = child(&in_trace, sdk_call, method, SERVER);
    let mut shards: Vec<String> = in_trace
        .iter()
        .filter(|s| s.span.name == "postgresql" && s.span.parent_span_id == served.span.span_id)
        .filter_map(|s| s.attribute("db.namespace"))
        .collect();
    shards.sort();
    assert_eq!(
        shards,
        ["shard-0", "shard-1"],
        "one database span per shard"
    );
}
