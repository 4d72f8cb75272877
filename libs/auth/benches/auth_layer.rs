//! What the auth layer costs a call, next to the same call without it (the `--no-auth`
//! baseline: the layer left out). The inner service answers at once, so the difference is
//! the layer's own work: the header parsed, the cached claims looked up, the unary body
//! buffered and walked for its team, the rate bucket taken. Also the first sight of a token
//! (its signature verified, then cached until it expires).
//!
//! `cargo bench -p convoy-auth --bench auth_layer`

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use convoy_auth::{
    AuthLayer, Authorizer, Rate, RateLimitConfig, RateLimits, Role, Signer, Verifier,
    generate_key_pair,
};
use convoy_proto::v1 as pb;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::{HeaderValue, Request, Response};
use prost::Message;
use tonic::body::Body;
use tower::{Layer, ServiceExt, service_fn};

const PATH: &str = "/convoy.v1.ConversationService/GetConversation";

/// A gRPC-framed GetConversation for team acme.
fn get_body() -> Bytes {
    let message = pb::GetConversationRequest {
        name: "teams/acme/conversations/0193a6f0-7b7c-7c3e-9f1e-2b1c6d3e4f50".into(),
    };
    let mut buf = BytesMut::new();
    buf.put_u8(0);
    buf.put_u32(message.encoded_len() as u32);
    message.encode(&mut buf).unwrap();
    buf.freeze()
}

fn request(body: &Bytes, authorization: &HeaderValue) -> Request<Body> {
    let mut request = Request::post(PATH)
        .header("content-type", "application/grpc")
        .body(Body::new(http_body_util::Full::new(body.clone())))
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", authorization.clone());
    request
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pair = generate_key_pair().unwrap();
    std::fs::write(dir.path().join("k.pem"), &pair.public_pem).unwrap();
    let signer = Signer::from_pem("k", pair.private_pem.as_bytes()).unwrap();
    let mint = |team: &str| {
        let token = signer
            .mint(
                "bench",
                &[team.to_owned()],
                Role::Reader,
                Duration::from_secs(3600),
            )
            .unwrap();
        HeaderValue::try_from(format!("Bearer {token}")).unwrap()
    };
    let acme = mint("acme");
    let globex = mint("globex");
    let verifier = Arc::new(Verifier::from_dir(dir.path()).unwrap());
    // A bucket taken at every call, too big for a bench run to empty.
    let limits = RateLimits::new(RateLimitConfig {
        reader: Some("1000000000/s".parse::<Rate>().unwrap()),
        ..RateLimitConfig::default()
    });
    let authorizer = Arc::new(Authorizer::new(verifier, limits, 4 << 20));
    let body = get_body();

    let inner = service_fn(|_request: Request<Body>| async {
        Ok::<_, Infallible>(Response::new(Body::empty()))
    });
    let layered = AuthLayer::new(authorizer).layer(inner);

    let mut group = c.benchmark_group("auth_layer");
    group.bench_function("get: no layer (--no-auth)", |b| {
        b.to_async(&runtime)
            .iter(|| async { black_box(inner.oneshot(request(&body, &acme)).await.unwrap()) })
    });
    group.bench_function("get: layer, token cached", |b| {
        b.to_async(&runtime).iter(|| async {
            let response = layered
                .clone()
                .oneshot(request(&body, &acme))
                .await
                .unwrap();
            assert!(response.headers().get("grpc-status").is_none());
            black_box(response)
        })
    });
    group.bench_function("get: layer, another team's token (refused)", |b| {
        b.to_async(&runtime).iter(|| async {
            let response = layered
                .clone()
                .oneshot(request(&body, &globex))
                .await
                .unwrap();
            assert!(response.headers().get("grpc-status").is_some());
            black_box(response)
        })
    });
    group.finish();

    // A token's first call: its signature verified (Ed25519), then its claims cached.
    let token = acme.to_str().unwrap().strip_prefix("Bearer ").unwrap();
    c.bench_function("auth_verify: first sight of a token (uncached)", |b| {
        b.iter_batched(
            || Verifier::from_dir(dir.path()).unwrap(),
            |fresh| black_box(fresh.verify(token).unwrap()),
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
