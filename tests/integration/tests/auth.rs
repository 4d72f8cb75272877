//! Who may call what: every RPC of every service, called with no token, an expired one,
//! another team's, and a reader's where more is needed, gets exactly the status the policy
//! says; the same RPC with the right token gets through. Plus rate limits per team, a
//! service's calls to the cache tier bounded by the user it acts for, and every RPC fuzzed
//! (decode, validate, authorize): precise refusals that write nothing (seeded;
//! `CONVOY_FUZZ_SEED=N` replays a failure's seed).

use std::collections::BTreeSet;
use std::str::FromStr;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use convoy_auth::{AUDIENCE, Claims, ERROR_DOMAIN, Role, SUBJECT_HEADER, Signer};
use convoy_integration_tests::{
    CacheInstance, Fleet, Router, authorized, channel_to, message, new_conversation,
};
use convoy_proto::v1 as pb;
use convoy_store::ShardMap;
use convoy_testkit::{Etcd, Redis};
use prost::Message;
use prost::encoding::WireType;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic_types::StatusExt;

/// Sends and receives messages as encoded bytes, so one table can call every method.
#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Unary,
    ServerStream,
    ClientStream,
}

/// Headers of one call.
#[derive(Clone, Default)]
struct As {
    token: Option<String>,
    subject: Option<String>,
}

fn bearer(token: &str) -> As {
    As {
        token: Some(token.to_owned()),
        subject: None,
    }
}

async fn call(
    channel: &Channel,
    path: &str,
    shape: Shape,
    body: Bytes,
    who: &As,
) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = http::uri::PathAndQuery::from_str(path).expect("path");
    let decorate = |metadata: &mut tonic::metadata::MetadataMap| {
        if let Some(token) = &who.token {
            metadata.insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        if let Some(subject) = &who.subject {
            metadata.insert(SUBJECT_HEADER, format!("Bearer {subject}").parse().unwrap());
        }
    };
    match shape {
        Shape::Unary => {
            let mut request = tonic::Request::new(body);
            decorate(request.metadata_mut());
            grpc.unary(request, path, Raw).await.map(drop)
        }
        Shape::ServerStream => {
            let mut request = tonic::Request::new(body);
            decorate(request.metadata_mut());
            grpc.server_streaming(request, path, Raw).await.map(drop)
        }
        Shape::ClientStream => {
            let mut request = tonic::Request::new(tokio_stream::iter([body]));
            decorate(request.metadata_mut());
            grpc.client_streaming(request, path, Raw).await.map(drop)
        }
    }
}

fn reason(status: &tonic::Status) -> Option<String> {
    status
        .get_details_error_info()
        .filter(|info| info.domain == ERROR_DOMAIN)
        .map(|info| info.reason)
}

/// What the right token gets.
#[derive(Clone, Copy, Debug)]
enum Outcome {
    Ok,
    /// Past authorization, refused by the handler with this code (the request is valid for
    /// the policy but not for the fleet's state, e.g. moving slots to an unknown shard).
    Handler(Code),
}

/// One row: a method, its request (about team `acme`), and the tokens of the matrix.
struct Row {
    channel: Channel,
    path: &'static str,
    shape: Shape,
    body: Bytes,
    /// A caller that may make this call.
    right: As,
    /// The same caller's role for another team (None for fleet-scoped calls).
    other_team: Option<As>,
    /// A caller whose role is too weak (None when readers may make the call).
    weak: Option<As>,
    outcome: Outcome,
}

struct Tokens {
    signer: Signer,
    service: String,
}

impl Tokens {
    fn mint(&self, role: Role, teams: &[&str]) -> String {
        let teams: Vec<String> = teams.iter().map(|t| (*t).to_owned()).collect();
        self.signer
            .mint("tester", &teams, role, Duration::from_secs(3600))
            .unwrap()
    }

    /// A token with the fleet-wide grant, which fleet-scoped RPCs need.
    fn mint_fleet(&self, role: Role, teams: &[&str]) -> String {
        let teams: Vec<String> = teams.iter().map(|t| (*t).to_owned()).collect();
        self.signer
            .mint_fleet("tester", &teams, role, Duration::from_secs(3600))
            .unwrap()
    }

    fn expired(&self) -> String {
        self.signer
            .sign(&Claims {
                sub: "tester".into(),
                teams: vec!["*".into()],
                role: Role::Admin,
                exp: 1_000_000,
                iat: 0,
                aud: AUDIENCE.into(),
                fleet: true,
            })
            .unwrap()
    }

    fn acting(&self, role: Role, team: &str) -> As {
        As {
            token: Some(self.service.clone()),
            subject: Some(self.mint(role, &[team])),
        }
    }
}

