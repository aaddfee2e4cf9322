"""The records inside a folder-store transaction file, and their JSON form.

A file is one transaction of one node::

    {"farmhand": "folder/1", "node": "hands", "seq": 42, "lamport": 97, "at": 1800000000.5,
     "records": [{"t": "claim", ...}, ...]}

``seq`` counts the node's files; ``lamport`` is one more than the highest ``lamport`` the
writer had read, so sorting by ``(lamport, node, seq, index)`` gives every reader the same
order, and an event always sorts after everything its writer had seen. Intent events
(``claim``, ``start``, ``change``) name their ``parent``: the event the writer saw last on
that intent (or its ``submit``), so concurrent writes show up as a fork (folder_state.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from farmhand.contracts import Approval, GateRule, Intent, IntentState, Receipt
from farmhand.errors import FarmhandError
from farmhand.store.limits_logic import BreakerRow

FORMAT = "folder/1"


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a record was written: its place in the merged order and its time."""

    lamport: int
    node: str
    seq: int
    index: int
    at: float

    @property
    def eid(self) -> str:
        """The record's id, named by the ``parent`` of the events that follow it."""
        return f"{self.node}/{self.seq}/{self.index}"

    @property
    def order(self) -> tuple[int, str, int, int]:
        """The merged order: the same on every node that has read the same files."""
        return (self.lamport, self.node, self.seq, self.index)


@dataclass(frozen=True, slots=True)
class Submitted:
    origin: Origin
    intent: Intent
    state: IntentState
    actor: str


@dataclass(frozen=True, slots=True)
class Claimed:
    origin: Origin
    intent_id: str
    parent: str
    owner: str
    token: int
    expires: float


@dataclass(frozen=True, slots=True)
class Started:
    origin: Origin
    intent_id: str
    parent: str
    attempt: int
    executor: str
    token: int


@dataclass(frozen=True, slots=True)
class Changed:
    origin: Origin
    intent_id: str
    parent: str
    to: IntentState
    actor: str
    action: str
    reason: str | None
    token: int | None
    ready_at: float
    extra: int
    receipt: Receipt | None


@dataclass(frozen=True, slots=True)
class Renewed:
    origin: Origin
    intent_id: str
    token: int
    expires: float


@dataclass(frozen=True, slots=True)
class Approved:
    origin: Origin
    approval: Approval


@dataclass(frozen=True, slots=True)
class GateSet:
    origin: Origin
    rule: GateRule
    #: per node, the last gate record of this scope the writer had read: what it overrides
    after: dict[str, int]


@dataclass(frozen=True, slots=True)
class BucketSet:
    origin: Origin
    name: str
    tat: float


@dataclass(frozen=True, slots=True)
class Paused:
    origin: Origin
    name: str
    until: float
    reason: str | None


@dataclass(frozen=True, slots=True)
class BreakerSet:
    origin: Origin
    key: str
    row: BreakerRow


@dataclass(frozen=True, slots=True)
class Noted:
    """An audit event without an intent (a pause, a breaker changing state)."""

    origin: Origin
    actor: str
    action: str
    reason: str | None
    detail: dict[str, Any]


Event = Claimed | Started | Changed
Record = (
    Submitted
    | Claimed
    | Started
    | Changed
    | Renewed
    | Approved
    | GateSet
    | BucketSet
    | Paused
    | BreakerSet
    | Noted
)


def encode(record: Record) -> dict[str, Any]:
    """The JSON object for one record (its origin is the file's)."""
    match record:
        case Submitted():
            return {
                "t": "submit",
                "intent": record.intent.model_dump(mode="json"),
                "state": record.state.value,
                "actor": record.actor,
            }
        case Claimed():
            return {
                "t": "claim",
                "intent": record.intent_id,
                "parent": record.parent,
                "owner": record.owner,
                "token": record.token,
                "expires": record.expires,
            }
        case Started():
            return {
                "t": "start",
                "intent": record.intent_id,
                "parent": record.parent,
                "attempt": record.attempt,
                "executor": record.executor,
                "token": record.token,
            }
        case Changed():
            receipt = record.receipt
            return {
                "t": "change",
                "intent": record.intent_id,
                "parent": record.parent,
                "to": record.to.value,
                "actor": record.actor,
                "action": record.action,
                "reason": record.reason,
                "token": record.token,
                "ready_at": record.ready_at,
                "extra": record.extra,
                "receipt": receipt.model_dump(mode="json") if receipt is not None else None,
            }
        case Renewed():
            return {
                "t": "renew",
                "intent": record.intent_id,
                "token": record.token,
                "expires": record.expires,
            }
        case Approved():
            return {"t": "approval", "approval": record.approval.model_dump(mode="json")}
        case GateSet():
            return {"t": "gate", "rule": record.rule.model_dump(mode="json"), "after": record.after}
        case BucketSet():
            return {"t": "bucket", "name": record.name, "tat": record.tat}
        case Paused():
            return {
                "t": "pause",
                "name": record.name,
                "until": record.until,
                "reason": record.reason,
            }
        case BreakerSet():
            return {"t": "breaker", "key": record.key, "row": list(record.row)}
        case Noted():
            return {
                "t": "note",
                "actor": record.actor,
                "action": record.action,
                "reason": record.reason,
                "detail": record.detail,
            }


