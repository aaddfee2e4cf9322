"""Helpers for the end-to-end tests: the ``farmhand`` CLI in subprocesses, executor processes
that never outlive a test, a webhook sink that also reports arrivals, and store polling.

Everything here drives farmhand from the outside, as an operator or an agent would: real
processes, a real SQLite file, real signals, real HTTP over loopback.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

from farmhand.testing.sink import WebhookSink
from homes import prepare_home

T = TypeVar("T")

#: the installed ``farmhand`` console script of the interpreter running the tests
FARMHAND = str(Path(sys.executable).with_name("farmhand"))
#: states no executor will ever move an intent out of (``unknown`` waits for a human)
SETTLED = frozenset({"succeeded", "dead", "rejected", "expired", "cancelled", "unknown"})


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The caller's environment without FARMHAND_* variables, with FARMHAND_HOME=home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARMHAND_")}
    env["FARMHAND_HOME"] = str(home)
    env.update(extra)
    return env


def write_config(home: Path, text: str) -> None:
    """Write ``farmhand.toml`` in ``home`` (created if needed), with the test policy added
    unless ``text`` declares agents, and a coordinator key."""
    prepare_home(home, text)


def poll(what: str, check: Callable[[], T | None], timeout: float, interval: float = 0.05) -> T:
    """Call ``check`` until it returns something other than None/False; fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class Farmhand:
    """Runs ``farmhand`` commands in subprocesses with a fixed environment."""

    def __init__(self, env: Mapping[str, str], cwd: Path) -> None:
        self.env = dict(env)
        self.cwd = cwd

    @property
    def home(self) -> Path:
        return Path(self.env["FARMHAND_HOME"])

    @property
    def db(self) -> Path:
        """The default store file under FARMHAND_HOME."""
        return self.home / "farmhand.db"

    def run(
        self,
        *args: str,
        input: str | None = None,
        timeout: float = 60,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [FARMHAND, *args],
            env=dict(env) if env is not None else self.env,
            cwd=self.cwd,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def ok(self, *args: str, input: str | None = None, timeout: float = 60) -> str:
        """Run a command that must succeed; its stdout."""
        done = self.run(*args, input=input, timeout=timeout)
        assert done.returncode == 0, (
            f"farmhand {' '.join(args)} exited {done.returncode}: {done.stderr}"
        )
        return done.stdout

    def json(self, *args: str, input: str | None = None, timeout: float = 60) -> Any:
        """Run a command with ``--json`` that must succeed; its parsed stdout."""
        return json.loads(self.ok(*args, "--json", input=input, timeout=timeout))

    def intents(self, *filters: str) -> list[dict[str, Any]]:
        """Every intent (newest first), through ``farmhand list --json``."""
        return list(self.json("list", "--limit", "100000", *filters))

    def submit_batch(self, items: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Submit intents in one ``farmhand submit --batch -`` call; its JSON result."""
        lines = "".join(json.dumps(item) + "\n" for item in items)
        return list(self.json("submit", "--batch", "-", input=lines, timeout=120))


class ExecutorProcess:
    """One ``farmhand executor run`` process; its stdout and stderr go to files."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str], logs: Path) -> None:
        self.name = name
        self.args = args
        self.stdout_path = logs / f"{name}.stdout"
        self.stderr_path = logs / f"{name}.stderr"
        self._out: IO[bytes] = self.stdout_path.open("wb")
        self._err: IO[bytes] = self.stderr_path.open("wb")
        try:
            self.popen = subprocess.Popen(
                [FARMHAND, "executor", "run", *args],
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=self._out,
                stderr=self._err,
            )
        except BaseException:
            self._close_files()
            raise

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            os.kill(self.pid, signum)

    def kill(self) -> int:
        """SIGKILL and reap; the exit code."""
        self.signal(signal.SIGCONT)  # a stopped process dies on SIGKILL too, but be explicit
        self.signal(signal.SIGKILL)
        return self.wait(30)

    def ready(self) -> bool:
        """Whether it has started serving (its SIGTERM/SIGINT handlers are installed)."""
        executor_id = self.args[self.args.index("--id") + 1]
        return f"executor {executor_id} on " in self.stderr()

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM (graceful stop) once it is serving, and wait; the exit code.

        A process still importing has no handler yet and would simply die of the signal.
        """
        poll(f"{self.name} to start serving", lambda: self.ready() or not self.alive(), 30)
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float) -> int:
        code = self.popen.wait(timeout)
        self._close_files()
        return code

    def stopped(self) -> bool:
        """Whether the process is stopped by a signal (state T in /proc)."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return False
        return stat.rpartition(")")[2].split()[0] in ("T", "t")

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.stderr().splitlines()[-lines:])

    def _close_files(self) -> None:
        for handle in (self._out, self._err):
            with contextlib.suppress(OSError):
                handle.close()

    def cleanup(self) -> None:
        """Make sure the process is gone and reaped (teardown, also after a failure)."""
        if self.alive():
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                self.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(30)
        self._close_files()


class Executors:
    """Starts executor processes and guarantees none outlives the test."""

    def __init__(self, env: Mapping[str, str], logs: Path) -> None:
        self.env = dict(env)
        self.logs = logs
        self.started: list[ExecutorProcess] = []
        self._generation: dict[str, int] = {}

    def start(self, executor_id: str, *args: str) -> ExecutorProcess:
        """Start ``farmhand executor run --id executor_id *args``."""
        generation = self._generation[executor_id] = self._generation.get(executor_id, 0) + 1
        self.logs.mkdir(parents=True, exist_ok=True)
        proc = ExecutorProcess(
            f"{executor_id}.{generation}", ["--id", executor_id, *args], self.env, self.logs
        )
        self.started.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self.started:
            proc.cleanup()


class ArrivalSink(WebhookSink):
    """The webhook sink, plus a count of requests as they *arrive*.

    :meth:`WebhookSink.calls` lists a call only once it is answered (after ``/slow`` has
    slept); a test that must act while a call is in flight needs to know when it arrived.
    """

    def __init__(self) -> None:
        super().__init__()
        self._arrival = threading.Condition()
        self._arrived = 0

    def _arrive(self) -> int:
        seq = super()._arrive()
        with self._arrival:
            self._arrived += 1
            self._arrival.notify_all()
        return seq

    def arrived(self) -> int:
        with self._arrival:
            return self._arrived

    def wait_for_arrivals(self, n: int, timeout: float) -> bool:
        with self._arrival:
            return self._arrival.wait_for(lambda: self._arrived >= n, timeout)


@contextlib.contextmanager
def connect(db: Path) -> Iterator[sqlite3.Connection]:
    """A short-lived read connection to a store file (the executors keep writing)."""
    conn = sqlite3.connect(db, timeout=30)
    try:
        yield conn
    finally:
        conn.close()


def state_counts(
    db: Path, *, account: str | None = None, kind: str | None = None
) -> dict[str, int]:
    """Intents per state, read straight from the store file (cheap enough to poll often)."""
    where, params = ["1"], []
    for column, value in (("account", account), ("kind", kind)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    sql = f"SELECT state, count(*) FROM intents WHERE {' AND '.join(where)} GROUP BY state"
    with connect(db) as conn:
        return dict(conn.execute(sql, params).fetchall())


def write_locked(db: Path) -> bool:
    """Whether some process holds the store's write lock right now."""
    with connect(db) as conn:
        conn.execute("PRAGMA busy_timeout = 0")
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                return True
            raise
        conn.execute("ROLLBACK")
        return False


def freeze(proc: ExecutorProcess, db: Path, attempts: int = 200) -> None:
    """SIGSTOP ``proc`` at a moment it does not hold the store's write lock.

    A process stopped inside a write transaction would block every other writer until it
    is continued; that is SQLite's nature, not what a fencing test is about.
    """
    for _ in range(attempts):
        proc.signal(signal.SIGSTOP)
        poll(f"{proc.name} to stop", proc.stopped, timeout=5, interval=0.001)
        if not write_locked(db):
            return
        proc.signal(signal.SIGCONT)
        time.sleep(0.002)  # let it commit, then try again
    raise AssertionError(f"{proc.name} held the store's write lock at every try")


def stderr_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def window_excess(times: Sequence[float], rate: float, burst: int) -> tuple[float, int, float]:
    """Over every window ``[t_i, t_j]`` of sorted event times: the largest ``events -
    (burst + rate * span)`` (what a limit of ``rate``/s, bursts of ``burst``, would allow),
    with that window's number of events and span."""
    worst = (float("-inf"), 0, 0.0)
    for i, start in enumerate(times):
        for j in range(i, len(times)):
            span = times[j] - start
            excess = (j - i + 1) - (burst + rate * span)
            if excess > worst[0]:
                worst = (excess, j - i + 1, span)
    return worst
