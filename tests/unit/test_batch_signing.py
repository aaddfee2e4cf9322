"""Batch signatures: one Ed25519 signature over a Merkle root, an inclusion proof per record.

Real keys and real crypto throughout. Every record of a batch must verify on its own, and
nothing that fails with one signature per record may pass with a batch signature.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from nacl.signing import SigningKey, VerifyKey

from farmhand import signing
from farmhand.canonical import payload_hash
from farmhand.clock import FakeClock
from farmhand.config import Settings
from farmhand.contracts import Intent, IntentState
from farmhand.coordinator import Coordinator, SubmitRequest, Submitted
from farmhand.keys import Keyring
from farmhand.signing import (
    BATCH_PREFIX,
    MAX_BATCH,
    SignatureError,
    Signer,
    Verifier,
    sign,
    sign_many,
    verify,
)
from farmhand.store import Store
from signing_support import SIGNED_FIELD_CHANGES, reason
from store_support import run

FARMHAND = str(Path(sys.executable).with_name("farmhand"))


def unsigned(count: int, prefix: str = "k") -> list[Intent]:
    co = Coordinator(store=None)  # type: ignore[arg-type]
    return [
        co.validate(SubmitRequest(kind="noop", key=f"{prefix}-{i}", payload={"i": i}))
        for i in range(count)
    ]


@pytest.fixture
def ed25519_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The messages every Ed25519 verification (VerifyKey.verify) is asked to check."""
    calls: list[bytes] = []
    original: Callable[..., bytes] = VerifyKey.verify

    def counting(self: VerifyKey, smessage: bytes, signature: bytes | None = None) -> bytes:
        calls.append(smessage)
        return original(self, smessage, signature)

    monkeypatch.setattr(VerifyKey, "verify", counting)
    return calls


def with_signature(record: Intent, signature: str) -> Intent:
    return record.model_copy(update={"signature": signature})


def parts(record: Intent) -> list[str]:
    assert record.signature is not None
    return record.signature.split(".")


def joined(*fields: object) -> str:
    return ".".join(str(f) for f in fields)


MISMATCH = "signature does not match: the record or its batch proof was changed after signing"

# -- every record of a batch verifies ------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 1000])
def test_every_record_of_a_batch_verifies(keyring: Keyring, signer: Signer, size: int) -> None:
    records = unsigned(size)
    signed = sign_many(records, signer)
    assert [s.id for s in signed] == [r.id for r in records]
    assert all(r.signature is None for r in records)  # the originals are untouched
    verifier = keyring.verifier()
    for record in signed:
        info = verify(record, verifier, role="coordinator")
        assert (info.key_id, info.owner) == (signer.key_id, "coordinator")
        assert record.key_id == signer.key_id
        # as a store keeps it: JSON text, parsed back
        again = Intent.model_validate_json(record.model_dump_json())
        assert verify(again, keyring.verifier()).key_id == signer.key_id
    if size == 1:
        assert signed == [sign(records[0], signer)]  # Ed25519 is deterministic
        return
    roots = {parts(s)[1] for s in signed}
    assert len(roots) == 1  # one signature for the whole batch
    for index, record in enumerate(signed):
        prefix, _, at, count, _ = parts(record)
        assert (prefix + ".", at, count) == (BATCH_PREFIX, str(index), str(size))


def test_the_signed_statement_and_proofs_are_as_documented() -> None:
    # rebuilt here from the description in farmhand.signing, with hashlib and PyNaCl only
    seed = bytes(range(32))
    signer = Signer("coordinator-0a1b2c3d", "coordinator", seed, signing.public_key_of(seed))
    signed = sign_many(unsigned(3), signer)

    def h(*parts: bytes) -> bytes:
        return hashlib.sha256(b"".join(parts)).digest()

    l0, l1, l2 = (h(b"\x00", signing.signing_bytes(r)) for r in signed)
    root = h(b"\x01", h(b"\x01", l0, l1), l2)  # the odd leaf is promoted unchanged
    statement = b"farmhand/batch/v1\x00" + b"\x00\x00\x00\x03" + root
    root_signature = base64.b64encode(SigningKey(seed).sign(statement).signature).decode()
    VerifyKey(signing.public_key_of(seed)).verify(statement, base64.b64decode(root_signature))
    proofs = [l1 + l2, l0 + l2, h(b"\x01", l0, l1)]
    for index, (record, proof) in enumerate(zip(signed, proofs, strict=True)):
        expected = f"b1.{root_signature}.{index}.3.{base64.b64encode(proof).decode()}"
        assert record.signature == expected