def _opt_str(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _num(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("expected a number")
    return float(value)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("expected an integer")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _decode(data: dict[str, Any], origin: Origin) -> Record | None:
    kind = data["t"]
    if kind == "submit":
        return Submitted(
            origin, Intent.model_validate(data["intent"]), IntentState(data["state"]), data["actor"]
        )
    if kind in ("claim", "start", "change", "renew"):
        intent_id, token = _str(data["intent"]), data["token"]
        if kind == "renew":
            return Renewed(origin, intent_id, _int(token), _num(data["expires"]))
        parent = _str(data["parent"])
        if kind == "claim":
            return Claimed(
                origin, intent_id, parent, _str(data["owner"]), _int(token), _num(data["expires"])
            )
        if kind == "start":
            return Started(
                origin,
                intent_id,
                parent,
                _int(data["attempt"]),
                _str(data["executor"]),
                _int(token),
            )
        receipt = data["receipt"]
        return Changed(
            origin,
            intent_id,
            parent,
            IntentState(data["to"]),
            _str(data["actor"]),
            _str(data["action"]),
            _opt_str(data["reason"]),
            None if token is None else _int(token),
            _num(data["ready_at"]),
            _int(data["extra"]),
            Receipt.model_validate(receipt) if receipt is not None else None,
        )
    if kind == "approval":
        return Approved(origin, Approval.model_validate(data["approval"]))
    if kind == "gate":
        after = {_str(k): _int(v) for k, v in dict(data["after"]).items()}
        return GateSet(origin, GateRule.model_validate(data["rule"]), after)
    if kind == "bucket":
        return BucketSet(origin, _str(data["name"]), _num(data["tat"]))
    if kind == "pause":
        return Paused(origin, _str(data["name"]), _num(data["until"]), _opt_str(data["reason"]))
    if kind == "breaker":
        state, failures, retry_at, probe, probe_until = data["row"]
        if state not in ("closed", "open", "half_open"):
            raise ValueError(f"unknown breaker state {state!r}")
        row: BreakerRow = (
            state,
            _int(failures),
            None if retry_at is None else _num(retry_at),
            _opt_str(probe),
            None if probe_until is None else _num(probe_until),
        )
        return BreakerSet(origin, _str(data["key"]), row)
    if kind == "note":
        return Noted(
            origin,
            _str(data["actor"]),
            _str(data["action"]),
            _opt_str(data["reason"]),
            dict(data["detail"]),
        )
    return None  # a record type of a newer minor version: not ours to interpret


def decode_file(data: dict[str, Any], node: str, seq: int) -> tuple[int, list[Record]] | None:
    """The lamport number and records of a transaction file read from ``<node>``'s folder
    under number ``seq``; None if it is not a valid file of that node and number."""
    try:
        if data.get("farmhand") != FORMAT or data.get("node") != node or data.get("seq") != seq:
            return None
        lamport, at = _int(data["lamport"]), _num(data["at"])
        records: list[Record] = []
        for index, item in enumerate(data["records"]):
            record = _decode(item, Origin(lamport, node, seq, index, at))
            if record is not None:
                records.append(record)
    except (KeyError, TypeError, ValueError, ValidationError, FarmhandError):
        return None
    return lamport, records


def encode_file(
    node: str, seq: int, lamport: int, at: float, records: list[Record]
) -> dict[str, Any]:
    """The JSON object of one transaction file."""
    return {
        "farmhand": FORMAT,
        "node": node,
        "seq": seq,
        "lamport": lamport,
        "at": at,
        "records": [encode(r) for r in records],
    }
