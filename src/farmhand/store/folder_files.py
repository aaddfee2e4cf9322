"""Files of the shared-folder store: names, what readers skip, atomic writes, the host-local
lock and an incremental scan of every writer's folders.

Layout under the root (see docs/stores/folder.md)::

    queues/<node>/000000000001.json     transactions that submit intents
    state/<node>/000000000002.json      claims, attempts, other changes, gates, limits
    receipts/<node>/...                 transactions that carry receipts
    deadletter/<node>/...               transactions that dead-letter intents
    state/<node>/node.json              which machine the node id belongs to (written once)
    state/<node>/executor.json          this node is the executor host (written once)
    executor_gate.json                  the gate rules the executor host obeys (its one writer)

A node's sequence numbers are shared by its four folders, so its files have one order.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farmhand.errors import StoreError

CATEGORIES = ("queues", "state", "receipts", "deadletter")
GATE_FILE = "executor_gate.json"
NODE_FILE = "node.json"
EXECUTOR_FILE = "executor.json"

_RECORD = re.compile(r"^(\d{12})\.json$")
_NODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: a folder whose listing is older than this is listed again even if its mtime is unchanged
FULL_SCAN_EVERY = 5.0
#: a folder modified this close to its listing may change again without a new mtime
_RACY_NS = 50_000_000
#: on file systems with whole-second mtimes (HFS+, FAT, ext3) the window is wider
_RACY_COARSE_NS = 2_500_000_000
_LOCK_TIMEOUT = 30.0


def record_name(seq: int) -> str:
    """The file name of a node's transaction number ``seq``."""
    return f"{seq:012d}.json"


def record_seq(name: str) -> int | None:
    """The sequence number a record file name carries, or None for anything else."""
    match = _RECORD.match(name)
    return int(match.group(1)) if match else None


def sync_debris(name: str) -> bool:
    """Files a sync tool (or a crashed writer) leaves behind that readers never parse:
    Syncthing's temporaries, conflict copies, hidden and ``.tmp`` files."""
    return (
        name.startswith((".", "~"))
        or name.endswith(".tmp")
        or ".sync-conflict-" in name
        or "~syncthing~" in name
    )


def node_problem(node: str) -> str | None:
    """Why ``node`` cannot be a node id (a path component of every file it writes), or None."""
    if not _NODE.match(node):
        return (
            "a node id is 1-64 characters of letters, digits, '.', '_' and '-', starting with "
            "a letter or digit"
        )
    if sync_debris(node):
        return "it looks like a sync tool's temporary or conflict name"
    return None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(folder: Path, name: str, data: bytes) -> Path:
    temp = folder / f".farmhand-{name}-{secrets.token_hex(4)}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return temp


