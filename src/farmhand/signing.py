"""Ed25519 signatures over contracts: who wrote a record, and that nobody changed it since.

A signed contract carries ``key_id`` and ``signature``. The signature covers the canonical
JSON of every other field, ``key_id`` included, so neither the record nor the key it names
can be changed without the verifier noticing.

The crypto library (PyNaCl) is imported only inside the functions that sign or verify:
an agent calls the CLI once per action, and most commands never touch a signature.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from farmhand.canonical import canonical_json
from farmhand.errors import FarmhandError

if TYPE_CHECKING:
    from nacl.signing import SigningKey, VerifyKey

    from farmhand.contracts.base import Contract
    from farmhand.keys import KeyInfo

C = TypeVar("C", bound="Contract")

#: Bytes in an Ed25519 seed (the private key), public key and signature.
SEED_BYTES = 32
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


class SignatureError(FarmhandError):
    """A signature is not acceptable; the message says why, in one line. Exit code 8."""

    exit_code = 8


class KeyMissing(FarmhandError):
    """No usable private key to sign with. Exit code 8."""

    exit_code = 8


def b64encode(data: bytes) -> str:
    """Standard base64 text of ``data``."""
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str, size: int) -> bytes | None:
    """The bytes of strict base64 ``text`` when they are ``size`` long, else None."""
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None
    return data if len(data) == size else None


def public_key_of(seed: bytes) -> bytes:
    """The raw Ed25519 public key of a 32-byte seed."""
    from nacl.signing import SigningKey

    return bytes(SigningKey(seed).verify_key)


def timestamp(value: datetime) -> str:
    """A revocation time as users read it: ``2026-01-31T12:00:00Z``."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Signer:
    """One private key, ready to sign. Build it with :meth:`farmhand.keys.Keyring.signer`."""

    def __init__(
        self, key_id: str, owner: str, seed: bytes, public_key: bytes, source: str = ""
    ) -> None:
        if len(seed) != SEED_BYTES:
            raise KeyMissing(
                f"private key {source or key_id} is not a 32-byte Ed25519 seed; "
                f"run `farmhand keys generate --owner {owner}`"
            )
        self.key_id = key_id
        self.owner = owner
        self._seed = seed
        self._public_key = public_key
        self._source = source or key_id
        self._key: SigningKey | None = None

    def __repr__(self) -> str:  # never show the seed
        return f"Signer(key_id={self.key_id!r}, owner={self.owner!r})"

    def _signing_key(self) -> SigningKey:
        if self._key is None:
            from nacl.signing import SigningKey

            key = SigningKey(self._seed)
            if bytes(key.verify_key) != self._public_key:
                raise KeyMissing(
                    f"private key {self._source} does not match public key {self.key_id}; "
                    f"restore the matching file or run `farmhand keys generate --owner "
                    f"{self.owner}`"
                )
            self._key = key
        return self._key

    def sign(self, data: bytes) -> str:
        """The base64 Ed25519 signature of ``data``."""
        return b64encode(self._signing_key().sign(data).signature)


class Verifier:
    """Every trusted public key and its revocation, as read once from a keyring."""

    def __init__(self, keys: Iterable[KeyInfo]) -> None:
        self._keys: dict[str, KeyInfo] = {info.key_id: info for info in keys}
        self._verify_keys: dict[str, VerifyKey] = {}

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    @property
    def keys(self) -> list[KeyInfo]:
        """The keys this verifier knows, revoked ones included."""
        return list(self._keys.values())

    def verify(
        self,
        key_id: str | None,
        data: bytes,
        signature: str | None,
        *,
        role: str | None = None,
    ) -> KeyInfo:
        """The key that signed ``data``; SignatureError with the reason when not acceptable.

        ``role`` (``coordinator`` or ``approver``), when given, is required of the key:
        an approver's key must not pass for a coordinator's, nor the other way round.
        """
        if not key_id or not signature:
            raise SignatureError("unsigned")
        info = self._keys.get(key_id)
        if info is None:
            raise SignatureError(f"signed with unknown key {key_id}")
        if info.revoked_at is not None:
            why = f": {info.revoke_reason}" if info.revoke_reason else ""
            raise SignatureError(
                f"signed with key {key_id}, revoked at {timestamp(info.revoked_at)} "
                f"by {info.revoked_by or 'unknown'}{why}"
            )
        if role is not None and info.role != role:
            raise SignatureError(f"signed with key {key_id} of role {info.role}; needs {role}")
        raw = b64decode(signature, SIGNATURE_BYTES)
        if raw is None:
            raise SignatureError("signature does not match: it is not a base64 Ed25519 signature")
        from nacl.exceptions import BadSignatureError

        try:
            self._verify_key(info).verify(data, raw)
        except BadSignatureError:
            raise SignatureError(
                "signature does not match: the record was changed after signing"
            ) from None
        return info

    def _verify_key(self, info: KeyInfo) -> VerifyKey:
        key = self._verify_keys.get(info.key_id)
        if key is None:
            from nacl.signing import VerifyKey

            raw = b64decode(info.public_key, PUBLIC_KEY_BYTES)
            if raw is None:
                raise SignatureError(
                    f"public key {info.key_id} is not a base64 Ed25519 key; "
                    "restore its file in the keyring's public/ directory"
                )
            key = self._verify_keys[info.key_id] = VerifyKey(raw)
        return key


def _check_signable(record: Contract) -> None:
    fields = type(record).model_fields
    if "key_id" not in fields or "signature" not in fields:
        raise TypeError(
            f"{type(record).__name__} has no key_id and signature fields; it cannot be signed"
        )


def signing_bytes(record: Contract) -> bytes:
    """What a signature covers: the canonical JSON of every field but ``signature``."""
    data: dict[str, Any] = record.model_dump(mode="json", exclude={"signature"})
    return canonical_json(data)


def sign(record: C, signer: Signer) -> C:
    """A copy of ``record`` with ``key_id`` set to the signer's and signed by it."""
    _check_signable(record)
    unsigned = record.model_copy(update={"key_id": signer.key_id, "signature": None})
    signature = signer.sign(signing_bytes(unsigned))
    return unsigned.model_copy(update={"signature": signature})


def verify(record: Contract, verifier: Verifier, *, role: str | None = None) -> KeyInfo:
    """The key that signed ``record``; SignatureError with the reason when not acceptable."""
    _check_signable(record)
    key_id: str | None = getattr(record, "key_id", None)
    signature: str | None = getattr(record, "signature", None)
    if not key_id or not signature:
        raise SignatureError("unsigned")
    return verifier.verify(key_id, signing_bytes(record), signature, role=role)