fn enc(message: impl Message) -> Bytes {
    Bytes::from(message.encode_to_vec())
}

fn filter() -> Option<pb::AnalyticsFilter> {
    let now = chrono::Utc::now().timestamp();
    Some(pb::AnalyticsFilter {
        parent: "teams/acme".into(),
        start_time: Some(prost_types::Timestamp {
            seconds: now - 86_400,
            nanos: 0,
        }),
        end_time: Some(prost_types::Timestamp {
            seconds: now + 60,
            nanos: 0,
        }),
        ..Default::default()
    })
}

/// The fleet under test: every service with authorization on, sharing one key directory.
struct Secured {
    fleet: Fleet,
    analytics: convoy_integration_tests::Instance,
    cache: CacheInstance,
    router: Router,
    _etcd: Etcd,
    redis: Redis,
    tokens: Tokens,
    _dir: tempfile::TempDir,
}

/// The fleet, with `extra` flags (authorization's: rate limits) on every service.
async fn secured(extra: &[&str]) -> Secured {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let pair = convoy_auth::generate_key_pair().unwrap();
    std::fs::write(keys.join("test-1.pem"), &pair.public_pem).unwrap();
    let signer = Signer::from_pem("test-1", pair.private_pem.as_bytes()).unwrap();
    let service = signer
        .mint_fleet(
            "fleet",
            &["*".to_owned()],
            Role::Service,
            Duration::from_secs(3600),
        )
        .unwrap();
    let token_file = dir.path().join("service.token");
    std::fs::write(&token_file, &service).unwrap();
    let keys = keys.display().to_string();
    let token_file = token_file.display().to_string();
    let mut auth = vec![
        "--auth-keys",
        keys.as_str(),
        "--auth-token-file",
        token_file.as_str(),
    ];
    auth.extend(extra);

    let redis = Redis::start().await.unwrap();
    let etcd = Etcd::start().await.unwrap();
    let cache = CacheInstance::start_with_token(&redis.url(), &auth, Some(&service)).await;
    let cache_addr = cache.addr.to_string();
    let redis_url = redis.url();
    let mut flags: Vec<&str> = auth.clone();
    flags.extend(["--redis-url", &redis_url, "--cache-addr", &cache_addr]);
    let fleet = Fleet::start_with(1, &flags).await;
    let analytics = fleet.start_analytics(&auth).await;
    let seed = ShardMap::evenly(&fleet.shards.iter().map(|s| s.dsn()).collect::<Vec<_>>()).unwrap();
    let router = Router::start_with_token(&etcd.endpoint(), &seed, &auth, Some(&service)).await;
    Secured {
        fleet,
        analytics,
        cache,
        router,
        _etcd: etcd,
        redis,
        tokens: Tokens { signer, service },
        _dir: dir,
    }
}

/// Calls `row` as `who`; asserts it is refused with `code`, and returns the reason.
async fn refused(row: &Row, who: &As, code: Code, why: &str) -> String {
    let status = call(&row.channel, row.path, row.shape, row.body.clone(), who)
        .await
        .expect_err(&format!("{} with {why} is refused", row.path));
    assert_eq!(status.code(), code, "{} with {why}: {status:?}", row.path);
    reason(&status).unwrap_or_else(|| panic!("{} with {why}: no ErrorInfo: {status:?}", row.path))
}

/// The matrix: a row for every RPC of the contract, and the callers the tests use.
struct Matrix {
    rows: Vec<Row>,
    writer: As,
    reader: As,
    cache: Channel,
    service_for_writer: As,
}

