"""Store conformance: intents, leases, fencing, attempts, transitions, receipts, gates, audit.

Every test here runs against each backend (see conftest.py): one contract, four stores.
"""

from __future__ import annotations

import pytest

from farmhand.clock import FakeClock
from farmhand.contracts import Lease, Outcome
from farmhand.contracts.base import utc
from farmhand.contracts.state import allowed
from farmhand.errors import InvalidTransition, StoreError
from farmhand.store import Change, IntentQuery, NewIntent, Store, open_store
from store_support import (
    TTL,
    S,
    by_token,
    claim_one,
    gate,
    make_intent,
    put,
    receipt_for,
    state_of,
)

# -- put-if-absent ------------------------------------------------------------------------


async def test_put_if_absent_by_key(store: Store, clock: FakeClock) -> None:
    first = make_intent(clock, "k1")
    ((stored, created),) = await store.put_intents([NewIntent(first, S.PENDING, "agent:a")])
    assert created
    assert stored.id == first.id
    assert stored.state is S.PENDING
    assert stored.attempts == 0
    assert stored.lease_token == 0

    again = make_intent(clock, "k1", payload={"other": True})
    ((stored2, created2),) = await store.put_intents([NewIntent(again, S.PENDING, "agent:b")])
    assert not created2
    assert stored2.id == first.id
    assert stored2.payload == first.payload

    events = await store.audit(first.id)
    assert [(e.action, e.actor, e.to_state) for e in events] == [("submit", "agent:a", "pending")]
    assert await store.get_intent(again.id) is None


async def test_put_batch_with_duplicate_key(store: Store, clock: FakeClock) -> None:
    a, b, c = make_intent(clock, "dup"), make_intent(clock, "dup"), make_intent(clock, "solo")
    results = await store.put_intents([NewIntent(i, S.PENDING, "agent:t") for i in (a, b, c)])
    assert [(s.id, created) for s, created in results] == [
        (a.id, True),
        (a.id, False),
        (c.id, True),
    ]
    assert (await store.counts()) == {S.PENDING: 2}


async def test_get_by_id_or_key(store: Store, clock: FakeClock) -> None:
    intent = make_intent(clock, "order-7")
    await put(store, intent)
    by_id = await store.get_intent(intent.id)
    by_key = await store.get_intent("order-7")
    assert by_id is not None
    assert by_id == by_key
    assert by_id.created_at == intent.created_at
    assert await store.get_intent("nope") is None


async def test_list_intents_filters_newest_first(store: Store, clock: FakeClock) -> None:
    ids = await put(
        store,
        make_intent(clock, "a", kind="noop"),
        make_intent(clock, "b", kind="email.send", account="acme"),
        make_intent(clock, "c", kind="noop", account="acme"),
    )
    listed = await store.list_intents(IntentQuery())
    assert [s.id for s in listed] == ids[::-1]
    assert [s.key for s in await store.list_intents(IntentQuery(kind="noop"))] == ["c", "a"]
    assert [s.key for s in await store.list_intents(IntentQuery(account="acme"))] == ["c", "b"]
    assert [s.key for s in await store.list_intents(IntentQuery(limit=1))] == ["c"]
    assert await store.list_intents(IntentQuery(state=S.RUNNING)) == []


# -- claim ----------------------------------------------------------------------------------


async def test_claim_gives_increasing_fencing_tokens(store: Store, clock: FakeClock) -> None:
    (intent_id,) = await put(store, make_intent(clock, "k"))
    tokens = []
    for _ in range(4):
        claim = await claim_one(store)
        assert claim.intent.id == intent_id
        assert claim.lease.owner == "ex_a"
        assert claim.lease.expires_at == utc(clock.now() + TTL)
        tokens.append(claim.lease.token)
        assert await store.apply([by_token(claim, S.PENDING, action="release")]) == [True]
    assert tokens == sorted(set(tokens))
    assert tokens[0] >= 1


async def test_claimed_intent_not_claimed_again(store: Store, clock: FakeClock) -> None:
    await put(store, make_intent(clock, "k"))
    claim = await claim_one(store)
    assert claim.previous_state is S.PENDING
    assert claim.open_attempt is None
    assert await store.claim("ex_b", 10, TTL, []) == []
    status = await store.get_intent("k")
    assert status is not None
    assert status.state is S.RUNNING
    assert status.lease_owner == "ex_a"
    assert status.lease_token == claim.lease.token


