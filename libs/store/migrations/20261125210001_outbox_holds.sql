-- Outbox holds: a slot move's catch-up replays the source shard's outbox past its watermark,
-- so the rows it has not replayed yet must outlive the purge of published rows, however
-- long the move takes. The shard-router sets a hold on the source before the move's first
-- watermark, advances it to each watermark it records, and drops it when the operation
-- ends (done, cancelled or failed); a leading router also drops holds whose operation is
-- finished or gone. The purge keeps every row past the least hold.
CREATE TABLE outbox_holds (
    -- The slot move's operation id (its etcd record).
    operation_id text        PRIMARY KEY,
    -- Rows with a larger id are kept: the move may still need them.
    after_id     bigint      NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
