-- Wakes outbox relays at commit instead of leaving them to their next poll: each statement
-- that adds outbox rows sends one notification on `convoy_outbox`, delivered when (and only
-- if) its transaction commits; Postgres folds identical notifications of one transaction
-- into one. Relays still poll, rarely, for notifications lost while they reconnect.
CREATE FUNCTION convoy_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('convoy_outbox', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_notify
    AFTER INSERT ON outbox
    FOR EACH STATEMENT
    EXECUTE FUNCTION convoy_outbox_notify();
