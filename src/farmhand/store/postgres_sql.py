"""The statements of :mod:`farmhand.store.postgres`, one per store primitive.

Each batch goes in as one JSON array of records (``json_to_recordset``: serialised by the
C JSON encoder, where psycopg would dump array parameters element by element in Python)
and comes back through ``RETURNING``, so a batch of any size is one statement;
data-modifying CTEs write the audit rows in the same statement. ``now`` is the test
clock's time when one is passed, else the server's ``statement_timestamp()``: one value
for every row a statement touches, and a constant the planner can use as an index bound.
``{gate}`` is replaced by the gate filter.
"""

from __future__ import annotations

from farmhand.contracts.state import TRANSITIONS

#: the statement's time: the first parameter, or the server's clock when it is NULL
_STAMP = (
    "t AS (SELECT coalesce(%s::float8, extract(epoch FROM statement_timestamp())::float8) AS now)"
)

PUT_INTENTS = f"""
WITH {_STAMP},
input AS (
    SELECT * FROM json_to_recordset(%s::json)
        AS u(id text, key text, kind text, account text, agent text, payload_hash text,
             body text, state text, ready_at float8, expires_at float8, max_attempts int,
             created_at float8, actor text, ord int)
),
added AS (
    INSERT INTO intents (id, key, kind, account, agent, payload_hash, body, state, ready_at,
                         expires_at, max_attempts, created_at, updated_at)
    SELECT u.id, u.key, u.kind, u.account, u.agent, u.payload_hash, u.body, u.state,
           coalesce(u.ready_at, t.now), u.expires_at, u.max_attempts, u.created_at, t.now
    FROM input u CROSS JOIN t
    ORDER BY u.ord
    ON CONFLICT (key) DO NOTHING
    RETURNING id, key, state, updated_at, ready_at
),
logged AS (
    INSERT INTO audit (at, actor, action, intent_id, to_state)
    SELECT a.updated_at, u.actor, 'submit', a.id, a.state
    FROM added a JOIN input u ON u.key = a.key
    ORDER BY u.ord
)
SELECT key, updated_at, ready_at FROM added
"""

#: an intent with its receipts (oldest first), then its key; append a WHERE clause
STATUSES = """
SELECT i.body, i.state, i.attempts, i.max_attempts, i.reason, i.updated_at, i.ready_at,
       i.lease_owner, i.lease_token,
       ARRAY(SELECT r.body FROM receipts r WHERE r.intent_id = i.id ORDER BY r.seq),
       i.key
FROM intents i"""

# Running leases (and the earliest expiry) and the earliest ready time, of the scopes no
# closed gate blocks: when an idle executor should look again. {fresh}: rows whose lease
# expiry and ready time still hold (a claim leaves out those it has just leased).
_READINESS = """
SELECT leased.n, leased.expires, ready.at
FROM (SELECT count(*) AS n, min(lease_expires) FILTER (WHERE {fresh}) AS expires
      FROM intents WHERE state = 'running'{gate}) AS leased,
     (SELECT min(ready_at) AS at FROM intents
      WHERE state IN ('pending', 'retry_wait') AND {fresh}{gate}) AS ready
"""
READINESS = _READINESS.replace("{fresh}", "TRUE")

