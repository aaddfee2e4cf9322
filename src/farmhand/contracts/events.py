"""Audit events and kill-switch (gate) rules."""

from datetime import datetime
from typing import Any, ClassVar

from pydantic import Field

from farmhand.contracts.base import Contract


class AuditEvent(Contract):
    """One append-only line of the audit log: who changed what, when and why."""

    contract_name: ClassVar[str] = "audit_event"

    seq: int = 0
    at: datetime
    actor: str
    action: str
    intent_id: str | None = None
    from_state: str | None = None
    to_state: str | None = None
    reason: str | None = None
    detail: dict[str, Any] = Field(default_factory=dict)


class GateRule(Contract):
    """The kill switch for one scope. ``None`` kind/account means "every"."""

    contract_name: ClassVar[str] = "gate"

    kind: str | None = None
    account: str | None = None
    open: bool
    actor: str
    reason: str | None = None
    changed_at: datetime

    @property
    def scope(self) -> str:
        """A human name for the scope, e.g. ``kind=email.send account=*``."""
        return f"kind={self.kind or '*'} account={self.account or '*'}"
