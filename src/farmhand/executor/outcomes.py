"""How an attempt's result becomes the next state, a receipt and an audit action.

Pure functions: the decision is made here once, for every backend.
"""

from __future__ import annotations

import dataclasses
import random
from typing import TYPE_CHECKING

from farmhand.config import RetryConfig
from farmhand.connectors.base import Absent, Failed, Reconciled, Result, Succeeded, Uncertain
from farmhand.contracts import Attempt, IntentState, Outcome, Receipt, ReceiptSource
from farmhand.contracts.base import utc
from farmhand.executor.retry import backoff
from farmhand.ids import new_id
from farmhand.store.base import Change, Claim

if TYPE_CHECKING:
    from farmhand.redact import Redactor


def _receipt(
    claim: Claim,
    attempt: int,
    outcome: Outcome,
    now: float,
    source: ReceiptSource,
    started: Attempt | None = None,
    **fields: object,
) -> Receipt:
    return Receipt.model_validate(
        {
            "id": new_id("rc"),
            "intent_id": claim.intent.id,
            "attempt": attempt,
            "outcome": outcome,
            "executor": claim.lease.owner,
            "fencing_token": claim.lease.token,
            "source": source,
            "started_at": started.started_at if started else None,
            "finished_at": utc(now),
            **fields,
        }
    )


def _change(claim: Claim, to: IntentState, action: str, reason: str | None, **kw: object) -> Change:
    return Change(
        intent_id=claim.intent.id,
        to_state=to,
        actor=claim.lease.owner,
        action=action,
        reason=reason,
        token=claim.lease.token,
        **kw,  # type: ignore[arg-type]
    )


def after_call(
    claim: Claim,
    attempt: Attempt,
    result: Result,
    now: float,
    retry: RetryConfig,
    rng: random.Random | None = None,
) -> Change:
    """The change that records ``result`` of ``attempt``."""
    n = attempt.attempt
    if isinstance(result, Succeeded):
        receipt = _receipt(
            claim,
            n,
            Outcome.SUCCEEDED,
            now,
            ReceiptSource.CONNECTOR,
            attempt,
            external_id=result.external_id,
            url=result.url,
            detail=result.detail,
        )
        return _change(claim, IntentState.SUCCEEDED, "succeed", None, receipt=receipt)
    if isinstance(result, Uncertain):
        receipt = _receipt(
            claim, n, Outcome.UNKNOWN, now, ReceiptSource.CONNECTOR, attempt, error=result.error
        )
        return _change(claim, IntentState.UNKNOWN, "park_unknown", result.error, receipt=receipt)
    receipt = _receipt(
        claim,
        n,
        Outcome.FAILED,
        now,
        ReceiptSource.CONNECTOR,
        attempt,
        error=result.error,
        retryable=result.retryable,
        detail={"retry_after": result.retry_after} if result.retry_after is not None else {},
    )
    if not result.retryable:
        reason = f"permanent failure: {result.error}"
        return _change(claim, IntentState.DEAD, "dead_letter", reason, receipt=receipt)
    if n >= claim.max_attempts:
        reason = f"gave up after {n} attempts; last error: {result.error}"
        return _change(claim, IntentState.DEAD, "dead_letter", reason, receipt=receipt)
    delay = backoff(n, retry, result.retry_after, rng)
    reason = f"attempt {n} failed, retrying in {delay:.1f}s: {result.error}"
    return _change(
        claim, IntentState.RETRY_WAIT, "retry", reason, receipt=receipt, ready_at=now + delay
    )


def after_reconcile(claim: Claim, attempt: Attempt, found: Reconciled, now: float) -> Change:
    """The change that closes an interrupted attempt once its outcome is reconciled."""
    n = attempt.attempt
    source = ReceiptSource.RECONCILE
    if isinstance(found, Succeeded):
        receipt = _receipt(
            claim,
            n,
            Outcome.SUCCEEDED,
            now,
            source,
            attempt,
            external_id=found.external_id,
            url=found.url,
            detail=found.detail,
        )
        return _change(claim, IntentState.SUCCEEDED, "reconcile.found", None, receipt=receipt)
    if isinstance(found, Absent):
        error = f"attempt {n} was interrupted; reconciled as not done: {found.reason}"
        receipt = _receipt(
            claim, n, Outcome.FAILED, now, source, attempt, error=error, retryable=True
        )
        if n >= claim.max_attempts:
            # "absent" may only mean "resending is harmless": the interrupted call could have
            # taken effect, so with no attempt left a human decides rather than the DLQ
            reason = (
                f"out of attempts ({n}) and the last one was interrupted; it may have taken "
                f"effect: check the target, then run farmhand resolve ({found.reason})"
            )
            receipt = _receipt(claim, n, Outcome.UNKNOWN, now, source, attempt, error=reason)
            return _change(claim, IntentState.UNKNOWN, "reconcile.unknown", reason, receipt=receipt)
        return _change(
            claim, IntentState.RETRY_WAIT, "reconcile.retry", error, receipt=receipt, ready_at=now
        )
    receipt = _receipt(claim, n, Outcome.UNKNOWN, now, source, attempt, error=found.error)
    return _change(claim, IntentState.UNKNOWN, "reconcile.unknown", found.error, receipt=receipt)


def refuse(claim: Claim, to: IntentState, action: str, reason: str, now: float) -> Change:
    """A change that ends or returns a claimed intent without calling its connector.

    A dead letter always carries a failure record; one refused before any call has
    attempt number 0.
    """
    receipt = None
    if to is IntentState.DEAD:
        receipt = _receipt(
            claim,
            0,
            Outcome.FAILED,
            now,
            ReceiptSource.EXECUTOR,
            error=reason,
            retryable=False,
        )
    return _change(claim, to, action, reason, receipt=receipt)


def redacted(change: Change, redactor: Redactor) -> Change:
    """``change`` with secret values removed from its reason and its receipt's error,
    detail, external id and URL (what is stored and later shown by every CLI command)."""
    if not redactor:
        return change
    receipt = change.receipt
    if receipt is not None:
        receipt = receipt.model_copy(
            update={
                "error": redactor.optional(receipt.error),
                "detail": redactor.value(receipt.detail),
                "external_id": redactor.optional(receipt.external_id),
                "url": redactor.optional(receipt.url),
            }
        )
    return dataclasses.replace(change, reason=redactor.optional(change.reason), receipt=receipt)


def redacted_result(result: Result, redactor: Redactor) -> Result:
    """A connector's ``result`` with secret values removed from its error or details."""
    if not redactor:
        return result
    if isinstance(result, Succeeded):
        return dataclasses.replace(
            result,
            external_id=redactor.optional(result.external_id),
            url=redactor.optional(result.url),
            detail=redactor.value(result.detail),
        )
    if isinstance(result, Failed | Uncertain):
        return dataclasses.replace(result, error=redactor.text(result.error))
    return result