async def test_claim_respects_limit(store: Store, clock: FakeClock) -> None:
    await put(store, *(make_intent(clock, f"k{i}") for i in range(5)))
    first = await store.claim("ex_a", 2, TTL, [])
    second = await store.claim("ex_b", 10, TTL, [])
    assert len(first) == 2
    assert len(second) == 3
    assert {c.intent.key for c in first}.isdisjoint({c.intent.key for c in second})


async def test_claim_skips_not_yet_ready(store: Store, clock: FakeClock) -> None:
    await put(store, make_intent(clock, "later", not_before=clock.now() + 60))
    assert await store.claim("ex_a", 10, TTL, []) == []
    readiness = await store.readiness()
    assert readiness.next_ready_at == clock.now() + 60
    clock.advance(59)
    assert await store.claim("ex_a", 10, TTL, []) == []
    clock.advance(1)
    claim = await claim_one(store)
    assert claim.intent.key == "later"


async def test_readiness_right_after_a_short_claim_counts_the_leases_it_took(
    store: Store, clock: FakeClock
) -> None:
    # the executor waits on this answer instead of claiming again, and stores may serve it
    # from the claim: it must be what a fresh read says
    await put(store, make_intent(clock, "lapsing"))
    assert len(await store.claim("ex_b", 10, 5, [])) == 1
    clock.advance(6)  # ex_b's lease lapsed
    await put(
        store,
        make_intent(clock, "now"),
        make_intent(clock, "later", not_before=clock.now() + 60),
    )
    claims = await store.claim("ex_a", 10, TTL, [])
    assert {c.intent.key for c in claims} == {"lapsing", "now"}
    first = await store.readiness()
    assert (first.running, first.next_ready_at) == (2, clock.now() + TTL)
    assert await store.readiness() == first  # read again


async def test_claim_skips_retry_wait_until_ready(store: Store, clock: FakeClock) -> None:
    await put(store, make_intent(clock, "k"))
    claim = await claim_one(store)
    change = by_token(claim, S.RETRY_WAIT, ready_at=clock.now() + 5)
    assert await store.apply([change]) == [True]
    status = await store.get_intent("k")
    assert status is not None
    assert status.next_attempt_at == utc(clock.now() + 5)
    assert await store.claim("ex_a", 10, TTL, []) == []
    clock.advance(5)
    again = await claim_one(store)
    assert again.previous_state is S.RETRY_WAIT
    assert again.lease.token > claim.lease.token


@pytest.mark.parametrize(
    ("rule", "blocked"),
    [
        ({"kind": "email.send"}, {"email-acme", "email-default"}),
        ({"account": "acme"}, {"email-acme", "noop-acme"}),
        ({"kind": "email.send", "account": "acme"}, {"email-acme"}),
        ({}, {"email-acme", "email-default", "noop-acme", "noop-default"}),
    ],
)
async def test_claim_skips_gate_blocked(
    store: Store, clock: FakeClock, rule: dict[str, str], blocked: set[str]
) -> None:
    await put(
        store,
        make_intent(clock, "email-acme", kind="email.send", account="acme"),
        make_intent(clock, "email-default", kind="email.send"),
        make_intent(clock, "noop-acme", account="acme"),
        make_intent(clock, "noop-default"),
    )
    closed = [gate(clock, **rule)]
    claims = await store.claim("ex_a", 10, TTL, closed)
    everything = {"email-acme", "email-default", "noop-acme", "noop-default"}
    assert {c.intent.key for c in claims} == everything - blocked
    # what the gate held back is still pending, and claimable once the gate is open again
    for key in blocked:
        assert await state_of(store, key) is S.PENDING
    # nothing blocked is ready; only the leases just taken will expire
    readiness = await store.readiness(closed)
    assert readiness.running == len(claims)
    assert readiness.next_ready_at == (clock.now() + TTL if claims else None)
    assert {c.intent.key for c in await store.claim("ex_b", 10, TTL, [])} == blocked


