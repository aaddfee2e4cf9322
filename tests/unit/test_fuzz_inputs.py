"""Fuzzing intent and approval inputs with Hypothesis.

Whatever arrives (malformed JSON, wrong types, payloads past the limit, odd unicode,
path-like keys), the answer is a one-line FarmhandError or a dead letter with its reason:
never a crash, and nothing valid is lost.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from farmhand.canonical import payload_hash
from farmhand.cli.intents import _batch_line
from farmhand.config import load
from farmhand.contracts import MAX_PAYLOAD_BYTES, Approval, Intent, IntentState
from farmhand.contracts.base import utc
from farmhand.coordinator import Coordinator
from farmhand.errors import FarmhandError
from farmhand.executor import Executor
from farmhand.executor.admission import Admission
from farmhand.ids import new_id
from farmhand.keys import Keyring
from farmhand.signing import sign
from farmhand.store import IntentQuery, NewIntent, open_store

POLICY = """
[agents.local]
kinds = ["noop", "webhook.post"]
accounts = ["*"]

[[approvals]]
account = "gated"
approvers = ["alice"]
"""

odd_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40
) | st.sampled_from(
    ["../../etc/passwd", "a/b\\c", "C:\\x", "..", "\u202eevil", "\ufeffbom", " pad ", "é" * 300, ""]
)
json_scalar = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | odd_text
)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(odd_text, inner, max_size=4),
    max_leaves=12,
)
huge_payload = st.builds(
    lambda n: {"blob": "x" * n}, st.integers(MAX_PAYLOAD_BYTES - 20, MAX_PAYLOAD_BYTES + 50)
)
line_object = st.fixed_dictionaries(
    {},
    optional={
        "kind": st.sampled_from(["noop", "webhook.post", "nope", "NOOP", ""]) | json_scalar,
        "key": odd_text | json_scalar,
        "payload": json_value | huge_payload,
        "account": odd_text | json_scalar,
        "agent": st.sampled_from(["local", "stranger"]) | json_scalar,
        "not_before": odd_text | json_scalar,
        "expires_at": odd_text | json_scalar,
        "max_attempts": json_scalar,
        "schema_version": st.sampled_from(["1.0", "1.7", "2.0", "x"]) | json_scalar,
        "extra": json_scalar,
    },
)
batch_line = line_object.map(lambda d: json.dumps(d, ensure_ascii=False)) | odd_text


def home_with_policy() -> Path:
    home = Path(tempfile.mkdtemp(prefix="farmhand-fuzz-"))
    (home / "farmhand.toml").write_text(POLICY + "[executor.retry]\nbase_delay = 0.001\n")
    Keyring(home / "keys").generate("coordinator", "coordinator")
    Keyring(home / "keys").generate("alice", "approver")
    return home


HOME = home_with_policy()


def one_line(error: FarmhandError) -> bool:
    text = str(error)
    return bool(text) and "\n" not in text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(batch_line, min_size=1, max_size=6))
def test_submit_inputs_get_a_clear_error_or_are_stored_intact(lines: list[str]) -> None:
    async def scenario() -> None:
        settings_ = load(home=HOME, store=f"sqlite://{tempfile.mkdtemp()}/fuzz.db")
        keys = Keyring(HOME / "keys")
        store = await open_store(settings_.store_url)
        try:
            co = Coordinator(store, policy=settings_.policy, signer=keys.signer("coordinator"))
            accepted: list[Intent] = []
            refused: list[FarmhandError] = []
            for number, text in enumerate(lines, start=1):
                try:
                    accepted.append(co.build_intent(_batch_line(number, text)))
                except FarmhandError as error:
                    refused.append(error)
            assert all(one_line(error) for error in refused), [str(e) for e in refused]
            results = await co.submit_many(accepted) if accepted else []
            stored = {s.key: s for s in await store.list_intents(IntentQuery(limit=100))}
            for intent, result in zip(accepted, results, strict=True):
                if isinstance(result, FarmhandError):
                    assert one_line(result)
                    continue
                # nothing valid is lost, nothing is altered on the way in
                assert stored[intent.key].payload_hash == payload_hash(intent.payload)
                assert stored[intent.key].to_intent().payload == intent.payload
        finally:
            await store.close()

    asyncio.run(scenario())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads=st.lists(json_value.filter(lambda v: isinstance(v, dict)), min_size=1, max_size=5))
def test_executor_never_crashes_on_stored_payloads_it_cannot_run(
    payloads: list[dict[str, Any]],
) -> None:
    """Payloads that skipped submit validation (an older farmhand, a hand-edited store)."""

    async def scenario() -> None:
        settings_ = load(home=HOME, store=f"sqlite://{tempfile.mkdtemp()}/fuzz.db")
        signer = Keyring(HOME / "keys").signer("coordinator")
        store = await open_store(settings_.store_url)
        try:
            items = []
            for index, payload in enumerate(payloads):
                kind = "webhook.post" if index % 2 else "noop"
                intent = Intent(
                    id=new_id("in"),
                    key=f"fuzz-{index}",
                    kind=kind,
                    payload=payload,
                    payload_hash=payload_hash(payload),
                    created_at=utc(0),
                    max_attempts=2,
                )
                items.append(NewIntent(sign(intent, signer), IntentState.PENDING, "fuzz"))
            await store.put_intents(items)
            await Executor(store, settings_, drain=True).run()
            for status in await store.list_intents(IntentQuery(limit=100)):
                # noop ignores unknown fields, so some succeed; the rest are dead letters
                # (or await a retry) with the reason, never stuck or crashed
                assert status.state in (
                    IntentState.SUCCEEDED,
                    IntentState.DEAD,
                    IntentState.RETRY_WAIT,
                ), status
                if status.state is IntentState.DEAD:
                    assert status.reason
                    assert status.receipts
        finally:
            await store.close()

    asyncio.run(scenario())


approval_object = st.fixed_dictionaries(
    {},
    optional={
        "id": odd_text | json_scalar,
        "intent_id": odd_text | json_scalar,
        "payload_hash": odd_text | json_scalar,
        "approver": st.sampled_from(["alice", "mallory"]) | odd_text,
        "decision": st.sampled_from(["approve", "reject", "APPROVE"]) | json_scalar,
        "created_at": st.sampled_from(["2026-01-01T00:00:00Z"]) | json_scalar,
        "expires_at": st.sampled_from(["2999-01-01T00:00:00Z", "2000-01-01T00:00:00Z"])
        | json_scalar,
        "schema_version": st.sampled_from(["1.0", "2.0"]) | json_scalar,
        "signature": odd_text | st.none(),
        "key_id": odd_text | st.none(),
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=approval_object)
def test_approval_inputs_never_authorise_by_accident(raw: dict[str, Any]) -> None:
    async def scenario() -> None:
        settings_ = load(home=HOME, store=f"sqlite://{tempfile.mkdtemp()}/fuzz.db")
        keys = Keyring(HOME / "keys")
        store = await open_store(settings_.store_url)
        try:
            assert settings_.policy is not None
            co = Coordinator(store, policy=settings_.policy, signer=keys.signer("coordinator"))
            from farmhand.coordinator import SubmitRequest

            status = (
                await co.submit(
                    SubmitRequest(kind="noop", key="gated-1", payload={}, account="gated")
                )
            ).status
            assert status.state is IntentState.AWAITING_APPROVAL
            try:
                approval = Approval.model_validate(raw)
            except (ValueError, FarmhandError):
                return  # refused on the way in, with a validation message
            await store.put_approval(approval)
            admission = Admission(settings_.policy, keys.verifier(), store)
            reason = await admission.refusal(status.to_intent(), 1_900_000_000.0)
            # forged approvals (not signed by alice's key over these exact fields) never count
            assert reason is not None
            assert reason.startswith("approval check failed")
        finally:
            await store.close()

    asyncio.run(scenario())
