-- The Redis server the outbox was last published to, by its run id. A Redis that restarts
-- (or fails over) may come back without the last invalidations it took, even with
-- persistence (the AOF's last second, an older snapshot) while their outbox rows are marked
-- published: the first relay to see a new run id unmarks the rows published recently, and
-- they are published again (duplicates are harmless).
CREATE TABLE relay_state (
    id           int  PRIMARY KEY CHECK (id = 1),
    redis_run_id text NOT NULL DEFAULT ''
);

INSERT INTO relay_state (id) VALUES (1);
