"""Shared fixtures: a temp home, a FakeClock, a real SQLite file store, settings, a coordinator,
and real PostgreSQL and Redis servers on loopback for the tests that need one."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from backends import server_missing
from farmhand.clock import FakeClock
from farmhand.config import RetryConfig, Settings, load
from farmhand.coordinator import Coordinator
from farmhand.keys import Keyring
from farmhand.store import Store, open_store
from farmhand.testing.servers import LocalPostgres, LocalRedis, ServerUnavailable
from homes import prepare_home


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[LocalPostgres | str]:
    """A PostgreSQL server for the whole run: FARMHAND_TEST_POSTGRES (a URL) if set, else a
    throw-away cluster on loopback, stopped at the end."""
    if url := os.environ.get("FARMHAND_TEST_POSTGRES"):
        yield url
        return
    try:
        server = LocalPostgres().start()
    except ServerUnavailable as exc:
        server_missing("PostgreSQL", exc)
        raise
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[LocalRedis | str]:
    """A Redis server for the whole run: FARMHAND_TEST_REDIS (a URL) if set, else a throw-away
    redis-server on loopback with AOF, stopped at the end."""
    if url := os.environ.get("FARMHAND_TEST_REDIS"):
        yield url
        return
    try:
        server = LocalRedis().start()
    except ServerUnavailable as exc:
        server_missing("Redis", exc)
        raise
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def tmp_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh farmhand home with a permissive policy and a coordinator key; FARMHAND_*
    variables of the caller are ignored."""
    for name in ("FARMHAND_HOME", "FARMHAND_STORE"):
        monkeypatch.delenv(name, raising=False)
    return prepare_home(tmp_path)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(tmp_home: Path, clock: FakeClock) -> AsyncIterator[Store]:
    """A real SQLite file store in the temp home, on the fake clock."""
    opened = await open_store(f"sqlite://{tmp_home}/farmhand.db", clock)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def settings(tmp_home: Path) -> Settings:
    """Default settings for the temp home, with a tiny retry backoff so tests stay quick."""
    loaded = load(home=tmp_home)
    retry = RetryConfig(base_delay=0.01, max_delay=0.05)
    return dataclasses.replace(loaded, executor=dataclasses.replace(loaded.executor, retry=retry))


@pytest.fixture
def coordinator(store: Store, clock: FakeClock, settings: Settings) -> Coordinator:
    """A coordinator that checks the home's policy and signs with its coordinator key."""
    signer = Keyring(settings.home / "keys").signer("coordinator")
    return Coordinator(store, clock, policy=settings.policy, signer=signer)
