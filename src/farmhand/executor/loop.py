"""The hands: claim intents, call connectors, write receipts only while the lease is current.

Per intent, in order: kill switch -> expiry -> rate limit -> circuit breaker (both shared
through the store, see limits.py) -> lease (fencing token) -> durable "attempt started"
record -> connector call -> receipt. Store writes are batched: one claim, one
start and one apply transaction serve many intents, so one fsync covers a whole batch.

The store checks the kill switch again in the same atomic step that records the start
(a guarded start), so no call starts under a gate closed before that step. For an account
with no rate limit the same step also checks its pauses and its breaker: while nothing
holds it back, an intent costs three store round trips (claim, start, receipt).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from farmhand import gates
from farmhand.clock import Clock, SystemClock
from farmhand.config import CONFIG_NAME, Settings
from farmhand.connectors import Call, ConnectorSet, Failed, Result, Uncertain
from farmhand.contracts import Attempt, GateRule, IntentState, Lease
from farmhand.errors import FarmhandError, PolicyMissing, StoreError
from farmhand.executor import outcomes
from farmhand.executor.admission import Admission
from farmhand.executor.limits import Limits
from farmhand.ids import new_id
from farmhand.keys import Keyring
from farmhand.secrets import SecretStore
from farmhand.store.base import Admitted, Change, Claim, Guard, Held, Store, Throttle

log = logging.getLogger("farmhand.executor")

#: longest idle wait before re-reading gates and readiness
IDLE_WAIT = 1.0
#: how often a draining executor with nothing to claim looks whether its peers' leases
#: have ended (a lease ending wakes no one: it makes nothing claimable)
DRAIN_POLL = 0.05
#: a call starts only if the lease has at least this share of its TTL left
MIN_LEASE_SHARE = 0.5


@dataclass(slots=True)
class ExecutorStats:
    """Counters for one executor run."""

    claimed: int = 0
    calls: int = 0
    succeeded: int = 0
    retried: int = 0
    dead: int = 0
    unknown: int = 0
    expired: int = 0
    released: int = 0
    #: receipts the store refused because the lease had been taken over (fencing)
    fenced: int = 0
    by_action: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Held:
    claim: Claim
    lease: Lease
    #: local monotonic time by which the lease surely expires (measured from the request)
    deadline: float
    started: bool = False


class Executor:
    """Runs intents from a store until stopped (or, with ``drain``, until nothing is ready)."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        executor_id: str | None = None,
        concurrency: int | None = None,
        drain: bool = False,
        clock: Clock | None = None,
        connectors: ConnectorSet | None = None,
        call_timeout: float = 10.0,
        secrets: SecretStore | None = None,
        keyring: Keyring | None = None,
    ) -> None:
        """``secrets``: the credentials connectors may use (default: loaded once, here, from
        ``FARMHAND_SECRET_*`` and the secrets file). ``keyring``: the trusted public keys
        (default: ``keys/`` under the home). Refuses to start without a policy."""
        if settings.policy is None:
            raise PolicyMissing(
                f"no policy: {settings.home / CONFIG_NAME} declares no [agents], so this "
                "executor will not act; run farmhand init to write a starter policy"
            )
        self.policy = settings.policy
        self.keyring = keyring or Keyring(settings.home / "keys")
        self.store = store
        self.settings = settings
        self.id = executor_id or new_id("ex")
        self.concurrency = max(1, concurrency or settings.executor.concurrency)
        self.ttl = settings.executor.lease_ttl
        self.drain = drain
        self.stats = ExecutorStats()
        self.call_timeout = min(call_timeout, self.ttl * MIN_LEASE_SHARE)
        self._clock = clock or SystemClock()
        self._connectors = connectors or ConnectorSet()
        if secrets is None:
            from farmhand.secrets import load

            secrets = load(settings)
        self._secrets = secrets
        self._redactor = secrets.redactor(
            a.secret for a in settings.accounts.values() if a.secret is not None
        )
        self._rng = random.Random()
        self._limits = Limits(store, settings, self.id, self._clock, self._rng, ttl=self.ttl)
        self._held: dict[str, _Held] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._pending: list[tuple[Change, asyncio.Future[bool]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def stop(self) -> None:
        """Ask the executor to stop claiming and shut down gracefully."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        """Whether a stop was requested."""
        return self._stopping.is_set()

    async def run(self) -> ExecutorStats:
        """Claim and execute until stopped; then finish or release in-flight work."""
        heartbeat = asyncio.create_task(self._heartbeat(), name="farmhand-heartbeat")
        try:
            while not self._stopping.is_set():
                if not await self._step():
                    break
        finally:
            await self._shutdown()
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            await self._limits.aclose()
            await self._connectors.aclose()
        return self.stats

    # -- the loop ---------------------------------------------------------------------

    async def _step(self) -> bool:
        """One round: claim what fits and dispatch it, or wait. False when draining is done."""
        self._slot_freed.clear()
        free = self.concurrency - len(self._held)
        if free <= 0:
            await self._wait(self._slot_freed.wait())
            return True
        since = await self.store.change_counter()
        closed = gates.closed(await self.store.gates())
        claims: list[Claim] = []
        if not gates.everything_closed(closed):
            requested = self._clock.monotonic()
            # first the blocked scopes (rate limit, breaker) whose wait is over, only as many
            # as they can take; the ordinary claim leaves them out
            claims = await self._limits.probe(free, closed)
            if len(claims) < free:
                claims += await self.store.claim(
                    self.id, free - len(claims), self.ttl, self._limits.closed(closed)
                )
            for claim in claims:
                self._held[claim.intent.id] = _Held(claim, claim.lease, requested + self.ttl)
        if claims:
            self.stats.claimed += len(claims)
            await self._dispatch(claims, closed)
            if len(claims) >= free:
                return True  # there may be more
            # fewer than asked: nothing more was claimable when the claim ran, and whatever
            # has since made something claimable moved the counter past `since`, so wait
            # now instead of claiming again (the store answers readiness from that claim)
        readiness = await self.store.readiness(self._limits.closed(closed))
        now = self._clock.now()
        idle = not self._held and readiness.running == 0
        nothing_ready = readiness.next_ready_at is None or readiness.next_ready_at > now
        if self.drain and idle and nothing_ready:
            return False
        timeout = DRAIN_POLL if self.drain and not self._held else IDLE_WAIT
        if readiness.next_ready_at is not None:
            timeout = min(timeout, max(0.0, readiness.next_ready_at - now))
        wake = self._limits.next_wake()
        if wake is not None:
            timeout = min(timeout, max(0.0, wake - now))
        # a call of its own ending makes nothing claimable: only a draining executor, which
        # may be done then, wakes for it
        await self._wait(self.store.wait_for_change(since, timeout), slot=self.drain)
        return True

    async def _wait(self, *waits: object, slot: bool = True) -> None:
        """Wait for the first of ``waits``, a stop request or (with ``slot``) a freed slot."""
        tasks = [asyncio.ensure_future(w) for w in waits]  # type: ignore[call-overload]
        tasks.append(asyncio.ensure_future(self._stopping.wait()))
        if slot:
            tasks.append(asyncio.ensure_future(self._slot_freed.wait()))
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _dispatch(self, claims: Sequence[Claim], closed: Sequence[GateRule]) -> None:
        """Check, then start what may run; ``closed``: the gates the claim was made under."""
        now = self._clock.now()
        # a fresh verifier per batch: a key revoked a moment ago already fails
        admission = Admission(self.policy, self.keyring.verifier(), self.store)
        refusals: list[Change] = []
        to_start: list[Claim] = []
        for claim in claims:
            intent = claim.intent
            rule = gates.blocking(closed, intent.kind, intent.account)
            if claim.open_attempt is not None:
                self._spawn(self._reconcile(claim, claim.open_attempt))
            elif rule is not None:
                refusals.append(self._gated(claim, rule, now))
            elif (refusal := await admission.refusal(intent, now)) is not None:
                refusals.append(
                    outcomes.refuse(claim, IntentState.DEAD, "dead_letter", refusal, now)
                )
            elif intent.expires_at is not None and intent.expires_at.timestamp() <= now:
                reason = f"expired at {intent.expires_at.isoformat()} before it could run"
                refusals.append(outcomes.refuse(claim, IntentState.EXPIRED, "expire", reason, now))
            elif claim.attempts >= claim.max_attempts:
                reason = f"no attempts left ({claim.attempts} of {claim.max_attempts} used)"
                refusals.append(
                    outcomes.refuse(claim, IntentState.DEAD, "dead_letter", reason, now)
                )
            else:
                error = self._invalid(claim)
                if error:
                    refusals.append(
                        outcomes.refuse(claim, IntentState.DEAD, "dead_letter", error, now)
                    )
                else:
                    to_start.append(claim)
        # starts first, and gated refusals after: what was refused can wait a round trip
        gated: list[Claim] = []
        if to_start:
            held_back, gated, limited = await self._start(to_start, self._limits.guards(to_start))
            refusals += limited
            if held_back:
                # a pause or a breaker that is not closed: enter the breakers (a half-open
                # one lets one probe through), then start again, explaining any wait
                go, held = await self._limits.enter(held_back)
                refusals += held
                _, closed_late, limited = await self._start(
                    go, self._limits.guards(go, entered=True)
                )
                refusals += limited
                gated += closed_late
        if gated:
            # closed after the claim: read the gates again for the reason
            closed = gates.closed(await self.store.gates())
            refusals += [
                self._gated(c, gates.blocking(closed, c.intent.kind, c.intent.account), now)
                for c in gated
            ]
        if refusals:
            await self._finish_many(refusals)

    async def _start(
        self, claims: Sequence[Claim], guards: Sequence[Guard]
    ) -> tuple[list[Claim], list[Claim], list[Change]]:
        """Start the attempts of ``claims`` (taking their tokens) and spawn their calls; the
        claims a pause or a breaker held back, those a closed gate held, and the changes
        that send those the rate limiter refused back to wait."""
        held_back: list[Claim] = []
        gated: list[Claim] = []
        limited: list[tuple[Claim, Throttle]] = []
        if not claims:
            return held_back, gated, []
        started = await self.store.start_attempts([c.lease for c in claims], guards)
        for claim, attempt in zip(claims, started, strict=True):
            if attempt is None:
                log.warning("lease on %s lost before its attempt started", claim.intent.id)
                self._release(claim.intent.id, claim.lease.token)
            elif isinstance(attempt, Held):
                if attempt.by == "gate":
                    gated.append(claim)
                elif attempt.by == "limited" and attempt.throttle is not None:
                    limited.append((claim, attempt.throttle))
                else:
                    held_back.append(claim)
            else:
                if isinstance(attempt, Admitted):
                    self._limits.took(claim, attempt.throttle)
                self._held[claim.intent.id].started = True
                record = attempt.attempt if isinstance(attempt, Admitted) else attempt
                self._spawn(self._call(claim, record))
        return held_back, gated, self._limits.refused(limited)

    @staticmethod
    def _gated(claim: Claim, rule: GateRule | None, now: float) -> Change:
        """The change that returns ``claim`` to pending because the kill switch is off."""
        if rule is None:  # closed at the start, open again by the time it was read
            reason = "kill switch was off when the attempt was about to start"
        else:
            reason = f"kill switch off for {rule.scope}: {rule.reason or 'no reason given'}"
        return outcomes.refuse(claim, IntentState.PENDING, "release", reason, now)

    def _invalid(self, claim: Claim) -> str | None:
        """Why this executor cannot run the intent at all, or None."""
        try:
            connector = self._connectors.get(claim.intent.kind)
            connector.validate(claim.intent.payload, claim.intent.key)
            account = self.settings.account(claim.intent.account)
            connector.validate_for(claim.intent.payload, account)
        except FarmhandError as exc:
            return f"cannot execute on {self.id}: {exc}"
        if account.secret is not None and account.secret not in self._secrets:
            return (
                f"account {account.name!r} uses secret {account.secret!r}, which executor "
                f"{self.id} does not hold: {self._secrets.where(account.secret)}"
            )
        return None

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- per intent ---------------------------------------------------------------------

    def _account_call(self, claim: Claim, attempt: int) -> Call:
        account = self.settings.account(claim.intent.account)
        return Call(
            intent=claim.intent,
            attempt=attempt,
            account=account,
            timeout=self.call_timeout,
            secret=self._secrets.get(account.secret) if account.secret is not None else None,
        )

    async def _call(self, claim: Claim, attempt: Attempt) -> None:
        intent = claim.intent
        try:
            connector = self._connectors.get(intent.kind)
            call = self._account_call(claim, attempt.attempt)
            held = self._held[intent.id]
            if held.deadline - self._clock.monotonic() < self.ttl * MIN_LEASE_SHARE:
                await self._renew([held])
            self.stats.calls += 1
            result: Result
            try:
                # a timeout scope, not wait_for: the call runs in this task, not a new one
                async with asyncio.timeout(self.call_timeout):
                    result = await connector.execute(call)
            except TimeoutError:
                result = self._interrupted(call, f"call exceeded {self.call_timeout:.1f}s")
            except Exception as exc:  # a connector bug must not take the executor down
                log.exception("connector %s raised on %s", intent.kind, intent.id)
                result = self._interrupted(call, f"connector raised {type(exc).__name__}: {exc}")
            # before anything keeps its text: breaker and rate-limit records, the receipt
            result = outcomes.redacted_result(result, self._redactor)
            self._limits.observe(claim, result)
            change = outcomes.after_call(
                claim, attempt, result, self._clock.now(), self.settings.executor.retry, self._rng
            )
            await self._finish(change)
        finally:
            self._release(intent.id, claim.lease.token)

    def _interrupted(self, call: Call, error: str) -> Result:
        connector = self._connectors.get(call.intent.kind)
        if connector.idempotent(call.account):
            return Failed(error=error, retryable=True)
        return Uncertain(error=error)

    async def _reconcile(self, claim: Claim, attempt: Attempt) -> None:
        intent = claim.intent
        try:
            connector = self._connectors.get(intent.kind)
            call = self._account_call(claim, attempt.attempt)
            log.info(
                "reconciling %s: attempt %d by %s left no receipt",
                intent.id,
                attempt.attempt,
                attempt.executor,
            )
            try:
                async with asyncio.timeout(self.call_timeout):
                    found = await connector.reconcile(call, attempt)
            except Exception as exc:
                found = Uncertain(error=f"reconcile failed: {type(exc).__name__}: {exc}")
            await self._finish(outcomes.after_reconcile(claim, attempt, found, self._clock.now()))
        finally:
            self._release(intent.id, claim.lease.token)

    def _release(self, intent_id: str, token: int) -> None:
        """Forget the lease with ``token`` on an intent. By token, not by id: the intent may
        already be held again under a newer lease (a retry claimed back before the task that
        wrote the retry resumed), which must stay held."""
        held = self._held.get(intent_id)
        if held is not None and held.claim.lease.token == token:
            del self._held[intent_id]
            self._slot_freed.set()

    # -- writing outcomes -------------------------------------------------------------

    async def _finish(self, change: Change) -> bool:
        # one change per finished call: the same as _finish_many([change]) without a
        # gather (a future and a callback fewer per intent)
        if self._redactor:
            change = outcomes.redacted(change, self._redactor)
        future = self._queue(change)
        ok = await future
        self._settled(change, ok)
        return ok

    async def _finish_many(self, changes: Sequence[Change]) -> list[bool]:
        """Queue changes for the next group commit and wait for their results.

        Every change passes here, so this is where secret values leave reasons and receipts.
        """
        if self._redactor:
            changes = [outcomes.redacted(change, self._redactor) for change in changes]
        futures = [self._queue(change) for change in changes]
        results = list(await asyncio.gather(*futures))
        for change, ok in zip(changes, results, strict=True):
            self._settled(change, ok)
        return results

    def _queue(self, change: Change) -> asyncio.Future[bool]:
        """Add ``change`` to the next group commit; its future gets the store's verdict."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((change, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return future

    def _settled(self, change: Change, ok: bool) -> None:
        self._count(change, ok)
        if change.token is not None and change.to_state is not IntentState.RUNNING:
            self._release(change.intent_id, change.token)

    async def _flush(self) -> None:
        delay = 0.05
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                results = await self.store.apply([change for change, _ in batch])
            except StoreError as exc:
                # keep the outcomes: a store hiccup must not lose what was done
                log.warning("writing %d outcomes failed, retrying: %s", len(batch), exc)
                self._pending[:0] = batch
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            for (_, future), ok in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(ok)

    def _count(self, change: Change, ok: bool) -> None:
        stats = self.stats
        if not ok:
            stats.fenced += 1
            log.warning(
                "fencing: %s of %s refused; lease token %s is no longer current",
                change.action,
                change.intent_id,
                change.token,
            )
            return
        stats.by_action[change.action] = stats.by_action.get(change.action, 0) + 1
        state = change.to_state
        if state is IntentState.SUCCEEDED:
            stats.succeeded += 1
        elif state is IntentState.RETRY_WAIT:
            stats.retried += 1
        elif state is IntentState.DEAD:
            stats.dead += 1
        elif state is IntentState.UNKNOWN:
            stats.unknown += 1
        elif state is IntentState.EXPIRED:
            stats.expired += 1
        elif state is IntentState.PENDING:
            stats.released += 1

    # -- leases -----------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        interval = max(0.05, self.ttl / 3)
        while True:
            await asyncio.sleep(interval)
            held = list(self._held.values())
            if held:
                try:
                    await self._renew(held)
                except StoreError as exc:
                    log.warning("lease renewal failed: %s", exc)

    async def _renew(self, held: list[_Held]) -> None:
        requested = self._clock.monotonic()
        renewed = await self.store.renew([h.lease for h in held], self.ttl)
        for item, lease in zip(held, renewed, strict=True):
            if self._held.get(item.claim.intent.id) is not item:
                continue  # finished (and its lease ended) while the renewal was in flight
            if lease is None:
                log.warning(
                    "lease on %s lost (token %d taken over); its receipt will be refused",
                    item.claim.intent.id,
                    item.lease.token,
                )
                item.deadline = requested
            else:
                item.lease = lease
                item.deadline = requested + self.ttl

    async def _shutdown(self) -> None:
        """Finish in-flight work within the grace period, release what never started."""
        unstarted = [h.claim for h in self._held.values() if not h.started]
        grace = self.settings.executor.grace
        if self._tasks:
            log.info("waiting up to %.1fs for %d in-flight intents", grace, len(self._tasks))
            _, late = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in late:
                task.cancel()
            if late:
                # their leases expire and the next holder reconciles the attempts
                log.warning("%d calls did not finish within the grace period", len(late))
                await asyncio.gather(*late, return_exceptions=True)
        now = self._clock.now()
        release = [
            outcomes.refuse(c, IntentState.PENDING, "release", "executor shutting down", now)
            for c in unstarted
            if c.intent.id in self._held
        ]
        if release:
            await self._finish_many(release)
        if self._flusher is not None:
            await self._flusher
