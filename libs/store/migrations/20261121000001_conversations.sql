-- convoy's schema on every shard. Each shard holds the rows of the slots it owns.

-- The slot of a team, computed exactly as the fleet's router does (libs/store/src/slots.rs):
-- the hash partition PostgreSQL picks for `team` among 1024 partitions. hash_combine64(0, h)
-- is h + 0x49a0f4dd15e5a8e3; with 1024 = 2^10 slots only the low ten bits matter, which SQL
-- can add without overflowing a bigint (0x0e3 = 227 are the low ten bits of the constant).
CREATE FUNCTION convoy_slot(team text) RETURNS smallint
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN (((hashtextextended(team, 8816678312871386365) & 1023) + 227) & 1023)::smallint;

CREATE TABLE conversations (
    team_id             text        NOT NULL,
    id                  uuid        NOT NULL,
    slot                smallint    NOT NULL GENERATED ALWAYS AS (convoy_slot(team_id)) STORED,
    title               text        NOT NULL,
    intent              text        NOT NULL CHECK (intent IN
                            ('debug', 'feature', 'refactor', 'review', 'explain', 'test', 'docs', 'other')),
    status              text        NOT NULL CHECK (status IN ('active', 'completed', 'abandoned', 'archived')),
    content             text        NOT NULL DEFAULT '',
    metadata            jsonb       NOT NULL DEFAULT '{}',
    effectiveness_score double precision CHECK (effectiveness_score BETWEEN 0 AND 1),
    message_count       bigint      NOT NULL DEFAULT 0,
    event_count         bigint      NOT NULL DEFAULT 0,
    duration_seconds    double precision NOT NULL DEFAULT 0,
    input_tokens        bigint      NOT NULL DEFAULT 0,
    output_tokens       bigint      NOT NULL DEFAULT 0,
    cache_creation_input_tokens bigint NOT NULL DEFAULT 0,
    cache_read_input_tokens     bigint NOT NULL DEFAULT 0,
    first_event_at      timestamptz,
    last_event_at       timestamptz,
    version             bigint      NOT NULL DEFAULT 1,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    -- Title weighs more than content in search ranking.
    search_vector       tsvector    NOT NULL GENERATED ALWAYS AS (
                            setweight(to_tsvector('english', title), 'A') ||
                            setweight(to_tsvector('english', content), 'B')) STORED,
    PRIMARY KEY (team_id, id)
);

-- Newest-first listing with keyset pagination on (created_at, id); intent stays in the key so
-- an intent filter is checked inside the index. This is the spec's (team_id, created_at DESC,
-- intent) index with the id added as the keyset tie-breaker, so a page is a pure range scan.
CREATE INDEX conversations_team_created_idx
    ON conversations (team_id, created_at DESC, id DESC, intent);

-- Active conversations are the hot working set of dashboards.
CREATE INDEX conversations_team_active_idx
    ON conversations (team_id, created_at DESC, id DESC)
    WHERE status = 'active';

-- Analytics read these columns with index-only scans.
CREATE INDEX conversations_team_analytics_idx
    ON conversations (team_id, created_at)
    INCLUDE (intent, status, duration_seconds, effectiveness_score, message_count);

-- Full-text search. The planner combines it with the primary key's team_id prefix
-- (BitmapAnd); a (team_id, search_vector) btree_gin index was measured and not chosen.
CREATE INDEX conversations_search_idx ON conversations USING gin (search_vector);

-- Slot moves (resharding) select rows by slot.
CREATE INDEX conversations_slot_idx ON conversations (slot);

CREATE TABLE conversation_events (
    team_id             text        NOT NULL,
    conversation_id     uuid        NOT NULL,
    sequence            bigint      NOT NULL,
    event_id            text,
    parent_event_id     text,
    kind                text        NOT NULL CHECK (kind IN
                            ('message', 'tool_call', 'tool_result', 'error', 'system', 'raw')),
    role                text        CHECK (role IN ('user', 'assistant', 'system', 'tool')),
    occurred_at         timestamptz NOT NULL,
    content             text        NOT NULL DEFAULT '',
    tool_name           text,
    tool_call_id        text,
    is_error            boolean     NOT NULL DEFAULT false,
    model               text,
    input_tokens        bigint      NOT NULL DEFAULT 0,
    output_tokens       bigint      NOT NULL DEFAULT 0,
    cache_creation_input_tokens bigint NOT NULL DEFAULT 0,
    cache_read_input_tokens     bigint NOT NULL DEFAULT 0,
    is_sidechain        boolean     NOT NULL DEFAULT false,
    raw_json            jsonb,
    inserted_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (team_id, conversation_id, sequence),
    FOREIGN KEY (team_id, conversation_id) REFERENCES conversations (team_id, id) ON DELETE CASCADE
);

-- Re-sending a source event is a no-op.
CREATE UNIQUE INDEX conversation_events_source_idx
    ON conversation_events (team_id, conversation_id, event_id)
    WHERE event_id IS NOT NULL;

-- Events arrive roughly in time order: a BRIN index is tiny and serves time-range scans.
CREATE INDEX conversation_events_occurred_brin ON conversation_events USING brin (occurred_at);

-- Idempotent creates: a request_id maps to the conversation its first call created.
CREATE TABLE create_requests (
    team_id         text        NOT NULL,
    request_id      uuid        NOT NULL,
    conversation_id uuid        NOT NULL,
    fingerprint     bytea       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (team_id, request_id)
);

CREATE INDEX create_requests_created_brin ON create_requests USING brin (created_at);