def write_new(path: Path, data: bytes) -> None:
    """Create ``path`` atomically (temp name, fsync, rename, fsync the folder).

    Files are never rewritten: an existing ``path`` is an error, not replaced.
    """
    if path.exists():
        raise StoreError(f"refusing to overwrite {path}: records are never rewritten")
    temp = _write_temp(path.parent, path.name, data)
    try:
        os.rename(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    _fsync_dir(path.parent)


def replace(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically with ``data``: readers see the old or the new file whole."""
    temp = _write_temp(path.parent, path.name, data)
    os.replace(temp, path)
    _fsync_dir(path.parent)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None if it is missing, partial or not an object."""
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def dump(value: dict[str, Any]) -> bytes:
    """JSON bytes for a record file (floats written exactly, one line)."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8")


class HostLock:
    """Mutual exclusion between this host's processes (and connections) writing as one node.

    ``flock`` on the node's own ``state/<node>`` folder: no lock file, nothing extra to sync,
    and never taken by another machine (which writes only as its own node).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._fd: int | None = os.open(folder, os.O_RDONLY)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold the lock, polling every 0.1-2 ms for at most 30 s."""
        fd = self._fd
        if fd is None:
            raise StoreError(f"the folder store lock on {self.folder} is closed")
        deadline = time.monotonic() + _LOCK_TIMEOUT
        pause = 0.0001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"{self.folder} stayed locked by another process of this host for "
                        f"{_LOCK_TIMEOUT:.0f}s"
                    ) from None
                time.sleep(pause)
                pause = min(pause * 2, 0.002)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Release the file descriptor (and with it any lock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True, slots=True)
class Found:
    """A record file not read before."""

    category: str
    node: str
    seq: int
    path: Path


@dataclass(slots=True)
class _Listing:
    mtime_ns: int = -1
    listed_ns: int = 0
    names: set[str] = field(default_factory=set)


class Scanner:
    """Finds record files not read before, cheaply.

    Files are immutable, so a name once read is never read again. A folder is listed again
    only when its mtime moved (or could have moved unseen: see ``_RACY_NS``), and every folder
    at least every :data:`FULL_SCAN_EVERY` seconds in case a sync tool restored an mtime. The
    node's own folders are not listed at all between those: its next file can only be the
    next sequence number, which is probed for directly.
    """

    def __init__(self, root: Path, node: str) -> None:
        self.root = root
        self.node = node
        #: record files accepted so far: the change counter
        self.count = 0
        #: nodes whose ``state/<node>/executor.json`` exists
        self.executors: set[str] = set()
        self._listings: dict[Path, _Listing] = {}
        #: (node, seq) of every file read: a number is used once per node, whatever folder
        self._known: set[tuple[str, int]] = set()
        self._bad: dict[Path, tuple[int, int]] = {}
        self._own_max = 0
        self._full_at: float | None = None
        self._own_dirs = [root / category / node for category in CATEGORIES]

    @property
    def own_max(self) -> int:
        """The highest sequence number of this node's files read so far."""
        return self._own_max

    def known(self, node: str, seq: int) -> None:
        """Record a file as read (e.g. one this process just wrote)."""
        key = (node, seq)
        if key in self._known:
            return
        self._known.add(key)
        self.count += 1
        if node == self.node:
            self._own_max = max(self._own_max, seq)

    def scan(self, accept: Callable[[Found], bool]) -> None:
        """Offer every new record file to ``accept`` (True: it was read and is valid)."""
        full = self._full_at is None or time.monotonic() - self._full_at >= FULL_SCAN_EVERY
        if full:
            self._full_at = time.monotonic()
        for category in CATEGORIES:
            top = self.root / category
            nodes = self._list(top, full)
            for node in sorted(nodes):
                if node_problem(node) is not None:
                    continue
                if node == self.node and not full:
                    continue
                folder = top / node
                names = self._list(folder, full)
                if category == "state" and EXECUTOR_FILE in names:
                    self.executors.add(node)
                self._offer(category, node, folder, names, accept)
        if not full:
            self._probe_own(accept)

    def _offer(
        self,
        category: str,
        node: str,
        folder: Path,
        names: set[str],
        accept: Callable[[Found], bool],
    ) -> None:
        found = []
        for name in names:
            seq = record_seq(name)
            if seq is not None and (node, seq) not in self._known:
                found.append(Found(category, node, seq, folder / name))
        for item in sorted(found, key=lambda f: f.seq):
            self._try(item, accept)

    def _try(self, item: Found, accept: Callable[[Found], bool]) -> bool:
        try:
            stat = item.path.stat()
        except OSError:
            return False
        mark = (stat.st_size, stat.st_mtime_ns)
        if self._bad.get(item.path) == mark:
            return False
        if accept(item):
            self._bad.pop(item.path, None)
            self.known(item.node, item.seq)
            return True
        self._bad[item.path] = mark
        return False

    def _probe_own(self, accept: Callable[[Found], bool]) -> None:
        """Read the files other processes of this host wrote as this node since the last scan."""
        while True:
            seq = self._own_max + 1
            name = record_name(seq)
            for category, folder in zip(CATEGORIES, self._own_dirs, strict=True):
                path = folder / name
                if path.exists() and self._try(Found(category, self.node, seq, path), accept):
                    break
            else:
                return

    def _list(self, folder: Path, full: bool) -> set[str]:
        listing = self._listings.setdefault(folder, _Listing())
        try:
            mtime = folder.stat().st_mtime_ns
        except OSError:
            return set()
        window = _RACY_COARSE_NS if mtime % 1_000_000_000 == 0 else _RACY_NS
        fresh = mtime == listing.mtime_ns and listing.listed_ns - mtime > window
        if fresh and not full:
            return listing.names
        listed = time.time_ns()
        try:
            names = {n for n in os.listdir(folder) if not sync_debris(n)}
        except OSError:
            return set()
        listing.mtime_ns, listing.listed_ns, listing.names = mtime, listed, names
        return names
