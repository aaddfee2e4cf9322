"""Rate-limit buckets (GCRA) and circuit breakers: the decisions, shared by every store.

Pure functions over the current rows of the buckets and breakers a call names; each store
reads those rows (locked, in its own way), asks these functions what to answer and what to
write, and writes it in the same transaction. No I/O here.

GCRA keeps one number per bucket, its *theoretical arrival time* ``tat``: with emission
interval ``T = 1 / rate`` a token may be taken at ``now`` iff ``max(tat, now) + T - burst * T
<= now``, and taking one sets ``tat = max(tat, now) + T``. Any ``n`` tokens taken between
``t1`` and ``t2`` then satisfy ``n <= burst + rate * (t2 - t1)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from farmhand import gates
from farmhand.config import BreakerConfig, Limit
from farmhand.contracts import GateRule
from farmhand.contracts.base import utc
from farmhand.store.base import (
    BreakerResult,
    BreakerState,
    BreakerStatus,
    Bucket,
    Guard,
    Held,
    Throttle,
)

#: a wait shorter than this is no wait: epoch seconds near 1.8e9 carry only ~0.24 us of
#: precision, so sums of intervals round by about that much
EPSILON = 1e-6
#: an extension of a pause shorter than this is not audited again (one 429 per in-flight
#: call would otherwise write one audit event each)
PAUSE_AUDIT_STEP = 1.0

#: a bucket's ``(tat, paused_until, reason)``; a bucket without a row is ``NO_BUCKET``
BucketRow = tuple[float, float, str | None]
NO_BUCKET: BucketRow = (0.0, 0.0, None)
#: a breaker's ``(state, failures, retry_at, probe, probe_until)``; no row is ``CLOSED``
BreakerRow = tuple[BreakerState, int, float | None, str | None, float | None]
CLOSED: BreakerRow = ("closed", 0, None, None, None)


@dataclass(frozen=True, slots=True)
class AuditNote:
    """An audit event a limits decision asks the store to append (no intent, no states)."""

    action: str
    reason: str | None
    detail: dict[str, Any]


def iso(ts: float) -> str:
    """Epoch seconds as an ISO 8601 UTC string, for audit details."""
    return utc(ts).isoformat()


# -- GCRA -------------------------------------------------------------------------------------


def gcra_wait(tat: float, now: float, limit: Limit) -> float:
    """Seconds until one token may be taken from a bucket at ``tat`` (0.0: now)."""
    interval = 1.0 / limit.rate
    wait = max(tat, now) + interval - limit.burst * interval - now
    return wait if wait > EPSILON else 0.0


def gcra_tokens(tat: float, now: float, limit: Limit) -> int:
    """Whole tokens a bucket at ``tat`` holds at ``now``."""
    interval = 1.0 / limit.rate
    room = (now + limit.burst * interval - max(tat, now)) / interval
    return max(0, min(limit.burst, math.floor(room + EPSILON)))


# -- buckets ----------------------------------------------------------------------------------


def judge(request: Sequence[Bucket], rows: dict[str, BucketRow], now: float) -> Throttle:
    """The answer for one request against the bucket states in ``rows`` (nothing changed)."""
    refused: Throttle | None = None
    tokens: int | None = None
    for bucket in request:
        tat, paused_until, why = rows.get(bucket.name, NO_BUCKET)
        if bucket.limit is not None:
            left = gcra_tokens(tat, now, bucket.limit)
            tokens = left if tokens is None else min(tokens, left)
        candidate: Throttle | None = None
        if paused_until - now > EPSILON:
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
    requests: Sequence[Sequence[Bucket]], rows: dict[str, BucketRow], now: float
) -> tuple[list[Throttle], dict[str, float]]:
    """Take a token from every bucket of each request, in order, or none.

    ``rows`` (updated in place) holds the state of every bucket named; returns the answers
    and the new ``tat`` of each bucket that changed, for the caller to write.
    """
    changed: dict[str, float] = {}
    out: list[Throttle] = []
    for raw in requests:
        request = list({b.name: b for b in raw}.values())
        answer = judge(request, rows, now)
        if answer.wait > 0.0:
            out.append(answer)
            continue
        tokens: int | None = None
        emptiest: tuple[float, int, str] | None = None  # (next_in, -tokens left, name)
        for bucket in request:
            if bucket.limit is None:
                continue
            tat, paused_until, why = rows.get(bucket.name, NO_BUCKET)
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
    return out, changed


def pause(
    current: float, bucket: str, until: float, reason: str, now: float
) -> tuple[float, AuditNote | None]:
    """Extend a pause ending at ``current`` to ``until`` (never shorten it).

    Returns the pause end afterwards and the audit event to write: one for a new pause or
    an extension by at least :data:`PAUSE_AUDIT_STEP`. The end is unchanged (nothing to
    write) when it equals ``current``.
    """
    if until <= current:
        return current, None
    if current <= now or until - current >= PAUSE_AUDIT_STEP:
        detail = {"bucket": bucket, "until": iso(until), "seconds": round(until - now, 3)}
        return until, AuditNote("bucket.pause", reason, detail)
    return until, None


# -- breakers ---------------------------------------------------------------------------------


def breaker_status(row: BreakerRow, now: float) -> BreakerStatus:
    """What a breaker in ``row`` answers at ``now``."""
    state, _, retry_at, _, probe_until = row
    if state == "open":
        return BreakerStatus(state="open", wait=max(0.0, (retry_at or now) - now))
    if state == "half_open":
        return BreakerStatus(state="half_open", wait=max(0.0, (probe_until or now) - now))
    return BreakerStatus()


def held_by(
    guard: Guard,
    closed: Sequence[GateRule],
    buckets: Mapping[str, BucketRow],
    breakers: Mapping[str, BreakerRow],
    now: float,
) -> Held | None:
    """What holds back an attempt guarded by ``guard`` at ``now``, given the closed gate
    rules and the rows of the buckets and breakers it names (see :func:`guarded_rows`; a
    bucket or breaker without a row is neither paused nor open). Every store answers this
    the same way: the Python stores call it, PostgreSQL and Redis say it in SQL and Lua."""
    if gates.blocking(closed, guard.kind, guard.account) is not None:
        return Held("gate")
    if any(buckets.get(name, NO_BUCKET)[1] > now for name in guard.buckets):
        return Held("paused")
    if guard.breaker is not None and breakers.get(guard.breaker, CLOSED)[0] != "closed":
        return Held("breaker")
    return None


def guarded_rows(guards: Sequence[Guard]) -> tuple[list[str], list[str]]:
    """The buckets (to check for a pause, or to take from) and the breakers that ``guards``
    name, each once."""
    buckets = sorted({name for g in guards for name in (*g.buckets, *(b.name for b in g.take))})
    breakers = sorted({g.breaker for g in guards if g.breaker is not None})
    return buckets, breakers


def take_for(
    guard: Guard, rows: dict[str, BucketRow], now: float, changed: dict[str, float]
) -> Held | Throttle:
    """Take the tokens of ``guard.take`` for a start that nothing else holds back, as
    :func:`take` would; ``rows`` and ``changed`` (the new ``tat`` per bucket, for the store
    to write) are updated in place. A refusal is ``Held("limited")`` and takes nothing."""
    (answer,), tats = take([guard.take], rows, now)
    if answer.wait > 0.0:
        return Held("limited", answer)
    changed.update(tats)
    return answer


def admit(
    guard: Guard | None,
    held: Held | None,
    rows: dict[str, BucketRow],
    now: float,
    changed: dict[str, float],
) -> Held | Throttle | None:
    """What a start whose lease is current meets: ``held`` (:func:`held_by`'s answer) if
    something holds it; else, when its guard takes tokens, :func:`take_for`'s answer; else
    None (it starts, nothing taken)."""
    if held is not None or guard is None or not guard.take:
        return held
    return take_for(guard, rows, now, changed)


def quiet(rows: dict[str, BreakerRow], *, failures: bool = False) -> bool:
    """Whether every breaker in ``rows`` is closed (and, with ``failures``, has none)."""
    return all(r[0] == "closed" and not (failures and r[1]) for r in rows.values())


def breaker_enter(
    entries: Sequence[tuple[str, str]],
    rows: dict[str, BreakerRow],
    now: float,
    probe_ttl: float,
) -> tuple[list[BreakerStatus], dict[str, BreakerRow], list[AuditNote]]:
    """May each ``(key, ticket)`` call go? Grants at most one probe per open breaker whose
    cool-down has passed (or whose last probe's time ran out).

    ``rows`` (updated in place) holds the locked state of the breakers named; returns the
    answers, the rows to write and the audit events to append, in order.
    """
    saves: dict[str, BreakerRow] = {}
    notes: list[AuditNote] = []
    out: list[BreakerStatus] = []
    for key, ticket in entries:
        row = rows.get(key, CLOSED)
        state, failures, retry_at, probe, probe_until = row
        due = (state == "open" and (retry_at or 0.0) <= now) or (
            state == "half_open" and (probe_until or 0.0) <= now
        )
        if not due:
            out.append(breaker_status(row, now))
            continue
        row = ("half_open", failures, retry_at, ticket, now + probe_ttl)
        rows[key] = saves[key] = row
        if state == "open":
            reason = f"cool-down over: {ticket} is the probe"
        else:
            reason = f"probe {probe} did not report in time: {ticket} probes instead"
        detail = {"breaker": key, "from": state, "to": "half_open", "probe": ticket}
        notes.append(AuditNote("breaker.half_open", reason, detail))
        out.append(BreakerStatus(state="half_open", probe=True))
    return out, saves, notes


def breaker_record(
    results: Sequence[BreakerResult],
    rows: dict[str, BreakerRow],
    now: float,
    config: BreakerConfig,
) -> tuple[dict[str, BreakerStatus], dict[str, BreakerRow], list[AuditNote]]:
    """Apply results in order (see :meth:`farmhand.store.base.Store.breaker_record`).

    ``rows`` (updated in place) holds the locked state of the breakers named; returns the
    state of each key afterwards, the rows to write and the audit events to append.
    """
    saves: dict[str, BreakerRow] = {}
    notes: list[AuditNote] = []
    for result in results:
        key = result.key
        old = rows.get(key, CLOSED)
        state, failures, _retry_at, probe, _probe_until = old
        new: BreakerRow = old
        action = reason = None
        if state == "closed":
            if result.ok:
                new = CLOSED
            elif failures + 1 >= config.failures:
                new = ("open", failures + 1, now + config.cooldown, None, None)
                action = "breaker.open"
                reason = f"{failures + 1} consecutive failures; last: {result.error or 'failed'}"
            else:
                new = ("closed", failures + 1, None, None, None)
        elif state == "half_open" and probe == result.ticket:
            if result.ok:
                new, action, reason = CLOSED, "breaker.close", f"probe {probe} succeeded"
            else:
                new = ("open", failures + 1, now + config.cooldown, None, None)
                action = "breaker.open"
                reason = f"probe {probe} failed: {result.error or 'failed'}"
        # anything else (open, or another call finishing while a probe is out) started before
        # the breaker's last change and says nothing about the target now
        if new == old:
            continue
        rows[key] = saves[key] = new
        if action is not None:
            detail: dict[str, Any] = {"breaker": key, "from": state, "to": new[0]}
            if new[0] == "open":
                detail["until"] = iso(now + config.cooldown)
            notes.append(AuditNote(action, reason, detail))
    return {r.key: breaker_status(rows.get(r.key, CLOSED), now) for r in results}, saves, notes
