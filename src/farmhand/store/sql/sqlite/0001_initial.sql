-- farmhand SQLite schema, version 1.
-- Every record table keeps the full contract as JSON in `body` beside the columns it is
-- queried by, so a reader can always rebuild the exact contract that was written.

CREATE TABLE intents (
    seq           INTEGER PRIMARY KEY,
    id            TEXT    NOT NULL UNIQUE,
    key           TEXT    NOT NULL UNIQUE,
    kind          TEXT    NOT NULL,
    account       TEXT    NOT NULL,
    agent         TEXT    NOT NULL,
    payload_hash  TEXT    NOT NULL,
    body          TEXT    NOT NULL,          -- the Intent contract, never rewritten
    state         TEXT    NOT NULL,
    ready_at      REAL    NOT NULL,          -- pending/retry_wait: earliest claim time
    expires_at    REAL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    max_attempts  INTEGER NOT NULL,
    lease_owner   TEXT,
    lease_token   INTEGER NOT NULL DEFAULT 0,
    lease_expires REAL,
    reason        TEXT,
    created_at    REAL    NOT NULL,
    updated_at    REAL    NOT NULL
);

CREATE INDEX intents_ready ON intents (ready_at, seq) WHERE state IN ('pending', 'retry_wait');
CREATE INDEX intents_leased ON intents (lease_expires) WHERE state = 'running';
CREATE INDEX intents_state ON intents (state, seq);

-- The durable "attempt started" record, written before the connector is called.
CREATE TABLE attempts (
    intent_id     TEXT    NOT NULL,
    attempt       INTEGER NOT NULL,
    executor      TEXT    NOT NULL,
    fencing_token INTEGER NOT NULL,
    started_at    REAL    NOT NULL,
    PRIMARY KEY (intent_id, attempt)
) WITHOUT ROWID;

-- Outcomes of attempts: successes and one failure record per failed attempt.
CREATE TABLE receipts (
    seq         INTEGER PRIMARY KEY,
    id          TEXT    NOT NULL UNIQUE,
    intent_id   TEXT    NOT NULL,
    attempt     INTEGER NOT NULL,
    outcome     TEXT    NOT NULL,
    finished_at REAL    NOT NULL,
    body        TEXT    NOT NULL
);

CREATE INDEX receipts_intent ON receipts (intent_id, attempt);

CREATE TABLE audit (
    seq        INTEGER PRIMARY KEY,
    at         REAL    NOT NULL,
    actor      TEXT    NOT NULL,
    action     TEXT    NOT NULL,
    intent_id  TEXT,
    from_state TEXT,
    to_state   TEXT,
    reason     TEXT,
    detail     TEXT
);

CREATE INDEX audit_intent ON audit (intent_id, seq);

-- Current kill-switch rule per scope ('' = every kind / every account); history is in audit.
CREATE TABLE gates (
    kind    TEXT NOT NULL,
    account TEXT NOT NULL,
    body    TEXT NOT NULL,
    PRIMARY KEY (kind, account)
);
