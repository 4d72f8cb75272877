-- Write fencing. Each shard records the slots it owns; every write to a conversation (or its
-- events) checks, in its own transaction, that this shard owns the team's slot and that the
-- slot is not frozen for a move. A service routing by a stale map can therefore never write
-- to a slot that has moved: it gets an error naming the epoch it must catch up to, refreshes
-- its map and retries (libs/store/src/ownership.rs).
--
-- state:  owned     writes allowed
--         frozen    a move is cutting over: writers wait and retry
--         incoming  a move is copying rows here: only the mover writes
--         gone      moved away at `epoch`: writers must route by a map at least that new
CREATE TABLE slot_ownership (
    slot  smallint PRIMARY KEY CHECK (slot BETWEEN 0 AND 1023),
    -- The shard-map epoch at which the slot last changed state here.
    epoch bigint   NOT NULL,
    state text     NOT NULL CHECK (state IN ('owned', 'frozen', 'incoming', 'gone'))
);

-- The fence. A writer takes a shared advisory lock on the slot (key 'CONV', slot), held to
-- the end of its transaction, and then reads the slot's state with a fresh snapshot (each
-- statement of a volatile function in READ COMMITTED takes one). A freeze takes the same
-- locks exclusively before marking the slots frozen, so it waits out every writer that saw
-- them owned, and every later writer sees them frozen. The mover's own sessions
-- (`SET LOCAL convoy.mover = 'on'`) pass.
CREATE FUNCTION convoy_fence(s smallint) RETURNS void
    LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    found_state text;
    found_epoch bigint;
BEGIN
    IF current_setting('convoy.mover', true) = 'on' THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock_shared(1129270870, s);
    SELECT state, epoch INTO found_state, found_epoch FROM slot_ownership WHERE slot = s;
    IF found_state IS NULL OR found_state IN ('gone', 'incoming') THEN
        RAISE EXCEPTION 'slot % is not owned by this shard', s
            USING ERRCODE = 'CV001', DETAIL = coalesce(found_epoch, 0)::text;
    ELSIF found_state = 'frozen' THEN
        RAISE EXCEPTION 'slot % is frozen for a move', s
            USING ERRCODE = 'CV002', DETAIL = found_epoch::text;
    END IF;
END $$;

CREATE FUNCTION convoy_fence_row() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM convoy_fence(convoy_slot(OLD.team_id));
        RETURN OLD;
    END IF;
    PERFORM convoy_fence(convoy_slot(NEW.team_id));
    RETURN NEW;
END $$;

-- Events are written in batches: one check per statement and slot, not per row.
CREATE FUNCTION convoy_fence_new_rows() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM convoy_fence(s) FROM (SELECT DISTINCT convoy_slot(team_id) AS s FROM new_rows) slots;
    RETURN NULL;
END $$;

CREATE TRIGGER conversations_fence
    BEFORE INSERT OR UPDATE OR DELETE ON conversations
    FOR EACH ROW EXECUTE FUNCTION convoy_fence_row();

CREATE TRIGGER conversation_events_fence_insert
    AFTER INSERT ON conversation_events
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION convoy_fence_new_rows();

CREATE TRIGGER conversation_events_fence_update
    AFTER UPDATE ON conversation_events
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION convoy_fence_new_rows();
