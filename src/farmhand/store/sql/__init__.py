"""Numbered schema migrations, one folder per SQL dialect."""

from __future__ import annotations

from importlib import resources


def migrations(dialect: str) -> list[tuple[int, str]]:
    """Every migration of ``dialect`` (``sqlite`` or ``postgres``): ``(version, script)``,
    oldest first; a script's version is the number its file name starts with."""
    found = []
    for entry in resources.files(f"farmhand.store.sql.{dialect}").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), entry.read_text(encoding="utf-8")))
    return sorted(found)
