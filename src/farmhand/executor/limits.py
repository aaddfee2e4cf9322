"""Central rate limits and the shared circuit breaker, as one executor applies them.

Per claimed intent, after the kill switch and expiry, one guarded start in the store checks
the kill switch and the breaker (see :mod:`farmhand.executor.breaker`) and takes a token
from each of its rate-limited buckets (see :mod:`farmhand.executor.ratelimit`) in the same
atomic step that records "attempt started": the attempt starts at the moment its tokens
were taken, however long the executor then takes to make the call. A breaker that is not
closed (or a pause) sends the intent through :meth:`Limits.enter`, then a second guarded
start. An intent that must wait is released to ``pending`` with ``ready_at`` at the end of
the wait (audit action ``rate_limited`` or ``breaker_open``): no attempt is spent, no token
taken, and it is not failed. After the call its result goes to the breaker, and a
provider's Retry-After pauses the account's bucket for every executor.

Churn. An executor that learns a bucket or breaker is blocked until T (a refused take, the
last token taken, an open breaker, a pause) keeps that scope -- the account, or kind and
account -- out of its claims until T, exactly like a closed kill switch of its own. At T it
first *peeks* (one read: no write lock, no audit event) and, when the bucket has tokens
again or the breaker lets a probe through, makes a *probe claim* for only that many
intents before its ordinary claim, which still leaves the scope out. A busy limited account
therefore costs about one claim per token, not a claim-and-release of a whole batch per
token, however long its backlog. Executors look again at slightly different moments
(:func:`farmhand.executor.ratelimit.jitter_span`) so they rarely race for the same token;
the few that lose release their one intent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from farmhand.clock import Clock
from farmhand.config import Settings
from farmhand.connectors.base import Failed, Result
from farmhand.contracts import GateRule, Intent, IntentState
from farmhand.contracts.base import utc
from farmhand.errors import StoreError
from farmhand.executor import breaker, ratelimit
from farmhand.executor.ratelimit import Scope
from farmhand.store.base import (
    BreakerResult,
    BreakerStatus,
    Bucket,
    Change,
    Claim,
    Guard,
    Store,
    Throttle,
)

log = logging.getLogger("farmhand.executor")

#: shortest hold of an intent refused by a breaker (a guard against an immediate re-claim)
_MIN_HOLD = 0.01
#: successes are recorded for the breakers at most this often (seconds of real time): on
#: a closed breaker they only reset its failure count, and one write per call would cost a
#: store round trip per intent. Failures, probe results and results for a breaker this
#: executor holds back are recorded at once, after the successes before them.
SUCCESS_FLUSH = 0.5


@dataclass(slots=True)
class _Block:
    """A scope this executor leaves out of its ordinary claims until ``until``."""

    key: str
    scope: Scope
    until: float
    #: the closed gate rule that keeps the scope out of claims and readiness
    rule: GateRule
    #: what to peek when ``until`` has come: a bucket, or a breaker key
    bucket: Bucket | None = None
    breaker: str | None = None


class _Guards(NamedTuple):
    """One kind and account's guards for :meth:`Store.start_attempts`, and its buckets."""

    #: the first start: kill switch and breaker checked, tokens taken (or pauses checked)
    first: Guard
    #: a start after the breaker was entered: kill switch checked, every bucket taken from
    entered: Guard
    #: the buckets of its rate-limit request, by name
    buckets: dict[str, Bucket]


def _covers(scope: Scope, intent: Intent) -> bool:
    return scope[1] == intent.account and scope[0] in (None, intent.kind)


