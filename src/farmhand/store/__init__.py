"""Stores, chosen by URL. Every backend implements :class:`farmhand.store.base.Store`."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from farmhand.clock import Clock
from farmhand.errors import InvalidInput
from farmhand.store.base import Change, Claim, IntentQuery, NewIntent, Readiness, Store

SCHEMES = ("sqlite",)


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
    """Open the store a URL names, creating it if it does not exist yet."""
    scheme = url.partition(":")[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        from farmhand.store.sqlite import SQLiteStore

        return await SQLiteStore.open(sqlite_path(url), clock)
    raise InvalidInput(
        f"unknown store URL scheme {scheme or url!r}; use one of: "
        + ", ".join(f"{s}:" for s in SCHEMES)
        + " (e.g. sqlite:///path/farmhand.db)"
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