/// Creates the conversations the rows read, change and delete, and builds the rows.
async fn matrix(s: &Secured) -> Matrix {
    let t = &s.tokens;
    let writer = bearer(&t.mint(Role::Writer, &["acme"]));
    let reader = bearer(&t.mint(Role::Reader, &["acme"]));
    let admin = bearer(&t.mint_fleet(Role::Admin, &["*"]));
    let other_writer = bearer(&t.mint(Role::Writer, &["globex"]));
    let other_reader = bearer(&t.mint(Role::Reader, &["globex"]));

    // Conversations the calls below read, change and delete.
    let mut client =
        pb::conversation_service_client::ConversationServiceClient::new(s.fleet.channel().await);
    let create = |title: &str| {
        authorized(
            new_conversation("acme", title, "body"),
            writer.token.as_deref(),
        )
    };
    let kept = client
        .create_conversation(create("kept"))
        .await
        .unwrap()
        .into_inner()
        .name;
    let doomed = client
        .create_conversation(create("doomed"))
        .await
        .unwrap()
        .into_inner()
        .name;

    let conv = s.fleet.channel().await;
    let analytics = channel_to(s.analytics.addr).await;
    let cache = channel_to(s.cache.addr).await;
    let router = channel_to(s.router.addr).await;
    let service_acme = t.acting(Role::Reader, "acme");
    let service_globex = t.acting(Role::Reader, "globex");
    let service_for_writer = As {
        token: Some(t.service.clone()),
        subject: writer.token.clone(),
    };

    let conversation_row = |path, body, write: bool, outcome| Row {
        channel: conv.clone(),
        path,
        shape: Shape::Unary,
        body,
        right: if write {
            writer.clone()
        } else {
            reader.clone()
        },
        other_team: Some(if write {
            other_writer.clone()
        } else {
            other_reader.clone()
        }),
        weak: write.then(|| reader.clone()),
        outcome,
    };
    let analytics_row = |path, body| Row {
        channel: analytics.clone(),
        path,
        shape: Shape::Unary,
        body,
        right: reader.clone(),
        other_team: Some(other_reader.clone()),
        weak: None,
        outcome: Outcome::Ok,
    };
    let cache_row = |path, body| Row {
        channel: cache.clone(),
        path,
        shape: Shape::Unary,
        body,
        right: service_acme.clone(),
        other_team: Some(service_globex.clone()),
        // A user calling the cache tier directly, even a writer.
        weak: Some(writer.clone()),
        outcome: Outcome::Ok,
    };
    let fleet_row = |channel: &Channel, path, shape, body, right: &As, outcome| Row {
        channel: channel.clone(),
        path,
        shape,
        body,
        right: right.clone(),
        other_team: None,
        weak: Some(writer.clone()),
        outcome,
    };
    let service_token = bearer(&t.service);
    let entry = |key: &str| pb::CacheEntry {
        key: key.into(),
        value: b"v".to_vec(),
        version: 1,
        tags: vec!["team:acme".into()],
        ttl: None,
    };

    let rows = vec![
        conversation_row(
            "/convoy.v1.ConversationService/CreateConversation",
            enc(new_conversation("acme", "t", "c")),
            true,
            Outcome::Ok,
        ),
        conversation_row(
            "/convoy.v1.ConversationService/GetConversation",
            enc(pb::GetConversationRequest { name: kept.clone() }),
            false,
            Outcome::Ok,
        ),
        conversation_row(
            "/convoy.v1.ConversationService/BatchGetConversations",
            enc(pb::BatchGetConversationsRequest {
                parent: "teams/acme".into(),
                names: vec![kept.clone()],
            }),
            false,
            Outcome::Ok,
        ),
        conversation_row(
            "/convoy.v1.ConversationService/ListConversations",
            enc(pb::ListConversationsRequest {
                parent: "teams/acme".into(),
                ..Default::default()
            }),
            false,
            Outcome::Ok,
        ),
        conversation_row(
            "/convoy.v1.ConversationService/SearchConversations",
            enc(pb::SearchConversationsRequest {
                parent: "teams/acme".into(),
                query: "body".into(),
                ..Default::default()
            }),
            false,
            Outcome::Ok,
        ),
        conversation_row(
            "/convoy.v1.ConversationService/UpdateConversation",
            enc(pb::UpdateConversationRequest {
                conversation: Some(pb::Conversation {
                    name: kept.clone(),
                    title: "renamed".into(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["title".into()],
                }),
            }),
            true,
            Outcome::Ok,
        ),
        conversation_row(
            "/convoy.v1.ConversationService/DeleteConversation",
            enc(pb::DeleteConversationRequest {
                name: doomed.clone(),
                etag: String::new(),
            }),
            true,
            Outcome::Ok,
        ),
        conversation_row(
            "/convoy.v1.ConversationService/AppendEvents",
            enc(pb::AppendEventsRequest {
                parent: kept.clone(),
                events: vec![message(1, "hi")],
            }),
            true,
            Outcome::Ok,
        ),
        conversation_row(
            "/convoy.v1.ConversationService/ListEvents",
            enc(pb::ListEventsRequest {
                parent: kept.clone(),
                ..Default::default()
            }),
            false,
            Outcome::Ok,
        ),
        Row {
            shape: Shape::ClientStream,
            ..conversation_row(
                "/convoy.v1.IngestService/IngestEvents",
                enc(pb::IngestEventsRequest {
                    item: Some(pb::ingest_events_request::Item::Conversation(
                        pb::IngestConversation {
                            name: kept.clone(),
                            title: "ingested".into(),
                            ..Default::default()
                        },
                    )),
                }),
                true,
                Outcome::Ok,
            )
        },
        Row {
            shape: Shape::ServerStream,
            ..conversation_row(
                "/convoy.v1.WatchService/WatchConversation",
                enc(pb::WatchConversationRequest {
                    name: kept.clone(),
                    after_sequence: 0,
                }),
                false,
                Outcome::Ok,
            )
        },
        Row {
            shape: Shape::ServerStream,
            ..conversation_row(
                "/convoy.v1.WatchService/WatchTeam",
                enc(pb::WatchTeamRequest {
                    parent: "teams/acme".into(),
                }),
                false,
                Outcome::Ok,
            )
        },
        analytics_row(
            "/convoy.v1.AnalyticsService/GetTeamSummary",
            enc(pb::GetTeamSummaryRequest { filter: filter() }),
        ),
        analytics_row(
            "/convoy.v1.AnalyticsService/GetIntentBreakdown",
            enc(pb::GetIntentBreakdownRequest { filter: filter() }),
        ),
        analytics_row(
            "/convoy.v1.AnalyticsService/GetTimeSeries",
            enc(pb::GetTimeSeriesRequest {
                filter: filter(),
                bucket_width: pb::BucketWidth::Day.into(),
            }),
        ),
        analytics_row(
            "/convoy.v1.AnalyticsService/GetUsage",
            enc(pb::GetUsageRequest { filter: filter() }),
        ),
        analytics_row(
            "/convoy.v1.AnalyticsService/GetToolStats",
            enc(pb::GetToolStatsRequest {
                filter: filter(),
                limit: 0,
            }),
        ),
        analytics_row(
            "/convoy.v1.AnalyticsService/GetMetadataBreakdown",
            enc(pb::GetMetadataBreakdownRequest {
                filter: filter(),
                key: "project".into(),
                ..Default::default()
            }),
        ),
        fleet_row(
            &analytics,
            "/convoy.v1.AnalyticsService/GetFleetOverview",
            Shape::Unary,
            enc(pb::GetFleetOverviewRequest {
                start_time: filter().unwrap().start_time,
                end_time: filter().unwrap().end_time,
                ..Default::default()
            }),
            &admin,
            Outcome::Ok,
        ),
        cache_row(
            "/convoy.v1.CacheService/Get",
            enc(pb::CacheGetRequest {
                key: "conv:acme:1".into(),
                ..Default::default()
            }),
        ),
        cache_row(
            "/convoy.v1.CacheService/BatchGet",
            enc(pb::CacheBatchGetRequest {
                keys: vec!["conv:acme:1".into()],
            }),
        ),
        cache_row(
            "/convoy.v1.CacheService/Set",
            enc(pb::CacheSetRequest {
                entry: Some(entry("conv:acme:3")),
                lease_token: String::new(),
            }),
        ),
        cache_row(
            "/convoy.v1.CacheService/Invalidate",
            enc(pb::CacheInvalidateRequest {
                key: "conv:acme:3".into(),
                version: 2,
            }),
        ),
        cache_row(
            "/convoy.v1.CacheService/InvalidateTags",
            enc(pb::InvalidateTagsRequest {
                tags: vec!["team:acme".into()],
            }),
        ),
        cache_row(
            "/convoy.v1.CacheService/Lease",
            enc(pb::LeaseRequest {
                key: "conv:acme:4".into(),
                ..Default::default()
            }),
        ),
        fleet_row(
            &cache,
            "/convoy.v1.CacheService/Stats",
            Shape::Unary,
            enc(pb::CacheStatsRequest {}),
            &service_token,
            Outcome::Ok,
        ),
        fleet_row(
            &cache,
            "/convoy.v1.CacheService/Flush",
            Shape::Unary,
            enc(pb::CacheFlushRequest {}),
            &admin,
            Outcome::Ok,
        ),
        fleet_row(
            &router,
            "/convoy.v1.ShardRouterService/GetShardMap",
            Shape::Unary,
            enc(pb::GetShardMapRequest {}),
            &service_token,
            Outcome::Ok,
        ),
        fleet_row(
            &router,
            "/convoy.v1.ShardRouterService/WatchShardMap",
            Shape::ServerStream,
            enc(pb::WatchShardMapRequest { after_epoch: 0 }),
            &service_token,
            Outcome::Ok,
        ),
        Row {
            channel: router.clone(),
            path: "/convoy.v1.ShardRouterService/Locate",
            shape: Shape::Unary,
            body: enc(pb::LocateRequest {
                team: "teams/acme".into(),
            }),
            right: reader.clone(),
            other_team: Some(other_reader.clone()),
            weak: None,
            outcome: Outcome::Ok,
        },
        fleet_row(
            &router,
            "/convoy.v1.ShardRouterService/ListShards",
            Shape::Unary,
            enc(pb::ListShardsRequest {}),
            &admin,
            Outcome::Ok,
        ),
        fleet_row(
            &router,
            "/convoy.v1.ShardRouterService/AddShard",
            Shape::Unary,
            enc(pb::AddShardRequest {
                shard_id: String::new(),
                ..Default::default()
            }),
            &admin,
            Outcome::Handler(Code::InvalidArgument),
        ),
        fleet_row(
            &router,
            "/convoy.v1.ShardRouterService/MoveSlots",
            Shape::Unary,
            enc(pb::MoveSlotsRequest {
                start: 0,
                end: 1,
                to_shard: "no-such-shard".into(),
                request_id: String::new(),
            }),
            &admin,
            Outcome::Handler(Code::FailedPrecondition),
        ),
        fleet_row(
            &router,
            "/convoy.v1.ShardRouterService/GetOperation",
            Shape::Unary,
            enc(pb::GetOperationRequest {
                name: "operations/none".into(),
            }),
            &admin,
            Outcome::Handler(Code::NotFound),
        ),
        fleet_row(
            &router,
            "/convoy.v1.ShardRouterService/ListOperations",
            Shape::Unary,
            enc(pb::ListOperationsRequest::default()),
            &admin,
            Outcome::Ok,
        ),
        fleet_row(
            &router,
            "/convoy.v1.ShardRouterService/CancelOperation",
            Shape::Unary,
            enc(pb::CancelOperationRequest {
                name: "operations/none".into(),
            }),
            &admin,
            Outcome::Handler(Code::NotFound),
        ),
    ];

    Matrix {
        rows,
        writer,
        reader,
        cache,
        service_for_writer,
    }
}

#[tokio::test]
async fn every_rpc_refuses_the_wrong_callers_and_serves_the_right_one() {
    let s = secured(&[]).await;
    let t = &s.tokens;
    let Matrix {
        rows,
        writer,
        reader,
        cache,
        service_for_writer,
    } = matrix(&s).await;

    // The table covers the whole contract: a new RPC fails here until it has a row.
    let covered: BTreeSet<&str> = rows.iter().map(|r| r.path).collect();
    let contract: BTreeSet<&str> = convoy_proto::methods::all_methods().collect();
    assert_eq!(covered, contract, "every RPC of the contract has a row");

    let expired = bearer(&t.expired());
    for row in &rows {
        assert_eq!(
            refused(row, &As::default(), Code::Unauthenticated, "no token").await,
            "TOKEN_MISSING"
        );
        assert_eq!(
            refused(row, &expired, Code::Unauthenticated, "an expired token").await,
            "TOKEN_EXPIRED"
        );
        if let Some(other) = &row.other_team {
            assert_eq!(
                refused(row, other, Code::PermissionDenied, "another team's token").await,
                "TEAM_NOT_ALLOWED"
            );
        }
        if let Some(weak) = &row.weak {
            assert_eq!(
                refused(row, weak, Code::PermissionDenied, "too weak a role").await,
                "ROLE_INSUFFICIENT"
            );
        }
        let result = call(
            &row.channel,
            row.path,
            row.shape,
            row.body.clone(),
            &row.right,
        )
        .await;
        match (row.outcome, result) {
            (Outcome::Ok, Ok(())) => {}
            (Outcome::Handler(code), Err(status))
                if status.code() == code && reason(&status).is_none() => {}
            (expected, got) => panic!(
                "{} with the right token: expected {expected:?}, got {got:?}",
                row.path
            ),
        }
    }

    // A user's token cannot pose as a service's, and a service acting for a writer still
    // cannot do what only admins may.
    let status = call(
        &cache,
        "/convoy.v1.CacheService/Get",
        Shape::Unary,
        enc(pb::CacheGetRequest {
            key: "conv:acme:1".into(),
            ..Default::default()
        }),
        &As {
            token: writer.token.clone(),
            subject: reader.token.clone(),
        },
    )
    .await
    .unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_deref()),
        (Code::PermissionDenied, Some("NOT_A_SERVICE"))
    );
    let status = call(
        &cache,
        "/convoy.v1.CacheService/Flush",
        Shape::Unary,
        enc(pb::CacheFlushRequest {}),
        &service_for_writer,
    )
    .await
    .unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_deref()),
        (Code::PermissionDenied, Some("ROLE_INSUFFICIENT"))
    );
}

