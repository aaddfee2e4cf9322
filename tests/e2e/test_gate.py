"""The kill switch, from the outside: ``farmhand gate off`` stops new calls within a second.

A running executor works through slow webhook intents; an operator closes the gate. No
call may reach the sink later than one second after ``farmhand gate off`` returned; what
did not run stays ``pending`` (not failed); the audit log names who closed it and why; and
``farmhand gate on`` lets the rest run. Kind and account gates stop only their scope.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import pytest
from e2e_support import (
    ArrivalSink,
    Executors,
    Farmhand,
    poll,
    state_counts,
)

#: the spec: no call may arrive later than this after ``gate off`` returned
GATE_DEADLINE = 1.0
#: how long to watch a closed gate for calls that should not come; the executor re-reads
#: gates and readiness at least once a second, so this covers several of its cycles
QUIET_WATCH = 2.5


def webhook(key: str, url: str, account: str = "default") -> dict[str, object]:
    return {"kind": "webhook.post", "key": key, "account": account, "payload": {"url": url}}


def all_in(db_counts: Callable[[], dict[str, int]], state: str, total: int) -> bool:
    return db_counts().get(state, 0) == total


def find_audit(farmhand: Farmhand, action: str) -> list[dict[str, object]]:
    events = farmhand.json("audit", "--limit", "100000")
    return [e for e in events if e["action"] == action]


def assert_one_effect_per_key(sink: ArrivalSink, keys: set[str]) -> None:
    effects = Counter(c.key for c in sink.calls() if c.effect)
    assert set(effects) == keys
    assert set(effects.values()) == {1}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_gate_off_stops_calls_within_a_second_and_gate_on_resumes(
    farmhand: Farmhand,
    executors: Executors,
    sink: ArrivalSink,
    e2e_report: Callable[..., None],
) -> None:
    total = 240
    keys = {f"g-{i:03d}" for i in range(total)}
    farmhand.submit_batch(webhook(k, f"{sink.url}/slow?ms=200") for k in sorted(keys))
    executor = executors.start("ex-gate", "--concurrency", "8")
    assert sink.wait_for_calls(16, timeout=60), executor.tail()

    closed = farmhand.run("gate", "off", "--reason", "test", "--as", "tester")
    returned_at = time.time()
    assert closed.returncode == 0, closed.stderr

    # in-flight calls finish and nothing stays leased; then watch for calls that must not come
    poll(
        "in-flight calls to finish",
        lambda: (
            state_counts(farmhand.db).get("running", 0) == 0 and sink.arrived() == len(sink.calls())
        ),
        timeout=30,
    )
    watch_until = time.monotonic() + QUIET_WATCH
    while time.monotonic() < watch_until:
        time.sleep(0.05)
    calls = sink.calls()
    assert sink.arrived() == len(calls)
    latest = max(c.at for c in calls)
    late = [c for c in calls if c.at > returned_at + GATE_DEADLINE]
    assert not late, (
        f"{len(late)} calls arrived more than {GATE_DEADLINE}s after gate off returned, the "
        f"latest {latest - returned_at:.3f}s after"
    )
    assert executor.alive(), executor.tail()

    # what did not run waits, untouched: pending, no attempt, no failure record
    counts = state_counts(farmhand.db)
    assert set(counts) <= {"succeeded", "pending"}, counts
    assert counts.get("pending", 0) > 0, "the gate closed too late to hold anything back"
    assert counts["succeeded"] == len({c.key for c in calls})
    for intent in farmhand.intents("--state", "pending"):
        assert intent["attempts"] == 0, intent
        assert intent["receipts"] == [], intent

    gates = farmhand.json("gate", "status")
    assert gates["open"] is False
    (rule,) = gates["closed"]
    assert (rule["kind"], rule["account"], rule["actor"], rule["reason"]) == (
        None,
        None,
        "tester",
        "test",
    )
    (event,) = find_audit(farmhand, "gate.close")
    assert (event["actor"], event["reason"]) == ("tester", "test")
    assert event["detail"] == {"kind": None, "account": None}

    held_back = counts["pending"]
    farmhand.ok("gate", "on", "--reason", "test over", "--as", "tester")
    poll(
        "every intent to succeed after gate on",
        lambda: all_in(lambda: state_counts(farmhand.db), "succeeded", total),
        timeout=60,
        interval=0.2,
    )
    (reopened,) = find_audit(farmhand, "gate.open")
    assert (reopened["actor"], reopened["reason"]) == ("tester", "test over")
    assert farmhand.json("gate", "status")["open"] is True
    assert_one_effect_per_key(sink, keys)
    assert sink.repeated_calls() == 0
    assert executor.terminate() == 0, executor.tail()
    e2e_report(
        held_back_by_gate=held_back,
        latest_call_after_gate_off_s=round(latest - returned_at, 3),
    )


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_closed_account_gate_stops_that_account_only(
    farmhand: Farmhand, executors: Executors, sink: ArrivalSink
) -> None:
    per_account = 40
    accounts = {"acct-a": set[str](), "acct-b": set[str]()}
    items = []
    for i in range(per_account):  # interleaved: an open gate would run both accounts together
        for account, keys in accounts.items():
            keys.add(f"{account}-{i:02d}")
            items.append(webhook(f"{account}-{i:02d}", f"{sink.url}/slow?ms=50", account))
    farmhand.submit_batch(items)
    farmhand.ok("gate", "off", "--account", "acct-a", "--reason", "acct-a maintenance")

    executor = executors.start("ex-acct", "--concurrency", "8")
    poll(
        "acct-b to finish",
        lambda: all_in(lambda: state_counts(farmhand.db, account="acct-b"), "succeeded", 40),
        timeout=60,
        interval=0.1,
    )
    assert state_counts(farmhand.db, account="acct-a") == {"pending": per_account}
    called = {c.key for c in sink.calls()}
    assert called == accounts["acct-b"], "a call for the gated account reached the sink"
    (rule,) = farmhand.json("gate", "status")["closed"]
    assert (rule["kind"], rule["account"], rule["reason"]) == (None, "acct-a", "acct-a maintenance")

    farmhand.ok("gate", "on", "--account", "acct-a")
    poll(
        "acct-a to finish once its gate is on",
        lambda: all_in(lambda: state_counts(farmhand.db), "succeeded", 2 * per_account),
        timeout=60,
        interval=0.1,
    )
    assert_one_effect_per_key(sink, accounts["acct-a"] | accounts["acct-b"])
    assert executor.terminate() == 0, executor.tail()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_closed_kind_gate_stops_that_kind_only(
    farmhand: Farmhand, executors: Executors, sink: ArrivalSink
) -> None:
    per_kind = 30
    items: list[dict[str, object]] = []
    hooks = set()
    for i in range(per_kind):
        hooks.add(f"hook-{i:02d}")
        items.append(webhook(f"hook-{i:02d}", f"{sink.url}/slow?ms=50"))
        items.append({"kind": "noop", "key": f"noop-{i:02d}", "payload": {"delay_ms": 50}})
    farmhand.submit_batch(items)
    farmhand.ok("gate", "off", "--kind", "webhook.post", "--reason", "provider incident")

    executor = executors.start("ex-kind", "--concurrency", "8")
    poll(
        "noop intents to finish",
        lambda: all_in(lambda: state_counts(farmhand.db, kind="noop"), "succeeded", per_kind),
        timeout=60,
        interval=0.1,
    )
    assert state_counts(farmhand.db, kind="webhook.post") == {"pending": per_kind}
    assert sink.arrived() == 0, "a webhook call went out while its kind was gated"

    farmhand.ok("gate", "on", "--kind", "webhook.post")
    poll(
        "webhook intents to finish once their gate is on",
        lambda: all_in(lambda: state_counts(farmhand.db), "succeeded", 2 * per_kind),
        timeout=60,
        interval=0.1,
    )
    assert_one_effect_per_key(sink, hooks)
    assert executor.terminate() == 0, executor.tail()