def test_empty_batch(signer: Signer) -> None:
    assert sign_many([], signer) == []


def test_more_than_one_batch_worth_is_split(
    monkeypatch: pytest.MonkeyPatch, keyring: Keyring, signer: Signer
) -> None:
    monkeypatch.setattr(signing, "MAX_BATCH", 4)
    signed = sign_many(unsigned(9), signer)
    roots = [parts(s)[1] if len(parts(s)) == 5 else None for s in signed]
    assert len(set(roots[:4])) == len(set(roots[4:8])) == 1
    assert roots[0] != roots[4]
    assert roots[8] is None  # the single leftover: an ordinary signature
    assert [parts(s)[3] for s in signed[:8]] == ["4"] * 8
    verifier = keyring.verifier()
    assert all(verify(s, verifier).key_id == signer.key_id for s in signed)


def test_longest_signature_is_read() -> None:
    # the last leaf of the largest batch: 7-digit numbers and 20 sibling hashes
    assert signing._path_length(MAX_BATCH - 1, MAX_BATCH) == 20
    root = signing.b64encode(bytes(64))
    longest = joined("b1", root, MAX_BATCH - 1, MAX_BATCH, signing.b64encode(bytes(640)))
    assert len(longest) == 964 <= signing._MAX_BATCH_CHARS
    assert signing._parse_batch(longest) == (bytes(64), MAX_BATCH - 1, MAX_BATCH, bytes(640))


# -- tampering ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [*SIGNED_FIELD_CHANGES, ("payload", {"i": 1000})])
def test_changing_any_field_of_any_record_fails(
    keyring: Keyring, signer: Signer, field: str, value: Any
) -> None:
    signed = sign_many(unsigned(7), signer)
    verifier = keyring.verifier()
    verify(signed[0], verifier)  # the root is known valid: the cache must not help forgeries
    for record in signed:
        update = {field: value}
        if field == "payload":
            update["payload_hash"] = payload_hash(value)
        forged = record.model_copy(update=update)
        assert reason(forged, verifier) == MISMATCH
        assert verify(record, verifier)  # the untouched record still passes


def test_changing_key_id_fails(keyring: Keyring, signer: Signer) -> None:
    other = keyring.generate("coordinator")
    signed = sign_many(unsigned(3), signer)
    moved = signed[1].model_copy(update={"key_id": other.key_id})
    assert reason(moved, keyring.verifier()) == MISMATCH


def test_proof_moved_to_another_record_of_the_batch_fails(keyring: Keyring, signer: Signer) -> None:
    signed = sign_many(unsigned(7), signer)
    verifier = keyring.verifier()
    for source in signed:
        for target in signed:
            if source is target:
                continue
            assert source.signature is not None
            with pytest.raises(SignatureError):
                verify(with_signature(target, source.signature), verifier)


@pytest.mark.parametrize("size", range(2, 18))
def test_changed_index_fails(keyring: Keyring, signer: Signer, size: int) -> None:
    signed = sign_many(unsigned(size), signer)
    verifier = keyring.verifier()
    for index, record in enumerate(signed):
        prefix, root, _, count, proof = parts(record)
        for other in range(size):
            if other != index:
                moved = with_signature(record, joined(prefix, root, other, count, proof))
                with pytest.raises(SignatureError):
                    verify(moved, verifier)


def test_changed_count_fails(keyring: Keyring, signer: Signer) -> None:
    # leaf 0 of 4 and leaf 0 of 3 take the same path: only the signed count tells them apart
    signed = sign_many(unsigned(4), signer)
    prefix, root, index, _, proof = parts(signed[0])
    assert signing._path_length(0, 3) == signing._path_length(0, 4) == 2
    assert (
        reason(with_signature(signed[0], joined(prefix, root, index, 3, proof)), keyring.verifier())
        == MISMATCH
    )
    seven = sign_many(unsigned(7), signer)
    verifier = keyring.verifier()
    for record in seven:
        prefix, root, index, count, proof = parts(record)
        for other in range(20):
            if str(other) != count:
                with pytest.raises(SignatureError):
                    verify(
                        with_signature(record, joined(prefix, root, index, other, proof)), verifier
                    )


