"""The store conformance suite: every test in this folder runs once per backend.

``store_url`` names a fresh, empty store of each kind: a SQLite file and a shared folder in
the test's temporary directory, a new database on the session's PostgreSQL server and a new
key namespace on its Redis server. The run ends with the number of tests per backend.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backends import fresh_postgres_url, fresh_redis_url
from farmhand.clock import FakeClock
from farmhand.store import Store, open_store

BACKENDS = ("sqlite", "folder", "postgres", "redis")

_OUTCOMES: dict[str, Counter[str]] = {backend: Counter() for backend in BACKENDS}
_BACKEND_ID = re.compile(r"^tests/contract/.*\[(?:.*-)?(" + "|".join(BACKENDS) + r")(?:-.*)?\]$")


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a new, empty store of one backend."""
    backend: str = request.param
    if backend == "sqlite":
        return f"sqlite://{tmp_path}/farmhand.db"
    if backend == "folder":
        return f"folder://{tmp_path}/shared"
    if backend == "postgres":
        return fresh_postgres_url(request.getfixturevalue("postgres_server"))
    return fresh_redis_url(request.getfixturevalue("redis_server"))


@pytest.fixture
async def store(store_url: str, clock: FakeClock) -> AsyncIterator[Store]:
    """The store ``store_url`` names, on the fake clock."""
    opened = await open_store(store_url, clock)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def second(store_url: str, clock: FakeClock, store: Store) -> AsyncIterator[Store]:
    """A second, independent connection to the same store, on the same clock."""
    opened = await open_store(store_url, clock)
    try:
        yield opened
    finally:
        await opened.close()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    match = _BACKEND_ID.match(report.nodeid)
    if match is None:
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        _OUTCOMES[match.group(1)][report.outcome] += 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not any(_OUTCOMES.values()):
        return
    terminalreporter.section("store conformance suite")
    for backend in BACKENDS:
        counts = _OUTCOMES[backend]
        figures = ", ".join(
            f"{counts[o]} {o}" for o in ("passed", "failed", "skipped") if counts[o]
        )
        terminalreporter.write_line(f"{backend:>9}: {figures or 'not run'}")
