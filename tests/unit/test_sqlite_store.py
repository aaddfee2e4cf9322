"""What only the SQLite store does: WAL and full sync, refusing synced folders and corrupt
files, schema versions. The shared store contract is in tests/contract/."""

from __future__ import annotations

import os
import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from farmhand.clock import FakeClock
from farmhand.contracts import IntentState
from farmhand.errors import StoreError
from farmhand.store import Store, open_store
from farmhand.store.sqlite import SQLiteStore
from store_support import claim_one, make_intent, put

S = IntentState


async def test_wal_and_full_sync(store: Store, tmp_home: Path) -> None:
    assert isinstance(store, SQLiteStore)
    db = store._db
    assert db is not None
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with sqlite3.connect(tmp_home / "farmhand.db") as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent
    other.close()


async def test_refuses_syncthing_folder(tmp_path: Path, clock: FakeClock) -> None:
    synced = tmp_path / "Sync"
    (synced / ".stfolder").mkdir(parents=True)
    path = synced / "agents" / "farmhand.db"
    with pytest.raises(StoreError, match="Syncthing") as info:
        await open_store(f"sqlite://{path}", clock)
    assert str(path) in str(info.value)
    assert not path.exists()


async def test_corrupt_file_refused_and_left_unchanged(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "farmhand.db"
    garbage = random.Random(1234).randbytes(8192)
    path.write_bytes(garbage)
    with pytest.raises(StoreError, match="not a farmhand SQLite database or is corrupt"):
        await open_store(f"sqlite://{path}", clock)
    assert path.read_bytes() == garbage
    assert os.listdir(tmp_path) == ["farmhand.db"]  # no journal or WAL left behind


async def test_newer_schema_refused(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "farmhand.db"
    store = await open_store(f"sqlite://{path}", clock)
    await store.close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 999")
    db.close()
    with pytest.raises(StoreError, match="schema version 999"):
        await open_store(f"sqlite://{path}", clock)


async def test_migrations_idempotent_on_reopen(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "farmhand.db"
    store = await open_store(f"sqlite://{path}", clock)
    (intent_id,) = await put(store, make_intent(clock, "k"))
    claim = await claim_one(store)
    await store.close()

    def schema() -> tuple[int, list[Any]]:
        with sqlite3.connect(path) as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            objects = db.execute(
                "SELECT type, name, sql FROM sqlite_master ORDER BY type, name"
            ).fetchall()
        db.close()
        return version, objects

    first = schema()
    assert first[0] >= 1
    for _ in range(2):
        store = await open_store(f"sqlite://{path}", clock)
        try:
            status = await store.get_intent(intent_id)
            assert status is not None
            assert status.state is S.RUNNING
            assert status.lease_token == claim.lease.token
            assert len(await store.audit(intent_id)) == 2
        finally:
            await store.close()
        assert schema() == first