#[tokio::test]
async fn forged_and_foreign_tokens_are_unauthenticated() {
    let s = secured(&[]).await;
    let conv = s.fleet.channel().await;
    let get = enc(pb::ListConversationsRequest {
        parent: "teams/acme".into(),
        ..Default::default()
    });
    let path = "/convoy.v1.ConversationService/ListConversations";
    // Signed by a key the fleet does not have, under the fleet's key id.
    let stranger = convoy_auth::generate_key_pair().unwrap();
    let admin_signed_as = |kid: &str| {
        Signer::from_pem(kid, stranger.private_pem.as_bytes())
            .unwrap()
            .mint(
                "mallory",
                &["*".to_owned()],
                Role::Admin,
                Duration::from_secs(60),
            )
            .unwrap()
    };
    let forged = admin_signed_as("test-1");
    // Under a key id nobody configured.
    let unknown = admin_signed_as("elsewhere");
    // For another audience, with the right key.
    let foreign = s
        .tokens
        .signer
        .sign(&Claims {
            sub: "x".into(),
            teams: vec!["*".into()],
            role: Role::Admin,
            exp: u64::try_from(chrono::Utc::now().timestamp()).unwrap() + 60,
            iat: 0,
            aud: "another-system".into(),
            fleet: true,
        })
        .unwrap();
    for (token, expected) in [
        (forged, "TOKEN_INVALID"),
        (unknown, "TOKEN_UNKNOWN_KEY"),
        (foreign, "TOKEN_INVALID"),
        ("not.a.jwt".to_owned(), "TOKEN_INVALID"),
    ] {
        let status = call(&conv, path, Shape::Unary, get.clone(), &bearer(&token))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::Unauthenticated,
            "{expected}: {status:?}"
        );
        assert_eq!(reason(&status).as_deref(), Some(expected));
    }
    // Health stays open to probes without any token.
    let mut health = tonic_health::pb::health_client::HealthClient::new(conv);
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_team_over_its_rate_limit_is_told_when_to_retry_and_other_teams_are_not_slowed() {
    let s = secured(&["--rate-limit-writer", "3/m"]).await;
    let conv = s.fleet.channel().await;
    let path = "/convoy.v1.ConversationService/CreateConversation";
    let acme = bearer(&s.tokens.mint(Role::Writer, &["acme"]));
    let globex = bearer(&s.tokens.mint(Role::Writer, &["globex"]));
    for i in 0..3 {
        call(
            &conv,
            path,
            Shape::Unary,
            enc(new_conversation("acme", &format!("t{i}"), "")),
            &acme,
        )
        .await
        .unwrap();
    }
    let status = call(
        &conv,
        path,
        Shape::Unary,
        enc(new_conversation("acme", "over", "")),
        &acme,
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let retry = status
        .get_details_retry_info()
        .expect("RetryInfo")
        .retry_delay
        .expect("a delay");
    // One call's worth comes back every 20 s.
    assert!(
        retry > Duration::ZERO && retry <= Duration::from_secs(21),
        "{retry:?}"
    );
    let quota = status.get_details_quota_failure().expect("QuotaFailure");
    assert_eq!(quota.violations[0].subject, "teams/acme");
    // Nothing was written by the refused call.
    let pool = s.fleet.shard_pool(0).await;
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM conversations WHERE team_id = 'acme' AND title = 'over'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(stored, 0);
    // Another team, and readers of the same team, are not held back.
    call(
        &conv,
        path,
        Shape::Unary,
        enc(new_conversation("globex", "g", "")),
        &globex,
    )
    .await
    .unwrap();
    let reader = bearer(&s.tokens.mint(Role::Reader, &["acme"]));
    call(
        &conv,
        "/convoy.v1.ConversationService/ListConversations",
        Shape::Unary,
        enc(pb::ListConversationsRequest {
            parent: "teams/acme".into(),
            ..Default::default()
        }),
        &reader,
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn reads_through_the_cache_tier_act_for_the_reader() {
    // The conversation service fills and reads the cache tier with its own token and the
    // reader's forwarded: the tier is used (not bypassed for lack of credentials).
    let s = secured(&[]).await;
    let conv = s.fleet.channel().await;
    let writer = bearer(&s.tokens.mint(Role::Writer, &["acme"]));
    let reader = bearer(&s.tokens.mint(Role::Reader, &["acme"]));
    let mut grpc = pb::conversation_service_client::ConversationServiceClient::new(conv.clone());
    let create = authorized(
        new_conversation("acme", "cached", "body"),
        writer.token.as_deref(),
    );
    let name = grpc
        .create_conversation(create)
        .await
        .unwrap()
        .into_inner()
        .name;
    let get = enc(pb::GetConversationRequest { name: name.clone() });
    for _ in 0..3 {
        call(
            &conv,
            "/convoy.v1.ConversationService/GetConversation",
            Shape::Unary,
            get.clone(),
            &reader,
        )
        .await
        .unwrap();
    }
    // The fill reached the tier: the entry is there for the service to see.
    let id = name.rsplit('/').next().unwrap().to_owned();
    let mut cache =
        pb::cache_service_client::CacheServiceClient::new(channel_to(s.cache.addr).await);
    let request = authorized(
        pb::CacheGetRequest {
            key: format!("conv:acme:{id}"),
            min_version: 0,
            peek: true,
        },
        Some(&s.tokens.service),
    );
    let found = cache.get(request).await.unwrap().into_inner();
    assert!(
        found.entry.is_some(),
        "the read filled the cache tier: {found:?}"
    );
}

/// Bodies a fuzzer sends: random bytes, a valid body with bits flipped, cut short or with
/// bytes inserted, and a valid body with fields the contract does not know appended.
fn fuzzed(rng: &mut StdRng, valid: &[u8]) -> Bytes {
    let mut body = valid.to_vec();
    match rng.random_range(0..5) {
        0 => {
            let len = rng.random_range(0..512);
            body = (0..len).map(|_| rng.random()).collect();
        }
        1 if !body.is_empty() => {
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..body.len());
                body[at] ^= 1 << rng.random_range(0..8);
            }
        }
        2 => body.truncate(rng.random_range(0..=body.len())),
        3 => {
            let at = rng.random_range(0..=body.len());
            let len = rng.random_range(1..16);
            let inserted: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            body.splice(at..at, inserted);
        }
        _ => {
            // Field 1000 + k: a varint, or bytes of a random length.
            let field = 1000 + rng.random_range(0..100u64);
            if rng.random_bool(0.5) {
                prost::encoding::encode_key(field as u32, WireType::Varint, &mut body);
                prost::encoding::encode_varint(rng.random(), &mut body);
            } else {
                let len = rng.random_range(0..64);
                prost::encoding::encode_key(field as u32, WireType::LengthDelimited, &mut body);
                prost::encoding::encode_varint(len, &mut body);
                body.extend((0..len).map(|_| rng.random::<u8>()));
            }
        }
    }
    Bytes::from(body)
}

/// A digest of every key in Redis (the cache tier's L2), but the invalidation bus, where
/// relays heartbeat every second whatever callers do (a write's invalidation there comes
/// from its outbox row, which the shards' digest covers).
async fn cached(redis: &mut redis::aio::MultiplexedConnection) -> Vec<(String, Vec<u8>)> {
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(redis)
        .await
        .unwrap();
    keys.retain(|key| !key.starts_with("convoy:invalidations"));
    keys.sort();
    let mut all = Vec::with_capacity(keys.len());
    for key in keys {
        let dump: Option<Vec<u8>> = redis::cmd("DUMP")
            .arg(&key)
            .query_async(redis)
            .await
            .unwrap();
        all.push((key, dump.unwrap_or_default()));
    }
    all
}

/// Redis once the writes before settle (the outbox relay publishes them a moment after
/// they commit): the same digest twice, 100 ms apart.
async fn settled(redis: &mut redis::aio::MultiplexedConnection) -> Vec<(String, Vec<u8>)> {
    let mut last = cached(redis).await;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = cached(redis).await;
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("Redis did not settle in 10 s");
}

/// What a refusal by decoding looks like: tonic answers a body that is not the method's
/// message with INTERNAL (as gRPC's status code guide says of a server's parse failure).
fn undecodable(status: &tonic::Status) -> bool {
    status.code() == Code::Internal
        && status
            .message()
            .starts_with("failed to decode Protobuf message")
}

#[tokio::test]
async fn fuzzed_requests_to_every_rpc_are_refused_precisely_and_write_nothing() {
    // Every bucket wide open: the fuzzer's pace must not turn its calls into RESOURCE_EXHAUSTED.
    let s = secured(&[
        "--rate-limit-reader",
        "1000000/s",
        "--rate-limit-writer",
        "1000000/s",
        "--rate-limit-admin",
        "1000000/s",
    ])
    .await;
    let Matrix { rows, .. } = matrix(&s).await;
    let seed = std::env::var("CONVOY_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    let mut rng = StdRng::seed_from_u64(seed);
    let pool = s.fleet.shard_pool(0).await;
    let mut redis = redis::Client::open(s.redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();

    // 1. Callers who must be refused, whatever they send: the auth layer answers before
    //    any handler sees the body, and nothing is written, in Postgres or Redis.
    let t = &s.tokens;
    let expired = bearer(&t.expired());
    let garbage = bearer("eyJhbGciOiJFZERTQSJ9.e30.c2lnbmF0dXJl");
    let nobody = As::default();
    let rows_before = convoy_integration_tests::stored_digest(&pool).await;
    // The matrix's writes reach Redis through the relay, a moment after their commit.
    s.fleet.wait_outbox_published().await;
    let redis_before = settled(&mut redis).await;
    let mut calls = 0;
    for row in &rows {
        // Who, how many bodies, and what they may get. A stranger's token is checked before
        // the body is read, a weak role before it too; another team's is checked against
        // the teams the body names, so a body that names none is INVALID_ARGUMENT.
        let strangers = [Code::Unauthenticated].as_slice();
        let mut callers = vec![
            (&nobody, 4, strangers),
            (&expired, 4, strangers),
            (&garbage, 4, strangers),
        ];
        let other = [Code::PermissionDenied, Code::InvalidArgument].as_slice();
        callers.extend(row.other_team.iter().map(|who| (who, 16, other)));
        let weak = [Code::PermissionDenied].as_slice();
        callers.extend(row.weak.iter().map(|who| (who, 16, weak)));
        for (who, cases, allowed) in callers {
            for _ in 0..cases {
                let body = fuzzed(&mut rng, &row.body);
                let status = call(&row.channel, row.path, row.shape, body.clone(), who)
                    .await
                    .expect_err(&format!(
                        "seed {seed}: {} with {body:?} is refused",
                        row.path
                    ));
                assert!(
                    allowed.contains(&status.code())
                        && (status.code() == Code::InvalidArgument || reason(&status).is_some()),
                    "seed {seed}: {} with {body:?}: {status:?}",
                    row.path
                );
                calls += 1;
            }
        }
    }
    assert_eq!(
        convoy_integration_tests::stored_digest(&pool).await,
        rows_before,
        "seed {seed}: a refused call wrote to Postgres"
    );
    assert_eq!(
        cached(&mut redis).await,
        redis_before,
        "seed {seed}: a refused call wrote to Redis"
    );
    assert!(calls > 1000, "{calls} calls");

    // 2. The right caller: whatever the body, a precise answer (never a panic, UNKNOWN, or
    //    a dropped connection), and a call the handler refuses writes nothing: no row, and
    //    no change to the shard map (no AddShard or MoveSlots gets through with a fuzzed
    //    body: neither names a shard that exists).
    let mut router = pb::shard_router_service_client::ShardRouterServiceClient::new(
        channel_to(s.router.addr).await,
    );
    let map = |router: &mut pb::shard_router_service_client::ShardRouterServiceClient<Channel>| {
        let request = authorized(pb::GetShardMapRequest {}, Some(&t.service));
        let mut router = router.clone();
        async move { router.get_shard_map(request).await.unwrap().into_inner() }
    };
    let map_before = map(&mut router).await;
    let mut codes = std::collections::BTreeMap::<(&str, String), usize>::new();
    for row in &rows {
        for _ in 0..24 {
            let body = fuzzed(&mut rng, &row.body);
            let before = convoy_integration_tests::stored_digest(&pool).await;
            let result = call(&row.channel, row.path, row.shape, body.clone(), &row.right).await;
            let Err(status) = result else {
                *codes.entry((row.path, "Ok".to_owned())).or_default() += 1;
                continue;
            };
            *codes
                .entry((row.path, format!("{:?}", status.code())))
                .or_default() += 1;
            let precise = match status.code() {
                Code::Unknown | Code::Unavailable | Code::DeadlineExceeded => false,
                Code::Internal => undecodable(&status),
                Code::Unimplemented => matches!(row.outcome, Outcome::Handler(Code::Unimplemented)),
                _ => true,
            };
            assert!(
                precise,
                "seed {seed}: {} with {body:?}: {status:?}",
                row.path
            );
            assert_eq!(
                convoy_integration_tests::stored_digest(&pool).await,
                before,
                "seed {seed}: {} with {body:?} was refused ({status:?}) but wrote",
                row.path
            );
        }
    }
    println!("seed {seed}: {codes:?}");
    assert_eq!(
        map(&mut router).await,
        map_before,
        "seed {seed}: the shard map changed"
    );
    // Every service still serves.
    for addr in [s.fleet.addr, s.analytics.addr, s.cache.addr, s.router.addr] {
        tonic_health::pb::health_client::HealthClient::new(channel_to(addr).await)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: {addr} after the fuzzer: {e:?}"));
    }
}