class Limits:
    """One executor's side of the shared rate limits and circuit breakers."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        owner: str,
        clock: Clock,
        rng: random.Random,
        *,
        ttl: float,
    ) -> None:
        self._store = store
        self._settings = settings
        self._owner = owner
        self._clock = clock
        self._rng = rng
        #: lease TTL: claims are made with it, and a half-open probe is granted for as long
        self._ttl = ttl
        self._blocks: dict[str, _Block] = {}
        self._results: list[BreakerResult] = []
        self._scopes: dict[str, Scope] = {}
        self._recorder: asyncio.Task[None] | None = None
        #: a result waiting in _results must be recorded now (see SUCCESS_FLUSH)
        self._urgent = asyncio.Event()
        self._last_record = -SUCCESS_FLUSH
        #: per kind and account: its guards and buckets
        self._guards: dict[tuple[str, str], _Guards] = {}
        #: intents that entered a half-open breaker as its probe
        self._probes: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- claiming ---------------------------------------------------------------------

    def closed(self, rules: Sequence[GateRule]) -> list[GateRule]:
        """``rules`` (the kill switch) plus a closed rule for every scope blocked here."""
        return [*rules, *(block.rule for block in self._blocks.values())]

    def next_wake(self) -> float | None:
        """When the earliest block still in the future ends (epoch seconds), if any. Blocks
        already due are looked at by the next :meth:`probe`, whatever wakes the executor
        (while the whole kill switch is off, that is only the switch turning on)."""
        now = self._clock.now()
        return min((b.until for b in self._blocks.values() if b.until > now), default=None)

    async def probe(self, free: int, rules: Sequence[GateRule]) -> list[Claim]:
        """Claim intents of blocked scopes whose wait is over, only as many as their buckets
        have tokens (one per breaker probe); ``rules`` are the kill switch's closed rules."""
        now = self._clock.now()
        due = [block for block in self._blocks.values() if block.until <= now]
        if not due or free <= 0:
            return []
        probing: list[_Block] = []
        size = 0
        for block in due:
            n = await self._probe_size(block, now, free)
            if n > 0:
                probing.append(block)
                size += n
        if not probing:
            return []
        limit = min(free, size)
        others = [b.rule for b in self._blocks.values() if all(b is not p for p in probing)]
        claims = await self._store.claim(self._owner, limit, self._ttl, [*rules, *others])
        if len(claims) < limit:
            # everything claimable was claimed: a scope with nothing in it has no backlog
            # left, so it goes back to ordinary claims
            for block in probing:
                if not any(_covers(block.scope, c.intent) for c in claims):
                    self._blocks.pop(block.key, None)
        return claims

    async def _probe_size(self, block: _Block, now: float, free: int) -> int:
        """How many intents of a due block to claim now (0: it stays blocked, or is gone)."""
        if block.bucket is not None:
            throttle = await self._store.peek([block.bucket])
            if throttle.wait > 0:
                block.until = now + throttle.wait + self._jitter(block.bucket)
                return 0
            if block.bucket.limit is None:
                # a pause that ended, on a bucket with no rate: back to ordinary claims
                self._blocks.pop(block.key, None)
                return 0
            return ratelimit.probe_size(throttle.tokens, free)
        assert block.breaker is not None
        status = await self._store.breaker_peek(block.breaker)
        if status.state == "closed":
            self._blocks.pop(block.key, None)
            return 0
        if status.wait > 0:
            block.until = now + breaker.hold_for(status) + self._rng.uniform(0, 0.1)
            return 0
        return 1

    # -- before the attempt -----------------------------------------------------------

    def guards(self, claims: Sequence[Claim], *, entered: bool = False) -> list[Guard]:
        """What the store must find clear, or take, when it starts each of ``claims``: the
        kill switch, the breaker, and either the pauses of buckets without a rate or the
        tokens of rate-limited ones (taken with the start, so the attempt starts when its
        tokens were taken). ``entered``: the breakers were entered (:meth:`enter`), and
        every bucket is judged as a take, which explains a pause by how long it lasts."""
        scopes = [self._scope(claim.intent) for claim in claims]
        return [scope.entered if entered else scope.first for scope in scopes]

    def _scope(self, intent: Intent) -> _Guards:
        """The guards of ``intent``'s kind and account (the settings do not change while the
        executor runs: one answer each)."""
        found = self._guards.get((intent.kind, intent.account))
        if found is None:
            request = tuple(ratelimit.buckets(intent, self._settings.account(intent.account)))
            key = breaker.key(intent.kind, intent.account)
            if any(b.limit is not None for b in request):
                first = Guard(intent.kind, intent.account, breaker=key, take=request)
            else:
                # nothing to take: a pause is all the buckets can hold it by, and checking
                # one writes nothing
                first = Guard(intent.kind, intent.account, tuple(b.name for b in request), key)
            entered = Guard(intent.kind, intent.account, take=request)
            found = _Guards(first, entered, {b.name: b for b in request})
            self._guards[(intent.kind, intent.account)] = found
        return found

    def took(self, claim: Claim, throttle: Throttle) -> None:
        """A start took its tokens: when that was a bucket's last, stay away until the next
        one (nothing refused)."""
        if throttle.bucket is not None and throttle.next_in > 0:
            bucket = self._scope(claim.intent).buckets[throttle.bucket]
            self._block_bucket(claim.intent, bucket, self._clock.now() + throttle.next_in)

    def refused(self, refusals: Sequence[tuple[Claim, Throttle]]) -> list[Change]:
        """The changes that send claims the rate limiter refused back to wait (no attempt
        spent), one token apart per bucket, and keep their scopes out of claims meanwhile."""
        now = self._clock.now()
        held: list[Change] = []
        behind: dict[str, int] = {}
        for claim, throttle in refusals:
            # a refusal always names the bucket that refused, one of the guard's
            bucket = self._scope(claim.intent).buckets[throttle.bucket or ""]
            # intents sent to wait behind one bucket come back one token apart
            n = behind[bucket.name] = behind.get(bucket.name, 0) + 1
            spread = (n - 1) / bucket.limit.rate if bucket.limit is not None else 0.0
            until = now + throttle.wait + spread
            reason = ratelimit.wait_reason(throttle, bucket, until)
            held.append(self._hold(claim, "rate_limited", reason, until))
            self._block_bucket(claim.intent, bucket, now + throttle.wait)
        return held

    async def enter(self, claims: Sequence[Claim]) -> tuple[list[Claim], list[Change]]:
        """Enter the breakers of claims a guarded start held back: those that may start now
        (closed, or the one half-open probe), and the changes that release the rest to wait
        (no attempt spent)."""
        if not claims:
            return [], []
        entries = [(breaker.key(c.intent.kind, c.intent.account), c.intent.id) for c in claims]
        statuses = await self._store.breaker_enter(entries, self._owner, self._ttl)
        now = self._clock.now()
        go: list[Claim] = []
        held: list[Change] = []
        for claim, (key, _), status in zip(claims, entries, statuses, strict=True):
            if status.probe:
                log.info("circuit breaker %s is half-open: %s probes it", key, claim.intent.id)
                self._probes.add(claim.intent.id)
                # the scope's other intents wait for the probe's result
                self._block_breaker(key, claim.intent, now + self._ttl)
                go.append(claim)
            elif status.state != "closed":
                until = now + max(breaker.hold_for(status), _MIN_HOLD)
                reason = breaker.wait_reason(key, status, until)
                held.append(self._hold(claim, "breaker_open", reason, until))
                self._block_breaker(key, claim.intent, until)
            else:
                go.append(claim)
        return go, held

    @staticmethod
    def _hold(claim: Claim, action: str, reason: str, until: float) -> Change:
        return Change(
            intent_id=claim.intent.id,
            to_state=IntentState.PENDING,
            actor=claim.lease.owner,
            action=action,
            reason=reason,
            token=claim.lease.token,
            ready_at=until,
        )

    # -- after the call ---------------------------------------------------------------

    def observe(self, claim: Claim, result: Result) -> None:
        """Feed a call's result to its breaker and, with a Retry-After, pause its account.
        Written in the background (batched); never raises."""
        intent = claim.intent
        key = breaker.key(intent.kind, intent.account)
        self._scopes[key] = breaker.scope(intent.kind, intent.account)
        ok = not breaker.is_failure(result)
        self._results.append(BreakerResult(key, intent.id, ok, breaker.error(result)))
        probe = intent.id in self._probes
        self._probes.discard(intent.id)
        if not ok or probe or f"breaker:{key}" in self._blocks:
            self._urgent.set()
        if self._recorder is None or self._recorder.done():
            self._recorder = asyncio.create_task(self._record())
        seconds = ratelimit.pause_seconds(result)
        if seconds is not None and isinstance(result, Failed):
            reason = ratelimit.pause_reason(result, seconds)
            task = asyncio.create_task(self._pause(intent, seconds, reason))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _record(self) -> None:
        loop = asyncio.get_running_loop()
        while self._results:
            wait = self._last_record + SUCCESS_FLUSH - loop.time()
            if wait > 0 and not self._urgent.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._urgent.wait()
            self._urgent.clear()
            self._last_record = loop.time()
            batch, self._results = self._results, []
            try:
                states = await self._store.breaker_record(
                    batch, self._settings.breaker, self._owner
                )
            except StoreError as exc:
                # a lost result costs the breaker one count, or a probe its deadline
                log.warning("recording %d results for circuit breakers failed: %s", len(batch), exc)
                continue
            now = self._clock.now()
            for key, status in states.items():
                self._breaker_state(key, status, now)

    def _breaker_state(self, key: str, status: BreakerStatus, now: float) -> None:
        block_key = f"breaker:{key}"
        if status.state == "closed":
            self._blocks.pop(block_key, None)
            return
        if status.state == "open" and block_key not in self._blocks:
            log.warning("circuit breaker %s is open for %.1fs", key, status.wait)
        scope = self._scopes.get(key)
        if scope is not None:
            self._block(block_key, scope, now + breaker.hold_for(status), breaker_key=key)

    async def _pause(self, intent: Intent, seconds: float, reason: str) -> None:
        name = ratelimit.account_bucket(intent.account)
        try:
            until = await self._store.pause(name, self._clock.now() + seconds, reason, self._owner)
        except StoreError as exc:
            log.warning("pausing %s failed: %s", name, exc)
            return
        log.warning("%s paused until %s: %s", name, utc(until).isoformat(), reason)
        bucket = Bucket(name, self._settings.account(intent.account).limit)
        self._block(f"bucket:{name}", (None, intent.account), until, bucket=bucket)

    async def aclose(self) -> None:
        """Write the results still waiting, and wait for pauses being written."""
        self._urgent.set()
        pending = [t for t in (self._recorder, *self._tasks) if t is not None]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    # -- blocks -----------------------------------------------------------------------

    def _jitter(self, bucket: Bucket) -> float:
        return self._rng.uniform(0, ratelimit.jitter_span(bucket.limit))

    def _block_bucket(self, intent: Intent, bucket: Bucket, until: float) -> None:
        scope = ratelimit.scope(bucket.name, intent)
        self._block(f"bucket:{bucket.name}", scope, until + self._jitter(bucket), bucket=bucket)

    def _block_breaker(self, key: str, intent: Intent, until: float) -> None:
        scope = breaker.scope(intent.kind, intent.account)
        self._scopes[key] = scope
        self._block(f"breaker:{key}", scope, until, breaker_key=key)

    def _block(
        self,
        key: str,
        scope: Scope,
        until: float,
        *,
        bucket: Bucket | None = None,
        breaker_key: str | None = None,
    ) -> None:
        block = self._blocks.get(key)
        if block is not None:
            block.until = until
            return
        rule = GateRule(
            kind=scope[0],
            account=scope[1],
            open=False,
            actor=self._owner,
            reason=f"held back by {key}",
            changed_at=utc(self._clock.now()),
        )
        self._blocks[key] = _Block(key, scope, until, rule, bucket, breaker_key)
