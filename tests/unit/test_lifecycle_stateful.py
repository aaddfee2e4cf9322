"""A state machine driving a real SQLite store through the whole intent lifecycle.

Rules play brain, hands and human: submit (with repeated keys), claim, start attempts,
finish them with every kind of result, let leases expire and take them over, reconcile,
cancel, resolve, re-queue and move the clock. After every step the audit log, fencing
and receipts are checked against the rules of the lifecycle.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import tempfile
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from farmhand.canonical import payload_hash
from farmhand.clock import FakeClock
from farmhand.config import RetryConfig
from farmhand.connectors import Absent, Failed, Reconciled, Result, Succeeded, Uncertain
from farmhand.contracts import Attempt, IntentState, IntentStatus, Lease, Outcome
from farmhand.contracts.base import utc
from farmhand.contracts.state import CLAIMABLE, allowed
from farmhand.coordinator import REQUEUE_ATTEMPTS, Coordinator, SubmitRequest
from farmhand.errors import ConflictError, InvalidTransition
from farmhand.executor import outcomes
from farmhand.store import Change, Claim, IntentQuery, Store, open_store

T = TypeVar("T")
S = IntentState

TTL = 30.0
RETRY = RetryConfig(base_delay=0.01, max_delay=0.05)
KEYS = [f"key-{i}" for i in range(6)]
#: how many of the most recent stale leases the fencing invariant probes each step
FENCE_PROBES = 3

RESULTS: dict[str, Result] = {
    "success": Succeeded(external_id="ext-1"),
    "retryable": Failed(error="try later", retryable=True),
    "permanent": Failed(error="never", retryable=False),
    "uncertain": Uncertain(error="timed out mid-call"),
}
FOUND: dict[str, Reconciled] = {
    "found": Succeeded(external_id="ext-found"),
    "absent": Absent(reason="not there"),
    "uncertain": Uncertain(error="cannot tell"),
}
CANCELLABLE = (S.PENDING, S.AWAITING_APPROVAL, S.RETRY_WAIT)
REFUSALS = {S.PENDING: "release", S.EXPIRED: "expire", S.DEAD: "dead_letter"}
picks = st.integers(min_value=0, max_value=10_000)


@dataclass
class Held:
    """A lease the model holds, and the attempt it started under it (if any)."""

    claim: Claim
    #: when the lease expires, exactly as the store computed it (epoch seconds)
    expires: float
    attempt: Attempt | None = None


class LifecycleMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.folder = Path(tempfile.mkdtemp(prefix="farmhand-stateful-"))
        self.clock = FakeClock()
        self.store: Store | None = None
        self.reader: sqlite3.Connection | None = None
        path = self.folder / "farmhand.db"
        self.store = self.run(open_store(f"sqlite://{path}", self.clock))
        self.reader = sqlite3.connect(path, isolation_level=None)
        self.coordinator = Coordinator(self.store, self.clock)
        # the model
        self.by_key: dict[str, tuple[str, str]] = {}  # key -> (intent id, payload hash)
        self.held: dict[str, Held] = {}  # intent id -> the current lease
        self.open: dict[str, int] = {}  # intent id -> attempt started without a receipt
        self.attempts: dict[str, int] = {}
        self.tokens: dict[str, int] = {}
        self.stale: list[Lease] = []
        self.owners = 0

    # -- plumbing ---------------------------------------------------------------------------

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            if self.reader is not None:
                self.reader.close()
            if self.store is not None:
                self.run(self.store.close())
        finally:
            self.loop.close()
            shutil.rmtree(self.folder, ignore_errors=True)

    @property
    def db(self) -> Store:
        assert self.store is not None
        return self.store

    def status(self, intent_id: str) -> IntentStatus:
        found = self.run(self.db.get_intent(intent_id))
        assert found is not None
        return found

    def all_statuses(self) -> list[IntentStatus]:
        return self.run(self.db.list_intents(IntentQuery(limit=1000)))

    def ids(self) -> list[str]:
        return sorted(intent_id for intent_id, _ in self.by_key.values())

    @staticmethod
    def choose(items: list[T], pick: int) -> T:
        return items[pick % len(items)]

    def choose_intent(self, pick: int, targeted: bool, *states: IntentState) -> str:
        """Any intent, or (when ``targeted`` and one exists) one in one of ``states``."""
        if targeted:
            fitting = sorted(s.id for s in self.all_statuses() if s.state in states)
            if fitting:
                return self.choose(fitting, pick)
        return self.choose(self.ids(), pick)

    def apply_one(self, change: Change) -> bool:
        (ok,) = self.run(self.db.apply([change]))
        return ok

    def retire(self, intent_id: str) -> Held:
        """The current holder wrote its outcome; its lease is now stale."""
        held = self.held.pop(intent_id)
        self.stale.append(held.claim.lease)
        return held

    def take(self, claims: list[Claim]) -> None:
        now = self.clock.now()
        for claim in claims:
            intent_id = claim.intent.id
            assert claim.lease.token > self.tokens.get(intent_id, 0)
            self.tokens[intent_id] = claim.lease.token
            assert claim.lease.expires_at == utc(now + TTL)
            previous = self.held.pop(intent_id, None)
            if previous is not None:
                # a takeover: only of an expired lease, which is fenced from now on
                assert claim.previous_state is S.RUNNING
                assert previous.expires <= now
                self.stale.append(previous.claim.lease)
            else:
                assert claim.previous_state in CLAIMABLE
            assert claim.attempts == self.attempts.get(intent_id, 0)
            open_attempt = claim.open_attempt.attempt if claim.open_attempt else None
            assert open_attempt == self.open.get(intent_id)
            self.held[intent_id] = Held(claim, now + TTL)

    def claimable(self) -> set[str]:
        """Intents a claim may return now: ready to run, or running on an expired lease."""
        assert self.reader is not None
        now = self.clock.now()
        ready = {
            intent_id
            for (intent_id,) in self.reader.execute(
                "SELECT id FROM intents WHERE state IN ('pending', 'retry_wait') AND ready_at <= ?",
                (now,),
            )
        }
        expired = {intent_id for intent_id, held in self.held.items() if held.expires <= now}
        return ready | expired

    def claim(self, limit: int) -> list[Claim]:
        candidates = self.claimable()
        self.owners += 1
        claims = self.run(self.db.claim(f"ex_{self.owners}", limit, TTL, []))
        got = {c.intent.id for c in claims}
        assert got <= candidates
        assert len(got) == len(claims) == min(limit, len(candidates))
        self.take(claims)
        return claims

    def reconcile(self, held: Held, found: str) -> None:
        claim = held.claim
        assert claim.open_attempt is not None
        change = outcomes.after_reconcile(claim, claim.open_attempt, FOUND[found], self.clock.now())
        assert self.apply_one(change)
        self.retire(claim.intent.id)
        self.open.pop(claim.intent.id)
        n = claim.open_attempt.attempt
        expected = {
            "found": S.SUCCEEDED,
            # an interrupted last attempt may have taken effect: a human decides (64d2303)
            "absent": S.UNKNOWN if n >= claim.max_attempts else S.RETRY_WAIT,
            "uncertain": S.UNKNOWN,
        }[found]
        assert self.status(claim.intent.id).state is expected

    def held_where(self, *, started: bool | None = None, reconciling: bool = False) -> list[str]:
        out = []
        for intent_id, held in sorted(self.held.items()):
            if reconciling != (held.claim.open_attempt is not None and intent_id in self.open):
                continue
            if started is not None and started != (held.attempt is not None):
                continue
            out.append(intent_id)
        return out

    # -- the brain ----------------------------------------------------------------------------

    @initialize(count=st.integers(min_value=1, max_value=3))
    def some_work(self, count: int) -> None:
        for key in KEYS[:count]:
            self.submit(key, variant=0, max_attempts=2)

    @rule(
        key=st.sampled_from(KEYS),
        variant=st.integers(min_value=0, max_value=1),
        max_attempts=st.integers(min_value=1, max_value=3),
    )
    def submit(self, key: str, variant: int, max_attempts: int) -> None:
        payload = {"v": variant}
        request = SubmitRequest(kind="noop", key=key, payload=payload, max_attempts=max_attempts)
        known = self.by_key.get(key)
        if known is not None and known[1] != payload_hash(payload):
            with pytest.raises(ConflictError) as conflict:
                self.run(self.coordinator.submit(request))
            assert known[1] in str(conflict.value)
            assert payload_hash(payload) in str(conflict.value)
            return
        submitted = self.run(self.coordinator.submit(request))
        if known is None:
            assert submitted.created
            assert submitted.status.state is S.PENDING
            self.by_key[key] = (submitted.status.id, payload_hash(payload))
        else:
            assert not submitted.created
            assert submitted.status.id == known[0]

    # -- the hands ----------------------------------------------------------------------------

    @rule(limit=st.integers(min_value=1, max_value=3))
    def claim_ready(self, limit: int) -> None:
        self.claim(limit)

    def start(self, intent_id: str) -> Attempt | None:
        held = self.held[intent_id]
        lease = held.claim.lease
        (attempt,) = self.run(self.db.start_attempts([lease]))
        if held.expires <= self.clock.now():
            assert attempt is None  # too late: the lease has expired
            return None
        assert attempt is not None
        n = self.attempts.get(intent_id, 0) + 1
        assert attempt.attempt == n
        assert attempt.fencing_token == lease.token
        self.attempts[intent_id] = n
        self.open[intent_id] = n
        held.attempt = attempt
        return attempt

    def finish(self, intent_id: str, result: str) -> None:
        held = self.held[intent_id]
        assert held.attempt is not None
        change = outcomes.after_call(
            held.claim, held.attempt, RESULTS[result], self.clock.now(), RETRY
        )
        # the token is current (no takeover happened), even if the lease has expired
        assert self.apply_one(change)
        self.retire(intent_id)
        self.open.pop(intent_id)
        n = held.attempt.attempt
        expected = {
            "success": S.SUCCEEDED,
            "retryable": S.DEAD if n >= held.claim.max_attempts else S.RETRY_WAIT,
            "permanent": S.DEAD,
            "uncertain": S.UNKNOWN,
        }[result]
        assert self.status(intent_id).state is expected

    @precondition(lambda self: bool(self.held_where(started=False)))
    @rule(pick=picks)
    def start_attempt(self, pick: int) -> None:
        self.start(self.choose(self.held_where(started=False), pick))

    @precondition(lambda self: bool(self.held_where(started=True)))
    @rule(pick=picks, result=st.sampled_from(sorted(RESULTS)))
    def finish_attempt(self, pick: int, result: str) -> None:
        self.finish(self.choose(self.held_where(started=True), pick), result)

    @rule(result=st.sampled_from(sorted(RESULTS)), found=st.sampled_from(sorted(FOUND)))
    def execute_one(self, result: str, found: str) -> None:
        """What an executor does with one claim: reconcile, or start and finish an attempt."""
        for claim in self.claim(limit=1):
            intent_id = claim.intent.id
            if claim.open_attempt is not None:
                self.reconcile(self.held[intent_id], found)
            elif self.start(intent_id) is not None:
                self.finish(intent_id, result)

    @precondition(lambda self: bool(self.held_where(started=False)))
    @rule(pick=picks, to=st.sampled_from(sorted(REFUSALS)))
    def refuse(self, pick: int, to: IntentState) -> None:
        intent_id = self.choose(self.held_where(started=False), pick)
        claim = self.held[intent_id].claim
        change = outcomes.refuse(claim, to, REFUSALS[to], "refused in test", self.clock.now())
        assert self.apply_one(change)
        self.retire(intent_id)
        assert self.status(intent_id).state is to

    @precondition(lambda self: bool(self.held_where(reconciling=True)))
    @rule(pick=picks, found=st.sampled_from(sorted(FOUND)))
    def reconcile_open_attempt(self, pick: int, found: str) -> None:
        intent_id = self.choose(self.held_where(reconciling=True), pick)
        self.reconcile(self.held[intent_id], found)

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data())
    def expire_and_take_over(self, data: st.DataObject) -> None:
        self.clock.advance(TTL + 1)
        claims = self.claim(limit=10)
        assert not self.held.keys() - {c.intent.id for c in claims}  # every lease taken over
        for claim in claims:
            if claim.open_attempt is not None:
                found = data.draw(st.sampled_from(sorted(FOUND)), label=claim.intent.id)
                self.reconcile(self.held[claim.intent.id], found)

    # -- the human ----------------------------------------------------------------------------

    @precondition(lambda self: bool(self.by_key))
    @rule(pick=picks, targeted=st.booleans())
    def cancel(self, pick: int, targeted: bool) -> None:
        intent_id = self.choose_intent(pick, targeted, *CANCELLABLE)
        before = self.status(intent_id).state
        try:
            after = self.run(self.coordinator.cancel(intent_id, "human:ops"))
        except InvalidTransition:
            assert before not in CANCELLABLE
        else:
            assert before in CANCELLABLE
            assert after.state is S.CANCELLED

    @precondition(lambda self: bool(self.by_key))
    @rule(
        pick=picks, targeted=st.booleans(), outcome=st.sampled_from(["succeeded", "retry", "fail"])
    )
    def resolve(self, pick: int, targeted: bool, outcome: str) -> None:
        intent_id = self.choose_intent(pick, targeted, S.UNKNOWN)
        before = self.status(intent_id)
        try:
            after = self.run(self.coordinator.resolve(intent_id, outcome, "human:ops"))
        except InvalidTransition:
            assert before.state is not S.UNKNOWN
            return
        assert before.state is S.UNKNOWN
        expected = {"succeeded": S.SUCCEEDED, "retry": S.PENDING, "fail": S.DEAD}[outcome]
        assert after.state is expected
        if outcome == "retry":
            assert after.max_attempts > after.attempts
            assert after.max_attempts - before.max_attempts in (0, 1)

    @precondition(lambda self: bool(self.by_key))
    @rule(pick=picks, targeted=st.booleans())
    def requeue(self, pick: int, targeted: bool) -> None:
        intent_id = self.choose_intent(pick, targeted, S.DEAD)
        before = self.status(intent_id)
        try:
            after = self.run(self.coordinator.requeue(intent_id, "human:ops"))
        except InvalidTransition:
            assert before.state is not S.DEAD
            return
        assert before.state is S.DEAD
        assert after.state is S.PENDING
        assert after.max_attempts == before.max_attempts + REQUEUE_ATTEMPTS

    @rule(seconds=st.sampled_from([0.001, 0.01, 0.05, 1.0, TTL / 2, TTL + 1]))
    def advance_clock(self, seconds: float) -> None:
        self.clock.advance(seconds)

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def audit_history_follows_the_lifecycle(self) -> None:
        for status in self.all_statuses():
            events = list(reversed(self.run(self.db.audit(status.id, limit=100_000))))
            first, *rest = events
            assert (first.action, first.from_state, first.to_state) == ("submit", None, "pending")
            state = S.PENDING
            for event in rest:
                assert event.from_state == state, (status.id, event)
                assert event.to_state is not None
                target = S(event.to_state)
                assert allowed(state, target), (status.id, event)
                state = target
            assert state is status.state

    @invariant()
    def running_intents_are_the_ones_held(self) -> None:
        running = {s.id for s in self.all_statuses() if s.state is S.RUNNING}
        assert running == set(self.held)
        for intent_id, held in self.held.items():
            status = self.status(intent_id)
            assert status.lease_token == held.claim.lease.token
            assert status.lease_owner == held.claim.lease.owner

    @invariant()
    def stale_tokens_are_fenced(self) -> None:
        for lease in self.stale[-FENCE_PROBES:]:
            change = Change(
                intent_id=lease.intent_id,
                to_state=S.SUCCEEDED,
                actor=lease.owner,
                action="succeed",
                token=lease.token,
            )
            assert self.run(self.db.apply([change])) == [False]
            assert self.run(self.db.renew([lease], TTL)) == [None]
            assert self.run(self.db.start_attempts([lease])) == [None]

    @invariant()
    def receipts_match_states(self) -> None:
        for status in self.all_statuses():
            outcomes_ = [r.outcome for r in status.receipts]
            succeeded = outcomes_.count(Outcome.SUCCEEDED)
            if status.state is S.SUCCEEDED:
                assert succeeded == 1
                assert outcomes_[-1] is Outcome.SUCCEEDED
            else:
                assert succeeded == 0
            if status.state is S.DEAD:
                assert Outcome.FAILED in outcomes_
                assert outcomes_[-1] is Outcome.FAILED
            if status.state is S.UNKNOWN:
                assert outcomes_[-1] is Outcome.UNKNOWN
            for receipt in status.receipts:
                assert receipt.intent_id == status.id
                assert receipt.attempt <= status.attempts
                assert receipt.fencing_token <= status.lease_token

    @invariant()
    def attempts_match_attempt_rows(self) -> None:
        assert self.reader is not None
        rows = dict(
            self.reader.execute("SELECT intent_id, count(*) FROM attempts GROUP BY intent_id")
        )
        for status in self.all_statuses():
            assert status.attempts == rows.get(status.id, 0) == self.attempts.get(status.id, 0)


LifecycleMachine.TestCase.settings = settings(
    max_examples=30, stateful_step_count=30, deadline=None
)
TestLifecycle = LifecycleMachine.TestCase
