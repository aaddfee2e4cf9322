"""The Redis store: intents delivered through Redis Streams, every state change a Lua script.

The authoritative state -- intent records, leases and fencing tokens, attempts, receipts,
approvals, audit, gates, buckets, breakers -- lives in hashes, sorted sets, lists and streams
under one key namespace. Each intent's *scope* (kind and account) has a ready stream with a
consumer group: a due intent is XADDed to it, executors lease it with XREADGROUP, finishing
or releasing it acknowledges the entry. Every precondition (state, token, lease expiry) is
checked inside the Lua script that makes the change (lua/ beside this module), so a claim, a
start, a receipt and its audit event each change several keys atomically. See
docs/stores/redis.md for the key layout, the clock, takeover and durability.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Sequence
from typing import Any, cast

from redis.asyncio import Redis

from farmhand.clock import Clock
from farmhand.config import BreakerConfig
from farmhand.contracts import (
    Approval,
    Attempt,
    AuditEvent,
    GateRule,
    Intent,
    IntentState,
    IntentStatus,
    Lease,
    Receipt,
)
from farmhand.contracts.base import utc
from farmhand.errors import StoreError
from farmhand.store.base import (
    Admitted,
    BreakerResult,
    BreakerStatus,
    Bucket,
    Change,
    Claim,
    Guard,
    Held,
    IntentQuery,
    NewIntent,
    Readiness,
    Throttle,
    intent_status,
)
from farmhand.store.redis_limits import RedisLimits, Start, started
from farmhand.store.redis_setup import Link, parse

_WAITING = (IntentState.PENDING.value, IntentState.RETRY_WAIT.value)
#: intents per list script call: a long listing is paged so it never blocks the server
_LIST_PAGE = 1000
#: oldest Redis with everything the scripts use (XAUTOCLAIM, XADD <ms>-*, script flags)
_MIN_VERSION = (7, 0)
#: the key layout this farmhand reads and writes, kept in ``{ns}:layout``
LAYOUT = 1
#: gates() answers from its copy while the gate version, read with the change counter, is
#: at most this old (seconds) and unchanged: the kill switch reaches a busy executor within
#: this long plus one loop, far inside the second it must
_GATES_FRESH = 0.25
#: a wake-up this recent (seconds) answers the next change_counter() without a read
_WAKE_FRESH = 0.05


def _rules(closed: Sequence[GateRule]) -> list[str | int]:
    out: list[str | int] = [len(closed)]
    for rule in closed:
        out += [rule.kind or "", rule.account or ""]
    return out


def _opt(value: Any) -> Any:
    # a Lua false arrives as None (RESP2); tolerate a boolean too
    return None if value is None or value is False else value


def _status(fields: Sequence[Any]) -> IntentStatus:
    (_, body, state, attempts, max_attempts, reason, updated, ready, owner, token, receipts) = (
        fields
    )
    return intent_status(
        json.loads(body),
        state=state,
        attempts=int(attempts),
        max_attempts=int(max_attempts),
        reason=_opt(reason),
        updated_at=float(updated),
        ready_at=float(ready),
        lease_owner=_opt(owner),
        lease_token=int(token),
        receipts=[Receipt.model_validate_json(r) for r in receipts],
    )


def _readiness(reply: Sequence[Any]) -> Readiness:
    running, best = reply
    best = _opt(best)
    return Readiness(running=int(running), next_ready_at=float(best) if best else None)


def _change(change: Change) -> list[str | int | None]:
    receipt = change.receipt
    return [
        change.intent_id,
        change.to_state.value,
        change.actor,
        change.action,
        change.reason,
        "" if change.token is None else str(change.token),
        ",".join(s.value for s in change.from_states),
        repr(change.ready_at) if change.ready_at else "",
        receipt.model_dump_json() if receipt is not None else "",
        receipt.attempt if receipt is not None else 0,
        change.extra_attempts,
    ]


class RedisStore:
    """A Store on a Redis server (7.0 or newer). Create with :meth:`open`."""

    def __init__(self, link: Link) -> None:
        self._link = link
        self.url = link.target.display
        self.namespace = link.target.namespace
        self._limits = RedisLimits(link)
        self._rng = random.Random()
        #: blocking reads whose waiter was cancelled: left to finish on their own (within
        #: a second) so their connections return to the pool instead of being dropped
        self._reads: set[asyncio.Task[None]] = set()
        #: the gate rules as last read, the gate version they were read at, and when
        self._gates: tuple[int, list[GateRule], float] | None = None
        #: the gate version read with the change counter, and when (monotonic)
        self._gate_version: tuple[int, float] | None = None
        #: what the last wake-up read: the counter, the gate version, when (monotonic)
        self._woke: tuple[int, int, float] | None = None

    @classmethod
    async def open(cls, url: str, clock: Clock | None) -> RedisStore:
        """Connect to the Redis server ``url`` names (``?namespace=NAME`` selects the farm's
        keys, default ``farmhand``) and check that it can run the store's scripts."""
        link = Link(parse(url), clock)
        store = cls(link)
        try:
            await store._check_server()
        except BaseException:
            await link.close()
            raise
        return store

    async def _check_server(self) -> None:
        info = await self._link.do(lambda c: c.info("server"))
        version = str(info.get("redis_version", "0"))
        found = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
        if found < _MIN_VERSION:
            raise StoreError(
                f"Redis at {self._link.target.where} is version {version}; the farmhand store"
                " needs Redis 7.0 or newer"
            )
        key = self._link.key("layout")

        async def layout(client: Redis) -> int:
            await client.set(key, LAYOUT, nx=True)
            return int(await client.get(key) or 0)

        found_layout = await self._link.do(layout)
        if found_layout != LAYOUT:
            raise StoreError(
                f"the Redis store {self.url} (namespace {self.namespace!r}) has key layout"
                f" {found_layout}; this farmhand reads layout {LAYOUT}: upgrade farmhand, or"
                " use another namespace"
            )

    # -- intents ----------------------------------------------------------------------

    async def put_intents(self, items: Sequence[NewIntent]) -> list[tuple[IntentStatus, bool]]:
        if not items:
            return []
        rows: list[tuple[str | int, ...]] = []
        bodies: dict[str, str] = {}
        for item in items:
            intent = item.intent
            body = bodies[intent.id] = intent.model_dump_json()
            ready = repr(intent.not_before.timestamp()) if intent.not_before else ""
            scope = f"{intent.kind}/{intent.account}"
            state, limit = item.state.value, intent.max_attempts
            rows.append((intent.id, intent.key, scope, state, ready, limit, item.actor, body))
        now, *pairs = (await self._link.run("put", [json.dumps(rows)])).split("\x1f")
        results = [(pairs[i], pairs[i + 1] == "1") for i in range(0, len(pairs), 2)]
        statuses: dict[str, IntentStatus] = {}
        for item, (stored_id, created) in zip(items, results, strict=True):
            if created:
                intent = item.intent
                ready = repr(intent.not_before.timestamp()) if intent.not_before else now
                fields: tuple[Any, ...] = (intent.id, bodies[intent.id], item.state.value, 0)
                fields += (intent.max_attempts, None, now, ready, None, 0, [])
                statuses[stored_id] = _status(fields)
        known = [i for i, _ in results if i not in statuses]
        if known:
            for found in await self._statuses(known):
                if found is not None:
                    statuses[found.id] = found
        return [(statuses[stored_id], created) for stored_id, created in results]

    async def _statuses(self, refs: Sequence[str]) -> list[IntentStatus | None]:
        unique = list(dict.fromkeys(refs))
        reply = json.loads(await self._link.run("status", unique))
        by_ref = {
            ref: _status(fields) if fields else None
            for ref, fields in zip(unique, reply, strict=True)
        }
        return [by_ref[ref] for ref in refs]

    async def get_intent(self, ref: str) -> IntentStatus | None:
        (found,) = await self._statuses([ref])
        return found

    async def list_intents(self, query: IntentQuery) -> list[IntentStatus]:
        state = query.state.value if query.state is not None else ""
        out: list[IntentStatus] = []
        before = ""
        while len(out) < query.limit:
            size = min(_LIST_PAGE, query.limit - len(out))
            reply = json.loads(
                await self._link.run(
                    "list", [state, query.kind or "", query.account or "", size, before]
                )
            )
            out += [_status(fields) for fields in reply[1:]]
            before = reply[0]
            if not before:
                break
        return out

    # -- executor primitives ------------------------------------------------------------

    async def claim(
        self, owner: str, limit: int, ttl: float, closed: Sequence[GateRule]
    ) -> list[Claim]:
        if limit <= 0:
            return []
        # XAUTOCLAIM's min-idle-time: real milliseconds since the holder last claimed or
        # renewed the entry; the record's lease expiry still decides (claim.lua)
        min_idle = max(1, round(ttl * 1000))
        args = [owner, limit, repr(float(ttl)), self._rng.randrange(1 << 30), min_idle]
        rules = _rules(closed)
        reply = await self._link.run("claim", [*args, *rules])
        if not isinstance(reply, str):
            # nothing claimed: the script answered readiness() for the same rules, which an
            # idle executor asks for next (see readiness); so does a claim of fewer than asked
            self._link.ready.keep(tuple(rules), _readiness(reply))
            return []
        expires_at, *lines = reply.split("\x1e")
        if lines[-1].startswith("\x1f"):  # fewer than asked: readiness, as above
            _, running, best = lines.pop().split("\x1f")
            self._link.ready.keep(tuple(rules), _readiness((running, best)))
        expires = utc(float(expires_at))
        claims = []
        for line in lines:
            intent_id, token, attempts, max_attempts, previous, opened, body = line.split("\x1f", 6)
            claims.append(
                Claim(
                    intent=Intent.model_validate_json(body),
                    lease=Lease(
                        intent_id=intent_id, owner=owner, token=int(token), expires_at=expires
                    ),
                    previous_state=IntentState(previous),
                    attempts=int(attempts),
                    max_attempts=int(max_attempts),
                    open_attempt=_attempt(intent_id, int(attempts), opened) if opened else None,
                )
            )
        return claims

    async def start_attempts(
        self, leases: Sequence[Lease], guards: Sequence[Guard] | None = None
    ) -> list[Attempt | Admitted | Held | None]:
        if not leases:
            return []
        rows: list[list[Any]] = [
            [lease.intent_id, str(lease.token), lease.owner] for lease in leases
        ]
        for row, guard in zip(rows, guards or (), strict=False):
            row += [guard.kind, guard.account, list(guard.buckets), guard.breaker or False]
        if guards and any(guard.take for guard in guards):
            # the tokens are decided on in Python: one read, then start.lua (redis_limits)
            starts = await self._limits.start(rows, guards)
        else:
            now, *answers = (await self._link.run("start", [json.dumps(rows)])).split(" ")
            at = float(now)
            starts = [started(answer, at) for answer in answers]
        return [_attempt_started(lease, start) for lease, start in zip(leases, starts, strict=True)]

    async def renew(self, leases: Sequence[Lease], ttl: float) -> list[Lease | None]:
        if not leases:
            return []
        rows = [[lease.intent_id, str(lease.token), lease.owner] for lease in leases]
        until, *renewed = (
            await self._link.run("renew", [repr(float(ttl)), json.dumps(rows)])
        ).split(" ")
        expires = utc(float(until))
        return [
            lease.model_copy(update={"expires_at": expires}) if ok == "1" else None
            for lease, ok in zip(leases, renewed, strict=True)
        ]

    async def apply(self, changes: Sequence[Change]) -> list[bool]:
        if not changes:
            return []
        reply = await self._link.run("apply", [json.dumps([_change(c) for c in changes])])
        return [ok == "1" for ok in reply]

    # -- approvals ----------------------------------------------------------------------

    async def put_approval(self, approval: Approval, change: Change | None = None) -> bool:
        changes = [] if change is None else [_change(change)]
        detail = {
            "approval": approval.id,
            "payload_hash": approval.payload_hash,
            "expires_at": approval.expires_at.isoformat(),
        }
        args = [
            json.dumps(changes),
            approval.intent_id,
            approval.model_dump_json(),
            repr(approval.created_at.timestamp()),
            approval.approver,
            f"approval.{approval.decision.value}",
            0 if approval.reason is None else 1,
            approval.reason or "",
            json.dumps(detail),
        ]
        reply = await self._link.run("apply", args)
        return change is None or reply == "1"

    async def approvals(self, intent_id: str) -> list[Approval]:
        key = self._link.key(f"ap:{intent_id}")

        async def read(client: Redis) -> list[Any]:
            # the asyncio client's command, typed for both clients
            return await cast("Awaitable[list[Any]]", client.lrange(key, 0, -1))

        found = await self._link.do(read)
        return [Approval.model_validate_json(body) for body in found]

    # -- rate limits and circuit breakers (redis_limits.py) -----------------------------

    async def take(self, requests: Sequence[Sequence[Bucket]]) -> list[Throttle]:
        return await self._limits.take(requests)

    async def peek(self, buckets: Sequence[Bucket]) -> Throttle:
        return await self._limits.peek(buckets)

    async def pause(self, bucket: str, until: float, reason: str, actor: str) -> float:
        return await self._limits.pause(bucket, until, reason, actor)

    async def breaker_enter(
        self,
        entries: Sequence[tuple[str, str]],
        actor: str,
        probe_ttl: float,
    ) -> list[BreakerStatus]:
        return await self._limits.breaker_enter(entries, actor, probe_ttl)

    async def breaker_record(
        self, results: Sequence[BreakerResult], config: BreakerConfig, actor: str
    ) -> dict[str, BreakerStatus]:
        return await self._limits.breaker_record(results, config, actor)

    async def breaker_peek(self, key: str) -> BreakerStatus:
        return await self._limits.breaker_peek(key)

    # -- gates, reads -------------------------------------------------------------------

    async def set_gate(self, rule: GateRule) -> None:
        self._gates = None
        await self._link.run(
            "gate",
            [
                f"{rule.kind or ''}/{rule.account or ''}",
                rule.model_dump_json(),
                repr(rule.changed_at.timestamp()),
                rule.actor,
                "gate.open" if rule.open else "gate.close",
                0 if rule.reason is None else 1,
                rule.reason or "",
                json.dumps({"kind": rule.kind, "account": rule.account}),
            ],
        )

    async def gates(self) -> list[GateRule]:
        seen, cached, now = self._gate_version, self._gates, time.monotonic()
        if (
            seen is not None
            and cached is not None
            and cached[0] == seen[0]
            and now - seen[1] <= _GATES_FRESH
            and now - cached[2] <= 4 * _GATES_FRESH
        ):
            return list(cached[1])
        keys = (self._link.key("gatesv"), self._link.key("gates"))

        async def read(client: Redis) -> list[Any]:
            pipe = client.pipeline(transaction=True)
            pipe.get(keys[0])
            pipe.hgetall(keys[1])
            return list(await pipe.execute())

        raw_version, found = await self._link.do(read)
        # ordered like the SQL stores: by kind, then account, '' (every) first
        order = sorted(found, key=lambda scope: tuple(scope.split("/", 1)))
        rules = [GateRule.model_validate_json(found[scope]) for scope in order]
        self._gates = (int(raw_version or 0), rules, now)
        return list(rules)

    async def receipts(self, intent_id: str | None = None, limit: int = 100) -> list[Receipt]:
        reply = await self._link.run("history", ["receipts", intent_id or "", limit])
        return [Receipt.model_validate_json(body) for body in reply if body]

    async def audit(self, intent_id: str | None = None, limit: int = 100) -> list[AuditEvent]:
        reply = await self._link.run("history", ["audit", intent_id or "", limit])
        events = []
        for entry_id, flat in reply:
            f = dict(zip(flat[::2], flat[1::2], strict=True))
            detail = f.get("detail")
            events.append(
                AuditEvent(
                    seq=int(entry_id.partition("-")[2]),
                    at=utc(float(f["at"])),
                    actor=f["actor"],
                    action=f["action"],
                    intent_id=f.get("intent"),
                    from_state=f.get("from"),
                    to_state=f.get("to"),
                    reason=f.get("reason"),
                    detail=json.loads(detail) if detail else {},
                )
            )
        return events

    async def readiness(self, closed: Sequence[GateRule] = ()) -> Readiness:
        rules = _rules(closed)
        kept = self._link.ready.take(tuple(rules))
        if kept is not None:  # a short claim with the same rules answered it just now
            return kept
        return _readiness(await self._link.run("readiness", rules))

    async def counts(self) -> dict[IntentState, int]:
        states = list(IntentState)

        async def run(client: Redis) -> list[int]:
            pipe = client.pipeline(transaction=True)
            for state in states:
                pipe.zcard(self._link.key(f"state:{state.value}"))
            return list(await pipe.execute())

        found = await self._link.do(run)
        return {state: n for state, n in zip(states, found, strict=True) if n}

    # -- change notification ----------------------------------------------------------

    async def change_counter(self) -> int:
        # right after a wake-up, its wake entry already told the counter and the gate
        # version: no read. A counter that has moved on since only makes the next wait
        # return at once; it never hides a change.
        woke, self._woke = self._woke, None
        if woke is not None and time.monotonic() - woke[2] <= _WAKE_FRESH:
            self._gate_version = (woke[1], woke[2])
            return woke[0]
        # else the gate version comes along in the same round trip, so that the gates()
        # an executor reads right after is answered from its copy when no gate has changed
        keys = (self._link.key("changes"), self._link.key("gatesv"))
        changes, version = await self._link.do(lambda c: c.mget(keys))
        self._gate_version = (int(version or 0), time.monotonic())
        return int(changes or 0)

    async def wait_for_change(self, since: int, timeout: float) -> None:
        self._link.check_open()
        if timeout <= 0:
            return
        read = asyncio.ensure_future(self._block(since, timeout))
        self._reads.add(read)
        read.add_done_callback(self._settled)
        await asyncio.shield(read)

    def _settled(self, read: asyncio.Task[None]) -> None:
        self._reads.discard(read)
        if not read.cancelled():
            # retrieved here: nobody awaits a read whose waiter was cancelled
            read.exception()

    async def _block(self, since: int, timeout: float) -> None:
        # every write script leaves the new counter value n as the one entry 0-n of the wake
        # stream: XREAD after 0-<since> answers at once if the counter has moved, else
        # blocks until a writer commits. Nothing is sent to clients that are not waiting.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        streams: dict[Any, Any] = {self._link.key("wake"): f"0-{since}"}
        block = 0

        async def read(client: Redis) -> bool:
            reply = await client.xread(streams, count=1, block=block)
            if not reply:
                return False
            self._note_wake(reply)
            return True

        while (left := deadline - loop.time()) > 0:
            block = max(1, round(min(left, self._link.max_block) * 1000))
            if await self._link.do(read):
                return

    def _note_wake(self, reply: Any) -> None:
        # [[stream, [(entry id "0-<counter>", {"n": counter, "g": gate version})]]]
        entry_id, fields = reply[0][1][-1]
        if "g" in fields:
            self._woke = (int(entry_id.partition("-")[2]), int(fields["g"]), time.monotonic())

    async def close(self) -> None:
        reads = list(self._reads)
        for read in reads:
            read.cancel()
        await asyncio.gather(*reads, return_exceptions=True)
        await self._link.close()


def _attempt_started(lease: Lease, start: Start) -> Attempt | Admitted | Held | None:
    if start is None or isinstance(start, Held):
        return start
    number, at, throttle = start
    attempt = Attempt(
        intent_id=lease.intent_id,
        attempt=number,
        executor=lease.owner,
        fencing_token=lease.token,
        started_at=utc(at),
    )
    return attempt if throttle is None else Admitted(attempt, throttle)


def _attempt(intent_id: str, number: int, raw: str) -> Attempt:
    executor, token, started = json.loads(raw)
    return Attempt(
        intent_id=intent_id,
        attempt=number,
        executor=executor,
        fencing_token=int(token),
        started_at=utc(float(started)),
    )
