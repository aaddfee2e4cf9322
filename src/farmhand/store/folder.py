"""The shared-folder store: ``folder:///absolute/path?node=NAME``, no server.

Made to be synced between two machines (Syncthing or similar): the brain on one, the one
executor host on the other. Every file has exactly one writer, the node named in its path,
and is never rewritten; state is merged from every node's files (folder_view.py). Leases
never cross machines: only the executor host claims, and its processes exclude each other
with a host-local lock. See docs/stores/folder.md.

All file I/O runs on one dedicated thread per store, so the event loop never blocks on disk.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from farmhand import gates as gate_rules
from farmhand.clock import Clock, SystemClock
from farmhand.config import BreakerConfig
from farmhand.contracts import (
    Approval,
    Attempt,
    AuditEvent,
    GateRule,
    IntentState,
    IntentStatus,
    Lease,
    Receipt,
)
from farmhand.contracts.base import utc
from farmhand.contracts.state import allowed
from farmhand.errors import InvalidTransition, StoreError
from farmhand.store.base import (
    Admitted,
    BreakerResult,
    BreakerStatus,
    Bucket,
    Change,
    Claim,
    Guard,
    Held,
    IntentQuery,
    NewIntent,
    Readiness,
    Throttle,
)
from farmhand.store.folder_journal import NODE_ENV, Journal, node_id, parse_url
from farmhand.store.folder_limits import FolderLimits
from farmhand.store.folder_records import (
    Approved,
    BucketSet,
    Changed,
    Claimed,
    GateSet,
    Renewed,
    Started,
    Submitted,
)
from farmhand.store.folder_view import Batch
from farmhand.store.limits_logic import BucketRow, admit, guarded_rows, held_by

T = TypeVar("T")

_MIN_POLL, _MAX_POLL = 0.001, 0.010
_WAITING = (IntentState.PENDING, IntentState.RETRY_WAIT)

__all__ = ["NODE_ENV", "FolderStore", "folder_root"]


def folder_root(url: str) -> Path:
    """The root folder a ``folder:`` URL names."""
    return parse_url(url)[0]


class FolderStore:
    """A Store on a shared folder. Create with :meth:`open`."""

    def __init__(self, root: Path, node: str, clock: Clock | None = None) -> None:
        self.root = root
        self.node = node
        self.url = f"folder://{root}"
        self._journal = Journal(root, node, clock or SystemClock())
        self._limits = FolderLimits(self._journal)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="farmhand-folder")
        self._closed = False

    @classmethod
    async def open(cls, url: str, clock: Clock | None = None) -> FolderStore:
        """Open (creating if needed) the folder a ``folder:`` URL names, as this machine's
        node: ``?node=NAME``, else ``FARMHAND_NODE``, else the host name."""
        root, given = parse_url(url)
        store = cls(root, node_id(given), clock)
        try:
            await store._run(store._journal.open)
        except BaseException:
            await store.close()
            raise
        return store

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise StoreError(f"the folder store {self.root} is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, fn, *args)
        except OSError as exc:
            raise StoreError(
                f"folder store {self.root}: cannot use {exc.filename or 'a file'} "
                f"({exc.strerror or exc}); check its permissions and free space"
            ) from exc

    # -- intents ----------------------------------------------------------------------

    async def put_intents(self, items: Sequence[NewIntent]) -> list[tuple[IntentStatus, bool]]:
        journal = self._journal

        def run() -> list[tuple[IntentStatus, bool]]:
            with journal.locked():
                batch = journal.batch()
                results: list[tuple[str, bool]] = []
                for item in items:
                    existing = batch.find_key(item.intent.key)
                    if existing is not None:
                        results.append((existing, False))
                        continue
                    batch.add(Submitted(batch.origin(), item.intent, item.state, item.actor))
                    results.append((item.intent.id, True))
                journal.commit(batch, "queues")
            return [(journal.view.status(iid), created) for iid, created in results]

        return await self._run(run)

    async def get_intent(self, ref: str) -> IntentStatus | None:
        def run() -> IntentStatus | None:
            self._journal.refresh()
            iid = self._journal.view.find(ref)
            return self._journal.view.status(iid) if iid is not None else None

        return await self._run(run)

    async def list_intents(self, query: IntentQuery) -> list[IntentStatus]:
        view = self._journal.view

        def run() -> list[IntentStatus]:
            self._journal.refresh()
            out: list[IntentStatus] = []
            for iid in view.newest_first():
                intent, state = view.intent(iid), view.derived(iid)
                if (
                    state is None
                    or (query.state is not None and state.state is not query.state)
                    or (query.kind is not None and intent.kind != query.kind)
                    or (query.account is not None and intent.account != query.account)
                ):
                    continue
                if len(out) >= query.limit:
                    break
                out.append(view.status(iid))
            return out

        return await self._run(run)

    # -- executor primitives ------------------------------------------------------------

    def _ready(self, now: float, limit: int, closed: list[GateRule]) -> list[str]:
        if gate_rules.everything_closed(closed):
            return []
        leased, waiting = self._journal.view.candidates(now, closed)
        picked = [iid for expires, _, iid in leased if expires <= now][:limit]
        picked += [iid for ready, _, iid in waiting if ready <= now][: limit - len(picked)]
        return picked

    async def claim(
        self, owner: str, limit: int, ttl: float, closed: Sequence[GateRule]
    ) -> list[Claim]:
        return await self._run(self._claim, owner, limit, ttl, list(closed))

    def _claim(self, owner: str, limit: int, ttl: float, closed: list[GateRule]) -> list[Claim]:
        journal = self._journal
        if journal.executor:
            # most wake-ups find nothing to claim: answer those without the lock
            journal.refresh()
            journal.check_executor()
            if not self._ready(journal.clock.now(), limit, closed):
                return []
        with journal.locked():
            journal.check_executor(become=True)
            batch = journal.batch()
            now, claims = batch.at, []
            for iid in self._ready(now, limit, closed):
                state = batch.current(iid)
                assert state is not None
                token = batch.next_token(iid)
                batch.add(Claimed(batch.origin(), iid, state.tip, owner, token, now + ttl))
                claims.append(
                    Claim(
                        intent=journal.view.intent(iid),
                        lease=Lease(
                            intent_id=iid, owner=owner, token=token, expires_at=utc(now + ttl)
                        ),
                        previous_state=state.state,
                        attempts=state.attempts,
                        max_attempts=state.max_attempts,
                        open_attempt=state.open_attempt(),
                    )
                )
            journal.commit(batch)
        return claims

    async def start_attempts(
        self, leases: Sequence[Lease], guards: Sequence[Guard] | None = None
    ) -> list[Attempt | Admitted | Held | None]:
        journal = self._journal

        def run() -> list[Attempt | Admitted | Held | None]:
            with journal.locked():
                journal.check_executor()
                batch = journal.batch()
                view = journal.view
                held: list[Held | None] = [None] * len(leases)
                checks: Sequence[Guard | None] = guards or [None] * len(leases)
                buckets: dict[str, BucketRow] = {}
                if guards:
                    closed = gate_rules.closed(view.gates())
                    names, keys = guarded_rows(guards)
                    buckets, breakers = view.bucket_rows(names), view.breaker_rows(keys)
                    held = [held_by(g, closed, buckets, breakers, batch.at) for g in guards]
                taken: dict[str, float] = {}
                out: list[Attempt | Admitted | Held | None] = []
                for lease, guard, holder in zip(leases, checks, held, strict=True):
                    iid, state = lease.intent_id, batch.current(lease.intent_id)
                    if (
                        state is None
                        or state.state is not IntentState.RUNNING
                        or state.token != lease.token
                        or (batch.expiry(iid, state) or 0.0) <= batch.at
                    ):
                        out.append(None)
                        continue
                    verdict = admit(guard, holder, buckets, batch.at, taken)
                    if isinstance(verdict, Held):
                        out.append(verdict)
                        continue
                    attempt = state.attempts + 1
                    origin = batch.origin()
                    batch.add(Started(origin, iid, state.tip, attempt, lease.owner, lease.token))
                    started = batch.current(iid)
                    record = started.last_start if started is not None else None
                    out.append(
                        record if record is None or verdict is None else Admitted(record, verdict)
                    )
                for name, tat in taken.items():
                    batch.add(BucketSet(batch.origin(), name, tat))
                journal.commit(batch)
            return out

        return await self._run(run)

    async def renew(self, leases: Sequence[Lease], ttl: float) -> list[Lease | None]:
        journal = self._journal

        def run() -> list[Lease | None]:
            with journal.locked():
                journal.check_executor()
                batch = journal.batch()
                out: list[Lease | None] = []
                for lease in leases:
                    state = batch.current(lease.intent_id)
                    if (
                        state is None
                        or state.state is not IntentState.RUNNING
                        or state.token != lease.token
                    ):
                        out.append(None)
                        continue
                    expires = batch.at + ttl
                    batch.add(Renewed(batch.origin(), lease.intent_id, lease.token, expires))
                    out.append(lease.model_copy(update={"expires_at": utc(expires)}))
                journal.commit(batch)
            return out

        return await self._run(run)

    async def apply(self, changes: Sequence[Change]) -> list[bool]:
        journal = self._journal

        def run() -> list[bool]:
            with journal.locked():
                if any(c.token is not None for c in changes):
                    journal.check_executor()
                batch = journal.batch()
                # a change that cannot be made raises before anything is written
                results = [_stage(batch, change) for change in changes]
                journal.commit(batch, _category(batch))
            return results

        return await self._run(run)

    # -- approvals and gates ------------------------------------------------------------

    async def put_approval(self, approval: Approval, change: Change | None = None) -> bool:
        journal = self._journal

        def run() -> bool:
            with journal.locked():
                batch = journal.batch()
                if change is not None and not _stage(batch, change):
                    return False
                batch.add(Approved(batch.origin(), approval))
                journal.commit(batch)
            return True

        return await self._run(run)

    async def approvals(self, intent_id: str) -> list[Approval]:
        def run() -> list[Approval]:
            self._journal.refresh()
            return [a.approval for a in self._journal.view.approvals(intent_id)]

        return await self._run(run)

    async def set_gate(self, rule: GateRule) -> None:
        journal = self._journal

        def run() -> None:
            with journal.locked():
                batch = journal.batch()
                after = journal.view.gate_after(rule.kind, rule.account)
                batch.add(GateSet(batch.origin(), rule, after))
                journal.commit(batch)
                journal.write_gate_file()

        await self._run(run)

    async def gates(self) -> list[GateRule]:
        journal = self._journal

        def run() -> list[GateRule]:
            journal.refresh()
            if journal.gate_file_stale():
                with journal.locked():
                    journal.write_gate_file()
            return journal.view.gates()

        return await self._run(run)

    # -- rate limits and circuit breakers (bodies in folder_limits.py) --------------------

    async def take(self, requests: Sequence[Sequence[Bucket]]) -> list[Throttle]:
        return await self._run(self._limits.take, [tuple(r) for r in requests])

    async def peek(self, buckets: Sequence[Bucket]) -> Throttle:
        return await self._run(self._limits.peek, tuple(buckets))

    async def pause(self, bucket: str, until: float, reason: str, actor: str) -> float:
        return await self._run(self._limits.pause, bucket, until, reason, actor)

    async def breaker_enter(
        self, entries: Sequence[tuple[str, str]], actor: str, probe_ttl: float
    ) -> list[BreakerStatus]:
        return await self._run(self._limits.breaker_enter, list(entries), actor, probe_ttl)

    async def breaker_record(
        self, results: Sequence[BreakerResult], config: BreakerConfig, actor: str
    ) -> dict[str, BreakerStatus]:
        return await self._run(self._limits.breaker_record, list(results), config, actor)

    async def breaker_peek(self, key: str) -> BreakerStatus:
        return await self._run(self._limits.breaker_peek, key)

    # -- reads ----------------------------------------------------------------------------

    async def receipts(self, intent_id: str | None = None, limit: int = 100) -> list[Receipt]:
        view = self._journal.view

        def run() -> list[Receipt]:
            self._journal.refresh()
            if intent_id is None:
                found = view.receipts()
            else:
                state = view.derived(intent_id)
                found = list(state.receipts) if state is not None else []
            return found[::-1][:limit]

        return await self._run(run)

    async def audit(self, intent_id: str | None = None, limit: int = 100) -> list[AuditEvent]:
        def run() -> list[AuditEvent]:
            self._journal.refresh()
            events = self._journal.view.audit()
            if intent_id is not None:
                events = [e for e in events if e.intent_id == intent_id]
            return events[::-1][:limit]

        return await self._run(run)

    async def readiness(self, closed: Sequence[GateRule] = ()) -> Readiness:
        rules = list(closed)

        def run() -> Readiness:
            self._journal.refresh()
            if gate_rules.everything_closed(rules):
                return Readiness(running=0, next_ready_at=None)
            # leases under a closed gate cannot be taken over, so they are not counted
            now = self._journal.clock.now()
            leased, waiting = self._journal.view.candidates(now, rules)
            times = [found[0][0] for found in (leased, waiting) if found]
            return Readiness(running=len(leased), next_ready_at=min(times) if times else None)

        return await self._run(run)

    async def counts(self) -> dict[IntentState, int]:
        def run() -> dict[IntentState, int]:
            self._journal.refresh()
            return self._journal.view.counts()

        return await self._run(run)

    # -- change notification ----------------------------------------------------------

    def _counter(self) -> int:
        # a new file from any writer, found by a few stat() calls (see folder_files.Scanner)
        self._journal.refresh()
        return self._journal.count

    async def change_counter(self) -> int:
        return await self._run(self._counter)

    async def wait_for_change(self, since: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        interval = _MIN_POLL
        while await self._run(self._counter) == since:
            left = deadline - loop.time()
            if left <= 0:
                return
            await asyncio.sleep(min(interval, left))
            interval = min(interval * 1.5, _MAX_POLL)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.get_running_loop().run_in_executor(self._pool, self._journal.close)
        finally:
            self._pool.shutdown(wait=True)


def _stage(batch: Batch, change: Change) -> bool:
    """Add ``change`` to ``batch`` if its precondition holds (see Store.apply)."""
    state = batch.current(change.intent_id)
    if state is None:
        return False
    if change.token is not None:
        holds = state.state is IntentState.RUNNING and state.token == change.token
    else:
        holds = state.state in change.from_states
    if not holds:
        return False
    if not allowed(state.state, change.to_state):
        raise InvalidTransition(
            f"intent {change.intent_id} is {state.state}; it cannot become {change.to_state}"
        )
    ready = (change.ready_at or batch.at) if change.to_state in _WAITING else batch.at
    batch.add(
        Changed(
            batch.origin(),
            change.intent_id,
            state.tip,
            change.to_state,
            change.actor,
            change.action,
            change.reason,
            change.token,
            ready,
            change.extra_attempts,
            change.receipt,
        )
    )
    return True


def _category(batch: Batch) -> str:
    """Where a transaction's file goes: dead letters, then receipts, then plain state."""
    changes = [r for r in batch.records if isinstance(r, Changed)]
    if any(c.to is IntentState.DEAD for c in changes):
        return "deadletter"
    if any(c.receipt is not None for c in changes):
        return "receipts"
    return "state"
