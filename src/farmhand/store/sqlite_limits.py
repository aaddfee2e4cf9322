"""Rate-limit buckets (GCRA) and circuit breakers on the SQLite store.

The bodies of :class:`farmhand.store.sqlite.SQLiteStore`'s ``take``, ``peek``, ``pause`` and
``breaker_*`` methods. Each function runs inside the caller's transaction (or, where it only
reads, on a plain snapshot) with ``now`` read from the store's clock after the write lock
was taken, so every executor sees one timeline. The decisions themselves are in
:mod:`farmhand.store.limits_logic`, shared with the other stores.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from typing import Any

from farmhand.config import BreakerConfig
from farmhand.contracts import GateRule
from farmhand.store import limits_logic as logic
from farmhand.store.base import BreakerResult, BreakerStatus, Bucket, Guard, Held, Throttle
from farmhand.store.limits_logic import PAUSE_AUDIT_STEP, gcra_tokens, gcra_wait

__all__ = [
    "PAUSE_AUDIT_STEP",
    "breaker_enter",
    "breaker_peek",
    "breaker_record",
    "gcra_tokens",
    "gcra_wait",
    "pause",
    "peek",
    "quiet",
    "select_in",
    "take",
]


def _audit(
    db: sqlite3.Connection, now: float, notes: Sequence[logic.AuditNote], actor: str
) -> None:
    db.executemany(
        "INSERT INTO audit (at, actor, action, intent_id, from_state, to_state, reason, detail)"
        " VALUES (?, ?, ?, NULL, NULL, NULL, ?, ?)",
        [(now, actor, n.action, n.reason, json.dumps(n.detail)) for n in notes],
    )


def select_in(
    db: sqlite3.Connection, sql: str, values: Sequence[str], suffix: str = ""
) -> Iterator[Any]:
    """Rows of ``sql`` + `` IN (values)`` + ``suffix``, in chunks that stay under SQLite's
    parameter limit. Duplicate values are asked for once."""
    unique = list(dict.fromkeys(values))
    for start in range(0, len(unique), 500):
        chunk = unique[start : start + 500]
        yield from db.execute(f"{sql} IN ({','.join('?' * len(chunk))}){suffix}", chunk)


# -- buckets ----------------------------------------------------------------------------------


def _bucket_rows(db: sqlite3.Connection, names: Sequence[str]) -> dict[str, logic.BucketRow]:
    rows = select_in(db, "SELECT name, tat, paused_until, reason FROM buckets WHERE name", names)
    return {name: (tat, paused_until, reason) for name, tat, paused_until, reason in rows}


def take(
    db: sqlite3.Connection, now: float, requests: Sequence[Sequence[Bucket]]
) -> list[Throttle]:
    """Take a token from every bucket of each request, in order, or none.

    Writes only when some bucket has a limit: a request of unlimited buckets only checks
    for pauses, so the caller may run it outside a transaction.
    """
    rows = _bucket_rows(db, [b.name for request in requests for b in request])
    out, changed = logic.take(requests, rows, now)
    save_tats(db, changed)
    return out


def save_tats(db: sqlite3.Connection, changed: dict[str, float]) -> None:
    """Write the new ``tat`` of each bucket in ``changed`` (tokens taken)."""
    if changed:
        db.executemany(
            "INSERT INTO buckets (name, tat) VALUES (?, ?)"
            " ON CONFLICT (name) DO UPDATE SET tat = excluded.tat",
            list(changed.items()),
        )


def peek(db: sqlite3.Connection, now: float, request: Sequence[Bucket]) -> Throttle:
    """What :func:`take` would answer for ``request`` now; reads only."""
    rows = _bucket_rows(db, [b.name for b in request])
    return logic.judge(request, rows, now)


def pause(
    db: sqlite3.Connection, now: float, bucket: str, until: float, reason: str, actor: str
) -> float:
    """Extend ``bucket``'s pause to ``until`` (never shorten it); audit a new pause or an
    extension by at least :data:`PAUSE_AUDIT_STEP`. The pause end afterwards."""
    row = db.execute("SELECT paused_until FROM buckets WHERE name = ?", (bucket,)).fetchone()
    current = float(row[0]) if row else 0.0
    end, note = logic.pause(current, bucket, until, reason, now)
    if end == current:
        return current
    db.execute(
        "INSERT INTO buckets (name, paused_until, reason) VALUES (?, ?, ?)"
        " ON CONFLICT (name) DO UPDATE SET paused_until = excluded.paused_until,"
        " reason = excluded.reason",
        (bucket, end, reason),
    )
    if note is not None:
        _audit(db, now, [note], actor)
    return end


# -- breakers ---------------------------------------------------------------------------------


def _breaker_rows(db: sqlite3.Connection, keys: Sequence[str]) -> dict[str, logic.BreakerRow]:
    rows = select_in(
        db,
        "SELECT key, state, failures, retry_at, probe, probe_until FROM breakers WHERE key",
        keys,
    )
    return {
        key: (state, failures, retry_at, probe, probe_until)
        for key, state, failures, retry_at, probe, probe_until in rows
    }


def quiet(db: sqlite3.Connection, keys: Sequence[str], *, failures: bool = False) -> bool:
    """Whether every breaker in ``keys`` is closed (and, with ``failures``, has none)."""
    return logic.quiet(_breaker_rows(db, keys), failures=failures)


def _save(db: sqlite3.Connection, saves: dict[str, logic.BreakerRow], now: float) -> None:
    db.executemany(
        "INSERT INTO breakers (key, state, failures, retry_at, probe, probe_until, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET state = excluded.state,"
        " failures = excluded.failures, retry_at = excluded.retry_at, probe = excluded.probe,"
        " probe_until = excluded.probe_until, updated_at = excluded.updated_at",
        [(key, *row, now) for key, row in saves.items()],
    )


def breaker_enter(
    db: sqlite3.Connection,
    now: float,
    entries: Sequence[tuple[str, str]],
    actor: str,
    probe_ttl: float,
) -> list[BreakerStatus]:
    """May each ``(key, ticket)`` call go? Grants at most one probe per open breaker whose
    cool-down has passed (or whose last probe's time ran out). Run in a transaction."""
    rows = _breaker_rows(db, [key for key, _ in entries])
    out, saves, notes = logic.breaker_enter(entries, rows, now, probe_ttl)
    _save(db, saves, now)
    _audit(db, now, notes, actor)
    return out


def breaker_record(
    db: sqlite3.Connection,
    now: float,
    results: Sequence[BreakerResult],
    config: BreakerConfig,
    actor: str,
) -> dict[str, BreakerStatus]:
    """Apply results in order (see :meth:`farmhand.store.base.Store.breaker_record`)."""
    rows = _breaker_rows(db, [r.key for r in results])
    out, saves, notes = logic.breaker_record(results, rows, now, config)
    _save(db, saves, now)
    _audit(db, now, notes, actor)
    return out


def breaker_peek(db: sqlite3.Connection, now: float, key: str) -> BreakerStatus:
    """The state of one breaker; reads only."""
    return logic.breaker_status(_breaker_rows(db, [key]).get(key, logic.CLOSED), now)


def held(
    db: sqlite3.Connection, guards: Sequence[Guard], now: float
) -> tuple[list[Held | None], dict[str, logic.BucketRow]]:
    """What holds back each guarded start at ``now`` (read in the caller's transaction), and
    the rows of the buckets the guards name, to take tokens from."""
    closed = [
        rule
        for (body,) in db.execute("SELECT body FROM gates")
        if not (rule := GateRule.model_validate_json(body)).open
    ]
    names, keys = logic.guarded_rows(guards)
    buckets, breakers = _bucket_rows(db, names), _breaker_rows(db, keys)
    return [logic.held_by(guard, closed, buckets, breakers, now) for guard in guards], buckets
