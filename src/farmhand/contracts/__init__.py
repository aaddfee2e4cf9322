"""Wire contracts: versioned, frozen pydantic models with a published JSON Schema.

The model modules do without ``from __future__ import annotations``: pydantic would compile
every string annotation when the classes are created, ~2 ms of each CLI call.
"""

from farmhand.contracts.approval import Approval, Decision
from farmhand.contracts.base import SCHEMA_VERSION, Contract, check_schema_version
from farmhand.contracts.events import AuditEvent, GateRule
from farmhand.contracts.intent import MAX_KEY_LENGTH, MAX_PAYLOAD_BYTES, Intent, IntentStatus
from farmhand.contracts.receipt import Attempt, Lease, Outcome, Receipt, ReceiptSource
from farmhand.contracts.state import IntentState

#: Every published contract by the name `farmhand schema NAME` takes.
SCHEMAS: dict[str, type[Contract]] = {
    model.contract_name: model
    for model in (Intent, IntentStatus, Receipt, Attempt, Lease, AuditEvent, GateRule, Approval)
}

__all__ = [
    "MAX_KEY_LENGTH",
    "MAX_PAYLOAD_BYTES",
    "SCHEMAS",
    "SCHEMA_VERSION",
    "Approval",
    "Attempt",
    "AuditEvent",
    "Contract",
    "Decision",
    "GateRule",
    "Intent",
    "IntentState",
    "IntentStatus",
    "Lease",
    "Outcome",
    "Receipt",
    "ReceiptSource",
    "check_schema_version",
]
