"""The embedded store: one SQLite file in WAL mode, fully synchronous commits.

All statements run on one dedicated thread per store so the event loop never blocks on
disk. Each public method is one short transaction; none is held across a connector call.
Commits are batched by the caller (claim, start and apply take lists) so one fsync
covers many intents.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from farmhand.clock import Clock, SystemClock
from farmhand.config import BreakerConfig
from farmhand.contracts import (
    Approval,
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
from farmhand.contracts.state import allowed
from farmhand.errors import InvalidTransition, StoreError
from farmhand.store import limits_logic as logic
from farmhand.store import sql
from farmhand.store import sqlite_limits as limits
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
    intent_status,
)
from farmhand.store.paths import unsafe_reason

#: the intent is running under this lease (id, token, now), which has not expired
_WHERE_LEASE = "WHERE id = ? AND state = 'running' AND lease_token = ? AND lease_expires > ?"
_LEASE_CURRENT = f"SELECT 1 FROM intents {_WHERE_LEASE}"

T = TypeVar("T")

_INTENT_COLUMNS = (
    "id, body, state, attempts, max_attempts, reason, updated_at, ready_at,"
    " lease_owner, lease_token"
)
_CLAIMABLE = "state IN ('pending', 'retry_wait')"
# Named explicitly: on a fresh database (no ANALYZE statistics) the planner prefers
# intents_state and sorts the whole backlog, under the write lock, for every claim.
_READY = f"intents INDEXED BY intents_ready WHERE {_CLAIMABLE}"
_LEASED = "intents INDEXED BY intents_leased WHERE state = 'running'"
#: longest wait for the write lock before giving up
_LOCK_TIMEOUT = 30.0
_MIN_POLL, _MAX_POLL = 0.001, 0.010


def _while_locked(action: Callable[[], object]) -> None:
    """Run ``action`` until SQLite stops answering "locked", polling every 0.1-1 ms, for at
    most the lock timeout (then the error stands)."""
    deadline = time.monotonic() + _LOCK_TIMEOUT
    pause = 0.0001
    while True:
        try:
            action()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.001)


def _statements(script: str) -> list[str]:
    """Split a SQL script into statements (executescript would commit mid-migration)."""
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    return [s for s in statements if s]


def _gate_filter(closed: Sequence[GateRule]) -> tuple[str, list[str]] | None:
    """SQL that excludes intents blocked by closed gates (appended after a WHERE clause).

    None when a global gate is closed: nothing at all may be claimed.
    """
    sql: list[str] = []
    params: list[str] = []
    for rule in closed:
        conditions = []
        for column, value in (("kind", rule.kind), ("account", rule.account)):
            if value is not None:
                conditions.append(f"{column} = ?")
                params.append(value)
        if not conditions:
            return None
        sql.append(f" AND NOT ({' AND '.join(conditions)})")
    return "".join(sql), params


class SQLiteStore:
    """A Store on one local SQLite file. Create with :meth:`open`."""

    def __init__(self, path: Path, clock: Clock | None = None) -> None:
        self.path = path
        self.url = f"sqlite://{path}"
        self._clock = clock or SystemClock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="farmhand-sqlite")
        self._db: sqlite3.Connection | None = None
        self._watch: sqlite3.Connection | None = None
        self._watch_lock = threading.Lock()

    @classmethod
    async def open(cls, path: Path, clock: Clock | None = None) -> SQLiteStore:
        """Open (creating and migrating if needed) the database at ``path``."""
        store = cls(path, clock)
        try:
            await store._run(store._connect)
        except BaseException:
            await store.close()
            raise
        return store

    # -- plumbing ---------------------------------------------------------------------

    def _connect(self) -> None:
        reason = unsafe_reason(self.path)
        if reason:
            raise StoreError(
                f"refusing to open the SQLite store {self.path}: {reason}; SQLite files are "
                "corrupted by syncing or network locking. Use a local path (--store "
                "sqlite:///local/path) or a server store"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the store directory {self.path.parent}: {exc.strerror}"
            ) from exc
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db = db
        db.execute(f"PRAGMA busy_timeout = {int(_LOCK_TIMEOUT * 1000)}")
        # several processes opening a brand-new file race to switch it to WAL and migrate it;
        # SQLite can answer "locked" there without waiting, so the set-up is polled as well
        _while_locked(lambda: self._set_up(db))
        watch = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        watch.execute("PRAGMA busy_timeout = 30000")
        self._watch = watch

    def _set_up(self, db: sqlite3.Connection) -> None:
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise StoreError(f"the SQLite store {self.path} cannot use WAL mode (got {mode})")
        db.execute("PRAGMA synchronous = FULL")
        self._migrate(db)

    def _migrate(self, db: sqlite3.Connection) -> None:
        migrations = sql.migrations("sqlite")
        latest = migrations[-1][0]
        current = int(db.execute("PRAGMA user_version").fetchone()[0])
        if current > latest:
            raise StoreError(
                f"the SQLite store {self.path} has schema version {current}, newer than this "
                f"farmhand knows ({latest}); upgrade farmhand"
            )
        if current == latest:
            return
        with self._tx(db):
            current = int(db.execute("PRAGMA user_version").fetchone()[0])
            for version, script in migrations:
                if version > current:
                    for statement in _statements(script):
                        db.execute(statement)
            db.execute(f"PRAGMA user_version = {latest}")

    @contextmanager
    def _tx(self, db: sqlite3.Connection | None = None) -> Iterator[sqlite3.Connection]:
        conn = db or self._conn()
        self._begin_immediate(conn)
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @staticmethod
    def _begin_immediate(conn: sqlite3.Connection) -> None:
        """Take the write lock, polling every 0.1-1 ms.

        SQLite's own busy handler sleeps 1, 2, 5, 10, 15... ms between tries, so a waiter
        keeps sleeping long after the lock is free: that was the whole latency tail.
        """
        conn.execute("PRAGMA busy_timeout = 0")
        try:
            _while_locked(lambda: conn.execute("BEGIN IMMEDIATE"))
        finally:
            conn.execute(f"PRAGMA busy_timeout = {int(_LOCK_TIMEOUT * 1000)}")

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"the SQLite store {self.path} is closed")
        return self._db

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, fn, *args)
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc

    def _translate(self, exc: sqlite3.Error) -> StoreError:
        text = str(exc)
        if "not a database" in text or "malformed" in text or "corrupt" in text:
            return StoreError(
                f"the store file {self.path} is not a farmhand SQLite database or is corrupt "
                f"({text}); move it aside or pass --store with another path"
            )
        if "readonly" in text or "unable to open" in text or "disk I/O" in text:
            return StoreError(
                f"cannot write the store file {self.path} ({text}); check its permissions "
                "and free space, or pass --store with another path"
            )
        if "locked" in text or "busy" in text:
            return StoreError(f"the store {self.path} stayed locked by another process ({text})")
        return StoreError(f"SQLite error on {self.path}: {text}")

    def _audit_rows(self, rows: list[tuple[Any, ...]]) -> None:
        self._conn().executemany(
            "INSERT INTO audit (at, actor, action, intent_id, from_state, to_state, reason,"
            " detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

    # -- intents ----------------------------------------------------------------------

    async def put_intents(self, items: Sequence[NewIntent]) -> list[tuple[IntentStatus, bool]]:
        return await self._run(self._put_intents, list(items))

    def _put_intents(self, items: list[NewIntent]) -> list[tuple[IntentStatus, bool]]:
        now = self._clock.now()
        created: list[tuple[str, bool]] = []
        with self._tx() as db:
            for item in items:
                intent = item.intent
                ready = intent.not_before.timestamp() if intent.not_before else now
                expires = intent.expires_at.timestamp() if intent.expires_at else None
                cur = db.execute(
                    "INSERT INTO intents (id, key, kind, account, agent, payload_hash, body,"
                    " state, ready_at, expires_at, max_attempts, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING",
                    (
                        intent.id,
                        intent.key,
                        intent.kind,
                        intent.account,
                        intent.agent,
                        intent.payload_hash,
                        intent.model_dump_json(),
                        item.state.value,
                        ready,
                        expires,
                        intent.max_attempts,
                        intent.created_at.timestamp(),
                        now,
                    ),
                )
                is_new = cur.rowcount == 1
                if is_new:
                    self._audit_rows(
                        [(now, item.actor, "submit", intent.id, None, item.state.value, None, None)]
                    )
                created.append((intent.key, is_new))
            by_key = self._statuses_where(
                f"key IN ({','.join('?' * len(created))})", [k for k, _ in created], db
            )
        return [(by_key[key], is_new) for key, is_new in created]

    def _statuses_where(
        self, where: str, params: Sequence[Any], db: sqlite3.Connection, suffix: str = ""
    ) -> dict[str, IntentStatus]:
        rows = db.execute(
            f"SELECT {_INTENT_COLUMNS}, key FROM intents WHERE {where} {suffix}", params
        ).fetchall()
        receipts: dict[str, list[Receipt]] = {}
        for intent_id, body in limits.select_in(
            db,
            "SELECT intent_id, body FROM receipts WHERE intent_id",
            [row[0] for row in rows],
            " ORDER BY seq",
        ):
            receipts.setdefault(intent_id, []).append(Receipt.model_validate_json(body))
        out: dict[str, IntentStatus] = {}
        for row in rows:
            out[row[-1]] = self._status(row, receipts.get(row[0], []))
        return out

    @staticmethod
    def _status(row: Sequence[Any], receipts: list[Receipt]) -> IntentStatus:
        (_, body, state, attempts, max_attempts, reason, updated, ready, owner, token, _) = row
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
            receipts=receipts,
        )

    async def get_intent(self, ref: str) -> IntentStatus | None:
        def get() -> IntentStatus | None:
            found = self._statuses_where("id = ? OR key = ?", (ref, ref), self._conn())
            if not found:
                return None
            # an id match wins over a key that happens to equal another intent's id
            return next((s for s in found.values() if s.id == ref), next(iter(found.values())))

        return await self._run(get)

    async def list_intents(self, query: IntentQuery) -> list[IntentStatus]:
        where, params = ["1"], []
        for column, value in (("state", query.state), ("kind", query.kind)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(str(value))
        if query.account is not None:
            where.append("account = ?")
            params.append(query.account)
        params.append(str(query.limit))

        def run() -> list[IntentStatus]:
            found = self._statuses_where(
                " AND ".join(where), params, self._conn(), "ORDER BY seq DESC LIMIT ?"
            )
            return list(found.values())

        return await self._run(run)

    # -- executor primitives ------------------------------------------------------------

    async def claim(
        self, owner: str, limit: int, ttl: float, closed: Sequence[GateRule]
    ) -> list[Claim]:
        return await self._run(self._claim, owner, limit, ttl, list(closed))

    def _claim(self, owner: str, limit: int, ttl: float, closed: list[GateRule]) -> list[Claim]:
        gate = _gate_filter(closed)
        if gate is None:
            return []
        gate_sql, gate_params = gate
        now = self._clock.now()
        # Most wake-ups find nothing to claim (every commit, including our own, is a
        # wake-up): answer those from a snapshot instead of queueing for the write lock.
        candidate = (
            self._conn()
            .execute(
                f"SELECT EXISTS (SELECT 1 FROM {_LEASED} AND lease_expires <= ?{gate_sql})"
                f" OR EXISTS (SELECT 1 FROM {_READY} AND ready_at <= ?{gate_sql})",
                (now, *gate_params, now, *gate_params),
            )
            .fetchone()[0]
        )
        if not candidate:
            return []
        with self._tx() as db:
            picked = db.execute(
                f"SELECT seq, state FROM {_LEASED} AND lease_expires <= ?"
                f"{gate_sql} ORDER BY lease_expires LIMIT ?",
                (now, *gate_params, limit),
            ).fetchall()
            if len(picked) < limit:
                picked += db.execute(
                    f"SELECT seq, state FROM {_READY} AND ready_at <= ?"
                    f"{gate_sql} ORDER BY ready_at, seq LIMIT ?",
                    (now, *gate_params, limit - len(picked)),
                ).fetchall()
            if not picked:
                return []
            previous = dict(picked)
            expires = now + ttl
            rows = db.execute(
                "UPDATE intents SET state = 'running', lease_owner = ?,"
                " lease_token = lease_token + 1, lease_expires = ?, updated_at = ?"
                f" WHERE seq IN ({','.join('?' * len(picked))})"
                " RETURNING seq, id, body, lease_token, attempts, max_attempts",
                (owner, expires, now, *previous),
            ).fetchall()
            self._audit_rows(
                [
                    (now, owner, "claim", row[1], previous[row[0]], "running", None, None)
                    for row in rows
                ]
            )
            open_attempts = self._open_attempts(db, [(r[1], r[4]) for r in rows if r[4] > 0])
        lease_expiry = utc(expires)
        claims = []
        for seq, intent_id, body, token, attempts, max_attempts in rows:
            claims.append(
                Claim(
                    intent=Intent.model_validate_json(body),
                    lease=Lease(
                        intent_id=intent_id, owner=owner, token=token, expires_at=lease_expiry
                    ),
                    previous_state=IntentState(previous[seq]),
                    attempts=attempts,
                    max_attempts=max_attempts,
                    open_attempt=open_attempts.get(intent_id),
                )
            )
        claims.sort(key=lambda c: c.lease.expires_at)
        return claims

    @staticmethod
    def _open_attempts(db: sqlite3.Connection, latest: list[tuple[str, int]]) -> dict[str, Attempt]:
        found: dict[str, Attempt] = {}
        for intent_id, attempt in latest:
            row = db.execute(
                "SELECT executor, fencing_token, started_at FROM attempts a"
                " WHERE intent_id = ? AND attempt = ? AND NOT EXISTS (SELECT 1 FROM receipts r"
                " WHERE r.intent_id = a.intent_id AND r.attempt = a.attempt)",
                (intent_id, attempt),
            ).fetchone()
            if row:
                found[intent_id] = Attempt(
                    intent_id=intent_id,
                    attempt=attempt,
                    executor=row[0],
                    fencing_token=row[1],
                    started_at=utc(row[2]),
                )
        return found

    async def start_attempts(
        self, leases: Sequence[Lease], guards: Sequence[Guard] | None = None
    ) -> list[Attempt | Admitted | Held | None]:
        return await self._run(self._start_attempts, list(leases), guards)

    def _start_attempts(
        self, leases: list[Lease], guards: Sequence[Guard] | None
    ) -> list[Attempt | Admitted | Held | None]:
        now = self._clock.now()
        numbers: list[tuple[int, Throttle | None] | Held | None] = []
        checks: Sequence[Guard | None] = guards or [None] * len(leases)
        with self._tx() as db:
            held, rows = limits.held(db, guards, now) if guards else ([None] * len(leases), {})
            taken: dict[str, float] = {}
            for lease, guard, holder in zip(leases, checks, held, strict=True):
                current = (lease.intent_id, lease.token, now)
                # a lost lease answers None (and takes no token), whatever else holds it
                checked = holder is not None or (guard is not None and bool(guard.take))
                if checked and db.execute(_LEASE_CURRENT, current).fetchone() is None:
                    numbers.append(None)
                    continue
                verdict = logic.admit(guard, holder, rows, now, taken)
                if isinstance(verdict, Held):
                    numbers.append(verdict)
                    continue
                row = db.execute(
                    f"UPDATE intents SET attempts = attempts + 1, updated_at = ? {_WHERE_LEASE}"
                    " RETURNING attempts",
                    (now, *current),
                ).fetchone()
                if row is None:
                    numbers.append(None)
                    continue
                db.execute(
                    "INSERT INTO attempts (intent_id, attempt, executor, fencing_token, started_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (lease.intent_id, row[0], lease.owner, lease.token, now),
                )
                numbers.append((row[0], verdict))
            limits.save_tats(db, taken)
        # the records are built after the commit: the write lock is held for SQL only
        started_at = utc(now)
        out: list[Attempt | Admitted | Held | None] = []
        for lease, number in zip(leases, numbers, strict=True):
            if number is None or isinstance(number, Held):
                out.append(number)
                continue
            attempt = Attempt(
                intent_id=lease.intent_id,
                attempt=number[0],
                executor=lease.owner,
                fencing_token=lease.token,
                started_at=started_at,
            )
            out.append(attempt if number[1] is None else Admitted(attempt, number[1]))
        return out

    async def renew(self, leases: Sequence[Lease], ttl: float) -> list[Lease | None]:
        def run() -> list[Lease | None]:
            now = self._clock.now()
            out: list[Lease | None] = []
            with self._tx() as db:
                for lease in leases:
                    cur = db.execute(
                        "UPDATE intents SET lease_expires = ? WHERE id = ? AND state = 'running'"
                        " AND lease_token = ?",
                        (now + ttl, lease.intent_id, lease.token),
                    )
                    renewed = lease.model_copy(update={"expires_at": utc(now + ttl)})
                    out.append(renewed if cur.rowcount == 1 else None)
            return out

        return await self._run(run)

    async def apply(self, changes: Sequence[Change]) -> list[bool]:
        return await self._run(self._apply, list(changes))

    def _apply(self, changes: list[Change]) -> list[bool]:
        now = self._clock.now()
        # receipts are serialised before the write lock is taken, not while it is held
        bodies = [c.receipt.model_dump_json() if c.receipt is not None else None for c in changes]
        with self._tx() as db:
            return [
                self._apply_one(db, change, now, body)
                for change, body in zip(changes, bodies, strict=True)
            ]

    def _apply_one(
        self, db: sqlite3.Connection, change: Change, now: float, body: str | None = None
    ) -> bool:
        """Apply one change inside the caller's transaction if its precondition holds;
        ``body``: its receipt's JSON, when already serialised."""
        row = db.execute(
            "SELECT state, lease_token FROM intents WHERE id = ?", (change.intent_id,)
        ).fetchone()
        if row is None:
            return False
        current = IntentState(row[0])
        if change.token is not None:
            holds = current is IntentState.RUNNING and row[1] == change.token
        else:
            holds = current in change.from_states
        if not holds:
            return False
        if not allowed(current, change.to_state):
            raise InvalidTransition(
                f"intent {change.intent_id} is {current}; it cannot become {change.to_state}"
            )
        waiting = change.to_state in (IntentState.PENDING, IntentState.RETRY_WAIT)
        db.execute(
            "UPDATE intents SET state = ?, reason = ?, ready_at = ?, lease_owner = NULL,"
            " lease_expires = NULL, max_attempts = max_attempts + ?, updated_at = ?"
            " WHERE id = ?",
            (
                change.to_state.value,
                change.reason,
                (change.ready_at or now) if waiting else now,
                change.extra_attempts,
                now,
                change.intent_id,
            ),
        )
        receipt = change.receipt
        if receipt is not None:
            db.execute(
                "INSERT INTO receipts (id, intent_id, attempt, outcome, finished_at, body)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    receipt.id,
                    receipt.intent_id,
                    receipt.attempt,
                    receipt.outcome.value,
                    receipt.finished_at.timestamp(),
                    body if body is not None else receipt.model_dump_json(),
                ),
            )
        self._audit_rows(
            [
                (
                    now,
                    change.actor,
                    change.action,
                    change.intent_id,
                    current.value,
                    change.to_state.value,
                    change.reason,
                    None,
                )
            ]
        )
        return True

    # -- approvals ----------------------------------------------------------------------

    async def put_approval(self, approval: Approval, change: Change | None = None) -> bool:
        def run() -> bool:
            with self._tx() as db:
                if change is not None and not self._apply_one(db, change, self._clock.now()):
                    return False
                db.execute(
                    "INSERT INTO approvals (id, intent_id, approver, decision, created_at, body)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        approval.id,
                        approval.intent_id,
                        approval.approver,
                        approval.decision.value,
                        approval.created_at.timestamp(),
                        approval.model_dump_json(),
                    ),
                )
                self._audit_rows(
                    [
                        (
                            approval.created_at.timestamp(),
                            approval.approver,
                            f"approval.{approval.decision.value}",
                            approval.intent_id,
                            None,
                            None,
                            approval.reason,
                            json.dumps(
                                {
                                    "approval": approval.id,
                                    "payload_hash": approval.payload_hash,
                                    "expires_at": approval.expires_at.isoformat(),
                                }
                            ),
                        )
                    ]
                )
            return True

        return await self._run(run)

    async def approvals(self, intent_id: str) -> list[Approval]:
        def run() -> list[Approval]:
            rows = self._conn().execute(
                "SELECT body FROM approvals WHERE intent_id = ? ORDER BY seq", (intent_id,)
            )
            return [Approval.model_validate_json(body) for (body,) in rows]

        return await self._run(run)

    # -- rate limits and circuit breakers (bodies in sqlite_limits.py) --------------------

    def _limits(self, write: bool, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(db, now, *args)``: in a write transaction, with ``now`` read once the
        lock is held, or (``write`` False) on a snapshot."""
        if not write:
            return fn(self._conn(), self._clock.now(), *args)
        with self._tx() as db:
            return fn(db, self._clock.now(), *args)

    async def take(self, requests: Sequence[Sequence[Bucket]]) -> list[Throttle]:
        items = [tuple(request) for request in requests]
        write = any(b.limit is not None for request in items for b in request)
        return await self._run(self._limits, write, limits.take, items)

    async def peek(self, buckets: Sequence[Bucket]) -> Throttle:
        return await self._run(self._limits, False, limits.peek, tuple(buckets))

    async def pause(self, bucket: str, until: float, reason: str, actor: str) -> float:
        return await self._run(self._limits, True, limits.pause, bucket, until, reason, actor)

    async def breaker_enter(
        self,
        entries: Sequence[tuple[str, str]],
        actor: str,
        probe_ttl: float,
    ) -> list[BreakerStatus]:
        items = list(entries)

        def run() -> list[BreakerStatus]:
            # the common case, every breaker closed, needs no write lock
            if limits.quiet(self._conn(), [key for key, _ in items]):
                return [BreakerStatus() for _ in items]
            return self._limits(True, limits.breaker_enter, items, actor, probe_ttl)

        return await self._run(run)

    async def breaker_record(
        self, results: Sequence[BreakerResult], config: BreakerConfig, actor: str
    ) -> dict[str, BreakerStatus]:
        items = list(results)

        def run() -> dict[str, BreakerStatus]:
            keys = [r.key for r in items]
            if all(r.ok for r in items) and limits.quiet(self._conn(), keys, failures=True):
                return {key: BreakerStatus() for key in keys}
            return self._limits(True, limits.breaker_record, items, config, actor)

        return await self._run(run)

    async def breaker_peek(self, key: str) -> BreakerStatus:
        return await self._run(self._limits, False, limits.breaker_peek, key)

    # -- gates, reads -------------------------------------------------------------------

    async def set_gate(self, rule: GateRule) -> None:
        def run() -> None:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO gates (kind, account, body) VALUES (?, ?, ?)"
                    " ON CONFLICT (kind, account) DO UPDATE SET body = excluded.body",
                    (rule.kind or "", rule.account or "", rule.model_dump_json()),
                )
                self._audit_rows(
                    [
                        (
                            rule.changed_at.timestamp(),
                            rule.actor,
                            "gate.open" if rule.open else "gate.close",
                            None,
                            None,
                            None,
                            rule.reason,
                            json.dumps({"kind": rule.kind, "account": rule.account}),
                        )
                    ]
                )

        await self._run(run)

    async def gates(self) -> list[GateRule]:
        def run() -> list[GateRule]:
            rows = self._conn().execute("SELECT body FROM gates ORDER BY kind, account")
            return [GateRule.model_validate_json(body) for (body,) in rows]

        return await self._run(run)

    async def receipts(self, intent_id: str | None = None, limit: int = 100) -> list[Receipt]:
        def run() -> list[Receipt]:
            if intent_id is None:
                rows = self._conn().execute(
                    "SELECT body FROM receipts ORDER BY seq DESC LIMIT ?", (limit,)
                )
            else:
                rows = self._conn().execute(
                    "SELECT body FROM receipts WHERE intent_id = ? ORDER BY seq DESC LIMIT ?",
                    (intent_id, limit),
                )
            return [Receipt.model_validate_json(body) for (body,) in rows]

        return await self._run(run)

    async def audit(self, intent_id: str | None = None, limit: int = 100) -> list[AuditEvent]:
        def run() -> list[AuditEvent]:
            sql = (
                "SELECT seq, at, actor, action, intent_id, from_state, to_state, reason, detail"
                " FROM audit"
            )
            params: tuple[Any, ...] = (limit,)
            if intent_id is not None:
                sql += " WHERE intent_id = ?"
                params = (intent_id, limit)
            rows = self._conn().execute(sql + " ORDER BY seq DESC LIMIT ?", params)
            return [
                AuditEvent(
                    seq=seq,
                    at=utc(at),
                    actor=actor,
                    action=action,
                    intent_id=iid,
                    from_state=src,
                    to_state=dst,
                    reason=reason,
                    detail=json.loads(detail) if detail else {},
                )
                for seq, at, actor, action, iid, src, dst, reason, detail in rows
            ]

        return await self._run(run)

    async def readiness(self, closed: Sequence[GateRule] = ()) -> Readiness:
        gate = _gate_filter(closed)
        if gate is None:
            return Readiness(running=0, next_ready_at=None)
        gate_sql, gate_params = gate

        def run() -> Readiness:
            db = self._conn()
            # leases under a closed gate cannot be taken over, so they are not counted:
            # an executor would otherwise spin on (or drain-wait for) an expired one forever
            running, lease_min = db.execute(
                f"SELECT count(*), min(lease_expires) FROM {_LEASED}{gate_sql}", gate_params
            ).fetchone()
            (ready_min,) = db.execute(
                f"SELECT min(ready_at) FROM {_READY}{gate_sql}", gate_params
            ).fetchone()
            times = [t for t in (lease_min, ready_min) if t is not None]
            return Readiness(running=running, next_ready_at=min(times) if times else None)

        return await self._run(run)

    async def counts(self) -> dict[IntentState, int]:
        def run() -> dict[IntentState, int]:
            rows = self._conn().execute("SELECT state, count(*) FROM intents GROUP BY state")
            return {IntentState(state): n for state, n in rows}

        return await self._run(run)

    # -- change notification ----------------------------------------------------------

    def _data_version(self) -> int:
        # PRAGMA data_version changes whenever another connection commits; reading it is a
        # few microseconds and takes no lock, so polling it is cheaper than any wake-up channel.
        watch = self._watch
        if watch is None:
            raise StoreError(f"the SQLite store {self.path} is closed")
        with self._watch_lock:
            return int(watch.execute("PRAGMA data_version").fetchone()[0])

    async def change_counter(self) -> int:
        return self._data_version()

    async def wait_for_change(self, since: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        interval = _MIN_POLL
        while self._data_version() == since:
            left = deadline - loop.time()
            if left <= 0:
                return
            await asyncio.sleep(min(interval, left))
            interval = min(interval * 1.5, _MAX_POLL)

    async def close(self) -> None:
        def shut() -> None:
            for conn in (self._db, self._watch):
                if conn is not None:
                    conn.close()
            self._db = self._watch = None

        try:
            await asyncio.get_running_loop().run_in_executor(self._pool, shut)
        finally:
            self._pool.shutdown(wait=True)
