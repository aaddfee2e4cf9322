-- farmhand PostgreSQL schema, version 2: taking, starting and renewing leases wakes no one.
--
-- A claim (an intent becomes running), a started attempt (a running intent's attempt
-- count) and a lease renewal never give another executor anything to do: nothing becomes
-- claimable and nothing stops running. Their NOTIFY only woke every other executor for a
-- claim that found nothing, and, as every transaction that sends a NOTIFY does, took the
-- server-wide notification lock through its commit. Now only a statement that leaves an
-- intent in another state than running (a submit, an outcome, a release, a retry, an
-- approval's move, an outside repair) notifies, as do gates, approvals, rate-limit buckets
-- and breakers, as before. An expiring lease is found by the executors' own readiness
-- timer, never by a notification, so no wake-up is lost.

-- An intents statement notifies when it left at least one row in another state than running.
CREATE FUNCTION farmhand_notify_unless_running() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM changed WHERE state IS DISTINCT FROM 'running') THEN
        PERFORM pg_notify('farmhand', coalesce(current_setting('farmhand.writer', true), ''));
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER intents_update_notify ON intents;
CREATE TRIGGER intents_update_notify AFTER UPDATE ON intents
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT
    EXECUTE FUNCTION farmhand_notify_unless_running();

-- Attempt records are written only beside a running intent's update, and audit events only
-- beside the change they record (whose own table's trigger notifies when it matters): their
-- triggers only made claims and started attempts notify, and copied every row they wrote
-- into a transition table.
DROP TRIGGER attempts_insert_notify ON attempts;
DROP TRIGGER audit_insert_notify ON audit;
