"""Shared fixtures: a temp home, a FakeClock, a real SQLite file store, settings, a coordinator."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from farmhand.clock import FakeClock
from farmhand.config import RetryConfig, Settings, load
from farmhand.coordinator import Coordinator
from farmhand.keys import Keyring
from farmhand.store import Store, open_store
from homes import prepare_home


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
