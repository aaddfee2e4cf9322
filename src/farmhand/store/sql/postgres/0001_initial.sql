-- farmhand PostgreSQL schema, version 1.
-- The same records as the SQLite schema: every record table keeps the full contract as
-- JSON text in `body` (exactly as written) beside the columns it is queried by. Times are
-- epoch seconds in double precision, as the contracts carry them, so that a value written
-- is the value read back.

CREATE TABLE intents (
    seq           bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id            text    NOT NULL UNIQUE,
    key           text    NOT NULL UNIQUE,
    kind          text    NOT NULL,
    account       text    NOT NULL,
    agent         text    NOT NULL,
    payload_hash  text    NOT NULL,
    body          text    NOT NULL,          -- the Intent contract, never rewritten
    state         text    NOT NULL,
    ready_at      float8  NOT NULL,          -- pending/retry_wait: earliest claim time
    expires_at    float8,
    attempts      integer NOT NULL DEFAULT 0,
    max_attempts  integer NOT NULL,
    lease_owner   text,
    lease_token   bigint  NOT NULL DEFAULT 0,
    lease_expires float8,
    reason        text,
    created_at    float8  NOT NULL,
    updated_at    float8  NOT NULL
) WITH (fillfactor = 80);
-- (each intent's row is updated about three times: free room on its page lets the new
-- version stay there, as a HOT update when no indexed column changed, and keeps the WAL
-- record small; VACUUM frees the old versions)

-- The claim path: ready intents in order, and running leases by expiry. Both stay small
-- (only rows in those states), however many finished intents the table holds.
CREATE INDEX intents_ready ON intents (ready_at, seq) WHERE state IN ('pending', 'retry_wait');
CREATE INDEX intents_leased ON intents (lease_expires) WHERE state = 'running';
-- Listing by state: the rare states (dead letters, unknown outcomes, cancelled, expired)
-- have an index; the common ones are dense among the newest rows, where a listing starts.
-- Leaving them out spares every claim and every success an index entry.
CREATE INDEX intents_settled ON intents (state, seq)
    WHERE state NOT IN ('pending', 'retry_wait', 'running', 'succeeded');

-- The durable "attempt started" record, written before the connector is called.
CREATE TABLE attempts (
    intent_id     text    NOT NULL,
    attempt       integer NOT NULL,
    executor      text    NOT NULL,
    fencing_token bigint  NOT NULL,
    started_at    float8  NOT NULL,
    PRIMARY KEY (intent_id, attempt)
);

-- Outcomes of attempts: successes and one failure record per failed attempt.
CREATE TABLE receipts (
    seq         bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id          text    NOT NULL UNIQUE,
    intent_id   text    NOT NULL,
    attempt     integer NOT NULL,
    outcome     text    NOT NULL,
    finished_at float8  NOT NULL,
    body        text    NOT NULL
);

CREATE INDEX receipts_intent ON receipts (intent_id, attempt);

CREATE TABLE audit (
    seq        bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at         float8  NOT NULL,
    actor      text    NOT NULL,
    action     text    NOT NULL,
    intent_id  text,
    from_state text,
    to_state   text,
    reason     text,
    detail     text
);

CREATE INDEX audit_intent ON audit (intent_id, seq);

-- Current kill-switch rule per scope ('' = every kind / every account); history is in audit.
CREATE TABLE gates (
    kind    text NOT NULL,
    account text NOT NULL,
    body    text NOT NULL,
    PRIMARY KEY (kind, account)
);

-- Approvals: append-only, one row per approver decision, the signed contract in `body`.
CREATE TABLE approvals (
    seq        bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id         text    NOT NULL UNIQUE,
    intent_id  text    NOT NULL,
    approver   text    NOT NULL,
    decision   text    NOT NULL,
    created_at float8  NOT NULL,
    body       text    NOT NULL
);

CREATE INDEX approvals_intent ON approvals (intent_id, seq);

-- One row per rate-limit bucket ('account:<name>', 'account:<name>:kind:<kind>'); the
-- row is locked while a take decides, so every connection sees one sequence of takes.
CREATE TABLE buckets (
    name         text   PRIMARY KEY,
    tat          float8 NOT NULL DEFAULT 0,   -- GCRA theoretical arrival time (epoch seconds)
    paused_until float8 NOT NULL DEFAULT 0,   -- every take is refused until then (Retry-After)
    reason       text                         -- why it was last paused
);

-- One row per circuit breaker ('<kind>:<account>'); no row = closed without failures.
CREATE TABLE breakers (
    key         text    PRIMARY KEY,
    state       text    NOT NULL,            -- closed | open | half_open
    failures    integer NOT NULL DEFAULT 0,  -- consecutive failures (closed)
    retry_at    float8,                      -- open: when a probe may go
    probe       text,                        -- half_open: the ticket (intent id) of the probe
    probe_until float8,                      -- half_open: after this another probe may go
    updated_at  float8  NOT NULL
);

-- Change notification: every statement that writes a row sends one NOTIFY on channel
-- 'farmhand' when its transaction commits (PostgreSQL folds repeats within a transaction).
-- The payload names the writing store so that it can skip its own commits; writers outside
-- farmhand send '' and wake everyone. A statement that changed nothing (a claim that found
-- nothing) sends nothing, so idle executors do not wake each other.
CREATE FUNCTION farmhand_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM changed) THEN
        PERFORM pg_notify('farmhand', coalesce(current_setting('farmhand.writer', true), ''));
    END IF;
    RETURN NULL;
END
$$;

-- (a trigger with a transition table may name one event only: one trigger per event)
CREATE TRIGGER intents_insert_notify AFTER INSERT ON intents
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION farmhand_notify();
CREATE TRIGGER intents_update_notify AFTER UPDATE ON intents
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION farmhand_notify();
CREATE TRIGGER attempts_insert_notify AFTER INSERT ON attempts
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION farmhand_notify();
CREATE TRIGGER receipts_insert_notify AFTER INSERT ON receipts
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION farmhand_notify();
CREATE TRIGGER audit_insert_notify AFTER INSERT ON audit
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION farmhand_notify();
CREATE TRIGGER gates_insert_notify AFTER INSERT ON gates
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION farmhand_notify();
CREATE TRIGGER gates_update_notify AFTER UPDATE ON gates
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION farmhand_notify();
CREATE TRIGGER approvals_insert_notify AFTER INSERT ON approvals
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION farmhand_notify();
CREATE TRIGGER buckets_insert_notify AFTER INSERT ON buckets
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION farmhand_notify();
CREATE TRIGGER buckets_update_notify AFTER UPDATE ON buckets
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION farmhand_notify();
CREATE TRIGGER breakers_insert_notify AFTER INSERT ON breakers
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION farmhand_notify();
CREATE TRIGGER breakers_update_notify AFTER UPDATE ON breakers
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION farmhand_notify();
