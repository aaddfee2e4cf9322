"""One node's side of a folder store: who it is, what it has read, how it appends.

A :class:`Journal` is used from its store's one I/O thread only. Reads need no lock (files
appear whole, by rename, and never change); every read-modify-write holds the node's
host-local lock, under which the view is first brought up to date, so two processes (or
two connections) of one host writing as the same node never interleave.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from farmhand.clock import Clock
from farmhand.errors import InvalidInput, StoreError
from farmhand.store.folder_files import (
    CATEGORIES,
    EXECUTOR_FILE,
    GATE_FILE,
    NODE_FILE,
    Found,
    HostLock,
    Scanner,
    dump,
    node_problem,
    read_json,
    record_name,
    replace,
    write_new,
)
from farmhand.store.folder_records import decode_file, encode_file
from farmhand.store.folder_view import Batch, View

log = logging.getLogger("farmhand.store.folder")

NODE_ENV = "FARMHAND_NODE"


def parse_url(url: str) -> tuple[Path, str | None]:
    """The root folder and the node id (if given) of a ``folder:`` URL."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "folder":
        raise InvalidInput(f"store URL {url!r} is not a folder: URL")
    if parts.netloc not in ("", "localhost"):
        raise InvalidInput(
            f"store URL {url!r} names host {parts.netloc!r}; a folder store is a local folder "
            "(synced by a tool such as Syncthing): use folder:///absolute/path"
        )
    if not parts.path.startswith("/"):
        raise InvalidInput(f"store URL {url!r} has no absolute path; use folder:///absolute/path")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"node"})
    if unknown:
        raise InvalidInput(
            f"store URL {url!r} has unknown parameter {unknown[0]!r}; the only one is node=NAME"
        )
    node = query["node"][-1] if "node" in query else None
    return Path(parts.path), node


def node_id(given: str | None, environ: Mapping[str, str] | None = None) -> str:
    """This machine's node id: from the URL, else ``FARMHAND_NODE``, else the host name."""
    env = os.environ if environ is None else environ
    if given is not None:
        node, source = given, "the store URL's node= parameter"
    elif env.get(NODE_ENV):
        node, source = env[NODE_ENV], NODE_ENV
    else:
        node, source = socket.gethostname(), "this host's name"
    problem = node_problem(node)
    if problem:
        raise InvalidInput(
            f"node id {node!r} (from {source}) cannot name this machine's files: {problem}; "
            f"set one with folder:///path?node=NAME or {NODE_ENV}=NAME"
        )
    return node


