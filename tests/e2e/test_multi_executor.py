"""Four executor processes on one server store, SIGKILLed at random: nothing lost, nothing
done twice, and one rate limit held across all of them.

Per server backend (PostgreSQL, Redis): 5,000 webhook intents to the loopback sink, split
between an account whose target honours Idempotency-Key, one that does not (an interrupted
call there is ``unknown``, never resent blindly) and a rate-limited account (20 calls/s,
bursts of 5). Four ``farmhand executor run`` processes share the store; one of them is
SIGKILLed every 0.4-1.5 s and restarted until every intent has settled. Then:

* nothing lost: all 5,000 keys are in the store once, every intent settled;
* nothing done twice: one effect at the sink per succeeded intent, none for an intent that
  neither succeeded nor waits for a human; at most one receipt per attempt;
* the central rate limit held: in every window ``[t_i, t_j]`` of the limited account's
  attempt start times (stamped by the store when each attempt started, at the instant its
  token was taken), at most ``burst + rate * (t_j - t_i)`` starts, up to :data:`EPSILON`;
  and the calls' arrival times at the sink within a looser :data:`ARRIVAL_EPSILON`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
from e2e_support import (
    SETTLED,
    ArrivalSink,
    ExecutorProcess,
    Executors,
    Farmhand,
    window_excess,
    write_config,
)

from backends import fresh_postgres_url, fresh_redis_url
from farmhand.contracts import IntentState
from farmhand.store import open_store

SEED = 20261130
TOTAL = 5000
LIMITED = 200
RATE, BURST = 20.0, 5
#: the store takes an attempt's tokens in the same atomic step that stamps it as started,
#: at the same instant of its clock, so the start times obey the limiter exactly: what is
#: left is rounding (GCRA's 1e-6 s tolerance, timestamps kept to the microsecond). A limiter
#: that let one call too many through would exceed this by a whole token, and four
#: executors each with a bucket of their own by up to 3x the rate
EPSILON = 0.001
#: a call reaches the sink after the attempt record, an HTTP request and the sink's thread
#: start; on a 2-core host running four executors, SIGKILLs and the server, that adds up to
#: a few hundred ms: 0.5 s (ten calls) still fails a per-process limiter by far
ARRIVAL_EPSILON = 0.5
SAFE, PLAIN, METERED = "honouring", "plain", "metered"
CONFIG = f"""\
[accounts.{SAFE}]
honours_idempotency_key = true

[accounts.{METERED}]
honours_idempotency_key = true
rate = {RATE}
burst = {BURST}

