"""The state of every intent, derived from the records of every writer of a folder store.

Every node computes the same state from the same set of files, whatever order they arrived
in, because each intent's events form a tree (each names its ``parent``) and the tree is
folded by fixed rules:

* One writer's events on an intent form a chain: it always writes after the last event it
  has read. Two events with the same parent were written concurrently on two nodes.
* At such a fork the branch holding a started attempt wins: an effect may have happened,
  so whatever raced with it (a cancel written before the brain had seen the claim) is void.
* Else a branch that ends the intent (cancel, reject, expire...) wins over one that lets it
  run: the executor's claim of an intent that was cancelled meanwhile is void, and its
  lease with it; since the executor checks its lease before every call, no call follows.
* Else the first branch in the merged order wins.
* Two intents submitted under one key on two nodes: the one with a started attempt is kept,
  else the first in the merged order; the other is never run and is audited as lost.

Void events stay in their files; the audit shows them as ``conflict.lost``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from farmhand.contracts import Attempt, AuditEvent, IntentState, Receipt
from farmhand.contracts.base import utc
from farmhand.contracts.state import TERMINAL
from farmhand.store.folder_records import Changed, Claimed, Event, Started, Submitted

S = IntentState
Order = tuple[int, str, int, int]


@dataclass(frozen=True, slots=True)
class Derived:
    """An intent's state at one event of its tree."""

    state: IntentState
    token: int
    owner: str | None
    #: the lease's expiry as its claim set it (renewals are kept beside, see View.expiry)
    expires: float | None
    attempts: int
    max_attempts: int
    ready_at: float
    reason: str | None
    updated_at: float
    receipts: tuple[Receipt, ...]
    last_start: Attempt | None
    #: the id of the event this state is at: the parent of the next event written
    tip: str

    def open_attempt(self) -> Attempt | None:
        """The latest attempt if no receipt closed it (an unknown outcome)."""
        start = self.last_start
        if start is None or any(r.attempt == start.attempt for r in self.receipts):
            return None
        return start


def initial(root: Submitted) -> Derived:
    """The state a submit creates."""
    intent, at = root.intent, root.origin.at
    ready = intent.not_before.timestamp() if intent.not_before else at
    return Derived(
        root.state,
        0,
        None,
        None,
        0,
        intent.max_attempts,
        ready,
        None,
        at,
        (),
        None,
        root.origin.eid,
    )


def step(state: Derived, event: Event) -> Derived:
    """The state after ``event`` (whose precondition its writer checked on ``state``)."""
    at, tip = event.origin.at, event.origin.eid
    if isinstance(event, Claimed):
        return replace(
            state,
            state=S.RUNNING,
            token=event.token,
            owner=event.owner,
            expires=event.expires,
            updated_at=at,
            tip=tip,
        )
    if isinstance(event, Started):
        attempt = Attempt(
            intent_id=event.intent_id,
            attempt=state.attempts + 1,
            executor=event.executor,
            fencing_token=event.token,
            started_at=utc(at),
        )
        return replace(state, attempts=attempt.attempt, last_start=attempt, updated_at=at, tip=tip)
    receipts = state.receipts if event.receipt is None else (*state.receipts, event.receipt)
    return replace(
        state,
        state=event.to,
        reason=event.reason,
        ready_at=event.ready_at,
        owner=None,
        expires=None,
        max_attempts=state.max_attempts + event.extra,
        updated_at=at,
        receipts=receipts,
        tip=tip,
    )


@dataclass(slots=True)
class Fold:
    """One intent's tree, folded: its state, the winning path and what lost."""

    state: Derived
    #: each event on the winning path with the state it left
    path: list[tuple[Event, IntentState]]
    #: each event off the winning path with the sibling that beat its branch
    void: list[tuple[Event, Event]]
    #: an attempt was started somewhere in the tree
    started: bool


def fold(root: Submitted, events: Iterable[Event]) -> Fold:
    """Fold an intent's events by the rules in the module docstring."""
    children: dict[str, list[Event]] = {}
    for event in events:
        children.setdefault(event.parent, []).append(event)
    for kids in children.values():
        kids.sort(key=lambda e: e.origin.order)
    reachable: list[Event] = []
    stack = list(children.get(root.origin.eid, ()))
    while stack:
        event = stack.pop()
        reachable.append(event)
        stack.extend(children.get(event.origin.eid, ()))
    started: dict[str, bool] = {}
    for event in reversed(reachable):  # every child comes after its parent in ``reachable``
        eid = event.origin.eid
        started[eid] = isinstance(event, Started) or any(
            started[c.origin.eid] for c in children.get(eid, ())
        )
    state = initial(root)
    path: list[tuple[Event, IntentState]] = []
    void: list[tuple[Event, Event]] = []
    losers: list[tuple[Event, Event]] = []
    while siblings := children.get(state.tip):
        winner = (
            next((k for k in siblings if started[k.origin.eid]), None)
            or next((k for k in siblings if isinstance(k, Changed) and k.to in TERMINAL), None)
            or siblings[0]
        )
        losers += [(k, winner) for k in siblings if k is not winner]
        path.append((winner, state.state))
        state = step(state, winner)
    while losers:
        event, winner = losers.pop()
        void.append((event, winner))
        losers += [(k, winner) for k in children.get(event.origin.eid, ())]
    return Fold(state, path, void, any(started.values()))


def _what(event: Event) -> tuple[str, str, IntentState]:
    """(actor, action, target state) of an event, for the audit."""
    if isinstance(event, Claimed):
        return event.owner, "claim", S.RUNNING
    if isinstance(event, Started):
        return event.executor, "start", S.RUNNING
    return event.actor, event.action, event.to


def intent_audit(root: Submitted, done: Fold, winner: str) -> list[tuple[Order, AuditEvent]]:
    """The audit events of one intent's tree, each with its place in the merged order.
    ``winner``: the intent kept for its key (another one: this whole tree is void)."""
    iid = root.intent.id
    out: list[tuple[Order, AuditEvent]] = []
    if winner == iid:
        submit = AuditEvent(
            at=utc(root.origin.at),
            actor=root.actor,
            action="submit",
            intent_id=iid,
            to_state=root.state.value,
        )
        out.append((root.origin.order, submit))
        for event, before in done.path:
            if isinstance(event, Started):
                continue
            actor, action, target = _what(event)
            change = AuditEvent(
                at=utc(event.origin.at),
                actor=actor,
                action=action,
                intent_id=iid,
                from_state=before.value,
                to_state=target.value,
                reason=event.reason if isinstance(event, Changed) else None,
            )
            out.append((event.origin.order, change))
        lost = [(e, f"it raced with {_what(w)[1]} by {_what(w)[0]}") for e, w in done.void]
    else:
        why = f"key {root.intent.key!r} was also submitted as {winner}, which is kept"
        lost = [(e, why) for e, _ in done.path] + [(e, why) for e, _ in done.void]
        out.append((root.origin.order, _lost(iid, root, root.actor, "submit", why)))
    for event, why in lost:
        actor, action, _ = _what(event)
        out.append((event.origin.order, _lost(iid, event, actor, action, why)))
    return out


def _lost(iid: str, record: Submitted | Event, actor: str, action: str, why: str) -> AuditEvent:
    return AuditEvent(
        at=utc(record.origin.at),
        actor=actor,
        action="conflict.lost",
        intent_id=iid,
        reason=f"{action} written on node {record.origin.node} was not applied: {why}",
        detail={"lost": action, "node": record.origin.node},
    )
