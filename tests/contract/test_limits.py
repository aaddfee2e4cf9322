"""Store conformance: rate-limit buckets (GCRA), pauses and circuit breakers, with a FakeClock,
including races between two connections to the same store."""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest

from farmhand.clock import FakeClock
from farmhand.config import BreakerConfig, Limit
from farmhand.store import Store
from farmhand.store.base import BreakerResult, Bucket

RATE5 = Limit(rate=5.0, burst=5)
BREAKER = BreakerConfig(failures=3, cooldown=10.0)
KEY = "webhook.post:acme"
PROBE_TTL = 30.0


def near(seconds: float) -> object:
    """Equal up to 10 us: epoch seconds near 1.8e9 carry ~0.24 us of precision."""
    return pytest.approx(seconds, abs=1e-5)


def bucket(limit: Limit | None = RATE5, name: str = "account:acme") -> Bucket:
    return Bucket(name, limit)


async def take_one(store: Store, *buckets: Bucket) -> float:
    (throttle,) = await store.take([list(buckets or (bucket(),))])
    return throttle.wait


async def fail(store: Store, n: int, ticket: str = "in_x", error: str = "HTTP 503") -> None:
    for _ in range(n):
        await store.breaker_record([BreakerResult(KEY, ticket, False, error)], BREAKER, "ex_a")


async def actions(store: Store) -> list[str]:
    return [e.action for e in reversed(await store.audit(limit=1000))]


# -- GCRA ---------------------------------------------------------------------------------------


async def test_burst_then_steady_rate(store: Store, clock: FakeClock) -> None:
    throttles = await store.take([[bucket()] for _ in range(7)])
    assert [t.wait for t in throttles[:5]] == [0.0] * 5
    assert [t.tokens for t in throttles[:5]] == [4, 3, 2, 1, 0]
    assert throttles[3].next_in == 0.0
    assert throttles[4].next_in == near(0.2)
    assert throttles[4].bucket == "account:acme"
    for refused in throttles[5:]:
        assert refused.wait == near(0.2)
        assert (refused.bucket, refused.paused, refused.tokens) == ("account:acme", None, 0)

    clock.advance(0.1)
    assert await take_one(store) == near(0.1)
    clock.advance(0.1)
    assert await take_one(store) == 0.0
    assert await take_one(store) == near(0.2)

    # steady state: try every 10 ms for 10 s; a token every 0.2 s, never more
    taken: list[float] = []
    for _ in range(1000):
        clock.advance(0.01)
        if await take_one(store) == 0.0:
            taken.append(clock.now())
    # (the fake clock's 10 ms steps drift by float rounding: a token due at 0.8 s may be
    # seen at 0.81 s, so one of the fifty can slip past the end)
    assert 49 <= len(taken) <= 50
    gaps = [b - a for a, b in itertools.pairwise(taken)]
    assert min(gaps) > 0.2 - 1e-5
    assert max(gaps) < 0.2 + 0.01 + 1e-5

    # idle refills up to the burst, no further
    clock.advance(60)
    assert (await store.peek([bucket()])).tokens == 5
    assert [t.wait for t in await store.take([[bucket()]] * 6)][-2:] == [0.0, near(0.2)]


async def test_every_window_respects_the_bound(store: Store, clock: FakeClock) -> None:
    limit = Limit(rate=3.0, burst=4)
    rng = random.Random(7)
    taken: list[float] = []
    for _ in range(2000):
        clock.advance(rng.choice((0.0, 0.001, 0.05, 0.2, 0.7)))
        (throttle,) = await store.take([[bucket(limit)]])
        if throttle.wait == 0.0:
            taken.append(clock.now())
    assert len(taken) > 100
    for i, start in enumerate(taken):
        for j in range(i, len(taken)):
            assert j - i + 1 <= limit.burst + limit.rate * (taken[j] - start) + 1e-6


async def test_take_is_all_or_nothing_across_buckets(store: Store, clock: FakeClock) -> None:
    account = bucket(Limit(rate=1.0, burst=1))
    kind = bucket(Limit(rate=10.0, burst=5), "account:acme:kind:webhook.post")
    first, second = await store.take([[account, kind], [account, kind]])
    assert first.wait == 0.0
    assert first.bucket == "account:acme"  # it is the one that runs dry first
    assert first.next_in == near(1.0)
    assert second.wait == near(1.0)
    assert second.bucket == "account:acme"
    # the kind bucket gave only the one token that went through
    assert (await store.peek([kind])).tokens == 4


async def test_peek_takes_nothing(store: Store) -> None:
    for _ in range(3):
        peeked = await store.peek([bucket()])
        assert (peeked.wait, peeked.tokens) == (0.0, 5)
    assert await take_one(store) == 0.0
    assert (await store.peek([bucket()])).tokens == 4


async def test_unlimited_bucket_is_only_held_by_a_pause(store: Store, clock: FakeClock) -> None:
    free = bucket(None)
    throttles = await store.take([[free]] * 100)
    assert all(t.wait == 0.0 and t.tokens is None for t in throttles)
    assert await actions(store) == []