async def test_several_gates_combine(store: Store, clock: FakeClock) -> None:
    await put(
        store,
        make_intent(clock, "email", kind="email.send"),
        make_intent(clock, "acme", account="acme"),
        make_intent(clock, "free"),
    )
    closed = [gate(clock, kind="email.send"), gate(clock, account="acme")]
    assert [c.intent.key for c in await store.claim("ex_a", 10, TTL, closed)] == ["free"]


async def test_gate_blocks_takeover_of_expired_lease(store: Store, clock: FakeClock) -> None:
    await put(store, make_intent(clock, "k", kind="email.send"))
    await claim_one(store)
    clock.advance(TTL + 1)
    assert await store.claim("ex_b", 10, TTL, [gate(clock, kind="email.send")]) == []
    assert await store.claim("ex_b", 10, TTL, [gate(clock)]) == []
    assert len(await store.claim("ex_b", 10, TTL, [gate(clock, kind="noop")])) == 1


# -- leases, takeover, fencing ----------------------------------------------------------------


async def test_expired_lease_taken_over_and_old_token_fenced(
    store: Store, clock: FakeClock
) -> None:
    await put(store, make_intent(clock, "k"))
    old = await claim_one(store, "ex_a", ttl=10)
    clock.advance(9)
    assert await store.claim("ex_b", 10, TTL, []) == []  # still held
    clock.advance(1)
    new = await claim_one(store, "ex_b")
    assert new.intent.id == old.intent.id
    assert new.previous_state is S.RUNNING
    assert new.lease.token == old.lease.token + 1
    assert new.open_attempt is None

    assert await store.apply([by_token(old, S.SUCCEEDED)]) == [False]
    assert await store.renew([old.lease], TTL) == [None]
    assert await store.start_attempts([old.lease]) == [None]

    status = await store.get_intent("k")
    assert status is not None
    assert status.state is S.RUNNING
    assert status.lease_owner == "ex_b"
    assert status.lease_token == new.lease.token
    assert status.attempts == 0
    assert status.receipts == []

    # the new holder is unaffected
    (renewed,) = await store.renew([new.lease], TTL)
    assert renewed is not None
    assert renewed.token == new.lease.token
    assert renewed.expires_at == utc(clock.now() + TTL)
    (attempt,) = await store.start_attempts([new.lease])
    assert attempt is not None
    assert attempt.fencing_token == new.lease.token
    assert await store.apply([by_token(new, S.SUCCEEDED)]) == [True]


async def test_renew_extends_lease(store: Store, clock: FakeClock) -> None:
    await put(store, make_intent(clock, "k"))
    claim = await claim_one(store, ttl=10)
    clock.advance(8)
    (lease,) = await store.renew([claim.lease], 10)
    assert lease is not None
    assert lease.expires_at == utc(clock.now() + 10)
    clock.advance(8)  # past the original expiry, within the renewed one
    assert await store.claim("ex_b", 10, TTL, []) == []
    (attempt,) = await store.start_attempts([lease])
    assert attempt is not None


async def test_start_attempts_refuses_expired_lease(store: Store, clock: FakeClock) -> None:
    await put(store, make_intent(clock, "k"))
    claim = await claim_one(store, ttl=10)
    clock.advance(10)
    assert await store.start_attempts([claim.lease]) == [None]
    status = await store.get_intent("k")
    assert status is not None
    assert status.attempts == 0


async def test_start_attempts_records_durable_attempts(
    store: Store, store_url: str, clock: FakeClock
) -> None:
    await put(store, make_intent(clock, "a"), make_intent(clock, "b"))
    claims = await store.claim("ex_a", 10, TTL, [])
    started = await store.start_attempts([c.lease for c in claims])
    assert [a.attempt if a else None for a in started] == [1, 1]
    for claim, attempt in zip(claims, started, strict=True):
        assert attempt is not None
        assert attempt.intent_id == claim.intent.id
        assert attempt.executor == "ex_a"
        assert attempt.fencing_token == claim.lease.token
        assert attempt.started_at == utc(clock.now())
    # durable: another connection, taking the expired leases over, sees the open attempts
    clock.advance(TTL + 1)
    other = await open_store(store_url, clock)
    try:
        taken = await other.claim("ex_b", 10, TTL, [])
    finally:
        await other.close()
    found = sorted(
        (c.open_attempt.intent_id, c.open_attempt.attempt, c.open_attempt.executor)
        for c in taken
        if c.open_attempt is not None
    )
    assert found == sorted((c.intent.id, 1, "ex_a") for c in claims)


