"""Rate-limit buckets (GCRA) and circuit breakers on the Redis store.

The decisions are :mod:`farmhand.store.limits_logic`, the same functions the SQL stores run
inside their transactions. Here they run optimistically: read the rows a call names (and the
store clock's time), decide, then write with ``swap.lua``, which applies the new rows and
audit events only if none of the rows read has changed meanwhile -- all buckets of a take,
or every breaker of a batch, at once or not at all. A lost race re-reads and decides again,
as does a decision that waited too long (see ``_FRESH``).
Calls that change nothing (tokens of unlimited buckets, closed breakers with healthy
results, peeks) are one read and write nothing. An attempt start that takes tokens
(``Guard.take``) is decided the same way and written by ``start.lua`` with its attempts; a
race it loses answers the rows as they are then, so deciding again costs no read.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from farmhand.config import BreakerConfig
from farmhand.errors import StoreError
from farmhand.store import limits_logic as logic
from farmhand.store.base import BreakerResult, BreakerStatus, Bucket, Guard, Held, Throttle
from farmhand.store.redis_setup import Link

#: lost races before giving up; each costs one read and one script call (a start: the call)
_MAX_TRIES = 64
#: on the server's clock, a decision older than this (seconds) is made again, for the first
#: few tries; then it is taken as it is, so that a starved process still makes progress
_FRESH, _FRESH_TRIES = 0.05, 4

T = TypeVar("T")
#: what a decision returns: the answer, the rows to write (name -> encoded row; none: write
#: nothing) and the audit events to append with them
Decision = tuple[T, dict[str, str], Sequence[logic.AuditNote]]
#: decides on the rows read (name -> encoded row) at the store clock's ``now``
Decide = Callable[[float, dict[str, str]], Decision[T]]
#: start.lua's answers for a lease that was lost (None) or a start that something held back
HELD: dict[str, Held | None] = {
    "0": None,
    "g": Held("gate"),
    "p": Held("paused"),
    "b": Held("breaker"),
}
#: one lease's start: lost (None), held back, or (attempt number, when it started, the rate
#: limiter's answer if it took tokens)
Start = Held | tuple[int, float, Throttle | None] | None


def started(answer: str, at: float, took: Held | Throttle | None = None) -> Start:
    """One lease's start as start.lua answered it, its attempt stamped with ``at``; ``took``:
    the rate limiter's answer for the tokens of its guard (``at``: when they were taken)."""
    if answer in HELD:
        return HELD[answer]
    if isinstance(took, Held):  # "l": the limiter refused the tokens
        return took
    return int(answer), at, took


def _bucket(raw: str) -> logic.BucketRow:
    tat, paused_until, reason = json.loads(raw)
    return float(tat), float(paused_until), reason


def _breaker(raw: str) -> logic.BreakerRow:
    state, failures, retry_at, probe, probe_until = json.loads(raw)
    return state, int(failures), retry_at, probe, probe_until


def _encode(row: tuple[Any, ...]) -> str:
    return json.dumps(row, separators=(",", ":"))


def _rows(names: Sequence[str], seen: dict[str, str], writes: dict[str, str]) -> list[str | int]:
    """The rows a decision was made on, as the scripts take them (see "optimistic writes"
    in lua/prelude.lua): their number, then name, value read and value to write of each."""
    args: list[str | int] = [len(names)]
    for name in names:
        args += [name, seen.get(name, ""), writes.get(name, "")]
    return args


