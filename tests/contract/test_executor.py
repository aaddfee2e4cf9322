"""The executor loop on every store (tests/contract/conftest.py) with the noop connector.

The store and the executor share one FakeClock: a drain run stops when nothing is ready
*now*, so backoff is crossed by advancing the clock between runs instead of sleeping.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta
from typing import Any, ClassVar

import pytest

from farmhand.clock import FakeClock
from farmhand.config import AccountConfig, Limit, Settings
from farmhand.connectors import Call, Result
from farmhand.connectors.noop import NoopConnector
from farmhand.contracts import IntentState, IntentStatus, Outcome, Receipt, ReceiptSource
from farmhand.contracts.base import utc
from farmhand.contracts.state import ACTIVE
from farmhand.coordinator import Coordinator, SubmitRequest
from farmhand.executor import Executor, ExecutorStats
from farmhand.ids import new_id
from farmhand.store import Change, Store
from farmhand.store.base import Bucket
from store_support import RUN_LIMIT, CountingNoop, connector_set, run, status

S = IntentState


class NotIdempotent(CountingNoop):
    """A noop that claims repeating a call could duplicate its effect."""

    def idempotent(self, account: AccountConfig) -> bool:
        return False


class Exploding(CountingNoop):
    """A connector with a bug: execute raises."""

    idempotent_flag: ClassVar[bool] = True

    def idempotent(self, account: AccountConfig) -> bool:
        return self.idempotent_flag

    async def execute(self, call: Call) -> Result:
        self.calls.append(call)
        raise RuntimeError("kaboom")


class ExplodingNotIdempotent(Exploding):
    idempotent_flag: ClassVar[bool] = False


async def run_until_settled(
    store: Store, settings: Settings, clock: FakeClock, connector: NoopConnector | None = None
) -> list[ExecutorStats]:
    """Drain, cross the backoff, drain again... until nothing is active."""
    runs = []
    for _ in range(50):
        runs.append(await run(store, settings, clock, connector))
        counts = await store.counts()
        if not any(counts.get(state) for state in ACTIVE):
            return runs
        clock.advance(settings.executor.retry.max_delay)
    raise AssertionError(f"intents still active after {len(runs)} drains: {counts}")


async def submit(coordinator: Coordinator, key: str = "k", **kw: Any) -> IntentStatus:
    payload = kw.pop("payload", {})
    submitted = await coordinator.submit(SubmitRequest(kind="noop", key=key, payload=payload, **kw))
    return submitted.status


async def crash_mid_call(store: Store, clock: FakeClock, settings: Settings) -> None:
    """An executor claims everything ready, starts the attempts and dies without receipts."""
    claims = await store.claim("ex_crashed", 10, settings.executor.lease_ttl, [])
    started = await store.start_attempts([c.lease for c in claims])
    assert all(started)
    clock.advance(settings.executor.lease_ttl + 1)


# -- the happy path ---------------------------------------------------------------------------


async def test_success_writes_one_receipt(
    store: Store, settings: Settings, clock: FakeClock, coordinator: Coordinator
) -> None:
    intent = await submit(coordinator)
    connector = CountingNoop()
    stats = await run(store, settings, clock, connector, executor_id="ex_1")
    assert (stats.claimed, stats.calls, stats.succeeded, stats.fenced) == (1, 1, 1, 0)
    assert len(connector.calls) == 1
    assert connector.calls[0].attempt == 1
    assert connector.calls[0].account == AccountConfig(name="default")

    done = await status(store, intent.id)
    assert done.state is S.SUCCEEDED
    assert done.attempts == 1
    assert done.lease_owner is None
    (receipt,) = done.receipts
    assert receipt.outcome is Outcome.SUCCEEDED
    assert receipt.source is ReceiptSource.CONNECTOR
    assert receipt.external_id == f"noop-{intent.id}"
    assert receipt.attempt == 1
    assert receipt.executor == "ex_1"
    assert receipt.fencing_token == 1
    assert receipt.started_at == utc(clock.now())
    actions = [e.action for e in reversed(await store.audit(intent.id))]
    assert actions == ["submit", "claim", "succeed"]


async def test_many_intents_with_delay(
    store: Store, settings: Settings, clock: FakeClock, coordinator: Coordinator
) -> None:
    for i in range(12):
        await submit(coordinator, f"k{i}", payload={"delay_ms": 5})
    stats = await run(store, settings, clock, concurrency=4)
    assert (stats.claimed, stats.calls, stats.succeeded) == (12, 12, 12)
    assert await store.counts() == {S.SUCCEEDED: 12}
    receipts = await store.receipts(limit=100)
    assert len(receipts) == 12
    assert len({r.intent_id for r in receipts}) == 12


async def test_nothing_to_do(store: Store, settings: Settings, clock: FakeClock) -> None:
    stats = await run(store, settings, clock)
    assert stats == ExecutorStats()


# -- failures ---------------------------------------------------------------------------------


async def test_retryable_failure_retries_then_dead_letters(
    store: Store, settings: Settings, clock: FakeClock, coordinator: Coordinator
) -> None:
    intent = await submit(coordinator, payload={"fail": "retryable"}, max_attempts=3)
    connector = CountingNoop()
    retry = settings.executor.retry

    first = await run(store, settings, clock, connector)
    assert (first.calls, first.retried, first.dead) == (1, 1, 0)
    waiting = await status(store, intent.id)
    assert waiting.state is S.RETRY_WAIT
    (failed,) = waiting.receipts
    assert waiting.next_attempt_at is not None
    delay = (waiting.next_attempt_at - failed.finished_at).total_seconds()
    assert retry.base_delay / 2 - 1e-6 <= delay <= retry.base_delay + 1e-6

    # not ready before its backoff has passed
    again = await run(store, settings, clock, connector)
    assert again.claimed == 0

    runs = await run_until_settled(store, settings, clock, connector)
    assert sum(r.calls for r in runs) == 2
    dead = await status(store, intent.id)
    assert dead.state is S.DEAD
    assert dead.attempts == 3
    assert dead.reason is not None
    assert dead.reason.startswith("gave up after 3 attempts")
    assert [c.attempt for c in connector.calls] == [1, 2, 3]
    assert [(r.attempt, r.outcome, r.retryable) for r in dead.receipts] == [
        (n, Outcome.FAILED, True) for n in (1, 2, 3)
    ]
    assert all(r.error == "noop asked to fail (retryable)" for r in dead.receipts)
    tokens = [r.fencing_token for r in dead.receipts]
    assert tokens == sorted(set(tokens))
    actions = [e.action for e in reversed(await store.audit(intent.id))]
    assert actions == ["submit"] + ["claim", "retry"] * 2 + ["claim", "dead_letter"]


async def test_backoff_grows(
    store: Store, settings: Settings, clock: FakeClock, coordinator: Coordinator
) -> None:
    intent = await submit(coordinator, payload={"fail": "retryable"}, max_attempts=4)
    retry = settings.executor.retry
    for n in (1, 2, 3):
        await run(store, settings, clock)
        current = await status(store, intent.id)
        assert current.state is S.RETRY_WAIT
        assert current.next_attempt_at is not None
        delay = (current.next_attempt_at - current.receipts[-1].finished_at).total_seconds()
        ceiling = min(retry.max_delay, retry.base_delay * 2 ** (n - 1))
        assert ceiling / 2 - 1e-6 <= delay <= ceiling + 1e-6
        clock.advance(retry.max_delay)


async def test_permanent_failure_dead_letters_at_once(
    store: Store, settings: Settings, clock: FakeClock, coordinator: Coordinator
) -> None:
    intent = await submit(coordinator, payload={"fail": "permanent"}, max_attempts=5)
    stats = await run(store, settings, clock)
    assert (stats.calls, stats.dead, stats.retried) == (1, 1, 0)
    dead = await status(store, intent.id)
    assert dead.state is S.DEAD
    assert dead.attempts == 1
    assert dead.reason == "permanent failure: noop asked to fail (permanent)"
    (receipt,) = dead.receipts
    assert (receipt.outcome, receipt.retryable, receipt.attempt) == (Outcome.FAILED, False, 1)


async def test_requeued_dead_letter_runs_again(
    store: Store, settings: Settings, clock: FakeClock, coordinator: Coordinator
) -> None:
    intent = await submit(coordinator, payload={"fail": "permanent"})
    await run(store, settings, clock)
    await coordinator.requeue(intent.id, "human:ops")
    stats = await run(store, settings, clock)
    assert stats.calls == 1
    again = await status(store, intent.id)
    assert again.state is S.DEAD
    assert [r.attempt for r in again.receipts] == [1, 2]


async def test_no_attempts_left_dead_letters_without_a_call(
    store: Store, settings: Settings, clock: FakeClock, coordinator: Coordinator
) -> None:
    intent = await submit(coordinator, max_attempts=1)
    # an earlier holder used the only attempt and (against policy) left it in retry_wait
    (claim,) = await store.claim("ex_old", 1, 30, [])
    (attempt,) = await store.start_attempts([claim.lease])
    assert attempt is not None
    receipt = Receipt(
        id=new_id("rc"),
        intent_id=intent.id,
        attempt=1,
        outcome=Outcome.FAILED,
        retryable=True,
        error="flaky",
        executor="ex_old",
        fencing_token=claim.lease.token,
        finished_at=utc(clock.now()),
    )
    change = Change(
        intent_id=intent.id,
        to_state=S.RETRY_WAIT,
        actor="ex_old",
        action="retry",
        token=claim.lease.token,
        receipt=receipt,
    )
    assert await store.apply([change]) == [True]
    connector = CountingNoop()
    stats = await run(store, settings, clock, connector)
    assert connector.calls == []
    assert stats.dead == 1
    dead = await status(store, intent.id)
    assert dead.state is S.DEAD
    assert dead.reason == "no attempts left (1 of 1 used)"
    last = dead.receipts[-1]
    assert (last.attempt, last.outcome, last.source) == (0, Outcome.FAILED, ReceiptSource.EXECUTOR)


@pytest.mark.parametrize(
    ("connector", "state", "outcome"),
    [
        (Exploding(), S.RETRY_WAIT, Outcome.FAILED),
        (ExplodingNotIdempotent(), S.UNKNOWN, Outcome.UNKNOWN),
    ],
)
async def test_connector_that_raises(
    store: Store,
    settings: Settings,
    clock: FakeClock,
    coordinator: Coordinator,
    connector: Exploding,
    state: IntentState,
    outcome: Outcome,
) -> None:
    intent = await submit(coordinator)
    await run(store, settings, clock, connector)
    after = await status(store, intent.id)
    assert after.state is state
    (receipt,) = after.receipts
    assert receipt.outcome is outcome
    assert receipt.error == "connector raised RuntimeError: kaboom"


# -- refusals without a call -----------------------------------------------------------------


async def test_expired_intent_expires_without_a_call(
    store: Store, settings: Settings, clock: FakeClock, coordinator: Coordinator
) -> None:
    intent = await submit(coordinator, expires_at=utc(clock.now()) + timedelta(seconds=5))
    clock.advance(5)
    connector = CountingNoop()
    stats = await run(store, settings, clock, connector)
    assert connector.calls == []
    assert (stats.claimed, stats.calls, stats.expired) == (1, 0, 1)
    expired = await status(store, intent.id)
    assert expired.state is S.EXPIRED
    assert expired.attempts == 0
    assert expired.receipts == []
    assert expired.reason is not None
    assert expired.reason.startswith("expired at")
    assert (await store.audit(intent.id))[0].action == "expire"


async def test_not_yet_expired_intent_runs(
    store: Store, settings: Settings, clock: FakeClock, coordinator: Coordinator
) -> None:
    intent = await submit(coordinator, expires_at=utc(clock.now()) + timedelta(seconds=5))
    clock.advance(4)
    await run(store, settings, clock)
    assert (await status(store, intent.id)).state is S.SUCCEEDED


async def test_not_before_is_waited_for(
    store: Store, settings: Settings, clock: FakeClock, coordinator: Coordinator
) -> None:
    intent = await submit(coordinator, not_before=utc(clock.now()) + timedelta(seconds=60))
    stats = await run(store, settings, clock)
    assert stats.claimed == 0
    clock.advance(60)
    await run(store, settings, clock)
    assert (await status(store, intent.id)).state is S.SUCCEEDED


@pytest.mark.parametrize("scope", [{"kind": "noop"}, {"account": "default"}, {}])
async def test_closed_gate_claims_nothing(
    store: Store,
    settings: Settings,
    clock: FakeClock,
    coordinator: Coordinator,
    scope: dict[str, str],
) -> None:
    intent = await submit(coordinator)
    await coordinator.set_gate(False, "human:ops", reason="incident", **scope)
    connector = CountingNoop()
    stats = await run(store, settings, clock, connector)
    assert (stats.claimed, stats.calls) == (0, 0)
    assert connector.calls == []
    pending = await status(store, intent.id)
    assert pending.state is S.PENDING
    assert [e.action for e in await store.audit(intent.id)] == ["submit"]

    await coordinator.set_gate(True, "human:ops", **scope)
    await run(store, settings, clock, connector)
    assert (await status(store, intent.id)).state is S.SUCCEEDED


async def test_closed_gate_other_scope_still_runs(
    store: Store, settings: Settings, clock: FakeClock, coordinator: Coordinator
) -> None:
    blocked = await submit(coordinator, "blocked", account="acme")
    free = await submit(coordinator, "free")
    await coordinator.set_gate(False, "human:ops", account="acme")
    await run(store, settings, clock)
    assert (await status(store, blocked.id)).state is S.PENDING
    assert (await status(store, free.id)).state is S.SUCCEEDED


async def test_closed_gate_over_an_abandoned_lease(
    store: Store, settings: Settings, clock: FakeClock, coordinator: Coordinator
) -> None:
    """A crashed holder's lease under a closed gate is not taken over, and drain ends."""
    intent = await submit(coordinator)
    await crash_mid_call(store, clock, settings)
    await coordinator.set_gate(False, "human:ops", kind="noop")
    connector = CountingNoop()
    stats = await run(store, settings, clock, connector)
    assert (stats.claimed, stats.calls) == (0, 0)
    held = await status(store, intent.id)
    assert held.state is S.RUNNING
    assert held.lease_owner == "ex_crashed"


