"""Ed25519 signatures over contracts: round trips, tampering, unknown and revoked keys."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import pytest

from farmhand.canonical import canonical_json, payload_hash
from farmhand.contracts import Contract, Intent
from farmhand.coordinator import Coordinator, SubmitRequest
from farmhand.keys import KeyInfo, Keyring
from farmhand.signing import (
    SignatureError,
    Signer,
    Verifier,
    b64encode,
    public_key_of,
    sign,
    signing_bytes,
    verify,
)
from signing_support import SIGNED_FIELD_CHANGES, reason


def build_intent(**overrides: Any) -> Intent:
    fields: dict[str, Any] = {"kind": "noop", "key": "k", "payload": {}, **overrides}
    request = SubmitRequest(**fields)
    return Coordinator(store=None).build_intent(request)  # type: ignore[arg-type]


def test_round_trip(keyring: Keyring, signer: Signer) -> None:
    intent = build_intent()
    signed = sign(intent, signer)
    assert signed.key_id == signer.key_id
    assert signed.signature
    assert intent.signature is None  # the original is untouched
    info = verify(signed, keyring.verifier())
    assert info.key_id == signer.key_id
    assert info.owner == "coordinator"
    assert info.role == "coordinator"


def test_survives_json_round_trip(keyring: Keyring, signer: Signer) -> None:
    payload = {"text": "héllo ✓", "n": 1.5, "big": 2**60, "nested": {"b": [1, None, True]}}
    signed = sign(build_intent(payload=payload), signer)
    again = Intent.model_validate_json(signed.model_dump_json())
    assert verify(again, keyring.verifier()).key_id == signer.key_id
    parsed = Intent.model_validate(json.loads(json.dumps(signed.model_dump(mode="json"))))
    assert verify(parsed, keyring.verifier()).key_id == signer.key_id


def test_signing_bytes_cover_key_id_but_not_signature(signer: Signer) -> None:
    signed = sign(build_intent(), signer)
    data = json.loads(signing_bytes(signed))
    assert data["key_id"] == signer.key_id
    assert "signature" not in data
    assert data["payload_hash"] == signed.payload_hash
    assert signing_bytes(signed) == canonical_json(data)
    assert signing_bytes(signed) == signing_bytes(signed.model_copy(update={"signature": "x"}))


def test_tampered_payload_fails(keyring: Keyring, signer: Signer) -> None:
    signed = sign(build_intent(payload={"amount": 1}), signer)
    payload = {"amount": 1000}
    forged = signed.model_copy(update={"payload": payload, "payload_hash": payload_hash(payload)})
    Intent.model_validate(forged.model_dump())  # consistent: only the signature catches it
    assert reason(forged, keyring.verifier()) == (
        "signature does not match: the record was changed after signing"
    )


@pytest.mark.parametrize(("field", "value"), SIGNED_FIELD_CHANGES)
def test_tampered_field_fails(keyring: Keyring, signer: Signer, field: str, value: Any) -> None:
    signed = sign(build_intent(), signer)
    forged = signed.model_copy(update={field: value})
    assert reason(forged, keyring.verifier()).startswith("signature does not match")


def test_key_id_is_signed(keyring: Keyring, signer: Signer) -> None:
    other = keyring.generate("coordinator")
    signed = sign(build_intent(), signer)
    moved = signed.model_copy(update={"key_id": other.key_id})
    assert reason(moved, keyring.verifier()).startswith("signature does not match")


def test_signature_of_another_record_fails(keyring: Keyring, signer: Signer) -> None:
    first = sign(build_intent(), signer)
    second = sign(build_intent(payload={"x": 1}), signer)
    swapped = second.model_copy(update={"signature": first.signature})
    assert reason(swapped, keyring.verifier()).startswith("signature does not match")


@pytest.mark.parametrize("signature", ["not base64!", "AAAA", "A" * 200, "é"])
def test_malformed_signature_fails(keyring: Keyring, signer: Signer, signature: str) -> None:
    signed = sign(build_intent(), signer)
    bad = signed.model_copy(update={"signature": signature})
    assert reason(bad, keyring.verifier()) == (
        "signature does not match: it is not a base64 Ed25519 signature"
    )


def test_unsigned(keyring: Keyring, signer: Signer) -> None:
    intent = build_intent()
    assert reason(intent, keyring.verifier()) == "unsigned"
    signed = sign(intent, signer)
    assert reason(signed.model_copy(update={"signature": None}), keyring.verifier()) == "unsigned"
    assert reason(signed.model_copy(update={"key_id": None}), keyring.verifier()) == "unsigned"
    assert reason(signed.model_copy(update={"signature": ""}), keyring.verifier()) == "unsigned"
    with pytest.raises(SignatureError, match=r"^unsigned$"):
        keyring.verifier().verify(None, b"data", None)


def test_unknown_key(tmp_path: Path, signer: Signer) -> None:
    signed = sign(build_intent(), signer)
    elsewhere = Keyring(tmp_path / "other")
    elsewhere.generate("coordinator")
    assert reason(signed, elsewhere.verifier()) == f"signed with unknown key {signer.key_id}"
    assert reason(signed, Keyring(tmp_path / "empty").verifier()) == (
        f"signed with unknown key {signer.key_id}"
    )


def test_revoked_key_fails_at_once(keyring: Keyring, signer: Signer) -> None:
    signed = sign(build_intent(), signer)  # signed before the revocation
    assert verify(signed, keyring.verifier())
    revoked = keyring.revoke(signer.key_id, "alice", "laptop stolen")
    assert revoked.revoked_at is not None
    text = reason(signed, keyring.verifier())
    assert text.startswith(f"signed with key {signer.key_id}, revoked at ")
    assert text.endswith(" by alice: laptop stolen")
    assert revoked.revoked_at.strftime("%Y-%m-%dT%H:%M:%SZ") in text


def test_revoked_without_reason(keyring: Keyring, signer: Signer) -> None:
    signed = sign(build_intent(), signer)
    keyring.revoke(signer.key_id, "bob")
    assert reason(signed, keyring.verifier()).endswith(" by bob")


def test_verifier_is_a_snapshot(keyring: Keyring, signer: Signer) -> None:
    signed = sign(build_intent(), signer)
    before = keyring.verifier()
    keyring.revoke(signer.key_id, "alice")
    assert verify(signed, before).key_id == signer.key_id  # read once: build a new one
    reason(signed, keyring.verifier())


def test_rotation(keyring: Keyring) -> None:
    old = keyring.generate("coordinator")
    signed_old = sign(build_intent(), keyring.signer("coordinator"))
    new = keyring.generate("coordinator")
    signer = keyring.signer("coordinator")
    assert signer.key_id == new.key_id != old.key_id
    signed_new = sign(build_intent(), signer)
    verifier = keyring.verifier()
    assert verify(signed_old, verifier).key_id == old.key_id
    assert verify(signed_new, verifier).key_id == new.key_id
    # retire the old key: only what it signed stops verifying
    keyring.revoke(old.key_id, "ops", "rotated")
    verifier = keyring.verifier()
    assert reason(signed_old, verifier).startswith(f"signed with key {old.key_id}, revoked")
    assert verify(signed_new, verifier).key_id == new.key_id
    assert keyring.signer("coordinator").key_id == new.key_id


def test_role_is_checked_when_asked(keyring: Keyring) -> None:
    keyring.generate("alice", role="approver")
    signed = sign(build_intent(), keyring.signer("alice"))
    assert verify(signed, keyring.verifier(), role="approver").owner == "alice"
    assert reason(signed, keyring.verifier(), role="coordinator") == (
        f"signed with key {signed.key_id} of role approver; needs coordinator"
    )


def test_public_only_keyring_verifies(tmp_path: Path, keyring: Keyring, signer: Signer) -> None:
    signed = sign(build_intent(), signer)
    executor_host = tmp_path / "executor-keys"
    (executor_host / "public").mkdir(parents=True)
    for path in keyring.public_dir.iterdir():
        (executor_host / "public" / path.name).write_bytes(path.read_bytes())
    public_only = Keyring(executor_host)
    assert not public_only.has_signer("coordinator")
    assert verify(signed, public_only.verifier()).key_id == signer.key_id
    # a revocation copied over takes effect there too
    keyring.revoke(signer.key_id, "alice", "compromised")
    (executor_host / "revoked").mkdir()
    for path in keyring.revoked_dir.iterdir():
        (executor_host / "revoked" / path.name).write_bytes(path.read_bytes())
    assert reason(signed, public_only.verifier()).endswith("by alice: compromised")


class Note(Contract):
    contract_name: ClassVar[str] = "note"

    text: str
    key_id: str | None = None
    signature: str | None = None


class Plain(Contract):
    contract_name: ClassVar[str] = "plain"

    text: str


def test_any_contract_with_the_fields(keyring: Keyring, signer: Signer) -> None:
    signed = sign(Note(text="hello"), signer)
    assert isinstance(signed, Note)
    assert verify(signed, keyring.verifier()).key_id == signer.key_id
    assert reason(signed.model_copy(update={"text": "bye"}), keyring.verifier()).startswith(
        "signature does not match"
    )
    with pytest.raises(TypeError, match="cannot be signed"):
        sign(Plain(text="x"), signer)


def test_signer_does_not_show_its_seed(signer: Signer) -> None:
    assert "seed" not in repr(signer)
    assert signer.key_id in repr(signer)
    assert len(signer.sign(b"data")) == 88  # 64 bytes in base64


def test_direct_verifier_api(keyring: Keyring, signer: Signer) -> None:
    signature = signer.sign(b"payload")
    verifier = keyring.verifier()
    assert signer.key_id in verifier
    assert [k.key_id for k in verifier.keys] == [signer.key_id]
    assert verifier.verify(signer.key_id, b"payload", signature).owner == "coordinator"
    with pytest.raises(SignatureError, match="changed after signing"):
        verifier.verify(signer.key_id, b"payload!", signature)


def test_signatures_made_before_still_verify() -> None:
    # written by an earlier farmhand: the signed bytes of an intent must never change
    seed = bytes(range(32))
    signer = Signer("coordinator-0a1b2c3d", "coordinator", seed, public_key_of(seed))
    payload = {
        "url": "https://example.org/hook",
        "json": {"text": "héllo ✓", "n": 1.5, "big": 2**60, "list": [None, True]},
    }
    intent = Intent(
        id="in_golden",
        key="golden-1",
        kind="webhook.post",
        payload=payload,
        payload_hash=payload_hash(payload),
        created_at=datetime(2026, 1, 31, 12, 0, tzinfo=UTC),
        max_attempts=3,
    )
    signature = (
        "FTT9fiBeYmDf+dfEgC3MJnJpjQGrPpOP7KS2ncbIN+upzujfGOx0u60pxxLqu4beK95j6ipDjOxpYP0N/bVfDg=="
    )
    signed = sign(intent, signer)
    assert signed.signature == signature
    info = KeyInfo(
        key_id=signer.key_id,
        owner="coordinator",
        role="coordinator",
        public_key=b64encode(public_key_of(seed)),
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    assert verify(signed, Verifier([info]), role="coordinator") == info
