-- Approvals: append-only, one row per approver decision, the signed contract in `body`.
CREATE TABLE approvals (
    seq        INTEGER PRIMARY KEY,
    id         TEXT    NOT NULL UNIQUE,
    intent_id  TEXT    NOT NULL,
    approver   TEXT    NOT NULL,
    decision   TEXT    NOT NULL,
    created_at REAL    NOT NULL,
    body       TEXT    NOT NULL
);

CREATE INDEX approvals_intent ON approvals (intent_id, seq);
