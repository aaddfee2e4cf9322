"""The executor's admission checks: signature -> policy -> approvals, negative cases first.

Real keys, a real SQLite store and the coordinator's own approve/reject path; each test
breaks exactly one thing and expects the refusal to name it.
"""

from __future__ import annotations

import tomllib
from datetime import timedelta
from pathlib import Path

import pytest

from farmhand.canonical import payload_hash
from farmhand.clock import FakeClock
from farmhand.contracts import Approval, Decision, Intent, IntentState
from farmhand.contracts.base import utc
from farmhand.coordinator import Coordinator, SubmitRequest
from farmhand.errors import Forbidden, InvalidTransition
from farmhand.executor.admission import Admission
from farmhand.ids import new_id
from farmhand.keys import Keyring
from farmhand.policy import Policy, parse
from farmhand.signing import sign
from farmhand.store import IntentQuery, Store

POLICY = """
[agents.local]
kinds = ["noop", "webhook.post"]
accounts = ["default", "social"]

[[approvals]]
account = "social"
required = 1
approvers = ["alice", "bob"]
lifetime = 600
"""


@pytest.fixture
def policy() -> Policy:
    parsed = parse(tomllib.loads(POLICY), "farmhand.toml")
    assert parsed is not None
    return parsed


@pytest.fixture
def keyring(tmp_path: Path) -> Keyring:
    ring = Keyring(tmp_path / "keys")
    ring.generate("coordinator", "coordinator")
    ring.generate("alice", "approver")
    ring.generate("mallory", "approver")
    return ring


@pytest.fixture
def signed(store: Store, clock: FakeClock, policy: Policy, keyring: Keyring) -> Coordinator:
    return Coordinator(store, clock, policy=policy, signer=keyring.signer("coordinator"))


@pytest.fixture
def admission(store: Store, policy: Policy, keyring: Keyring) -> Admission:
    return Admission(policy=policy, verifier=keyring.verifier(), store=store)


async def submit(
    co: Coordinator, key: str = "k", account: str = "default", **payload: object
) -> Intent:
    request = SubmitRequest(kind="noop", key=key, payload=dict(payload), account=account)
    return (await co.submit(request)).status.to_intent()


async def test_signed_allowed_intent_is_admitted(
    signed: Coordinator, admission: Admission, clock: FakeClock
) -> None:
    intent = await submit(signed)
    assert intent.signature is not None
    assert intent.key_id is not None
    assert intent.key_id.startswith("coordinator-")
    assert await admission.refusal(intent, clock.now()) is None


async def test_unsigned_intent_is_refused(
    store: Store, clock: FakeClock, policy: Policy, admission: Admission
) -> None:
    intent = await submit(Coordinator(store, clock, policy=policy))
    reason = await admission.refusal(intent, clock.now())
    assert reason is not None
    assert reason.startswith("signature check failed")
    assert "unsigned" in reason


async def test_tampered_payload_is_refused(
    signed: Coordinator, admission: Admission, clock: FakeClock
) -> None:
    intent = await submit(signed, note="pay 10")
    forged = {"note": "pay 1000"}
    tampered = intent.model_copy(update={"payload": forged, "payload_hash": payload_hash(forged)})
    reason = await admission.refusal(tampered, clock.now())
    assert reason is not None
    assert "does not match" in reason


async def test_revoked_key_fails_at_once(
    signed: Coordinator,
    admission: Admission,
    keyring: Keyring,
    clock: FakeClock,
    store: Store,
    policy: Policy,
) -> None:
    intent = await submit(signed)
    assert intent.key_id is not None
    keyring.revoke(intent.key_id, "ops", "laptop stolen")
    fresh = Admission(policy=policy, verifier=keyring.verifier(), store=store)
    reason = await fresh.refusal(intent, clock.now())
    assert reason is not None
    assert "revoked" in reason


async def test_agent_outside_its_accounts_is_refused_at_submit_and_execution(
    signed: Coordinator, store: Store, clock: FakeClock, keyring: Keyring, admission: Admission
) -> None:
    with pytest.raises(Forbidden, match="may not use account 'billing'"):
        await submit(signed, account="billing")
    assert await store.list_intents(IntentQuery()) == []
    # an intent stored under an older, looser policy is refused again by the executor
    loose = parse(tomllib.loads(POLICY.replace('"social"]', '"social", "billing"]')), "t")
    assert loose is not None
    older = Coordinator(store, clock, policy=loose, signer=keyring.signer("coordinator"))
    intent = await submit(older, account="billing")
    reason = await admission.refusal(intent, clock.now())
    assert reason is not None
    assert reason.startswith("policy check failed")


