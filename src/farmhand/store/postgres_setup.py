"""What the PostgreSQL store needs around its queries: the URL, connection errors a user can
act on, numbered migrations, and the LISTEN connection behind ``wait_for_change``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote

import psycopg
from psycopg.conninfo import conninfo_to_dict

from farmhand.errors import InvalidInput, StoreError
from farmhand.store import sql

log = logging.getLogger("farmhand.store.postgres")

Conn = psycopg.AsyncConnection[tuple[Any, ...]]

#: NOTIFY channel every write sends on (see the trigger in 0001_initial.sql)
CHANNEL = "farmhand"
#: pg_advisory_xact_lock key that serialises migrations: b"farmhand" as a bigint
MIGRATION_LOCK = int.from_bytes(b"farmhand", "big")
#: store URL parameters farmhand reads itself (libpq would refuse them)
POOL_SIZE, DEFAULT_POOL_SIZE, MAX_POOL_SIZE = "pool_size", 10, 1000
#: seconds to wait for a server to answer a new connection (libpq waits for TCP otherwise)
CONNECT_TIMEOUT = 10
_FORMAT = "postgresql://[user[:password]@]host[:port]/database[?param=value&...]"
_MASK = "***"


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed store URL."""

    #: what libpq connects with: the URL without farmhand's own parameters
    conninfo: str
    #: connection parameters farmhand adds (a connect timeout, unless the URL sets one)
    extra: dict[str, Any]
    #: the URL with any password masked, for messages, logs and ``store.url``
    display: str
    #: host, port and database, for messages
    where: str
    pool_size: int
    #: the password in every spelling the URL has it, to keep out of messages
    secrets: tuple[str, ...]

    def scrub(self, text: str) -> str:
        """``text`` on one line, without the password."""
        return _scrub(text, self.secrets)


def _scrub(text: str, secrets: Sequence[str]) -> str:
    line = " ".join(text.split())
    for secret in secrets:
        line = line.replace(secret, _MASK)
    return line


def _split(url: str) -> tuple[str, str, str, str]:
    """``scheme``, user info (``user:password``, may be empty), the rest up to the query, and
    the query of a URL with ``://`` (the user info ends at the last ``@`` before the query,
    so a password holding ``/`` or ``@`` is still found)."""
    scheme, _, rest = url.partition("://")
    head, _, query = rest.partition("?")
    userinfo, at, after = head.rpartition("@")
    return scheme, userinfo if at else "", after if at else head, query


def _passwords(url: str) -> list[str]:
    """Every password the URL carries, as written and percent-decoded."""
    _, userinfo, _, query = _split(url)
    found = [userinfo.split(":", 1)[1]] if ":" in userinfo else []
    found += [v for k, v in parse_qsl(query, keep_blank_values=True) if k == "password"]
    found += [item.partition("=")[2] for item in query.split("&") if item.startswith("password=")]
    found += [unquote(p) for p in found]
    return sorted({p for p in found if p}, key=len, reverse=True)


def mask(url: str) -> str:
    """``url`` with the password (in the user info or a ``password=`` parameter) masked."""
    if "://" not in url:
        # not a URL whose parts can be told apart: show none of it
        return f"{url.partition(':')[0]}:..."
    scheme, userinfo, hosts, query = _split(url)
    if ":" in userinfo:
        userinfo = f"{userinfo.split(':', 1)[0]}:{_MASK}"
    items = [
        f"password={_MASK}" if item.startswith("password=") else item for item in query.split("&")
    ]
    return f"{scheme}://{userinfo}{'@' if userinfo else ''}{hosts}" + (
        "?" + "&".join(items) if "?" in url else ""
    )


def parse_url(url: str) -> Target:
    """Check a ``postgresql://`` URL and split off farmhand's own parameters."""
    display = mask(url)
    scheme, sep, _ = url.partition("://")
    if scheme.lower() not in ("postgresql", "postgres") or not sep:
        raise InvalidInput(f"store URL {display!r} is not a PostgreSQL URL; use {_FORMAT}")
    base, question, query = url.partition("?")
    kept: list[str] = []
    pool_size = DEFAULT_POOL_SIZE
    for item in query.split("&") if question else []:
        name, _, value = item.partition("=")
        if name != POOL_SIZE:
            kept.append(item)
            continue
        if not value.isdigit() or not 1 <= int(value) <= MAX_POOL_SIZE:
            raise InvalidInput(
                f"store URL {display!r}: {POOL_SIZE} must be a whole number from 1 to "
                f"{MAX_POOL_SIZE}, got {value!r}"
            )
        pool_size = int(value)
    conninfo = base + ("?" + "&".join(kept) if kept else "")
    secrets = _passwords(url)
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.Error as exc:
        reason = _scrub(str(exc), secrets)
        raise InvalidInput(f"store URL {display!r} is not valid: {reason}; use {_FORMAT}") from exc
    host = str(params.get("host") or params.get("hostaddr") or "localhost")
    port = str(params.get("port") or "5432")
    database = str(params.get("dbname") or params.get("user") or "(default database)")
    password = str(params.get("password") or "")
    if password and password not in secrets:
        secrets.append(password)
    extra: dict[str, Any] = {}
    if "connect_timeout" not in params:
        extra["connect_timeout"] = CONNECT_TIMEOUT
    return Target(
        conninfo=conninfo,
        extra=extra,
        display=display,
        where=f"{host}:{port}/{database}",
        pool_size=pool_size,
        secrets=tuple(secrets),
    )


