//! Hostile streams against a real fleet (PostgreSQL, Redis, the conversation service with
//! authorization on): a team that opens more streams than its share is refused past it
//! while other teams' calls and streams go on (and its own unary calls too: streams never
//! hold the bulkhead's places); an idle client stream ends by itself; a stream ends when
//! its token expires or its key is removed; a message that trickles in is cut. Refused
//! streams write nothing, and the instance's memory stays bounded through the flood.
//!
//! Bounds are generous and stated where they are asserted: another team's call answers
//! within [`ANSWER_WITHIN`], the process's resident memory grows by less than
//! [`MEMORY_GROWTH_BOUND`] through the flood.

use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use convoy_auth::{AUDIENCE, Claims, LEEWAY_SECS, Role, Signer};
use convoy_integration_tests::{Fleet, authorized, message, new_conversation, stored_digest};
use convoy_proto::v1 as pb;
use convoy_testkit::Redis;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;
use tower::ServiceExt;

type Conversations = pb::conversation_service_client::ConversationServiceClient<Channel>;
type Ingest = pb::ingest_service_client::IngestServiceClient<Channel>;
type Watch = pb::watch_service_client::WatchServiceClient<Channel>;

/// Longest another team's call (or stream's opening, or event) may take while the flood is
/// on: generous, far above a healthy instance's milliseconds, far below a starved call's
/// "never".
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// Most the test process's resident memory (clients and server alike) may grow through
/// the flood: 64 MiB. A healthy run grows by under 10 MiB; the bound is there to catch an
/// instance that keeps what refused streams sent or hold, not to measure it.
const MEMORY_GROWTH_BOUND: u64 = 64 << 20;

/// The fleet under attack: one instance with authorization on and a bus for watches.
struct Hostile {
    fleet: Fleet,
    _redis: Redis,
    signer: Signer,
    keys: PathBuf,
    _dir: tempfile::TempDir,
}

/// The fleet, with `extra` flags.
async fn hostile(extra: &[&str]) -> Hostile {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let pair = convoy_auth::generate_key_pair().unwrap();
    std::fs::write(keys.join("k1.pem"), &pair.public_pem).unwrap();
    let signer = Signer::from_pem("k1", pair.private_pem.as_bytes()).unwrap();
    let redis = Redis::start().await.unwrap();
    let (keys_flag, redis_url) = (keys.display().to_string(), redis.url());
    let mut flags = vec!["--auth-keys", &keys_flag, "--redis-url", &redis_url];
    flags.extend(extra);
    let fleet = Fleet::start_with(1, &flags).await;
    Hostile {
        fleet,
        _redis: redis,
        signer,
        keys,
        _dir: dir,
    }
}

impl Hostile {
    /// A token for `team` as `role`, valid for an hour.
    fn token(&self, role: Role, team: &str) -> String {
        self.signer
            .mint(
                "tester",
                &[team.to_owned()],
                role,
                Duration::from_secs(3600),
            )
            .unwrap()
    }

    /// A token for `team` as `role` that the server accepts for `left` more (its `exp` is
    /// in the past by less than the leeway every token gets).
    fn expiring(&self, role: Role, team: &str, left: Duration) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        self.signer
            .sign(&Claims {
                sub: "tester".into(),
                teams: vec![team.to_owned()],
                role,
                exp: now + left.as_secs() - LEEWAY_SECS,
                iat: now - 60,
                aud: AUDIENCE.into(),
                fleet: false,
            })
            .unwrap()
    }
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    authorized(message, Some(token))
}

/// Creates a conversation of `team`; its name.
async fn create(channel: &Channel, token: &str, team: &str) -> String {
    Conversations::new(channel.clone())
        .create_conversation(with_token(new_conversation(team, "watched", ""), token))
        .await
        .unwrap()
        .into_inner()
        .name
}

fn declaration(name: &str, padding: usize) -> pb::IngestEventsRequest {
    pb::IngestEventsRequest {
        item: Some(pb::ingest_events_request::Item::Conversation(
            pb::IngestConversation {
                name: name.to_owned(),
                title: "x".repeat(padding.max(1)),
                ..Default::default()
            },
        )),
    }
}

fn line(conversation: &str, padding: usize) -> pb::IngestEventsRequest {
    pb::IngestEventsRequest {
        item: Some(pb::ingest_events_request::Item::Line(pb::IngestLine {
            conversation: conversation.to_owned(),
            source: "hostile:1".into(),
            event: None,
            raw_line: "x".repeat(padding),
        })),
    }
}

