"""Throw-away PostgreSQL and Redis servers on loopback, for tests and benchmarks.

Each server lives in a temporary directory, listens on a free loopback port and is stopped
(and its directory removed) when the context manager exits. They use Debian's
``postgresql`` and ``redis-server`` binaries; :func:`find_postgres_bin` and
:func:`find_redis_server` say whether they are installed.

PostgreSQL refuses to run as root, so as root its commands run as the ``postgres`` system
user (which Debian's package creates) through ``runuser``.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

_START_TIMEOUT = 60.0


class ServerUnavailable(RuntimeError):
    """The server's binaries are not installed here, or it would not start."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_postgres_bin() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl`` (newest Debian version first)."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parent.parent.name),
        reverse=True,
    )
    return Path(candidates[0]).parent if candidates else None


def find_redis_server() -> Path | None:
    """The ``redis-server`` binary, if installed."""
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    return Path(found) if found else None


def _wait_for_port(port: int, proc: subprocess.Popen[bytes] | None, what: str) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerUnavailable(f"{what} exited with code {proc.returncode} while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise ServerUnavailable(f"{what} did not listen on 127.0.0.1:{port} within {_START_TIMEOUT}s")


class _Server(ABC):
    """Started on entering a ``with`` block, stopped (and its directory removed) on leaving."""

    @abstractmethod
    def start(self) -> Self:
        """Start the server; returns ``self``."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the server and remove its directory."""

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class LocalPostgres(_Server):
    """A PostgreSQL cluster in a temporary directory, on a free loopback port.

    ``durable=False`` (the default, for tests) turns off fsync: a test never survives a
    power cut, and commits stay fast on a shared disk. Benchmarks pass ``durable=True``.
    """

    def __init__(self, *, durable: bool = False, settings: Sequence[str] = ()) -> None:
        bindir = find_postgres_bin()
        if bindir is None:
            raise ServerUnavailable(
                "PostgreSQL is not installed (no initdb); install Debian's postgresql package"
            )
        self._bin = bindir
        self._durable = durable
        self._settings = list(settings)
        self._root = Path(tempfile.mkdtemp(prefix="farmhand-pg-"))
        self.port = free_port()
        self.user = "postgres"
        self.url = f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"

    def _as_owner(self, *args: str) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *args]
        return list(args)

    def start(self) -> Self:
        """Initialise the cluster and start the server; returns ``self``."""
        data = self._root / "data"
        if os.geteuid() == 0:
            shutil.chown(self._root, "postgres")
        subprocess.run(
            self._as_owner(
                str(self._bin / "initdb"),
                "-D",
                str(data),
                "-U",
                self.user,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ),
            check=True,
            capture_output=True,
        )
        options = [
            "-c listen_addresses=127.0.0.1",
            f"-c port={self.port}",
            f"-c unix_socket_directories={self._root}",
            "-c max_connections=200",
            "-c shared_buffers=128MB",
        ]
        if not self._durable:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        options += [f"-c {s}" for s in self._settings]
        result = subprocess.run(
            self._as_owner(
                str(self._bin / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(self._root / "server.log"),
                "-o",
                " ".join(options),
                "-w",
                "-t",
                str(int(_START_TIMEOUT)),
                "start",
            ),
            capture_output=True,
            check=False,
        )
        if result.returncode != 0:
            log = (self._root / "server.log").read_text(errors="replace")[-2000:]
            raise ServerUnavailable(f"PostgreSQL did not start: {log}")
        _wait_for_port(self.port, None, "PostgreSQL")
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its directory."""
        data = self._root / "data"
        if (data / "postmaster.pid").exists():
            subprocess.run(
                self._as_owner(str(self._bin / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"),
                capture_output=True,
                check=False,
            )
        shutil.rmtree(self._root, ignore_errors=True)


class LocalRedis(_Server):
    """A redis-server in a temporary directory, on a free loopback port.

    ``appendonly=True`` runs it the way farmhand's docs ask for (AOF, fsync every second).
    """

    def __init__(self, *, appendonly: bool = True, appendfsync: str = "everysec") -> None:
        binary = find_redis_server()
        if binary is None:
            raise ServerUnavailable(
                "Redis is not installed (no redis-server); install Debian's redis-server package"
            )
        self._binary = binary
        self._root = Path(tempfile.mkdtemp(prefix="farmhand-redis-"))
        self._appendonly = appendonly
        self._appendfsync = appendfsync
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        """Start the server; returns ``self``."""
        self._proc = subprocess.Popen(
            [
                str(self._binary),
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(self._root),
                "--save",
                "",
                "--appendonly",
                "yes" if self._appendonly else "no",
                "--appendfsync",
                self._appendfsync,
                "--daemonize",
                "no",
                "--logfile",
                str(self._root / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for_port(self.port, self._proc, "redis-server")
        return self

    def stop(self) -> None:
        """Stop the server and remove its directory."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self._root, ignore_errors=True)