def unreachable(target: Target, exc: BaseException) -> StoreError:
    """The error for a server that cannot be reached or refuses the login."""
    return StoreError(
        f"cannot connect to PostgreSQL at {target.where}: {target.scrub(str(exc))}; check that "
        "the server is running and reachable and that the store URL (--store or "
        "FARMHAND_STORE) has the right host, port, database, user and password"
    )


async def connect(target: Target) -> Conn:
    """A new autocommit connection, or a :class:`StoreError` naming the server."""
    try:
        return await psycopg.AsyncConnection.connect(
            target.conninfo, autocommit=True, **target.extra
        )
    except psycopg.Error as exc:
        raise unreachable(target, exc) from exc


# -- migrations -------------------------------------------------------------------------------


def migrations() -> list[tuple[int, str]]:
    """Every schema migration, ``(version, script)``, oldest first."""
    return sql.migrations("postgres")


def latest_version() -> int:
    """The schema version this farmhand writes."""
    return migrations()[-1][0]


async def schema_version(conn: Conn) -> int:
    """The schema version of the database ``conn`` is on (0: farmhand never ran there)."""
    cur = await conn.execute("SELECT to_regclass('farmhand_migrations') IS NOT NULL")
    row = await cur.fetchone()
    if row is None or not row[0]:
        return 0
    cur = await conn.execute("SELECT coalesce(max(version), 0) FROM farmhand_migrations")
    row = await cur.fetchone()
    return int(row[0]) if row else 0


def _newer(target: Target, current: int, latest: int) -> StoreError:
    return StoreError(
        f"the PostgreSQL store {target.where} has schema version {current}, newer than this "
        f"farmhand knows ({latest}); upgrade farmhand"
    )


async def migrate(conn: Conn, target: Target) -> tuple[int, int]:
    """Apply the migrations the database lacks; ``(version before, version after)``.

    Runs under a transaction-scoped advisory lock, so processes opening a new database at
    the same moment apply each migration once; the others wait, then find it done.
    """
    try:
        return await _migrate(conn, target)
    except psycopg.errors.DuplicateTable as exc:
        raise StoreError(
            f"cannot create farmhand's schema in {target.where}: {target.scrub(str(exc))}; "
            "the database holds tables farmhand did not create: use an empty database (or "
            "another schema, via options=-csearch_path=... in the URL)"
        ) from exc
    except psycopg.Error as exc:
        raise StoreError(
            f"cannot migrate the PostgreSQL store {target.where}: {target.scrub(str(exc))}; "
            "the user in the store URL needs the right to create tables there"
        ) from exc


async def _migrate(conn: Conn, target: Target) -> tuple[int, int]:
    scripts = migrations()
    latest = scripts[-1][0]
    before = await schema_version(conn)
    if before > latest:
        raise _newer(target, before, latest)
    if before == latest:
        return before, before
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS farmhand_migrations (version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        current = await schema_version(conn)
        if current > latest:
            raise _newer(target, current, latest)
        for version, script in scripts:
            if version > current:
                await conn.execute(script)
                await conn.execute(
                    "INSERT INTO farmhand_migrations (version) VALUES (%s)", (version,)
                )
    return before, latest


# -- change notification ----------------------------------------------------------------------

#: the payload of a gate change's notification (see migration 0004)
GATES = "gates"

Connector = Callable[[], Awaitable[Conn]]


class Notifier:
    """The change counter: this store's own commits plus every NOTIFY from other writers.

    One dedicated connection LISTENs; notifications whose payload is this store's own
    writer name are skipped (its commits were counted when they returned). A gate change
    (payload ``gates``) also moves ``gates``, whoever made it. If that connection drops,
    both move (a waiter re-checks the store) and it reconnects.
    """

    def __init__(self, writer: str, reconnect: Connector) -> None:
        self.writer = writer
        self.counter = 0
        #: moves with every gate change (and every lost connection)
        self.gates = 0
        self._reconnect = reconnect
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._conn: Conn | None = None

    async def start(self, conn: Conn) -> None:
        """Listen on ``conn`` (autocommit) from now on."""
        await conn.execute(f"LISTEN {CHANNEL}")
        self._conn = conn
        self._task = asyncio.create_task(self._listen(), name="farmhand-pg-listen")

    def bump(self, gates: bool = False) -> None:
        """Count one change (with ``gates``, a gate change too) and wake every waiter."""
        if gates:
            self.gates += 1
        self.counter += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self, since: int, timeout: float) -> None:
        """Return when the counter differs from ``since`` or ``timeout`` passes."""
        if self.counter != since or timeout <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self.counter == since:
                    await self._changed.wait()

    async def _listen(self) -> None:
        pause = 0.1
        while True:
            conn = self._conn
            try:
                if conn is None or conn.closed:
                    conn = self._conn = await self._reconnect()
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.bump(gates=True)  # whatever was sent while nobody listened
                    pause = 0.1
                async for notice in conn.notifies():
                    # a gate change's payload names no writer: it counts for this one too
                    if notice.payload != self.writer:
                        self.bump(gates=notice.payload == GATES)
            # whatever broke it (a lost connection, a failed reconnect), the source of
            # wake-ups must come back: executors would otherwise only poll
            except Exception as exc:
                log.warning("PostgreSQL change listener lost its connection: %s", exc)
                if conn is not None:
                    await conn.close()
                self.bump(gates=True)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)

    async def close(self) -> None:
        """Stop listening and close the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
