"""The narrow store protocol every backend implements.

Backends do atomic I/O primitives only: put-if-absent, claim-with-lease, renew,
start-attempt-if-token-current, apply-transition-if-state-or-token-matches. Which
transition to make, retries, ordering and policy live above, written once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from farmhand.config import BreakerConfig, Limit
from farmhand.contracts import (
    Approval,
    Attempt,
    AuditEvent,
    GateRule,
    Intent,
    IntentState,
    IntentStatus,
    Lease,
    Receipt,
)
from farmhand.contracts.base import utc


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
class Guard:
    """What must not hold an attempt back at the moment it starts, checked by the store in
    the same atomic step that records the start (no window for a gate closed meanwhile)."""

    kind: str
    account: str
    #: rate-limit buckets none of which may be paused (the caller took no token from them)
    buckets: tuple[str, ...] = ()
    #: a circuit breaker that must be closed; None when the caller already entered it
    breaker: str | None = None
    #: buckets to take one token from each (as :meth:`Store.take` does for one request),
    #: once nothing else holds the attempt back: the attempt then starts at the very moment
    #: its tokens were taken. An empty or paused bucket holds it, taking nothing.
    take: tuple[Bucket, ...] = ()


#: why a guarded start was refused: a closed kill switch, a paused bucket, a breaker that
#: is not closed (the caller then takes the slow path, which explains and decides), or the
#: rate limiter, which refused the tokens of ``Guard.take``
HeldBy = Literal["gate", "paused", "breaker", "limited"]


@dataclass(frozen=True, slots=True)
class Held:
    """A guarded start that did not happen because something held it back."""

    by: HeldBy
    #: by ``limited``: the rate limiter's answer (which bucket, how long to wait)
    throttle: Throttle | None = None


@dataclass(frozen=True, slots=True)
class Admitted:
    """A guarded start that took the tokens of its ``Guard.take``: the attempt, and the rate
    limiter's answer (how many tokens are left, when the next one comes)."""

    attempt: Attempt
    throttle: Throttle


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


@dataclass(frozen=True, slots=True)
class Bucket:
    """A rate-limit bucket named in a request: ``account:<name>`` or
    ``account:<name>:kind:<kind>``. ``limit`` None: no rate is configured, only a pause
    (a provider's Retry-After) can hold it."""

    name: str
    limit: Limit | None = None


@dataclass(frozen=True, slots=True)
class Throttle:
    """The rate limiter's answer for one request: a token from every bucket, or none."""

    #: 0.0: the tokens were taken (or, from a peek, are there); else seconds until they may be
    wait: float = 0.0
    #: the bucket that refused (wait > 0), or the one that runs dry first (taken)
    bucket: str | None = None
    #: why that bucket is paused; None when it is not paused
    paused: str | None = None
    #: whole tokens left now (after this take) in the emptiest limited bucket; None: no limit
    tokens: int | None = None
    #: taken: seconds until the emptiest bucket has a token again (0.0: some are left)
    next_in: float = 0.0


#: ``closed`` lets calls through; ``open`` refuses them until its cool-down ends; then one
#: call at a time is the ``half_open`` probe
BreakerState = Literal["closed", "open", "half_open"]


@dataclass(frozen=True, slots=True)
class BreakerStatus:
    """A circuit breaker's answer for one call (or its state after results were recorded)."""

    state: BreakerState = "closed"
    #: 0.0: the call may go (and, with ``probe``, it is the one probe); else seconds to wait
    wait: float = 0.0
    #: this call is the half-open probe: its result closes or re-opens the breaker
    probe: bool = False


@dataclass(frozen=True, slots=True)
class BreakerResult:
    """The outcome of one call for its breaker."""

    key: str
    #: what the call entered with (the intent id): tells the probe's result from the rest
    ticket: str
    #: the target answered normally (succeeded, or refused the request itself: 4xx)
    ok: bool
    error: str | None = None