def test_root_signature_of_another_batch_fails(keyring: Keyring, signer: Signer) -> None:
    first = sign_many(unsigned(5, "a"), signer)
    second = sign_many(unsigned(5, "b"), signer)
    verifier = keyring.verifier()
    for a, b in zip(first, second, strict=True):
        _, root_a, *_ = parts(a)
        prefix, _, index, count, proof = parts(b)
        assert (
            reason(with_signature(b, joined(prefix, root_a, index, count, proof)), verifier)
            == MISMATCH
        )


def test_batch_and_ordinary_signatures_do_not_stand_in_for_each_other(
    keyring: Keyring, signer: Signer
) -> None:
    records = unsigned(3)
    batch = sign_many(records, signer)
    single = [sign(r, signer) for r in records]
    verifier = keyring.verifier()
    _, root, *_ = parts(batch[0])
    # the root signature as an ordinary one: it signs a batch statement, not the record
    for record in batch:
        assert reason(with_signature(record, root), verifier).startswith("signature does not match")
    # an ordinary signature as a batch's root signature
    for record, one in zip(batch, single, strict=True):
        prefix, _, index, count, proof = parts(record)
        assert one.signature is not None
        forged = with_signature(record, joined(prefix, one.signature, index, count, proof))
        assert reason(forged, verifier) == MISMATCH


# -- malformed proofs: a SignatureError with a one-line reason, never another exception ----

BAD = "batch signature is malformed: "


def malformed_cases() -> list[tuple[str, Callable[[list[str]], str], str]]:
    """(name, how to break the signature of leaf 3 of 7, expected reason)."""

    def swap(at: int, text: object) -> Callable[[list[str]], str]:
        return lambda p: joined(*p[:at], text, *p[at + 1 :])

    shape = BAD + "expected b1.SIGNATURE.INDEX.COUNT.PROOF"
    root = BAD + "its root signature is not a base64 Ed25519 signature"
    number = BAD + "index and leaf count must be decimal numbers"
    proof = BAD + "leaf 3 of 7 needs a proof of 3 base64 sha256 hashes"
    return [
        ("prefix only", lambda p: "b1.", shape),
        ("dots only", lambda p: "b1....", root),
        ("missing proof", lambda p: joined(*p[:4]), shape),
        ("extra part", lambda p: joined(*p, "AAAA"), shape),
        ("too long", lambda p: joined(*p[:4], p[4] + "A" * 1200), shape),
        ("garbage", lambda p: "b1.\x00\n\u2603", shape),
        ("root not base64", swap(1, "not base64!"), root),
        ("root truncated", swap(1, "A" * 84), root),
        ("root too long", swap(1, "A" * 88 + "AAAA"), root),
        ("root non-ascii", swap(1, "é" * 88), root),
        ("root empty", swap(1, ""), root),
        ("index empty", swap(2, ""), number),
        ("index leading zero", swap(2, "03"), number),
        ("index negative", swap(2, "-3"), number),
        ("index plus", swap(2, "+3"), number),
        ("index spaced", swap(2, " 3"), number),
        ("index not ascii", swap(2, "\u0663"), number),
        ("index float", swap(2, "3.0"), shape),
        ("count too many digits", swap(3, "12345678"), number),
        ("count hex", swap(3, "0x7"), number),
        ("count one", swap(3, "1"), BAD + "leaf count 1 is not between 2 and 1048576"),
        ("count zero", swap(3, "0"), BAD + "leaf count 0 is not between 2 and 1048576"),
        ("count huge", swap(3, "9999999"), BAD + "leaf count 9999999 is not between 2 and 1048576"),
        ("index at count", swap(2, "7"), BAD + "index 7 is not below the leaf count 7"),
        ("index past count", swap(2, "99"), BAD + "index 99 is not below the leaf count 7"),
        ("proof empty", swap(4, ""), proof),
        ("proof truncated", lambda p: joined(*p[:4], p[4][:-4]), proof),
        ("proof one byte short", lambda p: joined(*p[:4], signing.b64encode(b"\x00" * 95)), proof),
        ("proof one hash long", lambda p: joined(*p[:4], signing.b64encode(b"\x00" * 128)), proof),
        ("proof not base64", swap(4, "!" * 128), proof),
        ("proof with newline", lambda p: joined(*p[:4], p[4] + "\n"), proof),
        ("too many dots", lambda p: "b1." + "." * 10, shape),
    ]


