"""What the Redis store needs around its scripts: the URL and its namespace, errors a user can
act on, the Lua scripts (``lua/`` beside this module) and the connection that runs them."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AuthenticationError,
    ConnectionError,
    RedisError,
    ResponseError,
    TimeoutError,
)

from farmhand.clock import Clock
from farmhand.contracts.state import TRANSITIONS
from farmhand.errors import FarmhandError, InvalidInput, InvalidTransition, StoreError
from farmhand.store.kept_readiness import KeptReadiness

T = TypeVar("T")

#: the URL parameter naming the key namespace, and its default
NAMESPACE, DEFAULT_NAMESPACE = "namespace", "farmhand"
#: URL parameters farmhand reads or fixes itself (redis-py never sees them): the store's
#: scripts answer in RESP2 types, so the protocol is not the URL's to choose
_OWN_PARAMS = (NAMESPACE, "protocol")
#: a namespace becomes a hash tag, ``{name}:``, so it must not contain braces
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_FORMAT = "redis://[[user]:password@]host[:port][/db][?namespace=NAME] (or rediss:// for TLS)"
_MASK = "***"
#: error-reply prefix of a legal precondition with an illegal transition (apply.lua)
_TRANSITION = "FARMHAND_TRANSITION "
#: scripts that only read: safe to send again after a lost connection
READ_ONLY = frozenset({"status", "list", "readiness", "history", "rows"})
#: scripts after which a claim's readiness answer still holds: starting an attempt under a
#: lease changes no lease expiry and no ready time
KEEPS_READINESS = frozenset({"start"})
SCRIPTS = (
    "put",
    "claim",
    "start",
    "renew",
    "apply",
    "gate",
    "swap",
    "status",
    "list",
    "readiness",
    "history",
    "rows",
)


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed store URL."""

    #: what redis-py connects with: the URL without farmhand's own parameters
    url: str
    #: the URL with any password masked, for messages, logs and ``store.url``
    display: str
    #: host:port/db, for messages
    where: str
    namespace: str
    password: str | None

    @property
    def prefix(self) -> str:
        """What every key of this farm starts with: the namespace as a hash tag, so that a
        cluster would keep a farm's keys (and so every script's keys) in one slot."""
        return f"{{{self.namespace}}}:"

    def scrub(self, text: str) -> str:
        """``text`` on one line, without the password."""
        line = " ".join(text.split())
        return line.replace(self.password, _MASK) if self.password else line