def intent_status(
    intent: dict[str, Any],
    *,
    state: str,
    attempts: int,
    max_attempts: int,
    reason: str | None,
    updated_at: float,
    ready_at: float | None,
    lease_owner: str | None,
    lease_token: int,
    receipts: Sequence[Receipt],
) -> IntentStatus:
    """An intent as every store reports it: the stored contract (``intent``, as decoded from
    its JSON) with its live state; ``ready_at`` shows only while it waits to be claimed."""
    waiting = state in (IntentState.PENDING.value, IntentState.RETRY_WAIT.value)
    return IntentStatus.model_validate(
        {
            **intent,
            "state": state,
            "attempts": attempts,
            "max_attempts": max_attempts,
            "reason": reason,
            "updated_at": utc(updated_at),
            "next_attempt_at": utc(ready_at) if waiting and ready_at is not None else None,
            "lease_owner": lease_owner,
            "lease_token": lease_token,
            "receipts": list(receipts),
        }
    )


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

    async def start_attempts(
        self, leases: Sequence[Lease], guards: Sequence[Guard] | None = None
    ) -> list[Attempt | Admitted | Held | None]:
        """Durably record a new attempt for each lease whose token is still current (None
        where it is not). With ``guards`` (one per lease), only where, at that same moment,
        :func:`farmhand.store.limits_logic.held_by` finds nothing holding it back and the
        tokens of the guard's ``take`` can be had (taken in lease order, as one
        :meth:`take` would, at the moment the attempt is stamped as started); else
        :class:`Held` says what did. A start that took tokens is :class:`Admitted`. Without
        guards, never :class:`Held`; a lost lease or a held start takes no token."""
        ...

    async def renew(self, leases: Sequence[Lease], ttl: float) -> list[Lease | None]:
        """Extend each lease whose token is still current; None where it was lost."""
        ...

    async def apply(self, changes: Sequence[Change]) -> list[bool]:
        """Apply each change whose precondition holds, with its receipt and audit event."""
        ...

    async def put_approval(self, approval: Approval, change: Change | None = None) -> bool:
        """Append an approver's decision (and its audit event); with ``change``, apply that
        transition in the same transaction. False (nothing written) if ``change`` failed."""
        ...

    async def approvals(self, intent_id: str) -> list[Approval]:
        """Every decision recorded for an intent, oldest first."""
        ...

    async def set_gate(self, rule: GateRule) -> None:
        """Record the kill-switch state of one scope and its audit event."""
        ...

    async def gates(self) -> list[GateRule]:
        """Every gate rule that has been set."""
        ...

    async def take(self, requests: Sequence[Sequence[Bucket]]) -> list[Throttle]:
        """For each request in order, atomically take one token from every bucket it names
        (GCRA: ``rate`` per second, bursts of ``burst``), or none if one of them is empty or
        paused. One transaction for all; times from the store's clock."""
        ...

    async def peek(self, buckets: Sequence[Bucket]) -> Throttle:
        """What :meth:`take` would answer for one request now, without taking (read-only)."""
        ...

    async def pause(self, bucket: str, until: float, reason: str, actor: str) -> float:
        """Make ``bucket`` refuse every take until ``until`` (epoch seconds; a pause is only
        ever extended) and audit it; the bucket's pause end afterwards."""
        ...

    async def breaker_enter(
        self,
        entries: Sequence[tuple[str, str]],
        actor: str,
        probe_ttl: float,
    ) -> list[BreakerStatus]:
        """For each ``(key, ticket)`` in order: may that call go? Closed: yes. Open: no, until
        the cool-down has passed; then exactly one ticket (atomically, across every store
        connection) becomes the half-open probe for ``probe_ttl`` seconds, the rest wait."""
        ...

    async def breaker_record(
        self, results: Sequence[BreakerResult], config: BreakerConfig, actor: str
    ) -> dict[str, BreakerStatus]:
        """Record call results in order: consecutive failures open a closed breaker; the
        probe's result closes (failures reset) or re-opens it with a fresh cool-down. Opens
        and closes are audited. The state of each key afterwards."""
        ...

    async def breaker_peek(self, key: str) -> BreakerStatus:
        """A breaker's state without entering it (read-only): ``wait`` 0.0 on an open
        breaker means a probe may be taken now."""
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
        """A number that changes whenever a writer commits something that may give an
        executor work: a new intent, one left pending or retry_wait, a gate, a rate-limit
        or breaker row, an approval. A store may move it for other commits too (the
        embedded ones do, for every commit by another connection)."""
        ...

    async def wait_for_change(self, since: int, timeout: float) -> None:
        """Return when the change counter differs from ``since`` or ``timeout`` passes."""
        ...

    async def close(self) -> None:
        """Release connections and threads."""
        ...
