"""``noop``: does nothing, successfully. For demos, tests and benchmarks.

Payload options (all optional): ``delay_ms`` waits before answering; ``fail`` set to
``"retryable"`` or ``"permanent"`` returns that failure instead.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from farmhand.config import AccountConfig
from farmhand.connectors.base import Call, Connector, Failed, Result, Succeeded
from farmhand.errors import InvalidInput


class NoopConnector(Connector):
    """A connector with no external effect; always safe to repeat."""

    kind: ClassVar[str] = "noop"

    def validate(self, payload: dict[str, Any], key: str) -> None:
        delay = payload.get("delay_ms", 0)
        if (
            isinstance(delay, bool)
            or not isinstance(delay, int | float)
            or not 0 <= delay <= 60_000
        ):
            raise InvalidInput("noop payload: delay_ms must be a number from 0 to 60000")
        if payload.get("fail") not in (None, "retryable", "permanent"):
            raise InvalidInput('noop payload: fail must be "retryable" or "permanent"')

    def idempotent(self, account: AccountConfig) -> bool:
        return True

    async def execute(self, call: Call) -> Result:
        payload = call.intent.payload
        delay = payload.get("delay_ms", 0)
        if delay:
            await asyncio.sleep(delay / 1000)
        fail = payload.get("fail")
        if fail:
            return Failed(error=f"noop asked to fail ({fail})", retryable=fail == "retryable")
        return Succeeded(external_id=f"noop-{call.intent.id}")
