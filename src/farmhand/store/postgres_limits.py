"""Rate-limit buckets (GCRA) and circuit breakers on the PostgreSQL store.

The bodies of :class:`farmhand.store.postgres.PostgresStore`'s ``take``, ``peek``, ``pause``
and ``breaker_*`` methods, and the bucket reads and writes of a start that takes tokens; the
decisions are :mod:`farmhand.store.limits_logic`, shared with the SQLite store. A writing
function runs inside the caller's transaction (and pipeline): it locks the rows it decides
on (``FOR UPDATE``, in name order so that two callers never wait on each other in a cycle),
and only then reads ``now``, so that every connection, in every process, sees one sequence
of decisions on one timeline. Each returns whether it wrote.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from psycopg import AsyncConnection, AsyncCursor

from farmhand.clock import Clock
from farmhand.config import BreakerConfig
from farmhand.store import limits_logic as logic
from farmhand.store.base import BreakerResult, BreakerStatus, Bucket, Throttle

Conn = AsyncConnection[tuple[Any, ...]]
Cursor = AsyncCursor[tuple[Any, ...]]

#: the server's clock, read once the locks are held (when no test clock is given)
SERVER_NOW = "SELECT extract(epoch FROM clock_timestamp())::float8"
_BUCKETS = "SELECT name, tat, paused_until, reason FROM buckets WHERE name = ANY(%b::text[])"
_BREAKERS = (
    "SELECT key, state, failures, retry_at, probe, probe_until FROM breakers"
    " WHERE key = ANY(%b::text[])"
)
_ENSURE_BUCKETS = (
    "INSERT INTO buckets (name) SELECT unnest(%b::text[]) ORDER BY 1 ON CONFLICT DO NOTHING"
)
_ENSURE_BREAKERS = (
    "INSERT INTO breakers (key, state, updated_at)"
    " SELECT k, 'closed', coalesce(%s::float8, extract(epoch FROM statement_timestamp())::float8)"
    " FROM unnest(%b::text[]) AS k ORDER BY 1 ON CONFLICT DO NOTHING"
)
_SAVE_TATS = (
    "UPDATE buckets SET tat = t.tat FROM unnest(%b::text[], %b::float8[]) AS t(name, tat)"
    " WHERE buckets.name = t.name"
)
_SAVE_BREAKERS = (
    "INSERT INTO breakers (key, state, failures, retry_at, probe, probe_until, updated_at)"
    " SELECT t.*, %s FROM unnest(%b::text[], %b::text[], %b::int[], %b::float8[], %b::text[],"
    " %b::float8[]) AS t ON CONFLICT (key) DO UPDATE SET state = excluded.state,"
    " failures = excluded.failures, retry_at = excluded.retry_at, probe = excluded.probe,"
    " probe_until = excluded.probe_until, updated_at = excluded.updated_at"
)
_AUDIT = (
    "INSERT INTO audit (at, actor, action, reason, detail)"
    " SELECT %s, %s, t.action, t.reason, t.detail"
    " FROM unnest(%b::text[], %b::text[], %b::text[]) WITH ORDINALITY AS t(action, reason, detail)"
    " ORDER BY t.ordinality"
)


async def fetch_now(
    conn: Conn, clock: Clock | None, cur: Cursor
) -> tuple[list[tuple[Any, ...]], float]:
    """The rows of ``cur`` (a locking read, already sent) and ``now`` read after them: in
    a pipeline the server's clock is read by the next statement, after the locks."""
    if clock is None:
        timer = await conn.execute(SERVER_NOW)
        rows = await cur.fetchall()
        row = await timer.fetchone()
        assert row is not None
        return rows, float(row[0])
    rows = await cur.fetchall()
    return rows, clock.now()


async def _audit(conn: Conn, now: float, actor: str, notes: Sequence[logic.AuditNote]) -> None:
    if notes:
        await conn.execute(
            _AUDIT,
            (
                now,
                actor,
                [n.action for n in notes],
                [n.reason for n in notes],
                [json.dumps(n.detail) for n in notes],
            ),
        )


# -- buckets ----------------------------------------------------------------------------------


async def _bucket_rows(conn: Conn, names: Sequence[str], lock: bool) -> Cursor:
    sql = _BUCKETS + (" ORDER BY name FOR UPDATE" if lock else "")
    return await conn.execute(sql, (sorted(set(names)),))


def buckets(rows: list[tuple[Any, ...]]) -> dict[str, logic.BucketRow]:
    """The bucket rows a :func:`lock_buckets` cursor returned, by name."""
    return {name: (tat, paused, reason) for name, tat, paused, reason in rows}


async def lock_buckets(conn: Conn, requests: Sequence[Sequence[Bucket]]) -> Cursor:
    """Send the read of the buckets ``requests`` name, locked when one of them has a limit
    (its row then created first); the caller fetches it, having sent what reads ``now``."""
    names = [b.name for request in requests for b in request]
    limited = sorted({b.name for request in requests for b in request if b.limit is not None})
    if limited:
        # a row must exist to be locked: the first take of a bucket creates it
        await conn.execute(_ENSURE_BUCKETS, (limited,))
    return await _bucket_rows(conn, names, lock=bool(limited))


