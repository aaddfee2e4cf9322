"""The server store: PostgreSQL through psycopg 3 and a connection pool.

For many executors on many hosts. Each public method is one transaction of the store's own
statements, batched (the statements are in postgres_sql.py): a claim, a start of attempts
that takes no tokens, a renewal or an ``apply`` is one statement whatever the batch size (a
start that takes tokens, two round trips). Claims take rows with ``FOR UPDATE SKIP LOCKED``,
so executors never wait on each other's claims. Times come from the database server's clock
unless a clock is given (tests), so that every executor judges leases and rate limits on one
timeline. ``wait_for_change`` listens for the NOTIFY a trigger sends on every commit.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout

from farmhand.clock import Clock
from farmhand.config import BreakerConfig
from farmhand.contracts import (
    Approval,
    Attempt,
    AuditEvent,
    GateRule,
    IntentState,
    IntentStatus,
    Lease,
    Receipt,
)
from farmhand.contracts.base import utc
from farmhand.errors import InvalidTransition, StoreError
from farmhand.ids import new_id
from farmhand.store import postgres_limits as limits
from farmhand.store import postgres_rows as conv
from farmhand.store import postgres_sql as q
from farmhand.store.base import (
    Admitted,
    BreakerResult,
    BreakerStatus,
    Bucket,
    Change,
    Claim,
    Guard,
    Held,
    HeldBy,
    IntentQuery,
    NewIntent,
    Readiness,
    Throttle,
)
from farmhand.store.kept_readiness import KeptReadiness
from farmhand.store.limits_logic import admit, quiet
from farmhand.store.postgres_setup import Notifier, Target, connect, migrate, parse_url

Conn = psycopg.AsyncConnection[tuple[Any, ...]]
#: longest a copy of the gates is used (seconds), however quiet the notifications
_GATES_FRESH = 0.25
#: the states an outcome leaves an intent in that give an executor work
_GIVES_WORK = frozenset({IntentState.PENDING, IntentState.RETRY_WAIT})
#: seconds to wait for the pool's first connection, or for a free one
_POOL_TIMEOUT = 30.0
#: a connection's transaction states that a failed transaction must roll back
_OPEN = frozenset({psycopg.pq.TransactionStatus.INTRANS, psycopg.pq.TransactionStatus.INERROR})


class PostgresStore:
    """A Store on a PostgreSQL database. Create with :meth:`open`."""

    def __init__(
        self,
        target: Target,
        clock: Clock | None,
        pool: AsyncConnectionPool[Conn],
        notifier: Notifier,
    ) -> None:
        self.url = target.display
        self._target = target
        self._clock = clock
        self._pool: AsyncConnectionPool[Conn] | None = pool
        self._notifier = notifier
        #: the gates as last read: (the notifier's gate version then, rules, monotonic time)
        self._gates: tuple[int, list[GateRule], float] | None = None
        #: readiness as a short claim found it, keyed by its gate SQL and parameters
        self._ready = KeptReadiness()

    @classmethod
    async def open(cls, url: str, clock: Clock | None = None) -> PostgresStore:
        """Connect, apply any migrations the database lacks, and start listening.

        ``clock`` None: every time comes from the database server's clock.
        """
        target = parse_url(url)
        writer = new_id("w")
        listener = await connect(target)
        try:
            await migrate(listener, target)
            notifier = Notifier(writer, lambda: connect(target))
            await notifier.start(listener)
        except BaseException as exc:
            await listener.close()
            if isinstance(exc, psycopg.Error):
                raise StoreError(
                    f"PostgreSQL at {target.where} failed: {target.scrub(str(exc))}"
                ) from exc
            raise

        async def configure(conn: Conn) -> None:
            # names this store in the NOTIFY its writes send, so that it can skip its own
            await conn.execute("SELECT set_config('farmhand.writer', %s, false)", (writer,))

        pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            target.conninfo,
            min_size=min(2, target.pool_size),
            max_size=target.pool_size,
            kwargs={"autocommit": True, **target.extra},
            configure=configure,
            timeout=_POOL_TIMEOUT,
            open=False,
            name="farmhand",
        )
        try:
            await pool.open(wait=True, timeout=_POOL_TIMEOUT)
        except BaseException as exc:
            await pool.close()
            await notifier.close()
            if isinstance(exc, PoolTimeout):
                raise StoreError(
                    f"PostgreSQL at {target.where} accepted one connection but not a pool of "
                    f"them within {_POOL_TIMEOUT:.0f}s; check max_connections on the server"
                ) from exc
            raise
        return cls(target, clock, pool, notifier)

    # -- plumbing ---------------------------------------------------------------------

    def _fixed(self) -> float | None:
        """The test clock's time, or None: the SQL then reads the server's clock."""
        return self._clock.now() if self._clock is not None else None

    def _closed(self) -> StoreError:
        return StoreError(f"the PostgreSQL store {self.url} is closed")

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[Conn]:
        """A pooled connection (autocommit), with psycopg's errors made StoreErrors."""
        pool = self._pool
        if pool is None:
            raise self._closed()
        where = self._target.where
        try:
            async with pool.connection() as conn:
                yield conn
        except PoolClosed as exc:
            raise self._closed() from exc
        except PoolTimeout as exc:
            raise StoreError(
                f"no connection to PostgreSQL at {where} within {_POOL_TIMEOUT:.0f}s; the "
                "server is unreachable or the pool is exhausted (pool_size in the store URL)"
            ) from exc
        except psycopg.OperationalError as exc:
            raise StoreError(
                f"PostgreSQL at {where} failed: {self._target.scrub(str(exc))}"
            ) from exc
        except psycopg.Error as exc:
            raise StoreError(
                f"PostgreSQL error on {where}: {self._target.scrub(str(exc))}"
            ) from exc

    @staticmethod
    @asynccontextmanager
    async def _pipelined(conn: Conn) -> AsyncIterator[None]:
        """A transaction in pipeline mode that BEGIN and COMMIT, sent as statements, delimit:
        a read, a decision and a write cost two round trips. (psycopg's transaction() in a
        pipeline waits for a sync as it begins and as each pipeline it nests ends: about
        five.) Every write of rate limits and breakers uses it."""
        try:
            async with conn.pipeline():
                await conn.execute("BEGIN")
                yield
                await conn.execute("COMMIT")
        except BaseException:
            if conn.info.transaction_status in _OPEN:
                with suppress(psycopg.Error):  # a broken connection: the pool drops it
                    await conn.execute("ROLLBACK")
            raise

    async def _rows(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        async with self._conn() as conn:
            cur = await conn.execute(sql, params)
            return await cur.fetchall()

    async def _execute(self, sql: str, params: Any = None) -> None:
        async with self._conn() as conn:
            await conn.execute(sql, params)

    def _changed(self, wrote: bool) -> None:
        # only for writes that may give an executor work, as the NOTIFY triggers decide
        # (migrations 0004, 0005): taking, starting, renewing or ending a lease, or taking a
        # rate-limit token, wakes no one, not even the executor in this process that made it
        if wrote:
            self._ready.drop()
            self._notifier.bump()

    # -- intents ----------------------------------------------------------------------

    async def put_intents(self, items: Sequence[NewIntent]) -> list[tuple[IntentStatus, bool]]:
        first: dict[str, NewIntent] = {}
        for item in items:
            first.setdefault(item.intent.key, item)
        if not first:
            return []
        batch = [conv.intent_record(item, n) for n, item in enumerate(first.values())]
        keys = list(first)
        async with self._conn() as conn:
            inserted = await conn.execute(q.PUT_INTENTS, (self._fixed(), conv.records(batch)))
            created = {key: (at, ready) for key, at, ready in await inserted.fetchall()}
            # what is new is known as stored; only keys that existed are read back, in a
            # new statement, a new snapshot: it sees keys another writer committed while
            # this insert waited for them
            old = [key for key in keys if key not in created]
            by_key: dict[str, IntentStatus] = {}
            if old:
                sql = q.STATUSES + " WHERE i.key = ANY(%b::text[])"
                found = await conn.execute(sql, (old,))
                by_key = {row[-1]: conv.status(row[:-1]) for row in await found.fetchall()}
        for key, (at, ready) in created.items():
            by_key[key] = conv.new_status(first[key], at, ready)
        self._changed(bool(created))
        out = []
        for item in items:
            key = item.intent.key
            is_new = key in created and first[key] is item
            out.append((by_key[key], is_new))
        return out

    async def get_intent(self, ref: str) -> IntentStatus | None:
        found = [
            conv.status(row[:-1])
            for row in await self._rows(q.STATUSES + " WHERE i.id = %s OR i.key = %s", (ref, ref))
        ]
        if not found:
            return None
        # an id match wins over a key that happens to equal another intent's id
        return next((s for s in found if s.id == ref), found[0])

    async def list_intents(self, query: IntentQuery) -> list[IntentStatus]:
        where, params = ["TRUE"], []
        if query.state is not None:
            # a literal (a known state name), not a parameter: only then can the planner
            # use the partial index of that state, in a prepared statement as well
            where.append(f"i.state = '{IntentState(query.state).value}'")
        for column, value in (("kind", query.kind), ("account", query.account)):
            if value is not None:
                where.append(f"i.{column} = %s")
                params.append(value)
        sql = f"{q.STATUSES} WHERE {' AND '.join(where)} ORDER BY i.seq DESC LIMIT %s"
        return [conv.status(row[:-1]) for row in await self._rows(sql, (*params, query.limit))]

    # -- executor primitives ------------------------------------------------------------

    async def claim(
        self, owner: str, limit: int, ttl: float, closed: Sequence[GateRule]
    ) -> list[Claim]:
        gate = conv.gate_filter(closed)
        if gate is None or limit <= 0:
            return []
        gate_sql, params = gate
        self._ready.drop()
        claimed = await self._rows(
            q.CLAIM.replace("{gate}", gate_sql),
            {"now": self._fixed(), "owner": owner, "limit": limit, "ttl": ttl, **params},
        )
        if claimed and claimed[-1][0] is None:  # fewer than asked: the readiness row
            _, _, running, expires, *_, ready_at = claimed.pop()
            self._ready.keep((gate_sql, params), conv.readiness((running, expires, ready_at)))
        return [conv.claim(row, owner) for row in claimed]

    async def start_attempts(
        self, leases: Sequence[Lease], guards: Sequence[Guard] | None = None
    ) -> list[Attempt | Admitted | Held | None]:
        if guards and any(guard.take for guard in guards):
            return await self._start_taking(leases, guards)
        out: list[Attempt | Admitted | Held | None] = [None] * len(leases)
        checks: Sequence[Guard | None] = guards or [None] * len(leases)
        items = list(zip(leases, checks, strict=True))
        rounds = conv.rounds(items, lambda item: item[0].intent_id)
        if not rounds:
            return out
        fixed = self._fixed()
        async with self._conn() as conn:
            if len(rounds) == 1:
                found = [await self._start_round(conn, fixed, rounds[0])]
            else:
                async with conn.transaction():
                    found = [await self._start_round(conn, fixed, batch) for batch in rounds]
        for batch, started in zip(rounds, found, strict=True):
            for index, (lease, _) in batch:
                row = started.get(lease.intent_id)
                if row is not None:
                    number, at, held = row
                    out[index] = Held(held) if held is not None else _attempt(lease, number, at)
        return out

    async def _start_taking(
        self, leases: Sequence[Lease], guards: Sequence[Guard]
    ) -> list[Attempt | Admitted | Held | None]:
        """``start_attempts`` when a guard takes tokens: one transaction, two round trips.
        The buckets taken from are locked first and ``now`` read after them, as ``take``
        does; every lease is judged at that now (JUDGE_STARTS, its intent locked), the
        tokens taken in lease order, and the tats written with the starts, stamped at that
        now."""
        items = list(zip(leases, guards, strict=True))
        out: list[Attempt | Admitted | Held | None] = [None] * len(items)
        taken: dict[str, float] = {}
        go: list[tuple[int, Lease, Throttle | None]] = []
        records = conv.records([conv.start_record(lease, guard) for lease, guard in items])
        async with self._conn() as conn:
            async with self._pipelined(conn):
                locked = await limits.lock_buckets(conn, [guard.take for guard in guards])
                judging = await conn.execute(q.JUDGE_STARTS, (self._fixed(), records))
                rows = limits.buckets(await locked.fetchall())
                found = await judging.fetchall()
                now: float = found[0][2]
                judged = {(id_, token): rest for id_, token, _, *rest in found}
                for index, (lease, guard) in enumerate(items):
                    current, held = judged[(lease.intent_id, lease.token)]
                    if not current:
                        continue
                    holder = Held(held) if held is not None else None
                    verdict = admit(guard, holder, rows, now, taken)
                    if isinstance(verdict, Held):
                        out[index] = verdict
                    else:
                        go.append((index, lease, verdict))
                await limits.save_tats(conn, taken)
                rounds = conv.rounds(go, lambda item: item[1].intent_id)
                sent = [
                    await self._send_round(conn, now, [(lease, None) for _, (_, lease, _) in batch])
                    for batch in rounds
                ]
            # the pipeline's end (after the COMMIT) brought the results of the starts
            for batch, cur in zip(rounds, sent, strict=True):
                started = await self._started(cur)
                for _, (index, lease, throttle) in batch:
                    row = started.get(lease.intent_id)
                    if row is not None:
                        attempt = _attempt(lease, row[0], row[1])
                        out[index] = attempt if throttle is None else Admitted(attempt, throttle)
        # neither the starts nor the tokens taken wake anyone (migrations 0002 and 0005)
        return out

    @classmethod
    async def _start_round(
        cls, conn: Conn, fixed: float | None, batch: list[tuple[int, tuple[Lease, Guard | None]]]
    ) -> dict[str, tuple[int, float, HeldBy | None]]:
        return await cls._started(await cls._send_round(conn, fixed, [i for _, i in batch]))

    @staticmethod
    async def _send_round(
        conn: Conn, fixed: float | None, items: Sequence[tuple[Lease, Guard | None]]
    ) -> limits.Cursor:
        """Send START_ATTEMPTS for ``items`` (each intent once)."""
        # in id order: concurrent batches then lock their rows in one order
        ordered = sorted(items, key=lambda item: item[0].intent_id)
        records = [conv.start_record(lease, guard) for lease, guard in ordered]
        return await conn.execute(q.START_ATTEMPTS, (fixed, conv.records(records)))

    @staticmethod
    async def _started(cur: limits.Cursor) -> dict[str, tuple[int, float, HeldBy | None]]:
        return {row[0]: row[1:] for row in await cur.fetchall()}

    async def renew(self, leases: Sequence[Lease], ttl: float) -> list[Lease | None]:
        if not leases:
            return []
        pairs = sorted({(lease.intent_id, lease.token) for lease in leases})
        records = [{"id": intent_id, "token": token} for intent_id, token in pairs]
        renewed = await self._rows(q.RENEW, (self._fixed(), ttl, conv.records(records)))
        expiry = {(intent_id, token): utc(expires) for intent_id, token, expires in renewed}
        out: list[Lease | None] = []
        for lease in leases:
            expires = expiry.get((lease.intent_id, lease.token))
            out.append(
                None if expires is None else lease.model_copy(update={"expires_at": expires})
            )
        return out

    async def apply(self, changes: Sequence[Change]) -> list[bool]:
        if not changes:
            return []
        async with self._conn() as conn:
            applied = await self._apply_in(conn, changes)
        self._changed(
            any(ok and c.to_state in _GIVES_WORK for ok, c in zip(applied, changes, strict=True))
        )
        return applied

    async def _apply_in(self, conn: Conn, changes: Sequence[Change]) -> list[bool]:
        """Apply each change whose precondition holds, in order: one statement, or (when
        the batch names an intent more than once) one per round in a transaction, each
        round seeing the one before."""
        rounds = conv.rounds(changes, lambda change: change.intent_id)
        if len(rounds) == 1:
            return await self._apply_round(conn, changes)
        applied = [False] * len(changes)
        async with conn.transaction():
            for batch in rounds:
                done = await self._apply_round(conn, [change for _, change in batch])
                for (index, _), ok in zip(batch, done, strict=True):
                    applied[index] = ok
        return applied

    async def _apply_round(self, conn: Conn, changes: Sequence[Change]) -> list[bool]:
        batch = [conv.change_record(change, n) for n, change in enumerate(changes)]
        cur = await conn.execute(q.APPLY, (self._fixed(), conv.records(batch)))
        judged = await cur.fetchall()
        for ord_, _, was, to_state, illegal in judged:
            if illegal:
                raise InvalidTransition(
                    f"intent {changes[ord_].intent_id} is {was}; it cannot become {to_state}"
                )
        return [bool(holds) for _, holds, *_ in judged]

    # -- approvals ----------------------------------------------------------------------

    async def put_approval(self, approval: Approval, change: Change | None = None) -> bool:
        detail = {
            "approval": approval.id,
            "payload_hash": approval.payload_hash,
            "expires_at": approval.expires_at.isoformat(),
        }
        async with self._conn() as conn, conn.transaction():
            if change is not None and not (await self._apply_in(conn, [change]))[0]:
                return False
            await conn.execute(
                q.PUT_APPROVAL,
                (
                    approval.id,
                    approval.intent_id,
                    approval.approver,
                    approval.decision.value,
                    approval.created_at.timestamp(),
                    approval.model_dump_json(),
                    f"approval.{approval.decision.value}",
                    approval.reason,
                    json.dumps(detail),
                ),
            )
        self._changed(True)
        return True

    async def approvals(self, intent_id: str) -> list[Approval]:
        rows = await self._rows(
            "SELECT body FROM approvals WHERE intent_id = %s ORDER BY seq", (intent_id,)
        )
        return [Approval.model_validate_json(body) for (body,) in rows]

    # -- rate limits and circuit breakers (bodies in postgres_limits.py) ----------------

    async def take(self, requests: Sequence[Sequence[Bucket]]) -> list[Throttle]:
        items = [tuple(request) for request in requests]
        if not items:
            return []
        # requests naming only unlimited buckets just look for pauses: no transaction
        writes = any(b.limit is not None for request in items for b in request)
        async with self._conn() as conn, self._pipelined(conn) if writes else conn.pipeline():
            out, _ = await limits.take(conn, self._clock, items)
        # a token taken gives no one work: it wakes no one (migration 0005)
        return out

    async def peek(self, buckets: Sequence[Bucket]) -> Throttle:
        async with self._conn() as conn, conn.pipeline():
            return await limits.peek(conn, self._clock, tuple(buckets))

    async def pause(self, bucket: str, until: float, reason: str, actor: str) -> float:
        async with self._conn() as conn, self._pipelined(conn):
            end, wrote = await limits.pause(conn, self._clock, bucket, until, reason, actor)
        self._changed(wrote)
        return end

    async def breaker_enter(
        self,
        entries: Sequence[tuple[str, str]],
        actor: str,
        probe_ttl: float,
    ) -> list[BreakerStatus]:
        items = list(entries)
        async with self._conn() as conn:
            # the common case, every breaker closed, needs no transaction and no lock
            if quiet(await limits.breaker_rows(conn, [key for key, _ in items])):
                return [BreakerStatus() for _ in items]
            async with self._pipelined(conn):
                out, wrote = await limits.breaker_enter(conn, self._clock, items, actor, probe_ttl)
        self._changed(wrote)
        return out

    async def breaker_record(
        self, results: Sequence[BreakerResult], config: BreakerConfig, actor: str
    ) -> dict[str, BreakerStatus]:
        items = list(results)
        keys = [r.key for r in items]
        async with self._conn() as conn:
            healthy = all(r.ok for r in items)
            if healthy and quiet(await limits.breaker_rows(conn, keys), failures=True):
                return {key: BreakerStatus() for key in keys}
            async with self._pipelined(conn):
                out, wrote = await limits.breaker_record(conn, self._clock, items, config, actor)
        self._changed(wrote)
        return out

    async def breaker_peek(self, key: str) -> BreakerStatus:
        async with self._conn() as conn, conn.pipeline():
            return await limits.breaker_peek(conn, self._clock, key)

    # -- gates, reads -------------------------------------------------------------------

    async def set_gate(self, rule: GateRule) -> None:
        await self._execute(
            q.SET_GATE,
            (
                rule.kind or "",
                rule.account or "",
                rule.model_dump_json(),
                rule.changed_at.timestamp(),
                rule.actor,
                "gate.open" if rule.open else "gate.close",
                rule.reason,
                json.dumps({"kind": rule.kind, "account": rule.account}),
            ),
        )
        self._gates = None
        self._changed(True)

    async def gates(self) -> list[GateRule]:
        # a copy serves until a gate changes (the notifier counts those) or for at most
        # _GATES_FRESH seconds: an executor reads the gates for every claim, and the
        # guarded start checks them in the database anyway
        version, cached, now = self._notifier.gates, self._gates, time.monotonic()
        if cached is not None and cached[0] == version and now - cached[2] <= _GATES_FRESH:
            return list(cached[1])
        rows = await self._rows("SELECT body FROM gates ORDER BY kind, account")
        rules = [GateRule.model_validate_json(body) for (body,) in rows]
        self._gates = (version, rules, now)
        return list(rules)

    async def receipts(self, intent_id: str | None = None, limit: int = 100) -> list[Receipt]:
        if intent_id is None:
            rows = await self._rows(
                "SELECT body FROM receipts ORDER BY seq DESC LIMIT %s", (limit,)
            )
        else:
            rows = await self._rows(
                "SELECT body FROM receipts WHERE intent_id = %s ORDER BY seq DESC LIMIT %s",
                (intent_id, limit),
            )
        return [Receipt.model_validate_json(body) for (body,) in rows]

    async def audit(self, intent_id: str | None = None, limit: int = 100) -> list[AuditEvent]:
        sql = "SELECT seq, at, actor, action, intent_id, from_state, to_state, reason, detail"
        if intent_id is None:
            found = await self._rows(f"{sql} FROM audit ORDER BY seq DESC LIMIT %s", (limit,))
        else:
            found = await self._rows(
                f"{sql} FROM audit WHERE intent_id = %s ORDER BY seq DESC LIMIT %s",
                (intent_id, limit),
            )
        return [conv.audit_event(row) for row in found]

    async def readiness(self, closed: Sequence[GateRule] = ()) -> Readiness:
        gate = conv.gate_filter(closed)
        if gate is None:
            return Readiness(running=0, next_ready_at=None)
        gate_sql, params = gate
        kept = self._ready.take((gate_sql, params))
        if kept is not None:  # a short claim under the same gates answered it just now
            return kept
        # leases under a closed gate cannot be taken over, so they are not counted: an
        # executor would otherwise spin on (or drain-wait for) an expired one forever
        (row,) = await self._rows(q.READINESS.replace("{gate}", gate_sql), params)
        return conv.readiness(row)

    async def counts(self) -> dict[IntentState, int]:
        rows = await self._rows("SELECT state, count(*) FROM intents GROUP BY state")
        return {IntentState(state): n for state, n in rows}

    # -- change notification ----------------------------------------------------------

    async def change_counter(self) -> int:
        if self._pool is None:
            raise self._closed()
        return self._notifier.counter

    async def wait_for_change(self, since: int, timeout: float) -> None:
        if self._pool is None:
            raise self._closed()
        await self._notifier.wait(since, timeout)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        try:
            if pool is not None:
                await pool.close()
        finally:
            await self._notifier.close()


def _attempt(lease: Lease, number: int, started_at: float) -> Attempt:
    """The attempt ``START_ATTEMPTS`` started under ``lease``."""
    return Attempt(
        intent_id=lease.intent_id,
        attempt=number,
        executor=lease.owner,
        fencing_token=lease.token,
        started_at=utc(started_at),
    )
