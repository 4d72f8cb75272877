//! The request path's own CPU cost: validation and page tokens (no I/O).

use std::hint::black_box;

use conversation::model::ListCursor;
use conversation::page_token::{self, Cursor};
use conversation::validate;
use convoy_proto::v1 as pb;
use criterion::{Criterion, criterion_group, criterion_main};
use uuid::Uuid;

fn create_request() -> pb::CreateConversationRequest {
    pb::CreateConversationRequest {
        parent: "teams/acme".into(),
        conversation: Some(pb::Conversation {
            title: "Why does the build fail on ARM?".into(),
            intent: pb::Intent::Debug as i32,
            content: "x".repeat(2048),
            metadata: [("project".to_string(), "convoy".to_string())].into(),
            ..Default::default()
        }),
        request_id: Uuid::now_v7().to_string(),
        ..Default::default()
    }
}

fn append_request(n: usize) -> pb::AppendEventsRequest {
    let event = pb::ConversationEvent {
        kind: pb::EventKind::Message as i32,
        role: pb::Role::Assistant as i32,
        occur_time: Some(prost_types_now()),
        content: "y".repeat(512),
        event_id: Uuid::now_v7().to_string(),
        ..Default::default()
    };
    pb::AppendEventsRequest {
        parent: format!("teams/acme/conversations/{}", Uuid::now_v7()),
        events: vec![event; n],
    }
}

fn prost_types_now() -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: 1_763_000_000,
        nanos: 0,
    }
}

fn validation(c: &mut Criterion) {
    let create = create_request();
    c.bench_function("validate/create", |b| {
        b.iter(|| validate::create(black_box(&create)).unwrap())
    });
    let get = format!("teams/acme/conversations/{}", Uuid::now_v7());
    c.bench_function("validate/get_name", |b| {
        b.iter(|| validate::conversation_name("name", black_box(&get)).unwrap())
    });
    let append = append_request(100);
    c.bench_function("validate/append_100_events", |b| {
        b.iter(|| validate::append(black_box(&append)).unwrap())
    });
}

fn page_tokens(c: &mut Criterion) {
    let cursor = Cursor::List(ListCursor {
        created_at_micros: 1_763_000_000_000_000,
        id: Uuid::now_v7(),
    });
    c.bench_function("page_token/encode", |b| {
        b.iter(|| page_token::encode(black_box(42), black_box(&cursor)))
    });
    let token = page_token::encode(42, &cursor);
    c.bench_function("page_token/decode", |b| {
        b.iter(|| page_token::decode(black_box(&token), 42).unwrap())
    });
}

criterion_group!(benches, validation, page_tokens);
criterion_main!(benches);