class RedisLimits:
    """The buckets and breakers of one Redis store (see the module docstring)."""

    def __init__(self, link: Link) -> None:
        self._link = link
        self._rng = random.Random()

    async def _read(self, table: str, names: Sequence[str]) -> tuple[float, dict[str, str]]:
        unique = list(dict.fromkeys(names))
        now, values = await self._link.now_and(table, unique)
        return now, {name: raw for name, raw in zip(unique, values, strict=True) if raw}

    async def _swap(
        self,
        table: str,
        names: Sequence[str],
        seen: dict[str, str],
        writes: dict[str, str],
        now: float,
        actor: str,
        notes: Sequence[logic.AuditNote],
        tries: int,
    ) -> bool:
        args = [self._fresh(tries), table, *_rows(names, seen, writes), actor, len(notes)]
        for note in notes:
            has_reason = 0 if note.reason is None else 1
            args += [note.action, has_reason, note.reason or "", json.dumps(note.detail)]
        return bool(await self._link.run("swap", args, now=repr(now)))

    def _fresh(self, tries: int) -> str:
        """How old (seconds, on the server's clock) a decision after ``tries`` lost races
        may be when it is written; '' for any age."""
        return "" if self._link.clock is not None or tries >= _FRESH_TRIES else repr(_FRESH)

    async def _backoff(self, tries: int) -> None:
        if tries >= _MAX_TRIES:
            raise StoreError(
                f"Redis at {self._link.target.where}: gave up after {tries} conflicting"
                " updates of the same rate-limit buckets or breakers; try again"
            )
        if tries > 2:
            # many executors racing for one row: spread them out a little
            await asyncio.sleep(self._rng.uniform(0, 0.001 * tries))

    async def _update(self, table: str, names: Sequence[str], actor: str, decide: Decide[T]) -> T:
        """Read the rows ``names`` of ``table``, let ``decide`` answer and say what to write,
        and write it unless a row changed meanwhile; else read and decide again."""
        tries = 0
        while True:
            now, seen = await self._read(table, names)
            out, writes, notes = decide(now, seen)
            if not writes:
                return out
            if await self._swap(table, names, seen, writes, now, actor, notes, tries):
                return out
            tries += 1
            await self._backoff(tries)

    # -- buckets ----------------------------------------------------------------------

    async def take(self, requests: Sequence[Sequence[Bucket]]) -> list[Throttle]:
        """See :meth:`farmhand.store.base.Store.take`."""
        items = [tuple(request) for request in requests]
        names = list(dict.fromkeys(b.name for request in items for b in request))
        if not names:
            return [Throttle() for _ in items]

        def decide(now: float, seen: dict[str, str]) -> Decision[list[Throttle]]:
            rows = {name: _bucket(raw) for name, raw in seen.items()}
            out, changed = logic.take(items, rows, now)
            return out, {name: _encode(rows[name]) for name in changed}, ()

        return await self._update("buckets", names, "", decide)

    async def peek(self, buckets: Sequence[Bucket]) -> Throttle:
        """See :meth:`farmhand.store.base.Store.peek`."""
        request = list(buckets)
        if not request:
            return Throttle()
        now, seen = await self._read("buckets", [b.name for b in request])
        return logic.judge(request, {n: _bucket(raw) for n, raw in seen.items()}, now)

    async def pause(self, bucket: str, until: float, reason: str, actor: str) -> float:
        """See :meth:`farmhand.store.base.Store.pause`."""

        def decide(now: float, seen: dict[str, str]) -> Decision[float]:
            tat, current, _ = _bucket(seen[bucket]) if bucket in seen else logic.NO_BUCKET
            end, note = logic.pause(current, bucket, until, reason, now)
            if end == current:
                return current, {}, ()
            return end, {bucket: _encode((tat, end, reason))}, [note] if note is not None else []

        return await self._update("buckets", [bucket], actor, decide)

    # -- attempt starts that take tokens -----------------------------------------------

    async def start(self, rows: Sequence[list[Any]], guards: Sequence[Guard]) -> list[Start]:
        """Start the attempts of start.lua's lease ``rows``, one per guard, where some guard
        takes tokens: see :meth:`farmhand.store.base.Store.start_attempts`. The tokens are
        taken in lease order on the buckets as read; start.lua writes them with the starts
        only if no bucket has changed and every lease that took tokens starts. A lease it
        finds lost or held keeps that answer, and the tokens are taken again without it."""
        names = list(dict.fromkeys(b.name for guard in guards for b in guard.take))
        #: leases start.lua found lost or held, by index: not sent again
        settled: dict[int, Held | None] = {}
        tries = 0
        now, seen = await self._read("buckets", names)
        while True:
            buckets = {name: _bucket(raw) for name, raw in seen.items()}
            tats: dict[str, float] = {}
            took: dict[int, Held | Throttle] = {}
            live: list[int] = []
            batch: list[list[Any]] = []
            for i, (row, guard) in enumerate(zip(rows, guards, strict=True)):
                if i in settled:
                    continue
                live.append(i)
                if not guard.take:
                    batch.append(row)
                    continue
                took[i] = logic.take_for(guard, buckets, now, tats)
                batch.append([*row, "l" if isinstance(took[i], Held) else "t"])
            args: list[str | int] = [json.dumps(batch)]
            if not all(isinstance(answer, Held) for answer in took.values()):
                # even with no token to write (buckets without a rate): no pause came since
                writes = {name: _encode(buckets[name]) for name in tats}
                args += [repr(now), self._fresh(tries), *_rows(names, seen, writes)]
            reply = await self._link.run("start", args)
            if isinstance(reply, list):  # stale: decide again on the rows it read
                tries += 1
                await self._backoff(tries)
                now = float(reply[1])
                seen = {name: raw for name, raw in zip(names, reply[2:], strict=True) if raw}
                continue
            head, *answers = reply.split(" ")
            if head == "again":
                settled |= {i: HELD[a] for i, a in zip(live, answers, strict=True) if a in HELD}
                continue
            at = float(head)
            out: list[Start] = [settled.get(i) for i in range(len(rows))]
            for i, answer in zip(live, answers, strict=True):
                out[i] = started(answer, now if i in took else at, took.get(i))
            return out

    # -- breakers ---------------------------------------------------------------------

    async def breaker_enter(
        self, entries: Sequence[tuple[str, str]], actor: str, probe_ttl: float
    ) -> list[BreakerStatus]:
        """See :meth:`farmhand.store.base.Store.breaker_enter`."""
        items = list(entries)
        names = list(dict.fromkeys(key for key, _ in items))
        if not names:
            return []

        def decide(now: float, seen: dict[str, str]) -> Decision[list[BreakerStatus]]:
            rows = {name: _breaker(raw) for name, raw in seen.items()}
            out, saves, notes = logic.breaker_enter(items, rows, now, probe_ttl)
            return out, {name: _encode(row) for name, row in saves.items()}, notes

        return await self._update("breakers", names, actor, decide)

    async def breaker_record(
        self, results: Sequence[BreakerResult], config: BreakerConfig, actor: str
    ) -> dict[str, BreakerStatus]:
        """See :meth:`farmhand.store.base.Store.breaker_record`."""
        items = list(results)
        names = list(dict.fromkeys(r.key for r in items))
        if not names:
            return {}

        def decide(now: float, seen: dict[str, str]) -> Decision[dict[str, BreakerStatus]]:
            rows = {name: _breaker(raw) for name, raw in seen.items()}
            out, saves, notes = logic.breaker_record(items, rows, now, config)
            return out, {name: _encode(row) for name, row in saves.items()}, notes

        return await self._update("breakers", names, actor, decide)

    async def breaker_peek(self, key: str) -> BreakerStatus:
        """See :meth:`farmhand.store.base.Store.breaker_peek`."""
        now, seen = await self._read("breakers", [key])
        row = _breaker(seen[key]) if key in seen else logic.CLOSED
        return logic.breaker_status(row, now)