async def test_start_attempts_with_unknown_token_refused(store: Store, clock: FakeClock) -> None:
    await put(store, make_intent(clock, "k"))
    claim = await claim_one(store)
    forged = Lease(
        intent_id=claim.intent.id,
        owner="ex_x",
        token=claim.lease.token + 1,
        expires_at=claim.lease.expires_at,
    )
    assert await store.start_attempts([forged]) == [None]
    assert await store.renew([forged], TTL) == [None]


async def test_open_attempt_reported_on_takeover(store: Store, clock: FakeClock) -> None:
    await put(store, make_intent(clock, "k"))
    first = await claim_one(store, "ex_a")
    (attempt,) = await store.start_attempts([first.lease])
    assert attempt is not None
    clock.advance(TTL)
    second = await claim_one(store, "ex_b")
    assert second.attempts == 1
    assert second.open_attempt == attempt
    assert second.open_attempt is not None
    assert second.open_attempt.executor == "ex_a"
    assert second.open_attempt.fencing_token == first.lease.token

    # still open after a second takeover, until a receipt closes it
    clock.advance(TTL)
    third = await claim_one(store, "ex_c")
    assert third.open_attempt == attempt
    receipt = receipt_for(third, 1, Outcome.FAILED, clock)
    assert await store.apply([by_token(third, S.RETRY_WAIT, receipt=receipt)]) == [True]
    fourth = await claim_one(store, "ex_d")
    assert fourth.previous_state is S.RETRY_WAIT
    assert fourth.open_attempt is None


async def test_no_open_attempt_when_receipt_written(store: Store, clock: FakeClock) -> None:
    await put(store, make_intent(clock, "k"))
    claim = await claim_one(store)
    (attempt,) = await store.start_attempts([claim.lease])
    assert attempt is not None
    receipt = receipt_for(claim, 1, Outcome.FAILED, clock)
    assert await store.apply([by_token(claim, S.RETRY_WAIT, receipt=receipt)]) == [True]
    again = await claim_one(store)
    assert again.attempts == 1
    assert again.open_attempt is None


# -- apply ------------------------------------------------------------------------------------


async def test_apply_from_states_compare_and_set(store: Store, clock: FakeClock) -> None:
    (intent_id,) = await put(store, make_intent(clock, "k"))
    cancel = Change(
        intent_id=intent_id,
        to_state=S.CANCELLED,
        actor="human:ops",
        action="cancel",
        reason="changed my mind",
        from_states=(S.PENDING,),
    )
    assert await store.apply([cancel]) == [True]
    assert await store.apply([cancel]) == [False]  # no longer pending
    status = await store.get_intent(intent_id)
    assert status is not None
    assert status.state is S.CANCELLED
    assert status.reason == "changed my mind"
    assert await store.claim("ex_a", 10, TTL, []) == []


async def test_apply_with_empty_from_states_never_holds(store: Store, clock: FakeClock) -> None:
    (intent_id,) = await put(store, make_intent(clock, "k"))
    change = Change(intent_id=intent_id, to_state=S.CANCELLED, actor="t", action="cancel")
    assert await store.apply([change]) == [False]
    assert await state_of(store, intent_id) is S.PENDING


async def test_apply_token_must_match_running(store: Store, clock: FakeClock) -> None:
    (intent_id,) = await put(store, make_intent(clock, "k"))
    # a token on a pending intent holds nothing
    change = Change(intent_id=intent_id, to_state=S.SUCCEEDED, actor="t", action="succeed", token=0)
    assert await store.apply([change]) == [False]
    claim = await claim_one(store)
    wrong = Change(
        intent_id=intent_id,
        to_state=S.SUCCEEDED,
        actor="t",
        action="succeed",
        token=claim.lease.token + 1,
    )
    assert await store.apply([wrong]) == [False]
    assert await state_of(store, intent_id) is S.RUNNING