async def save_tats(conn: Conn, changed: dict[str, float]) -> None:
    """Write the new ``tat`` of each bucket in ``changed`` (sent, not waited for)."""
    if changed:
        await conn.execute(_SAVE_TATS, (list(changed), list(changed.values())))


async def take(
    conn: Conn, clock: Clock | None, requests: Sequence[Sequence[Bucket]]
) -> tuple[list[Throttle], bool]:
    """Take a token from every bucket of each request, in order, or none. Requests that
    name no limited bucket only read (a pause is all that can hold them)."""
    rows, now = await fetch_now(conn, clock, await lock_buckets(conn, requests))
    out, changed = logic.take(requests, buckets(rows), now)
    await save_tats(conn, changed)
    return out, bool(changed)


async def peek(conn: Conn, clock: Clock | None, request: Sequence[Bucket]) -> Throttle:
    """What :func:`take` would answer for ``request`` now; reads only."""
    cur = await _bucket_rows(conn, [b.name for b in request], lock=False)
    rows, now = await fetch_now(conn, clock, cur)
    return logic.judge(request, buckets(rows), now)


async def pause(
    conn: Conn, clock: Clock | None, bucket: str, until: float, reason: str, actor: str
) -> tuple[float, bool]:
    """Extend ``bucket``'s pause to ``until`` (never shorten it), auditing a new pause or a
    long enough extension. The pause end afterwards."""
    await conn.execute(_ENSURE_BUCKETS, ([bucket],))
    rows, now = await fetch_now(conn, clock, await _bucket_rows(conn, [bucket], lock=True))
    current = buckets(rows).get(bucket, logic.NO_BUCKET)[1]
    end, note = logic.pause(current, bucket, until, reason, now)
    if end == current:
        return current, False
    await conn.execute(
        "UPDATE buckets SET paused_until = %s, reason = %s WHERE name = %s", (end, reason, bucket)
    )
    await _audit(conn, now, actor, [note] if note else [])
    return end, True


# -- breakers ---------------------------------------------------------------------------------


def _breakers(rows: list[tuple[Any, ...]]) -> dict[str, logic.BreakerRow]:
    return {
        key: (state, failures, retry_at, probe, probe_until)
        for key, state, failures, retry_at, probe, probe_until in rows
    }


async def breaker_rows(conn: Conn, keys: Sequence[str]) -> dict[str, logic.BreakerRow]:
    """The stored state of the breakers named, unlocked (no row: closed, no failures)."""
    cur = await conn.execute(_BREAKERS, (sorted(set(keys)),))
    return _breakers(await cur.fetchall())


async def _locked(
    conn: Conn, clock: Clock | None, keys: Sequence[str]
) -> tuple[dict[str, logic.BreakerRow], float]:
    cur = await conn.execute(_BREAKERS + " ORDER BY key FOR UPDATE", (sorted(set(keys)),))
    rows, now = await fetch_now(conn, clock, cur)
    return _breakers(rows), now


async def _save(conn: Conn, now: float, saves: dict[str, logic.BreakerRow]) -> None:
    if saves:
        rows = list(saves.values())
        await conn.execute(
            _SAVE_BREAKERS,
            (now, list(saves), *([row[i] for row in rows] for i in range(5))),
        )


async def breaker_enter(
    conn: Conn,
    clock: Clock | None,
    entries: Sequence[tuple[str, str]],
    actor: str,
    probe_ttl: float,
) -> tuple[list[BreakerStatus], bool]:
    """May each ``(key, ticket)`` call go? At most one probe per open breaker whose
    cool-down has passed, across every connection: the row lock decides. The caller skips
    this (and its transaction) when :func:`breaker_rows` finds every breaker closed."""
    # a breaker without a row is closed and stays closed here: only existing rows matter
    rows, now = await _locked(conn, clock, [key for key, _ in entries])
    out, saves, notes = logic.breaker_enter(entries, rows, now, probe_ttl)
    await _save(conn, now, saves)
    await _audit(conn, now, actor, notes)
    return out, bool(saves)


async def breaker_record(
    conn: Conn,
    clock: Clock | None,
    results: Sequence[BreakerResult],
    config: BreakerConfig,
    actor: str,
) -> tuple[dict[str, BreakerStatus], bool]:
    """Record call results in order. The caller skips this (and its transaction) when every
    result is a success and :func:`breaker_rows` finds each breaker closed, no failures."""
    failing = sorted({r.key for r in results if not r.ok})
    if failing:
        # a first failure must count once however many connections report one at a time
        await conn.execute(_ENSURE_BREAKERS, (clock.now() if clock else None, failing))
    rows, now = await _locked(conn, clock, [r.key for r in results])
    out, saves, notes = logic.breaker_record(results, rows, now, config)
    await _save(conn, now, saves)
    await _audit(conn, now, actor, notes)
    return out, bool(saves)


async def breaker_peek(conn: Conn, clock: Clock | None, key: str) -> BreakerStatus:
    """A breaker's state without entering it; reads only."""
    rows, now = await fetch_now(conn, clock, await conn.execute(_BREAKERS, ([key],)))
    return logic.breaker_status(_breakers(rows).get(key, logic.CLOSED), now)
