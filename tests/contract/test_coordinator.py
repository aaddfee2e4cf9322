"""The coordinator (the brain): idempotent submission and the human transitions, on every store."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from farmhand.canonical import payload_hash
from farmhand.clock import FakeClock
from farmhand.contracts import MAX_PAYLOAD_BYTES, IntentState, Outcome, ReceiptSource
from farmhand.contracts.base import utc
from farmhand.coordinator import REQUEUE_ATTEMPTS, Coordinator, SubmitRequest
from farmhand.errors import (
    ConflictError,
    InvalidInput,
    InvalidTransition,
    NotFound,
    UnknownKind,
)
from farmhand.store import Change, Store

S = IntentState


def request(key: str = "k1", payload: Any = None, **kw: Any) -> SubmitRequest:
    return SubmitRequest(
        kind="noop", key=key, payload={"n": 1} if payload is None else payload, **kw
    )


async def force_state(store: Store, intent_id: str, *path: IntentState) -> None:
    """Walk an intent along ``path`` the way an executor would (claim, then transitions)."""
    (claim,) = await store.claim("ex_test", 1, 30, [])
    assert claim.intent.id == intent_id
    for to in path:
        change = Change(
            intent_id=intent_id,
            to_state=to,
            actor="ex_test",
            action="test",
            token=claim.lease.token,
        )
        assert await store.apply([change]) == [True]


# -- submit -----------------------------------------------------------------------------------


async def test_submit_creates_pending_intent(coordinator: Coordinator, clock: FakeClock) -> None:
    submitted = await coordinator.submit(request(account="acme", agent="bot-1"))
    assert submitted.created
    status = submitted.status
    assert status.state is S.PENDING
    assert status.kind == "noop"
    assert status.account == "acme"
    assert status.agent == "bot-1"
    assert status.payload == {"n": 1}
    assert status.payload_hash == payload_hash({"n": 1})
    assert status.created_at == utc(clock.now())
    assert status.id.startswith("in_")
    (event,) = await coordinator.store.audit(status.id)
    assert (event.actor, event.action) == ("agent:bot-1", "submit")


async def test_submit_actor_override(coordinator: Coordinator) -> None:
    submitted = await coordinator.submit(request(), actor="human:ops")
    (event,) = await coordinator.store.audit(submitted.status.id)
    assert event.actor == "human:ops"


async def test_submit_is_idempotent(coordinator: Coordinator, clock: FakeClock) -> None:
    first = await coordinator.submit(request(payload={"b": 2, "a": 1}))
    clock.advance(5)
    second = await coordinator.submit(request(payload={"a": 1, "b": 2}))
    assert first.created
    assert not second.created
    assert second.status.id == first.status.id
    assert second.status.created_at == first.status.created_at
    assert (await coordinator.store.counts()) == {S.PENDING: 1}
    assert len(await coordinator.store.audit(first.status.id)) == 1


async def test_idempotent_repeat_after_it_ran(coordinator: Coordinator) -> None:
    first = await coordinator.submit(request())
    await force_state(coordinator.store, first.status.id, S.SUCCEEDED)
    again = await coordinator.submit(request())
    assert not again.created
    assert again.status.id == first.status.id
    assert again.status.state is S.SUCCEEDED


async def test_conflict_names_both_hashes(coordinator: Coordinator) -> None:
    first = await coordinator.submit(request(payload={"n": 1}))
    with pytest.raises(ConflictError) as info:
        await coordinator.submit(request(payload={"n": 2}))
    message = str(info.value)
    assert payload_hash({"n": 1}) in message
    assert payload_hash({"n": 2}) in message
    assert first.status.id in message
    assert "'k1'" in message
    assert info.value.exit_code == 3


async def test_conflict_on_different_account(coordinator: Coordinator) -> None:
    await coordinator.submit(request(account="acme"))
    with pytest.raises(ConflictError, match="account acme"):
        await coordinator.submit(request(account="globex"))


async def test_submit_many_returns_conflicts(coordinator: Coordinator) -> None:
    await coordinator.submit(request("taken", payload={"n": 1}))
    intents = [
        coordinator.build_intent(request("taken", payload={"n": 2})),
        coordinator.build_intent(request("fresh")),
        coordinator.build_intent(request("taken", payload={"n": 1})),
    ]
    results = await coordinator.submit_many(intents)
    assert isinstance(results[0], ConflictError)
    assert not isinstance(results[1], ConflictError)
    assert results[1].created
    assert not isinstance(results[2], ConflictError)
    assert not results[2].created


async def test_unknown_kind(coordinator: Coordinator) -> None:
    with pytest.raises(UnknownKind, match=r"'sms\.send'") as info:
        await coordinator.submit(SubmitRequest(kind="sms.send", key="k", payload={}))
    assert "noop" in str(info.value)  # lists the known kinds
    assert info.value.exit_code == 2
    assert await coordinator.store.counts() == {}


@pytest.mark.parametrize("payload", [[1, 2], "text", 3, 2.5, True])
async def test_payload_must_be_an_object(coordinator: Coordinator, payload: Any) -> None:
    with pytest.raises(InvalidInput, match="payload must be a JSON object"):
        await coordinator.submit(SubmitRequest(kind="noop", key="k", payload=payload))


async def test_payload_none_refused(coordinator: Coordinator) -> None:
    with pytest.raises(InvalidInput, match="got NoneType"):
        await coordinator.submit(SubmitRequest(kind="noop", key="k", payload=None))


async def test_oversize_payload_refused(coordinator: Coordinator) -> None:
    big = {"blob": "x" * MAX_PAYLOAD_BYTES}
    with pytest.raises(InvalidInput, match=f"the limit is {MAX_PAYLOAD_BYTES}"):
        await coordinator.submit(request(payload=big))
    assert await coordinator.store.counts() == {}


async def test_payload_at_the_limit_accepted(coordinator: Coordinator) -> None:
    overhead = len(b'{"blob":""}')
    exact = {"blob": "x" * (MAX_PAYLOAD_BYTES - overhead)}
    assert (await coordinator.submit(request(payload=exact))).created


async def test_payload_validated_by_connector(coordinator: Coordinator) -> None:
    with pytest.raises(InvalidInput, match="fail must be"):
        await coordinator.submit(request(payload={"fail": "sometimes"}))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"key": "k" * 256}, "key: idempotency key is 256 characters"),
        ({"key": "a\nb"}, "control characters"),
        ({"account": "bad account"}, "account"),
        ({"max_attempts": 0}, "max_attempts"),
    ],
)
async def test_invalid_request_fields(
    coordinator: Coordinator, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        await coordinator.submit(request(**overrides))


async def test_expiry_before_not_before_refused(coordinator: Coordinator, clock: FakeClock) -> None:
    start = utc(clock.now())
    with pytest.raises(InvalidInput, match="expires_at must be later than not_before"):
        await coordinator.submit(
            request(not_before=start + timedelta(hours=1), expires_at=start + timedelta(minutes=1))
        )


async def test_status_by_key_and_not_found(coordinator: Coordinator) -> None:
    submitted = await coordinator.submit(request("order-9"))
    assert (await coordinator.status("order-9")).id == submitted.status.id
    with pytest.raises(NotFound, match="'missing'"):
        await coordinator.status("missing")


# -- cancel -----------------------------------------------------------------------------------


async def test_cancel_pending(coordinator: Coordinator) -> None:
    submitted = await coordinator.submit(request())
    status = await coordinator.cancel("k1", "human:ops", "not needed")
    assert status.state is S.CANCELLED
    assert status.reason == "not needed"
    latest = (await coordinator.store.audit(submitted.status.id))[0]
    assert (latest.actor, latest.action, latest.from_state, latest.to_state) == (
        "human:ops",
        "cancel",
        "pending",
        "cancelled",
    )
    assert await coordinator.store.claim("ex", 10, 30, []) == []


async def test_cancel_retry_wait(coordinator: Coordinator) -> None:
    submitted = await coordinator.submit(request())
    await force_state(coordinator.store, submitted.status.id, S.RETRY_WAIT)
    status = await coordinator.cancel(submitted.status.id, "human:ops")
    assert status.state is S.CANCELLED
    assert status.reason == "cancelled by request"


@pytest.mark.parametrize("path", [(), (S.SUCCEEDED,), (S.DEAD,), (S.UNKNOWN,)])
async def test_cancel_refused_once_running_or_settled(
    coordinator: Coordinator, path: tuple[IntentState, ...]
) -> None:
    submitted = await coordinator.submit(request())
    await force_state(coordinator.store, submitted.status.id, *path)
    state = path[-1] if path else S.RUNNING
    with pytest.raises(InvalidTransition, match=f"is {state}; cancel needs it to be pending"):
        await coordinator.cancel(submitted.status.id, "human:ops")
    assert (await coordinator.status(submitted.status.id)).state is state


async def test_cancel_twice_refused(coordinator: Coordinator) -> None:
    await coordinator.submit(request())
    await coordinator.cancel("k1", "human:ops")
    with pytest.raises(InvalidTransition, match="is cancelled"):
        await coordinator.cancel("k1", "human:ops")


async def test_cancel_unknown_ref(coordinator: Coordinator) -> None:
    with pytest.raises(NotFound):
        await coordinator.cancel("nope", "human:ops")


# -- resolve ----------------------------------------------------------------------------------


async def unknown_intent(coordinator: Coordinator, max_attempts: int = 5) -> str:
    submitted = await coordinator.submit(request(max_attempts=max_attempts))
    intent_id = submitted.status.id
    (claim,) = await coordinator.store.claim("ex_test", 1, 30, [])
    (attempt,) = await coordinator.store.start_attempts([claim.lease])
    assert attempt is not None
    change = Change(
        intent_id=intent_id,
        to_state=S.UNKNOWN,
        actor="ex_test",
        action="park_unknown",
        token=claim.lease.token,
    )
    assert await coordinator.store.apply([change]) == [True]
    return intent_id


async def test_resolve_succeeded_writes_human_receipt(
    coordinator: Coordinator, clock: FakeClock
) -> None:
    intent_id = await unknown_intent(coordinator)
    status = await coordinator.resolve(
        intent_id, "succeeded", "human:ops", "seen in the inbox", external_id="msg-1", url="u"
    )
    assert status.state is S.SUCCEEDED
    (receipt,) = status.receipts
    assert receipt.outcome is Outcome.SUCCEEDED
    assert receipt.source is ReceiptSource.HUMAN
    assert receipt.executor == "human:ops"
    assert receipt.external_id == "msg-1"
    assert receipt.attempt == 1
    assert receipt.detail == {"reason": "seen in the inbox"}
    assert receipt.finished_at == utc(clock.now())
    assert (await coordinator.store.audit(intent_id))[0].action == "resolve.succeeded"


async def test_resolve_fail_dead_letters_with_receipt(coordinator: Coordinator) -> None:
    intent_id = await unknown_intent(coordinator)
    status = await coordinator.resolve(intent_id, "fail", "human:ops")
    assert status.state is S.DEAD
    (receipt,) = status.receipts
    assert receipt.outcome is Outcome.FAILED
    assert receipt.retryable is False
    assert receipt.error == "marked failed by hand"


async def test_resolve_retry_requeues(coordinator: Coordinator) -> None:
    intent_id = await unknown_intent(coordinator, max_attempts=2)
    status = await coordinator.resolve(intent_id, "retry", "human:ops")
    assert status.state is S.PENDING
    assert status.max_attempts == 2  # one of two used: no extra needed
    assert status.receipts == []
    (claim,) = await coordinator.store.claim("ex", 1, 30, [])
    assert claim.previous_state is S.PENDING


async def test_resolve_retry_grants_an_attempt_when_none_left(coordinator: Coordinator) -> None:
    intent_id = await unknown_intent(coordinator, max_attempts=1)
    status = await coordinator.resolve(intent_id, "retry", "human:ops")
    assert status.state is S.PENDING
    assert status.attempts == 1
    assert status.max_attempts == 2


async def test_resolve_unknown_outcome_refused(coordinator: Coordinator) -> None:
    intent_id = await unknown_intent(coordinator)
    with pytest.raises(InvalidInput, match="unknown resolution 'maybe'"):
        await coordinator.resolve(intent_id, "maybe", "human:ops")
    assert (await coordinator.status(intent_id)).state is S.UNKNOWN


@pytest.mark.parametrize("outcome", ["succeeded", "retry", "fail"])
async def test_resolve_only_unknown(coordinator: Coordinator, outcome: str) -> None:
    await coordinator.submit(request())
    with pytest.raises(InvalidTransition, match="is pending; only unknown intents"):
        await coordinator.resolve("k1", outcome, "human:ops")
    status = await coordinator.status("k1")
    assert status.state is S.PENDING
    assert status.receipts == []


# -- requeue ----------------------------------------------------------------------------------


async def test_requeue_dead_letter(coordinator: Coordinator) -> None:
    submitted = await coordinator.submit(request(max_attempts=1))
    await force_state(coordinator.store, submitted.status.id, S.DEAD)
    status = await coordinator.requeue("k1", "human:ops", "fixed the template")
    assert status.state is S.PENDING
    assert status.max_attempts == 1 + REQUEUE_ATTEMPTS
    assert status.reason == "fixed the template"
    assert (await coordinator.store.audit(status.id))[0].action == "dlq.retry"


@pytest.mark.parametrize("path", [(), (S.SUCCEEDED,), (S.UNKNOWN,), (S.RETRY_WAIT,)])
async def test_requeue_only_dead(coordinator: Coordinator, path: tuple[IntentState, ...]) -> None:
    submitted = await coordinator.submit(request())
    await force_state(coordinator.store, submitted.status.id, *path)
    state = path[-1] if path else S.RUNNING
    with pytest.raises(InvalidTransition, match=f"is {state}; dlq.retry needs it to be dead"):
        await coordinator.requeue("k1", "human:ops")


async def test_requeue_pending_refused(coordinator: Coordinator) -> None:
    await coordinator.submit(request())
    with pytest.raises(InvalidTransition, match="is pending"):
        await coordinator.requeue("k1", "human:ops")


# -- gates ------------------------------------------------------------------------------------


async def test_set_gate(coordinator: Coordinator, clock: FakeClock) -> None:
    rule = await coordinator.set_gate(False, "human:ops", kind="noop", reason="incident 12")
    assert not rule.open
    assert rule.changed_at == utc(clock.now())
    assert await coordinator.gates() == [rule]


async def test_set_gate_unknown_kind(coordinator: Coordinator) -> None:
    with pytest.raises(UnknownKind):
        await coordinator.set_gate(False, "human:ops", kind="sms.send")
    assert await coordinator.gates() == []