# -- pauses -------------------------------------------------------------------------------------


async def test_pause_holds_every_take_until_it_ends(store: Store, clock: FakeClock) -> None:
    until = clock.now() + 30
    assert await store.pause("account:acme", until, "HTTP 429: slow down", "ex_a") == until
    for limit in (None, RATE5):
        (throttle,) = await store.take([[bucket(limit)]])
        assert throttle.wait == near(30)
        assert throttle.paused == "HTTP 429: slow down"
        assert throttle.bucket == "account:acme"
    # another account is not affected
    assert await take_one(store, bucket(name="account:other")) == 0.0

    # a shorter pause never shortens it; a slightly longer one is not audited again
    assert await store.pause("account:acme", clock.now() + 5, "short", "ex_b") == until
    assert await store.pause("account:acme", until + 0.5, "again", "ex_b") == until + 0.5
    events = [e for e in await store.audit() if e.action == "bucket.pause"]
    assert len(events) == 1
    (event,) = events
    assert (event.actor, event.reason, event.intent_id) == ("ex_a", "HTTP 429: slow down", None)
    assert event.detail["bucket"] == "account:acme"
    assert event.detail["seconds"] == 30

    clock.advance(30.5)
    assert await take_one(store) == 0.0
    # the pause took nothing from the bucket meanwhile
    assert (await store.peek([bucket()])).tokens == 4


async def test_pause_extended_by_a_second_or_more_is_audited(
    store: Store, clock: FakeClock
) -> None:
    await store.pause("account:acme", clock.now() + 10, "first", "ex_a")
    await store.pause("account:acme", clock.now() + 20, "second", "ex_b")
    reasons = [e.reason for e in reversed(await store.audit()) if e.action == "bucket.pause"]
    assert reasons == ["first", "second"]


# -- circuit breakers ---------------------------------------------------------------------------


async def test_breaker_opens_after_consecutive_failures(store: Store, clock: FakeClock) -> None:
    (status,) = await store.breaker_enter([(KEY, "in_1")], "ex_a", PROBE_TTL)
    assert (status.state, status.wait, status.probe) == ("closed", 0.0, False)

    await fail(store, 2)
    # a success in between resets the count
    states = await store.breaker_record([BreakerResult(KEY, "in_2", True)], BREAKER, "ex_a")
    assert states[KEY].state == "closed"
    await fail(store, 2)
    assert (await store.breaker_peek(KEY)).state == "closed"
    await fail(store, 1, error="HTTP 502 from target")
    opened = await store.breaker_peek(KEY)
    assert (opened.state, opened.wait) == ("open", near(10.0))

    (refused,) = await store.breaker_enter([(KEY, "in_3")], "ex_a", PROBE_TTL)
    assert (refused.state, refused.wait, refused.probe) == ("open", near(10.0), False)
    # other breakers are independent
    (other,) = await store.breaker_enter([("noop:acme", "in_4")], "ex_a", PROBE_TTL)
    assert other.state == "closed"

    (event,) = [e for e in await store.audit() if e.action.startswith("breaker.")]
    assert event.action == "breaker.open"
    assert event.actor == "ex_a"
    assert event.reason == "3 consecutive failures; last: HTTP 502 from target"
    assert event.detail["breaker"] == KEY
    assert (event.detail["from"], event.detail["to"]) == ("closed", "open")


async def test_half_open_lets_one_probe_through_and_success_closes(
    store: Store, clock: FakeClock
) -> None:
    await fail(store, 3)
    clock.advance(10)
    first, second = await store.breaker_enter([(KEY, "in_a"), (KEY, "in_b")], "ex_a", PROBE_TTL)
    assert (first.state, first.probe, first.wait) == ("half_open", True, 0.0)
    assert (second.state, second.probe) == ("half_open", False)
    assert second.wait == near(PROBE_TTL)
    (third,) = await store.breaker_enter([(KEY, "in_c")], "ex_b", PROBE_TTL)
    assert (third.state, third.probe) == ("half_open", False)

    # results of calls other than the probe say nothing
    await store.breaker_record([BreakerResult(KEY, "in_old", False, "late")], BREAKER, "ex_b")
    await store.breaker_record([BreakerResult(KEY, "in_old", True)], BREAKER, "ex_b")
    assert (await store.breaker_peek(KEY)).state == "half_open"

    states = await store.breaker_record([BreakerResult(KEY, "in_a", True)], BREAKER, "ex_a")
    assert states[KEY].state == "closed"
    (go,) = await store.breaker_enter([(KEY, "in_d")], "ex_b", PROBE_TTL)
    assert (go.state, go.wait, go.probe) == ("closed", 0.0, False)
    # failures were reset: it takes three again to open
    await fail(store, 2)
    assert (await store.breaker_peek(KEY)).state == "closed"
    assert [a for a in await actions(store) if a.startswith("breaker.")] == [
        "breaker.open",
        "breaker.half_open",
        "breaker.close",
    ]


