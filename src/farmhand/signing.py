"""Ed25519 signatures over contracts: who wrote a record, and that nobody changed it since.

A signed contract carries ``key_id`` and ``signature``. The signature covers the canonical
JSON of every other field, ``key_id`` included, so neither the record nor the key it names
can be changed without the verifier noticing.

Records signed together (:func:`sign_many`) share one Ed25519 signature over the root of a
Merkle tree of their signing bytes, and each carries its inclusion proof in ``signature``::

    b1.<base64 root signature>.<index>.<leaf count>.<base64 sibling hashes, leaf to root>

Leaves are ``sha256(0x00 || signing bytes)`` and inner nodes ``sha256(0x01 || left ||
right)`` (RFC 6962's domain separation); the last node of a level with an odd number of
nodes is promoted to the next level unchanged. What the key signs is
``farmhand/batch/v1 0x00 || leaf count (4 bytes, big-endian) || root``: never canonical JSON,
which starts with ``{``, so a batch signature cannot pass for an ordinary one nor the
other way round. The count is signed because the proof alone does not fix it (a proof of
leaf 0 of 4 also passes for leaf 0 of 3), and with the count fixed the index fixes the path.
Forging a record then needs a forged signature or a sha256 collision: the same security as
one signature per record. A :class:`Verifier` checks each root signature once and then
only hashes.

The crypto library (PyNaCl) is imported only inside the functions that sign or verify:
an agent calls the CLI once per action, and most commands never touch a signature.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable, Sequence
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

#: How a batch signature starts (base64 has no dot, so no ordinary signature does).
BATCH_PREFIX = "b1."
#: Most records under one batch signature; :func:`sign_many` signs more in several batches.
MAX_BATCH = 1 << 20
#: Root signatures a :class:`Verifier` remembers; it forgets them all when it has this many.
ROOT_CACHE_SIZE = 4096
#: Places in one batch's tree a :class:`Verifier` remembers as proven (a few per record).
NODE_CACHE_SIZE = 65_536

_BATCH_STATEMENT = b"farmhand/batch/v1\x00"
_LEAF = b"\x00"
_NODE = b"\x01"
_HASH_BYTES = 32
_NUMBER = re.compile(r"0|[1-9][0-9]{0,6}")
# more than the longest batch signature sign_many writes (964 characters: 20 hashes)
_MAX_BATCH_CHARS = 1024


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


def _b64_exact(text: str, size: int) -> bytes | None:
    """Like :func:`b64decode`, and only for the one text :func:`b64encode` writes."""
    try:
        data = binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        return None
    if len(data) != size or binascii.b2a_base64(data, newline=False).decode() != text:
        return None
    return data


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
        # (key id, root signature, signed statement) -> whether the signature is valid
        self._roots: dict[tuple[str, bytes, bytes], bool] = {}
        #: per batch (key, root signature, leaf count): what paths that led to its verified
        #: root passed through, by place in the tree
        self._nodes: dict[tuple[str, bytes, int], dict[Place, Proven]] = {}

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
        ``signature`` is an ordinary signature of ``data`` or a batch signature with the
        proof that ``data`` is one of the batch's leaves (see the module's description).
        The key's revocation and role are checked on every call; a batch's root signature
        is checked once per verifier.
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
        if signature.startswith(BATCH_PREFIX):
            self._verify_batch(info, data, signature)
            return info
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

    def _verify_batch(self, info: KeyInfo, data: bytes, signature: str) -> None:
        root_signature, index, count, proof = _parse_batch(signature)
        batch = (info.key_id, root_signature, count)
        known = self._nodes.get(batch, {})
        path, proven = _climb(_leaf_hash(data), index, count, proof, known)
        if proven:
            self._prove(batch, path)  # they lead to a proven node: proven too
            return
        statement = _statement(count, path[-1][1][0])
        cached = (info.key_id, root_signature, statement)
        valid = self._roots.get(cached)
        if valid is None:
            from nacl.exceptions import BadSignatureError

            try:
                self._verify_key(info).verify(statement, root_signature)
                valid = True
            except BadSignatureError:
                valid = False
            if len(self._roots) >= ROOT_CACHE_SIZE:
                self._roots.clear()
            self._roots[cached] = valid
        if not valid:
            raise SignatureError(
                "signature does not match: the record or its batch proof was changed after signing"
            )
        self._prove(batch, path)

    def _prove(self, batch: tuple[str, bytes, int], path: list[tuple[Place, Proven]]) -> None:
        known = self._nodes.get(batch)
        if known is None or len(known) >= NODE_CACHE_SIZE:
            if len(self._nodes) >= ROOT_CACHE_SIZE:
                self._nodes.clear()
            known = self._nodes[batch] = {}
        known.update(path)

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


def sign_many(records: Sequence[C], signer: Signer) -> list[C]:
    """Copies of ``records``, in order, with ``key_id`` set to the signer's and signed together.

    One Ed25519 signature covers up to :data:`MAX_BATCH` records; each copy carries it with
    its own inclusion proof, and verifies on its own like a record signed by :func:`sign`.
    A single record (also the last one of more than :data:`MAX_BATCH`) gets an ordinary
    signature.
    """
    for record in records:
        _check_signable(record)
    unsigned = [r.model_copy(update={"key_id": signer.key_id, "signature": None}) for r in records]
    signed: list[C] = []
    for start in range(0, len(unsigned), MAX_BATCH):
        signed += _sign_batch(unsigned[start : start + MAX_BATCH], signer)
    return signed


def _sign_batch(unsigned: list[C], signer: Signer) -> list[C]:
    if len(unsigned) == 1:
        (record,) = unsigned
        return [record.model_copy(update={"signature": signer.sign(signing_bytes(record))})]
    count = len(unsigned)
    levels = [[_leaf_hash(signing_bytes(record)) for record in unsigned]]
    while len(levels[-1]) > 1:
        level = levels[-1]
        up = [_node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            up.append(level[-1])
        levels.append(up)
    head = f"{BATCH_PREFIX}{signer.sign(_statement(count, levels[-1][0]))}."
    signed: list[C] = []
    for index, record in enumerate(unsigned):
        path: list[bytes] = []
        at = index
        for level in levels[:-1]:
            if at ^ 1 < len(level):
                path.append(level[at ^ 1])
            at >>= 1
        proof = f"{head}{index}.{count}.{b64encode(b''.join(path))}"
        signed.append(record.model_copy(update={"signature": proof}))
    return signed


def _leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(_LEAF + data).digest()


def _node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_NODE + left + right).digest()


def _statement(count: int, root: bytes) -> bytes:
    """What a batch's key signs: never canonical JSON, so never an ordinary record."""
    return _BATCH_STATEMENT + count.to_bytes(4, "big") + root