def machine_id() -> str:
    """A stable id of this machine, to notice one node id used on two machines."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            text = Path(path).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            continue
        if text:
            return text
    mac = uuid.getnode()
    # uuid.getnode() falls back to a random number (multicast bit set) when there is no MAC
    return socket.gethostname() if (mac >> 40) & 1 else f"{socket.gethostname()}/{mac:012x}"


class Journal:
    """This node's view of every writer's files, and its appends to its own."""

    def __init__(self, root: Path, node: str, clock: Clock) -> None:
        self.root = root
        self.node = node
        self.clock = clock
        self.view = View()
        self.scanner = Scanner(root, node)
        #: this node has written its executor marker: it is the executor host
        self.executor = False
        self._lock: HostLock | None = None
        self._gate_written: list[Any] | None = None

    def own(self, category: str) -> Path:
        """This node's folder of ``category``."""
        return self.root / category / self.node

    def open(self) -> None:
        """Create this node's folders, check its id is this machine's, read everything."""
        try:
            for category in CATEGORIES:
                self.own(category).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the folder store {self.root}: {exc.strerror}; check the path "
                "and its permissions"
            ) from exc
        self._lock = HostLock(self.own("state"))
        with self._lock.held():
            self._check_node_file()
            self.executor = (self.own("state") / EXECUTOR_FILE).exists()
        self.refresh()
        written = read_json(self.root / GATE_FILE)
        if written is not None and written.get("writer") == self.node:
            self._gate_written = written.get("rules")

    def _check_node_file(self) -> None:
        path = self.own("state") / NODE_FILE
        me = machine_id()
        if not path.exists():
            write_new(path, dump({"node": self.node, "machine": me, "host": socket.gethostname()}))
            return
        data = read_json(path)
        if data is None:
            raise StoreError(f"cannot read {path}; if this machine is node {self.node}, delete it")
        if data.get("machine") != me:
            raise StoreError(
                f"node id {self.node!r} of the folder store {self.root} belongs to another "
                f"machine ({data.get('host')}); give this one its own id with "
                f"folder://{self.root}?node=NAME or {NODE_ENV} (if it replaces that machine, "
                f"delete {path})"
            )

    def close(self) -> None:
        """Release the lock's file descriptor."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # -- reading ------------------------------------------------------------------------

    def _accept(self, found: Found) -> bool:
        data = read_json(found.path)
        decoded = decode_file(data, found.node, found.seq) if data is not None else None
        if decoded is None:
            log.warning("skipping %s: not a complete farmhand folder-store record", found.path)
            return False
        self.view.add(*decoded)
        return True

    def refresh(self) -> None:
        """Read the files that appeared since the last refresh."""
        self.scanner.scan(self._accept)
        self.view.settle()

    @property
    def count(self) -> int:
        """The number of record files read: moves whenever any writer commits."""
        return self.scanner.count

    # -- writing ------------------------------------------------------------------------

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold this node's host-local lock, with the view brought up to date under it."""
        if self._lock is None:
            raise StoreError(f"the folder store {self.root} is closed")
        with self._lock.held():
            self.refresh()
            yield

    def batch(self) -> Batch:
        """A new transaction; call with the lock held (its time is read now)."""
        return Batch(self.view, self.node, self.scanner.own_max + 1, self.clock.now())

    def commit(self, batch: Batch, category: str = "state") -> None:
        """Write ``batch`` (if it holds anything) as this node's next file, and read it."""
        if not batch.records:
            return
        body = encode_file(self.node, batch.seq, batch.lamport, batch.at, batch.records)
        write_new(self.own(category) / record_name(batch.seq), dump(body))
        self.scanner.known(self.node, batch.seq)
        self.view.add(batch.lamport, batch.records)
        self.view.settle()

    def check_executor(self, become: bool = False) -> None:
        """Refuse executor work if another node is the executor host; with ``become``,
        make this node the executor host. Call with the lock held."""
        others = sorted(self.scanner.executors - {self.node})
        if others:
            raise StoreError(
                f"the folder store {self.root} already has an executor host, node "
                f"{others[0]!r} (state/{others[0]}/{EXECUTOR_FILE}); a folder store runs "
                "executors on one host only: run more executors there, or use a "
                "postgresql:// or redis:// store for executors on several hosts"
            )
        if become and not self.executor:
            marker = self.own("state") / EXECUTOR_FILE
            if not marker.exists():
                info = {"node": self.node, "host": socket.gethostname(), "since": self.clock.now()}
                write_new(marker, dump(info))
            self.executor = True
            self.write_gate_file()

    def gate_file_stale(self) -> bool:
        """Whether this executor host's executor_gate.json lags the merged gate rules."""
        if not self.executor:
            return False
        return [r.model_dump(mode="json") for r in self.view.gates()] != self._gate_written

    def write_gate_file(self) -> None:
        """Mirror the merged gate rules into executor_gate.json if they changed (executor
        host only, lock held): the rules the executor obeys, for the brain to see."""
        rules: list[Any] = [r.model_dump(mode="json") for r in self.view.gates()]
        if not self.executor or rules == self._gate_written:
            return
        body = {"writer": self.node, "updated_at": self.clock.now(), "rules": rules}
        replace(self.root / GATE_FILE, dump(body))
        self._gate_written = rules