async def test_failed_probe_reopens_with_a_fresh_cooldown(store: Store, clock: FakeClock) -> None:
    await fail(store, 3)
    clock.advance(15)
    (probe,) = await store.breaker_enter([(KEY, "in_p")], "ex_a", PROBE_TTL)
    assert probe.probe
    clock.advance(2)
    await store.breaker_record([BreakerResult(KEY, "in_p", False, "HTTP 500")], BREAKER, "ex_a")
    reopened = await store.breaker_peek(KEY)
    assert (reopened.state, reopened.wait) == ("open", near(10.0))
    clock.advance(9)
    (still,) = await store.breaker_enter([(KEY, "in_q")], "ex_a", PROBE_TTL)
    assert (still.state, still.probe, still.wait) == ("open", False, near(1.0))
    clock.advance(1)
    (again,) = await store.breaker_enter([(KEY, "in_q")], "ex_a", PROBE_TTL)
    assert again.probe
    events = [e for e in reversed(await store.audit()) if e.action.startswith("breaker.")]
    assert [e.action for e in events] == [
        "breaker.open",
        "breaker.half_open",
        "breaker.open",
        "breaker.half_open",
    ]
    assert events[2].reason == "probe in_p failed: HTTP 500"


async def test_a_probe_that_never_reports_is_replaced(store: Store, clock: FakeClock) -> None:
    await fail(store, 3)
    clock.advance(10)
    (lost,) = await store.breaker_enter([(KEY, "in_lost")], "ex_dead", PROBE_TTL)
    assert lost.probe
    clock.advance(PROBE_TTL - 1)
    (waiting,) = await store.breaker_enter([(KEY, "in_b")], "ex_b", PROBE_TTL)
    assert not waiting.probe
    clock.advance(1)
    (taken_over,) = await store.breaker_enter([(KEY, "in_b")], "ex_b", PROBE_TTL)
    assert taken_over.probe
    # the lost probe reporting late changes nothing; the new one decides
    await store.breaker_record([BreakerResult(KEY, "in_lost", True)], BREAKER, "ex_dead")
    assert (await store.breaker_peek(KEY)).state == "half_open"
    await store.breaker_record([BreakerResult(KEY, "in_b", True)], BREAKER, "ex_b")
    assert (await store.breaker_peek(KEY)).state == "closed"


async def test_healthy_results_write_nothing(store: Store) -> None:
    before = await store.change_counter()
    results = [BreakerResult(KEY, f"in_{i}", True) for i in range(20)]
    states = await store.breaker_record(results, BREAKER, "ex_a")
    assert states == {KEY: states[KEY]}
    assert states[KEY].state == "closed"
    statuses = await store.breaker_enter([(KEY, f"in_{i}") for i in range(20)], "ex_a", 30)
    assert all(s.state == "closed" and not s.probe for s in statuses)
    await store.take([[bucket(None)]] * 20)
    assert await store.change_counter() == before
    assert await actions(store) == []


# -- two connections to the same file -----------------------------------------------------------


async def test_exactly_one_probe_across_two_connections(
    store: Store, second: Store, clock: FakeClock
) -> None:
    probes_per_round = []
    for round_ in range(25):
        await fail(store, 3, ticket=f"in_r{round_}")  # (re)open: closed -> open, or probe fails
        clock.advance(BREAKER.cooldown)
        entries_a = [(KEY, f"in_a{round_}_{i}") for i in range(3)]
        entries_b = [(KEY, f"in_b{round_}_{i}") for i in range(3)]
        answers = await asyncio.gather(
            store.breaker_enter(entries_a, "ex_a", PROBE_TTL),
            second.breaker_enter(entries_b, "ex_b", PROBE_TTL),
        )
        granted = [
            ticket
            for entries, statuses in zip((entries_a, entries_b), answers, strict=True)
            for (_, ticket), status in zip(entries, statuses, strict=True)
            if status.probe
        ]
        probes_per_round.append(len(granted))
        (probe,) = granted
        # the probe fails: open again for the next round
        await second.breaker_record(
            [BreakerResult(KEY, probe, False, "still down")], BREAKER, "ex_b"
        )
        assert (await store.breaker_peek(KEY)).state == "open"
    assert probes_per_round == [1] * 25


async def test_tokens_are_shared_across_two_connections(
    store: Store, second: Store, clock: FakeClock
) -> None:
    limit = Limit(rate=2.0, burst=5)

    async def grab(s: Store) -> int:
        taken = 0
        for _ in range(10):
            (throttle,) = await s.take([[bucket(limit)]])
            taken += throttle.wait == 0.0
        return taken

    first, other = await asyncio.gather(grab(store), grab(second))
    assert first + other == 5
    clock.advance(1.0)
    first, other = await asyncio.gather(grab(store), grab(second))
    assert first + other == 2
