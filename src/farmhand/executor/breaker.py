"""Circuit breakers: which key a call belongs to and which results count against it.

Pure functions; the breakers themselves live in the store (``Store.breaker_enter`` and
``Store.breaker_record``), shared by every executor. One breaker per connector kind and
account, configured by ``[breaker]`` ``failures``/``cooldown`` in ``farmhand.toml``.
"""

from __future__ import annotations

from farmhand.connectors.base import Failed, Result, Uncertain
from farmhand.contracts.base import utc
from farmhand.executor.ratelimit import Scope
from farmhand.store.base import BreakerStatus

#: longest an executor stays away from a half-open breaker before looking again: the
#: probe another executor holds usually reports much sooner than its deadline
POLL = 1.0


def key(kind: str, account: str) -> str:
    """The breaker of one connector kind on one account: ``<kind>:<account>``."""
    return f"{kind}:{account}"


def scope(kind: str, account: str) -> Scope:
    """What an open breaker holds back."""
    return (kind, account)


def is_failure(result: Result) -> bool:
    """Whether a call's result counts against the target's health.

    Counted: the target could not be reached, timed out, answered 5xx/408/425/429 (every
    retryable failure) or left the outcome unknown. Not counted: success, and a permanent
    failure (4xx, an invalid request): the target answered, so it is up.
    """
    if isinstance(result, Uncertain):
        return True
    if isinstance(result, Failed):
        return result.retryable
    return False


def error(result: Result) -> str | None:
    """The error text of a failed or uncertain result."""
    return result.error if isinstance(result, Failed | Uncertain) else None


def hold_for(status: BreakerStatus) -> float:
    """How long to stay away from a breaker that answered ``status`` (seconds)."""
    if status.state == "half_open":
        return min(status.wait, POLL)
    return status.wait


def wait_reason(breaker: str, status: BreakerStatus, until: float) -> str:
    """The audit reason of an intent released to wait for ``breaker``."""
    when = utc(until).isoformat()
    if status.state == "half_open":
        return f"circuit breaker {breaker} is half-open: another call is probing; retry at {when}"
    return f"circuit breaker {breaker} is open after repeated failures; next probe at {when}"
