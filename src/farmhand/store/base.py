"""The narrow store protocol every backend implements.

Backends do atomic I/O primitives only: put-if-absent, claim-with-lease, renew,
start-attempt-if-token-current, apply-transition-if-state-or-token-matches. Which
transition to make, retries, ordering and policy live above, written once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from farmhand.contracts import (
    Attempt,
    AuditEvent,
    GateRule,
    Intent,
    IntentState,
    IntentStatus,
    Lease,
    Receipt,
)


@dataclass(frozen=True, slots=True)
class NewIntent:
    """An intent to store if its key is new, in its first state."""

    intent: Intent
    state: IntentState
    actor: str


@dataclass(frozen=True, slots=True)
class Claim:
    """What an executor receives for each intent it leased."""

    intent: Intent
    lease: Lease
    previous_state: IntentState
    attempts: int
    max_attempts: int
    #: an attempt an earlier holder started without writing a receipt (unknown outcome)
    open_attempt: Attempt | None = None


@dataclass(frozen=True, slots=True)
class Change:
    """One atomic transition, applied only if its precondition still holds.

    The precondition is either the lease ``token`` (the intent must be running under
    exactly that token) or ``from_states`` (the intent must be in one of them).
    """

    intent_id: str
    to_state: IntentState
    actor: str
    action: str
    reason: str | None = None
    token: int | None = None
    from_states: tuple[IntentState, ...] = ()
    #: when a pending/retry_wait intent may next be claimed (epoch seconds); None = now
    ready_at: float | None = None
    receipt: Receipt | None = None
    #: attempts granted on top of those already used (a re-queued dead letter)
    extra_attempts: int = 0


@dataclass(frozen=True, slots=True)
class IntentQuery:
    """Filters for listing intents, newest first."""

    state: IntentState | None = None
    kind: str | None = None
    account: str | None = None
    limit: int = 100


@dataclass(frozen=True, slots=True)
class Readiness:
    """Whether an executor has anything to do now or later."""

    running: int
    #: earliest time a pending/retry_wait intent becomes ready or a lease expires
    next_ready_at: float | None


@runtime_checkable
class Store(Protocol):
    """Durable, shared state of intents, receipts, gates and the audit log."""

    url: str

    async def put_intents(self, items: Sequence[NewIntent]) -> list[tuple[IntentStatus, bool]]:
        """Insert each intent unless its key exists; return the stored one and whether new."""
        ...

    async def get_intent(self, ref: str) -> IntentStatus | None:
        """The intent with this id or idempotency key, with its receipts."""
        ...

    async def list_intents(self, query: IntentQuery) -> list[IntentStatus]:
        """Intents matching ``query``, newest first, with their receipts."""
        ...

    async def claim(
        self, owner: str, limit: int, ttl: float, closed: Sequence[GateRule]
    ) -> list[Claim]:
        """Lease up to ``limit`` ready intents (or expired leases) not blocked by ``closed``."""
        ...

    async def start_attempts(self, leases: Sequence[Lease]) -> list[Attempt | None]:
        """Durably record a new attempt for each lease whose token is still current."""
        ...

    async def renew(self, leases: Sequence[Lease], ttl: float) -> list[Lease | None]:
        """Extend each lease whose token is still current; None where it was lost."""
        ...

    async def apply(self, changes: Sequence[Change]) -> list[bool]:
        """Apply each change whose precondition holds, with its receipt and audit event."""
        ...

    async def set_gate(self, rule: GateRule) -> None:
        """Record the kill-switch state of one scope and its audit event."""
        ...

    async def gates(self) -> list[GateRule]:
        """Every gate rule that has been set."""
        ...

    async def receipts(self, intent_id: str | None = None, limit: int = 100) -> list[Receipt]:
        """Receipts (and failure records), newest first."""
        ...

    async def audit(self, intent_id: str | None = None, limit: int = 100) -> list[AuditEvent]:
        """Audit events, newest first."""
        ...

    async def readiness(self, closed: Sequence[GateRule] = ()) -> Readiness:
        """How much is running and when the next intent not blocked by ``closed`` is ready."""
        ...

    async def counts(self) -> dict[IntentState, int]:
        """Number of intents in each state."""
        ...

    async def change_counter(self) -> int:
        """A number that changes whenever any writer commits."""
        ...

    async def wait_for_change(self, since: int, timeout: float) -> None:
        """Return when the change counter differs from ``since`` or ``timeout`` passes."""
        ...

    async def close(self) -> None:
        """Release connections and threads."""
        ...
