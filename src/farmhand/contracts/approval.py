"""Approvals: an approver's signed decision on one intent's exact payload, for a limited time."""

from datetime import datetime
from enum import StrEnum
from typing import ClassVar

from farmhand.contracts.base import Contract


class Decision(StrEnum):
    """What the approver decided."""

    APPROVE = "approve"
    REJECT = "reject"


class Approval(Contract):
    """One approver's decision, bound to the intent id, its payload hash and an expiry.

    Signed with the approver's key (``key_id`` + ``signature`` over every other field), so
    it cannot be moved to another intent, another payload or another time window.
    """

    contract_name: ClassVar[str] = "approval"

    id: str
    intent_id: str
    payload_hash: str
    approver: str
    decision: Decision
    reason: str | None = None
    created_at: datetime
    expires_at: datetime
    key_id: str | None = None
    signature: str | None = None
