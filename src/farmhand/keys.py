"""The keyring: Ed25519 keys on disk, with rotation and revocation.

Layout under the keyring directory (usually ``$FARMHAND_HOME/keys``)::

    private/<key_id>.key    base64 seed, mode 0600, directory 0700 (signing hosts only)
    public/<key_id>.json    key id, owner, role, public key, created_at
    revoked/<key_id>.json   who revoked the key, when and why

Every file is written once (temp name, fsync, link into place) and never rewritten. An
executor host needs only ``public/`` and ``revoked/``. Rotation is generating a new key:
every non-revoked key stays trusted and the signer uses the newest. A revoked key fails
verification at once, also for records signed before it was revoked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from farmhand.errors import FarmhandError, InvalidInput, NotFound
from farmhand.signing import (
    PUBLIC_KEY_BYTES,
    SEED_BYTES,
    KeyMissing,
    Signer,
    Verifier,
    b64decode,
    b64encode,
    public_key_of,
)

if TYPE_CHECKING:
    from farmhand.clock import Clock

ROLES = ("coordinator", "approver")
_OWNER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}-[0-9a-f]{8}")
_PRIVATE_MODE = 0o600
_PRIVATE_DIR_MODE = 0o700


@dataclass(frozen=True)
class KeyInfo:
    """A public key the keyring knows, with its revocation when it was revoked."""

    key_id: str
    owner: str
    role: str
    public_key: str
    created_at: datetime
    revoked_at: datetime | None = None
    revoked_by: str | None = None
    revoke_reason: str | None = None

    @property
    def revoked(self) -> bool:
        """Whether the key was revoked."""
        return self.revoked_at is not None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data (times as ISO 8601 UTC)."""
        return {
            "key_id": self.key_id,
            "owner": self.owner,
            "role": self.role,
            "public_key": self.public_key,
            "created_at": _iso(self.created_at),
            "revoked_at": _iso(self.revoked_at) if self.revoked_at else None,
            "revoked_by": self.revoked_by,
            "revoke_reason": self.revoke_reason,
        }


def check_owner(owner: str) -> str:
    """Validate a key owner's name (``coordinator``, ``alice``...)."""
    if not isinstance(owner, str) or not _OWNER.fullmatch(owner):
        raise InvalidInput(
            f"key owner {owner!r} is not a valid name: use 1-64 letters, digits, '_', '.', '@' "
            "or '-', starting with a letter or digit"
        )
    return owner


def check_role(role: str) -> str:
    """Validate a key role."""
    if role not in ROLES:
        raise InvalidInput(f"key role {role!r} is not one of: {', '.join(ROLES)}")
    return role


