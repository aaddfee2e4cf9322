"""Schema migrations on purpose: bring a store's schema up to this farmhand's version.

Opening a store migrates it anyway; running this first (``farmhand store migrate``) makes
the change a deliberate step of an upgrade, and says which version the store is at.
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from farmhand.errors import StoreError
from farmhand.store import sql


@dataclass(frozen=True, slots=True)
class MigrationReport:
    """What a migration run found and did."""

    #: the store URL, any password masked
    url: str
    backend: str
    #: schema version before and after, and the one this farmhand writes; None for a store
    #: without a versioned schema
    before: int | None = None
    after: int | None = None
    latest: int | None = None
    applied: list[int] = field(default_factory=list)

    @property
    def versioned(self) -> bool:
        """Whether this kind of store has schema migrations at all."""
        return self.after is not None

    def to_json(self) -> dict[str, Any]:
        """The report as plain data."""
        return {
            "store": self.url,
            "backend": self.backend,
            "migrations": self.versioned,
            "before": self.before,
            "after": self.after,
            "latest": self.latest,
            "applied": self.applied,
        }

    def summary(self) -> str:
        """One line for humans."""
        if not self.versioned:
            return f"{self.url}: {self.backend} stores have no schema migrations; nothing to do"
        if self.applied:
            steps = ", ".join(str(v) for v in self.applied)
            return f"{self.url}: schema version {self.after} (applied {steps})"
        return f"{self.url}: schema version {self.after}, up to date"


def _report(url: str, backend: str, before: int, after: int, latest: int) -> MigrationReport:
    return MigrationReport(
        url=url,
        backend=backend,
        before=before,
        after=after,
        latest=latest,
        applied=list(range(before + 1, after + 1)),
    )


def _sqlite_version(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        db = sqlite3.connect(f"file:{quote(str(path.absolute()))}?mode=ro", uri=True)
        try:
            return int(db.execute("PRAGMA user_version").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read the schema version of {path}: {exc}") from exc


def _sqlite_latest() -> int:
    return sql.migrations("sqlite")[-1][0]


async def _sqlite(url: str) -> MigrationReport:
    from farmhand.store import sqlite_path
    from farmhand.store.sqlite import SQLiteStore

    path = sqlite_path(url)
    before = await asyncio.to_thread(_sqlite_version, path)
    store = await SQLiteStore.open(path)
    await store.close()
    after = await asyncio.to_thread(_sqlite_version, path)
    return _report(store.url, "sqlite", before, after, _sqlite_latest())


async def _postgres(url: str) -> MigrationReport:
    from farmhand.store.postgres_setup import connect, latest_version, migrate, parse_url

    target = parse_url(url)
    conn = await connect(target)
    try:
        before, after = await migrate(conn, target)
    finally:
        await conn.close()
    return _report(target.display, "postgresql", before, after, latest_version())


async def migrate(url: str) -> MigrationReport:
    """Apply the migrations the store at ``url`` lacks (creating it if needed)."""
    scheme = url.partition(":")[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        return await _sqlite(url)
    if scheme in ("postgresql", "postgres"):
        return await _postgres(url)
    from farmhand.store import open_store

    # the other stores keep no versioned schema: opening one checks that it is usable
    store = await open_store(url)
    await store.close()
    return MigrationReport(url=store.url, backend=scheme)
