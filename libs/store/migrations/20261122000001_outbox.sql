-- The outbox: every committed write to a conversation leaves one row here, in the same
-- statement or transaction as the write itself, so an invalidation can never be lost between
-- commit and publish. A relay publishes unpublished rows in id order and marks them.
CREATE TABLE outbox (
    id              bigserial   PRIMARY KEY,
    team_id         text        NOT NULL,
    conversation_id uuid        NOT NULL,
    -- The conversation's version after the write (for a delete: the version it had, plus one).
    version         bigint      NOT NULL,
    kind            text        NOT NULL CHECK (kind IN ('created', 'updated', 'deleted', 'events_appended')),
    -- Cache tags the write invalidates (team:<id> for the team's cached analytics).
    tags            text[]      NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    published_at    timestamptz
);

-- The relay's queue: only unpublished rows, in order.
CREATE INDEX outbox_unpublished_idx ON outbox (id) WHERE published_at IS NULL;