# -- takeover of an interrupted attempt ------------------------------------------------------


async def test_takeover_idempotent_connector_retries(
    store: Store, settings: Settings, clock: FakeClock, coordinator: Coordinator
) -> None:
    intent = await submit(coordinator)
    await crash_mid_call(store, clock, settings)
    connector = CountingNoop()
    await run_until_settled(store, settings, clock, connector)
    done = await status(store, intent.id)
    assert done.state is S.SUCCEEDED
    assert done.attempts == 2
    assert [c.attempt for c in connector.calls] == [2]
    reconciled, succeeded = done.receipts
    assert (reconciled.attempt, reconciled.outcome, reconciled.source) == (
        1,
        Outcome.FAILED,
        ReceiptSource.RECONCILE,
    )
    assert reconciled.retryable is True
    assert (succeeded.attempt, succeeded.outcome) == (2, Outcome.SUCCEEDED)
    actions = [e.action for e in reversed(await store.audit(intent.id))]
    assert actions == ["submit", "claim", "claim", "reconcile.retry", "claim", "succeed"]


async def test_takeover_not_idempotent_parks_unknown(
    store: Store, settings: Settings, clock: FakeClock, coordinator: Coordinator
) -> None:
    intent = await submit(coordinator)
    await crash_mid_call(store, clock, settings)
    connector = NotIdempotent()
    stats = await run(store, settings, clock, connector)
    assert connector.calls == []
    assert (stats.claimed, stats.calls, stats.unknown) == (1, 0, 1)
    parked = await status(store, intent.id)
    assert parked.state is S.UNKNOWN
    assert parked.attempts == 1
    (receipt,) = parked.receipts
    assert (receipt.attempt, receipt.outcome, receipt.source) == (
        1,
        Outcome.UNKNOWN,
        ReceiptSource.RECONCILE,
    )
    assert receipt.error is not None
    assert "farmhand resolve" in receipt.error
    assert "ex_crashed" in receipt.error

    # nothing runs it again until a human decides
    assert (await run(store, settings, clock, connector)).claimed == 0
    await coordinator.resolve(intent.id, "retry", "human:ops")
    await run(store, settings, clock, connector)
    assert [c.attempt for c in connector.calls] == [2]
    assert (await status(store, intent.id)).state is S.SUCCEEDED