_CASES = malformed_cases()


@pytest.mark.parametrize(("name", "breaker", "expected"), _CASES, ids=[c[0] for c in _CASES])
def test_malformed_batch_signature(
    keyring: Keyring, signer: Signer, name: str, breaker: Callable[[list[str]], str], expected: str
) -> None:
    record = sign_many(unsigned(7), signer)[3]
    pieces = parts(record)
    assert len(pieces[4]) == 128  # 3 hashes of 32 bytes: 128 characters, no padding
    assert reason(with_signature(record, breaker(pieces)), keyring.verifier()) == expected


def test_no_single_changed_character_passes(keyring: Keyring, signer: Signer) -> None:
    record = sign_many(unsigned(7), signer)[3]
    assert record.signature is not None
    text = record.signature
    verifier = keyring.verifier()
    for at in range(len(text)):
        for other in {"A", "b", "9", "/", "=", ".", "é"} - {text[at]}:
            with pytest.raises(SignatureError):
                verify(with_signature(record, text[:at] + other + text[at + 1 :]), verifier)
        with pytest.raises(SignatureError):
            verify(with_signature(record, text[:at] + text[at + 1 :]), verifier)
    assert verify(record, verifier)


@pytest.fixture(scope="module")
def shared_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Verifier, str]:
    keyring = Keyring(tmp_path_factory.mktemp("keys"))
    return keyring.verifier(), keyring.generate("coordinator").key_id


@hypothesis_settings(max_examples=300, deadline=None)
@given(st.text(max_size=300) | st.from_regex(r"[A-Za-z0-9+/=.]{0,300}", fullmatch=True))
def test_any_text_after_the_prefix_is_refused_with_a_signature_error(
    shared_key: tuple[Verifier, str], tail: str
) -> None:
    verifier, key_id = shared_key
    with pytest.raises(SignatureError) as caught:
        verifier.verify(key_id, b"{}", BATCH_PREFIX + tail)
    assert "\n" not in str(caught.value)


def test_only_the_canonical_base64_of_a_proof_is_read(keyring: Keyring, signer: Signer) -> None:
    # leaf 2 of 3 has one sibling hash: 32 bytes, 43 characters and "=", the last of them
    # with 2 spare bits that a lenient decoder ignores
    record = sign_many(unsigned(3), signer)[2]
    prefix, root, index, count, proof = parts(record)
    assert len(proof) == 44
    assert proof.endswith("=")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    sloppy = proof[:-2] + alphabet[alphabet.index(proof[-2]) + 1] + "="
    assert base64.b64decode(sloppy) == base64.b64decode(proof)
    expected = BAD + "leaf 2 of 3 needs a proof of 1 base64 sha256 hashes"
    verifier = keyring.verifier()
    for text in (sloppy, proof.rstrip("="), proof + "=", proof[:-1] + "A"):
        assert reason(
            with_signature(record, joined(prefix, root, index, count, text)), verifier
        ) == (expected)
    assert verify(record, verifier)


# -- keys: revocation, roles, the cache --------------------------------------------------------


def test_revoked_key_fails_even_when_the_root_was_verified_before(
    keyring: Keyring, signer: Signer, ed25519_calls: list[bytes]
) -> None:
    signed = sign_many(unsigned(3), signer)
    verifier = keyring.verifier()
    assert verify(signed[0], verifier)
    assert len(ed25519_calls) == 1  # the root is now known valid to this verifier
    revoked = keyring.revoke(signer.key_id, "alice", "laptop stolen")
    # a fresh verifier, as the executor builds for every claimed batch
    text = reason(signed[1], keyring.verifier())
    assert text.startswith(f"signed with key {signer.key_id}, revoked at ")
    assert text.endswith(" by alice: laptop stolen")
    # and one that has the valid root cached still checks the revocation first
    verifier._keys[signer.key_id] = revoked
    assert reason(signed[2], verifier) == text
    assert reason(signed[0], verifier) == text