def key_id_for(owner: str, public_key: bytes) -> str:
    """``<owner>-<first 8 hex of sha256(public key)>``."""
    return f"{owner}-{hashlib.sha256(public_key).hexdigest()[:8]}"


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _parse_time(value: Any, path: Path, name: str) -> datetime:
    if not isinstance(value, str):
        raise _corrupt(path, f"{name} is missing")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _corrupt(path, f"{name} {value!r} is not an ISO 8601 time") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _corrupt(path: Path, why: str) -> FarmhandError:
    return FarmhandError(f"key file {path} is damaged ({why}); restore it from a backup")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise FarmhandError(f"cannot read key file {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise _corrupt(path, f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise _corrupt(path, "not a JSON object")
    return data


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory
        pass
    finally:
        os.close(fd)


def _write_once(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` durably and atomically; FileExistsError if it already exists."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            os.fchmod(fd, mode)  # exactly this mode, whatever the umask
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if the file exists: never rewritten
        except FileExistsError:
            raise
        except OSError:  # a filesystem without hard links
            if path.exists():
                raise FileExistsError(path) from None
            os.rename(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(path.parent)


class Keyring:
    """Keys on disk under one directory (usually ``settings.home / "keys"``)."""

    def __init__(self, directory: Path, clock: Clock | None = None) -> None:
        self.directory = Path(directory)
        self._clock = clock
        #: the public keys and revocations as last read, and the files they were read from
        self._read: tuple[tuple[object, ...], list[KeyInfo]] | None = None

    @property
    def private_dir(self) -> Path:
        return self.directory / "private"

    @property
    def public_dir(self) -> Path:
        return self.directory / "public"

    @property
    def revoked_dir(self) -> Path:
        return self.directory / "revoked"

    def private_path(self, key_id: str) -> Path:
        """Where the private key of ``key_id`` lives (on a signing host)."""
        return self.private_dir / f"{key_id}.key"

    def _now(self) -> datetime:
        if self._clock is not None:
            return datetime.fromtimestamp(self._clock.now(), UTC)
        return datetime.now(UTC)

    # -- writing -----------------------------------------------------------------------

    def generate(self, owner: str, role: str = "coordinator") -> KeyInfo:
        """Create a new key for ``owner``; it becomes the owner's signing key (rotation)."""
        check_owner(owner)
        check_role(role)
        self.public_dir.mkdir(parents=True, exist_ok=True)
        self.private_dir.mkdir(mode=_PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        self.private_dir.chmod(_PRIVATE_DIR_MODE)
        existing = self.keys()
        created = self._now()
        # the newest key signs: keep creation times of one owner strictly increasing
        newest = max((k.created_at for k in existing if k.owner == owner), default=None)
        if newest is not None and created <= newest:
            created = newest + timedelta(microseconds=1)
        known = {k.key_id for k in existing}
        while True:
            seed = os.urandom(SEED_BYTES)
            public = public_key_of(seed)
            key_id = key_id_for(owner, public)
            if key_id in known:  # 1 in 2**32 per existing key of this owner
                continue
            try:
                _write_once(
                    self.private_path(key_id), (b64encode(seed) + "\n").encode(), _PRIVATE_MODE
                )
            except FileExistsError:
                continue
            break
        info = KeyInfo(
            key_id=key_id,
            owner=owner,
            role=role,
            public_key=b64encode(public),
            created_at=created,
        )
        body = {
            "key_id": key_id,
            "owner": owner,
            "role": role,
            "algorithm": "ed25519",
            "public_key": info.public_key,
            "created_at": _iso(created),
        }
        _write_once(self.public_dir / f"{key_id}.json", _dump(body), 0o644)
        return info

    def revoke(self, key_id: str, actor: str, reason: str | None = None) -> KeyInfo:
        """Revoke ``key_id`` for good. Revoking a revoked key returns its first revocation."""
        info = self._find(key_id)
        if info.revoked:
            return info
        self.revoked_dir.mkdir(parents=True, exist_ok=True)
        at = self._now()
        body = {
            "key_id": key_id,
            "revoked_at": _iso(at),
            "revoked_by": actor,
            "reason": reason,
        }
        try:
            _write_once(self.revoked_dir / f"{key_id}.json", _dump(body), 0o644)
        except FileExistsError:  # revoked meanwhile by someone else: theirs stands
            return self._find(key_id)
        return dataclasses.replace(info, revoked_at=at, revoked_by=actor, revoke_reason=reason)

    # -- reading -----------------------------------------------------------------------

    def keys(self) -> list[KeyInfo]:
        """Every public key known here, revoked ones included, oldest first."""
        revocations = self._revocations()
        found = []
        for path in _json_files(self.public_dir):
            info = self._read_public(path)
            revocation = revocations.get(info.key_id)
            if revocation is not None:
                at, by, why = revocation
                info = dataclasses.replace(info, revoked_at=at, revoked_by=by, revoke_reason=why)
            found.append(info)
        found.sort(key=lambda k: (k.created_at, k.key_id))
        return found

    def has_private(self, key_id: str) -> bool:
        """Whether this host holds the private key of ``key_id``."""
        return self.private_path(key_id).exists()

    def has_signer(self, owner: str) -> bool:
        """Whether ``owner`` has a non-revoked key with its private key on this host.

        True also when that key's file is unusable (e.g. too open): :meth:`signer` then
        says what is wrong instead of the caller going on unsigned.
        """
        return self._signing_key(owner) is not None

    def signer(self, owner: str) -> Signer:
        """The newest non-revoked private key of ``owner``; KeyMissing when there is none."""
        info = self._signing_key(owner)
        if info is None:
            revoked = any(k.owner == owner and k.revoked for k in self.keys())
            what = (
                f"every key of owner {owner} in {self.directory} is revoked"
                if revoked
                else f"no private key for owner {owner} in {self.directory}"
            )
            raise KeyMissing(f"{what}; run `farmhand keys generate --owner {owner}`")
        path = self.private_path(info.key_id)
        seed = _read_private(path, owner)
        public = b64decode(info.public_key, PUBLIC_KEY_BYTES) or b""
        return Signer(info.key_id, owner, seed, public, source=str(path))

    def verifier(self) -> Verifier:
        """Every trusted public key and every revocation as they are now, kept.

        The files are read again only when one was added, removed or changed since the last
        call (their names, sizes, times and inodes tell): an executor asks for a verifier
        per batch, so that a key revoked a moment ago already fails, and reading and
        parsing every key file cost more than the rest of a one-intent batch.
        """
        files = self._files()
        if self._read is None or self._read[0] != files:
            self._read = (files, self.keys())
        return Verifier(self._read[1])

    # -- helpers -----------------------------------------------------------------------

    def _files(self) -> tuple[object, ...]:
        """What identifies the current version of every public key and revocation file."""
        found: list[object] = []
        for directory in (self.public_dir, self.revoked_dir):
            try:
                with os.scandir(directory) as entries:
                    for entry in entries:
                        info = entry.stat()
                        found.append(
                            (
                                directory.name,
                                entry.name,
                                info.st_mtime_ns,
                                info.st_size,
                                info.st_ino,
                            )
                        )
            except FileNotFoundError:
                found.append((directory.name, None))
            except OSError as exc:
                raise FarmhandError(f"cannot read key directory {directory}: {exc}") from exc
        return tuple(sorted(found, key=repr))

    def _signing_key(self, owner: str) -> KeyInfo | None:
        check_owner(owner)
        usable = [
            k
            for k in self.keys()
            if k.owner == owner and not k.revoked and self.has_private(k.key_id)
        ]
        return usable[-1] if usable else None

    def _find(self, key_id: str) -> KeyInfo:
        if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
            raise InvalidInput(
                f"{key_id!r} is not a key id (OWNER-xxxxxxxx); see `farmhand keys list`"
            )
        for info in self.keys():
            if info.key_id == key_id:
                return info
        raise NotFound(f"no key {key_id} in {self.directory}; see `farmhand keys list`")

    def _read_public(self, path: Path) -> KeyInfo:
        data = _read_json(path)
        key_id, owner, role, public = (
            data.get(name) for name in ("key_id", "owner", "role", "public_key")
        )
        if not isinstance(key_id, str) or key_id != path.stem:
            raise _corrupt(path, f"key_id {key_id!r} does not match the file name")
        if not isinstance(owner, str) or not _OWNER.fullmatch(owner):
            raise _corrupt(path, f"owner {owner!r} is not a valid name")
        if role not in ROLES:
            raise _corrupt(path, f"role {role!r} is not one of: {', '.join(ROLES)}")
        raw = b64decode(public, PUBLIC_KEY_BYTES) if isinstance(public, str) else None
        if raw is None or not isinstance(public, str):
            raise _corrupt(path, "public_key is not a base64 Ed25519 key")
        if key_id_for(owner, raw) != key_id:
            raise _corrupt(path, "key_id does not match owner and public key")
        return KeyInfo(
            key_id=key_id,
            owner=owner,
            role=str(role),
            public_key=public,
            created_at=_parse_time(data.get("created_at"), path, "created_at"),
        )

    def _revocations(self) -> dict[str, tuple[datetime, str | None, str | None]]:
        found = {}
        for path in _json_files(self.revoked_dir):
            data = _read_json(path)
            if data.get("key_id") != path.stem:
                raise _corrupt(path, "key_id does not match the file name")
            by, why = data.get("revoked_by"), data.get("reason")
            found[path.stem] = (
                _parse_time(data.get("revoked_at"), path, "revoked_at"),
                by if isinstance(by, str) else None,
                why if isinstance(why, str) else None,
            )
        return found


def _dump(body: dict[str, Any]) -> bytes:
    return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _json_files(directory: Path) -> list[Path]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise FarmhandError(f"cannot read key directory {directory}: {exc}") from exc
    return [directory / n for n in sorted(names) if n.endswith(".json") and not n.startswith(".")]


def _read_private(path: Path, owner: str) -> bytes:
    """The seed in ``path``, refused when the file is open to anyone but its owner."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise KeyMissing(
            f"cannot read private key {path}: {exc.strerror or exc}; "
            f"run `farmhand keys generate --owner {owner}`"
        ) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyMissing(f"private key {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & ~_PRIVATE_MODE:
            raise KeyMissing(
                f"private key {path} has mode {mode:04o}, wider than 0600: anyone with access "
                f"to this host could sign as {owner}; run `chmod 600 {path}`"
            )
        text = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        seed = b64decode(text.decode("ascii").strip(), SEED_BYTES)
    except UnicodeDecodeError:
        seed = None
    if seed is None:
        raise KeyMissing(
            f"private key {path} is not a base64 Ed25519 seed; restore it from a backup or "
            f"run `farmhand keys generate --owner {owner}`"
        )
    return seed
