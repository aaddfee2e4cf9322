"""Fixtures for the end-to-end tests, and a terminal summary of the figures they report."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_support import ArrivalSink, Executors, Farmhand, clean_env

from homes import prepare_home

#: (test id, figures) stashed by tests through the ``e2e_report`` fixture
REPORTED: list[tuple[str, dict[str, Any]]] = []


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """FARMHAND_HOME for this test, prepared as `farmhand init` would (policy + key)."""
    return prepare_home(tmp_path / "home")


@pytest.fixture
def farmhand(home: Path, tmp_path: Path) -> Farmhand:
    """Runs the ``farmhand`` CLI in subprocesses with FARMHAND_HOME set to ``home``."""
    work = tmp_path / "cwd"
    work.mkdir()
    return Farmhand(clean_env(home), cwd=work)


@pytest.fixture
def executors(farmhand: Farmhand, tmp_path: Path) -> Iterator[Executors]:
    """Starts ``farmhand executor run`` processes; every one is killed and reaped at teardown."""
    started = Executors(farmhand.env, tmp_path / "logs")
    try:
        yield started
    finally:
        started.cleanup()


@pytest.fixture
def sink() -> Iterator[ArrivalSink]:
    """A real loopback webhook sink honouring Idempotency-Key."""
    server = ArrivalSink()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def e2e_report(
    request: pytest.FixtureRequest, record_property: Callable[[str, object], None]
) -> Callable[..., None]:
    """Report figures: printed, recorded as properties and shown in the terminal summary."""

    def report(**figures: Any) -> None:
        for name, value in figures.items():
            record_property(name, value)
        REPORTED.append((request.node.nodeid, dict(figures)))
        print(f"{request.node.nodeid}: {_format(figures)}")

    return report


def _format(figures: dict[str, Any]) -> str:
    return ", ".join(f"{name}={value}" for name, value in figures.items())


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not REPORTED:
        return
    terminalreporter.section("farmhand e2e figures")
    for nodeid, figures in REPORTED:
        terminalreporter.write_line(f"{nodeid}: {_format(figures)}")
