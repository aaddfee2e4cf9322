"""The keyring on disk: layout, modes, rotation, revocation, refusals and damaged files."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from farmhand.clock import FakeClock
from farmhand.errors import FarmhandError, InvalidInput, NotFound
from farmhand.keys import KeyInfo, Keyring, key_id_for
from farmhand.signing import KeyMissing, SignatureError


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generate_layout_and_modes(keyring: Keyring) -> None:
    info = keyring.generate("coordinator")
    assert isinstance(info, KeyInfo)
    assert info.owner == "coordinator"
    assert info.role == "coordinator"
    assert not info.revoked
    raw = base64.b64decode(info.public_key)
    assert len(raw) == 32
    assert info.key_id == f"coordinator-{hashlib.sha256(raw).hexdigest()[:8]}"
    assert info.key_id == key_id_for("coordinator", raw)

    private = keyring.directory / "private" / f"{info.key_id}.key"
    public = keyring.directory / "public" / f"{info.key_id}.json"
    assert mode(private) == 0o600
    assert mode(private.parent) == 0o700
    assert len(base64.b64decode(private.read_text().strip())) == 32
    body = json.loads(public.read_text())
    assert body["key_id"] == info.key_id
    assert body["owner"] == "coordinator"
    assert body["role"] == "coordinator"
    assert body["public_key"] == info.public_key
    assert "revoked_at" not in body
    # nothing but the final files: temp files are gone
    names = sorted(p.name for p in keyring.directory.rglob("*") if p.is_file())
    assert names == sorted([private.name, public.name])


def test_private_mode_ignores_umask(keyring: Keyring) -> None:
    old = os.umask(0)
    try:
        info = keyring.generate("coordinator")
    finally:
        os.umask(old)
    assert mode(keyring.private_path(info.key_id)) == 0o600
    assert mode(keyring.private_dir) == 0o700


def test_keys_lists_everything_oldest_first(keyring: Keyring) -> None:
    assert keyring.keys() == []
    a = keyring.generate("coordinator")
    b = keyring.generate("alice", role="approver")
    c = keyring.generate("coordinator")
    keyring.revoke(a.key_id, "ops")
    listed = keyring.keys()
    assert [k.key_id for k in listed] == [a.key_id, b.key_id, c.key_id]
    assert [k.revoked for k in listed] == [True, False, False]
    assert listed[1].role == "approver"
    assert listed[0].revoked_by == "ops"


def test_signer_picks_newest_even_within_one_clock_tick(tmp_path: Path) -> None:
    keyring = Keyring(tmp_path / "keys", clock=FakeClock())  # the clock never moves
    first = keyring.generate("coordinator")
    second = keyring.generate("coordinator")
    third = keyring.generate("coordinator")
    assert first.created_at < second.created_at < third.created_at
    assert keyring.signer("coordinator").key_id == third.key_id
    keyring.revoke(third.key_id, "ops")
    assert keyring.signer("coordinator").key_id == second.key_id


def test_signer_is_per_owner(keyring: Keyring) -> None:
    coordinator = keyring.generate("coordinator")
    alice = keyring.generate("alice", role="approver")
    assert keyring.signer("coordinator").key_id == coordinator.key_id
    assert keyring.signer("alice").key_id == alice.key_id
    assert keyring.signer("alice").owner == "alice"
    assert not keyring.has_signer("bob")


def test_no_key_is_key_missing(keyring: Keyring) -> None:
    assert not keyring.has_signer("coordinator")
    with pytest.raises(KeyMissing, match="farmhand keys generate --owner coordinator") as caught:
        keyring.signer("coordinator")
    assert caught.value.exit_code == 8


def test_all_keys_revoked_is_key_missing(keyring: Keyring) -> None:
    info = keyring.generate("alice", role="approver")
    keyring.revoke(info.key_id, "ops")
    assert not keyring.has_signer("alice")
    with pytest.raises(KeyMissing, match=r"every key of owner alice .* is revoked.*--owner alice"):
        keyring.signer("alice")


@pytest.mark.parametrize("bad", [0o644, 0o640, 0o604, 0o700, 0o660])
def test_private_key_too_open_is_refused(keyring: Keyring, bad: int) -> None:
    info = keyring.generate("coordinator")
    path = keyring.private_path(info.key_id)
    path.chmod(bad)
    assert keyring.has_signer("coordinator")  # so the caller hears why it cannot sign
    with pytest.raises(KeyMissing) as caught:
        keyring.signer("coordinator")
    message = str(caught.value)
    assert str(path) in message
    assert f"chmod 600 {path}" in message
    assert f"{bad:04o}" in message
    path.chmod(0o400)  # narrower is fine
    assert keyring.signer("coordinator").key_id == info.key_id


def test_private_key_symlink_is_refused(keyring: Keyring, tmp_path: Path) -> None:
    info = keyring.generate("coordinator")
    path = keyring.private_path(info.key_id)
    target = tmp_path / "elsewhere.key"
    target.write_bytes(path.read_bytes())
    target.chmod(0o600)
    path.unlink()
    path.symlink_to(target)
    with pytest.raises(KeyMissing, match="cannot read private key"):
        keyring.signer("coordinator")


def test_damaged_private_key(keyring: Keyring) -> None:
    info = keyring.generate("coordinator")
    keyring.private_path(info.key_id).write_text("garbage\n")
    with pytest.raises(KeyMissing, match="not a base64 Ed25519 seed"):
        keyring.signer("coordinator")


def test_private_key_of_another_key_is_refused(keyring: Keyring) -> None:
    a = keyring.generate("coordinator")
    b = keyring.generate("coordinator")
    keyring.private_path(b.key_id).write_bytes(keyring.private_path(a.key_id).read_bytes())
    signer = keyring.signer("coordinator")  # files are read lazily...
    with pytest.raises(KeyMissing, match="does not match public key"):
        signer.sign(b"data")  # ...the mismatch shows when signing


def test_revoke(tmp_path: Path) -> None:
    keyring = Keyring(tmp_path / "keys", clock=FakeClock(1_900_000_000.0))
    info = keyring.generate("coordinator")
    revoked = keyring.revoke(info.key_id, "alice", "laptop stolen")
    assert revoked.revoked
    assert revoked.revoked_by == "alice"
    assert revoked.revoke_reason == "laptop stolen"
    assert revoked.revoked_at is not None
    assert revoked.revoked_at.timestamp() == 1_900_000_000.0
    body = json.loads((keyring.revoked_dir / f"{info.key_id}.json").read_text())
    assert body["revoked_by"] == "alice"
    assert body["reason"] == "laptop stolen"
    assert body["key_id"] == info.key_id
    # the public file is never rewritten
    public = json.loads((keyring.public_dir / f"{info.key_id}.json").read_text())
    assert "revoked_at" not in public
    assert keyring.keys() == [revoked]


def test_revoke_twice_keeps_the_first(keyring: Keyring) -> None:
    info = keyring.generate("coordinator")
    first = keyring.revoke(info.key_id, "alice", "first")
    again = keyring.revoke(info.key_id, "bob", "second")
    assert again == first
    assert keyring.keys()[0].revoked_by == "alice"


def test_revoke_unknown_or_malformed(keyring: Keyring) -> None:
    keyring.generate("coordinator")
    with pytest.raises(NotFound, match="no key coordinator-00000000"):
        keyring.revoke("coordinator-00000000", "ops")
    for bad in ("../../etc/passwd", "coordinator", "coordinator-XYZ", ""):
        with pytest.raises(InvalidInput, match="is not a key id"):
            keyring.revoke(bad, "ops")


@pytest.mark.parametrize(
    "owner", ["", "-x", ".hidden", "a b", "a/b", "x" * 65, "coordinator\n", "é"]
)
def test_invalid_owner(keyring: Keyring, owner: str) -> None:
    with pytest.raises(InvalidInput, match="is not a valid name"):
        keyring.generate(owner)
    with pytest.raises(InvalidInput):
        keyring.signer(owner)


@pytest.mark.parametrize("owner", ["coordinator", "alice", "a", "ops@example.com", "x" * 64])
def test_valid_owner(keyring: Keyring, owner: str) -> None:
    assert keyring.generate(owner).owner == owner


def test_invalid_role(keyring: Keyring) -> None:
    with pytest.raises(InvalidInput, match="not one of: coordinator, approver"):
        keyring.generate("alice", role="admin")


def test_public_only_keyring(keyring: Keyring, tmp_path: Path) -> None:
    info = keyring.generate("coordinator")
    public_only = Keyring(tmp_path / "executor")
    (public_only.directory / "public").mkdir(parents=True)
    source = keyring.public_dir / f"{info.key_id}.json"
    (public_only.public_dir / source.name).write_bytes(source.read_bytes())
    listed = public_only.keys()
    assert [k.key_id for k in listed] == [info.key_id]
    assert not public_only.has_signer("coordinator")
    assert not public_only.has_private(info.key_id)
    with pytest.raises(KeyMissing):
        public_only.signer("coordinator")
    assert info.key_id in public_only.verifier()


def test_damaged_public_file(keyring: Keyring) -> None:
    info = keyring.generate("coordinator")
    path = keyring.public_dir / f"{info.key_id}.json"
    body = json.loads(path.read_text())
    path.write_text("{not json")
    with pytest.raises(FarmhandError, match=f"key file {path} is damaged"):
        keyring.verifier()
    # a public key swapped for another one does not keep the trusted key id
    other = base64.b64encode(b"\x01" * 32).decode()
    path.write_text(json.dumps({**body, "public_key": other}))
    with pytest.raises(FarmhandError, match="does not match owner and public key"):
        keyring.keys()
    path.write_text(json.dumps({**body, "owner": "mallory"}))
    with pytest.raises(FarmhandError, match="does not match owner and public key"):
        keyring.keys()


def test_damaged_public_key_in_verifier() -> None:
    from datetime import UTC, datetime

    from farmhand.signing import Verifier

    info = KeyInfo("k-00000000", "k", "coordinator", "!!", datetime.now(UTC))
    verifier = Verifier([info])
    with pytest.raises(SignatureError, match="not a base64 Ed25519 key"):
        verifier.verify("k-00000000", b"x", base64.b64encode(b"\0" * 64).decode())


def test_to_json(keyring: Keyring) -> None:
    info = keyring.revoke(keyring.generate("coordinator").key_id, "ops", "why")
    data = info.to_json()
    assert data["created_at"].endswith("Z")
    assert data["revoked_at"].endswith("Z")
    assert data["revoked_by"] == "ops"
    assert data["revoke_reason"] == "why"
    assert json.loads(json.dumps(data)) == data


def test_crypto_library_is_imported_only_to_sign_or_verify(tmp_path: Path) -> None:
    """Reading the keyring (every coordinator command does) must not pay for PyNaCl."""
    keyring = Keyring(tmp_path / "keys")
    keyring.generate("coordinator")
    code = f"""