async def awaiting(co: Coordinator, key: str = "post-1", **payload: object) -> Intent:
    intent = await submit(co, key, account="social", **payload)
    assert (await co.status(intent.id)).state is IntentState.AWAITING_APPROVAL
    return intent


async def test_approval_moves_to_pending_and_is_admitted(
    signed: Coordinator, admission: Admission, keyring: Keyring, clock: FakeClock
) -> None:
    intent = await awaiting(signed)
    assert await admission.refusal(intent, clock.now()) == (
        "approval check failed: 0 valid of 1 needed (no approvals recorded)"
    )
    status = await signed.decide(intent.id, Decision.APPROVE, keyring.signer("alice"))
    assert status.state is IntentState.PENDING
    assert await admission.refusal(intent, clock.now()) is None


async def test_expired_approval_is_refused(
    signed: Coordinator, admission: Admission, keyring: Keyring, clock: FakeClock
) -> None:
    intent = await awaiting(signed)
    await signed.decide(intent.id, Decision.APPROVE, keyring.signer("alice"))
    clock.advance(601)
    reason = await admission.refusal(intent, clock.now())
    assert reason is not None
    assert "expired" in reason


async def test_approval_replayed_on_another_intent_is_refused(
    signed: Coordinator, admission: Admission, keyring: Keyring, clock: FakeClock, store: Store
) -> None:
    first = await awaiting(signed, "post-1")
    second = await awaiting(signed, "post-2")
    await signed.decide(first.id, Decision.APPROVE, keyring.signer("alice"))
    (approval,) = await store.approvals(first.id)
    # replayed as is: it names the first intent
    await store.put_approval(approval.model_copy(update={"id": new_id("ap")}))
    # and with the intent id rewritten: the signature no longer matches
    moved = approval.model_copy(update={"id": new_id("ap"), "intent_id": second.id})
    await store.put_approval(moved)
    reason = await admission.refusal(second, clock.now())
    assert reason is not None
    assert "0 valid of 1 needed" in reason
    assert "does not match" in reason


async def test_tampered_payload_after_approval_is_refused(
    signed: Coordinator, admission: Admission, keyring: Keyring, clock: FakeClock
) -> None:
    intent = await awaiting(signed, note="hello")
    await signed.decide(intent.id, Decision.APPROVE, keyring.signer("alice"))
    # a payload changed after approval, and re-signed by the coordinator's key: the
    # intent's own signature holds, but the approval names the old payload hash
    forged = {"note": "HELLO ALL"}
    changed = sign(
        intent.model_copy(update={"payload": forged, "payload_hash": payload_hash(forged)}),
        keyring.signer("coordinator"),
    )
    reason = await admission.refusal(changed, clock.now())
    assert reason is not None
    assert "is for payload" in reason


async def test_unknown_approver_cannot_approve_or_be_counted(
    signed: Coordinator, admission: Admission, keyring: Keyring, clock: FakeClock, store: Store
) -> None:
    intent = await awaiting(signed)
    with pytest.raises(Forbidden, match="not an approver"):
        await signed.decide(intent.id, Decision.APPROVE, keyring.signer("mallory"))
    # written straight to the store, signed by mallory's key but claiming to be alice
    now = utc(clock.now())
    forged = sign(
        Approval(
            id=new_id("ap"),
            intent_id=intent.id,
            payload_hash=intent.payload_hash,
            approver="alice",
            decision=Decision.APPROVE,
            created_at=now,
            expires_at=now + timedelta(seconds=600),
        ),
        keyring.signer("mallory"),
    )
    await store.put_approval(forged)
    reason = await admission.refusal(intent, clock.now())
    assert reason is not None
    assert "signed by 'mallory'" in reason


async def test_reject_ends_the_intent(signed: Coordinator, keyring: Keyring) -> None:
    intent = await awaiting(signed)
    status = await signed.decide(intent.id, Decision.REJECT, keyring.signer("alice"), "not today")
    assert status.state is IntentState.REJECTED
    assert status.reason == "not today"
    with pytest.raises(InvalidTransition):
        await signed.decide(intent.id, Decision.APPROVE, keyring.signer("alice"))