def test_an_approver_key_cannot_sign_a_coordinator_batch(keyring: Keyring, signer: Signer) -> None:
    keyring.generate("alice", role="approver")
    alice = keyring.signer("alice")
    signed = sign_many(unsigned(4), alice)
    verifier = keyring.verifier()
    assert verify(signed[0], verifier, role="approver").owner == "alice"  # root cached
    for record in signed:
        assert reason(record, verifier, role="coordinator") == (
            f"signed with key {alice.key_id} of role approver; needs coordinator"
        )
        # naming the coordinator's key instead changes every leaf
        renamed = record.model_copy(update={"key_id": signer.key_id})
        assert reason(renamed, verifier, role="coordinator") == MISMATCH
    # a batch built under the coordinator's key id but signed with alice's key
    impostor = Signer(signer.key_id, "alice", alice._seed, alice._public_key)
    forged = sign_many(unsigned(4), impostor)
    for record in forged:
        assert record.key_id == signer.key_id
        assert reason(record, verifier, role="coordinator") == MISMATCH


def test_root_signature_is_checked_once_per_batch_per_verifier(
    keyring: Keyring, signer: Signer, ed25519_calls: list[bytes]
) -> None:
    first = sign_many(unsigned(50, "a"), signer)
    second = sign_many(unsigned(30, "b"), signer)
    verifier = keyring.verifier()
    for a, b in zip(first, second + second[:20], strict=True):
        verify(a, verifier, role="coordinator")
        verify(b, verifier, role="coordinator")
    assert len(ed25519_calls) == 2
    assert all(m.startswith(b"farmhand/batch/v1\x00") for m in ed25519_calls)
    # another verifier checks again, once
    again = keyring.verifier()
    for record in first:
        verify(record, again)
    assert len(ed25519_calls) == 3
    # a forged record leads to another root: checked (and refused), never taken from the cache
    forged = first[7].model_copy(update={"max_attempts": 99})
    reason(forged, again)
    assert len(ed25519_calls) == 4
    # ordinary signatures: one check each, as before
    for record in unsigned(3, "c"):
        verify(sign(record, signer), again)
    assert len(ed25519_calls) == 7


def test_the_root_cache_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
    keyring: Keyring,
    signer: Signer,
    ed25519_calls: list[bytes],
) -> None:
    monkeypatch.setattr(signing, "ROOT_CACHE_SIZE", 2)
    batches = [sign_many(unsigned(3, name), signer) for name in "abc"]
    verifier = keyring.verifier()
    for batch in batches[:2]:
        for record in batch:
            verify(record, verifier)
    assert len(ed25519_calls) == 2
    verify(batches[2][0], verifier)  # full: forgets everything, then remembers this root
    verify(batches[2][1], verifier)
    assert len(ed25519_calls) == 3
    verify(batches[0][0], verifier)  # forgotten: checked again
    assert len(ed25519_calls) == 4


def test_a_bad_root_is_remembered_as_bad(
    keyring: Keyring, signer: Signer, ed25519_calls: list[bytes]
) -> None:
    signed = sign_many(unsigned(3), signer)
    verifier = keyring.verifier()
    bad_root = signing.b64encode(b"\x00" * 64)
    for _ in range(3):
        prefix, _, index, count, proof = parts(signed[0])
        forged = with_signature(signed[0], joined(prefix, bad_root, index, count, proof))
        assert reason(forged, verifier) == MISMATCH
    assert len(ed25519_calls) == 1


# -- end to end: coordinator, SQLite store, executor -------------------------------------------


