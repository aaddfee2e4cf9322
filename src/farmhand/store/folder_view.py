"""Everything a node has read from a folder store, and the state merged from it.

Records are added file by file as they are read; an intent's state is re-folded (see
folder_state.py) only when it received records. Gates, rate-limit buckets and breakers are
merged here too, by the rules in their methods' docstrings.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from farmhand.contracts import AuditEvent, GateRule, Intent, IntentState, IntentStatus, Receipt
from farmhand.contracts.base import utc
from farmhand.contracts.state import ACTIVE
from farmhand.gates import blocking
from farmhand.store.base import intent_status
from farmhand.store.folder_records import (
    Approved,
    BreakerSet,
    BucketSet,
    Changed,
    Claimed,
    Event,
    GateSet,
    Noted,
    Origin,
    Paused,
    Record,
    Renewed,
    Started,
    Submitted,
)
from farmhand.store.folder_state import Derived, Fold, Order, fold, initial, intent_audit, step
from farmhand.store.limits_logic import BreakerRow, BucketRow

S = IntentState


@dataclass(slots=True)
class _Limits:
    tats: dict[str, float] = field(default_factory=dict)
    pauses: dict[str, Paused] = field(default_factory=dict)
    breakers: dict[tuple[str, str], BreakerSet] = field(default_factory=dict)


class View:
    """Everything read from a folder store so far, and the state derived from it.

    Records are added as files are read; derived state is recomputed lazily, only for the
    intents that received records since (see :meth:`settle`).
    """

    def __init__(self) -> None:
        #: the highest lamport number read: a new file gets one more
        self.lamport = 0
        #: moves with every record added
        self.version = 0
        #: visible intents that are pending, retry-waiting or running
        self.active: set[str] = set()
        self._roots: dict[str, Submitted] = {}
        self._events: dict[str, list[Event]] = {}
        self._renewals: dict[tuple[str, int], Renewed] = {}
        self._tokens: dict[str, int] = {}
        self._by_key: dict[str, list[str]] = {}
        self._winner: dict[str, str] = {}
        self._folds: dict[str, Fold] = {}
        self._order: list[tuple[Order, str]] = []
        self._dirty: set[str] = set()
        self._dirty_keys: set[str] = set()
        self._approvals: dict[str, list[Approved]] = {}
        self._gates: list[GateSet] = []
        self._limits = _Limits()
        self._notes: list[Noted] = []
        self._audit: tuple[int, list[AuditEvent]] = (-1, [])
        self._receipts: tuple[int, list[Receipt]] = (-1, [])

    # -- adding records -----------------------------------------------------------------

    def add(self, lamport: int, records: Iterable[Record]) -> None:
        """Take in the records of one file."""
        self.lamport = max(self.lamport, lamport)
        self.version += 1
        for record in records:
            self._add(record)

    def _add(self, record: Record) -> None:
        match record:
            case Submitted():
                self._add_root(record)
            case Claimed() | Started() | Changed():
                self._events.setdefault(record.intent_id, []).append(record)
                self._dirty.add(record.intent_id)
                if isinstance(record, Claimed):
                    known_token = self._tokens.get(record.intent_id, 0)
                    self._tokens[record.intent_id] = max(known_token, record.token)
            case Renewed():
                key = (record.intent_id, record.token)
                known = self._renewals.get(key)
                if known is None or known.origin.order < record.origin.order:
                    self._renewals[key] = record
            case Approved():
                found = self._approvals.setdefault(record.approval.intent_id, [])
                found.append(record)
                found.sort(key=lambda a: a.origin.order)
            case GateSet():
                self._gates.append(record)
            case BucketSet():
                self._limits.tats[record.name] = max(
                    record.tat, self._limits.tats.get(record.name, 0.0)
                )
            case Paused():
                known_pause = self._limits.pauses.get(record.name)
                if known_pause is None or (known_pause.until, known_pause.origin.order) < (
                    record.until,
                    record.origin.order,
                ):
                    self._limits.pauses[record.name] = record
            case BreakerSet():
                slot = (record.key, record.origin.node)
                known_row = self._limits.breakers.get(slot)
                if known_row is None or known_row.origin.order < record.origin.order:
                    self._limits.breakers[slot] = record
            case Noted():
                self._notes.append(record)

    def _add_root(self, record: Submitted) -> None:
        iid = record.intent.id
        known = self._roots.get(iid)
        if known is not None:
            # one id submitted twice (a copied file): the first in the merged order stands
            if known.origin.order <= record.origin.order:
                return
            self._by_key[known.intent.key].remove(iid)
            self._order.remove((known.origin.order, iid))
            self._dirty_keys.add(known.intent.key)
        self._roots[iid] = record
        self._by_key.setdefault(record.intent.key, []).append(iid)
        bisect.insort(self._order, (record.origin.order, iid))
        self._dirty.add(iid)

    def settle(self) -> None:
        """Fold the intents that received records, and re-judge their keys."""
        if not self._dirty and not self._dirty_keys:
            return
        keys, self._dirty_keys = self._dirty_keys, set()
        for iid in self._dirty:
            root = self._roots.get(iid)
            if root is not None:
                self._folds[iid] = fold(root, self._events.get(iid, ()))
                keys.add(root.intent.key)
        self._dirty.clear()
        for key in keys:
            ids = self._by_key[key]
            if not ids:
                self._winner.pop(key, None)
                continue
            pool = [i for i in ids if self._folds[i].started] or ids
            winner = min(pool, key=lambda i: self._roots[i].origin.order)
            self._winner[key] = winner
            for iid in ids:
                if iid == winner and self._folds[iid].state.state in ACTIVE:
                    self.active.add(iid)
                else:
                    self.active.discard(iid)

    # -- intents ------------------------------------------------------------------------

    def derived(self, iid: str) -> Derived | None:
        """The current state of a visible intent (None: unknown, or lost its key)."""
        self.settle()
        root = self._roots.get(iid)
        if root is None or self._winner.get(root.intent.key) != iid:
            return None
        return self._folds[iid].state

    def intent(self, iid: str) -> Intent:
        """The intent with this id (known to exist)."""
        return self._roots[iid].intent

    def find(self, ref: str) -> str | None:
        """The visible intent with id ``ref``, else the one with key ``ref``."""
        if self.derived(ref) is not None:
            return ref
        return self.by_key(ref)

    def by_key(self, key: str) -> str | None:
        """The visible intent holding ``key``."""
        self.settle()
        return self._winner.get(key)

    def expiry(self, iid: str, state: Derived) -> float | None:
        """When the current lease ends: its claim's expiry, or its latest renewal's."""
        renewal = self._renewals.get((iid, state.token))
        return renewal.expires if renewal is not None else state.expires

    def max_token(self, iid: str) -> int:
        """The highest fencing token any claim of this intent carried, on any branch: a new
        lease must beat it, or a lease whose claim lost a race could pass as current."""
        return self._tokens.get(iid, 0)

    def status(self, iid: str) -> IntentStatus:
        """The contract view of a visible intent."""
        self.settle()
        state = self._folds[iid].state
        return intent_status(
            self._roots[iid].intent.model_dump(),
            state=state.state,
            attempts=state.attempts,
            max_attempts=state.max_attempts,
            reason=state.reason,
            updated_at=state.updated_at,
            ready_at=state.ready_at,
            lease_owner=state.owner,
            lease_token=state.token,
            receipts=state.receipts,
        )

    def newest_first(self) -> Iterator[str]:
        """Visible intents, last submitted first."""
        for _, iid in reversed(self._order):
            if self.derived(iid) is not None:
                yield iid

    def counts(self) -> dict[IntentState, int]:
        """Visible intents per state."""
        self.settle()
        out: dict[IntentState, int] = {}
        for iid in self._winner.values():
            state = self._folds[iid].state.state
            out[state] = out.get(state, 0) + 1
        return out

    def candidates(
        self, now: float, closed: Sequence[GateRule]
    ) -> tuple[list[tuple[float, Order, str]], list[tuple[float, Order, str]]]:
        """Active intents not blocked by ``closed``: (running with their lease expiry,
        waiting with their ready time), each sorted by that time."""
        self.settle()
        leased, waiting = [], []
        for iid in self.active:
            root = self._roots[iid]
            if blocking(closed, root.intent.kind, root.intent.account) is not None:
                continue
            state = self._folds[iid].state
            if state.state is S.RUNNING:
                leased.append((self.expiry(iid, state) or now, root.origin.order, iid))
            else:
                waiting.append((state.ready_at, root.origin.order, iid))
        return sorted(leased), sorted(waiting)

    def approvals(self, iid: str) -> list[Approved]:
        """Every decision recorded on an intent, in the merged order."""
        return list(self._approvals.get(iid, ()))

    def receipts(self) -> list[Receipt]:
        """Receipts on every visible intent's winning path, oldest first."""
        self.settle()
        if self._receipts[0] != self.version:
            found: list[tuple[Order, Receipt]] = []
            for iid in self._winner.values():
                for event, _ in self._folds[iid].path:
                    if isinstance(event, Changed) and event.receipt is not None:
                        found.append((event.origin.order, event.receipt))
            found.sort(key=lambda item: item[0])
            self._receipts = (self.version, [r for _, r in found])
        return self._receipts[1]

    # -- gates and limits ---------------------------------------------------------------

    def _latest_gates(self) -> dict[tuple[str, str], dict[str, GateSet]]:
        latest: dict[tuple[str, str], dict[str, GateSet]] = {}
        for record in self._gates:
            per_node = latest.setdefault((record.rule.kind or "", record.rule.account or ""), {})
            known = per_node.get(record.origin.node)
            if known is None or known.origin.order < record.origin.order:
                per_node[record.origin.node] = record
        return latest

    def gates(self) -> list[GateRule]:
        """The rule in force for every scope ever set.

        Per scope, each node's latest rule is a candidate; a candidate that another one's
        writer had read (``after``) is overridden by it. Candidates left over were set
        concurrently on two nodes: closed wins, then the later ``changed_at``.
        """
        rules = []
        for _, per_node in sorted(self._latest_gates().items()):
            candidates = list(per_node.values())
            live = [
                c
                for c in candidates
                if not any(o.after.get(c.origin.node, 0) >= c.origin.seq for o in candidates)
            ]
            best = min(
                live or candidates,
                key=lambda c: (c.rule.open, -c.rule.changed_at.timestamp(), c.origin.node),
            )
            rules.append(best.rule)
        return rules

    def gate_after(self, kind: str | None, account: str | None) -> dict[str, int]:
        """Per node, the last gate record of this scope read so far."""
        per_node = self._latest_gates().get((kind or "", account or ""), {})
        return {node: record.origin.seq for node, record in per_node.items()}

    def bucket_rows(self, names: Iterable[str]) -> dict[str, BucketRow]:
        """The merged state of the rate-limit buckets named (absent: never used)."""
        rows: dict[str, BucketRow] = {}
        for name in names:
            tat = self._limits.tats.get(name)
            pause = self._limits.pauses.get(name)
            if tat is not None or pause is not None:
                until, why = (pause.until, pause.reason) if pause else (0.0, None)
                rows[name] = (tat or 0.0, until, why)
        return rows

    def breaker_rows(self, keys: Iterable[str]) -> dict[str, BreakerRow]:
        """The merged state of the breakers named (absent: closed without failures)."""
        best: dict[str, BreakerSet] = {}
        wanted = set(keys)
        for (key, _), record in self._limits.breakers.items():
            if key not in wanted:
                continue
            known = best.get(key)
            if known is None or (known.origin.at, known.origin.node) < (
                record.origin.at,
                record.origin.node,
            ):
                best[key] = record
        return {key: record.row for key, record in best.items()}

    # -- audit --------------------------------------------------------------------------

    def audit(self) -> list[AuditEvent]:
        """Every audit event, oldest first, numbered in the merged order."""
        if self._audit[0] == self.version:
            return self._audit[1]
        self.settle()
        items: list[tuple[Order, AuditEvent]] = []
        for iid, root in self._roots.items():
            items += intent_audit(root, self._folds[iid], self._winner[root.intent.key])
        for records in self._approvals.values():
            for approved in records:
                a = approved.approval
                detail = {
                    "approval": a.id,
                    "payload_hash": a.payload_hash,
                    "expires_at": a.expires_at.isoformat(),
                }
                event = AuditEvent(
                    at=a.created_at,
                    actor=a.approver,
                    action=f"approval.{a.decision.value}",
                    intent_id=a.intent_id,
                    reason=a.reason,
                    detail=detail,
                )
                items.append((approved.origin.order, event))
        for gate in self._gates:
            rule = gate.rule
            event = AuditEvent(
                at=rule.changed_at,
                actor=rule.actor,
                action="gate.open" if rule.open else "gate.close",
                reason=rule.reason,
                detail={"kind": rule.kind, "account": rule.account},
            )
            items.append((gate.origin.order, event))
        for note in self._notes:
            event = AuditEvent(
                at=utc(note.origin.at),
                actor=note.actor,
                action=note.action,
                reason=note.reason,
                detail=note.detail,
            )
            items.append((note.origin.order, event))
        items.sort(key=lambda item: item[0])
        events = [e.model_copy(update={"seq": n}) for n, (_, e) in enumerate(items, 1)]
        self._audit = (self.version, events)
        return events


