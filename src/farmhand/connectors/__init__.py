"""Connector registry: built-in connectors plus the ``farmhand.connectors`` entry points.

Kinds resolve to ``module:Class`` strings and are imported only when used, so listing or
validating a kind never pulls in an HTTP client.
"""

from __future__ import annotations

import importlib
from functools import cache

from farmhand.connectors.base import (
    Absent,
    Call,
    Connector,
    Failed,
    Reconciled,
    Result,
    Succeeded,
    Uncertain,
)
from farmhand.errors import UnknownKind

ENTRY_POINT_GROUP = "farmhand.connectors"

BUILTIN: dict[str, str] = {
    "noop": "farmhand.connectors.noop:NoopConnector",
    "webhook.post": "farmhand.connectors.webhook:WebhookConnector",
    "email.send": "farmhand.connectors.email:EmailConnector",
    "calendar.put": "farmhand.connectors.calendar:CalendarConnector",
    "x.post": "farmhand.connectors.x:XConnector",
    "command.run": "farmhand.connectors.command:CommandConnector",
}


@cache
def _plugins() -> dict[str, str]:
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def known_kinds() -> list[str]:
    """Every kind a connector is installed for."""
    return sorted({*BUILTIN, *_plugins()})


def connector_class(kind: str) -> type[Connector]:
    """The connector class registered for ``kind``."""
    target = BUILTIN.get(kind) or _plugins().get(kind)
    if target is None:
        raise UnknownKind(
            f"unknown kind {kind!r}: no connector is installed for it; known kinds: "
            + ", ".join(known_kinds())
        )
    module_name, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    if not (isinstance(cls, type) and issubclass(cls, Connector)):
        raise UnknownKind(f"kind {kind!r}: {target} is not a farmhand Connector")
    return cls


class ConnectorSet:
    """One live instance per kind, created on first use and closed together."""

    def __init__(self) -> None:
        self._live: dict[str, Connector] = {}

    def get(self, kind: str) -> Connector:
        """The connector for ``kind`` (raises UnknownKind)."""
        connector = self._live.get(kind)
        if connector is None:
            connector = self._live[kind] = connector_class(kind)()
        return connector

    async def aclose(self) -> None:
        """Close every connector that was used."""
        for connector in self._live.values():
            await connector.aclose()
        self._live.clear()


__all__ = [
    "BUILTIN",
    "Absent",
    "Call",
    "Connector",
    "ConnectorSet",
    "Failed",
    "Reconciled",
    "Result",
    "Succeeded",
    "Uncertain",
    "connector_class",
    "known_kinds",
]