/// An ingestion stream whose messages the test sends through the returned sender; the call
/// runs on its own task.
fn ingest(
    channel: &Channel,
    token: &str,
) -> (
    mpsc::Sender<pb::IngestEventsRequest>,
    tokio::task::JoinHandle<Result<pb::IngestEventsResponse, tonic::Status>>,
) {
    let (tx, rx) = mpsc::channel(4);
    let request = with_token(ReceiverStream::new(rx), token);
    let mut client = Ingest::new(channel.clone());
    let call = tokio::spawn(async move {
        client
            .ingest_events(request)
            .await
            .map(tonic::Response::into_inner)
    });
    (tx, call)
}

async fn watch(
    channel: &Channel,
    token: &str,
    name: &str,
) -> Result<tonic::Streaming<pb::WatchConversationResponse>, tonic::Status> {
    Watch::new(channel.clone())
        .watch_conversation(with_token(
            pb::WatchConversationRequest {
                name: name.to_owned(),
                after_sequence: 0,
            },
            token,
        ))
        .await
        .map(tonic::Response::into_inner)
}

/// The process's resident memory, in bytes (VmRSS in /proc/self/status).
fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib << 10
}

fn quota_subject(status: &tonic::Status) -> String {
    status
        .get_error_details()
        .quota_failure()
        .map(|q| q.violations[0].subject.clone())
        .unwrap_or_default()
}