def parse(url: str) -> Target:
    """Split a ``redis://`` or ``rediss://`` store URL into what redis-py needs and the
    namespace; refuse one that cannot work, with the expected format."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("redis", "rediss"):
        raise InvalidInput(f"store URL {mask(url)!r} is not a Redis URL; use {_FORMAT}")
    try:
        port = parts.port or 6379
    except ValueError as exc:
        raise InvalidInput(
            f"store URL {mask(url)!r} has a bad port ({exc}); use {_FORMAT}"
        ) from exc
    query = parse_qsl(parts.query, keep_blank_values=True)
    names = [value for key, value in query if key == NAMESPACE]
    namespace = names[-1] if names else DEFAULT_NAMESPACE
    if not _NAMESPACE_RE.match(namespace):
        raise InvalidInput(
            f"store URL {mask(url)!r}: namespace {namespace!r} must be 1-64 letters, digits"
            " or . _ : -"
        )
    kept = urlencode([(k, v) for k, v in query if k not in _OWN_PARAMS])
    db = parts.path.strip("/") or "0"
    return Target(
        url=urlunsplit((parts.scheme, parts.netloc, parts.path, kept, "")),
        display=mask(url),
        where=f"{parts.hostname or 'localhost'}:{port}/{db}",
        namespace=namespace,
        password=parts.password or dict(query).get("password"),
    )


def mask(url: str) -> str:
    """``url`` with the password (in the user info or a ``password=`` parameter) masked."""
    parts = urlsplit(url)
    netloc = parts.netloc
    user, at, host = netloc.rpartition("@")
    if at and ":" in user:
        netloc = f"{user.split(':', 1)[0]}:{_MASK}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, _MASK if k == "password" else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def translate(target: Target, exc: RedisError) -> FarmhandError:
    """A one-line error a user can act on, without the password."""
    text = target.scrub(str(exc))
    where = target.where
    if isinstance(exc, ResponseError) and str(exc).startswith(_TRANSITION):
        return InvalidTransition(str(exc)[len(_TRANSITION) :])
    if isinstance(exc, AuthenticationError) or "WRONGPASS" in text or "NOAUTH" in text:
        return StoreError(
            f"Redis at {where} refused the store URL's credentials ({text}); check the user"
            " and password in --store or FARMHAND_STORE"
        )
    if isinstance(exc, ConnectionError | TimeoutError):
        return StoreError(
            f"cannot reach the Redis store at {where} ({text}); start redis-server there or"
            " pass --store with another redis:// URL"
        )
    if text.startswith("READONLY"):
        return StoreError(
            f"Redis at {where} is a read-only replica; point the store URL at the primary"
        )
    if text.startswith("OOM"):
        return StoreError(
            f"Redis at {where} is out of memory (maxmemory reached); nothing was written."
            " Raise maxmemory (with maxmemory-policy noeviction) or free memory"
        )
    return StoreError(f"Redis at {where} refused a farmhand command: {text}")


def _transitions() -> str:
    """The legal transitions as a Lua table, from the one definition in Python."""
    rows = []
    for source, targets in TRANSITIONS.items():
        inner = ", ".join(f"{t.value} = true" for t in sorted(targets))
        rows.append(f"  {source.value} = {{ {inner} }},")
    return "local ALLOWED = {\n" + "\n".join(rows) + "\n}\n"


@cache
def script_source(name: str) -> str:
    """The full text of one script: its ``#!lua`` line, the transitions (for a script that
    uses them), the prelude, its body."""
    folder = resources.files("farmhand.store") / "lua"
    body = (folder / f"{name}.lua").read_text(encoding="utf-8")
    prelude = (folder / "prelude.lua").read_text(encoding="utf-8")
    shebang = ""
    if body.startswith("#!"):
        shebang, _, body = body.partition("\n")
    # the table is built on every run of a script: ~7 us of server time, more than the
    # whole rest of a small read such as rows.lua
    transitions = _transitions() if "ALLOWED" in body else ""
    return "\n".join(part for part in (shebang, transitions, prelude, body) if part)


class Link:
    """One Redis connection pool for one farm: its scripts, its keys and its clock.

    Every call goes through :meth:`do` or :meth:`run`, which refuse a closed store and turn
    Redis errors into farmhand errors.
    """

    def __init__(self, target: Target, clock: Clock | None) -> None:
        self.target = target
        self.prefix = target.prefix
        self.clock = clock
        # no automatic retries: a script re-sent after a lost reply would run twice (a
        # second claim, an apply refused by its own first run); callers see the error
        self.client: Redis = Redis.from_url(
            target.url,
            decode_responses=True,
            protocol=2,
            retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=5.0,
        )
        self._scripts: dict[str, AsyncScript] = {
            name: self.client.register_script(script_source(name)) for name in SCRIPTS
        }
        self.closed = False
        #: readiness as a claim of fewer than it asked for found it, keyed by its gate rules;
        #: any other script this link runs but a start drops it
        self.ready = KeptReadiness()
        timeout = self.client.connection_pool.connection_kwargs.get("socket_timeout")
        #: longest XREAD BLOCK that still answers within the socket timeout
        self.max_block = 1.0 if timeout is None else min(1.0, float(timeout) / 2)

    def key(self, name: str) -> str:
        """The full name of one of this farm's keys."""
        return self.prefix + name

    def now_arg(self) -> str:
        """ARGV[2] of every script: the store clock's time, or '' for the server's TIME."""
        return "" if self.clock is None else repr(self.clock.now())

    def check_open(self) -> None:
        """Refuse use after :meth:`close`."""
        if self.closed:
            raise StoreError(f"the Redis store {self.target.display} is closed")

    async def do(self, fn: Callable[[Redis], Awaitable[T]]) -> T:
        """``await fn(client)`` for commands that only read (or write idempotently), with
        Redis errors as farmhand errors."""
        self.check_open()
        try:
            return await self._again_on_lost_connection(lambda: fn(self.client))
        except RedisError as exc:
            raise translate(self.target, exc) from exc

    @staticmethod
    async def _again_on_lost_connection(call: Callable[[], Awaitable[T]]) -> T:
        # a pooled connection the server has closed (a restart, a failover, an idle
        # timeout) fails once; a read can safely be sent again on a fresh connection
        try:
            return await call()
        except ConnectionError:
            return await call()

    async def run(self, name: str, args: Sequence[Any], now: str | None = None) -> Any:
        """Run script ``name`` with ``args`` after the prefix and the time (``now``, else
        the store clock's)."""
        self.check_open()
        if name not in KEEPS_READINESS:
            self.ready.drop()
        script = self._scripts[name]
        argv = [self.prefix, self.now_arg() if now is None else now, *args]
        keys = [self.key("changes")]
        try:
            if name in READ_ONLY:
                return await self._again_on_lost_connection(lambda: script(keys=keys, args=argv))
            return await script(keys=keys, args=argv)
        except RedisError as exc:
            raise translate(self.target, exc) from exc

    async def now_and(self, table: str, fields: Sequence[str]) -> tuple[float, list[str | None]]:
        """The store clock's time and the values of ``fields`` of hash ``table``, in one
        read."""
        now, *values = await self.run("rows", [table, *fields])
        return float(now), values

    async def close(self) -> None:
        """Close the connections."""
        self.closed = True
        await self.client.aclose()
