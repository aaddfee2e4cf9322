"""Receipts and attempts: the append-only record of what an executor did."""

from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar

from pydantic import Field

from farmhand.contracts.base import Contract


class Outcome(StrEnum):
    """How one attempt ended."""

    SUCCEEDED = "succeeded"  # the effect happened; external_id/url say where
    FAILED = "failed"  # the effect did not happen; `retryable` says whether to try again
    UNKNOWN = "unknown"  # the effect may or may not have happened


class ReceiptSource(StrEnum):
    """Who established the outcome."""

    CONNECTOR = "connector"  # the connector call returned it
    RECONCILE = "reconcile"  # a later holder reconciled an interrupted attempt
    EXECUTOR = "executor"  # the executor decided without a call (e.g. lost attempt)
    HUMAN = "human"  # `farmhand resolve`


class Receipt(Contract):
    """The outcome of one attempt. Failures are receipts too: one per failed attempt."""

    contract_name: ClassVar[str] = "receipt"

    id: str
    intent_id: str
    attempt: int
    outcome: Outcome
    external_id: str | None = None
    url: str | None = None
    error: str | None = None
    retryable: bool | None = None
    detail: dict[str, Any] = Field(default_factory=dict)
    executor: str
    fencing_token: int
    source: ReceiptSource = ReceiptSource.CONNECTOR
    started_at: datetime | None = None
    finished_at: datetime


class Attempt(Contract):
    """The durable "attempt started" record, written before the connector is called."""

    contract_name: ClassVar[str] = "attempt"

    intent_id: str
    attempt: int
    executor: str
    fencing_token: int
    started_at: datetime


class Lease(Contract):
    """An executor's time-limited right to act on one intent, fenced by a growing token."""

    contract_name: ClassVar[str] = "lease"

    intent_id: str
    owner: str
    token: int
    expires_at: datetime
