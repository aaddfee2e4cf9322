"""Helpers shared by the store tests: intents, claims, changes, receipts, executor runs."""

from __future__ import annotations

import asyncio
from typing import Any

from farmhand.canonical import payload_hash
from farmhand.clock import FakeClock
from farmhand.config import Settings
from farmhand.connectors import Call, ConnectorSet, Result
from farmhand.connectors.noop import NoopConnector
from farmhand.contracts import GateRule, Intent, IntentState, IntentStatus, Outcome, Receipt
from farmhand.contracts.base import utc
from farmhand.executor import Executor, ExecutorStats
from farmhand.ids import new_id
from farmhand.store import Change, Claim, NewIntent, Store

S = IntentState
TTL = 30.0


def make_intent(
    clock: FakeClock,
    key: str,
    *,
    kind: str = "noop",
    account: str = "default",
    payload: dict[str, Any] | None = None,
    not_before: float | None = None,
    max_attempts: int = 5,
) -> Intent:
    payload = {"key": key} if payload is None else payload
    return Intent(
        id=new_id("in"),
        key=key,
        kind=kind,
        account=account,
        payload=payload,
        payload_hash=payload_hash(payload),
        created_at=utc(clock.now()),
        not_before=utc(not_before) if not_before is not None else None,
        max_attempts=max_attempts,
    )


async def put(store: Store, *intents: Intent) -> list[str]:
    stored = await store.put_intents([NewIntent(i, S.PENDING, "agent:test") for i in intents])
    return [status.id for status, _ in stored]


async def claim_one(store: Store, owner: str = "ex_a", ttl: float = TTL) -> Claim:
    (claim,) = await store.claim(owner, 10, ttl, [])
    return claim


def gate(clock: FakeClock, kind: str | None = None, account: str | None = None) -> GateRule:
    return GateRule(
        kind=kind, account=account, open=False, actor="ops", changed_at=utc(clock.now())
    )


def by_token(claim: Claim, to: IntentState, **kw: Any) -> Change:
    return Change(
        intent_id=claim.intent.id,
        to_state=to,
        actor=claim.lease.owner,
        action=kw.pop("action", "test"),
        token=claim.lease.token,
        **kw,
    )


def receipt_for(claim: Claim, attempt: int, outcome: Outcome, clock: FakeClock) -> Receipt:
    return Receipt(
        id=new_id("rc"),
        intent_id=claim.intent.id,
        attempt=attempt,
        outcome=outcome,
        executor=claim.lease.owner,
        fencing_token=claim.lease.token,
        finished_at=utc(clock.now()),
    )


async def state_of(store: Store, ref: str) -> IntentState:
    status = await store.get_intent(ref)
    assert status is not None
    return status.state


#: a run that takes longer than this is stuck, not slow
RUN_LIMIT = 20.0


class CountingNoop(NoopConnector):
    """The noop connector, counting its calls."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    async def execute(self, call: Call) -> Result:
        self.calls.append(call)
        return await super().execute(call)


def connector_set(connector: NoopConnector) -> ConnectorSet:
    connectors = ConnectorSet()
    connectors._live["noop"] = connector
    return connectors


async def run(
    store: Store,
    settings: Settings,
    clock: FakeClock,
    connector: NoopConnector | None = None,
    **kw: Any,
) -> ExecutorStats:
    executor = Executor(
        store,
        settings,
        drain=True,
        clock=clock,
        connectors=connector_set(connector) if connector else None,
        **kw,
    )
    return await asyncio.wait_for(executor.run(), RUN_LIMIT)


async def status(store: Store, ref: str) -> IntentStatus:
    found = await store.get_intent(ref)
    assert found is not None
    return found