async def test_takeover_of_last_attempt_waits_for_a_human(
    store: Store, settings: Settings, clock: FakeClock, coordinator: Coordinator
) -> None:
    # the interrupted last attempt may have taken effect even where resending is harmless:
    # with no attempt left to resend, it is not dead-lettered as if it had surely failed
    intent = await submit(coordinator, max_attempts=1)
    await crash_mid_call(store, clock, settings)
    connector = CountingNoop()
    stats = await run(store, settings, clock, connector)
    assert connector.calls == []
    assert (stats.dead, stats.unknown) == (0, 1)
    parked = await status(store, intent.id)
    assert parked.state is S.UNKNOWN
    assert parked.reason is not None
    assert "may have taken effect" in parked.reason
    (receipt,) = parked.receipts
    assert (receipt.source, receipt.outcome) == (ReceiptSource.RECONCILE, Outcome.UNKNOWN)


async def test_takeover_before_attempt_started_just_runs(
    store: Store, settings: Settings, clock: FakeClock, coordinator: Coordinator
) -> None:
    intent = await submit(coordinator)
    await store.claim("ex_crashed", 10, settings.executor.lease_ttl, [])
    clock.advance(settings.executor.lease_ttl)
    connector = NotIdempotent()
    await run(store, settings, clock, connector)
    done = await status(store, intent.id)
    assert done.state is S.SUCCEEDED
    assert [c.attempt for c in connector.calls] == [1]
    assert len(done.receipts) == 1


