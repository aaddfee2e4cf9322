"""The executor with central rate limits and the shared circuit breaker, on a real SQLite
store: waiting costs no attempt and fails nothing; a Retry-After pauses the account for
every executor; a limited backlog is not claimed and released over and over."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from farmhand.clock import FakeClock
from farmhand.config import AccountConfig, BreakerConfig, Limit, Settings
from farmhand.connectors import Call, Failed, Result, Succeeded
from farmhand.connectors.noop import NoopConnector
from farmhand.contracts import IntentState
from farmhand.coordinator import Coordinator, SubmitRequest
from farmhand.executor import Executor, ExecutorStats, limits
from farmhand.keys import Keyring
from farmhand.store import Store, open_store
from store_support import CountingNoop, connector_set, make_intent, put, run, status

S = IntentState


def limited(settings: Settings, **accounts: AccountConfig) -> Settings:
    return dataclasses.replace(settings, accounts={**settings.accounts, **accounts})


async def submit(coordinator: Coordinator, key: str, account: str = "acme", **kw: Any) -> str:
    payload = kw.pop("payload", {})
    request = SubmitRequest(kind="noop", key=key, payload=payload, account=account, **kw)
    return (await coordinator.submit(request)).status.id


async def audit_actions(store: Store, intent_id: str) -> list[str]:
    return [e.action for e in reversed(await store.audit(intent_id))]


class Switchable(CountingNoop):
    """A noop whose target is down (retryable failure) while ``down`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True

    async def execute(self, call: Call) -> Result:
        self.calls.append(call)
        if self.down:
            return Failed(error="HTTP 503 from target", retryable=True)
        return await NoopConnector().execute(call)


class TooManyRequests(CountingNoop):
    """A noop that answers a first attempt with 429 and Retry-After if its payload asks."""

    async def execute(self, call: Call) -> Result:
        self.calls.append(call)
        if call.intent.payload.get("status") == 429 and call.attempt == 1:
            return Failed(error="HTTP 429: slow down", retryable=True, retry_after=30.0)
        return await NoopConnector().execute(call)


# -- rate limits --------------------------------------------------------------------------------


async def test_over_budget_waits_without_spending_an_attempt(
    store: Store, settings: Settings, clock: FakeClock, coordinator: Coordinator
) -> None:
    settings = limited(settings, acme=AccountConfig("acme", limit=Limit(rate=1.0, burst=2)))
    ids = [await submit(coordinator, f"k{i}") for i in range(5)]
    other = await submit(coordinator, "free", account="other")
    connector = CountingNoop()

    stats = await run(store, settings, clock, connector)
    assert (stats.calls, stats.succeeded) == (3, 3)  # the burst of 2, and the other account
    assert stats.by_action["rate_limited"] == 3
    assert stats.dead == stats.retried == 0
    assert (await status(store, other)).state is S.SUCCEEDED
    states = Counter([(await status(store, i)).state for i in ids])
    assert states == {S.SUCCEEDED: 2, S.PENDING: 3}
    waiting = [await status(store, i) for i in ids]
    for intent in waiting:
        if intent.state is not S.PENDING:
            continue
        assert intent.attempts == 0
        assert intent.receipts == []
        assert intent.reason is not None
        assert intent.reason.startswith("rate limit: bucket account:acme (1/s, burst 2) is empty")
        assert intent.next_attempt_at is not None
        assert intent.next_attempt_at.timestamp() >= clock.now() + 1.0 - 1e-6
        assert await audit_actions(store, intent.id) == ["submit", "claim", "rate_limited"]
    (event,) = [e for e in await store.audit(waiting[-1].id) if e.action == "rate_limited"]
    assert event.from_state == "running"
    assert event.to_state == "pending"

    # they come back one token apart, and each runs once with its first attempt
    for _ in range(10):
        clock.advance(1.0)
        await run(store, settings, clock, connector)
    for intent_id in ids:
        done = await status(store, intent_id)
        assert done.state is S.SUCCEEDED
        assert done.attempts == 1
    assert Counter(c.intent.id for c in connector.calls) == Counter({*ids, other})


async def test_kind_limit_holds_only_that_kind(
    store: Store, settings: Settings, clock: FakeClock, coordinator: Coordinator
) -> None:
    account = AccountConfig("acme", kind_limits={"noop": Limit(rate=1.0, burst=1)})
    settings = limited(settings, acme=account)
    ids = [await submit(coordinator, f"k{i}") for i in range(3)]
    stats = await run(store, settings, clock)
    assert stats.succeeded == 1
    held = [s for s in [await status(store, i) for i in ids] if s.state is S.PENDING]
    assert len(held) == 2
    assert all("account:acme:kind:noop" in (h.reason or "") for h in held)


async def test_unlimited_accounts_are_not_held(
    store: Store, settings: Settings, clock: FakeClock, coordinator: Coordinator
) -> None:
    for i in range(40):
        await submit(coordinator, f"k{i}")
    stats = await run(store, settings, clock)
    assert (stats.calls, stats.succeeded, stats.released) == (40, 40, 0)
    assert await store.counts() == {S.SUCCEEDED: 40}
    assert not [e for e in await store.audit(limit=1000) if "." in e.action]


async def test_retry_after_pauses_the_account_for_every_executor(
    store: Store, settings: Settings, clock: FakeClock, coordinator: Coordinator
) -> None:
    first = await submit(coordinator, "first", payload={"status": 429})
    connector = TooManyRequests()
    stats = await run(store, settings, clock, connector, executor_id="ex_1")
    assert stats.retried == 1
    limited_ = await status(store, first)
    assert limited_.state is S.RETRY_WAIT
    assert limited_.next_attempt_at is not None
    assert limited_.next_attempt_at.timestamp() >= clock.now() + 30 - 1e-6

    (pause,) = [e for e in await store.audit(limit=100) if e.action == "bucket.pause"]
    assert pause.actor == "ex_1"
    assert pause.reason == "provider asked to retry after 30s: HTTP 429: slow down"
    assert pause.detail["bucket"] == "account:acme"

    # another executor (nothing learned locally) holds the account, not other accounts
    later = [await submit(coordinator, f"later{i}") for i in range(3)]
    other = await submit(coordinator, "other", account="other")
    stats = await run(store, settings, clock, connector, executor_id="ex_2")
    assert stats.succeeded == 1
    assert (await status(store, other)).state is S.SUCCEEDED
    for intent_id in later:
        held = await status(store, intent_id)
        assert held.state is S.PENDING
        assert held.attempts == 0
        assert held.reason is not None
        assert held.reason.startswith("rate limit: bucket account:acme is paused until")
        assert "HTTP 429: slow down" in held.reason
    assert [c.intent.id for c in connector.calls] == [first, other]

    clock.advance(31)
    stats = await run(store, settings, clock, connector, executor_id="ex_3")
    assert stats.succeeded == 4
    for intent_id in [first, *later]:
        assert (await status(store, intent_id)).state is S.SUCCEEDED


# -- circuit breaker ----------------------------------------------------------------------------


async def test_open_breaker_holds_intents_without_failing_them(
    store: Store, settings: Settings, clock: FakeClock, coordinator: Coordinator
) -> None:
    settings = dataclasses.replace(settings, breaker=BreakerConfig(failures=2, cooldown=60.0))
    connector = Switchable()
    failing = [await submit(coordinator, f"f{i}", max_attempts=5) for i in range(2)]
    stats = await run(store, settings, clock, connector, executor_id="ex_1")
    assert (stats.calls, stats.retried) == (2, 2)
    (opened,) = [e for e in await store.audit(limit=100) if e.action == "breaker.open"]
    assert opened.actor == "ex_1"
    assert opened.reason == "2 consecutive failures; last: HTTP 503 from target"
    assert opened.detail["breaker"] == "noop:acme"

    # the retries and new intents wait for the cool-down: no call, no attempt, not failed
    fresh = [await submit(coordinator, f"n{i}") for i in range(3)]
    elsewhere = await submit(coordinator, "elsewhere", account="other")
    connector.down = False
    clock.advance(1.0)
    stats = await run(store, settings, clock, connector, executor_id="ex_2")
    assert stats.calls == 1  # only the other account
    assert stats.dead == 0
    assert (await status(store, elsewhere)).state is S.SUCCEEDED
    for intent_id in failing + fresh:
        held = await status(store, intent_id)
        assert held.state is S.PENDING
        assert held.attempts == (1 if intent_id in failing else 0)
        assert held.reason is not None
        assert held.reason.startswith("circuit breaker noop:acme is open")
        assert (await audit_actions(store, intent_id))[-1] == "breaker_open"

    # after the cool-down one probe goes; its success closes the breaker and the rest run
    clock.advance(60)
    stats = await run(store, settings, clock, connector, executor_id="ex_3")
    assert stats.calls == 1
    clock.advance(2)
    await run(store, settings, clock, connector, executor_id="ex_4")
    for intent_id in failing + fresh:
        assert (await status(store, intent_id)).state is S.SUCCEEDED
    actions = [e.action for e in reversed(await store.audit(limit=1000))]
    assert [a for a in actions if a.startswith("breaker.")] == [
        "breaker.open",
        "breaker.half_open",
        "breaker.close",
    ]


async def test_permanent_failures_do_not_open_the_breaker(
    store: Store, settings: Settings, clock: FakeClock, coordinator: Coordinator
) -> None:
    settings = dataclasses.replace(settings, breaker=BreakerConfig(failures=2, cooldown=60.0))
    for i in range(4):
        await submit(coordinator, f"p{i}", payload={"fail": "permanent"})
    ok = await submit(coordinator, "ok")
    stats = await run(store, settings, clock)
    assert (stats.dead, stats.succeeded) == (4, 1)
    assert (await status(store, ok)).state is S.SUCCEEDED
    assert not [e for e in await store.audit(limit=100) if e.action.startswith("breaker.")]


# -- churn --------------------------------------------------------------------------------------


async def test_limited_backlog_is_not_claimed_and_released_over_and_over(
    tmp_home: Path, settings: Settings
) -> None:
    """Two executors in real time, 300 intents, 20/s: releases stay near one batch each."""
    rate, burst, concurrency, seconds = 20.0, 5, 16, 1.5
    settings = limited(settings, acme=AccountConfig("acme", limit=Limit(rate=rate, burst=burst)))
    stores = [await open_store(f"sqlite://{tmp_home}/real.db") for _ in range(2)]
    try:
        signer = Keyring(tmp_home / "keys").signer("coordinator")
        coordinator = Coordinator(stores[0], policy=settings.policy, signer=signer)
        requests = [
            SubmitRequest(kind="noop", key=f"k{i:03d}", payload={}, account="acme")
            for i in range(300)
        ]
        for request in requests:
            await coordinator.submit(request)
        executors = [
            Executor(
                s,
                settings,
                executor_id=f"ex_{n}",
                concurrency=concurrency,
                connectors=connector_set(CountingNoop()),
            )
            for n, s in enumerate(stores)
        ]
        tasks = [asyncio.create_task(e.run()) for e in executors]
        await asyncio.sleep(seconds)
        for executor in executors:
            executor.stop()
        stats: list[ExecutorStats] = await asyncio.gather(*tasks)
        calls = sum(s.calls for s in stats)
        released = sum(s.by_action.get("rate_limited", 0) for s in stats)
        claimed = sum(s.claimed for s in stats)
        # the bound itself: the burst plus the rate over the run (with a little slack for
        # start-up); and nothing failed
        assert calls <= burst + rate * (seconds + 0.5)
        assert calls >= rate * seconds * 0.5
        assert sum(s.dead + s.retried for s in stats) == 0
        # without churn control each executor would claim and release a batch of 16 per
        # token (~30 tokens here): hundreds of releases; with it, about a batch each
        assert released <= 2 * concurrency + calls // 2, (released, calls, claimed)
        assert claimed <= calls + released + 2 * concurrency
    finally:
        for s in stores:
            await s.close()


async def test_successes_wait_for_the_next_write_failures_do_not(
    store: Store, settings: Settings, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # long enough that only a failure (or closing) can write the waiting successes
    monkeypatch.setattr(limits, "SUCCESS_FLUSH", 30.0)
    await put(store, *(make_intent(clock, f"k{i}") for i in range(4)))
    first, second, third, failing = await store.claim("ex_a", 10, 30.0, [])
    recorded: list[list[tuple[str, bool]]] = []
    original = store.breaker_record

    async def counting(results: Any, config: BreakerConfig, actor: str) -> Any:
        recorded.append([(r.ticket, r.ok) for r in results])
        return await original(results, config, actor)

    monkeypatch.setattr(store, "breaker_record", counting)
    shared = limits.Limits(store, settings, "ex_a", clock, random.Random(), ttl=30.0)
    ok = Succeeded(external_id="x")
    shared.observe(first, ok)
    await asyncio.sleep(0.05)
    assert recorded == [[(first.intent.id, True)]]  # the first write is not held back
    shared.observe(second, ok)
    shared.observe(third, ok)
    await asyncio.sleep(0.05)
    assert len(recorded) == 1  # successes wait
    shared.observe(failing, Failed(error="HTTP 503", retryable=True))
    await asyncio.sleep(0.05)
    # the failure goes at once, after the successes before it, in order
    assert recorded[1] == [
        (second.intent.id, True),
        (third.intent.id, True),
        (failing.intent.id, False),
    ]
    shared.observe(first, ok)
    await shared.aclose()  # closing writes what still waits
    assert recorded[2] == [(first.intent.id, True)]