import sys
from pathlib import Path
import farmhand.cli.keys, farmhand.signing
from farmhand.keys import Keyring
keyring = Keyring(Path({str(keyring.directory)!r}))
keyring.keys(); keyring.has_signer("coordinator"); signer = keyring.signer("coordinator")
keyring.verifier()
assert "nacl" not in sys.modules, "nacl imported before signing"
signer.sign(b"x")
assert "nacl" in sys.modules
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_verifier_reads_the_files_again_only_when_one_changed(
    keyring: Keyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = keyring.generate("coordinator")
    reads: list[Path] = []
    original = Keyring._read_public

    def counting(self: Keyring, path: Path) -> KeyInfo:
        reads.append(path)
        return original(self, path)

    monkeypatch.setattr(Keyring, "_read_public", counting)
    assert first.key_id in keyring.verifier()
    assert len(reads) == 1
    for _ in range(3):
        assert first.key_id in keyring.verifier()
    assert len(reads) == 1  # nothing changed: nothing read
    # a revocation a moment ago is seen by the next verifier
    keyring.revoke(first.key_id, actor="ops", reason="lost laptop")
    assert [k.revoked for k in keyring.verifier().keys] == [True]
    # so is a new key, and a key file removed
    second = keyring.generate("coordinator")
    assert {k.key_id for k in keyring.verifier().keys} == {first.key_id, second.key_id}
    (keyring.public_dir / f"{second.key_id}.json").unlink()
    assert second.key_id not in keyring.verifier()
