"""Store conformance: a guarded attempt start checks the kill switch, bucket pauses and the
circuit breaker, and takes its rate-limit tokens, in the same atomic step that records the
start."""

from __future__ import annotations

from farmhand.clock import FakeClock
from farmhand.config import BreakerConfig, Limit
from farmhand.contracts import Attempt
from farmhand.store import Store
from farmhand.store.base import Admitted, BreakerResult, Bucket, Guard, Held
from store_support import S, claim_one, gate, make_intent, put, state_of, status

KEY = "noop:default"
BUCKET = "account:default"
BREAKER = BreakerConfig(failures=2, cooldown=10.0)


def guard(**kw: object) -> Guard:
    fields: dict[str, object] = {
        "kind": "noop",
        "account": "default",
        "buckets": (BUCKET,),
        "breaker": KEY,
    }
    return Guard(**(fields | kw))  # type: ignore[arg-type]


async def test_guarded_start_with_nothing_in_the_way_starts(store: Store, clock: FakeClock) -> None:
    await put(store, make_intent(clock, "k"))
    claim = await claim_one(store)
    (started,) = await store.start_attempts([claim.lease], [guard()])
    assert isinstance(started, Attempt)
    assert (started.attempt, started.fencing_token) == (1, claim.lease.token)
    assert await state_of(store, "k") is S.RUNNING


async def test_closed_gate_holds_the_start(store: Store, clock: FakeClock) -> None:
    await put(store, make_intent(clock, "a"), make_intent(clock, "b"))
    claims = await store.claim("ex_a", 10, 30.0, [])
    # closed after the claim: only the start can still see it
    await store.set_gate(gate(clock, account="default"))
    started = await store.start_attempts([c.lease for c in claims], [guard(), guard()])
    assert started == [Held("gate"), Held("gate")]
    status = await store.get_intent("a")
    assert status is not None
    assert status.attempts == 0


async def test_gate_of_another_scope_does_not_hold(store: Store, clock: FakeClock) -> None:
    await put(store, make_intent(clock, "k"))
    claim = await claim_one(store)
    await store.set_gate(gate(clock, kind="email.send"))
    await store.set_gate(gate(clock, account="other"))
    (started,) = await store.start_attempts([claim.lease], [guard()])
    assert isinstance(started, Attempt)


async def test_kind_gate_holds_only_its_kind(store: Store, clock: FakeClock) -> None:
    await put(store, make_intent(clock, "k"))
    claim = await claim_one(store)
    await store.set_gate(gate(clock, kind="noop"))
    assert await store.start_attempts([claim.lease], [guard()]) == [Held("gate")]


async def test_paused_bucket_holds_the_start(store: Store, clock: FakeClock) -> None:
    await put(store, make_intent(clock, "k"))
    claim = await claim_one(store)
    await store.pause(BUCKET, clock.now() + 5, "HTTP 429", "ex_b")
    assert await store.start_attempts([claim.lease], [guard()]) == [Held("paused")]
    # a pause on a bucket the guard does not name holds nothing
    (started,) = await store.start_attempts([claim.lease], [guard(buckets=("account:x",))])
    assert isinstance(started, Attempt)


async def test_ended_pause_does_not_hold(store: Store, clock: FakeClock) -> None:
    await put(store, make_intent(clock, "k"))
    claim = await claim_one(store)
    await store.pause(BUCKET, clock.now() + 5, "HTTP 429", "ex_b")
    clock.advance(5)
    (started,) = await store.start_attempts([claim.lease], [guard()])
    assert isinstance(started, Attempt)


async def test_open_breaker_holds_the_start_unless_already_entered(
    store: Store, clock: FakeClock
) -> None:
    await put(store, make_intent(clock, "k"))
    claim = await claim_one(store, ttl=60)
    failures = [BreakerResult(KEY, f"t{i}", False, "HTTP 503") for i in range(2)]
    (status,) = (await store.breaker_record(failures, BREAKER, "ex_b")).values()
    assert status.state == "open"
    assert await store.start_attempts([claim.lease], [guard()]) == [Held("breaker")]
    # cooled down but still open until a probe enters it: the guard still holds
    clock.advance(10)
    assert await store.start_attempts([claim.lease], [guard()]) == [Held("breaker")]
    # the caller that entered the breaker (and got the probe) starts with breaker=None
    (entered,) = await store.breaker_enter([(KEY, claim.intent.id)], "ex_a", 30.0)
    assert entered.probe
    (started,) = await store.start_attempts([claim.lease], [guard(breaker=None)])
    assert isinstance(started, Attempt)


async def test_closed_breaker_with_failures_does_not_hold(store: Store, clock: FakeClock) -> None:
    await put(store, make_intent(clock, "k"))
    claim = await claim_one(store)
    await store.breaker_record([BreakerResult(KEY, "t", False, "HTTP 503")], BREAKER, "ex_b")
    (started,) = await store.start_attempts([claim.lease], [guard()])
    assert isinstance(started, Attempt)


async def test_guards_are_judged_per_lease_and_lost_leases_stay_none(
    store: Store, clock: FakeClock
) -> None:
    await put(store, make_intent(clock, "a"), make_intent(clock, "b"), make_intent(clock, "c"))
    a, b, c = await store.claim("ex_a", 10, 30.0, [])
    await store.set_gate(gate(clock, kind="blocked.kind"))
    lost = c.lease.model_copy(update={"token": c.lease.token + 1})
    started = await store.start_attempts(
        [a.lease, b.lease, lost], [guard(), guard(kind="blocked.kind"), guard()]
    )
    assert isinstance(started[0], Attempt)
    assert started[1:] == [Held("gate"), None]
    assert [await state_of(store, k) for k in "abc"] == [S.RUNNING] * 3