fn reason(status: &tonic::Status) -> String {
    status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

fn conversation_name(team: &str, i: usize) -> String {
    format!(
        "teams/{team}/conversations/{}",
        uuid::Uuid::from_u128(0xacbe_0000 + i as u128)
    )
}

/// Within `bound`, or the test fails saying what was late.
async fn within<T>(bound: Duration, what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(bound, future)
        .await
        .unwrap_or_else(|_| panic!("{what} took longer than {bound:?}"))
}

#[tokio::test]
async fn a_team_flooding_streams_exhausts_only_its_own_share() {
    // Fewer unary places than acme's share of streams: were streams to hold them, acme's
    // streams alone would starve every unary call, as they did before.
    let share = 12;
    let share_flag = share.to_string();
    let h = hostile(&[
        "--max-concurrent-calls",
        "8",
        "--max-streams-per-team",
        &share_flag,
        "--max-streams",
        "64",
        "--auth-buffer-mib",
        "16",
    ])
    .await;
    let channel = h.fleet.channel().await;
    let acme = h.token(Role::Writer, "acme");
    let globex = h.token(Role::Writer, "globex");
    let acme_watched = create(&channel, &acme, "acme").await;
    let globex_watched = create(&channel, &globex, "globex").await;

    // acme's share: idle ingestion streams (more than the unary places), each after one
    // declaration, and idle watches.
    let ingests = share - 2;
    let mut idle_ingests = Vec::new();
    for i in 0..ingests {
        let (tx, call) = ingest(&channel, &acme);
        tx.send(declaration(&conversation_name("acme", i), 1))
            .await
            .unwrap();
        idle_ingests.push((tx, call));
    }
    let mut conversations = Conversations::new(channel.clone());
    for i in 0..ingests {
        // Admitted and running: its declaration is stored once the stream pauses.
        let name = conversation_name("acme", i);
        within(
            Duration::from_secs(20),
            "an admitted stream's declaration",
            async {
                loop {
                    let get = pb::GetConversationRequest { name: name.clone() };
                    if conversations
                        .get_conversation(with_token(get, &acme))
                        .await
                        .is_ok()
                    {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        )
        .await;
    }
    let mut idle_watches = Vec::new();
    for _ in ingests..share {
        idle_watches.push(
            watch(&channel, &acme, &acme_watched)
                .await
                .expect("in the share"),
        );
    }

    let shard = h.fleet.shard_pool(0).await;
    let before = stored_digest(&shard).await;
    let resident = resident_bytes();

    // Past the share, each new stream of acme's is refused at once, naming the team.
    let refused = watch(&channel, &acme, &acme_watched).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(quota_subject(&refused), "teams/acme");
    assert!(refused.get_error_details().retry_info().is_some());
    let (tx, call) = ingest(&channel, &acme);
    tx.send(declaration(&conversation_name("acme", 1000), 1))
        .await
        .unwrap();
    let refused = within(ANSWER_WITHIN, "a refusal", call)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(quota_subject(&refused), "teams/acme");

    // The flood: two hundred more of acme's streams at once, each ingestion opening with a
    // 64 KiB message. Meanwhile globex reads, opens a stream, and acme's own unary calls go
    // on.
    let mut flood = Vec::new();
    for i in 0..200 {
        let channel = channel.clone();
        let (acme, watched) = (acme.clone(), acme_watched.clone());
        flood.push(tokio::spawn(async move {
            if i % 2 == 0 {
                watch(&channel, &acme, &watched).await.map(drop)
            } else {
                let (tx, call) = ingest(&channel, &acme);
                let _ = tx
                    .send(line(&conversation_name("acme", 1001 + i), 64 << 10))
                    .await;
                call.await.unwrap().map(drop)
            }
        }));
    }
    let list = pb::ListConversationsRequest {
        parent: "teams/globex".into(),
        ..Default::default()
    };
    let listed = within(
        ANSWER_WITHIN,
        "globex's ListConversations",
        conversations.list_conversations(with_token(list, &globex)),
    )
    .await
    .expect("globex's unary call succeeds");
    assert_eq!(listed.into_inner().conversations.len(), 1);
    let mut globex_watch = within(
        ANSWER_WITHIN,
        "globex's watch",
        watch(&channel, &globex, &globex_watched),
    )
    .await
    .expect("globex's stream is admitted");
    let own = pb::ListConversationsRequest {
        parent: "teams/acme".into(),
        ..Default::default()
    };
    within(
        ANSWER_WITHIN,
        "acme's own ListConversations",
        conversations.list_conversations(with_token(own, &acme)),
    )
    .await
    .expect("acme's streams hold none of the bulkhead's places");
    for refused in flood {
        let status = within(ANSWER_WITHIN, "a refusal", refused)
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        // The team's share, or (for a 64 KiB message) the instance's message budget.
        let subject = quota_subject(&status);
        assert!(
            subject == "teams/acme" || subject == "instance",
            "{status:?}"
        );
    }
    let grown = resident_bytes().saturating_sub(resident);
    assert!(
        grown < MEMORY_GROWTH_BOUND,
        "resident memory grew by {} MiB through the flood",
        grown >> 20
    );
    assert_eq!(
        stored_digest(&shard).await,
        before,
        "refused streams wrote nothing"
    );

    // globex's stream works: an event appended arrives.
    conversations
        .append_events(with_token(
            pb::AppendEventsRequest {
                parent: globex_watched.clone(),
                events: vec![message(1_793_527_200, "hello")],
            },
            &globex,
        ))
        .await
        .unwrap();
    let got = within(ANSWER_WITHIN, "globex's event", globex_watch.message())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        got.item,
        Some(pb::watch_conversation_response::Item::Event(_))
    ));

    // acme's streams stayed open throughout.
    assert!(idle_ingests.iter().all(|(_, call)| !call.is_finished()));
    // A closed stream gives its place back.
    drop(idle_watches.pop());
    within(ANSWER_WITHIN, "a place freed", async {
        loop {
            match watch(&channel, &acme, &acme_watched).await {
                Ok(stream) => return stream,
                Err(status) if status.code() == Code::ResourceExhausted => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(status) => panic!("{status:?}"),
            }
        }
    })
    .await;
}

#[tokio::test]
async fn an_idle_client_stream_ends_by_itself() {
    let h = hostile(&["--stream-idle-timeout-ms", "1000"]).await;
    let channel = h.fleet.channel().await;
    let acme = h.token(Role::Writer, "acme");
    let (tx, call) = ingest(&channel, &acme);
    let started = Instant::now();
    tx.send(declaration(&conversation_name("acme", 1), 1))
        .await
        .unwrap();
    let status = within(Duration::from_secs(10), "the idle stream's end", call)
        .await
        .unwrap()
        .unwrap_err();
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(reason(&status), "STREAM_IDLE");
    drop(tx);
}

#[tokio::test]
async fn streams_end_unauthenticated_when_their_token_expires_or_their_key_goes() {
    let h = hostile(&[]).await;
    let channel = h.fleet.channel().await;
    let writer = h.token(Role::Writer, "acme");
    let watched = create(&channel, &writer, "acme").await;

    // A watch and an ingestion stream (sending all along) whose tokens expire in 3 s.
    let soon = Duration::from_secs(3);
    let mut expiring = watch(&channel, &h.expiring(Role::Reader, "acme", soon), &watched)
        .await
        .expect("valid for now");
    let (tx, call) = ingest(&channel, &h.expiring(Role::Writer, "acme", soon));
    let target = conversation_name("acme", 2);
    tx.send(declaration(&target, 1)).await.unwrap();
    let sender = tokio::spawn(async move {
        while tx.send(line(&target, 10)).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let ended = within(
        Duration::from_secs(15),
        "the watch's end",
        expiring.message(),
    )
    .await
    .unwrap_err();
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    assert_eq!(reason(&ended), "TOKEN_EXPIRED");
    let ended = within(Duration::from_secs(15), "the ingestion's end", call)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    assert_eq!(reason(&ended), "TOKEN_EXPIRED");
    sender.abort();

    // A watch whose key is removed ends at the next key reload (every 10 s).
    let mut revoked = watch(&channel, &h.token(Role::Reader, "acme"), &watched)
        .await
        .unwrap();
    let other = convoy_auth::generate_key_pair().unwrap();
    std::fs::write(h.keys.join("k2.pem"), &other.public_pem).unwrap();
    std::fs::remove_file(h.keys.join("k1.pem")).unwrap();
    let bound = convoy_auth::KEY_RELOAD_INTERVAL * 3;
    let ended = within(bound, "the revoked watch's end", revoked.message())
        .await
        .unwrap_err();
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    assert_eq!(reason(&ended), "TOKEN_UNKNOWN_KEY");
}

/// A request body the test feeds chunk by chunk.
struct Trickle(mpsc::Receiver<Bytes>);

impl http_body::Body for Trickle {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        self.0
            .poll_recv(cx)
            .map(|c| c.map(|c| Ok(http_body::Frame::data(c))))
    }
}

#[tokio::test]
async fn a_message_that_trickles_in_is_cut_and_writes_nothing() {
    let h = hostile(&["--auth-read-timeout-ms", "1000"]).await;
    let channel = h.fleet.channel().await;
    let acme = h.token(Role::Writer, "acme");
    let shard = h.fleet.shard_pool(0).await;
    let before = stored_digest(&shard).await;

    // A CreateConversation sent a byte every 200 ms: it would take minutes.
    let encoded = prost::Message::encode_to_vec(&new_conversation("acme", "slow", "content"));
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
    framed.extend_from_slice(&encoded);
    let (tx, rx) = mpsc::channel(1);
    let request = http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{}/convoy.v1.ConversationService/CreateConversation",
            h.fleet.addr
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {acme}"))
        .body(tonic::body::Body::new(Trickle(rx)))
        .unwrap();
    let trickle = tokio::spawn(async move {
        for byte in framed {
            if tx.send(Bytes::from(vec![byte])).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let started = Instant::now();
    let response = within(Duration::from_secs(10), "the cut", channel.oneshot(request))
        .await
        .unwrap();
    let status =
        tonic::Status::from_header_map(response.headers()).expect("a trailers-only answer");
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(reason(&status), "BODY_TIMEOUT");
    trickle.abort();
    assert_eq!(stored_digest(&shard).await, before, "nothing was written");
}

#[tokio::test]
async fn the_sdk_resumes_a_watch_across_stream_lifetimes_losing_and_repeating_nothing() {
    // A one-second lifetime: the watch below is ended (and resumed) several times.
    let h = hostile(&["--server-stream-lifetime-s", "1"]).await;
    let channel = h.fleet.channel().await;
    let writer = h.token(Role::Writer, "acme");
    let watched = create(&channel, &writer, "acme").await;
    let sdk = convoy_client::ConvoyClient::connect(
        convoy_client::Discovery::Static(vec![h.fleet.addr.to_string()]),
        convoy_client::ClientConfig {
            credentials: convoy_client::Credentials::token(&h.token(Role::Reader, "acme")).unwrap(),
            ..Default::default()
        },
    )
    .unwrap();
    let mut watch = sdk.watches().watch_conversation(&watched, 0);

    // 40 events over about 4 s, while the reader reads.
    let total = 40;
    let appender = tokio::spawn({
        let channel = channel.clone();
        let (writer, watched) = (writer.clone(), watched.clone());
        async move {
            let mut conversations = Conversations::new(channel);
            for i in 0..total {
                let event = pb::ConversationEvent {
                    event_id: format!("e{i}"),
                    ..message(1_793_527_200 + i, "tick")
                };
                conversations
                    .append_events(with_token(
                        pb::AppendEventsRequest {
                            parent: watched.clone(),
                            events: vec![event],
                        },
                        &writer,
                    ))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let mut sequences = Vec::new();
    while sequences.len() < total as usize {
        let event = within(Duration::from_secs(20), "the next event", watch.next())
            .await
            .expect("the watch goes on")
            .expect("no error reaches the reader");
        sequences.push(event.sequence);
    }
    appender.await.unwrap();
    assert_eq!(
        sequences,
        (1..=total).collect::<Vec<_>>(),
        "every event once, in order"
    );
    assert!(watch.resumes() >= 2, "resumed {} times", watch.resumes());
}
