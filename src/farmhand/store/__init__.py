"""Stores, chosen by URL. Every backend implements :class:`farmhand.store.base.Store`."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from farmhand.clock import Clock
from farmhand.errors import InvalidInput
from farmhand.store.base import Change, Claim, IntentQuery, NewIntent, Readiness, Store

SCHEMES = ("sqlite", "folder", "postgresql", "redis")


def sqlite_path(url: str) -> Path:
    """The file a ``sqlite:`` URL names: ``sqlite:///abs/path`` or ``sqlite:rel/path``."""
    rest = url[len("sqlite:") :]
    if rest.startswith("//"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise InvalidInput(
                f"store URL {url!r} names host {parts.netloc!r}; SQLite is local only: "
                "use sqlite:///absolute/path"
            )
        rest = parts.path
    if not rest:
        raise InvalidInput(f"store URL {url!r} has no path; use sqlite:///absolute/path.db")
    return Path(rest).expanduser()


async def open_store(url: str, clock: Clock | None = None) -> Store:
    """Open the store a URL names, creating (and migrating) it if needed.

    ``clock`` is for tests: without one, SQLite and folder stores use this host's clock and
    the server stores use their server's clock, so that every executor judges lease expiry
    and rate limits on one timeline.
    """
    scheme = url.partition(":")[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        from farmhand.store.sqlite import SQLiteStore

        return await SQLiteStore.open(sqlite_path(url), clock)
    if scheme == "folder":
        from farmhand.store.folder import FolderStore

        return await FolderStore.open(url, clock)
    if scheme in ("postgresql", "postgres"):
        from farmhand.store.postgres import PostgresStore

        return await PostgresStore.open(url, clock)
    if scheme in ("redis", "rediss"):
        from farmhand.store.redis import RedisStore

        return await RedisStore.open(url, clock)
    raise InvalidInput(
        f"unknown store URL scheme {scheme or url!r}; use one of: "
        + ", ".join(f"{s}:" for s in SCHEMES)
        + " (e.g. sqlite:///path/farmhand.db, folder:///shared/farmhand,"
        " postgresql://host/db, redis://host:6379/0)"
    )


__all__ = [
    "SCHEMES",
    "Change",
    "Claim",
    "IntentQuery",
    "NewIntent",
    "Readiness",
    "Store",
    "open_store",
    "sqlite_path",
]
