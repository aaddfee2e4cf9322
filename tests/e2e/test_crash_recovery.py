"""Crash recovery: executors SIGKILLed at random moments lose nothing and duplicate nothing.

2,000 webhook intents, split between an account whose target honours Idempotency-Key and
one left at the default (not honouring), are worked by two executor processes. One of them
is SIGKILLed at seeded-random moments and restarted, until every intent is settled. Then:

* no intent is lost: all 2,000 keys are in the store, each once;
* every intent is terminal or ``unknown``, and every ``unknown`` one says why;
* the honouring account never ends in ``unknown`` (an interrupted call is simply resent);
* every succeeded intent has exactly one effect at the sink, which its receipt points to;
* every effect at the sink belongs to an intent that succeeded or is ``unknown``;
* no attempt has two receipts (a stale holder never writes over a takeover).
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from e2e_support import (
    SETTLED,
    ArrivalSink,
    ExecutorProcess,
    Executors,
    Farmhand,
    state_counts,
    write_config,
)

SEED = 20260522
TOTAL = 2000
SAFE, UNSAFE = "honouring", "plain"
#: the honouring account is declared; the other is left to the defaults (not honouring)
CONFIG = f"""\
[accounts.{SAFE}]
honours_idempotency_key = true

[executor.retry]
base_delay = 0.2
max_delay = 2.0
"""
EXECUTOR_ARGS = ("--concurrency", "32", "--lease-ttl", "2", "--json")
KILL_EVERY = (0.3, 1.5)
#: overall bound on the kill-and-restart phase
SETTLE_WITHIN = 150.0


def intents_for(sink_url: str, rng: random.Random) -> list[dict[str, Any]]:
    items = []
    for i in range(TOTAL):
        ms = rng.choice((20, 40, 80))
        item = {
            "kind": "webhook.post",
            "key": f"crash-{i:04d}",
            "account": SAFE if i % 2 else UNSAFE,
            "payload": {"url": f"{sink_url}/slow?ms={ms}", "json": {"n": i}},
        }
        if item["account"] == SAFE:
            # an intent whose every attempt is interrupted goes to `unknown` once it is out
            # of attempts, by design; what this test checks is that an interrupted call to
            # an honouring target is resent, so these never run out (a restarted executor
            # takes the same expired leases first, and can be killed again on them)
            item["max_attempts"] = 100
        items.append(item)
    return items


def settled(counts: dict[str, int]) -> bool:
    return sum(n for state, n in counts.items() if state in SETTLED) == TOTAL


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkilled_executors_lose_and_duplicate_nothing(
    farmhand: Farmhand,
    executors: Executors,
    sink: ArrivalSink,
    e2e_report: Callable[..., None],
) -> None:
    rng = random.Random(SEED)
    write_config(farmhand.home, CONFIG)
    submitted = intents_for(sink.url, rng)
    accepted = farmhand.submit_batch(submitted)
    assert [r["line"] for r in accepted] == list(range(1, TOTAL + 1))
    assert all(r["created"] for r in accepted)
    account_of = {item["key"]: item["account"] for item in submitted}

    names = ("ex-1", "ex-2")
    procs: dict[str, ExecutorProcess] = {n: executors.start(n, *EXECUTOR_ARGS) for n in names}
    kills = 0
    started = time.monotonic()
    next_kill = started + rng.uniform(*KILL_EVERY)
    while not settled(counts := state_counts(farmhand.db)):
        now = time.monotonic()
        assert now - started < SETTLE_WITHIN, (
            f"not settled after {SETTLE_WITHIN:.0f}s ({kills} kills): {counts}\n"
            + "\n".join(f"--- {p.name}\n{p.tail()}" for p in procs.values())
        )
        if now >= next_kill:
            victim = rng.choice(names)
            proc = procs[victim]
            assert proc.alive(), f"{proc.name} died on its own:\n{proc.tail()}"
            assert proc.kill() == -9
            kills += 1
            procs[victim] = executors.start(victim, *EXECUTOR_ARGS)
            next_kill = time.monotonic() + rng.uniform(*KILL_EVERY)
        time.sleep(max(0.0, min(0.05, next_kill - time.monotonic())))
    elapsed = time.monotonic() - started
    for proc in procs.values():
        assert proc.alive(), f"{proc.name} died on its own:\n{proc.tail()}"
        assert proc.terminate() == 0, proc.tail()

    calls = sink.calls()
    repeated = sink.repeated_calls()

    # nothing lost: every key is stored exactly once, through the CLI
    intents = farmhand.json("list", "--limit", "5000")
    by_key = {i["key"]: i for i in intents}
    assert len(intents) == TOTAL
    assert set(by_key) == set(account_of)
    states = Counter(i["state"] for i in intents)

    # every intent settled; unknown ones say why; the honouring account is never unknown
    assert set(states) <= SETTLED, states
    unknown = [i for i in intents if i["state"] == "unknown"]
    for intent in unknown:
        assert intent["reason"], intent
        assert intent["account"] == UNSAFE, (intent["key"], intent["reason"], intent["attempts"])

    # the sink: every call carries one of our keys; one effect per succeeded intent, and no
    # effect for an intent that neither succeeded nor is waiting for a human
    assert {c.key for c in calls} <= set(by_key)
    effects = Counter(c.key for c in calls if c.effect)
    for intent in intents:
        if intent["state"] == "succeeded":
            assert effects[intent["key"]] == 1, intent
    for key, n in effects.items():
        assert n == 1, key
        assert by_key[key]["state"] in ("succeeded", "unknown"), by_key[key]

    # receipts: at most one per attempt (fencing held), exactly one success per succeeded
    # intent, and that success names the sink's effect for the intent's own key
    successes: dict[str, dict[str, Any]] = {}
    for intent in intents:
        receipts = intent["receipts"]
        attempts = [r["attempt"] for r in receipts]
        assert len(attempts) == len(set(attempts)), f"two receipts for one attempt: {intent}"
        won = [r for r in receipts if r["outcome"] == "succeeded"]
        assert len(won) == (intent["state"] == "succeeded"), intent
        if won:
            successes[intent["key"]] = won[0]
        if intent["state"] == "unknown":
            assert receipts, intent
            assert max(receipts, key=lambda r: r["attempt"])["outcome"] == "unknown", intent
    with httpx.Client(base_url=sink.url, timeout=10) as client:
        for key, receipt in successes.items():
            document = client.get(f"/effects/{receipt['external_id']}").json()
            assert document["key"] == key, (receipt, document)
            assert receipt["url"] == f"{sink.url}/effects/{receipt['external_id']}"

    audit = farmhand.json("audit", "--limit", "100000")
    actions = Counter(e["action"] for e in audit)
    takeovers = sum(1 for e in audit if e["action"] == "claim" and e["from_state"] == "running")
    fenced = sum(p.stderr().count("fencing:") for p in executors.started)
    retried_safe = sum(
        1
        for i in intents
        if i["account"] == SAFE and i["state"] == "succeeded" and i["attempts"] > 1
    )
    e2e_report(
        kills=kills,
        repeated_calls=repeated,
        unknown=len(unknown),
        succeeded=states["succeeded"],
        dead=states["dead"],
        effects=sum(effects.values()),
        sink_calls=len(calls),
        sink_statuses=dict(sorted(Counter(c.status for c in calls).items())),
        takeovers=takeovers,
        reconciled_retry=actions["reconcile.retry"],
        reconciled_unknown=actions["reconcile.unknown"],
        honouring_resent=retried_safe,
        fenced_writes=fenced,
        settle_s=round(elapsed, 1),
    )
    print(json.dumps({"unknown_reasons": Counter(i["reason"][:60] for i in unknown)}, indent=1))
    # the run must actually have interrupted calls, or it proved nothing
    assert kills >= 3, f"only {kills} kills: the run was too short to test recovery"
    assert actions["reconcile.retry"] > 0, actions
    assert actions["reconcile.unknown"] > 0, actions
