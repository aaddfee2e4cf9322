-- Central rate limits and circuit breakers, shared by every executor on the store.
-- Changes of state that matter to a human (a pause, a breaker opening or closing) are also
-- written to `audit`; these tables hold only the current state.

-- One row per rate-limit bucket ('account:<name>', 'account:<name>:kind:<kind>').
CREATE TABLE buckets (
    name         TEXT PRIMARY KEY,
    tat          REAL NOT NULL DEFAULT 0,   -- GCRA theoretical arrival time (epoch seconds)
    paused_until REAL NOT NULL DEFAULT 0,   -- every take is refused until then (Retry-After)
    reason       TEXT                       -- why it was last paused
) WITHOUT ROWID;

-- One row per circuit breaker ('<kind>:<account>'); no row = closed without failures.
CREATE TABLE breakers (
    key         TEXT    PRIMARY KEY,
    state       TEXT    NOT NULL,            -- closed | open | half_open
    failures    INTEGER NOT NULL DEFAULT 0,  -- consecutive failures (closed)
    retry_at    REAL,                        -- open: when a probe may go
    probe       TEXT,                        -- half_open: the ticket (intent id) of the probe
    probe_until REAL,                        -- half_open: after this another probe may go
    updated_at  REAL    NOT NULL
) WITHOUT ROWID;
