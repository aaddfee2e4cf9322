"""The intent: an agent's request for one side effect, immutable once accepted."""

import re
from datetime import datetime
from typing import Any, ClassVar, Self

from pydantic import Field, field_validator, model_validator

from farmhand.canonical import payload_hash
from farmhand.contracts.base import Contract
from farmhand.contracts.receipt import Receipt
from farmhand.contracts.state import IntentState

MAX_KEY_LENGTH = 255
#: Largest canonical payload accepted, in bytes. Larger side effects belong in a blob store.
MAX_PAYLOAD_BYTES = 256 * 1024

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,127}$"
_KIND = r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*$"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_key(key: str) -> str:
    """Validate an idempotency key: 1..255 characters, no control characters."""
    if not key:
        raise ValueError("idempotency key is empty; pass --key with a stable, unique value")
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"idempotency key is {len(key)} characters; the limit is {MAX_KEY_LENGTH}")
    if _CONTROL.search(key):
        raise ValueError("idempotency key contains control characters; use printable text")
    return key


class Intent(Contract):
    """A request for one side effect, keyed by a producer-chosen idempotency key."""

    contract_name: ClassVar[str] = "intent"

    id: str
    key: str
    kind: str = Field(pattern=_KIND, max_length=64)
    account: str = Field(default="default", pattern=_NAME)
    agent: str = Field(default="local", pattern=_NAME)
    payload: dict[str, Any]
    payload_hash: str
    created_at: datetime
    not_before: datetime | None = None
    expires_at: datetime | None = None
    max_attempts: int = Field(default=5, ge=1, le=100)
    key_id: str | None = None
    signature: str | None = None

    @field_validator("key")
    @classmethod
    def _key(cls, key: str) -> str:
        return check_key(key)

    @model_validator(mode="after")
    def _integrity(self) -> Self:
        actual = payload_hash(self.payload)
        if actual != self.payload_hash:
            raise ValueError(f"payload_hash {self.payload_hash} does not match payload ({actual})")
        if (
            self.expires_at is not None
            and self.not_before is not None
            and self.expires_at <= self.not_before
        ):
            raise ValueError("expires_at must be later than not_before")
        return self


class IntentStatus(Contract):
    """An intent as the store sees it now: the request plus its state and receipts."""

    contract_name: ClassVar[str] = "intent_status"

    id: str
    key: str
    kind: str
    account: str
    agent: str
    payload: dict[str, Any]
    payload_hash: str
    created_at: datetime
    not_before: datetime | None = None
    expires_at: datetime | None = None
    max_attempts: int
    state: IntentState
    attempts: int
    reason: str | None = None
    updated_at: datetime
    next_attempt_at: datetime | None = None
    lease_owner: str | None = None
    lease_token: int = 0
    key_id: str | None = None
    signature: str | None = None
    receipts: list[Receipt] = Field(default_factory=list)

    def to_intent(self) -> Intent:
        """The immutable request this status describes."""
        return Intent.model_validate(self.model_dump(include=set(Intent.model_fields)))