async def test_guard_checks_gate_before_pause_and_breaker(store: Store, clock: FakeClock) -> None:
    await put(store, make_intent(clock, "k"))
    claim = await claim_one(store)
    await store.pause(BUCKET, clock.now() + 5, "HTTP 429", "ex_b")
    await store.set_gate(gate(clock))
    assert await store.start_attempts([claim.lease], [guard()]) == [Held("gate")]


# -- guards that take tokens ------------------------------------------------------------

TWO = Bucket(BUCKET, Limit(rate=1.0, burst=2))


def taking(*buckets: Bucket, **kw: object) -> Guard:
    """A guard that takes a token from each of ``buckets`` (and checks no pause of its own)."""
    return guard(buckets=(), take=buckets or (TWO,), **kw)


async def test_a_taking_guard_takes_its_tokens_with_the_start_in_lease_order(
    store: Store, clock: FakeClock
) -> None:
    await put(store, *(make_intent(clock, k) for k in "abc"))
    a, b, c = await store.claim("ex_a", 10, 30.0, [])
    started = await store.start_attempts([a.lease, b.lease, c.lease], [taking()] * 3)
    first, second, third = started
    assert isinstance(first, Admitted)
    assert isinstance(second, Admitted)
    assert (first.attempt.attempt, first.attempt.fencing_token) == (1, a.lease.token)
    assert first.attempt.started_at.timestamp() == clock.now()
    assert (first.throttle.bucket, first.throttle.tokens, first.throttle.next_in) == (BUCKET, 1, 0)
    assert (second.throttle.tokens, second.throttle.next_in) == (0, 1.0)
    # the burst is spent: the third is held by the limiter, and has no attempt
    assert isinstance(third, Held)
    assert third.by == "limited"
    assert third.throttle is not None
    assert (third.throttle.bucket, third.throttle.wait) == (BUCKET, 1.0)
    assert [(await status(store, k)).attempts for k in "abc"] == [1, 1, 0]
    assert (await store.peek([TWO])).wait == 1.0
    # a token later, the held one starts
    clock.advance(1.0)
    (late,) = await store.start_attempts([c.lease], [taking()])
    assert isinstance(late, Admitted)
    assert late.attempt.started_at.timestamp() == clock.now()


async def test_a_held_or_lost_start_takes_no_token(store: Store, clock: FakeClock) -> None:
    one = Bucket(BUCKET, Limit(rate=1.0, burst=1))
    await put(store, *(make_intent(clock, k) for k in "abcd"))
    a, b, c, d = await store.claim("ex_a", 10, 30.0, [])
    await store.set_gate(gate(clock, kind="blocked.kind"))
    failures = [BreakerResult("other:default", f"t{i}", False, "HTTP 503") for i in range(2)]
    await store.breaker_record(failures, BREAKER, "ex_b")
    lost = c.lease.model_copy(update={"token": c.lease.token + 1})
    started = await store.start_attempts(
        [a.lease, b.lease, lost, d.lease],
        [
            taking(one, kind="blocked.kind"),
            taking(one, breaker="other:default"),
            taking(one),
            taking(one),
        ],
    )
    assert started[:3] == [Held("gate"), Held("breaker"), None]
    # the one token was still there for the last lease
    assert isinstance(started[3], Admitted)
    assert (started[3].throttle.tokens, started[3].throttle.next_in) == (0, 1.0)


async def test_a_paused_bucket_holds_a_taking_guard_as_limited(
    store: Store, clock: FakeClock
) -> None:
    await put(store, make_intent(clock, "k"))
    claim = await claim_one(store)
    await store.pause(BUCKET, clock.now() + 5, "HTTP 429", "ex_b")
    (held,) = await store.start_attempts([claim.lease], [taking()])
    assert isinstance(held, Held)
    assert held.by == "limited"
    assert held.throttle is not None
    assert (held.throttle.wait, held.throttle.paused) == (5.0, "HTTP 429")
    clock.advance(5)
    assert (await store.peek([TWO])).tokens == 2


async def test_a_taking_guard_takes_from_every_bucket_or_from_none(
    store: Store, clock: FakeClock
) -> None:
    kind = Bucket(f"{BUCKET}:kind:noop", Limit(rate=1.0, burst=1))
    await put(store, make_intent(clock, "a"), make_intent(clock, "b"))
    a, b = await store.claim("ex_a", 10, 30.0, [])
    first, second = await store.start_attempts([a.lease, b.lease], [taking(TWO, kind)] * 2)
    assert isinstance(first, Admitted)
    assert (first.throttle.bucket, first.throttle.next_in) == (kind.name, 1.0)
    # the kind's bucket is empty: the account's keeps the token the second did not take
    assert isinstance(second, Held)
    assert second.by == "limited"
    assert second.throttle is not None
    assert second.throttle.bucket == kind.name
    assert (await store.peek([TWO])).tokens == 1


async def test_unguarded_and_taking_starts_mix_in_one_call(store: Store, clock: FakeClock) -> None:
    await put(store, make_intent(clock, "a"), make_intent(clock, "b"))
    a, b = await store.claim("ex_a", 10, 30.0, [])
    plain, limited = await store.start_attempts([a.lease, b.lease], [guard(), taking()])
    assert isinstance(plain, Attempt)
    assert isinstance(limited, Admitted)
    assert (plain.attempt, limited.attempt.attempt) == (1, 1)
    assert (await store.peek([TWO])).tokens == 1
