"""The intent lifecycle: its states and the only transitions allowed between them."""

from __future__ import annotations

from enum import StrEnum

from farmhand.errors import InvalidTransition


class IntentState(StrEnum):
    """Where an intent is in its life. Every situation has its own name."""

    PENDING = "pending"  # accepted, waiting for its time and an executor
    AWAITING_APPROVAL = "awaiting_approval"  # held until enough approvers sign off
    RUNNING = "running"  # leased by an executor; an attempt may be in flight
    RETRY_WAIT = "retry_wait"  # an attempt failed retryably; waits for its backoff
    SUCCEEDED = "succeeded"  # a receipt proves the effect happened
    DEAD = "dead"  # dead-lettered: out of attempts or a permanent error
    UNKNOWN = "unknown"  # an attempt may or may not have happened; a human decides
    REJECTED = "rejected"  # refused by an approver or by policy
    EXPIRED = "expired"  # its expires_at passed before it could run
    CANCELLED = "cancelled"  # withdrawn before it ran

    @property
    def terminal(self) -> bool:
        """True when no automatic transition will ever leave this state."""
        return self in TERMINAL


S = IntentState

TERMINAL = frozenset({S.SUCCEEDED, S.DEAD, S.REJECTED, S.EXPIRED, S.CANCELLED})

TRANSITIONS: dict[IntentState, frozenset[IntentState]] = {
    S.PENDING: frozenset({S.RUNNING, S.CANCELLED, S.EXPIRED, S.DEAD, S.AWAITING_APPROVAL}),
    S.AWAITING_APPROVAL: frozenset({S.PENDING, S.REJECTED, S.CANCELLED, S.EXPIRED}),
    # running -> running is a takeover of an expired lease; -> pending is a release.
    S.RUNNING: frozenset(
        {S.RUNNING, S.PENDING, S.SUCCEEDED, S.RETRY_WAIT, S.DEAD, S.UNKNOWN, S.EXPIRED}
    ),
    S.RETRY_WAIT: frozenset({S.RUNNING, S.CANCELLED, S.EXPIRED}),
    # only a human leaves `unknown` (farmhand resolve)
    S.UNKNOWN: frozenset({S.SUCCEEDED, S.PENDING, S.DEAD}),
    # a dead letter can be re-queued by hand (farmhand dlq retry)
    S.DEAD: frozenset({S.PENDING}),
    S.SUCCEEDED: frozenset(),
    S.REJECTED: frozenset(),
    S.EXPIRED: frozenset(),
    S.CANCELLED: frozenset(),
}

#: States an executor may claim once their time has come.
CLAIMABLE = (S.PENDING, S.RETRY_WAIT)
#: States whose intents still need an executor to reach an outcome.
ACTIVE = (S.PENDING, S.RETRY_WAIT, S.RUNNING)


def allowed(source: IntentState, target: IntentState) -> bool:
    """Whether ``source -> target`` is a legal transition."""
    return target in TRANSITIONS[source]


def sources_of(target: IntentState) -> tuple[IntentState, ...]:
    """Every state from which ``target`` may be reached."""
    return tuple(s for s, targets in TRANSITIONS.items() if target in targets)


def check(source: IntentState, target: IntentState, intent_id: str = "") -> None:
    """Raise InvalidTransition unless ``source -> target`` is legal."""
    if not allowed(source, target):
        what = f"intent {intent_id} " if intent_id else ""
        raise InvalidTransition(f"{what}is {source}; it cannot become {target}")