# Expired leases first, then ready intents, each in the order of its partial index; rows
# another claimer holds are skipped, never waited for. An attempt started under an earlier
# lease without a receipt is returned with the claim (the outcome is unknown).
CLAIM = """
WITH t AS (
    SELECT coalesce(%(now)s::float8, extract(epoch FROM statement_timestamp())::float8) AS now
),
expired AS (
    SELECT seq, state, lease_expires AS rank FROM intents
    WHERE state = 'running' AND lease_expires <= (SELECT now FROM t){gate}
    ORDER BY lease_expires
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
),
ready AS (
    SELECT seq, state, ready_at AS rank FROM intents
    WHERE state IN ('pending', 'retry_wait') AND ready_at <= (SELECT now FROM t){gate}
    ORDER BY ready_at, seq
    LIMIT greatest(%(limit)s - (SELECT count(*) FROM expired), 0)
    FOR UPDATE SKIP LOCKED
),
picked AS (
    SELECT seq, state, 0 AS part, rank FROM expired
    UNION ALL
    SELECT seq, state, 1 AS part, rank FROM ready
),
claimed AS (
    UPDATE intents i
    SET state = 'running', lease_owner = %(owner)s, lease_token = i.lease_token + 1,
        lease_expires = t.now + %(ttl)s::float8, updated_at = t.now
    FROM picked p CROSS JOIN t
    WHERE i.seq = p.seq
    RETURNING i.seq, i.id, i.body, i.lease_token, i.lease_expires, i.attempts, i.max_attempts,
              p.state AS previous, p.part, p.rank, t.now
),
logged AS (
    INSERT INTO audit (at, actor, action, intent_id, from_state, to_state)
    SELECT now, %(owner)s, 'claim', id, previous, 'running' FROM claimed
    ORDER BY part, rank, seq
)
(SELECT c.id, c.body, c.lease_token, c.lease_expires, c.attempts, c.max_attempts,
        c.previous, a.executor, a.fencing_token, a.started_at
 FROM claimed c
 LEFT JOIN LATERAL (
     SELECT a.executor, a.fencing_token, a.started_at FROM attempts a
     WHERE c.attempts > 0 AND a.intent_id = c.id AND a.attempt = c.attempts
       AND NOT EXISTS (SELECT 1 FROM receipts r
                       WHERE r.intent_id = a.intent_id AND r.attempt = a.attempt)
 ) a ON TRUE
 ORDER BY c.part, c.rank, c.seq)
UNION ALL
-- claimed fewer than asked, so nothing more was claimable: a last row with no id and what
-- READINESS answers once this statement is done (the leases it took running until now +
-- ttl), which the executor asks for next
SELECT NULL, NULL, r.n + (SELECT count(*) FROM claimed WHERE previous <> 'running'),
       least(r.expires, (SELECT min(lease_expires) FROM claimed)),
       NULL, NULL, NULL, NULL, NULL, r.at
FROM ({readiness}) AS r (n, expires, at)
WHERE (SELECT count(*) FROM claimed) < %(limit)s
""".replace(
    "{readiness}",
    _READINESS.replace("{fresh}", "seq NOT IN (SELECT seq FROM picked)").strip(),
)

#: the starts of a batch, one row each (conv.start_record)
_START_INPUT = """input AS (
    SELECT * FROM json_to_recordset(%s::json)
        AS u(id text, token bigint, owner text, kind text, account text, buckets json,
             breaker text)
)"""

# What holds back a guarded row (kind not NULL) at t.now: a closed gate covering its kind
# and account, a paused bucket of its own, its breaker (if named) not closed
# (limits_logic.held_by says the same in Python); NULL when nothing does, or unguarded.
_HELD = """CASE WHEN u.kind IS NULL THEN NULL
                WHEN EXISTS (SELECT 1 FROM gates g
                             WHERE g.kind IN ('', u.kind) AND g.account IN ('', u.account)
                               AND NOT (g.body::json->>'open')::boolean) THEN 'gate'
                WHEN EXISTS (SELECT 1 FROM buckets b
                             WHERE b.name IN (SELECT json_array_elements_text(u.buckets))
                               AND b.paused_until > t.now) THEN 'paused'
                WHEN EXISTS (SELECT 1 FROM breakers k
                             WHERE k.key = u.breaker AND k.state <> 'closed') THEN 'breaker'
           END"""

# A row starts if its lease is current and nothing holds it back, judged in this statement;
# else it reports what held it (a lease that is not current returns no row).
START_ATTEMPTS = f"""
WITH {_STAMP},
{_START_INPUT},
judged AS (
    SELECT u.id, u.token, u.owner, {_HELD} AS held
    FROM input u CROSS JOIN t
),
current AS (
    SELECT j.id, j.token, j.owner, j.held FROM judged j JOIN intents i ON i.id = j.id
    CROSS JOIN t
    WHERE i.state = 'running' AND i.lease_token = j.token AND i.lease_expires > t.now
),
started AS (
    UPDATE intents i
    SET attempts = i.attempts + 1, updated_at = t.now
    FROM current c CROSS JOIN t
    WHERE c.held IS NULL AND i.id = c.id
    RETURNING i.id, i.attempts, t.now, c.owner, c.token
),
recorded AS (
    INSERT INTO attempts (intent_id, attempt, executor, fencing_token, started_at)
    SELECT id, attempts, owner, token, now FROM started
)
SELECT id, attempts, now, NULL FROM started
UNION ALL
SELECT id, NULL, NULL, held FROM current WHERE held IS NOT NULL
"""