async def test_live_lease_of_another_executor_is_left_alone(
    store: Store, settings: Settings, clock: FakeClock, coordinator: Coordinator
) -> None:
    intent = await submit(coordinator)
    (claim,) = await store.claim("ex_other", 1, settings.executor.lease_ttl, [])
    connector = CountingNoop()
    executor = Executor(
        store, settings, drain=True, clock=clock, connectors=connector_set(connector)
    )
    task = asyncio.create_task(executor.run())
    # the drain waits for the other holder; let it finish its work and the drain ends
    await asyncio.sleep(0.05)
    assert not task.done()
    (attempt,) = await store.start_attempts([claim.lease])
    assert attempt is not None
    succeed = Change(
        intent_id=intent.id,
        to_state=S.SUCCEEDED,
        actor="ex_other",
        action="succeed",
        token=claim.lease.token,
    )
    assert await store.apply([succeed]) == [True]
    stats = await asyncio.wait_for(task, RUN_LIMIT)
    assert (stats.claimed, stats.calls) == (0, 0)
    assert connector.calls == []


class Held(CountingNoop):
    """A noop whose calls last until ``done`` is set; ``started`` once ``calls`` began."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.expected = calls
        self.started = asyncio.Event()
        self.done = asyncio.Event()

    async def execute(self, call: Call) -> Result:
        self.calls.append(call)
        if len(self.calls) == self.expected:
            self.started.set()
        await self.done.wait()
        return await NoopConnector.execute(self, call)


# the server stores only: the embedded stores' change counter moves with every commit, the
# executor's own included, so their executors look again (a local read, not a round trip)
@pytest.mark.parametrize("store_url", ["postgres", "redis"], indirect=True)
async def test_a_claim_of_fewer_than_asked_is_not_followed_by_another(
    store: Store, settings: Settings, clock: FakeClock, coordinator: Coordinator
) -> None:
    # nothing more was claimable when that claim ran, and whatever became claimable since
    # wakes the executor: it waits instead of asking the store again at once
    for i in range(3):
        await submit(coordinator, key=f"k{i}")
    claims: list[int] = []
    original = store.claim

    async def counting(*args: Any) -> Any:
        found = await original(*args)
        claims.append(len(found))
        return found

    store.claim = counting  # type: ignore[method-assign]
    connector = Held(3)
    running = asyncio.ensure_future(run(store, settings, clock, connector, concurrency=10))
    async with asyncio.timeout(RUN_LIMIT):
        await connector.started.wait()
    await asyncio.sleep(0.2)  # time enough for a claim that should not come
    assert claims == [3]
    connector.done.set()
    stats = await running
    assert stats.succeeded == 3
    assert sum(claims) == 3  # the rest of the run claimed nothing more


async def test_unlimited_account_starts_with_one_guarded_round_trip(
    store: Store, settings: Settings, clock: FakeClock, coordinator: Coordinator
) -> None:
    for i in range(3):
        await submit(coordinator, key=f"k{i}")
    calls: list[tuple[str, tuple[Any, ...]]] = []
    for name in ("claim", "take", "breaker_enter", "start_attempts", "gates"):
        original = getattr(store, name)

        async def counting(*args: Any, _name: str = name, _original: Any = original) -> Any:
            calls.append((_name, args))
            return await _original(*args)

        setattr(store, name, counting)
    stats = await run(store, settings, clock, CountingNoop())
    assert stats.succeeded == 3
    names = [name for name, _ in calls]
    # no token to take, the breaker checked by the start itself: one guarded start, right
    # after the claim (no second look at the gates in between)
    assert "take" not in names
    assert "breaker_enter" not in names
    assert names.count("start_attempts") == 1
    at = names.index("start_attempts")
    assert names[at - 1] == "claim"
    leases, guards = calls[at][1]
    assert len(leases) == 3
    assert {(g.kind, g.account, g.buckets, g.breaker) for g in guards} == {
        ("noop", "default", ("account:default",), "noop:default")
    }


async def test_limited_account_takes_its_tokens_in_the_start_itself(
    store: Store, settings: Settings, clock: FakeClock, coordinator: Coordinator
) -> None:
    limit = Limit(rate=1.0, burst=2)
    settings = dataclasses.replace(
        settings, accounts={**settings.accounts, "default": AccountConfig("default", limit=limit)}
    )
    for i in range(3):
        await submit(coordinator, key=f"k{i}")
    calls: list[tuple[str, tuple[Any, ...]]] = []
    for name in ("claim", "take", "breaker_enter", "start_attempts"):
        original = getattr(store, name)

        async def counting(*args: Any, _name: str = name, _original: Any = original) -> Any:
            calls.append((_name, args))
            return await _original(*args)

        setattr(store, name, counting)
    connector = CountingNoop()
    stats = await run(store, settings, clock, connector)
    # the burst of two ran; the third waits for a token, its attempt not spent
    assert (stats.succeeded, stats.by_action["rate_limited"]) == (2, 1)
    names = [name for name, _ in calls]
    # the tokens are taken by the guarded start, atomically with it: no separate take, and
    # the breaker (closed) checked by the start too
    assert "take" not in names
    assert "breaker_enter" not in names
    at = names.index("start_attempts")
    assert names[at - 1] == "claim"
    leases, guards = calls[at][1]
    assert len(leases) == 3
    assert {(g.breaker, g.take) for g in guards} == {
        ("noop:default", (Bucket("account:default", limit),))
    }
    started = [c.intent.id for c in connector.calls]
    for intent_id in started:
        (receipt,) = (await status(store, intent_id)).receipts
        assert receipt.started_at is not None
        assert receipt.started_at.timestamp() == clock.now()
