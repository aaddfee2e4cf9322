"""Rate-limit buckets (GCRA) and circuit breakers on the SQLite store.

The bodies of :class:`farmhand.store.sqlite.SQLiteStore`'s ``take``, ``peek``, ``pause`` and
``breaker_*`` methods. Each function runs inside the caller's transaction (or, where it only
reads, on a plain snapshot) with ``now`` read from the store's clock after the write lock
was taken, so every executor sees one timeline.

GCRA keeps one number per bucket, its *theoretical arrival time* ``tat``: with emission
interval ``T = 1 / rate`` a token may be taken at ``now`` iff ``max(tat, now) + T - burst * T
<= now``, and taking one sets ``tat = max(tat, now) + T``. Any ``n`` tokens taken between
``t1`` and ``t2`` then satisfy ``n <= burst + rate * (t2 - t1)``.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterator, Sequence
from typing import Any

from farmhand.config import BreakerConfig, Limit
from farmhand.contracts.base import utc
from farmhand.store.base import BreakerResult, BreakerState, BreakerStatus, Bucket, Throttle

#: a wait shorter than this is no wait: epoch seconds near 1.8e9 carry only ~0.24 us of
#: precision, so sums of intervals round by about that much
_EPSILON = 1e-6
#: an extension of a pause shorter than this is not audited again (one 429 per in-flight
#: call would otherwise write one audit event each)
PAUSE_AUDIT_STEP = 1.0


def _audit(
    db: sqlite3.Connection, now: float, actor: str, action: str, reason: str | None, detail: Any
) -> None:
    db.execute(
        "INSERT INTO audit (at, actor, action, intent_id, from_state, to_state, reason, detail)"
        " VALUES (?, ?, ?, NULL, NULL, NULL, ?, ?)",
        (now, actor, action, reason, json.dumps(detail)),
    )


def _iso(ts: float) -> str:
    return utc(ts).isoformat()


# -- GCRA -------------------------------------------------------------------------------------


def gcra_wait(tat: float, now: float, limit: Limit) -> float:
    """Seconds until one token may be taken from a bucket at ``tat`` (0.0: now)."""
    interval = 1.0 / limit.rate
    wait = max(tat, now) + interval - limit.burst * interval - now
    return wait if wait > _EPSILON else 0.0


def gcra_tokens(tat: float, now: float, limit: Limit) -> int:
    """Whole tokens a bucket at ``tat`` holds at ``now``."""
    interval = 1.0 / limit.rate
    room = (now + limit.burst * interval - max(tat, now)) / interval
    return max(0, min(limit.burst, math.floor(room + _EPSILON)))


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

_BucketRow = tuple[float, float, str | None]  # tat, paused_until, reason


def _bucket_rows(db: sqlite3.Connection, names: Sequence[str]) -> dict[str, _BucketRow]:
    rows = select_in(db, "SELECT name, tat, paused_until, reason FROM buckets WHERE name", names)
    return {name: (tat, paused_until, reason) for name, tat, paused_until, reason in rows}


def _judge(request: Sequence[Bucket], rows: dict[str, _BucketRow], now: float) -> Throttle:
    """The answer for one request against the bucket states in ``rows`` (nothing changed)."""
    refused: Throttle | None = None
    tokens: int | None = None
    for bucket in request:
        tat, paused_until, why = rows.get(bucket.name, (0.0, 0.0, None))
        if bucket.limit is not None:
            left = gcra_tokens(tat, now, bucket.limit)
            tokens = left if tokens is None else min(tokens, left)
        candidate: Throttle | None = None
        if paused_until - now > _EPSILON:
            candidate = Throttle(
                wait=paused_until - now, bucket=bucket.name, paused=why or "paused", tokens=0
            )
        elif bucket.limit is not None:
            wait = gcra_wait(tat, now, bucket.limit)
            if wait > 0.0:
                candidate = Throttle(wait=wait, bucket=bucket.name, tokens=0)
        if candidate is not None and (refused is None or candidate.wait > refused.wait):
            refused = candidate
    if refused is not None:
        return refused
    return Throttle(tokens=tokens)


def take(
    db: sqlite3.Connection, now: float, requests: Sequence[Sequence[Bucket]]
) -> list[Throttle]:
    """Take a token from every bucket of each request, in order, or none (see module doc).

    Writes only when some bucket has a limit: a request of unlimited buckets only checks
    for pauses, so the caller may run it outside a transaction.
    """
    rows = _bucket_rows(db, [b.name for request in requests for b in request])
    changed: dict[str, float] = {}
    out: list[Throttle] = []
    for raw in requests:
        request = list({b.name: b for b in raw}.values())
        answer = _judge(request, rows, now)
        if answer.wait > 0.0:
            out.append(answer)
            continue
        tokens: int | None = None
        emptiest: tuple[float, int, str] | None = None  # (next_in, -tokens left, name)
        for bucket in request:
            if bucket.limit is None:
                continue
            tat, paused_until, why = rows.get(bucket.name, (0.0, 0.0, None))
            tat = max(tat, now) + 1.0 / bucket.limit.rate
            rows[bucket.name] = (tat, paused_until, why)
            changed[bucket.name] = tat
            left = gcra_tokens(tat, now, bucket.limit)
            rank = (gcra_wait(tat, now, bucket.limit), -left, bucket.name)
            if emptiest is None or rank[:2] > emptiest[:2]:
                emptiest = rank
            tokens = left if tokens is None else min(tokens, left)
        if emptiest is None:
            out.append(answer)
        else:
            out.append(Throttle(bucket=emptiest[2], tokens=tokens, next_in=emptiest[0]))
    if changed:
        db.executemany(
            "INSERT INTO buckets (name, tat) VALUES (?, ?)"
            " ON CONFLICT (name) DO UPDATE SET tat = excluded.tat",
            list(changed.items()),
        )
    return out


def peek(db: sqlite3.Connection, now: float, request: Sequence[Bucket]) -> Throttle:
    """What :func:`take` would answer for ``request`` now; reads only."""
    rows = _bucket_rows(db, [b.name for b in request])
    return _judge(request, rows, now)


def pause(
    db: sqlite3.Connection, now: float, bucket: str, until: float, reason: str, actor: str
) -> float:
    """Extend ``bucket``'s pause to ``until`` (never shorten it); audit a new pause or an
    extension by at least :data:`PAUSE_AUDIT_STEP`. The pause end afterwards."""
    row = db.execute("SELECT paused_until FROM buckets WHERE name = ?", (bucket,)).fetchone()
    current = float(row[0]) if row else 0.0
    if until <= current:
        return current
    db.execute(
        "INSERT INTO buckets (name, paused_until, reason) VALUES (?, ?, ?)"
        " ON CONFLICT (name) DO UPDATE SET paused_until = excluded.paused_until,"
        " reason = excluded.reason",
        (bucket, until, reason),
    )
    if current <= now or until - current >= PAUSE_AUDIT_STEP:
        detail = {"bucket": bucket, "until": _iso(until), "seconds": round(until - now, 3)}
        _audit(db, now, actor, "bucket.pause", reason, detail)
    return until


# -- breakers ---------------------------------------------------------------------------------

_BreakerRow = tuple[BreakerState, int, float | None, str | None, float | None]
_CLOSED: _BreakerRow = ("closed", 0, None, None, None)


def _breaker_rows(db: sqlite3.Connection, keys: Sequence[str]) -> dict[str, _BreakerRow]:
    rows = select_in(
        db,
        "SELECT key, state, failures, retry_at, probe, probe_until FROM breakers WHERE key",
        keys,
    )
    return {
        key: (state, failures, retry_at, probe, probe_until)
        for key, state, failures, retry_at, probe, probe_until in rows
    }


def _status(row: _BreakerRow, now: float) -> BreakerStatus:
    state, _, retry_at, _, probe_until = row
    if state == "open":
        return BreakerStatus(state="open", wait=max(0.0, (retry_at or now) - now))
    if state == "half_open":
        return BreakerStatus(state="half_open", wait=max(0.0, (probe_until or now) - now))
    return BreakerStatus()


def quiet(db: sqlite3.Connection, keys: Sequence[str], *, failures: bool = False) -> bool:
    """Whether every breaker in ``keys`` is closed (and, with ``failures``, has none)."""
    rows = _breaker_rows(db, keys)
    return all(r[0] == "closed" and not (failures and r[1]) for r in rows.values())


def _save(db: sqlite3.Connection, key: str, row: _BreakerRow, now: float) -> None:
    db.execute(
        "INSERT INTO breakers (key, state, failures, retry_at, probe, probe_until, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET state = excluded.state,"
        " failures = excluded.failures, retry_at = excluded.retry_at, probe = excluded.probe,"
        " probe_until = excluded.probe_until, updated_at = excluded.updated_at",
        (key, *row, now),
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
    out: list[BreakerStatus] = []
    for key, ticket in entries:
        row = rows.get(key, _CLOSED)
        state, failures, retry_at, probe, probe_until = row
        due = (state == "open" and (retry_at or 0.0) <= now) or (
            state == "half_open" and (probe_until or 0.0) <= now
        )
        if not due:
            out.append(_status(row, now))
            continue
        row = ("half_open", failures, retry_at, ticket, now + probe_ttl)
        rows[key] = row
        _save(db, key, row, now)
        if state == "open":
            reason = f"cool-down over: {ticket} is the probe"
        else:
            reason = f"probe {probe} did not report in time: {ticket} probes instead"
        _audit(
            db,
            now,
            actor,
            "breaker.half_open",
            reason,
            {"breaker": key, "from": state, "to": "half_open", "probe": ticket},
        )
        out.append(BreakerStatus(state="half_open", probe=True))
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
    for result in results:
        key = result.key
        old = rows.get(key, _CLOSED)
        state, failures, _retry_at, probe, _probe_until = old
        new: _BreakerRow = old
        action = reason = None
        if state == "closed":
            if result.ok:
                new = _CLOSED
            elif failures + 1 >= config.failures:
                new = ("open", failures + 1, now + config.cooldown, None, None)
                action = "breaker.open"
                reason = f"{failures + 1} consecutive failures; last: {result.error or 'failed'}"
            else:
                new = ("closed", failures + 1, None, None, None)
        elif state == "half_open" and probe == result.ticket:
            if result.ok:
                new, action, reason = _CLOSED, "breaker.close", f"probe {probe} succeeded"
            else:
                new = ("open", failures + 1, now + config.cooldown, None, None)
                action = "breaker.open"
                reason = f"probe {probe} failed: {result.error or 'failed'}"
        # anything else (open, or another call finishing while a probe is out) started before
        # the breaker's last change and says nothing about the target now
        if new == old:
            continue
        rows[key] = new
        _save(db, key, new, now)
        if action is not None:
            detail: dict[str, Any] = {"breaker": key, "from": state, "to": new[0]}
            if new[0] == "open":
                detail["until"] = _iso(now + config.cooldown)
            _audit(db, now, actor, action, reason, detail)
    return {r.key: _status(rows.get(r.key, _CLOSED), now) for r in results}


def breaker_peek(db: sqlite3.Connection, now: float, key: str) -> BreakerStatus:
    """The state of one breaker; reads only."""
    return _status(_breaker_rows(db, [key]).get(key, _CLOSED), now)
