-- farmhand PostgreSQL schema, version 4: an outcome wakes executors only when it gives
-- them work, and a gate change says that it is one.
--
-- Version 2 made every statement that left an intent in another state than running
-- notify, and receipts notified too. So each finished call woke every other executor for
-- a claim that found nothing: at 200 intents/s and two executors, half the claims and
-- readiness reads were for nothing. What gives an executor work is an intent left pending
-- or retry_wait; only that notifies now. (A draining executor that waits for the others'
-- leases to end looks again on its own every 50 ms; an expiring lease is found by the
-- executors' readiness timer, as before.)
CREATE OR REPLACE FUNCTION farmhand_notify_unless_running() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM changed WHERE state IN ('pending', 'retry_wait')) THEN
        PERFORM pg_notify('farmhand', coalesce(current_setting('farmhand.writer', true), ''));
    END IF;
    RETURN NULL;
END
$$;

-- receipts are written only beside an intent's update, whose trigger decides
DROP TRIGGER receipts_insert_notify ON receipts;

-- A gate change notifies with the payload 'gates', which every store counts, its own
-- writer included: stores keep a copy of the gates until the next such notification.
CREATE FUNCTION farmhand_notify_gates() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('farmhand', 'gates');
    RETURN NULL;
END
$$;

DROP TRIGGER gates_insert_notify ON gates;
DROP TRIGGER gates_update_notify ON gates;
CREATE TRIGGER gates_notify AFTER INSERT OR UPDATE ON gates
    FOR EACH STATEMENT EXECUTE FUNCTION farmhand_notify_gates();
