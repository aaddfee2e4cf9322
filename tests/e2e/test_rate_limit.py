"""A central rate limit, from the outside: three executor processes share one SQLite store
and one account limited to 5 calls/s with bursts of 5 (``[accounts.limited]`` in
``farmhand.toml``). They work through ~10 s of webhook intents to the loopback sink.

The sink stamps every call as it arrives. In every window ``[t_i, t_j]`` of those arrival
times the number of calls must stay within ``burst + rate * (t_j - t_i)``, up to
:data:`EPSILON`; every intent must succeed with its first attempt (waiting for a token
spends none and fails nothing); and the executors must not churn through the backlog
claiming and releasing it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import pytest
from e2e_support import (
    ArrivalSink,
    Executors,
    Farmhand,
    connect,
    poll,
    state_counts,
    window_excess,
    write_config,
)

RATE, BURST = 5.0, 5
#: ~10 s of calls at the limit once the burst is spent
TOTAL = BURST + int(RATE * 10)
#: The limiter decides when a token is taken, inside the store's write transaction; the
#: sink stamps the call when its request arrives, after the durable "attempt started" write
#: (behind the write lock the three processes share) and an HTTP round trip. That delay
#: varies by a few ms, occasionally tens of ms on a busy 2-core host (event-loop and process
#: scheduling, lock waits), so two calls whose tokens were exactly 1/rate apart can arrive a
#: little closer together. 50 ms is a quarter of a token at 5/s: anything a limiter that
#: really let a call too many through would exceed by far.
EPSILON = 0.05
#: the attempts' start times, stamped by the store at the instant their tokens were taken,
#: obey the limiter exactly, up to rounding (GCRA's 1e-6 s, microsecond timestamps)
START_EPSILON = 0.001
CONCURRENCY = 8
EXECUTORS = 3


def webhook(key: str, url: str, account: str) -> dict[str, object]:
    return {"kind": "webhook.post", "key": key, "account": account, "payload": {"url": url}}


def receipt_executors(farmhand: Farmhand, prefix: str) -> set[str]:
    """Executors that wrote a succeeded receipt for an intent whose key starts with prefix."""
    with connect(farmhand.db) as conn:
        rows = conn.execute(
            "SELECT DISTINCT json_extract(r.body, '$.executor') FROM receipts r"
            " JOIN intents i ON i.id = r.intent_id WHERE i.key LIKE ? AND r.outcome = 'succeeded'",
            (prefix + "%",),
        ).fetchall()
    return {row[0] for row in rows}


def audit_count(farmhand: Farmhand, action: str) -> int:
    with connect(farmhand.db) as conn:
        (n,) = conn.execute("SELECT count(*) FROM audit WHERE action = ?", (action,)).fetchone()
    return int(n)


def max_in_any_second(times: list[float]) -> int:
    """The most calls that arrived within any 1-second window."""
    most, j = 0, 0
    for i, start in enumerate(times):
        while j < len(times) and times[j] <= start + 1.0:
            j += 1
        most = max(most, j - i)
    return most


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_three_executors_share_one_rate_limit(
    farmhand: Farmhand,
    executors: Executors,
    sink: ArrivalSink,
    e2e_report: Callable[..., None],
) -> None:
    write_config(farmhand.home, f"[accounts.limited]\nrate = {RATE}\nburst = {BURST}\n")
    procs = [
        executors.start(f"ex-rl-{n}", "--concurrency", str(CONCURRENCY)) for n in range(EXECUTORS)
    ]
    for proc in procs:
        poll(f"{proc.name} to start serving", lambda p=proc: p.ready() or not p.alive(), 30)
        assert proc.alive(), proc.tail()

    # Warm-up on an unlimited account until every process has made a webhook call: a
    # process's first call imports the HTTP client and opens its connection (~100 ms), a
    # delay that has nothing to do with the limiter but would skew the arrival times.
    ids = {f"ex-rl-{n}" for n in range(EXECUTORS)}
    warm = 0
    for round_ in range(5):
        batch = [
            webhook(f"warm-{round_}-{i:03d}", f"{sink.url}/slow?ms=150", "default")
            for i in range(EXECUTORS * CONCURRENCY * 2)
        ]
        farmhand.submit_batch(batch)
        warm += len(batch)
        poll(
            "the warm-up to finish",
            lambda n=warm: state_counts(farmhand.db, account="default").get("succeeded", 0) == n,
            timeout=60,
            interval=0.1,
        )
        if receipt_executors(farmhand, "warm-") >= ids:
            break
    assert receipt_executors(farmhand, "warm-") >= ids, "an executor made no warm-up call"

    keys = [f"rl-{i:03d}" for i in range(TOTAL)]
    farmhand.submit_batch(webhook(k, f"{sink.url}/ok", "limited") for k in keys)
    poll(
        "every limited intent to succeed",
        lambda: state_counts(farmhand.db, account="limited").get("succeeded", 0) == TOTAL,
        timeout=90,
        interval=0.2,
    )
    for proc in procs:
        assert proc.alive(), proc.tail()

    calls = sorted(
        (c for c in sink.calls() if c.key and c.key.startswith("rl-")), key=lambda c: c.at
    )
    times = [c.at for c in calls]
    assert len(calls) == TOTAL
    assert sorted(c.key for c in calls) == keys  # one call per intent: nothing repeated
    assert {c.status for c in calls} == {201}

    # the bound, in every window
    excess, window_calls, window_span = window_excess(times, RATE, BURST)
    assert excess <= RATE * EPSILON, (
        f"{window_calls} calls arrived within {window_span:.3f}s; at most "
        f"{BURST + RATE * window_span:.2f} (+{RATE * EPSILON:.2f} for the epsilon) are allowed"
    )
    duration = times[-1] - times[0]
    # ...and the limit is not just respected but used: ~10 s for the backlog, not much more
    assert duration >= (TOTAL - BURST) / RATE - EPSILON
    assert duration <= (TOTAL - BURST) / RATE * 1.3, f"{duration:.1f}s: the limiter wastes tokens"

    # waiting for a token spends no attempt and fails nothing
    assert state_counts(farmhand.db, account="limited") == {"succeeded": TOTAL}
    limited = farmhand.intents("--account", "limited")
    for intent in limited:
        assert intent["attempts"] == 1, intent
        assert [r["outcome"] for r in intent["receipts"]] == ["succeeded"], intent

    # the attempts started when their tokens were taken: their start times obey the bound
    starts = sorted(
        datetime.fromisoformat(r["started_at"]).timestamp()
        for intent in limited
        for r in intent["receipts"]
    )
    start_excess, start_calls, start_span = window_excess(starts, RATE, BURST)
    assert start_excess <= RATE * START_EPSILON, (
        f"{start_calls} attempts started within {start_span:.6f}s; at most "
        f"{BURST + RATE * start_span:.3f} are allowed"
    )
    released = audit_count(farmhand, "rate_limited")
    claims = audit_count(farmhand, "claim") - warm
    # no churn: about one batch per executor while they learn the limit, then rarely more
    # than one release per token (a race between two executors for the same token)
    assert released <= EXECUTORS * CONCURRENCY + TOTAL, released
    assert audit_count(farmhand, "breaker.open") == 0

    for proc in procs:
        assert proc.terminate() == 0, proc.tail()
    e2e_report(
        calls=len(calls),
        duration_s=round(duration, 3),
        observed_rate=round((len(calls) - BURST) / duration, 3),
        max_calls_in_any_1s=max_in_any_second(times),
        bound_for_1s=BURST + RATE * 1.0,
        tightest_window=f"{window_calls} calls in {window_span:.3f}s",
        tightest_window_bound=round(BURST + RATE * window_span, 3),
        worst_excess_calls=round(excess, 3),
        worst_start_excess=round(start_excess, 6),
        rate_limited_releases=released,
        claims=claims,
    )