# The first half of a start that takes tokens, run once the transaction holds the locks of
# the buckets it takes from: per row, ``now`` (the test clock's time, else the server's
# clock read now, after those locks: statement_timestamp() would be when the pipeline sent
# the statement), whether the lease is current then, and what holds it back. The intents
# are locked, in id order, so that the answer still holds when START_ATTEMPTS starts them,
# at that same now, in the same transaction.
JUDGE_STARTS = f"""
WITH t AS (
    SELECT coalesce(%s::float8, extract(epoch FROM clock_timestamp())::float8) AS now
),
{_START_INPUT},
locked AS (
    SELECT id, state, lease_token, lease_expires FROM intents
    WHERE id = ANY(ARRAY(SELECT id FROM input))
    ORDER BY id
    FOR UPDATE
)
SELECT u.id, u.token, t.now,
       coalesce(l.state = 'running' AND l.lease_token = u.token AND l.lease_expires > t.now,
                false),
       {_HELD}
FROM input u CROSS JOIN t LEFT JOIN locked l ON l.id = u.id
"""

RENEW = f"""
WITH {_STAMP}
UPDATE intents i
SET lease_expires = t.now + %s::float8
FROM json_to_recordset(%s::json) AS u(id text, token bigint) CROSS JOIN t
WHERE i.id = u.id AND i.state = 'running' AND i.lease_token = u.token
RETURNING i.id, i.lease_token, i.lease_expires
"""

#: every legal transition as 'from>to', from the one state machine in contracts/state.py
_ALLOWED = (
    "ARRAY["
    + ", ".join(sorted(f"'{a.value}>{b.value}'" for a, to in TRANSITIONS.items() for b in to))
    + "]::text[]"
)

# Each change holds if its intent is running under its token, or (without a token) is in one
# of its from_states; the rows are locked first, in id order, and judged in their latest
# version. A change that holds but that the state machine forbids writes nothing at all:
# the statement then only reports it. A batch names each intent once (see the caller).
APPLY = f"""
WITH {_STAMP},
input AS (
    SELECT * FROM json_to_recordset(%s::json)
        AS c(ord int, id text, to_state text, reason text, ready_at float8, extra int,
             token bigint, from_states text, actor text, action text, receipt_id text,
             receipt_intent text, attempt int, outcome text, finished_at float8,
             receipt text)
),
locked AS (
    SELECT id, state, lease_token FROM intents
    WHERE id = ANY(ARRAY(SELECT id FROM input))
    ORDER BY id
    FOR UPDATE
),
judged AS (
    SELECT c.*, l.state AS was,
           coalesce(CASE WHEN c.token IS NOT NULL
                         THEN l.state = 'running' AND l.lease_token = c.token
                         ELSE l.state = ANY(string_to_array(c.from_states, ',')) END,
                    false) AS holds
    FROM input c LEFT JOIN locked l ON l.id = c.id
),
illegal AS (
    SELECT ord FROM judged
    WHERE holds AND NOT (was || '>' || to_state) = ANY({_ALLOWED})
    ORDER BY ord
    LIMIT 1
),
done AS (
    SELECT * FROM judged WHERE holds AND NOT EXISTS (SELECT 1 FROM illegal)
),
moved AS (
    UPDATE intents i
    SET state = d.to_state, reason = d.reason,
        ready_at = CASE WHEN d.to_state IN ('pending', 'retry_wait')
                        THEN coalesce(d.ready_at, t.now) ELSE t.now END,
        lease_owner = NULL, lease_expires = NULL, max_attempts = i.max_attempts + d.extra,
        updated_at = t.now
    FROM done d CROSS JOIN t
    WHERE i.id = d.id
),
recorded AS (
    INSERT INTO receipts (id, intent_id, attempt, outcome, finished_at, body)
    SELECT receipt_id, receipt_intent, attempt, outcome, finished_at, receipt
    FROM done WHERE receipt_id IS NOT NULL
    ORDER BY ord
),
logged AS (
    INSERT INTO audit (at, actor, action, intent_id, from_state, to_state, reason)
    SELECT t.now, d.actor, d.action, d.id, d.was, d.to_state, d.reason
    FROM done d CROSS JOIN t
    ORDER BY d.ord
)
SELECT j.ord, j.holds, j.was, j.to_state, j.ord IN (SELECT ord FROM illegal)
FROM judged j
ORDER BY j.ord
"""

PUT_APPROVAL = """
WITH added AS (
    INSERT INTO approvals (id, intent_id, approver, decision, created_at, body)
    VALUES (%s, %s, %s, %s, %s, %s)
    RETURNING intent_id, approver, created_at
)
INSERT INTO audit (at, actor, action, intent_id, reason, detail)
SELECT created_at, approver, %s, intent_id, %s, %s FROM added
"""

SET_GATE = """
WITH saved AS (
    INSERT INTO gates (kind, account, body) VALUES (%s, %s, %s)
    ON CONFLICT (kind, account) DO UPDATE SET body = excluded.body
)
INSERT INTO audit (at, actor, action, reason, detail) VALUES (%s, %s, %s, %s, %s)
"""
