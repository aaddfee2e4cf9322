"""Contracts to and from the PostgreSQL store's rows: the JSON records a batch statement
reads with ``json_to_recordset``, and the rows its statements return."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

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
from farmhand.contracts.base import utc
from farmhand.store.base import Change, Claim, Guard, NewIntent, Readiness, intent_status

T = TypeVar("T")


def records(rows: Sequence[dict[str, Any]]) -> str:
    """A batch as one JSON parameter (the C encoder: far cheaper than array parameters,
    which psycopg dumps element by element)."""
    return json.dumps(rows, ensure_ascii=False, separators=(",", ":"))


def start_record(lease: Lease, guard: Guard | None) -> dict[str, Any]:
    """One row of START_ATTEMPTS: the lease and, when guarded, what to judge."""
    row: dict[str, Any] = {"id": lease.intent_id, "token": lease.token, "owner": lease.owner}
    if guard is not None:
        row |= {"kind": guard.kind, "account": guard.account, "buckets": list(guard.buckets)}
        row["breaker"] = guard.breaker
    return row


def gate_filter(closed: Sequence[GateRule]) -> tuple[str, dict[str, str]] | None:
    """SQL that excludes intents blocked by closed gates (appended after a WHERE clause)
    and its named parameters. None when a global gate is closed: nothing may be claimed."""
    sql: list[str] = []
    params: dict[str, str] = {}
    for rule in closed:
        conditions = []
        for column, value in (("kind", rule.kind), ("account", rule.account)):
            if value is not None:
                name = f"g{len(params)}"
                conditions.append(f"{column} = %({name})s")
                params[name] = value
        if not conditions:
            return None
        sql.append(f" AND NOT ({' AND '.join(conditions)})")
    return "".join(sql), params


def rounds(items: Sequence[T], key: Callable[[T], str]) -> list[list[tuple[int, T]]]:
    """``items`` with their positions, split into rounds in which no key repeats: one
    statement changes a row once, and a repeat must see the effect of the one before."""
    names = [key(item) for item in items]
    if len(set(names)) == len(names):  # the usual batch: every key once, one round
        return [list(enumerate(items))] if items else []
    out: list[list[tuple[int, T]]] = []
    seen: list[set[str]] = []
    for index, (item, name) in enumerate(zip(items, names, strict=True)):
        level = next((i for i, names in enumerate(seen) if name not in names), len(seen))
        if level == len(seen):
            out.append([])
            seen.append(set())
        out[level].append((index, item))
        seen[level].add(name)
    return out


def intent_record(item: NewIntent, ord_: int) -> dict[str, Any]:
    """One intent for ``PUT_INTENTS``."""
    intent = item.intent
    return {
        "id": intent.id,
        "key": intent.key,
        "kind": intent.kind,
        "account": intent.account,
        "agent": intent.agent,
        "payload_hash": intent.payload_hash,
        "body": intent.model_dump_json(),
        "state": item.state.value,
        "ready_at": intent.not_before.timestamp() if intent.not_before else None,
        "expires_at": intent.expires_at.timestamp() if intent.expires_at else None,
        "max_attempts": intent.max_attempts,
        "created_at": intent.created_at.timestamp(),
        "actor": item.actor,
        "ord": ord_,
    }


def change_record(change: Change, ord_: int) -> dict[str, Any]:
    """One change (with its receipt, if any) for ``APPLY``."""
    record: dict[str, Any] = {
        "ord": ord_,
        "id": change.intent_id,
        "to_state": change.to_state.value,
        "reason": change.reason,
        "ready_at": change.ready_at or None,  # (0 means now, as None does)
        "extra": change.extra_attempts,
        "token": change.token,
        "from_states": ",".join(state.value for state in change.from_states),
        "actor": change.actor,
        "action": change.action,
    }
    receipt = change.receipt
    if receipt is not None:
        record.update(
            receipt_id=receipt.id,
            receipt_intent=receipt.intent_id,
            attempt=receipt.attempt,
            outcome=receipt.outcome.value,
            finished_at=receipt.finished_at.timestamp(),
            receipt=receipt.model_dump_json(),
        )
    return record


def status(row: Sequence[Any]) -> IntentStatus:
    """An intent as ``STATUSES`` returns it (without the trailing key)."""
    (body, state, attempts, max_attempts, reason, updated, ready, owner, token, receipts) = row
    return intent_status(
        json.loads(body),
        state=state,
        attempts=attempts,
        max_attempts=max_attempts,
        reason=reason,
        updated_at=updated,
        ready_at=ready,
        lease_owner=owner,
        lease_token=token,
        receipts=[Receipt.model_validate_json(r) for r in receipts],
    )


def readiness(row: Sequence[Any]) -> Readiness:
    """What ``READINESS`` answers: running leases, and the earliest lease expiry or ready
    time."""
    running, lease_min, ready_min = row
    times = [t for t in (lease_min, ready_min) if t is not None]
    return Readiness(running=running, next_ready_at=min(times) if times else None)


def new_status(item: NewIntent, updated_at: float, ready_at: float | None) -> IntentStatus:
    """An intent ``PUT_INTENTS`` just created, as ``STATUSES`` would return it."""
    intent = item.intent
    return intent_status(
        intent.model_dump(),
        state=item.state.value,
        attempts=0,
        max_attempts=intent.max_attempts,
        reason=None,
        updated_at=updated_at,
        ready_at=ready_at,
        lease_owner=None,
        lease_token=0,
        receipts=[],
    )


def claim(row: Sequence[Any], owner: str) -> Claim:
    """One claimed intent as ``CLAIM`` returns it."""
    intent_id, body, token, expires, attempts, max_attempts, previous, *open_ = row
    executor, fencing_token, started_at = open_
    return Claim(
        intent=Intent.model_validate_json(body),
        lease=Lease(intent_id=intent_id, owner=owner, token=token, expires_at=utc(expires)),
        previous_state=IntentState(previous),
        attempts=attempts,
        max_attempts=max_attempts,
        open_attempt=None
        if executor is None
        else Attempt(
            intent_id=intent_id,
            attempt=attempts,
            executor=executor,
            fencing_token=fencing_token,
            started_at=utc(started_at),
        ),
    )


def audit_event(row: Sequence[Any]) -> AuditEvent:
    """One row of the audit table."""
    seq, at, actor, action, intent_id, from_state, to_state, reason, detail = row
    return AuditEvent(
        seq=seq,
        at=utc(at),
        actor=actor,
        action=action,
        intent_id=intent_id,
        from_state=from_state,
        to_state=to_state,
        reason=reason,
        detail=json.loads(detail) if detail else {},
    )