async def test_apply_unknown_intent(store: Store) -> None:
    change = Change(
        intent_id="in_missing",
        to_state=S.CANCELLED,
        actor="t",
        action="x",
        from_states=(S.PENDING,),
    )
    assert await store.apply([change]) == [False]


async def test_apply_batch_results_in_order(store: Store, clock: FakeClock) -> None:
    ids = await put(store, make_intent(clock, "a"), make_intent(clock, "b"))
    changes = [
        Change(intent_id=i, to_state=S.CANCELLED, actor="t", action="cancel", from_states=(st,))
        for i, st in zip(ids, (S.PENDING, S.RETRY_WAIT), strict=True)
    ]
    assert await store.apply(changes) == [True, False]


async def test_illegal_transition_raises_and_changes_nothing(
    store: Store, clock: FakeClock
) -> None:
    ids = await put(store, make_intent(clock, "a"), make_intent(clock, "b"))
    legal = Change(
        intent_id=ids[0], to_state=S.CANCELLED, actor="t", action="cancel", from_states=(S.PENDING,)
    )
    illegal = Change(
        intent_id=ids[1], to_state=S.SUCCEEDED, actor="t", action="x", from_states=(S.PENDING,)
    )
    assert not allowed(S.PENDING, S.SUCCEEDED)
    with pytest.raises(InvalidTransition, match="is pending; it cannot become succeeded"):
        await store.apply([legal, illegal])
    # the batch is one transaction: nothing of it was applied
    assert await state_of(store, ids[0]) is S.PENDING
    assert await state_of(store, ids[1]) is S.PENDING
    assert [e.action for e in await store.audit()] == ["submit", "submit"]


async def test_terminal_state_cannot_be_left(store: Store, clock: FakeClock) -> None:
    (intent_id,) = await put(store, make_intent(clock, "k"))
    claim = await claim_one(store)
    receipt = receipt_for(claim, 0, Outcome.SUCCEEDED, clock)
    assert await store.apply([by_token(claim, S.SUCCEEDED, receipt=receipt)]) == [True]
    back = Change(
        intent_id=intent_id, to_state=S.PENDING, actor="t", action="x", from_states=(S.SUCCEEDED,)
    )
    with pytest.raises(InvalidTransition):
        await store.apply([back])
    assert await state_of(store, intent_id) is S.SUCCEEDED


async def test_apply_writes_receipts(store: Store, clock: FakeClock) -> None:
    await put(store, make_intent(clock, "k"))
    claim = await claim_one(store)
    (attempt,) = await store.start_attempts([claim.lease])
    assert attempt is not None
    failed = receipt_for(claim, 1, Outcome.FAILED, clock)
    assert await store.apply([by_token(claim, S.RETRY_WAIT, receipt=failed)]) == [True]
    clock.advance(1)
    claim2 = await claim_one(store)
    await store.start_attempts([claim2.lease])
    ok = receipt_for(claim2, 2, Outcome.SUCCEEDED, clock)
    assert await store.apply([by_token(claim2, S.SUCCEEDED, receipt=ok)]) == [True]

    status = await store.get_intent("k")
    assert status is not None
    assert status.receipts == [failed, ok]  # oldest first
    assert status.attempts == 2
    assert await store.receipts(claim.intent.id) == [ok, failed]  # newest first
    assert await store.receipts(limit=1) == [ok]


async def test_requeue_grants_extra_attempts(store: Store, clock: FakeClock) -> None:
    (intent_id,) = await put(store, make_intent(clock, "k", max_attempts=1))
    claim = await claim_one(store)
    assert await store.apply([by_token(claim, S.DEAD)]) == [True]
    requeue = Change(
        intent_id=intent_id,
        to_state=S.PENDING,
        actor="human:ops",
        action="dlq.retry",
        from_states=(S.DEAD,),
        extra_attempts=3,
    )
    assert await store.apply([requeue]) == [True]
    status = await store.get_intent(intent_id)
    assert status is not None
    assert status.state is S.PENDING
    assert status.max_attempts == 4
    assert status.next_attempt_at == utc(clock.now())


