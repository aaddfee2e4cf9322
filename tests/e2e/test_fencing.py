"""Fencing: an executor frozen past its lease TTL cannot write a receipt when it wakes up.

Executor A claims a webhook intent and its call reaches the sink; A is then frozen with
SIGSTOP while the call is in flight. Its lease expires, executor B takes the intent over
(a higher fencing token) and settles it: retried to success when the account's target
honours Idempotency-Key, parked in ``unknown`` otherwise. A is then continued: whatever
its call returned, the store must refuse A's receipt because A's token is no longer
current, and A must say so in its log.
"""

from __future__ import annotations

import json
import signal

import pytest
from e2e_support import ArrivalSink, Executors, Farmhand, freeze, poll, write_config

CONFIG = """\
[accounts.safe]
honours_idempotency_key = true

[accounts.unsafe]
honours_idempotency_key = false
"""

#: A's lease: its call may take up to half of it, so the frozen call is surely in flight
A_TTL = "2"
#: B's lease is long enough for B's own (slow) call to finish
B_TTL = "10"


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize(("account", "final_state"), [("safe", "succeeded"), ("unsafe", "unknown")])
def test_stale_executor_cannot_write_its_receipt(
    farmhand: Farmhand,
    executors: Executors,
    sink: ArrivalSink,
    account: str,
    final_state: str,
) -> None:
    write_config(farmhand.home, CONFIG)
    key = f"fence-{account}"
    payload = {"url": f"{sink.url}/slow?ms=1500", "json": {"to": "ops"}}
    intent_id = farmhand.ok(
        "submit", "webhook.post", "--key", key, "--account", account,
        "--payload", json.dumps(payload),
    ).strip()  # fmt: skip

    a = executors.start("ex-a", "--lease-ttl", A_TTL, "--json")
    assert sink.wait_for_arrivals(1, timeout=30), f"A's call never arrived\n{a.tail()}"
    freeze(a, farmhand.db)  # mid-call: the sink is still sleeping on A's request

    held = farmhand.json("status", key)
    assert held["state"] == "running"
    assert held["lease_owner"] == "ex-a"
    assert held["attempts"] == 1  # A's "attempt started" record is durable
    stale_token = held["lease_token"]

    b = executors.start("ex-b", "--lease-ttl", B_TTL, "--json")

    def settled_by_b() -> dict[str, object] | None:
        status = farmhand.json("status", key)
        return status if status["state"] == final_state else None

    settled = poll(f"B to settle {key} as {final_state}", settled_by_b, timeout=45, interval=0.2)
    assert a.stopped(), "A must still be frozen while B settles the intent"
    assert settled["lease_token"] > stale_token

    a.signal(signal.SIGCONT)
    poll(
        "A to log that its receipt was refused",
        lambda: "fencing:" in a.stderr(),
        timeout=30,
        interval=0.1,
    )
    assert a.terminate() == 0, a.tail()
    assert b.terminate() == 0, b.tail()

    # A's log names the refused write, the intent and A's stale token
    refusals = [line for line in a.stderr().splitlines() if "fencing:" in line]
    assert refusals, a.stderr()
    assert any(
        "refused" in line and intent_id in line and f"token {stale_token} " in line
        for line in refusals
    ), refusals
    a_stats = json.loads(a.stdout())
    assert a_stats["fenced"] >= 1
    assert a_stats["succeeded"] == a_stats["unknown"] == a_stats["retried"] == 0
    assert json.loads(b.stdout())[final_state] == 1

    # every receipt was written by B under a token newer than A's; none by A
    receipts = farmhand.json("receipts", "--intent", key)
    assert receipts, "B must have written a receipt"
    for receipt in receipts:
        assert receipt["executor"] == "ex-b", receipt
        assert receipt["fencing_token"] > stale_token, receipt
    assert not [r for r in receipts if r["fencing_token"] == stale_token]
    final = farmhand.json("status", key)
    assert final["state"] == final_state
    assert final["reason"] if final_state == "unknown" else final["reason"] is None
    assert {r["id"] for r in final["receipts"]} == {r["id"] for r in receipts}
    last = max(receipts, key=lambda r: r["attempt"])
    if final_state == "succeeded":
        # B reconciled A's interrupted attempt, retried, and the sink replayed A's effect
        assert last["outcome"] == "succeeded"
        assert last["fencing_token"] == final["lease_token"]
        assert [r["source"] for r in sorted(receipts, key=lambda r: r["attempt"])] == [
            "reconcile",
            "connector",
        ]
    else:
        assert [r["outcome"] for r in receipts] == ["unknown"]
        assert receipts[0]["source"] == "reconcile"
        assert receipts[0]["fencing_token"] == final["lease_token"]

    # exactly one effect, whoever's call produced it (the sink finishes A's call even though
    # A gave up on it: the effect is real, which is why B must not resend for `unsafe`)
    poll("the sink to answer every call", lambda: len(sink.calls()) == sink.arrived(), 10)
    assert sink.arrived() == (2 if final_state == "succeeded" else 1)
    effects = [c for c in sink.calls() if c.effect]
    assert [c.key for c in effects] == [key]
    audit = farmhand.json("audit", "--intent", key)
    writers = {e["actor"] for e in audit if e["action"] not in ("submit", "claim")}
    assert writers == {"ex-b"}, audit
