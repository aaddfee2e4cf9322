"""A throw-away Radicale CalDAV server on loopback, for tests and demos of ``calendar.put``.

Radicale (the ``radicale`` package, in the ``test`` extra) runs as a subprocess of this
interpreter in a temporary directory with htpasswd authentication, and is stopped and its
directory removed when the context manager exits::

    with LocalRadicale({"alice": "s3cret"}) as server:
        url = server.make_calendar("alice", "work")   # MKCALENDAR; returns the collection URL
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from farmhand.testing.servers import ServerUnavailable, free_port

_START_TIMEOUT = 30.0


class LocalRadicale:
    """Radicale on 127.0.0.1 with the given users (name -> password, stored in plain text)."""

    def __init__(self, users: Mapping[str, str] | None = None) -> None:
        self.users = dict(users or {"alice": "alice-password"})
        self.port = 0
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The server's base URL, e.g. ``http://127.0.0.1:5232``."""
        if self._proc is None:
            raise RuntimeError("LocalRadicale is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        """What the server wrote to stderr so far."""
        if self._dir is None:
            return ""
        path = self._dir / "radicale.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def start(self) -> LocalRadicale:
        """Write the config and the htpasswd file, start Radicale, wait until it listens."""
        if importlib.util.find_spec("radicale") is None:
            raise ServerUnavailable("the radicale package is not installed (pip install radicale)")
        self._dir = Path(tempfile.mkdtemp(prefix="farmhand-radicale-"))
        users = self._dir / "users"
        users.write_text("".join(f"{u}:{p}\n" for u, p in self.users.items()), encoding="utf-8")
        self.port = free_port()
        config = self._dir / "config"
        config.write_text(
            "[server]\n"
            f"hosts = 127.0.0.1:{self.port}\n"
            "[auth]\n"
            "type = htpasswd\n"
            f"htpasswd_filename = {users}\n"
            "htpasswd_encryption = plain\n"
            "[storage]\n"
            f"filesystem_folder = {self._dir / 'collections'}\n"
            "[rights]\n"
            "type = owner_only\n"
            "[logging]\n"
            "level = warning\n",
            encoding="utf-8",
        )
        with (self._dir / "radicale.log").open("wb") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "radicale", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                log_text = self.log
                self.stop()
                raise ServerUnavailable(f"radicale exited at start: {log_text[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise ServerUnavailable(f"radicale did not listen on port {self.port} in time")

    def make_calendar(self, user: str, name: str) -> str:
        """Create calendar ``name`` of ``user`` (MKCALENDAR); returns its collection URL."""
        import httpx

        url = f"{self.url}/{user}/{name}/"
        response = httpx.request("MKCALENDAR", url, auth=(user, self.users[user]), timeout=10.0)
        if response.status_code != 201:
            raise RuntimeError(f"MKCALENDAR {url}: HTTP {response.status_code} {response.text}")
        return url

    def stop(self) -> None:
        """Stop the server and remove its directory. Safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        folder, self._dir = self._dir, None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def __enter__(self) -> LocalRadicale:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