async def test_audit_rows_for_every_state_change(store: Store, clock: FakeClock) -> None:
    (intent_id,) = await put(store, make_intent(clock, "k"))
    claim = await claim_one(store, "ex_a", ttl=10)
    clock.advance(10)
    takeover = await claim_one(store, "ex_b")
    await store.apply([by_token(takeover, S.RETRY_WAIT, action="retry", reason="boom")])
    claim3 = await claim_one(store, "ex_c")
    await store.apply([by_token(claim3, S.SUCCEEDED, action="succeed")])
    await store.set_gate(gate(clock, kind="noop"))

    history = list(reversed(await store.audit(intent_id)))
    assert [(e.actor, e.action, e.from_state, e.to_state) for e in history] == [
        ("agent:test", "submit", None, "pending"),
        ("ex_a", "claim", "pending", "running"),
        ("ex_b", "claim", "running", "running"),
        ("ex_b", "retry", "running", "retry_wait"),
        ("ex_c", "claim", "retry_wait", "running"),
        ("ex_c", "succeed", "running", "succeeded"),
    ]
    assert history[3].reason == "boom"
    assert [e.seq for e in history] == sorted(e.seq for e in history)
    for event in history[1:]:
        assert allowed(S(event.from_state), S(event.to_state))
    assert claim.lease.token < takeover.lease.token < claim3.lease.token

    (gate_event,) = [e for e in await store.audit() if e.intent_id is None]
    assert gate_event.action == "gate.close"
    assert gate_event.detail == {"kind": "noop", "account": None}


async def test_gates_round_trip(store: Store, clock: FakeClock) -> None:
    closed = gate(clock, kind="noop")
    await store.set_gate(closed)
    assert await store.gates() == [closed]
    reopened = closed.model_copy(update={"open": True})
    await store.set_gate(reopened)
    await store.set_gate(gate(clock))
    rules = await store.gates()
    assert len(rules) == 2
    assert reopened in rules


async def test_readiness_and_counts(store: Store, clock: FakeClock) -> None:
    readiness = await store.readiness()
    assert (readiness.running, readiness.next_ready_at) == (0, None)
    await put(store, make_intent(clock, "a"), make_intent(clock, "b", not_before=clock.now() + 5))
    assert (await store.readiness()).next_ready_at == clock.now()
    await store.claim("ex_a", 1, 10, [])
    readiness = await store.readiness()
    assert readiness.running == 1
    assert readiness.next_ready_at == clock.now() + 5
    assert await store.counts() == {S.RUNNING: 1, S.PENDING: 1}


async def test_change_counter_moves_on_commit(store: Store, clock: FakeClock) -> None:
    before = await store.change_counter()
    await put(store, make_intent(clock, "k"))
    assert await store.change_counter() != before
    since = await store.change_counter()
    await store.wait_for_change(since, 0.01)  # times out quietly


async def test_timestamps_follow_the_clock(store: Store, clock: FakeClock) -> None:
    await put(store, make_intent(clock, "k"))
    clock.advance(42)
    await claim_one(store)
    status = await store.get_intent("k")
    assert status is not None
    assert status.updated_at == utc(clock.now())
    (latest, *_) = await store.audit(status.id)
    assert latest.action == "claim"
    assert latest.at == utc(clock.now())


async def test_readiness_ignores_leases_under_a_closed_gate(store: Store, clock: FakeClock) -> None:
    await put(store, make_intent(clock, "blocked", kind="email.send"), make_intent(clock, "free"))
    await store.claim("ex_a", 10, 10, [])
    clock.advance(11)  # both leases expired: only the ungated one can be taken over
    closed = [gate(clock, kind="email.send")]
    readiness = await store.readiness(closed)
    assert readiness.running == 1
    assert readiness.next_ready_at == clock.now() - 1
    assert [c.intent.key for c in await store.claim("ex_b", 10, TTL, closed)] == ["free"]
    readiness = await store.readiness(closed)
    assert readiness.running == 1
    assert readiness.next_ready_at == clock.now() + TTL
    everything = await store.readiness([gate(clock)])
    assert (everything.running, everything.next_ready_at) == (0, None)
    assert (await store.readiness()).running == 2


async def test_closed_store_refuses_use(store_url: str, clock: FakeClock) -> None:
    store = await open_store(store_url, clock)
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.change_counter()
