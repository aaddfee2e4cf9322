-- farmhand PostgreSQL schema, version 5: a rate-limit token taken wakes no one.
--
-- Every update of a bucket notified, and the tokens an executor takes are updates of their
-- buckets' tat: on a rate-limited account every call woke every other executor for a claim
-- that found nothing. A token taken gives no one work; a pause set or extended (a
-- provider's Retry-After) is the one bucket change that still notifies.
CREATE FUNCTION farmhand_notify_paused() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM changed n JOIN previous o USING (name)
               WHERE n.paused_until IS DISTINCT FROM o.paused_until
                  OR n.reason IS DISTINCT FROM o.reason) THEN
        PERFORM pg_notify('farmhand', coalesce(current_setting('farmhand.writer', true), ''));
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER buckets_update_notify ON buckets;
CREATE TRIGGER buckets_update_notify AFTER UPDATE ON buckets
    REFERENCING OLD TABLE AS previous NEW TABLE AS changed FOR EACH STATEMENT
    EXECUTE FUNCTION farmhand_notify_paused();
