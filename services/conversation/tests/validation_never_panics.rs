//! Arbitrary requests never panic validation: each is either accepted as domain values or
//! refused with at least one field violation. (Decode → validate is the whole path a
//! request takes before it can reach a shard.)

use conversation::error::ApiError;
use conversation::validate;
use convoy_proto::v1 as pb;
use proptest::prelude::*;

fn refused_with_fields<T>(result: Result<T, ApiError>) -> bool {
    match result {
        Ok(_) => true,
        Err(ApiError::InvalidArgument(violations)) => !violations.is_empty(),
        Err(other) => {
            panic!("validation answered something other than INVALID_ARGUMENT: {other:?}")
        }
    }
}

fn timestamp() -> impl Strategy<Value = Option<prost_types::Timestamp>> {
    proptest::option::of(
        (any::<i64>(), any::<i32>())
            .prop_map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }),
    )
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "teams/[a-z0-9-]{0,70}".prop_map(|s| s),
        "teams/[a-z]{1,8}/conversations/[0-9a-f-]{0,40}".prop_map(|s| s),
    ]
}

fn event() -> impl Strategy<Value = pb::ConversationEvent> {
    (
        any::<i32>(),
        any::<i32>(),
        timestamp(),
        any::<String>(),
        any::<String>(),
        any::<String>(),
        any::<[i64; 4]>(),
    )
        .prop_map(
            |(kind, role, occur_time, content, raw_json, event_id, usage)| pb::ConversationEvent {
                kind: kind % 8,
                role: role % 6,
                occur_time,
                content,
                raw_json,
                event_id,
                token_usage: Some(pb::TokenUsage {
                    input_tokens: usage[0],
                    output_tokens: usage[1],
                    cache_creation_input_tokens: usage[2],
                    cache_read_input_tokens: usage[3],
                }),
                ..Default::default()
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn create_requests(
        parent in name(),
        title in any::<String>(),
        intent in any::<i32>(),
        status in any::<i32>(),
        score in proptest::option::of(any::<f64>()),
        metadata in proptest::collection::btree_map(any::<String>(), any::<String>(), 0..70),
        conversation_id in any::<String>(),
        request_id in any::<String>(),
    ) {
        let request = pb::CreateConversationRequest {
            parent,
            conversation: Some(pb::Conversation {
                title,
                intent,
                status,
                effectiveness_score: score,
                metadata,
                ..Default::default()
            }),
            conversation_id,
            request_id,
        };
        prop_assert!(refused_with_fields(validate::create(&request)));
    }

    #[test]
    fn list_and_search_requests(
        parent in name(),
        page_size in any::<i32>(),
        page_token in any::<String>(),
        status in any::<i32>(),
        intent in any::<i32>(),
        start in timestamp(),
        end in timestamp(),
        query in any::<String>(),
    ) {
        let list = pb::ListConversationsRequest {
            parent: parent.clone(),
            page_size,
            page_token: page_token.clone(),
            status,
            intent,
            create_time_start: start,
            create_time_end: end,
        };
        prop_assert!(refused_with_fields(validate::list(&list)));
        let search = pb::SearchConversationsRequest {
            parent,
            query,
            page_size,
            page_token,
            status,
            intent,
        };
        prop_assert!(refused_with_fields(validate::search(&search)));
    }

    #[test]
    fn append_and_update_requests(
        parent in name(),
        events in proptest::collection::vec(event(), 0..8),
        paths in proptest::collection::vec(any::<String>(), 0..4),
        etag in any::<String>(),
    ) {
        let append = pb::AppendEventsRequest { parent: parent.clone(), events };
        prop_assert!(refused_with_fields(validate::append(&append)));
        let update = pb::UpdateConversationRequest {
            conversation: Some(pb::Conversation { name: parent.clone(), etag: etag.clone(), ..Default::default() }),
            update_mask: Some(prost_types::FieldMask { paths }),
        };
        prop_assert!(refused_with_fields(validate::update(&update)));
        let delete = pb::DeleteConversationRequest { name: parent, etag };
        prop_assert!(refused_with_fields(validate::delete(&delete)));
    }

    #[test]
    fn batch_get_and_list_events_requests(
        parent in name(),
        names in proptest::collection::vec(name(), 0..110),
        page_size in any::<i32>(),
        page_token in any::<String>(),
        after_sequence in any::<i64>(),
    ) {
        let batch = pb::BatchGetConversationsRequest { parent: parent.clone(), names };
        prop_assert!(refused_with_fields(validate::batch_get(&batch)));
        let events = pb::ListEventsRequest { parent, page_size, page_token, after_sequence };
        prop_assert!(refused_with_fields(validate::list_events(&events)));
    }
}