class Batch:
    """The records of one transaction being prepared, each checked against the view plus
    what the batch itself already did."""

    def __init__(self, view: View, node: str, seq: int, at: float) -> None:
        self.view, self.node, self.seq, self.at = view, node, seq, at
        self.lamport = view.lamport + 1
        self.records: list[Record] = []
        self._staged: dict[str, Derived] = {}
        self._keys: dict[str, str] = {}
        self._renewed: dict[tuple[str, int], float] = {}
        self._tokens: dict[str, int] = {}

    def origin(self) -> Origin:
        """The origin of the next record."""
        return Origin(self.lamport, self.node, self.seq, len(self.records), self.at)

    def current(self, iid: str) -> Derived | None:
        """The intent's state with this batch's records applied."""
        return self._staged.get(iid) or self.view.derived(iid)

    def expiry(self, iid: str, state: Derived) -> float | None:
        """The lease's expiry with this batch's renewals."""
        return self._renewed.get((iid, state.token)) or self.view.expiry(iid, state)

    def next_token(self, iid: str) -> int:
        """The fencing token of a new claim: above every token this intent ever had."""
        state = self.current(iid)
        known = max(self._tokens.get(iid, 0), self.view.max_token(iid))
        return max(known, state.token if state is not None else 0) + 1

    def find_key(self, key: str) -> str | None:
        """The intent holding ``key``, submitted before or in this batch."""
        return self._keys.get(key) or self.view.by_key(key)

    def add(self, record: Record) -> None:
        """Append a record; intent records also move the staged state."""
        self.records.append(record)
        if isinstance(record, Submitted):
            self._keys[record.intent.key] = record.intent.id
            self._staged[record.intent.id] = initial(record)
        elif isinstance(record, Claimed | Started | Changed):
            state = self.current(record.intent_id)
            assert state is not None
            self._staged[record.intent_id] = step(state, record)
            if isinstance(record, Claimed):
                self._tokens[record.intent_id] = record.token
        elif isinstance(record, Renewed):
            self._renewed[(record.intent_id, record.token)] = record.expires