async def test_batch_signed_intents_are_executed(
    store: Store,
    settings: Settings,
    clock: FakeClock,
    coordinator: Coordinator,
    ed25519_calls: list[bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    requests = [SubmitRequest(kind="noop", key=f"bulk-{i}", payload={"i": i}) for i in range(200)]
    intents = coordinator.build_intents(requests)
    assert all(i.signature and i.signature.startswith(BATCH_PREFIX) for i in intents)
    results = await coordinator.submit_many(intents, actor="test")
    assert all(isinstance(r, Submitted) and r.created for r in results)
    # a forged intent reusing a proof of the batch is stored, and refused by the executor
    forged_payload = {"i": 1_000_000}
    forged = intents[5].model_copy(
        update={
            "id": "in_forged",
            "key": "forged",
            "payload": forged_payload,
            "payload_hash": payload_hash(forged_payload),
        }
    )
    (stored_forged,) = await coordinator.submit_many([forged], actor="test")
    assert isinstance(stored_forged, Submitted)
    kept = await store.get_intent(intents[5].id)
    assert kept is not None
    assert kept.signature == intents[5].signature
    verifiers: list[Verifier] = []
    build = Keyring.verifier

    def counting(keyring: Keyring) -> Verifier:
        verifiers.append(build(keyring))
        return verifiers[-1]

    monkeypatch.setattr(Keyring, "verifier", counting)
    stats = await run(store, settings, clock)
    assert stats.succeeded == 200
    assert await store.counts() == {IntentState.SUCCEEDED: 200, IntentState.DEAD: 1}
    dead = await store.get_intent("forged")
    assert dead is not None
    assert dead.reason == f"signature check failed: {MISMATCH}"
    # one Ed25519 check per claimed batch (a fresh verifier each), not one per intent
    # one Ed25519 check per claimed batch (the executor builds a verifier for each), plus
    # one for the forged intent's root, instead of one per intent
    assert 1 < len(ed25519_calls) <= len(verifiers) + 1 < 200 // 4


async def test_build_intents_checks_every_request(coordinator: Coordinator) -> None:
    from farmhand.errors import InvalidInput

    good = SubmitRequest(kind="noop", key="ok", payload={})
    bad = SubmitRequest(kind="noop", key="bad", payload=[])  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="payload must be a JSON object"):
        coordinator.build_intents([good, bad])
    assert coordinator.build_intents([]) == []
    (one,) = coordinator.build_intents([good])
    assert one.signature is not None
    assert not one.signature.startswith(BATCH_PREFIX)


async def test_cli_batch_submit_signs_the_valid_lines_together(
    tmp_home: Path, store: Store, settings: Settings, clock: FakeClock
) -> None:
    lines = [json.dumps({"kind": "noop", "key": f"cli-{i}", "payload": {"i": i}}) for i in range(4)]
    lines.insert(2, json.dumps({"kind": "no.such.kind", "key": "bad", "payload": {}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARMHAND_")}
    env["FARMHAND_HOME"] = str(tmp_home)
    done = await asyncio.to_thread(
        subprocess.run,
        [FARMHAND, "submit", "--batch", "-", "--json"],
        input="\n".join(lines) + "\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    results = json.loads(done.stdout)
    assert [r["line"] for r in results] == [1, 2, 3, 4, 5]
    assert "error" in results[2]
    ids = [r["id"] for r in results if "id" in r]
    stored = [await store.get_intent(i) for i in ids]
    signatures = [s.signature for s in stored if s is not None]
    assert len(signatures) == 4
    assert all(s is not None and s.startswith(BATCH_PREFIX) for s in signatures)
    assert len({s.split(".")[1] for s in signatures if s}) == 1
    verifier = Keyring(tmp_home / "keys").verifier()
    for status in stored:
        assert status is not None
        assert verify(status.to_intent(), verifier, role="coordinator")
    stats = await run(store, settings, clock)
    assert stats.succeeded == 4


# -- paths already proven --------------------------------------------------------------


def test_records_of_one_batch_share_the_hashes_of_their_common_path(
    keyring: Keyring, signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    signed = sign_many(unsigned(1000), signer)
    hashes: list[bytes] = []
    original = signing._node_hash

    def counting(left: bytes, right: bytes) -> bytes:
        hashes.append(left + right)
        return original(left, right)

    monkeypatch.setattr(signing, "_node_hash", counting)
    verifier = keyring.verifier()
    for record in signed[:64]:
        verify(record, verifier)
    shared = len(hashes)
    hashes.clear()
    for record in signed[:64]:
        verify(record, keyring.verifier())
    alone = len(hashes)
    assert alone == 64 * 10  # a 1000-leaf tree is 10 levels high
    # neighbours meet a proven node after one or two levels
    assert shared < alone / 4


def test_a_changed_proof_above_a_proven_node_fails_as_it_would_alone(
    keyring: Keyring, signer: Signer
) -> None:
    signed = sign_many(unsigned(16), signer)
    warm = keyring.verifier()
    for record in signed[:8]:
        verify(record, warm)
    fields = parts(signed[1])
    proof = bytearray(base64.b64decode(fields[4]))
    proof[-1] ^= 1  # the last sibling: the root's other half, above every proven node
    forged = with_signature(signed[1], joined(*fields[:4], base64.b64encode(bytes(proof)).decode()))
    assert reason(forged, keyring.verifier()) == MISMATCH
    assert reason(forged, warm) == MISMATCH
    assert verify(signed[1], warm)  # the record with its own proof still passes
