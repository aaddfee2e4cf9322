"""Rate limits: which buckets an intent draws from, and what a provider's Retry-After means.

Pure functions; the buckets themselves live in the store (``Store.take``), shared by every
executor. Limits are the executor host's ``[accounts.NAME]`` ``rate``/``burst`` and
``kind_limits`` in ``farmhand.toml``.
"""

from __future__ import annotations

from farmhand.config import AccountConfig, Limit
from farmhand.connectors.base import Failed, Result
from farmhand.contracts import Intent
from farmhand.contracts.base import utc
from farmhand.store.base import Bucket, Throttle

#: longest pause a provider's Retry-After can impose on an account (seconds); a bogus
#: header must not stop an account for days
MAX_PAUSE = 3600.0

#: (kind, account) that a wait blocks; kind None = every kind of the account
Scope = tuple[str | None, str]


def account_bucket(account: str) -> str:
    """The bucket every call of ``account`` draws from."""
    return f"account:{account}"


def kind_bucket(account: str, kind: str) -> str:
    """The bucket the calls of one kind of ``account`` draw from."""
    return f"account:{account}:kind:{kind}"


def buckets(intent: Intent, account: AccountConfig) -> list[Bucket]:
    """The buckets a call for ``intent`` takes a token from, all or none.

    The account's bucket is always named, limit or not: a provider's Retry-After pauses
    the whole account. The kind's bucket only when the account limits that kind.
    """
    found = [Bucket(account_bucket(intent.account), account.limit)]
    kind_limit = account.kind_limits.get(intent.kind)
    if kind_limit is not None:
        found.append(Bucket(kind_bucket(intent.account, intent.kind), kind_limit))
    return found


def scope(bucket: str, intent: Intent) -> Scope:
    """What a wait on ``bucket`` (one of :func:`buckets` of ``intent``) holds back."""
    if bucket == account_bucket(intent.account):
        return (None, intent.account)
    return (intent.kind, intent.account)


def pause_seconds(result: Result) -> float | None:
    """How long a call's result asks every executor to leave its account alone: the
    provider's Retry-After on a retryable failure (429, 503), at most :data:`MAX_PAUSE`."""
    if isinstance(result, Failed) and result.retryable and (result.retry_after or 0) > 0:
        return min(result.retry_after or 0.0, MAX_PAUSE)
    return None


def probe_size(tokens: int | None, free: int) -> int:
    """How many intents to claim when a blocked bucket has ``tokens`` again (None: it has
    no rate, only a pause that ended)."""
    if tokens is None:
        return free
    return max(1, min(free, tokens))


def jitter_span(limit: Limit | None) -> float:
    """Up to how long after a bucket's next token an executor looks again, so that
    executors blocked on the same bucket do not all claim at the same instant. Lateness
    up to ``(burst - 1) / rate`` costs no capacity; the span stays well inside that."""
    if limit is None:
        return 0.05
    return min(0.25, 0.5 / limit.rate)


def wait_reason(throttle: Throttle, bucket: Bucket, until: float) -> str:
    """The audit reason of an intent released to wait for ``bucket``."""
    when = utc(until).isoformat()
    if throttle.paused is not None:
        return f"rate limit: bucket {bucket.name} is paused until {when}: {throttle.paused}"
    limit = bucket.limit
    rate = f" ({limit.rate:g}/s, burst {limit.burst})" if limit is not None else ""
    return f"rate limit: bucket {bucket.name}{rate} is empty; next token at {when}"


def pause_reason(result: Failed, seconds: float) -> str:
    """Why an account was paused after ``result``."""
    return f"provider asked to retry after {seconds:g}s: {result.error}"