[executor.retry]
base_delay = 0.2
max_delay = 2.0
"""
EXECUTORS = ("ex-1", "ex-2", "ex-3", "ex-4")
EXECUTOR_ARGS = ("--concurrency", "32", "--lease-ttl", "2", "--json")
KILL_EVERY = (0.4, 1.5)
SETTLE_WITHIN = 240.0


@pytest.fixture(params=["postgres", "redis"])
def store_url(request: pytest.FixtureRequest) -> str:
    if request.param == "postgres":
        return fresh_postgres_url(request.getfixturevalue("postgres_server"))
    return fresh_redis_url(request.getfixturevalue("redis_server"))


def workload(sink_url: str, rng: random.Random) -> list[dict[str, Any]]:
    items = []
    for i in range(TOTAL):
        if i < LIMITED:
            account, url = METERED, f"{sink_url}/ok"
        else:
            account = SAFE if i % 2 else PLAIN
            url = f"{sink_url}/slow?ms={rng.choice((5, 20, 40))}"
        items.append(
            {
                "kind": "webhook.post",
                "key": f"multi-{i:04d}",
                "account": account,
                "payload": {"url": url, "json": {"n": i}},
            }
        )
    rng.shuffle(items)
    return items


def counts(url: str) -> dict[IntentState, int]:
    async def read() -> dict[IntentState, int]:
        store = await open_store(url)
        try:
            return await store.counts()
        finally:
            await store.close()

    return asyncio.run(read())


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_four_sigkilled_executors_lose_nothing_duplicate_nothing_share_one_limit(
    store_url: str,
    farmhand: Farmhand,
    executors: Executors,
    sink: ArrivalSink,
    e2e_report: Callable[..., None],
) -> None:
    rng = random.Random(SEED)
    write_config(farmhand.home, f'store = "{store_url}"\n{CONFIG}')
    submitted = workload(sink.url, rng)
    accepted = farmhand.submit_batch(submitted)
    assert len(accepted) == TOTAL
    assert all(r["created"] for r in accepted)
    account_of = {item["key"]: item["account"] for item in submitted}

    procs: dict[str, ExecutorProcess] = {n: executors.start(n, *EXECUTOR_ARGS) for n in EXECUTORS}
    kills = 0
    started = time.monotonic()
    next_kill = started + rng.uniform(*KILL_EVERY)
    while True:
        by_state = counts(store_url)
        if sum(n for s, n in by_state.items() if s.value in SETTLED) == TOTAL:
            break
        now = time.monotonic()
        assert now - started < SETTLE_WITHIN, (
            f"not settled after {SETTLE_WITHIN:.0f}s ({kills} kills): {by_state}\n"
            + "\n".join(f"--- {p.name}\n{p.tail()}" for p in procs.values())
        )
        if now >= next_kill:
            victim = rng.choice(EXECUTORS)
            proc = procs[victim]
            assert proc.alive(), f"{proc.name} died on its own:\n{proc.tail()}"
            assert proc.kill() == -9
            kills += 1
            procs[victim] = executors.start(victim, *EXECUTOR_ARGS)
            next_kill = time.monotonic() + rng.uniform(*KILL_EVERY)
        time.sleep(0.2)
    elapsed = time.monotonic() - started
    for proc in procs.values():
        assert proc.alive(), f"{proc.name} died on its own:\n{proc.tail()}"
        assert proc.terminate() == 0, proc.tail()

    # nothing lost, read back through the CLI
    intents = farmhand.intents()
    by_key = {i["key"]: i for i in intents}
    assert len(intents) == TOTAL
    assert set(by_key) == set(account_of)
    states = Counter(i["state"] for i in intents)
    assert set(states) <= SETTLED, states
    for intent in intents:
        if intent["state"] == "unknown":
            assert intent["account"] == PLAIN, intent  # honouring targets are simply resent
            assert intent["reason"], intent

    # nothing done twice
    calls = sink.calls()
    assert {c.key for c in calls} <= set(by_key)
    effects = Counter(c.key for c in calls if c.effect)
    for key, n in effects.items():
        assert n == 1, key
        assert by_key[key]["state"] in ("succeeded", "unknown"), by_key[key]
    for intent in intents:
        if intent["state"] == "succeeded":
            assert effects[intent["key"]] == 1, intent
        attempts = [r["attempt"] for r in intent["receipts"]]
        assert len(attempts) == len(set(attempts)), f"two receipts for one attempt: {intent}"
        won = [r for r in intent["receipts"] if r["outcome"] == "succeeded"]
        assert len(won) == (intent["state"] == "succeeded"), intent

    # one rate limit across four processes: every attempt of the metered account, killed
    # ones included (their reconcile receipts carry the attempt's start), and every call
    starts = sorted(
        datetime.fromisoformat(r["started_at"]).timestamp()
        for i in intents
        if i["account"] == METERED
        for r in i["receipts"]
        if r["started_at"]
    )
    assert len(starts) >= LIMITED
    excess, window_calls, window_span = window_excess(starts, RATE, BURST)
    assert excess <= RATE * EPSILON, (
        f"{window_calls} metered attempts started within {window_span:.3f}s; at most "
        f"{BURST + RATE * window_span:.2f} (+{RATE * EPSILON:.2f}) are allowed"
    )
    metered = sorted(c.at for c in calls if c.key and account_of[c.key] == METERED)
    assert len(metered) >= LIMITED
    arrival_excess, window_calls, window_span = window_excess(metered, RATE, BURST)
    assert arrival_excess <= RATE * ARRIVAL_EPSILON, (
        f"{window_calls} metered calls arrived within {window_span:.3f}s; at most "
        f"{BURST + RATE * window_span:.2f} (+{RATE * ARRIVAL_EPSILON:.1f}) are allowed"
    )
    assert states["succeeded"] >= TOTAL - states["unknown"] - states["dead"]
    for intent in intents:
        if account_of[intent["key"]] != PLAIN:
            assert intent["state"] == "succeeded", intent

    e2e_report(
        kills=kills,
        succeeded=states["succeeded"],
        unknown=states["unknown"],
        dead=states["dead"],
        effects=sum(effects.values()),
        sink_calls=len(calls),
        metered_attempts=len(starts),
        metered_calls=len(metered),
        metered_span_s=round(starts[-1] - starts[0], 2),
        worst_start_excess=round(excess, 3),
        worst_arrival_excess=round(arrival_excess, 3),
        settle_s=round(elapsed, 1),
    )
    assert kills >= 5, f"only {kills} kills: the run was too short to test recovery"
