"""farmhand: the operations layer for AI-agent farms.

Agents submit append-only *intents*; executors holding leases with fencing tokens turn
them into append-only *receipts*. Names below are imported lazily so that the CLI starts
fast; ``from farmhand import Coordinator`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from farmhand._version import __version__

if TYPE_CHECKING:
    from farmhand.clock import Clock, FakeClock, SystemClock
    from farmhand.config import Settings
    from farmhand.contracts import Intent, IntentState, IntentStatus, Receipt
    from farmhand.coordinator import Coordinator, SubmitRequest
    from farmhand.errors import FarmhandError
    from farmhand.executor import Executor
    from farmhand.store import Store, open_store

_EXPORTS = {
    "Clock": "farmhand.clock",
    "FakeClock": "farmhand.clock",
    "SystemClock": "farmhand.clock",
    "Settings": "farmhand.config",
    "Intent": "farmhand.contracts",
    "IntentState": "farmhand.contracts",
    "IntentStatus": "farmhand.contracts",
    "Receipt": "farmhand.contracts",
    "Coordinator": "farmhand.coordinator",
    "SubmitRequest": "farmhand.coordinator",
    "FarmhandError": "farmhand.errors",
    "Executor": "farmhand.executor",
    "Store": "farmhand.store",
    "open_store": "farmhand.store",
}

__all__ = [
    "Clock",
    "Coordinator",
    "Executor",
    "FakeClock",
    "FarmhandError",
    "Intent",
    "IntentState",
    "IntentStatus",
    "Receipt",
    "Settings",
    "Store",
    "SubmitRequest",
    "SystemClock",
    "__version__",
    "open_store",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'farmhand' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