def _path_length(index: int, count: int) -> int:
    """Sibling hashes on the path of leaf ``index`` of ``count`` up to the root."""
    length = 0
    while count > 1:
        if index ^ 1 < count:
            length += 1
        index >>= 1
        count = (count + 1) >> 1
    return length


#: a node's place in a batch's tree, ``(level, position)``, and what was proven there:
#: the node and the rest of the proof above it, which lead to the verified root
Place = tuple[int, int]
Proven = tuple[bytes, bytes]


def _climb(
    leaf: bytes, index: int, count: int, proof: bytes, known: dict[Place, Proven]
) -> tuple[list[tuple[Place, Proven]], bool]:
    """The nodes from ``leaf`` up the path that ``proof`` (already of the right length)
    gives, each with its place and the rest of the proof above it, up to the root; and
    whether the climb stopped early at a place where ``known`` holds the same node with the
    same rest of the proof (which led to a verified root: the outcome is the same as that
    of the whole climb, without its hashes)."""
    node, level, offset = leaf, 0, 0
    path = [((0, index), (leaf, proof))]
    if known.get((0, index)) == path[0][1]:
        return path, True
    while count > 1:
        if index ^ 1 < count:
            sibling = proof[offset : offset + _HASH_BYTES]
            offset += _HASH_BYTES
            node = _node_hash(sibling, node) if index & 1 else _node_hash(node, sibling)
        index >>= 1
        count = (count + 1) >> 1
        level += 1
        step = ((level, index), (node, proof[offset:]))
        path.append(step)
        if known.get(step[0]) == step[1]:
            return path, True
    return path, False


def _malformed(why: str) -> SignatureError:
    return SignatureError(f"batch signature is malformed: {why}")


def _parse_batch(signature: str) -> tuple[bytes, int, int, bytes]:
    """Root signature, index, leaf count and proof of a batch signature, strictly."""
    parts = signature.split(".") if len(signature) <= _MAX_BATCH_CHARS else []
    if len(parts) != 5:
        raise _malformed("expected b1.SIGNATURE.INDEX.COUNT.PROOF")
    _, root_text, index_text, count_text, proof_text = parts
    root_signature = _b64_exact(root_text, SIGNATURE_BYTES)
    if root_signature is None:
        raise _malformed("its root signature is not a base64 Ed25519 signature")
    if not (_NUMBER.fullmatch(index_text) and _NUMBER.fullmatch(count_text)):
        raise _malformed("index and leaf count must be decimal numbers")
    index, count = int(index_text), int(count_text)
    if not 2 <= count <= MAX_BATCH:
        raise _malformed(f"leaf count {count} is not between 2 and {MAX_BATCH}")
    if index >= count:
        raise _malformed(f"index {index} is not below the leaf count {count}")
    length = _path_length(index, count)
    proof = _b64_exact(proof_text, length * _HASH_BYTES)
    if proof is None:
        raise _malformed(f"leaf {index} of {count} needs a proof of {length} base64 sha256 hashes")
    return root_signature, index, count, proof


def verify(record: Contract, verifier: Verifier, *, role: str | None = None) -> KeyInfo:
    """The key that signed ``record``; SignatureError with the reason when not acceptable."""
    _check_signable(record)
    key_id: str | None = getattr(record, "key_id", None)
    signature: str | None = getattr(record, "signature", None)
    if not key_id or not signature:
        raise SignatureError("unsigned")
    return verifier.verify(key_id, signing_bytes(record), signature, role=role)
